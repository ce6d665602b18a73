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
	// Tests are the file's assertions, in file order; RunTests evaluates them.
	Tests []Test
	// Relays are the file's relay nodes, in file order (the order callers
	// prefer them in); each node appears at most once.
	Relays []Relay
}

// Relay is one entry of a policy file's relays section: node Node may forward
// WireGuard ciphertext between two nodes that cannot reach each other directly
// when both are members of at least one of the segments of For (not
// necessarily the same one). A relay never forwards for a pair it is part of,
// and it relays only for pairs the rules also make peers: For narrows who may
// use the relay, it never widens access.
type Relay struct {
	// Node is the relay's node name (ValidNodeName); it need not be in any segment.
	Node string
	// For are names of node segments or "all", in file order; never external segments.
	For []string
	// Pos is where the relay's entry starts (its first key).
	Pos Pos
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
	// NodesPos[i] is where Nodes[i] is written (Parse sets it; it may be nil
	// in a Policy built otherwise, and then Pos stands for it).
	NodesPos []Pos
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
	// Pos is where the prefix is written.
	Pos Pos
}

// Rule allows new connections from every segment of From to every segment of To
// on Ports. Rules are allow-only and form a union.
type Rule struct {
	Name string
	// Pos is where the rule's entry starts (its first key); FilterRule.Origin cites it.
	Pos  Pos
	From []string
	To   []string
	// FromPos and ToPos are where the from and to keys are written (Parse
	// sets them; in a Policy built otherwise they may be zero, and then Pos
	// stands for them).
	FromPos, ToPos Pos
	// Ports are in file order; Compile merges and sorts them.
	Ports []PortMatch
}

// Test is one assertion of a policy file's tests section. A flow test (To set)
// says that every flow from From to To carries every packet of Allow and no
// packet of Deny; an only test (Only set, To unset) says that From reaches
// nothing, on any protocol or port, outside the targets of Only (an empty Only:
// nothing at all). Endpoints name a segment (which wins over a node of the same
// name), a node or an address; they never carry a port (ports go in Allow and Deny).
type Test struct {
	Name string
	// Pos is where the test's entry starts (its first key); failures cite it.
	Pos  Pos
	From Endpoint
	// To is the destination of a flow test; the zero Endpoint for an only test.
	To Endpoint
	// Allow and Deny are in file order; at least one is non-empty in a flow test.
	Allow, Deny []PortMatch
	// Only lists the targets of an only test; nil for a flow test.
	Only []Endpoint
}

// IsOnly reports whether t is an only test (rather than a flow test).
func (t *Test) IsOnly() bool { return t.To == (Endpoint{}) }
