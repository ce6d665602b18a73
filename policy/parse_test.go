package policy

import (
	"errors"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"
)

// TestParseErrors checks every class of problem, its exact position and message.
// Each case may hold several problems: all of them are reported, sorted.
func TestParseErrors(t *testing.T) {
	const okSegs = "version: 1\nsegments:\n  - name: web\n    selectors: [{role: web}]\n  - name: api\n    selectors: [{role: api}]\n  - name: partner\n    cidrs: [192.0.2.0/24]\n"
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{"empty file", "", []string{`p.yaml:1:1: missing "version: 1" (an empty policy is a file holding only "version: 1")`}},
		{"comment only", "# nothing\n", []string{`p.yaml:1:1: missing "version: 1" (an empty policy is a file holding only "version: 1")`}},
		{"version missing", "segments: []\n", []string{`p.yaml:1:1: missing "version: 1"`}},
		{"version 2", "version: 2\n", []string{`p.yaml:1:10: unsupported version 2; want 1`}},
		{"version 0x1", "version: 0x1\n", []string{`p.yaml:1:10: unsupported version 0x1; want 1`}},
		{"version 01", "version: 01\n", []string{`p.yaml:1:10: unsupported version 01; want 1`}},
		{"version +1", "version: +1\n", []string{`p.yaml:1:10: unsupported version +1; want 1`}},
		{"version string", "version: \"1\"\n", []string{`p.yaml:1:10: version must be an integer, got a string`}},
		{"top level list", "- version: 1\n", []string{`p.yaml:1:1: policy must be a mapping, got a list`}},
		{"yaml syntax", "version: 1\nrules: [a, b\n", []string{`p.yaml:2:8: invalid YAML: sequence end token ']' not found`}},
		{"yaml duplicate key", "version: 1\nversion: 1\n", []string{`p.yaml:2:1: invalid YAML: mapping key "version" already defined at [1:1]`}},
		{"two documents", "version: 1\n---\nversion: 1\n", []string{`p.yaml:3:1: a policy file holds one YAML document; remove the extra document`}},
		{"unknown top-level key", "version: 1\nsegment: []\nextra: 1\n", []string{
			`p.yaml:2:1: unknown field "segment" in policy (did you mean "segments"?)`,
			`p.yaml:3:1: unknown field "extra" in policy`,
		}},
		{"segments wrong type", "version: 1\nsegments: {name: web}\n", []string{`p.yaml:2:12: segments must be a list, got a mapping`}},
		{"rules wrong type", "version: 1\nrules: web\n", []string{`p.yaml:2:8: rules must be a list, got a string`}},
		{"anchor and alias", "version: 1\nsegments:\n  - name: web\n    selectors: &s [{role: web}]\n  - name: api\n    selectors: *s\n", []string{
			`p.yaml:4:16: YAML anchors and aliases are not supported in policy files; write the value out`,
			`p.yaml:6:16: YAML anchors and aliases are not supported in policy files; write the value out`,
		}},
		{"tag", "version: !!int 1\n", []string{`p.yaml:1:10: YAML tags are not supported in policy files; remove !!int`}},
		{"segment not a mapping", "version: 1\nsegments:\n  - web\n", []string{`p.yaml:3:5: segment must be a mapping, got a string`}},
		{"unknown segment key", "version: 1\nsegments:\n  - name: web\n    selector: [{role: web}]\n", []string{
			`p.yaml:3:5: segment selects nothing; give it selectors, nodes or cidrs`,
			`p.yaml:4:5: unknown field "selector" in segment (did you mean "selectors"?)`,
		}},
		{"segment name missing", "version: 1\nsegments:\n  - nodes: [a]\n", []string{`p.yaml:3:5: segment is missing its name`}},
		{"bad segment names", "version: 1\nsegments:\n  - name: Web\n    nodes: [a]\n  - name: -x\n    nodes: [a]\n  - name: a234567890123456789012345678901x\n    nodes: [a]\n  - name: 7\n    nodes: [a]\n", []string{
			`p.yaml:3:11: invalid segment name "Web": must match [a-z0-9][a-z0-9_-]{0,30}`,
			`p.yaml:5:11: invalid segment name "-x": must match [a-z0-9][a-z0-9_-]{0,30}`,
			`p.yaml:7:11: invalid segment name "a234567890123456789012345678901x": must match [a-z0-9][a-z0-9_-]{0,30}`,
			`p.yaml:9:11: segment name must be a string, got an integer (quote it: "7")`,
		}},
		{"reserved all", "version: 1\nsegments:\n  - name: all\n    nodes: [a]\n", []string{`p.yaml:3:11: segment name "all" is reserved for the built-in segment of every node`}},
		{"duplicate segment", "version: 1\nsegments:\n  - name: web\n    nodes: [a]\n  - name: web\n    nodes: [b]\n", []string{`p.yaml:5:11: duplicate segment "web" (first defined at p.yaml:3:5)`}},
		{"empty selectors", "version: 1\nsegments:\n  - name: web\n    selectors: []\n", []string{`p.yaml:4:16: selectors is empty; list at least one selector or remove the field`}},
		{"empty selector", "version: 1\nsegments:\n  - name: web\n    selectors: [{}]\n", []string{`p.yaml:4:17: empty selector; list at least one label (the built-in segment "all" holds every node)`}},
		{"selector value types", "version: 1\nsegments:\n  - name: web\n    selectors:\n      - {tier: 1, role: [a]}\n", []string{
			`p.yaml:5:16: value of label "tier" must be a string, got an integer (quote it: "1")`,
			`p.yaml:5:25: value of label "role" must be a string, got a list`,
		}},
		{"label syntax", "version: 1\nsegments:\n  - name: web\n    selectors:\n      - {\" role\": web, \"my key\": a, r\u00f4le: x, env: \"\", a/b.c_d-e: v.1_x-2}\n      - {role: \" web \", tier: \"front end\", zone: \"\u00e9\", big: " + strings.Repeat("a", 64) + "}\n      - {-x: y, x-: \"-y\", a/b: c/d, \"\": q, " + strings.Repeat("k", 64) + ": v, \"bad\\tkey\": v}\n", []string{
			`p.yaml:5:10: label key " role" is not valid: it holds a space at character 1; ` + keyRules + ` (did you mean "role"?)`,
			`p.yaml:5:24: label key "my key" is not valid: it holds a space at character 3; ` + keyRules,
			`p.yaml:5:37: label key "rôle" is not valid: it holds the non-ASCII character 'ô'; ` + keyRules,
			`p.yaml:6:16: value " web " of label "role" is not valid: it holds a space at character 1; ` + valueRules + ` (did you mean "web"?)`,
			`p.yaml:6:31: value "front end" of label "tier" is not valid: it holds a space at character 6; ` + valueRules,
			`p.yaml:6:50: value "é" of label "zone" is not valid: it holds the non-ASCII character 'é'; ` + valueRules,
			`p.yaml:6:60: value "` + strings.Repeat("a", 64) + `" of label "big" is not valid: it is 64 characters long, more than 63; ` + valueRules,
			`p.yaml:7:10: label key "-x" is not valid: it does not start and end with a letter or digit; ` + keyRules,
			`p.yaml:7:17: label key "x-" is not valid: it does not start and end with a letter or digit; ` + keyRules,
			`p.yaml:7:21: value "-y" of label "x-" is not valid: it does not start and end with a letter or digit; ` + valueRules,
			`p.yaml:7:32: value "c/d" of label "a/b" is not valid: it holds '/'; ` + valueRules,
			`p.yaml:7:37: label key is empty; ` + keyRules,
			`p.yaml:7:44: label key "` + strings.Repeat("k", 64) + `" is not valid: it is 64 characters long, more than 63; ` + keyRules,
			`p.yaml:7:113: label key "bad\tkey" is not valid: it holds a tab at character 4; ` + keyRules,
		}},
		{"selector not a mapping", "version: 1\nsegments:\n  - name: web\n    selectors: [role=web]\n", []string{`p.yaml:4:17: selector must be a mapping, got a string`}},
		{"null selectors", "version: 1\nsegments:\n  - name: web\n    selectors:\n", []string{`p.yaml:4:16: selectors is empty; list at least one selector or remove the field`}},
		{"empty nodes", "version: 1\nsegments:\n  - name: web\n    nodes: []\n", []string{`p.yaml:4:12: nodes is empty; list at least one node name or remove the field`}},
		{"empty node name", "version: 1\nsegments:\n  - name: web\n    nodes: [\"\"]\n", []string{`p.yaml:4:13: invalid node name "": must match [a-z0-9][a-z0-9.-]{0,62}`}},
		{"bad node names", "version: 1\nsegments:\n  - {name: ops, nodes: [Ops-1, \"ops 2\", \"ops_3\", \"-x\", \"a..b\", ok-1.lan]}\n", []string{
			`p.yaml:3:25: invalid node name "Ops-1": must match [a-z0-9][a-z0-9.-]{0,62}`,
			`p.yaml:3:32: invalid node name "ops 2": must match [a-z0-9][a-z0-9.-]{0,62}`,
			`p.yaml:3:41: invalid node name "ops_3": must match [a-z0-9][a-z0-9.-]{0,62}`,
			`p.yaml:3:50: invalid node name "-x": must match [a-z0-9][a-z0-9.-]{0,62}`,
		}},
		{"cidr mixed with selectors", "version: 1\nsegments:\n  - name: x\n    nodes: [a]\n    cidrs: [10.0.0.0/8]\n", []string{`p.yaml:5:5: a segment holds either nodes (selectors, nodes) or external addresses (cidrs), not both`}},
		{"cidr host bits", "version: 1\nsegments:\n  - name: x\n    cidrs: [10.1.0.0/8, \"2001:db8::1/32\"]\n", []string{
			`p.yaml:4:13: cidr 10.1.0.0/8 has host bits set (did you mean 10.0.0.0/8?)`,
			`p.yaml:4:25: cidr 2001:db8::1/32 has host bits set (did you mean 2001:db8::/32?)`,
		}},
		{"cidr not a prefix", "version: 1\nsegments:\n  - name: x\n    cidrs: [10.0.0.1, 10.0.0/8, 7]\n", []string{
			`p.yaml:4:13: cidr "10.0.0.1" is an address, not a CIDR (did you mean 10.0.0.1/32?)`,
			`p.yaml:4:23: invalid cidr "10.0.0/8": want ADDRESS/BITS, e.g. 192.0.2.0/24`,
			`p.yaml:4:33: cidr must be a string, got an integer (quote it: "7")`,
		}},
		{"cidr mapped", "version: 1\nsegments:\n  - name: x\n    cidrs: [\"::ffff:10.0.0.0/104\"]\n", []string{`p.yaml:4:13: cidr "::ffff:10.0.0.0/104" is an IPv4-mapped IPv6 prefix; write it as an IPv4 CIDR`}},
		{"cidr mapped address", "version: 1\nsegments:\n  - name: x\n    cidrs: [\"::ffff:10.0.0.1\"]\n", []string{`p.yaml:4:13: cidr "::ffff:10.0.0.1" is an address, not a CIDR (did you mean 10.0.0.1/32?)`}},
		{"except outside", "version: 1\nsegments:\n  - name: x\n    cidrs:\n      - cidr: 10.0.0.0/16\n        except: [10.0.0.0/16, 10.1.0.0/24, 10.0.0.0/8, \"fd00::/64\", 10.0.0.5/24]\n", []string{
			`p.yaml:6:18: except 10.0.0.0/16 does not lie strictly inside 10.0.0.0/16`,
			`p.yaml:6:31: except 10.1.0.0/24 does not lie strictly inside 10.0.0.0/16`,
			`p.yaml:6:44: except 10.0.0.0/8 does not lie strictly inside 10.0.0.0/16`,
			`p.yaml:6:56: except fd00::/64 does not lie strictly inside 10.0.0.0/16`,
			`p.yaml:6:69: except 10.0.0.5/24 has host bits set (did you mean 10.0.0.0/24?)`,
		}},
		{"except covers everything", "version: 1\nsegments:\n  - name: x\n    cidrs:\n      - cidr: 10.0.0.0/24\n        except: [10.0.0.0/25, 10.0.0.128/25]\n", []string{`p.yaml:5:15: the except entries cover all of 10.0.0.0/24; the entry selects nothing`}},
		{"cidr entry keys", "version: 1\nsegments:\n  - name: x\n    cidrs:\n      - {prefix: 10.0.0.0/8}\n", []string{
			`p.yaml:5:10: cidrs entry is missing its cidr`,
			`p.yaml:5:10: unknown field "prefix" in cidrs entry`,
		}},
		{"rule keys", okSegs + "rules:\n  - name: r\n    form: [web]\n    to: [api]\n    port: [tcp/1]\n", []string{
			`p.yaml:10:5: rule is missing from (a list of segment names)`,
			`p.yaml:10:5: rule is missing its ports (e.g. ports: [tcp/443])`,
			`p.yaml:11:5: unknown field "form" in rule (did you mean "from"?)`,
			`p.yaml:13:5: unknown field "port" in rule (did you mean "ports"?)`,
		}},
		{"rule name missing and bad", okSegs + "rules:\n  - from: [web]\n    to: [api]\n    ports: [any]\n  - name: Bad_Name\n    from: [web]\n    to: [api]\n    ports: [any]\n", []string{
			`p.yaml:10:5: rule is missing its name`,
			`p.yaml:13:11: invalid rule name "Bad_Name": must match [a-z0-9][a-z0-9_-]{0,30}`,
		}},
		{"duplicate rule", okSegs + "rules:\n  - name: r\n    from: [web]\n    to: [api]\n    ports: [any]\n  - name: r\n    from: [api]\n    to: [web]\n    ports: [any]\n", []string{`p.yaml:14:11: duplicate rule "r" (first defined at p.yaml:10:5)`}},
		{"undefined segments", okSegs + "rules:\n  - name: r\n    from: [wbe, nothing-like-it]\n    to: [al, apis]\n    ports: [any]\n", []string{
			`p.yaml:11:12: undefined segment "wbe" (did you mean "web"?)`,
			`p.yaml:11:17: undefined segment "nothing-like-it"`,
			`p.yaml:12:10: undefined segment "al" (did you mean "all"?)`,
			`p.yaml:12:14: undefined segment "apis" (did you mean "api"?)`,
		}},
		{"all mixed", okSegs + "rules:\n  - name: r\n    from: [web, all]\n    to: [all]\n    ports: [any]\n", []string{`p.yaml:11:17: "all" already holds every node; do not combine it with other segments in from`}},
		{"from to types", okSegs + "rules:\n  - name: r\n    from: web\n    to: []\n    ports: [any]\n", []string{
			`p.yaml:11:11: from must be a list, got a string`,
			`p.yaml:12:9: to is empty; list at least one segment`,
		}},
		{"external to external", okSegs + "rules:\n  - name: r\n    from: [partner]\n    to: [partner]\n    ports: [any]\n", []string{`p.yaml:10:5: rule "r" connects no node: from and to are both external (cidrs) segments`}},
		{"ports", okSegs + "rules:\n  - name: r\n    from: [web]\n    to: [api]\n    ports: [5432, \"5432\", 8000-8100, tcp/0, udp/65536, tcp/9-1, icmp/8, any/1, sctp/9, TCP/80, tcp/x, tcp/, true]\n", []string{
			`p.yaml:13:13: port 5432 has no protocol; did you mean tcp/5432 or udp/5432?`,
			`p.yaml:13:19: port "5432" has no protocol; did you mean tcp/5432 or udp/5432?`,
			`p.yaml:13:27: port "8000-8100" has no protocol; did you mean tcp/8000-8100 or udp/8000-8100?`,
			`p.yaml:13:38: port 0 is out of range 1-65535 in "tcp/0"`,
			`p.yaml:13:45: port 65536 is out of range 1-65535 in "udp/65536"`,
			`p.yaml:13:56: port range 9-1 has first > last (did you mean 1-9?) in "tcp/9-1"`,
			`p.yaml:13:65: protocol icmp takes no ports; write "icmp"`,
			`p.yaml:13:73: protocol any takes no ports; write "any"`,
			`p.yaml:13:80: unknown protocol "sctp" in "sctp/9"; want tcp, udp, icmp or any`,
			`p.yaml:13:88: unknown protocol "TCP" in "TCP/80"; want tcp, udp, icmp or any (did you mean "tcp"?)`,
			`p.yaml:13:96: invalid port "x": want a number 1-65535 or a range FIRST-LAST in "tcp/x"`,
			`p.yaml:13:103: invalid port "": want a number 1-65535 or a range FIRST-LAST in "tcp/"`,
			`p.yaml:13:109: port must be a string such as tcp/443, got a boolean`,
		}},
		{"block scalars are strings", okSegs + "rules:\n  - name: |-\n      r\n    from: [web]\n    to:\n      - >-\n        apis\n    ports:\n      - >-\n        tcp/0\n", []string{
			`p.yaml:14:9: undefined segment "apis" (did you mean "api"?)`,
			`p.yaml:17:9: port 0 is out of range 1-65535 in "tcp/0"`,
		}},
		{"unquoted IPv6 in flow lists", "version: 1\nsegments:\n  - {name: e6, cidrs: [2001:db8::/32]}\n  - {name: e7, cidrs: [10.0.0.0/8, fd00::/8]}\ntests:\n  - {name: t, from: e6, only: [fd5e:6d65:7368::4]}\n", []string{
			`p.yaml:3:24: cidr must be a string, got a mapping: YAML reads an unquoted IPv6 address or CIDR in a flow list as KEY: VALUE; quote it: "2001:db8::/32"`,
			`p.yaml:4:36: cidr must be a string, got a mapping: YAML reads an unquoted IPv6 address or CIDR in a flow list as KEY: VALUE; quote it: "fd00::/8"`,
			`p.yaml:6:32: only target must be a string, got a mapping: YAML reads an unquoted IPv6 address or CIDR in a flow list as KEY: VALUE; quote it: "fd5e:6d65:7368::4"`,
		}},
		{"empty ports", okSegs + "rules:\n  - name: r\n    from: [web]\n    to: [api]\n    ports: []\n", []string{`p.yaml:13:12: ports is empty; list at least one port such as tcp/443, icmp or any`}},
		{"errors across sections are sorted", "rules: 1\nversion: 3\nsegments: 2\n", []string{
			`p.yaml:1:8: rules must be a list, got an integer`,
			`p.yaml:2:10: unsupported version 3; want 1`,
			`p.yaml:3:11: segments must be a list, got an integer`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { checkParseErrors(t, tt.src, tt.want) })
	}
}

