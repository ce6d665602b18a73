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
	segs     []segInfo
	rules    []resolvedRule
	explicit []map[string]bool // per segment: names listed in nodes:, nil for none
}

// Prepare resolves p's segment references. It fails, like Compile, when p (if
// not from Parse) defines a segment twice or a rule references an undefined
// segment.
func Prepare(p *Policy) (*Program, error) {
	if p == nil {
		return nil, fmt.Errorf("compiling policy: nil policy")
	}
	segs, rules, err := resolve(p)
	if err != nil {
		return nil, fmt.Errorf("compiling policy: %w", err)
	}
	prog := &Program{segs: segs, rules: rules, explicit: make([]map[string]bool, len(segs))}
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
// references and that n belongs to (by name or by a selector), and returns it.
// A node's netmap depends on the policy only through this list.
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
