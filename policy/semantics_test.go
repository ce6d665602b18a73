package policy

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

// formatPolicy writes p in the policy file syntax (tests are not written).
func formatPolicy(p *Policy) string {
	var b strings.Builder
	q := strconv.Quote
	list := func(ss []string) string {
		out := make([]string, len(ss))
		for i, s := range ss {
			out[i] = q(s)
		}
		return "[" + strings.Join(out, ", ") + "]"
	}
	b.WriteString("version: 1\nsegments:\n")
	for _, s := range p.Segments {
		fmt.Fprintf(&b, "  - name: %s\n", q(s.Name))
		if len(s.Selectors) > 0 {
			b.WriteString("    selectors:\n")
			for _, sel := range s.Selectors {
				var kv []string
				for k, v := range sel {
					kv = append(kv, q(k)+": "+q(v))
				}
				fmt.Fprintf(&b, "      - {%s}\n", strings.Join(kv, ", "))
			}
		}
		if len(s.Nodes) > 0 {
			fmt.Fprintf(&b, "    nodes: %s\n", list(s.Nodes))
		}
		if len(s.CIDRs) > 0 {
			b.WriteString("    cidrs:\n")
			for _, c := range s.CIDRs {
				if len(c.Except) == 0 {
					fmt.Fprintf(&b, "      - %s\n", q(c.Prefix.String()))
					continue
				}
				var ex []string
				for _, e := range c.Except {
					ex = append(ex, e.String())
				}
				fmt.Fprintf(&b, "      - {cidr: %s, except: %s}\n", q(c.Prefix.String()), list(ex))
			}
		}
	}
	b.WriteString("rules:\n")
	for _, r := range p.Rules {
		var ports []string
		for _, m := range r.Ports {
			ports = append(ports, formatMatch(m))
		}
		fmt.Fprintf(&b, "  - name: %s\n    from: %s\n    to: %s\n    ports: %s\n", q(r.Name), list(r.From), list(r.To), list(ports))
	}
	return b.String()
}

// ruleMatchesAPacket reports whether rule ri alone allows some packet between
// two distinct parties of u (nodes and external addresses) over some family.
func ruleMatchesAPacket(u *universe, ri int) bool {
	r := &u.rules[ri]
	if r.ports.Empty() {
		return false
	}
	all := &partySet{}
	for p := range len(u.nodes) + len(u.atoms) {
		if u.isNode(p) || !u.atoms[p-len(u.nodes)].nodeAddr {
			all.add(u.classOf[p], p)
		}
	}
	for _, cs := range all.classes() {
		for _, cd := range all.classes() {
			a, b := u.classes[cs], u.classes[cd]
			if !a.node && !b.node || pairCount(all.byClass[cs], all.byClass[cd]) == 0 {
				continue
			}
			for _, f := range familiesOf(a, b) {
				if fm, tm, _ := u.ruleMatch(r, a, b, f, PortSet{}); fm && tm {
					return true
				}
			}
		}
	}
	return false
}

// TestEveryAcceptedRuleMatchesAPacket renders random policies to YAML and checks
// that Parse accepts a policy exactly when each of its rules alone allows at
// least one packet between two distinct parties of the prototype inventory.
func TestEveryAcceptedRuleMatchesAPacket(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p := genPolicy(t)
		src := formatPolicy(p)
		parsed, err := Parse("p.yaml", []byte(src))
		u, uerr := newUniverse(p, PrototypeInventory(p), nil)
		if uerr != nil {
			t.Fatal(uerr)
		}
		var dead []string
		for i := range u.rules {
			if !ruleMatchesAPacket(u, i) {
				dead = append(dead, u.rules[i].rule.Name)
			}
		}
		if err != nil {
			for _, e := range err.(ErrorList) {
				if !strings.Contains(e.Msg, "matches no packet") {
					t.Fatalf("unexpected error %v in\n%s", e, src)
				}
			}
			if len(dead) == 0 {
				t.Fatalf("Parse rejected a policy whose every rule matches a packet:\n%v\n%s", err, src)
			}
			return
		}
		if len(dead) > 0 {
			t.Fatalf("Parse accepted rules %v that match no packet:\n%s", dead, src)
		}
		if len(parsed.Rules) != len(p.Rules) {
			t.Fatalf("round trip lost rules")
		}
	})
}

