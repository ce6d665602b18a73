package policy

import (
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

func TestWarnings(t *testing.T) {
	const inv = `nodes:
  - {name: web-1, labels: {role: web, env: prod}, addresses: [100.64.0.1]}
  - {name: web-2, labels: {role: web, env: test}, addresses: [100.64.0.2]}
  - {name: db-1, labels: {role: db}, addresses: [100.64.0.3]}
`
	nodes, err := ParseInventory("n.yaml", []byte(inv))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		src   string
		nodes []Node
		want  []string
	}{
		{"all selected", `version: 1
segments:
  - {name: web, selectors: [{role: web}]}
  - {name: db, nodes: [db-1]}
  - {name: partner, cidrs: [192.0.2.0/24]}
rules:
  - {name: r, from: [web, partner], to: [db], ports: [tcp/5432]}
  - {name: s, from: [all], to: [all], ports: [icmp]}
`, nodes, nil},
		{"empty segments and rules", `version: 1
segments:
  - name: wbe
    selectors: [{role: wbe}, {role: web, env: staging}]
  - name: prod-db
    selectors: [{role: db, env: prod}]
  - name: ops
    nodes: [ops-1, db-1, web1]
  - name: partner
    cidrs: [192.0.2.0/24]
  - name: nobody
    nodes: [ghost]
rules:
  - name: to-db
    from: [wbe]
    to: [prod-db, ops]
    ports: [tcp/5432]
  - name: partner-in
    from: [partner]
    to: [wbe, prod-db]
    ports: [tcp/443]
  - name: out
    from: [wbe, nobody]
    to: [partner]
    ports: [tcp/443]
`, nodes, []string{
			`p.yaml:3:5: warning: segment "wbe" selects no node of the inventory (no node has any of the labels env=staging, role=wbe)`,
			`p.yaml:5:5: warning: segment "prod-db" selects no node of the inventory`,
			`p.yaml:8:13: warning: segment "ops" names node "ops-1", which is not in the inventory`,
			`p.yaml:8:26: warning: segment "ops" names node "web1", which is not in the inventory (did you mean "web-1"?)`,
			`p.yaml:11:5: warning: segment "nobody" selects no node of the inventory`,
			`p.yaml:12:13: warning: segment "nobody" names node "ghost", which is not in the inventory`,
			`p.yaml:15:5: warning: rule "to-db" allows nothing: its from selects no node of the inventory (segment "wbe" is empty)`,
			`p.yaml:20:5: warning: rule "partner-in" allows nothing: its to selects no node of the inventory (segments "wbe", "prod-db" are empty)`,
			`p.yaml:23:5: warning: rule "out" allows nothing: its from selects no node of the inventory (segments "wbe", "nobody" are empty)`,
		}},
		{"empty inventory", `version: 1
segments:
  - {name: web, selectors: [{role: web}]}
  - {name: partner, cidrs: ["2001:db8::/32"]}
rules:
  - {name: r, from: [all], to: [partner], ports: [tcp/443]}
  - {name: s, from: [web], to: [all], ports: [icmp]}
`, []Node{}, []string{
			`p.yaml:3:6: warning: segment "web" selects no node of the inventory`,
			`p.yaml:6:15: warning: rule "r" allows nothing: its from selects no node of the inventory (the inventory has no node)`,
			`p.yaml:7:15: warning: rule "s" allows nothing: its from selects no node of the inventory (segment "web" is empty)`,
			`p.yaml:7:28: warning: rule "s" allows nothing: its to selects no node of the inventory (the inventory has no node)`,
		}},
		{"relays", `version: 1
segments:
  - {name: web, selectors: [{role: web}]}
relays:
  - {node: db-1, for: [web]}
  - {node: web1, for: [web]}
  - {node: edge-9, for: [all]}
`, nodes, []string{
			`p.yaml:6:6: warning: relay "web1" is not in the inventory; it relays for no pair (did you mean "web-1"?)`,
			`p.yaml:7:6: warning: relay "edge-9" is not in the inventory; it relays for no pair`,
		}},
		{"many missing labels", `version: 1
segments:
  - {name: x, selectors: [{a: "1", b: "2"}, {c: "3", d: "4"}, {role: wbe}]}
  - {name: y, selectors: [{role: web, env: dev}]}
`, nodes, []string{
			`p.yaml:3:6: warning: segment "x" selects no node of the inventory (no node has any of the labels a=1, b=2, c=3 and 2 more)`,
			`p.yaml:4:6: warning: segment "y" selects no node of the inventory (no node has the label env=dev)`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := mustParse(t, "p.yaml", tt.src)
			var got []string
			for _, w := range Warnings(p, tt.nodes) {
				got = append(got, w.String())
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Warnings =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
		})
	}
	if w := Warnings(nil, nodes); w != nil {
		t.Errorf("Warnings(nil) = %v", w)
	}
}

// TestWarningsBuiltPolicy checks that a policy built without positions gets
// its warnings at the segment or rule.
func TestWarningsBuiltPolicy(t *testing.T) {
	p := &Policy{
		Segments: []Segment{{Name: "s", Pos: Pos{"p.yaml", 3, 5}, Nodes: []string{"ghost"}}},
		Rules:    []Rule{{Name: "r", Pos: Pos{"p.yaml", 9, 5}, From: []string{"s"}, To: []string{AllSegment}}},
	}
	var got []string
	for _, w := range Warnings(p, []Node{{Name: "a"}}) {
		got = append(got, w.String())
	}
	want := []string{
		`p.yaml:3:5: warning: segment "s" names node "ghost", which is not in the inventory`,
		`p.yaml:3:5: warning: segment "s" selects no node of the inventory`,
		`p.yaml:9:5: warning: rule "r" allows nothing: its from selects no node of the inventory (segment "s" is empty)`,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Warnings =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestWarningsProperty checks Warnings against the reference semantics on
// random policies and inventories: a node segment is reported exactly when no
// node is a member, a node name exactly when no node has it, and a rule side
// exactly when it holds only node segments without members; and a rule reported
// as allowing nothing can be removed without changing a flow or a peer.
func TestWarningsProperty(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p := genPolicy(t)
		nodes := genInventory(t)
		ref := reference{p: p, nodes: map[string]Node{}}
		for _, n := range nodes {
			ref.nodes[n.Name] = n
		}
		got := map[string]bool{}
		for _, w := range Warnings(p, nodes) {
			got[w.Msg] = true
		}
		hasMember := func(seg string) bool {
			return slices.ContainsFunc(nodes, func(n Node) bool { return ref.member(seg, n) })
		}
		want := map[string]bool{}
		for _, s := range p.Segments {
			if s.External() {
				continue
			}
			for _, n := range s.Nodes {
				if _, ok := ref.nodes[n]; !ok {
					want[fmt.Sprintf("segment %q names node %q, which is not in the inventory", s.Name, n)] = true
				}
			}
			if !hasMember(s.Name) {
				want[fmt.Sprintf("segment %q selects no node of the inventory", s.Name)] = true
			}
		}
		var dead []int
		for i, r := range p.Rules {
			for _, side := range []struct {
				field string
				refs  []string
			}{{"from", r.From}, {"to", r.To}} {
				if slices.ContainsFunc(side.refs, func(s string) bool { return externalOnly(p.Segments, []string{s}) || hasMember(s) }) {
					continue
				}
				want[fmt.Sprintf("rule %q allows nothing: its %s", r.Name, side.field)] = true
				if !slices.Contains(dead, i) {
					dead = append(dead, i)
				}
			}
		}
		// Compare by message prefix: hints and reasons are checked by TestWarnings.
		for msg := range got {
			if !slices.ContainsFunc(slices.Collect(maps.Keys(want)), func(w string) bool { return strings.HasPrefix(msg, w) }) {
				t.Fatalf("unexpected warning %q; want %v", msg, want)
			}
		}
		for w := range want {
			if !slices.ContainsFunc(slices.Collect(maps.Keys(got)), func(msg string) bool { return strings.HasPrefix(msg, w) }) {
				t.Fatalf("missing warning %q; got %v", w, got)
			}
		}
		for _, i := range dead {
			q := *p
			q.Rules = slices.Delete(slices.Clone(p.Rules), i, i+1)
			d, err := Diff(p, &q, nodes)
			if err != nil {
				t.Fatal(err)
			}
			if !d.Identical() {
				t.Fatalf("rule %s is reported as allowing nothing, but removing it changes:\n%s", p.Rules[i].Name, d.Text())
			}
		}
	})
}

// TestWarningsHintBudget checks that only the first maxHints missing node
// names get a hint, which bounds the cost on large inventories.
func TestWarningsHintBudget(t *testing.T) {
	p := &Policy{}
	for i := range maxHints + 1 {
		p.Segments = append(p.Segments, Segment{Name: fmt.Sprintf("s%d", i), Pos: Pos{"p.yaml", i + 1, 5}, Nodes: []string{fmt.Sprintf("web-%d", i+2)}})
	}
	hinted := 0
	for _, w := range Warnings(p, []Node{{Name: "web-1"}}) {
		if strings.Contains(w.Msg, `(did you mean "web-1"?)`) {
			hinted++
		}
	}
	if hinted != maxHints {
		t.Errorf("%d names hinted, want %d", hinted, maxHints)
	}
}
