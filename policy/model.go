package policy

import "net/netip"

// AllSegment is the name of the built-in segment that holds every node of the
// inventory. Policy files may reference it in rules but not define it.
const AllSegment = "all"

// Policy is a parsed and validated policy file (format version 1). Parse returns
// it only when the file has no error; Compile resolves it against an inventory.
type Policy struct {
	// File is the file name given to Parse; positions below refer to it.
	File    string
	Version int
	// Segments and Rules are in file order; their order carries no meaning.
	Segments []Segment
	Rules    []Rule
}

// Segment is a named set of nodes or of external prefixes. A node segment has
// Selectors and/or Nodes and no CIDRs; an external segment has only CIDRs.
type Segment struct {
	Name string
	// Pos is where the segment's entry starts (its first key).
	Pos Pos
	// Selectors are alternatives: a node is a member when it matches any of them.
	Selectors []Selector
	// Nodes are explicit member node names (a union with Selectors). A name
	// without a node in the inventory selects nothing.
	Nodes []string
	// CIDRs make the segment external: it holds addresses, never nodes.
	CIDRs []CIDR
}

// External reports whether the segment is a set of external CIDRs rather than nodes.
func (s *Segment) External() bool { return len(s.CIDRs) > 0 }

// Selector is a label map; a node matches it when the node has every one of its
// labels with an equal value. A selector is never empty.
type Selector map[string]string

// Matches reports whether labels satisfy every label of the selector.
func (s Selector) Matches(labels map[string]string) bool {
	for k, v := range s {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// CIDR is one entry of an external segment: Prefix without the Except prefixes,
// each of which lies strictly inside Prefix. All prefixes are masked (no host bits).
type CIDR struct {
	Prefix netip.Prefix
	Except []netip.Prefix
}

// Rule allows new connections from every segment of From to every segment of To
// on Ports. Rules are allow-only and form a union.
type Rule struct {
	Name string
	// Pos is where the rule's entry starts (its first key); FilterRule.Origin cites it.
	Pos  Pos
	From []string
	To   []string
	// Ports are in file order; Compile merges and sorts them.
	Ports []PortMatch
}