func TestRuleMatchesNoPacket(t *testing.T) {
	const segs = "version: 1\nsegments:\n  - {name: a, nodes: [n1]}\n  - {name: a2, nodes: [n1, n1]}\n  - {name: b, nodes: [n1, n2]}\n  - {name: w, selectors: [{role: w}]}\nrules:\n"
	tests := []struct {
		rule string
		want string // "" when accepted
	}{
		{"  - {name: r, from: [a], to: [a], ports: [any]}\n", `p.yaml:8:5: rule "r" matches no packet: from and to hold only node "n1", and a node's traffic to itself does not cross the overlay`},
		{"  - {name: r, from: [a, a2], to: [a2], ports: [any]}\n", `p.yaml:8:5: rule "r" matches no packet: from and to hold only node "n1", and a node's traffic to itself does not cross the overlay`},
		{"  - {name: r, from: [a], to: [b], ports: [any]}\n", ""},   // n1 -> n2
		{"  - {name: r, from: [a], to: [all], ports: [any]}\n", ""}, // n1 -> any other node
		{"  - {name: r, from: [w], to: [w], ports: [any]}\n", ""},   // two nodes may match {role: w}
		{"  - {name: r, from: [a], to: [w], ports: [any]}\n", ""},
	}
	for _, tt := range tests {
		_, err := Parse("p.yaml", []byte(segs+strings.ReplaceAll(tt.rule, "{name", "{name")))
		got := ""
		if err != nil {
			got = err.Error()
		}
		// Flow-style entries start at column 6; the messages above use the block column.
		got = strings.ReplaceAll(got, "p.yaml:8:6:", "p.yaml:8:5:")
		if got != tt.want {
			t.Errorf("%s: error %q, want %q", strings.TrimSpace(tt.rule), got, tt.want)
		}
	}
}

// TestHostBitsAtEveryLength checks the canonical-form hint and the edges of
// both families: /0 and the longest prefix accept every masked address, every
// other length refuses host bits with the masked prefix as the hint, and a
// length beyond the family is no prefix at all.
func TestHostBitsAtEveryLength(t *testing.T) {
	type tc struct{ in, want string }
	var tests []tc
	for _, fam := range []struct {
		ones, zeros string
		max         int
	}{{"255.255.255.255", "0.0.0.0", 32}, {"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::", 128}} {
		for bits := 0; bits <= fam.max; bits++ {
			pfx := netip.MustParsePrefix(fam.ones + "/" + strconv.Itoa(bits))
			if bits == fam.max {
				tests = append(tests, tc{pfx.String(), ""})
			} else {
				tests = append(tests, tc{pfx.String(), fmt.Sprintf("cidr %s has host bits set (did you mean %s?)", pfx, pfx.Masked())})
			}
			tests = append(tests, tc{pfx.Masked().String(), ""})
			zero := fam.zeros + "/" + strconv.Itoa(bits)
			tests = append(tests, tc{zero, ""})
		}
		over := fam.zeros + "/" + strconv.Itoa(fam.max+1)
		tests = append(tests, tc{over, fmt.Sprintf("invalid cidr %q: want ADDRESS/BITS, e.g. 192.0.2.0/24", over)})
	}
	for _, tt := range tests {
		src := fmt.Sprintf("version: 1\nsegments:\n  - name: x\n    cidrs: [%q]\n", tt.in)
		_, err := Parse("p.yaml", []byte(src))
		got := ""
		if err != nil {
			got = strings.TrimPrefix(err.Error(), "p.yaml:4:13: ")
		}
		if got != tt.want {
			t.Errorf("cidr %s: error %q, want %q", tt.in, got, tt.want)
		}
	}
}

// dualStackPolicy exercises the families: a node-to-node rule, IPv4 and IPv6
// external segments, and an external segment holding the IPv6 overlay prefix.
const dualStackPolicy = `version: 1
segments:
  - {name: web, selectors: [{role: web}]}
  - {name: api, selectors: [{role: api}]}
  - {name: partner4, cidrs: [192.0.2.0/24]}
  - {name: partner6, cidrs: ["2001:db8::/48"]}
  - {name: overlay6, cidrs: ["fd5e:6d65:7368::/48"]}
rules:
  - {name: web-to-api, from: [web], to: [api], ports: [tcp/8080]}
  - {name: partner4-in, from: [partner4], to: [web], ports: [tcp/443]}
  - {name: web-to-partner6, from: [web], to: [partner6], ports: [tcp/443]}
  - {name: web-out6, from: [web], to: [overlay6], ports: [tcp/9000]}
  - {name: api-in6, from: [overlay6], to: [api], ports: [tcp/9000]}
  - {name: api-out6, from: [api], to: [overlay6], ports: [tcp/9001]}
`

