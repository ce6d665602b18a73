package policy

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"slices"
	"strings"
	"sync"
)

// Compiled is a policy resolved against one inventory. It is immutable and safe
// for concurrent use. Nodes with the same segment memberships share one Filter,
// and every AddressSet of a segment shares one prefix slice: callers must treat
// the slices of a NodeView as read-only.
type Compiled struct {
	names   []string         // node names, sorted
	index   map[string]int32 // name -> position in names
	groupOf []int32          // node -> group
	groups  []*group
	members [][]int32 // node segment -> member nodes, sorted; nil for external segments
}

// group holds what every node with the same segment memberships receives.
type group struct {
	filter   Filter
	peerSegs []int32 // node segments whose members are peers of the group's nodes

	once  sync.Once
	peers []string // names of the union of peerSegs' members, sorted; computed on first use
}

// segInfo is one segment of the compile-time table; index 0 is the built-in "all".
type segInfo struct {
	name       string
	external   bool
	seg        *Segment // nil for "all"
	referenced bool
	prefixes   []netip.Prefix
}

// Compile resolves p against the inventory nodes and reduces it per node.
//
// For every rule and every pair (F in From, T in To): a node in T gets an
// ingress FilterRule for set F, a node in F an egress FilterRule for set T, with
// the rule's ports; a node in T (or F) gets every node of F (or T) as a peer,
// except itself. A node with no rule to or from another node has no peer for it.
// Each node's Filter holds only the sets its rules reference: a node segment's set
// holds its members' addresses as /32 and /128 prefixes, an external segment's set
// the fewest prefixes covering its cidrs minus their excepts. FilterRules with the
// same set and direction are merged (ports united, Origin listing every rule as
// "name (file:line:col)", sorted); rules are sorted by set. The result does not
// depend on the order of segments, rules, selectors, lists or nodes.
//
// Compile returns an error, listing every problem of the inventory one per line,
// when node names are empty or duplicated; when a node address is invalid,
// unspecified, zoned or IPv4-mapped, or a node has two addresses of one family;
// when two nodes hold the same overlay address; when a route is invalid or has
// host bits set; when a route of one node overlaps a route or an overlay address
// of another (these errors name both nodes). It also fails when p (if not from
// Parse) defines a segment twice or a rule references an undefined segment.
// Routes are validated only; they enter no filter and make no peer.
func Compile(p *Policy, nodes []Node) (*Compiled, error) {
	if p == nil {
		return nil, fmt.Errorf("compiling policy: nil policy")
	}
	c := &Compiled{}
	sorted, err := c.indexNodes(nodes)
	if err != nil {
		return nil, fmt.Errorf("compiling policy: %w", err)
	}
	prog, err := Prepare(p)
	if err != nil {
		return nil, err
	}
	segs, rules := prog.segs, prog.rules
	nodeSegs := c.resolveMembers(prog, sorted)

	// Nodes with the same memberships form one group and share its filter.
	c.groupOf = make([]int32, len(sorted))
	groupIndex := map[string]int32{}
	inSeg := make([]bool, len(segs))
	var key []byte
	for i, ms := range nodeSegs {
		key = key[:0]
		for _, si := range ms {
			key = binary.AppendUvarint(key, uint64(si))
		}
		gi, ok := groupIndex[string(key)]
		if !ok {
			gi = int32(len(c.groups))
			groupIndex[string(key)] = gi
			for _, si := range ms {
				inSeg[si] = true
			}
			g := &group{}
			g.filter, _, g.peerSegs = buildGroup(segs, rules, inSeg)
			c.groups = append(c.groups, g)
			for _, si := range ms {
				inSeg[si] = false
			}
		}
		c.groupOf[i] = gi
	}
	return c, nil
}

// indexNodes validates the inventory and records its names in sorted order; it
// returns the nodes in that order.
func (c *Compiled) indexNodes(nodes []Node) ([]*Node, error) {
	sorted := make([]*Node, len(nodes))
	for i := range nodes {
		sorted[i] = &nodes[i]
	}
	slices.SortFunc(sorted, func(a, b *Node) int { return cmp.Compare(a.Name, b.Name) })
	if probs := checkNodes(sorted, true); len(probs) > 0 {
		errs := make([]error, len(probs))
		for i, p := range probs {
			errs[i] = errors.New(p.msg)
		}
		return nil, errors.Join(errs...)
	}
	c.names = make([]string, len(sorted))
	c.index = make(map[string]int32, len(sorted))
	for i, n := range sorted {
		c.names[i] = n.Name
		c.index[n.Name] = int32(i)
	}
	return sorted, nil
}

