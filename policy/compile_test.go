package policy

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/golden")

// TestGolden compiles examples/policy.yaml and every testdata/policies/*.yaml
// against testdata/inventory.json and compares each node's view with
// testdata/golden/NAME.golden (go test -run TestGolden -update rewrites them).
func TestGolden(t *testing.T) {
	inv := loadInventory(t, "testdata/inventory.json")
	files, err := filepath.Glob("testdata/policies/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]string{"example": "../examples/policy.yaml"}
	for _, f := range files {
		cases[strings.TrimSuffix(filepath.Base(f), ".yaml")] = f
	}
	for name, path := range cases {
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			c := mustCompile(t, mustParse(t, filepath.Base(path), string(data)), inv)
			got := renderCompiled(c)
			golden := filepath.Join("testdata", "golden", name+".golden")
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -run TestGolden -update)", err)
			}
			if got != string(want) {
				t.Errorf("compiled %s differs from %s:\n--- got\n%s\n--- want\n%s", path, golden, got, want)
			}
		})
	}
}

func node(name string, labels map[string]string, addrs ...string) Node {
	n := Node{Name: name, Labels: labels}
	for _, a := range addrs {
		n.Addresses = append(n.Addresses, netip.MustParseAddr(a))
	}
	return n
}

// TestCompileSemantics checks peers, sets and rules of chosen nodes.
func TestCompileSemantics(t *testing.T) {
	inv := []Node{
		node("web-1", map[string]string{"role": "web"}, "100.64.0.1", "fd00::1"),
		node("web-2", map[string]string{"role": "web"}, "100.64.0.2"),
		node("api-1", map[string]string{"role": "api"}, "100.64.0.3"),
		node("db-1", map[string]string{"role": "db"}, "100.64.0.4"),
		node("ops-1", map[string]string{"role": "ops"}, "100.64.0.5"),
		node("bare", map[string]string{"role": "api"}), // no address yet
	}
	const segs = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: api
    selectors: [{role: api}]
  - name: db
    selectors: [{role: db}]
  - name: ops
    selectors: [{role: ops}]
  - name: partner
    cidrs: [192.0.2.0/24]
  - name: named
    nodes: [ops-1, ghost]
    selectors: [{role: db}]
rules:
`
	type check struct {
		node string
		want string // renderView output
	}
	tests := []struct {
		name   string
		rules  string
		checks []check
	}{
		{"one direction", `
  - name: web-to-api
    from: [web]
    to: [api]
    ports: [tcp/8080]
`, []check{
			{"web-1", "node web-1\n  peers: api-1 bare\n  set api: 100.64.0.3/32\n  egress to api: tcp/8080  # web-to-api (p.yaml:17:5)\n"},
			{"api-1", "node api-1\n  peers: web-1 web-2\n  set web: 100.64.0.1/32 100.64.0.2/32 fd00::1/128\n  ingress from web: tcp/8080  # web-to-api (p.yaml:17:5)\n"},
			{"db-1", "node db-1\n  peers: \n"},
		}},
		{"self rule peers others but not itself", `
  - name: web-mesh
    from: [web]
    to: [web]
    ports: [udp/7946]
`, []check{
			{"web-1", "node web-1\n  peers: web-2\n  set web: 100.64.0.1/32 100.64.0.2/32 fd00::1/128\n  ingress from web: udp/7946  # web-mesh (p.yaml:17:5)\n  egress to web: udp/7946  # web-mesh (p.yaml:17:5)\n"},
		}},
		{"built-in all", `
  - name: ping
    from: [all]
    to: [db]
    ports: [icmp]
`, []check{
			{"db-1", "node db-1\n  peers: api-1 bare ops-1 web-1 web-2\n  set all: 100.64.0.1/32 100.64.0.2/32 100.64.0.3/32 100.64.0.4/32 100.64.0.5/32 fd00::1/128\n  set db: 100.64.0.4/32\n  ingress from all: icmp  # ping (p.yaml:17:5)\n  egress to db: icmp  # ping (p.yaml:17:5)\n"},
			{"web-2", "node web-2\n  peers: db-1\n  set db: 100.64.0.4/32\n  egress to db: icmp  # ping (p.yaml:17:5)\n"},
		}},
		{"external segment adds no peer", `
  - name: partner-in
    from: [partner]
    to: [web]
    ports: [tcp/443]
  - name: api-out
    from: [api]
    to: [partner]
    ports: [tcp/443]
`, []check{
			{"web-1", "node web-1\n  peers: \n  set partner: 192.0.2.0/24\n  ingress from partner: tcp/443  # partner-in (p.yaml:17:5)\n"},
			{"api-1", "node api-1\n  peers: \n  set partner: 192.0.2.0/24\n  egress to partner: tcp/443  # api-out (p.yaml:21:5)\n"},
		}},
		{"rules on one set merge", `
  - name: b-rule
    from: [ops]
    to: [db, named]
    ports: [tcp/22, tcp/20-21]
  - name: a-rule
    from: [ops]
    to: [db]
    ports: [icmp, tcp/23-30, udp]
`, []check{
			{"db-1", "node db-1\n  peers: ops-1\n  set ops: 100.64.0.5/32\n  ingress from ops: icmp tcp/20-30 udp  # a-rule (p.yaml:21:5), b-rule (p.yaml:17:5)\n"},
			{"ops-1", "node ops-1\n  peers: db-1\n  set db: 100.64.0.4/32\n  set named: 100.64.0.4/32 100.64.0.5/32\n  set ops: 100.64.0.5/32\n" +
				"  ingress from ops: tcp/20-22  # b-rule (p.yaml:17:5)\n" +
				"  egress to db: icmp tcp/20-30 udp  # a-rule (p.yaml:21:5), b-rule (p.yaml:17:5)\n" +
				"  egress to named: tcp/20-22  # b-rule (p.yaml:17:5)\n"},
		}},
		{"any subsumes", `
  - name: narrow
    from: [web]
    to: [api]
    ports: [tcp/80]
  - name: wide
    from: [web]
    to: [api]
    ports: [any]
`, []check{
			{"api-1", "node api-1\n  peers: web-1 web-2\n  set web: 100.64.0.1/32 100.64.0.2/32 fd00::1/128\n  ingress from web: any  # narrow (p.yaml:17:5), wide (p.yaml:21:5)\n"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := mustCompile(t, mustParse(t, "p.yaml", segs+strings.TrimPrefix(tt.rules, "\n")), inv)
			for _, ch := range tt.checks {
				v, ok := c.Node(ch.node)
				if !ok {
					t.Fatalf("Node(%q) not found", ch.node)
				}
				if got := renderView(ch.node, v); got != ch.want {
					t.Errorf("Node(%q):\n%s\nwant:\n%s", ch.node, got, ch.want)
				}
			}
		})
	}
}

func TestCompileNodesAndLookup(t *testing.T) {
	p := mustParse(t, "p.yaml", "version: 1\n")
	c := mustCompile(t, p, []Node{node("b", nil, "100.64.0.2"), node("a", nil, "100.64.0.1"), node("c", nil)})
	if got := c.Nodes(); !reflect.DeepEqual(got, []string{"a", "b", "c"}) {
		t.Errorf("Nodes() = %v", got)
	}
	c.Nodes()[0] = "mutated"
	if got := c.Nodes()[0]; got != "a" {
		t.Errorf("Nodes() shares its slice: %q", got)
	}
	if _, ok := c.Node("zzz"); ok {
		t.Errorf("Node of an unknown name reported ok")
	}
	if _, err := Compile(p, nil); err != nil {
		t.Errorf("Compile with an empty inventory: %v", err)
	}
}

func TestCompileErrors(t *testing.T) {
	p := mustParse(t, "p.yaml", "version: 1\nsegments:\n  - name: web\n    nodes: [a]\nrules:\n  - name: r\n    from: [web]\n    to: [all]\n    ports: [any]\n")
	tests := []struct {
		name   string
		policy *Policy
		nodes  []Node
		want   string
	}{
		{"nil policy", nil, nil, "compiling policy: nil policy"},
		{"duplicate node", p, []Node{node("a", nil), node("b", nil), node("a", nil)}, `compiling policy: duplicate node name "a"`},
		{"empty node name", p, []Node{node("", nil)}, "compiling policy: a node has an empty name"},
		{"invalid address", p, []Node{{Name: "a", Addresses: []netip.Addr{{}}}}, `compiling policy: node "a": invalid overlay address "invalid IP"`},
		{"unspecified address", p, []Node{node("a", nil, "0.0.0.0")}, `compiling policy: node "a": invalid overlay address "0.0.0.0"`},
		{"zoned address", p, []Node{node("a", nil, "fe80::1%eth0")}, `compiling policy: node "a": invalid overlay address "fe80::1%eth0"`},
		{"mapped address", p, []Node{node("a", nil, "::ffff:100.64.0.1")}, `compiling policy: node "a": invalid overlay address "::ffff:100.64.0.1"`},
		{"undefined segment", &Policy{Rules: []Rule{{Name: "r", From: []string{"x"}, To: []string{"all"}, Ports: []PortMatch{{Protocol: ProtoAny}}}}}, nil,
			`compiling policy: rule "r" references undefined segment "x"`},
		{"segment defined twice", &Policy{Segments: []Segment{{Name: "x", Nodes: []string{"a"}}, {Name: "x", Nodes: []string{"b"}}}}, nil,
			`compiling policy: segment "x" defined twice (:0:0)`},
	}
	for _, tt := range tests {
		if _, err := Compile(tt.policy, tt.nodes); err == nil || err.Error() != tt.want {
			t.Errorf("%s: Compile error = %v, want %q", tt.name, err, tt.want)
		}
	}
}

// TestCompileSharesSets checks that nodes share each segment's prefix slice
// rather than receiving a copy each.
func TestCompileSharesSets(t *testing.T) {
	inv := loadInventory(t, "testdata/inventory.json")
	data, err := os.ReadFile("../examples/policy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c := mustCompile(t, mustParse(t, "policy.yaml", string(data)), inv)
	set := func(node, name string) []netip.Prefix {
		v, _ := c.Node(node)
		i := slices.IndexFunc(v.Filter.Sets, func(s AddressSet) bool { return s.Name == name })
		if i < 0 {
			t.Fatalf("%s has no set %s", node, name)
		}
		return v.Filter.Sets[i].Prefixes
	}
	a, b := set("web-1", "api"), set("ops-1", "api")
	if &a[0] != &b[0] {
		t.Errorf("web-1 and ops-1 hold separate copies of set api")
	}
}
