package policy

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// This file holds the evaluator behind RunTests, Explain and Diff. It reads a
// policy the way the compiled filters and peer lists behave on the dataplane,
// for one new connection from a source to a destination over one address family:
//
//   - a node opens it when one of its egress FilterRules allows it: a rule with a
//     node segment of From holding the source node and a segment of To holding the
//     destination address (a node segment holds its members' overlay addresses, an
//     external segment its cidrs minus excepts);
//   - a node accepts it when one of its ingress FilterRules allows it, the mirror
//     image: a node segment of To holds the destination node, a segment of From
//     holds the source address;
//   - between two nodes WireGuard carries it only when they are peers: some rule
//     has one in a node segment of From and the other in a node segment of To.
//
// A flow between two nodes needs all three, a flow from an external address only
// the destination node's ingress, a flow to one only the source node's egress;
// the node itself (its own address) is not a flow. Nodes with the same
// memberships form a class and are evaluated once; external addresses are cut
// into atoms, ranges in which every address belongs to the same external segments.

// bitset is a fixed-size set of segment indices.
type bitset []uint64

func newBitset(n int) bitset { return make(bitset, (n+63)/64) }

func (b bitset) set(i int)      { b[i/64] |= 1 << (i % 64) }
func (b bitset) has(i int) bool { return i/64 < len(b) && b[i/64]&(1<<(i%64)) != 0 }

// anyOf reports whether b holds at least one of is.
func (b bitset) anyOf(is []int32) bool {
	for _, i := range is {
		if b.has(int(i)) {
			return true
		}
	}
	return false
}

func (b bitset) intersects(o bitset) bool {
	for i := range min(len(b), len(o)) {
		if b[i]&o[i] != 0 {
			return true
		}
	}
	return false
}

func (b bitset) key() string {
	var sb strings.Builder
	for _, w := range b {
		fmt.Fprintf(&sb, "%x.", w)
	}
	return sb.String()
}

type evalSeg struct {
	name     string
	external bool
	seg      *Segment // nil for "all"
	ranges   []addrRange
}

type evalRule struct {
	rule                             *Rule
	fromNode, fromExt, toNode, toExt bitset
	ports                            PortSet
}

// class is a set of parties the evaluator cannot tell apart: nodes with the
// same node segments and the same external segments holding their addresses, or
// atoms of one family in the same external segments.
type class struct {
	node bool
	segs bitset    // node segments, "all" included (nodes only)
	ext  [2]bitset // external segments holding the address of each family
	has  [2]bool   // whether the party has an address of each family
	// restricted is the class this one narrows to one family (a node named by one
	// of its addresses), or -1.
	restricted int
}

// atom is a range of addresses of one family that the same external segments
// hold; nodeAddr atoms are single overlay addresses of nodes and no external party.
type atom struct {
	fam      int
	r        addrRange
	class    int
	nodeAddr bool
}

// universe is a policy resolved against an inventory. Parties are numbered:
// nodes 0..len(nodes)-1 (sorted by name), then atoms.
type universe struct {
	p         *Policy
	segs      []evalSeg // index 0 is "all"
	segIndex  map[string]int
	rules     []evalRule
	nodes     []*Node
	nodeIndex map[string]int
	addrOwner map[netip.Addr]int
	atoms     []atom // sorted by family, then address
	classes   []*class
	classOf   []int // party -> class
	classKey  map[string]int
}