// resolvedRule is a Rule with segment indices instead of names.
type resolvedRule struct {
	from, to []int32 // sorted, without duplicates
	origin   string  // "name (file:line:col)"
	ports    []PortMatch
}

// resolvedRelay is a Relay with a bitset of segment numbers instead of names.
type resolvedRelay struct {
	node string
	segs bitset // the segments of For
}

// resolve builds the segment table (index 0 is "all") and resolves rule and
// relay references; a segment either references counts as referenced.
func resolve(p *Policy) ([]segInfo, []resolvedRule, []resolvedRelay, error) {
	segs := []segInfo{{name: AllSegment}}
	segIndex := map[string]int32{AllSegment: 0}
	for i := range p.Segments {
		s := &p.Segments[i]
		if _, dup := segIndex[s.Name]; dup {
			return nil, nil, nil, fmt.Errorf("segment %q defined twice (%s)", s.Name, s.Pos)
		}
		segIndex[s.Name] = int32(len(segs))
		segs = append(segs, segInfo{name: s.Name, external: s.External(), seg: s})
	}
	rules := make([]resolvedRule, 0, len(p.Rules))
	for i := range p.Rules {
		r := &p.Rules[i]
		rr := resolvedRule{origin: fmt.Sprintf("%s (%s)", r.Name, r.Pos), ports: r.Ports}
		for _, side := range []struct {
			names []string
			out   *[]int32
		}{{r.From, &rr.from}, {r.To, &rr.to}} {
			for _, name := range side.names {
				si, ok := segIndex[name]
				if !ok {
					return nil, nil, nil, fmt.Errorf("rule %q references undefined segment %q", r.Name, name)
				}
				segs[si].referenced = true
				*side.out = append(*side.out, si)
			}
			slices.Sort(*side.out)
			*side.out = slices.Compact(*side.out)
		}
		rules = append(rules, rr)
	}
	relays := make([]resolvedRelay, 0, len(p.Relays))
	seen := make(map[string]bool, len(p.Relays))
	for i := range p.Relays {
		r := &p.Relays[i]
		if seen[r.Node] {
			return nil, nil, nil, fmt.Errorf("relay %q listed twice (%s)", r.Node, r.Pos)
		}
		seen[r.Node] = true
		rr := resolvedRelay{node: r.Node, segs: newBitset(len(segs))}
		for _, name := range r.For {
			si, ok := segIndex[name]
			switch {
			case !ok:
				return nil, nil, nil, fmt.Errorf("relay %q references undefined segment %q", r.Node, name)
			case segs[si].external:
				return nil, nil, nil, fmt.Errorf("relay %q references external segment %q; a relay forwards only between nodes", r.Node, name)
			}
			segs[si].referenced = true
			rr.segs.set(int(si))
		}
		relays = append(relays, rr)
	}
	return segs, rules, relays, nil
}

// resolveMembers computes the members of every referenced node segment
// (c.members) and records each one's address set in segs[i].prefixes. It returns,
// per node, the referenced node segments the node belongs to, in segment order.
func (c *Compiled) resolveMembers(prog *Program, sorted []*Node) [][]int32 {
	segs := prog.segs
	c.members = make([][]int32, len(segs))
	prefixes := make([][]netip.Prefix, len(segs))
	nodeSegs := make([][]int32, len(sorted))
	for i, n := range sorted {
		nodeSegs[i] = prog.Memberships(n, nil)
		for _, si := range nodeSegs[i] {
			c.members[si] = append(c.members[si], int32(i))
			for _, a := range n.Addresses {
				prefixes[si] = append(prefixes[si], netip.PrefixFrom(a, a.BitLen()))
			}
		}
	}
	for si := range segs {
		if segs[si].external || !segs[si].referenced {
			continue
		}
		slices.SortFunc(prefixes[si], comparePrefixes)
		segs[si].prefixes = slices.Clip(slices.Compact(prefixes[si]))
	}
	return nodeSegs
}

