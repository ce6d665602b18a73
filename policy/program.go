package policy

import (
	"fmt"
	"net/netip"
	"slices"
)

// Program is a policy resolved without an inventory: its segments numbered, its
// rules referring to them by number, external segments reduced to prefixes. It is
// the part of Compile that does not depend on the nodes, for callers that keep
// memberships up to date node by node (the controller's incremental netmaps).
// A Program is immutable and safe for concurrent use.
//
// Segment numbers run from 0 (the built-in "all") to Segments()-1, in the order
// of the policy's segments.
type Program struct {
	segs       []segInfo
	rules      []resolvedRule
	explicit   []map[string]bool // per segment: names listed in nodes:, nil for none
	relays     []resolvedRelay   // policy order
	relayNames []string          // relays[i].node
}

// Prepare resolves p's segment references. It fails, like Compile, when p (if
// not from Parse) defines a segment twice, a rule or a relay references an
// undefined segment, a relay references an external segment, or a relay node
// is listed twice.
func Prepare(p *Policy) (*Program, error) {
	if p == nil {
		return nil, fmt.Errorf("compiling policy: nil policy")
	}
	segs, rules, relays, err := resolve(p)
	if err != nil {
		return nil, fmt.Errorf("compiling policy: %w", err)
	}
	prog := &Program{segs: segs, rules: rules, explicit: make([]map[string]bool, len(segs)), relays: relays}
	for _, r := range relays {
		prog.relayNames = append(prog.relayNames, r.node)
	}
	for si := range segs {
		s := &segs[si]
		if !s.referenced {
			continue
		}
		if s.external {
			s.prefixes = cidrPrefixes(s.seg.CIDRs)
			continue
		}
		if s.seg != nil && len(s.seg.Nodes) > 0 {
			prog.explicit[si] = make(map[string]bool, len(s.seg.Nodes))
			for _, n := range s.seg.Nodes {
				prog.explicit[si][n] = true
			}
		}
	}
	return prog, nil
}

// Segments returns the number of segments, "all" included.
func (p *Program) Segments() int { return len(p.segs) }

// SegmentName returns the name of segment si.
func (p *Program) SegmentName(si int32) string { return p.segs[si].name }

// External reports whether segment si is an external (CIDR) segment.
func (p *Program) External(si int32) bool { return p.segs[si].external }

// Memberships appends to dst, in ascending order, the node segments that a rule
// or a relay's for references and that n belongs to (by name or by a
// selector), and returns it. A node's netmap, relays included, depends on the
// policy only through this list.
func (p *Program) Memberships(n *Node, dst []int32) []int32 {
	for si := range p.segs {
		s := &p.segs[si]
		if !s.referenced || s.external {
			continue
		}
		if s.seg == nil || p.explicit[si][n.Name] || anySelector(s.seg.Selectors, n.Labels) {
			dst = append(dst, int32(si))
		}
	}
	return dst
}

// GroupSpec is what every node with the same Memberships receives, apart from the
// members of node segments.
type GroupSpec struct {
	// Filter is the nodes' filter. Its sets are in name order; the set of a node
	// segment has nil Prefixes (its members' addresses, which the caller fills in),
	// the set of an external segment its prefixes (shared: do not modify).
	Filter Filter
	// SetSegments holds the segment of each of Filter.Sets, in the same order.
	SetSegments []int32
	// PeerSegments are the node segments, ascending, whose members (other than the
	// node itself) are the node's peers.
	PeerSegments []int32
}

// Group returns the GroupSpec of the nodes whose Memberships are memberships
// (ascending segment numbers). It follows the rules of Compile.
func (p *Program) Group(memberships []int32) GroupSpec {
	inSeg := make([]bool, len(p.segs))
	for _, si := range memberships {
		inSeg[si] = true
	}
	segs := slices.Clone(p.segs)
	for i := range segs {
		if !segs[i].external {
			segs[i].prefixes = nil
		}
	}
	f, setSegs, peerSegs := buildGroup(segs, p.rules, inSeg)
	return GroupSpec{Filter: f, SetSegments: setSegs, PeerSegments: peerSegs}
}

// HostPrefix returns a as a single-address prefix (/32 or /128), the form node
// addresses take in address sets.
func HostPrefix(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

// Relays returns the names of the policy's relay nodes in policy order (the
// order of preference), or nil when it has none. The slice is the caller's.
func (p *Program) Relays() []string { return slices.Clone(p.relayNames) }

// RelaysFor returns the names of the relay nodes, in policy order, that may
// forward between two nodes whose Memberships are a and b (ascending segment
// numbers, as Memberships returns them): a relay R qualifies when a holds at
// least one segment of R's for, and so does b (not necessarily the same one).
// It returns nil when no relay qualifies. Its cost is O(len(Relays()) *
// (len(a)+len(b))) and it allocates only the result.
//
// RelaysFor sees memberships, not names, so it cannot tell that a or b is a
// relay itself: the caller must drop R from the result for a pair in which a
// or b is R (a relay never relays for itself). RelaysFor does not check that
// the rules connect a and b either: the caller offers a relay only to pairs
// that are peers (Group's PeerSegments), since for narrows who may use a relay
// and never widens access.
func (p *Program) RelaysFor(a, b []int32) []string {
	var out []string
	for i := range p.relays {
		r := &p.relays[i]
		if r.segs.anyOf(a) && r.segs.anyOf(b) {
			out = append(out, r.node)
		}
	}
	return out
}