// newUniverse resolves p against nodes. Atom boundaries are p's external
// ranges, the extra ranges and every node address inside any of them. It
// returns the errors Compile returns for the inventory or for a hand-built policy.
func newUniverse(p *Policy, nodes []Node, extra []addrRange) (*universe, error) {
	if p == nil {
		return nil, fmt.Errorf("nil policy")
	}
	c := &Compiled{}
	sorted, err := c.indexNodes(nodes)
	if err != nil {
		return nil, err
	}
	u := &universe{p: p, nodes: sorted, nodeIndex: map[string]int{}, addrOwner: map[netip.Addr]int{}, classKey: map[string]int{}}
	u.segs = []evalSeg{{name: AllSegment}}
	u.segIndex = map[string]int{AllSegment: 0}
	for i := range p.Segments {
		s := &p.Segments[i]
		if _, dup := u.segIndex[s.Name]; dup {
			return nil, fmt.Errorf("segment %q defined twice (%s)", s.Name, s.Pos)
		}
		es := evalSeg{name: s.Name, external: s.External(), seg: s}
		if es.external {
			for _, pfx := range cidrPrefixes(s.CIDRs) {
				es.ranges = append(es.ranges, prefixRange(pfx))
			}
		}
		u.segIndex[s.Name] = len(u.segs)
		u.segs = append(u.segs, es)
	}
	n := len(u.segs)
	for i := range p.Rules {
		r := &p.Rules[i]
		er := evalRule{rule: r, fromNode: newBitset(n), fromExt: newBitset(n), toNode: newBitset(n), toExt: newBitset(n), ports: PortSetOf(r.Ports)}
		for _, side := range []struct {
			names     []string
			node, ext bitset
		}{{r.From, er.fromNode, er.fromExt}, {r.To, er.toNode, er.toExt}} {
			for _, name := range side.names {
				si, ok := u.segIndex[name]
				if !ok {
					return nil, fmt.Errorf("rule %q references undefined segment %q", r.Name, name)
				}
				if u.segs[si].external {
					side.ext.set(si)
				} else {
					side.node.set(si)
				}
			}
		}
		u.rules = append(u.rules, er)
	}
	for i, nd := range sorted {
		u.nodeIndex[nd.Name] = i
		for _, a := range nd.Addresses {
			u.addrOwner[a] = i
		}
	}
	u.buildAtoms(extra)
	for i, nd := range sorted {
		cl := &class{node: true, segs: newBitset(n), restricted: -1}
		for si := range u.segs {
			if !u.segs[si].external && u.member(si, nd) {
				cl.segs.set(si)
			}
		}
		for _, a := range nd.Addresses {
			f := family(a)
			cl.has[f] = true
			cl.ext[f] = u.classes[u.classOf[len(sorted)+u.atomAt(a)]].ext[f]
		}
		u.classOf[i] = u.intern(cl)
	}
	return u, nil
}

func (u *universe) member(si int, n *Node) bool {
	s := u.segs[si].seg
	return s == nil || slices.Contains(s.Nodes, n.Name) || anySelector(s.Selectors, n.Labels)
}

// buildAtoms cuts both address spaces at every boundary of the external ranges,
// the extra ranges and the node addresses inside them, and classifies the pieces.
func (u *universe) buildAtoms(extra []addrRange) {
	var ranges []addrRange
	for _, s := range u.segs {
		ranges = append(ranges, s.ranges...)
	}
	ranges = append(ranges, extra...)
	inside := func(a netip.Addr) bool {
		v, bl := toU128(a), a.BitLen()
		return slices.ContainsFunc(ranges, func(r addrRange) bool {
			return r.bitLen == bl && r.first.cmp(v) <= 0 && v.cmp(r.last) <= 0
		})
	}
	var cuts [2][]u128 // starts of atoms
	for f, bl := range []int{32, 128} {
		cuts[f] = append(cuts[f], u128{})
		for _, r := range ranges {
			if r.bitLen != bl {
				continue
			}
			cuts[f] = append(cuts[f], r.first)
			if r.last.cmp(lowMask(bl)) < 0 {
				cuts[f] = append(cuts[f], r.last.add1())
			}
		}
	}
	nodeAddrs := map[[2]u128]bool{}
	if len(ranges) > 0 {
		for _, nd := range u.nodes {
			for _, a := range nd.Addresses {
				if inside(a) {
					f, v := family(a), toU128(a)
					nodeAddrs[[2]u128{{0, uint64(f)}, v}] = true
					cuts[f] = append(cuts[f], v)
					if v.cmp(lowMask(a.BitLen())) < 0 {
						cuts[f] = append(cuts[f], v.add1())
					}
				}
			}
		}
	}
	n := len(u.segs)
	for f, bl := range []int{32, 128} {
		cs := cuts[f]
		slices.SortFunc(cs, u128.cmp)
		cs = slices.Compact(cs)
		for i, start := range cs {
			last := lowMask(bl)
			if i+1 < len(cs) {
				last = cs[i+1].sub1()
			}
			at := atom{fam: f, r: addrRange{bitLen: bl, first: start, last: last}}
			at.nodeAddr = start == last && nodeAddrs[[2]u128{{0, uint64(f)}, start}]
			cl := &class{restricted: -1}
			cl.has[f] = true
			cl.ext[f] = newBitset(n)
			for si, s := range u.segs {
				if s.external && slices.ContainsFunc(s.ranges, func(r addrRange) bool {
					return r.bitLen == bl && r.first.cmp(start) <= 0 && start.cmp(r.last) <= 0
				}) {
					cl.ext[f].set(si)
				}
			}
			u.atoms = append(u.atoms, at)
			u.classes = append(u.classes, cl) // interned below, once classOf exists
		}
	}
	// Intern the atom classes now that the slice of parties is known.
	atomClasses := u.classes
	u.classes = nil
	u.classOf = make([]int, len(u.nodes)+len(u.atoms))
	for i, cl := range atomClasses {
		u.atoms[i].class = u.intern(cl)
		u.classOf[len(u.nodes)+i] = u.atoms[i].class
	}
}

