package policy

import (
	"errors"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestParseInventoryValid(t *testing.T) {
	src := `# from segmesh nodes list -o yaml
nodes:
  - name: web-1
    labels: {role: web, env: prod}
    addresses: [100.64.0.1, fd5e:6d65:7368::1]
  - name: gw-1.example.com
    addresses: ["100.64.0.9"]
    routes: [10.1.0.0/16, "2001:db8:1::/48"]
  - name: bare
    labels:
`
	nodes, err := ParseInventory("n.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	want := []Node{
		{Name: "web-1", Labels: map[string]string{"role": "web", "env": "prod"}, Addresses: []netip.Addr{netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("fd5e:6d65:7368::1")}},
		{Name: "gw-1.example.com", Addresses: []netip.Addr{netip.MustParseAddr("100.64.0.9")}, Routes: pfxs("10.1.0.0/16", "2001:db8:1::/48")},
		{Name: "bare"},
	}
	if !reflect.DeepEqual(nodes, want) {
		t.Errorf("ParseInventory =\n%+v\nwant\n%+v", nodes, want)
	}
	for _, src := range []string{"nodes: []\n", "nodes:\n"} {
		if nodes, err := ParseInventory("n.yaml", []byte(src)); err != nil || nodes == nil || len(nodes) != 0 {
			t.Errorf("ParseInventory(%q) = %v, %v; want an empty, non-nil inventory", src, nodes, err)
		}
	}
}

func TestParseInventoryErrors(t *testing.T) {
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{"empty", "", []string{`n.yaml:1:1: missing "nodes:" (an empty inventory is "nodes: []")`}},
		{"no nodes key", "node: []\n", []string{`n.yaml:1:1: missing "nodes:" (an empty inventory is "nodes: []")`, `n.yaml:1:1: unknown field "node" in inventory (did you mean "nodes"?)`}},
		{"yaml error", "nodes: [\n", []string{`n.yaml:1:8: invalid YAML: sequence end token ']' not found`}},
		{"wrong types", "nodes:\n  - name: 7\n    labels: [a]\n    addresses: 100.64.0.1\n    routes: {a: b}\n", []string{
			`n.yaml:2:11: node name must be a string, got an integer (quote it: "7")`,
			`n.yaml:3:13: labels must be a mapping, got a list`,
			`n.yaml:4:16: addresses must be a list, got a string`,
			`n.yaml:5:14: routes must be a list, got a mapping`,
		}},
		{"bad values", "nodes:\n  - name: Web_1\n    labels: {role: 1, \"\": x}\n    addresses: [100.64.0.300, 100.64.0.0/10, \"fe80::1%eth0\", \"::ffff:1.2.3.4\", 0.0.0.0]\n    routes: [10.1.0.0/8, 10.0.0.1]\n    extra: 1\n", []string{
			`n.yaml:2:11: invalid node name "Web_1": must match [a-z0-9][a-z0-9.-]{0,62}`,
			`n.yaml:3:20: value of label "role" must be a string, got an integer (quote it: "1")`,
			`n.yaml:3:23: label key is empty; ` + keyRules,
			`n.yaml:4:17: invalid address "100.64.0.300": IPv4 field has value >255`,
			`n.yaml:4:31: address "100.64.0.0/10" is a prefix; write the node's overlay address without /BITS (routed prefixes go in routes)`,
			`n.yaml:4:46: address "fe80::1%eth0" has a zone; overlay and external addresses have none, write fe80::1`,
			`n.yaml:4:62: address "::ffff:1.2.3.4" is an IPv4-mapped IPv6 address; write it as IPv4: 1.2.3.4`,
			`n.yaml:4:80: address "0.0.0.0" is unspecified; name one host`,
			`n.yaml:5:14: route 10.1.0.0/8 has host bits set (did you mean 10.0.0.0/8?)`,
			`n.yaml:5:26: route "10.0.0.1" is an address, not a CIDR (did you mean 10.0.0.1/32?)`,
			`n.yaml:6:5: unknown field "extra" in node`,
		}},
		{"label syntax", "nodes:\n  - name: a\n    labels: {\" role\": web, tier: \"front end\", ok.example/x: \"\", zone: \"a\\xffb\"}\n    addresses: [100.64.0.1]\n", []string{
			`n.yaml:3:14: label key " role" is not valid: it holds a space at character 1; ` + keyRules + ` (did you mean "role"?)`,
			`n.yaml:3:34: value "front end" of label "tier" is not valid: it holds a space at character 6; ` + valueRules,
			`n.yaml:3:71: value "aÿb" of label "zone" is not valid: it holds the non-ASCII character 'ÿ'; ` + valueRules,
		}},
		{"missing name", "nodes:\n  - labels: {a: b}\n", []string{`n.yaml:2:5: node is missing its name`}},
		{"conflicts name both nodes", `nodes:
  - {name: a, addresses: [100.64.0.1, "fd5e::1"], routes: [10.0.0.0/8]}
  - {name: b, addresses: [100.64.0.2, "fd5e::1"], routes: [10.1.0.0/16, 100.64.0.0/30]}
  - {name: a, addresses: [100.64.0.3, 100.64.0.4]}
`, []string{
			`n.yaml:3:39: nodes "a" and "b" both hold overlay address fd5e::1`,
			`n.yaml:3:60: route 10.1.0.0/16 of node "b" overlaps route 10.0.0.0/8 of node "a"`,
			`n.yaml:3:73: route 100.64.0.0/30 of node "b" holds overlay address 100.64.0.1 of node "a"`,
			`n.yaml:4:12: duplicate node name "a"`,
			`n.yaml:4:39: node "a" has two IPv4 overlay addresses, 100.64.0.3 and 100.64.0.4`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nodes, err := ParseInventory("n.yaml", []byte(tt.src))
			var list ErrorList
			if nodes != nil || !errors.As(err, &list) {
				t.Fatalf("ParseInventory = %v, %v; want nil and an ErrorList", nodes, err)
			}
			if got := strings.Split(err.Error(), "\n"); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("errors:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
		})
	}
}

func TestMarshalInventory(t *testing.T) {
	nodes := []Node{
		{Name: "web-1", Labels: map[string]string{"role": "web", "env": "prod", "example.com/tier": "1", "null": "true", "dmz": ""}, Addresses: []netip.Addr{netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("fd5e:6d65:7368::1")}},
		{Name: "api-1", Addresses: []netip.Addr{netip.MustParseAddr("100.64.0.3")}, Routes: pfxs("10.1.0.0/16")},
	}
	got := string(MarshalInventory(nodes))
	want := `nodes:
  - name: "api-1"
    addresses: ["100.64.0.3"]
    routes: ["10.1.0.0/16"]
  - name: "web-1"
    labels: {"dmz": "", "env": "prod", "example.com/tier": "1", "null": "true", "role": "web"}
    addresses: ["100.64.0.1", "fd5e:6d65:7368::1"]
`
	if got != want {
		t.Errorf("MarshalInventory =\n%s\nwant\n%s", got, want)
	}
	back, err := ParseInventory("n.yaml", []byte(got))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, []Node{nodes[1], nodes[0]}) {
		t.Errorf("round trip = %+v", back)
	}
	if got := string(MarshalInventory(nil)); got != "nodes: []\n" {
		t.Errorf("MarshalInventory(nil) = %q", got)
	}
	// The lab inventory in testdata parses and matches the JSON one used elsewhere.
	data, err := os.ReadFile("testdata/nodes.yaml")
	if err != nil {
		t.Fatal(err)
	}
	lab, err := ParseInventory("nodes.yaml", data)
	if err != nil || len(lab) != 5 {
		t.Fatalf("testdata/nodes.yaml: %v, %v", lab, err)
	}
}