// buildGroup computes the filter, the segments of its sets (in the order of
// filter.Sets) and the peer segments of the nodes that belong to exactly the
// segments marked in inSeg. Each set holds segs[i].prefixes.
func buildGroup(segs []segInfo, rules []resolvedRule, inSeg []bool) (filter Filter, setSegs, peerSegs []int32) {
	type dirSet struct {
		egress bool
		set    int32
	}
	type accRule struct {
		matches []PortMatch
		origins []string
	}
	acc := map[dirSet]*accRule{}
	add := func(egress bool, set int32, rr *resolvedRule) {
		k := dirSet{egress, set}
		a, ok := acc[k]
		if !ok {
			a = &accRule{}
			acc[k] = a
		}
		a.matches = append(a.matches, rr.ports...)
		a.origins = append(a.origins, rr.origin)
	}
	g := &group{}
	for ri := range rules {
		rr := &rules[ri]
		for _, f := range rr.from {
			for _, t := range rr.to {
				if inSeg[t] {
					add(false, f, rr)
					if !segs[f].external {
						g.peerSegs = append(g.peerSegs, f)
					}
				}
				if inSeg[f] {
					add(true, t, rr)
					if !segs[t].external {
						g.peerSegs = append(g.peerSegs, t)
					}
				}
			}
		}
	}
	slices.Sort(g.peerSegs)
	g.peerSegs = slices.Compact(g.peerSegs)

	var setIDs []int32
	for k, a := range acc {
		slices.Sort(a.origins)
		fr := FilterRule{
			Set:     segs[k.set].name,
			Matches: mergeMatches(a.matches),
			Origin:  strings.Join(slices.Compact(a.origins), ", "),
		}
		if k.egress {
			g.filter.Egress = append(g.filter.Egress, fr)
		} else {
			g.filter.Ingress = append(g.filter.Ingress, fr)
		}
		setIDs = append(setIDs, k.set)
	}
	byName := func(a, b FilterRule) int { return cmp.Compare(a.Set, b.Set) }
	slices.SortFunc(g.filter.Ingress, byName)
	slices.SortFunc(g.filter.Egress, byName)
	slices.Sort(setIDs)
	setIDs = slices.Compact(setIDs)
	slices.SortFunc(setIDs, func(a, b int32) int { return cmp.Compare(segs[a].name, segs[b].name) })
	for _, si := range setIDs {
		g.filter.Sets = append(g.filter.Sets, AddressSet{Name: segs[si].name, Prefixes: segs[si].prefixes})
	}
	// Views share these slices: clip them so that an append by one holder cannot
	// write into memory another holder sees.
	g.filter.Sets = slices.Clip(g.filter.Sets)
	g.filter.Ingress = slices.Clip(g.filter.Ingress)
	g.filter.Egress = slices.Clip(g.filter.Egress)
	return g.filter, slices.Clip(setIDs), g.peerSegs
}

func anySelector(sels []Selector, labels map[string]string) bool {
	for _, s := range sels {
		if s.Matches(labels) {
			return true
		}
	}
	return false
}

func comparePrefixes(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

// Nodes returns the names of the inventory's nodes, sorted.
func (c *Compiled) Nodes() []string { return slices.Clone(c.names) }

// Node returns what the named node receives, or false if the inventory has no such
// node. The view's slices (Peers included) may be shared with other nodes' views
// and must not be modified.
func (c *Compiled) Node(name string) (NodeView, bool) {
	i, ok := c.index[name]
	if !ok {
		return NodeView{}, false
	}
	g := c.groups[c.groupOf[i]]
	g.once.Do(func() {
		members := c.unionMembers(g.peerSegs)
		if len(members) == 0 {
			return
		}
		g.peers = make([]string, len(members))
		for j, m := range members {
			g.peers[j] = c.names[m]
		}
	})
	peers := g.peers
	if k, self := slices.BinarySearch(peers, name); self {
		if len(peers) == 1 {
			peers = nil
		} else {
			peers = slices.Concat(peers[:k], peers[k+1:])
		}
	}
	return NodeView{Peers: peers, Filter: g.filter}, true
}

// unionMembers returns the sorted union of the members of segs.
func (c *Compiled) unionMembers(segs []int32) []int32 {
	switch len(segs) {
	case 0:
		return nil
	case 1:
		return c.members[segs[0]]
	}
	set := make([]uint64, (len(c.names)+63)/64)
	n := 0
	for _, si := range segs {
		for _, m := range c.members[si] {
			w, b := m/64, uint64(1)<<(m%64)
			if set[w]&b == 0 {
				set[w] |= b
				n++
			}
		}
	}
	out := make([]int32, 0, n)
	for w, word := range set {
		for word != 0 {
			b := bits.TrailingZeros64(word)
			out = append(out, int32(w*64+b))
			word &= word - 1
		}
	}
	return out
}