// atomAt returns the index of the atom holding a.
func (u *universe) atomAt(a netip.Addr) int {
	f, v := family(a), toU128(a)
	i, found := slices.BinarySearchFunc(u.atoms, atom{fam: f, r: addrRange{first: v}}, func(x, y atom) int {
		return cmp.Or(cmp.Compare(x.fam, y.fam), x.r.first.cmp(y.r.first))
	})
	if !found {
		i--
	}
	return i
}

func (u *universe) intern(cl *class) int {
	k := fmt.Sprintf("%v|%v|%v|%d|%s|%s|%s", cl.node, cl.has[0], cl.has[1], cl.restricted, cl.segs.key(), cl.ext[0].key(), cl.ext[1].key())
	if i, ok := u.classKey[k]; ok {
		return i
	}
	u.classKey[k] = len(u.classes)
	u.classes = append(u.classes, cl)
	return len(u.classes) - 1
}

// restrict returns the class of the parties of class ci narrowed to family f.
func (u *universe) restrict(ci, f int) int {
	cl := u.classes[ci]
	if !cl.has[1-f] {
		return ci
	}
	r := *cl
	r.has[1-f] = false
	r.ext[1-f] = nil
	r.restricted = ci
	return u.intern(&r)
}

// isNode reports whether party p is a node.
func (u *universe) isNode(p int) bool { return p < len(u.nodes) }

// name returns how messages name party p: a node's name, or an atom's address,
// prefix or range.
func (u *universe) name(p int) string {
	if u.isNode(p) {
		return u.nodes[p].Name
	}
	at := u.atoms[p-len(u.nodes)]
	if at.r.first == at.r.last {
		return fromU128(at.r.first, at.r.bitLen).String()
	}
	ps := rangePrefixes(nil, at.r)
	if len(ps) <= 2 {
		s := make([]string, len(ps))
		for i, p := range ps {
			s[i] = p.String()
		}
		return strings.Join(s, " ")
	}
	return fromU128(at.r.first, at.r.bitLen).String() + "-" + fromU128(at.r.last, at.r.bitLen).String()
}

func (r *evalRule) fromHolds(c *class, f int) bool {
	return c.segs.intersects(r.fromNode) || c.ext[f].intersects(r.fromExt)
}

func (r *evalRule) toHolds(c *class, f int) bool {
	return c.segs.intersects(r.toNode) || c.ext[f].intersects(r.toExt)
}

