package policy

import (
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

// relaySegs is a policy prefix for relay tests: four node segments, an
// external one, one segment holding a single node, and one rule.
const relaySegs = "version: 1\nsegments:\n" +
	"  - {name: web, selectors: [{role: web}]}\n" + // line 3
	"  - {name: api, selectors: [{role: api}]}\n" + // line 4
	"  - {name: db, selectors: [{role: db}]}\n" + // line 5
	"  - {name: ops, nodes: [ops-1, ops-2]}\n" + // line 6
	"  - {name: partner, cidrs: [192.0.2.0/24]}\n" + // line 7
	"  - {name: solo, nodes: [solo-1]}\n" + // line 8
	"rules:\n  - {name: r, from: [web], to: [api], ports: [tcp/8080]}\n" + // lines 9-10
	"relays:\n" // line 11

// TestParseRelayErrors checks every class of problem of a relays section, with
// its exact position and message.
func TestParseRelayErrors(t *testing.T) {
	tests := []struct {
		name string
		src  string
		want []string
	}{
		{"relays not a list", "version: 1\nrelays: {node: a}\n", []string{`p.yaml:2:10: relays must be a list, got a mapping`}},
		{"relay not a mapping", relaySegs + "  - ops-1\n", []string{`p.yaml:12:5: relay must be a mapping, got a string`}},
		{"unknown key", relaySegs + "  - {node: ops-1, for: [web], fro: [api]}\n", []string{`p.yaml:12:31: unknown field "fro" in relay (did you mean "for"?)`}},
		{"missing node and for", relaySegs + "  - {segments: [web]}\n", []string{
			`p.yaml:12:6: relay is missing for (a list of the segments whose nodes may use it)`,
			`p.yaml:12:6: relay is missing its node (the name of the relay node)`,
			`p.yaml:12:6: unknown field "segments" in relay`,
		}},
		{"invalid node names", relaySegs + "  - {node: Ops_1, for: [web]}\n  - {node: 7, for: [web]}\n", []string{
			`p.yaml:12:12: invalid node name "Ops_1": must match [a-z0-9][a-z0-9.-]{0,62}`,
			`p.yaml:13:12: node name must be a string, got an integer (quote it: "7")`,
		}},
		{"empty and null for", relaySegs + "  - {node: ops-1, for: []}\n  - node: ops-2\n    for:\n", []string{
			`p.yaml:12:24: for is empty; list at least one segment whose nodes may use the relay`,
			`p.yaml:14:10: for is empty; list at least one segment whose nodes may use the relay`,
		}},
		{"for not a list", relaySegs + "  - {node: ops-1, for: web}\n", []string{`p.yaml:12:24: for must be a list, got a string`}},
		{"undefined segments", relaySegs + "  - {node: ops-1, for: [wbe, nothing-like-it, 7]}\n", []string{
			`p.yaml:12:25: undefined segment "wbe" (did you mean "web"?)`,
			`p.yaml:12:30: undefined segment "nothing-like-it"`,
			`p.yaml:12:47: segment reference must be a string, got an integer (quote it: "7")`,
		}},
		{"external segment", relaySegs + "  - {node: ops-1, for: [web, partner]}\n", []string{
			`p.yaml:12:30: segment "partner" holds external addresses (cidrs); a relay forwards only between nodes, so for lists node segments or "all"`,
		}},
		{"all combined", relaySegs + "  - {node: ops-1, for: [web, all]}\n", []string{
			`p.yaml:12:30: "all" already holds every node; do not combine it with other segments in for`,
		}},
		{"duplicate relay", relaySegs + "  - {node: ops-1, for: [web]}\n  - {node: ops-2, for: [all]}\n  - {node: ops-1, for: [api]}\n", []string{
			`p.yaml:14:12: duplicate relay "ops-1" (first defined at p.yaml:12:6); list its segments in one for`,
		}},
		{"for holds a single node", relaySegs + "  - {node: ops-1, for: [solo]}\n  - {node: solo-1, for: [solo, solo]}\n", []string{
			`p.yaml:12:19: relay "ops-1" forwards for no pair: its for holds only node "solo-1", and a relay forwards between two nodes other than itself`,
			`p.yaml:13:20: relay "solo-1" forwards for no pair: its for holds only node "solo-1", and a relay forwards between two nodes other than itself`,
		}},
		{"errors with other sections are sorted", "relays: 1\nversion: 1\nsegments: [{name: web, nodes: [a]}]\nrules: [{name: r, from: [wbe], to: [web], ports: [any]}]\n", []string{
			`p.yaml:1:9: relays must be a list, got an integer`,
			`p.yaml:4:26: undefined segment "wbe" (did you mean "web"?)`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { checkParseErrors(t, tt.src, tt.want) })
	}
}

func TestParseRelays(t *testing.T) {
	src := relaySegs + "  - node: ops-1\n    for: [web, api]\n  - {node: edge.lan, for: [all]}\n  - {node: ops-2, for: [db, db]}\n"
	got := mustParse(t, "p.yaml", src).Relays
	want := []Relay{
		{Node: "ops-1", For: []string{"web", "api"}, Pos: Pos{"p.yaml", 12, 5}},
		{Node: "edge.lan", For: []string{"all"}, Pos: Pos{"p.yaml", 14, 6}},
		{Node: "ops-2", For: []string{"db", "db"}, Pos: Pos{"p.yaml", 15, 6}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Relays =\n%#v\nwant\n%#v", got, want)
	}
	for _, src := range []string{"version: 1\nrelays: []\n", "version: 1\nrelays:\n"} {
		if p := mustParse(t, "p.yaml", src); p.Relays != nil {
			t.Errorf("Parse(%q).Relays = %v, want none", src, p.Relays)
		}
	}
}

// TestRelaysFor checks which relays a pair of nodes may use, from their
// memberships, and that segments only a relay references get memberships.
func TestRelaysFor(t *testing.T) {
	src := relaySegs +
		"  - {node: ops-1, for: [web, api]}\n" + // web and api: referenced by the rule too
		"  - {node: ops-2, for: [db]}\n" + // db: referenced by no rule
		"  - {node: edge-1, for: [all]}\n" +
		"  - {node: db-1, for: [db, ops]}\n" // a relay in its own for
	prog, err := Prepare(mustParse(t, "p.yaml", src))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := prog.Relays(), []string{"ops-1", "ops-2", "edge-1", "db-1"}; !reflect.DeepEqual(got, want) {
		t.Errorf("Relays() = %v, want %v", got, want)
	}
	prog.Relays()[0] = "changed"
	if prog.Relays()[0] != "ops-1" {
		t.Errorf("Relays() returned the Program's own slice")
	}
	nodes := map[string]*Node{}
	for _, n := range []Node{
		{Name: "web-1", Labels: map[string]string{"role": "web"}},
		{Name: "web-2", Labels: map[string]string{"role": "web"}},
		{Name: "api-1", Labels: map[string]string{"role": "api"}},
		{Name: "db-1", Labels: map[string]string{"role": "db"}},
		{Name: "db-2", Labels: map[string]string{"role": "db"}},
		{Name: "ops-1"},
		{Name: "ops-2"},
		{Name: "other"}, // only in "all"
	} {
		nodes[n.Name] = &n
	}
	ms := func(name string) []int32 { return prog.Memberships(nodes[name], nil) }
	names := func(sis []int32) []string {
		var out []string
		for _, si := range sis {
			out = append(out, prog.SegmentName(si))
		}
		return out
	}
	// db is referenced by relays only, ops and all too: they still get memberships.
	for n, want := range map[string][]string{
		"db-1":  {"all", "db"},
		"ops-1": {"all", "ops"},
		"web-1": {"all", "web"},
		"other": {"all"},
	} {
		if got := names(ms(n)); !reflect.DeepEqual(got, want) {
			t.Errorf("Memberships(%s) = %v, want %v", n, got, want)
		}
	}
	tests := []struct {
		name string
		a, b string
		want []string
	}{
		{"both in one segment", "web-1", "web-2", []string{"ops-1", "edge-1"}},
		{"each in a different segment of for", "web-1", "api-1", []string{"ops-1", "edge-1"}},
		{"symmetric", "api-1", "web-1", []string{"ops-1", "edge-1"}},
		{"segment only relays reference", "db-2", "ops-1", []string{"edge-1", "db-1"}},
		{"one member only", "web-1", "db-2", []string{"edge-1"}},
		{"all only", "other", "web-1", []string{"edge-1"}},
		// RelaysFor sees memberships only: the caller drops db-1 (a relay never
		// relays for itself) and keeps ops-2 and edge-1 for the pair db-1, db-2.
		{"relay is one end", "db-1", "db-2", []string{"ops-2", "edge-1", "db-1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := prog.RelaysFor(ms(tt.a), ms(tt.b)); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("RelaysFor(%s, %s) = %v, want %v", tt.a, tt.b, got, tt.want)
			}
		})
	}
	if got := prog.RelaysFor(nil, ms("web-1")); got != nil {
		t.Errorf("RelaysFor without memberships = %v, want nil", got)
	}
	none, err := Prepare(mustParse(t, "p.yaml", relaySegs))
	if err != nil {
		t.Fatal(err)
	}
	if got := none.RelaysFor([]int32{0, 1}, []int32{0, 1}); got != nil || none.Relays() != nil {
		t.Errorf("a policy without relays gives RelaysFor %v, Relays %v", got, none.Relays())
	}
	// A segment only a relay references gets a membership but no set, rule or peer.
	c, err := Compile(mustParse(t, "p.yaml", src), []Node{*nodes["db-1"], *nodes["db-2"]})
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := c.Node("db-1"); !reflect.DeepEqual(v, NodeView{}) {
		t.Errorf("db-1 gets %+v from relays alone, want nothing", v)
	}
}

// TestPrepareRelayErrors checks the relays of a Policy not from Parse.
func TestPrepareRelayErrors(t *testing.T) {
	base := mustParse(t, "p.yaml", relaySegs)
	tests := []struct {
		name   string
		relays []Relay
		want   string
	}{
		{"undefined segment", []Relay{{Node: "a", For: []string{"nope"}}}, `compiling policy: relay "a" references undefined segment "nope"`},
		{"external segment", []Relay{{Node: "a", For: []string{"web", "partner"}}}, `compiling policy: relay "a" references external segment "partner"; a relay forwards only between nodes`},
		{"duplicate", []Relay{{Node: "a", For: []string{"web"}}, {Node: "a", For: []string{"api"}, Pos: Pos{"p.yaml", 3, 4}}}, `compiling policy: relay "a" listed twice (p.yaml:3:4)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := *base
			p.Relays = tt.relays
			if _, err := Prepare(&p); err == nil || err.Error() != tt.want {
				t.Errorf("Prepare: %v, want %s", err, tt.want)
			}
		})
	}
}

func TestDiffRelays(t *testing.T) {
	inv := []Node{
		node("web-1", map[string]string{"role": "web"}, "100.64.0.1"),
		node("web-2", map[string]string{"role": "web"}, "100.64.0.2"),
		node("api-1", map[string]string{"role": "api"}, "100.64.0.3"),
		node("ops-1", nil, "100.64.0.4"),
		node("ops-2", nil, "100.64.0.5"),
	}
	const segs = "version: 1\nsegments:\n  - {name: web, selectors: [{role: web}]}\n  - {name: api, selectors: [{role: api}]}\n  - {name: ops, nodes: [ops-1, ops-2]}\n" +
		"  - {name: front, selectors: [{role: web}]}\nrules:\n  - {name: r, from: [web], to: [api], ports: [tcp/8080]}\n"
	tests := []struct {
		name     string
		old, new string
		want     string
	}{
		{"same relays, other order and names", "relays:\n  - {node: ops-1, for: [web, api]}\n  - {node: ops-2, for: [all]}\n",
			"relays:\n  - {node: ops-2, for: [all]}\n  - {node: ops-1, for: [api, front]}\n", ""},
		{"relay added; its own node is no user", "", "relays:\n  - {node: ops-1, for: [all]}\n", "relay users:\n  ops-1: +api-1 +ops-2 +web-1 +web-2\n"},
		{"relay removed", "relays:\n  - {node: ops-1, for: [web]}\n", "", "relay users:\n  ops-1: -web-1 -web-2\n"},
		{"relay moved and narrowed", "relays:\n  - {node: ops-1, for: [web, api]}\n", "relays:\n  - {node: ops-2, for: [web]}\n",
			"relay users:\n  ops-1: -api-1 -web-1 -web-2\n  ops-2: +web-1 +web-2\n"},
		{"relay for widened", "relays:\n  - {node: ops-1, for: [web]}\n", "relays:\n  - {node: ops-1, for: [web, ops]}\n", "relay users:\n  ops-1: +ops-2\n"},
		{"relay outside the inventory", "", "relays:\n  - {node: edge-9, for: [api]}\n", "relay users:\n  edge-9: +api-1\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := Diff(mustParse(t, "old.yaml", segs+tt.old), mustParse(t, "new.yaml", segs+tt.new), inv)
			if err != nil {
				t.Fatal(err)
			}
			if d.Identical() != (tt.want == "") {
				t.Errorf("Identical = %v\n%s", d.Identical(), d.Text())
			}
			if got := d.Text(); tt.want != "" && got != tt.want {
				t.Errorf("Diff:\n%s\nwant:\n%s", got, tt.want)
			}
			if len(d.Added)+len(d.Removed)+len(d.Peers) != 0 {
				t.Errorf("relays changed flows or peers: %+v", d)
			}
		})
	}
	// Counts are exact beyond the listed names.
	var many []Node
	for i := range maxPeerNames + 3 {
		many = append(many, node("n-"+itoa(1000+i), nil, "100.64.1."+itoa(i)))
	}
	d, err := Diff(mustParse(t, "old.yaml", "version: 1\n"), mustParse(t, "new.yaml", "version: 1\nrelays: [{node: r, for: [all]}]\n"), many)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Relays) != 1 || d.Relays[0].AddedCount != maxPeerNames+3 || len(d.Relays[0].Added) != maxPeerNames ||
		!slices.IsSorted(d.Relays[0].Added) || !strings.HasSuffix(d.Text(), " +3 more\n") {
		t.Errorf("Diff of %d users: %+v", len(many), d.Relays)
	}
}

// TestRelaysForProperty checks RelaysFor on generated policies and inventories
// against a direct reading of the semantics: relay R serves the pair (a, b) when
// a is a member of a segment of R's for and so is b.
func TestRelaysForProperty(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p := genPolicy(t)
		nodes := genInventory(t)
		var segs []string
		for _, s := range p.Segments {
			if !s.External() {
				segs = append(segs, s.Name)
			}
		}
		for i := range rapid.IntRange(0, 3).Draw(t, "relays") {
			r := Relay{Node: fmt.Sprintf("relay-%d", i), Pos: Pos{"p.yaml", 30 + i, 5}}
			if len(segs) == 0 || rapid.Bool().Draw(t, "all") {
				r.For = []string{AllSegment}
			} else {
				r.For = rapid.SliceOfNDistinct(rapid.SampledFrom(segs), 1, len(segs), rapid.ID).Draw(t, "for")
			}
			p.Relays = append(p.Relays, r)
		}
		prog, err := Prepare(p)
		if err != nil {
			t.Fatal(err)
		}
		ref := reference{p: p}
		for _, a := range nodes {
			for _, b := range nodes {
				var want []string
				for _, r := range p.Relays {
					if slices.ContainsFunc(r.For, func(s string) bool { return ref.member(s, a) }) &&
						slices.ContainsFunc(r.For, func(s string) bool { return ref.member(s, b) }) {
						want = append(want, r.Node)
					}
				}
				if got := prog.RelaysFor(prog.Memberships(&a, nil), prog.Memberships(&b, nil)); !slices.Equal(got, want) {
					t.Fatalf("RelaysFor(%s, %s) = %v, want %v", a.Name, b.Name, got, want)
				}
			}
		}
	})
}
