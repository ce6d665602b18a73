package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// FuzzParse checks that Parse never panics, that it returns either a policy or a
// sorted, positioned ErrorList, and that every policy it accepts compiles, has
// every rule match a packet on its prototype inventory, prepares (RelaysFor
// naming only its relays), runs its tests, explains and diffs without error, is
// identical to itself, and has its warnings positioned.
func FuzzParse(f *testing.F) {
	seeds := []string{"", "version: 1\n", "version: 1\nsegments: [{name: a, nodes: [x]}]\nrules: [{name: r, from: [a], to: [all], ports: [tcp/1-2, icmp]}]\n",
		"version: 1\nsegments: [{name: a, nodes: [x]}, {name: b, cidrs: [\"2001:db8::/32\"]}]\nrules: [{name: r, from: [a], to: [b], ports: [udp]}]\n" +
			"tests:\n  - {name: t, from: a, to: \"2001:db8::1\", allow: [udp/53], deny: [tcp]}\n  - {name: u, from: x, only: [b, \"[2001:db8::2]\"]}\n",
		testSegs + "  - {name: a, from: web, to: api, allow: [tcp/8080], deny: [icmp]}\n  - {name: b, from: db, only: [ops]}\n",
		dualStackPolicy,
		relaySegs + "  - {node: ops-1, for: [web, api]}\n  - node: edge.lan\n    for: [all]\n",
		relaySegs + "  - {node: ops-1, for: [partner, wbe]}\n  - {node: ops-1, for: [solo]}\n  - {for: []}\n"}
	files, _ := filepath.Glob("testdata/policies/*.yaml")
	files = append(files, "../examples/policy.yaml")
	for _, p := range files {
		data, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, string(data))
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	inv := loadInventory(f, "testdata/inventory.json")
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse("f.yaml", data)
		if err != nil {
			if p != nil {
				t.Fatalf("Parse returned a policy and an error")
			}
			var list ErrorList
			if !errors.As(err, &list) || len(list) == 0 {
				t.Fatalf("Parse error %T %v is not a non-empty ErrorList", err, err)
			}
			// YAML breaks lines at CR LF, CR and LF.
			lines := strings.Count(strings.ReplaceAll(strings.ReplaceAll(string(data), "\r\n", "\n"), "\r", "\n"), "\n") + 1
			for _, e := range list {
				if e.Pos.File != "f.yaml" || e.Pos.Line < 1 || e.Pos.Col < 1 || e.Pos.Line > lines+1 || e.Msg == "" {
					t.Fatalf("bad error %q (%+v) for a %d-line input", e.Error(), e.Pos, lines)
				}
			}
			if !slices.IsSortedFunc(list, func(a, b *Error) int {
				if a.Pos.Line != b.Pos.Line {
					return a.Pos.Line - b.Pos.Line
				}
				return a.Pos.Col - b.Pos.Col
			}) {
				t.Fatalf("errors not sorted:\n%v", err)
			}
			return
		}
		if p.Version != 1 {
			t.Fatalf("accepted version %d", p.Version)
		}
		c, err := Compile(p, inv)
		if err != nil {
			t.Fatalf("Compile of an accepted policy: %v", err)
		}
		proto := PrototypeInventory(p)
		u, err := newUniverse(p, proto, nil)
		if err != nil {
			t.Fatalf("prototype inventory: %v", err)
		}
		overlay := false
		for _, s := range p.Segments {
			for _, cidr := range s.CIDRs {
				overlay = overlay || cidr.Prefix.Overlaps(prototypeV4) || cidr.Prefix.Overlaps(prototypeV6)
			}
		}
		for i := range u.rules {
			// A rule whose external segment holds only prototype node addresses has
			// no external party on the prototype; real inventories differ.
			if !overlay && !ruleMatchesAPacket(u, i) {
				t.Fatalf("accepted rule %s matches no packet", u.rules[i].rule.Name)
			}
		}
		prog, err := Prepare(p)
		if err != nil {
			t.Fatalf("Prepare of an accepted policy: %v", err)
		}
		if got := prog.Relays(); len(got) != len(p.Relays) {
			t.Fatalf("Relays() = %v for %d relays", got, len(p.Relays))
		}
		for i := range inv {
			ms := prog.Memberships(&inv[i], nil)
			for _, r := range prog.RelaysFor(ms, ms) {
				if !slices.ContainsFunc(p.Relays, func(pr Relay) bool { return pr.Node == r }) {
					t.Fatalf("RelaysFor returned %q, which is no relay", r)
				}
			}
		}
		if _, err := RunTests(p, inv); err != nil {
			t.Fatalf("RunTests: %v", err)
		}
		for _, w := range append(Warnings(p, inv), Warnings(p, nil)...) {
			if w.Pos.File != "f.yaml" || w.Pos.Line < 1 || w.Pos.Col < 1 || w.Msg == "" {
				t.Fatalf("bad warning %q (%+v)", w.String(), w.Pos)
			}
		}
		if d, err := Diff(p, p, nil); err != nil || !d.Identical() {
			t.Fatalf("Diff of a policy with itself: %v\n%s", err, d.Text())
		}
		for _, r := range p.Rules {
			pk := "icmp"
			if m := r.Ports[0]; (m.Protocol == ProtoTCP || m.Protocol == ProtoUDP) && len(m.Ports) > 0 {
				pk = fmt.Sprintf("%s/%d", m.Protocol, m.Ports[0].First)
			}
			if x, err := Explain(p, proto, Query{From: r.From[0], To: r.To[0], Packet: pk}); err == nil && len(x.Cases) == 0 {
				t.Fatalf("Explain without cases")
			}
		}
		for _, n := range c.Nodes() {
			v, _ := c.Node(n)
			for _, rules := range [][]FilterRule{v.Filter.Ingress, v.Filter.Egress} {
				for _, fr := range rules {
					if !slices.ContainsFunc(v.Filter.Sets, func(s AddressSet) bool { return s.Name == fr.Set }) {
						t.Fatalf("%s: rule references missing set %q", n, fr.Set)
					}
					if len(fr.Matches) == 0 || !reflect.DeepEqual(fr.Matches, mergeMatches(fr.Matches)) {
						t.Fatalf("%s: matches not canonical: %+v", n, fr.Matches)
					}
				}
			}
		}
	})
}