// opensEgress reports whether rule r alone lets node class a open a flow to b.
func (r *evalRule) opensEgress(a, b *class, f int) bool {
	return a.segs.intersects(r.fromNode) && r.toHolds(b, f)
}

// opensIngress reports whether rule r alone lets node class b accept a flow from a.
func (r *evalRule) opensIngress(a, b *class, f int) bool {
	return b.segs.intersects(r.toNode) && r.fromHolds(a, f)
}

// peerRule reports whether rule r makes node classes a and b peers.
func (r *evalRule) peerRule(a, b *class) bool {
	return a.segs.intersects(r.fromNode) && b.segs.intersects(r.toNode) ||
		b.segs.intersects(r.fromNode) && a.segs.intersects(r.toNode)
}

// allowed returns the packets of a new connection from class a to class b over
// family f that the dataplane lets through (see the top of this file).
func (u *universe) allowed(a, b *class, f int) PortSet {
	if !a.has[f] || !b.has[f] || !a.node && !b.node {
		return PortSet{}
	}
	if a.node && b.node && !u.peers(a, b) {
		return PortSet{}
	}
	var egress, ingress PortSet
	for i := range u.rules {
		r := &u.rules[i]
		if a.node && r.opensEgress(a, b, f) {
			egress = egress.Union(r.ports)
		}
		if b.node && r.opensIngress(a, b, f) {
			ingress = ingress.Union(r.ports)
		}
	}
	switch {
	case !a.node:
		return ingress
	case !b.node:
		return egress
	}
	return egress.Intersect(ingress)
}

// peers reports whether node classes a and b are WireGuard peers.
func (u *universe) peers(a, b *class) bool {
	for i := range u.rules {
		if u.rules[i].peerRule(a, b) {
			return true
		}
	}
	return false
}

// allowingRules returns the rules that alone let pk from a to b over f: they
// open the source node's egress and the destination node's ingress (only the
// side that is a node, for an external party). When none does but the flow is
// allowed through different rules on each side, it returns those.
func (u *universe) allowingRules(a, b *class, f int, pk PortSet) []int {
	var full, egress, ingress []int
	for i := range u.rules {
		r := &u.rules[i]
		if r.ports.Intersect(pk).Empty() {
			continue
		}
		e := a.node && r.opensEgress(a, b, f)
		in := b.node && r.opensIngress(a, b, f)
		switch {
		case (e || !a.node) && (in || !b.node):
			full = append(full, i)
		case e:
			egress = append(egress, i)
		case in:
			ingress = append(ingress, i)
		}
	}
	if len(full) > 0 {
		return full
	}
	out := append(egress, ingress...)
	slices.Sort(out)
	return out
}

// combinedRules extends the rules of a flow that no single rule allows (the
// result of allowingRules when no rule opens both ends) with the rules that
// make two nodes peers, which the flow needs too.
func (u *universe) combinedRules(a, b *class, rules []int) []int {
	if !a.node || !b.node {
		return rules
	}
	out := slices.Clone(rules)
	for i := range u.rules {
		if u.rules[i].peerRule(a, b) && !slices.Contains(out, i) {
			out = append(out, i)
		}
	}
	slices.Sort(out)
	return out
}

// fullRule reports whether rule i alone opens both ends of a flow from a to b over f.
func (u *universe) fullRule(a, b *class, f, i int) bool {
	r := &u.rules[i]
	return (!a.node || r.opensEgress(a, b, f)) && (!b.node || r.opensIngress(a, b, f))
}

// ruleRef names rule i as "name (file:line:col)".
func (u *universe) ruleRef(i int) string {
	r := u.rules[i].rule
	return fmt.Sprintf("%s (%s)", r.Name, r.Pos)
}

// partySet is a set of parties grouped by class, as one side of a test or query.
type partySet struct {
	byClass map[int][]int // class -> parties, sorted by party number
}

func (s *partySet) add(cl, p int) {
	if s.byClass == nil {
		s.byClass = map[int][]int{}
	}
	s.byClass[cl] = append(s.byClass[cl], p)
}