// checkParseErrors checks that Parse("p.yaml", src) fails with exactly the
// errors want, one per line, as an ErrorList.
func checkParseErrors(t *testing.T, src string, want []string) {
	t.Helper()
	p, err := Parse("p.yaml", []byte(src))
	if p != nil {
		t.Errorf("Parse returned a policy alongside errors")
	}
	var list ErrorList
	if !errors.As(err, &list) {
		t.Fatalf("Parse error = %v (%T), want ErrorList", err, err)
	}
	got := strings.Split(err.Error(), "\n")
	if !reflect.DeepEqual(got, want) {
		t.Errorf("errors:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if len(list) != len(got) {
		t.Errorf("ErrorList has %d entries, Error() has %d lines", len(list), len(got))
	}
}

func TestParseValid(t *testing.T) {
	src := `version: 1
segments:
  - name: web
    selectors:
      - {role: web}
      - {role: frontend, env: prod}
    nodes: [ops-1]
  - name: partner
    cidrs:
      - 192.0.2.0/24
      - cidr: 198.51.100.0/24
        except: [198.51.100.128/25]
rules:
  - name: partner-in
    from: [partner]
    to: [web]
    ports: [tcp/443, "tcp/8000-8100", udp/53, icmp, any, udp]
  - name: everyone
    from: [all]
    to: [all]
    ports: [icmp]
`
	got := mustParse(t, "policy.yaml", src)
	want := &Policy{
		File:    "policy.yaml",
		Version: 1,
		Segments: []Segment{
			{Name: "web", Pos: Pos{"policy.yaml", 3, 5},
				Selectors: []Selector{{"role": "web"}, {"role": "frontend", "env": "prod"}},
				Nodes:     []string{"ops-1"}, NodesPos: []Pos{{"policy.yaml", 7, 13}}},
			{Name: "partner", Pos: Pos{"policy.yaml", 8, 5}, CIDRs: []CIDR{
				{Prefix: netip.MustParsePrefix("192.0.2.0/24"), Pos: Pos{"policy.yaml", 10, 9}},
				{Prefix: netip.MustParsePrefix("198.51.100.0/24"), Except: []netip.Prefix{netip.MustParsePrefix("198.51.100.128/25")}, Pos: Pos{"policy.yaml", 11, 15}},
			}},
		},
		Rules: []Rule{
			{Name: "partner-in", Pos: Pos{"policy.yaml", 14, 5}, From: []string{"partner"}, To: []string{"web"},
				FromPos: Pos{"policy.yaml", 15, 5}, ToPos: Pos{"policy.yaml", 16, 5}, Ports: []PortMatch{
					{Protocol: ProtoTCP, Ports: []PortRange{{443, 443}}},
					{Protocol: ProtoTCP, Ports: []PortRange{{8000, 8100}}},
					{Protocol: ProtoUDP, Ports: []PortRange{{53, 53}}},
					{Protocol: ProtoICMP},
					{Protocol: ProtoAny},
					{Protocol: ProtoUDP},
				}},
			{Name: "everyone", Pos: Pos{"policy.yaml", 18, 5}, From: []string{"all"}, To: []string{"all"},
				FromPos: Pos{"policy.yaml", 19, 5}, ToPos: Pos{"policy.yaml", 20, 5}, Ports: []PortMatch{{Protocol: ProtoICMP}}},
		},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Parse =\n%#v\nwant\n%#v", got, want)
	}
}

func TestParseEmptyPolicy(t *testing.T) {
	for _, src := range []string{"version: 1\n", "# allow nothing\nversion: 1\nsegments: []\nrules: []\n", "version: 1\nsegments:\nrules:\n"} {
		p := mustParse(t, "p.yaml", src)
		if len(p.Segments) != 0 || len(p.Rules) != 0 || p.Version != 1 {
			t.Errorf("Parse(%q) = %+v, want an empty version 1 policy", src, p)
		}
		c := mustCompile(t, p, loadInventory(t, "testdata/inventory.json"))
		for _, n := range c.Nodes() {
			if v, _ := c.Node(n); !reflect.DeepEqual(v, NodeView{}) {
				t.Errorf("empty policy gives %s %+v, want nothing", n, v)
			}
		}
	}
}

func TestParseExample(t *testing.T) {
	data, err := os.ReadFile("../examples/policy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	p := mustParse(t, "policy.yaml", string(data))
	var segs, rules []string
	for _, s := range p.Segments {
		segs = append(segs, s.Name)
	}
	for _, r := range p.Rules {
		rules = append(rules, r.Name)
	}
	if want := []string{"web", "api", "db", "ops"}; !reflect.DeepEqual(segs, want) {
		t.Errorf("segments = %v, want %v", segs, want)
	}
	if want := []string{"web-to-api", "api-to-db", "ops-admin", "db-syslog"}; !reflect.DeepEqual(rules, want) {
		t.Errorf("rules = %v, want %v", rules, want)
	}
}

func TestErrorFormat(t *testing.T) {
	l := ErrorList{
		{Pos: Pos{"b.yaml", 1, 1}, Msg: "z"},
		{Pos: Pos{"a.yaml", 2, 1}, Msg: "y"},
		{Pos: Pos{"a.yaml", 1, 9}, Msg: "x"},
		{Pos: Pos{"a.yaml", 1, 9}, Msg: "x"},
	}.sort()
	want := "a.yaml:1:9: x\na.yaml:2:1: y\nb.yaml:1:1: z"
	if got := l.Error(); got != want {
		t.Errorf("ErrorList.Error() = %q, want %q", got, want)
	}
	if got := l[0].Error(); got != "a.yaml:1:9: x" {
		t.Errorf("Error.Error() = %q", got)
	}
}
