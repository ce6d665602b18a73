package policy

import (
	"fmt"
	"strings"
	"testing"
)

// renderGraph writes g one line per segment and edge, for comparison.
func renderGraph(g *SegmentGraph) string {
	var b strings.Builder
	for _, s := range g.Segments {
		if s.External {
			fmt.Fprintf(&b, "segment %s external\n", s.Name)
		} else {
			fmt.Fprintf(&b, "segment %s %d\n", s.Name, s.Members)
		}
	}
	for _, e := range g.Edges {
		fmt.Fprintf(&b, "edge %s -> %s: %s (%s)\n", e.From, e.To, e.Ports, strings.Join(e.Rules, ","))
	}
	return b.String()
}

func TestGraph(t *testing.T) {
	inv := []Node{
		{Name: "web-1", Labels: map[string]string{"role": "web"}},
		{Name: "web-2", Labels: map[string]string{"role": "web"}},
		{Name: "api-1", Labels: map[string]string{"role": "api"}},
		{Name: "db-1", Labels: map[string]string{"role": "db"}},
	}
	const segs = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: api
    selectors: [{role: api}]
    nodes: [db-1, web-1]
  - name: db
    selectors: [{role: db}]
  - name: empty
    selectors: [{role: none}]
  - name: partners
    cidrs: [192.0.2.0/24]
`
	tests := []struct {
		name  string
		rules string
		nodes []Node
		want  string
	}{
		{
			name:  "no rules: segments only, all left out",
			nodes: inv,
			want:  "segment web 2\nsegment api 3\nsegment db 1\nsegment empty 0\nsegment partners external\n",
		},
		{
			name: "one edge per pair, ports united and sorted, rules in file order once",
			rules: `rules:
  - {name: b-rule, from: [web], to: [api], ports: [tcp/8080, udp/53]}
  - {name: a-rule, from: [web, web], to: [api, db], ports: [tcp/22, icmp, tcp/8000-8100]}
  - {name: c-rule, from: [web], to: [api], ports: [tcp/8080]}
`,
			nodes: inv,
			want: "segment web 2\nsegment api 3\nsegment db 1\nsegment empty 0\nsegment partners external\n" +
				"edge web -> api: icmp tcp/22,8000-8100 udp/53 (b-rule,a-rule,c-rule)\n" +
				"edge web -> db: icmp tcp/22,8000-8100 (a-rule)\n",
		},
		{
			name: "self-loop, external ends, any, and all counted when referenced",
			rules: `rules:
  - {name: mesh, from: [api], to: [api], ports: [any, tcp/1]}
  - {name: out, from: [all], to: [partners], ports: [tcp/443]}
  - {name: in, from: [partners], to: [web], ports: [tcp]}
`,
			nodes: inv,
			want: "segment all 4\nsegment web 2\nsegment api 3\nsegment db 1\nsegment empty 0\nsegment partners external\n" +
				"edge all -> partners: tcp/443 (out)\n" +
				"edge api -> api: any (mesh)\n" +
				"edge partners -> web: tcp (in)\n",
		},
		{
			name: "an edge stays when its segments have no member",
			rules: `rules:
  - {name: nothing, from: [empty], to: [empty, db], ports: [udp/514]}
`,
			want: "segment web 0\nsegment api 0\nsegment db 0\nsegment empty 0\nsegment partners external\n" +
				"edge empty -> db: udp/514 (nothing)\n" +
				"edge empty -> empty: udp/514 (nothing)\n",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := mustParse(t, "p.yaml", segs+tc.rules)
			g, err := Graph(p, tc.nodes)
			if err != nil {
				t.Fatal(err)
			}
			if got := renderGraph(g); got != tc.want {
				t.Errorf("Graph:\n%s\nwant:\n%s", got, tc.want)
			}
		})
	}
}

func TestGraphErrors(t *testing.T) {
	if _, err := Graph(nil, nil); err == nil {
		t.Error("Graph(nil) succeeded, want an error")
	}
	p := &Policy{Version: 1, Rules: []Rule{{Name: "r", From: []string{"ghost"}, To: []string{AllSegment}}}}
	if _, err := Graph(p, nil); err == nil || !strings.Contains(err.Error(), `undefined segment "ghost"`) {
		t.Errorf("Graph with an undefined segment: %v, want an error naming it", err)
	}
}