func (s *partySet) classes() []int {
	out := make([]int, 0, len(s.byClass))
	for c := range s.byClass {
		out = append(out, c)
	}
	slices.Sort(out)
	return out
}

func (s *partySet) empty() bool { return len(s.byClass) == 0 }

// families returns, for every party of s, the families in which s holds it: a
// node named by one of its addresses is held for that family only.
func (s *partySet) families(u *universe) map[int][2]bool {
	out := map[int][2]bool{}
	for c, ps := range s.byClass {
		for _, p := range ps {
			f := out[p]
			f[0] = f[0] || u.classes[c].has[0]
			f[1] = f[1] || u.classes[c].has[1]
			out[p] = f
		}
	}
	return out
}

// segmentParties returns the parties of segment si: its member nodes, or the
// atoms of its external addresses.
func (u *universe) segmentParties(si int) partySet {
	var s partySet
	if !u.segs[si].external {
		for i, nd := range u.nodes {
			if u.member(si, nd) {
				s.add(u.classOf[i], i)
			}
		}
		return s
	}
	for j, at := range u.atoms {
		if !at.nodeAddr && u.classes[at.class].ext[at.fam].has(si) {
			s.add(at.class, len(u.nodes)+j)
		}
	}
	return s
}

// resolve returns the parties an endpoint names and how messages call it. A
// defined segment wins over a node of the same name; an address is the node
// holding it (for that family only) or the external address itself.
func (u *universe) resolve(e Endpoint) (partySet, error) {
	var s partySet
	if e.Name != "" {
		if si, ok := u.segIndex[e.Name]; ok {
			return u.segmentParties(si), nil
		}
		if i, ok := u.nodeIndex[e.Name]; ok {
			s.add(u.classOf[i], i)
			return s, nil
		}
		return s, fmt.Errorf("%s is neither a segment nor a node%s", e.Name, u.nameHint(e.Name))
	}
	if i, ok := u.addrOwner[e.Addr]; ok {
		s.add(u.restrict(u.classOf[i], family(e.Addr)), i)
		return s, nil
	}
	j := u.atomAt(e.Addr)
	s.add(u.atoms[j].class, len(u.nodes)+j)
	return s, nil
}

// nameHint suggests the segment or node name closest to a mistyped one.
func (u *universe) nameHint(name string) string {
	cands := make([]string, 0, len(u.segs)+len(u.nodes))
	for _, s := range u.segs {
		cands = append(cands, s.name)
	}
	if len(u.nodes) <= 10000 {
		for _, n := range u.nodes {
			cands = append(cands, n.Name)
		}
	}
	if c := closest(name, cands); c != "" {
		return fmt.Sprintf(" (did you mean %q?)", c)
	}
	return ""
}

// endpointRanges returns single-address ranges for the addresses of es, so that
// atoms are cut at them.
func endpointRanges(es ...Endpoint) []addrRange {
	var out []addrRange
	for _, e := range es {
		if e.Addr.IsValid() {
			v := toU128(e.Addr)
			out = append(out, addrRange{bitLen: e.Addr.BitLen(), first: v, last: v})
		}
	}
	return out
}

// familiesOf returns the families flows between classes a and b can use.
func familiesOf(a, b *class) []int {
	var out []int
	for f := range 2 {
		if a.has[f] && b.has[f] {
			out = append(out, f)
		}
	}
	return out
}

// pairCount returns how many (source, destination) pairs of distinct parties
// the sorted party lists as and bs form.
func pairCount(as, bs []int) int {
	common := 0
	for i, j := 0, 0; i < len(as) && j < len(bs); {
		switch {
		case as[i] < bs[j]:
			i++
		case as[i] > bs[j]:
			j++
		default:
			common++
			i++
			j++
		}
	}
	return len(as)*len(bs) - common
}

// firstPair returns the first pair of distinct parties of as x bs.
func firstPair(as, bs []int) (int, int, bool) {
	for _, a := range as {
		for _, b := range bs {
			if a != b {
				return a, b, true
			}
		}
	}
	return 0, 0, false
}
