package policy

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// SegmentGraph is the picture of a policy between segments: which segment may
// open connections to which, on what, by which rules. It is what the
// controller's status page draws.
type SegmentGraph struct {
	// Segments are the policy's segments in file order, preceded by the built-in
	// "all" when a rule references it.
	Segments []GraphSegment
	// Edges holds one edge per (From, To) pair of segments that some rule
	// allows, sorted by From then To. From == To is a rule within a segment.
	Edges []GraphEdge
}

// GraphSegment is one segment of a SegmentGraph.
type GraphSegment struct {
	Name string
	// External is set for a segment of CIDRs; Members is then 0.
	External bool
	// Members is the number of inventory nodes in a node segment.
	Members int
}

// GraphEdge is what the rules allow from one segment to another.
type GraphEdge struct {
	From, To string
	// Ports is the union of the ports of Rules.
	Ports PortSet
	// Rules names the rules that allow From -> To, in file order, each once.
	Rules []string
}

// Graph returns the segment graph of p on the inventory nodes (for the member
// counts; nil counts none). Every rule adds, for each F of its From and T of
// its To, its ports and name to the edge F -> T, with the semantics of Compile:
// an edge is there whether or not its segments have members (Members tells),
// and "all" holds every node. It fails, like Compile, when p (if not from
// Parse) defines a segment twice or a rule references an undefined segment.
func Graph(p *Policy, nodes []Node) (*SegmentGraph, error) {
	prog, err := Prepare(p)
	if err != nil {
		return nil, fmt.Errorf("drawing the segment graph: %w", err)
	}
	g := &SegmentGraph{Segments: []GraphSegment{}, Edges: []GraphEdge{}}
	for si := range prog.segs {
		s := &prog.segs[si]
		switch {
		case s.seg == nil: // "all"
			if s.referenced {
				g.Segments = append(g.Segments, GraphSegment{Name: s.name, Members: len(nodes)})
			}
		case s.external:
			g.Segments = append(g.Segments, GraphSegment{Name: s.name, External: true})
		default:
			g.Segments = append(g.Segments, GraphSegment{Name: s.name, Members: countMembers(s.seg, nodes)})
		}
	}
	type pair struct{ from, to int32 }
	type acc struct {
		ports []PortMatch
		rules []string
	}
	edges := map[pair]*acc{}
	for ri := range prog.rules {
		rr := &prog.rules[ri]
		name := p.Rules[ri].Name
		for _, f := range rr.from {
			for _, t := range rr.to {
				a := edges[pair{f, t}]
				if a == nil {
					a = &acc{}
					edges[pair{f, t}] = a
				}
				a.ports = append(a.ports, rr.ports...)
				if !slices.Contains(a.rules, name) {
					a.rules = append(a.rules, name)
				}
			}
		}
	}
	for k, a := range edges {
		g.Edges = append(g.Edges, GraphEdge{
			From:  prog.segs[k.from].name,
			To:    prog.segs[k.to].name,
			Ports: PortSetOf(a.ports),
			Rules: a.rules,
		})
	}
	slices.SortFunc(g.Edges, func(a, b GraphEdge) int {
		return cmp.Or(strings.Compare(a.From, b.From), strings.Compare(a.To, b.To))
	})
	return g, nil
}

// countMembers counts the nodes that s selects (by name or by a selector).
func countMembers(s *Segment, nodes []Node) int {
	named := make(map[string]bool, len(s.Nodes))
	for _, name := range s.Nodes {
		named[name] = true
	}
	n := 0
	for i := range nodes {
		if named[nodes[i].Name] || anySelector(s.Selectors, nodes[i].Labels) {
			n++
		}
	}
	return n
}
