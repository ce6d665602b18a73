package policy

import (
	"fmt"
	"net/netip"
	"slices"
)

// Explainer answers many packet queries against one policy and inventory: it
// resolves the policy against the inventory once (Explain does it per call),
// then explains each flow between two addresses with Explain's semantics. It is
// safe for concurrent use; build a new one when the policy or the inventory
// changes.
type Explainer struct {
	u *universe
	// restricted maps a node class and a family to the class of its nodes named
	// by their address of that family (see universe.restrict), computed at build
	// time so that queries never write to u.
	restricted map[[2]int]int
}

// NewExplainer resolves p against the inventory nodes. It returns the errors
// Explain returns for them (see Compile).
func NewExplainer(p *Policy, nodes []Node) (*Explainer, error) {
	u, err := newUniverse(p, nodes, nil)
	if err != nil {
		return nil, fmt.Errorf("explaining: %w", err)
	}
	e := &Explainer{u: u, restricted: map[[2]int]int{}}
	for i := range u.nodes {
		ci := u.classOf[i]
		for f := range 2 {
			k := [2]int{ci, f}
			if _, ok := e.restricted[k]; !ok {
				e.restricted[k] = u.restrict(ci, f)
			}
		}
	}
	return e, nil
}

// Node returns the name of the inventory node that holds overlay address a.
func (e *Explainer) Node(a netip.Addr) (string, bool) {
	i, ok := e.u.addrOwner[a]
	if !ok {
		return "", false
	}
	return e.u.nodes[i].Name, true
}

// Segments returns the segments that hold address a, sorted: the node segments
// of the node holding it ("all" left out), or else the external segments whose
// cidrs hold it. It returns nil for an invalid address or one in no segment.
func (e *Explainer) Segments(a netip.Addr) []string {
	if !a.IsValid() {
		return nil
	}
	a = a.Unmap()
	u := e.u
	var bits bitset
	if i, ok := u.addrOwner[a]; ok {
		bits = u.classes[u.classOf[i]].segs
	} else {
		at := u.atoms[u.atomAt(a)]
		bits = u.classes[at.class].ext[at.fam]
	}
	var out []string
	for si := 1; si < len(u.segs); si++ { // 0 is "all"
		if bits.has(si) {
			out = append(out, u.segs[si].name)
		}
	}
	slices.Sort(out)
	return out
}

// ExplainFlow explains a new connection from address src to address dst with
// packet pk. For tcp, udp and icmp packets it returns what
// Explain(p, nodes, Query{From: src, To: dst, Packet: pk}) returns; it also takes
// Packet{Protocol: ProtoAny}, a packet of another protocol, which only rules
// with "any" allow. It returns an error for an invalid address and, like Explain,
// when the two addresses form no flow (the same node, or different families).
func (e *Explainer) ExplainFlow(src, dst netip.Addr, pk Packet) (*Explanation, error) {
	if !src.IsValid() || !dst.IsValid() {
		return nil, fmt.Errorf("explaining a flow from %v to %v: both addresses must be valid", src, dst)
	}
	src, dst = src.Unmap(), dst.Unmap()
	srcs, sp := e.party(src)
	dsts, dp := e.party(dst)
	u := e.u
	name := func(p int) string {
		switch {
		case u.isNode(p):
			return u.nodes[p].Name
		case p == sp:
			return src.String()
		case p == dp:
			return dst.String()
		}
		return u.name(p)
	}
	x := &Explanation{From: src.String(), To: dst.String(), Packet: pk}
	if err := u.explain(x, srcs, dsts, name); err != nil {
		return nil, err
	}
	return x, nil
}

// party returns the party set of address a, as universe.resolve does, and its
// party number. An external address is the atom holding it; Explain cuts an
// atom at the queried address, which changes only how messages name it (the
// atom's addresses all lie in the same external segments), so ExplainFlow names
// it by a.
func (e *Explainer) party(a netip.Addr) (partySet, int) {
	u := e.u
	var s partySet
	if i, ok := u.addrOwner[a]; ok {
		s.add(e.restricted[[2]int{u.classOf[i], family(a)}], i)
		return s, i
	}
	j := u.atomAt(a)
	p := len(u.nodes) + j
	s.add(u.atoms[j].class, p)
	return s, p
}