// FuzzInventory checks that ParseInventory never panics, reports positioned
// errors, and that MarshalInventory of what it accepts parses back equal.
func FuzzInventory(f *testing.F) {
	f.Add([]byte("nodes: []\n"))
	f.Add([]byte("nodes:\n  - name: a\n    labels: {x: y}\n    addresses: [100.64.0.1, \"fd5e::1\"]\n    routes: [10.0.0.0/8]\n"))
	f.Add([]byte("nodes:\n  - {name: a, addresses: [100.64.0.1]}\n  - {name: b, addresses: [100.64.0.1], routes: [100.64.0.0/30]}\n"))
	if data, err := os.ReadFile("testdata/nodes.yaml"); err == nil {
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		nodes, err := ParseInventory("n.yaml", data)
		if err != nil {
			var list ErrorList
			if nodes != nil || !errors.As(err, &list) || len(list) == 0 {
				t.Fatalf("ParseInventory = %v, %v", nodes, err)
			}
			for _, e := range list {
				if e.Pos.File != "n.yaml" || e.Pos.Line < 1 || e.Pos.Col < 1 || e.Msg == "" {
					t.Fatalf("bad error %q", e.Error())
				}
			}
			return
		}
		out := MarshalInventory(nodes)
		back, err := ParseInventory("n.yaml", out)
		if err != nil {
			t.Fatalf("MarshalInventory output does not parse: %v\n%s", err, out)
		}
		sorted := slices.Clone(nodes)
		slices.SortStableFunc(sorted, func(a, b Node) int { return strings.Compare(a.Name, b.Name) })
		if !reflect.DeepEqual(back, sorted) {
			t.Fatalf("round trip changed the inventory:\n%+v\n%+v\n%s", sorted, back, out)
		}
		if _, err := Compile(mustParse(t, "p.yaml", "version: 1\n"), nodes); err != nil {
			t.Fatalf("Compile refuses an accepted inventory: %v", err)
		}
	})
}