func dualStackNodes() []Node {
	return []Node{
		node("web-1", map[string]string{"role": "web"}, "100.64.0.1", "fd5e:6d65:7368::1"),
		node("api-1", map[string]string{"role": "api"}, "100.64.0.3", "fd5e:6d65:7368::3"),
		node("db-1", map[string]string{"role": "db"}, "100.64.0.4", "fd5e:6d65:7368::4"),
	}
}

// TestDualStack pins the family semantics with Explain: a node-to-node rule
// covers both families, a CIDR rule only its own, and everything no rule
// allows, IPv6 included, is denied; an external segment holding overlay
// addresses opens filters but makes no peer.
func TestDualStack(t *testing.T) {
	p := mustParse(t, "p.yaml", dualStackPolicy)
	tests := []struct {
		from, to, packet string
		want             string // Explanation.Text()
	}{
		{"web-1", "api-1", "tcp/8080", "web-1 -> api-1 tcp/8080: allowed\n  allowed: web-1 -> api-1 over IPv4 and IPv6\n    by rule web-to-api (p.yaml:9:6)\n"},
		{"192.0.2.7", "web-1", "tcp/443", "192.0.2.7 -> web-1 tcp/443: allowed\n  allowed: 192.0.2.7 -> web-1 over IPv4\n    by rule partner4-in (p.yaml:10:6)\n"},
		{"2001:db8::7", "web-1", "tcp/443", "2001:db8::7 -> web-1 tcp/443: denied\n  denied: 2001:db8::7 -> web-1 over IPv6\n    no rule allows it\n" +
			"    closest: rule partner4-in (p.yaml:10:6) matches to, packet; from: 2001:db8::7 is not in partner4\n" +
			"    closest: rule web-to-partner6 (p.yaml:11:6) matches packet; from: 2001:db8::7 is not in web; to: web-1 is not in partner6\n"},
		{"web-1", "2001:db8::7", "tcp/443", "web-1 -> 2001:db8::7 tcp/443: allowed\n  allowed: web-1 -> 2001:db8::7 over IPv6\n    by rule web-to-partner6 (p.yaml:11:6)\n"},
		{"web-1", "192.0.2.7", "tcp/443", "web-1 -> 192.0.2.7 tcp/443: denied\n  denied: web-1 -> 192.0.2.7 over IPv4\n    no rule allows it\n" +
			"    closest: rule web-to-partner6 (p.yaml:11:6) matches from, packet; to: 192.0.2.7 is not in partner6\n" +
			"    closest: rule web-to-api (p.yaml:9:6) matches from; to: 192.0.2.7 is not in api; packet: tcp/443 is not in tcp/8080\n" +
			"    closest: rule partner4-in (p.yaml:10:6) matches packet; from: web-1 is not in partner4; to: 192.0.2.7 is not in web\n"},
		// Only IPv6 overlay addresses lie in overlay6: web-out6 opens web-1's egress,
		// api-in6 api-1's ingress, web-to-api makes them peers: all three are cited.
		{"web-1", "api-1", "tcp/9000", "web-1 -> api-1 tcp/9000: partly allowed\n  allowed: web-1 -> api-1 over IPv6\n    by rules web-to-api (p.yaml:9:6), web-out6 (p.yaml:12:6), api-in6 (p.yaml:13:6)\n" +
			"  denied: web-1 -> api-1 over IPv4\n    no rule allows it\n" +
			"    closest: rule web-to-api (p.yaml:9:6) matches from, to; packet: tcp/9000 is not in tcp/8080\n" +
			"    closest: rule web-out6 (p.yaml:12:6) matches from, packet; to: api-1 is not in overlay6\n" +
			"    closest: rule api-in6 (p.yaml:13:6) matches to, packet; from: web-1 is not in overlay6\n"},
		// api-1 opens its egress to db-1's IPv6 address, but nothing makes them peers
		// and db-1 accepts nothing.
		{"api-1", "db-1", "tcp/9001", "api-1 -> db-1 tcp/9001: denied\n  denied: api-1 -> db-1 over IPv4\n    no rule allows it\n" +
			"    closest: rule api-out6 (p.yaml:14:6) matches from, packet; to: db-1 is not in overlay6\n" +
			"  denied: api-1 -> db-1 over IPv6\n    rule api-out6 (p.yaml:14:6) opens only part of the path: nothing opens the destination's ingress; " +
			"nothing makes the nodes peers (a rule with one in a node segment of from and the other in a node segment of to)\n" +
			"    closest: rule api-out6 (p.yaml:14:6) matches from, packet; to: db-1 is not in overlay6 (an external segment there holds its IPv6 address, but external segments hold no node)\n"},
		// Default deny, IPv6 included: nothing allows api -> web.
		{"api-1", "fd5e:6d65:7368::1", "tcp/8080", "api-1 -> fd5e:6d65:7368::1 tcp/8080: denied\n  denied: api-1 -> web-1 over IPv6\n    no rule allows it\n" +
			"    closest: rule web-to-api (p.yaml:9:6) matches packet; from: api-1 is not in web; to: web-1 is not in api\n" +
			"    closest: rule partner4-in (p.yaml:10:6) matches to; from: api-1 is not in partner4; packet: tcp/8080 is not in tcp/443\n" +
			"    closest: rule api-out6 (p.yaml:14:6) matches from; to: web-1 is not in overlay6 (an external segment there holds its IPv6 address, but external segments hold no node); packet: tcp/8080 is not in tcp/9001\n"},
	}
	for _, tt := range tests {
		x, err := Explain(p, dualStackNodes(), Query{From: tt.from, To: tt.to, Packet: tt.packet})
		if err != nil {
			t.Errorf("%s -> %s: %v", tt.from, tt.to, err)
			continue
		}
		if got := x.Text(); got != tt.want {
			t.Errorf("%s -> %s %s:\n%s\nwant:\n%s", tt.from, tt.to, tt.packet, got, tt.want)
		}
	}
}