// FuzzPrefixSyntax checks parsePrefixText against netip: it accepts exactly the
// masked, unmapped prefixes netip.ParsePrefix reads, and every "did you mean"
// hint it gives is itself accepted.
func FuzzPrefixSyntax(f *testing.F) {
	for _, s := range []string{"10.0.0.0/8", "10.1.0.0/8", "0.0.0.0/0", "1.2.3.4/32", "1.2.3.4/33", "::/0", "::1/127", "::ffff:10.0.0.0/104",
		"2001:db8::/32", "fe80::%eth0/64", "10.0.0.1", "2001:db8::1", "10.0.0/8", "/8", "10.0.0.0/08", "255.255.255.255/31"} {
		f.Add(s)
	}
	hint := regexp.MustCompile(`did you mean ([^?]+)\?`)
	f.Fuzz(func(t *testing.T, s string) {
		got, err := parsePrefixText(s, "cidr")
		want, werr := netip.ParsePrefix(s)
		ok := werr == nil && !want.Addr().Is4In6() && want.Masked() == want
		if (err == nil) != ok {
			t.Fatalf("parsePrefixText(%q) = %v, %v; netip says %v, %v", s, got, err, want, werr)
		}
		if err == nil {
			if got != want {
				t.Fatalf("parsePrefixText(%q) = %v, want %v", s, got, want)
			}
			return
		}
		if m := hint.FindStringSubmatch(err.Error()); m != nil {
			if _, herr := parsePrefixText(m[1], "cidr"); herr != nil {
				t.Fatalf("parsePrefixText(%q) hints %q, which is refused: %v", s, m[1], herr)
			}
		}
	})
}