// TestIPv6DefaultDeny checks the compiled filters of an IPv4-only policy: no
// IPv6 address passes any node's ingress or egress, and nodes with both
// families get IPv4 and IPv6 addresses in node sets.
func TestIPv6DefaultDeny(t *testing.T) {
	p := mustParse(t, "p.yaml", "version: 1\nsegments:\n  - {name: web, selectors: [{role: web}]}\n  - {name: partner4, cidrs: [0.0.0.0/0]}\nrules:\n  - {name: in, from: [partner4], to: [web], ports: [any]}\n  - {name: out, from: [web], to: [partner4], ports: [any]}\n")
	c := mustCompile(t, p, dualStackNodes())
	probes := []string{"::1", "2001:db8::1", "fd5e:6d65:7368::1", "fd5e:6d65:7368::3", "ffff::1", "::ffff:0:1"}
	for _, name := range c.Nodes() {
		v, _ := c.Node(name)
		for _, s := range probes {
			a := netip.MustParseAddr(s)
			for _, egress := range []bool{false, true} {
				for _, pk := range probePackets() {
					if viewAllows(v, egress, a, pk.Protocol, pk.Port) {
						t.Errorf("%s egress=%v allows %s %v from an IPv4-only policy", name, egress, a, pk)
					}
				}
			}
		}
	}
	x, err := Explain(p, dualStackNodes(), Query{From: "web-1", To: "2001:db8::1", Packet: "tcp/443"})
	if err != nil || x.Verdict != Denied {
		t.Errorf("web-1 -> 2001:db8::1 = %v, %v; want denied", x, err)
	}
	x, err = Explain(p, dualStackNodes(), Query{From: "web-1", To: "192.0.2.1", Packet: "tcp/443"})
	if err != nil || x.Verdict != Allowed {
		t.Errorf("web-1 -> 192.0.2.1 = %v, %v; want allowed", x, err)
	}
}

// TestRunTestsFamily checks that a test failing over one family says which.
func TestRunTestsFamily(t *testing.T) {
	p := mustParse(t, "p.yaml", dualStackPolicy+"tests:\n  - {name: t, from: web, to: api, deny: [tcp/9000]}\n")
	failures, err := RunTests(p, dualStackNodes())
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		`p.yaml:16:6: test "t": role=web#1 -> role=api#1 tcp/9000 over IPv6 is allowed by rules web-to-api (p.yaml:9:6), web-out6 (p.yaml:12:6), api-in6 (p.yaml:13:6), want deny (prototype inventory)`,
		`p.yaml:16:6: test "t": web-1 -> api-1 tcp/9000 over IPv6 is allowed by rules web-to-api (p.yaml:9:6), web-out6 (p.yaml:12:6), api-in6 (p.yaml:13:6), want deny`,
	}
	var got []string
	for _, f := range failures {
		got = append(got, f.Error())
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("failures:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
