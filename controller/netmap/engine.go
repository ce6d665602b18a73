package netmap

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"

	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
	"segmesh/controller/store"
	"segmesh/policy"
)

// Update says that one node's netmap changed.
type Update struct {
	Node string
	// Version counts the changes of this node's netmap in the Engine (1 for the
	// first); Delta turns version From (Version-1 unless merged by MergeUpdates)
	// into this one.
	Version, From uint64
	// Hash is the version 2 hash of the new netmap, Revision its policy revision.
	Hash     string
	Revision uint64
	// Delta is nil when the node needs the whole netmap: it is new, revoked, or the
	// change was cheaper to send whole.
	Delta *segmeshv1.NetmapDelta
	// Removed is true when the node no longer has a netmap (deleted).
	Removed bool
	// LostGossip is true when the node held the gossip key before this change and
	// no longer gets it (it lost its last peer): the caller rotates the key.
	LostGossip bool
}

// Engine holds every node's netmap as shared parts and keeps them up to date
// change by change: an inventory change costs work for the netmaps it changes
// only, and a policy change one pass over the nodes with the peer and set changes
// computed once per pair of old and new group. Nodes with the same segment
// memberships form a group, which holds their peer list and filter once.
//
// Each node's hash (wire.NetmapHashV2) is kept from parts: the header digest,
// the group's Sum of peer digests less the node's own, and the group's filter
// digest, which is recomputed from per-segment Sums when a set changes. The
// netmaps equal those FromCompiled computes for the same policy and inventory
// (TestEngineMatchesFromScratch).
//
// Engine is safe for concurrent use: changes are serialised, and Netmap may run
// concurrently with other reads.
type Engine struct {
	mu       sync.RWMutex
	gossip   *segmeshv1.GossipConfig
	prefixes []string // overlay prefixes, shared by every header
	rev      uint64
	prog     *policy.Program // nil: default deny
	nodes    map[string]*nodeState
	segs     []*segState            // per segment of prog; nil for one no rule references
	groups   map[string]*groupState // by membership key
	// peerOf and setOf index, per segment, the groups that have it among their
	// peer segments, and those whose filter references its set.
	peerOf, setOf []map[*groupState]struct{}
	// owner holds the active node of each overlay address.
	owner map[netip.Addr]string
	// incarnation counts the nodes added after NewEngine: a node added again
	// after a deletion starts its versions at incarnation<<32, so that they never
	// continue the chain of the deleted node's netmap.
	incarnation uint64
}

type nodeState struct {
	node     store.Node
	peer     *segmeshv1.Peer // entry in other netmaps; nil when revoked
	peerDig  wire.Digest
	hostPfx  []netip.Prefix
	segs     []int32
	group    *groupState // nil when revoked
	revision uint64
	self     *segmeshv1.Node
	gossip   bool // the header holds the gossip key
	hash     string
	// hdrDig is the digest of the header for hdrFor (its revision and gossip
	// configuration); the rest of the header changes only with a new nodeState.
	hdrDig  wire.Digest
	hdrFor  hdrKey
	version uint64
	revoked *segmeshv1.Netmap // the netmap of a revoked node
}

type hdrKey struct {
	revision uint64
	gossip   *segmeshv1.GossipConfig
}

type segState struct {
	external bool
	name     string
	members  []*nodeState   // sorted by name
	sorted   []netip.Prefix // the set's prefixes in SortPrefixStrings order; owned, edited in place
	sum      wire.Sum
}

type groupState struct {
	key      string
	segs     []int32
	peerSegs []int32
	setSegs  []int32
	rules    *segmeshv1.FilterRules
	rulesDig wire.Digest
	filter   wire.Digest
	// peers are the members of peerSegs, sorted by name; owned, edited in place
	// (materialize copies them).
	peers   []*segmeshv1.Peer
	peerSum wire.Sum
	members map[*nodeState]struct{}
}

// NewEngine returns an Engine holding the netmaps of nodes under prog (revision
// rev; nil prog is default deny), each at version 1.
func NewEngine(cfg Config, rev uint64, prog *policy.Program, nodes []store.Node) *Engine {
	e := &Engine{prefixes: wire.PrefixStrings(cfg.OverlayPrefixes), rev: rev, nodes: make(map[string]*nodeState, len(nodes)), owner: map[netip.Addr]string{}}
	e.gossip = &segmeshv1.GossipConfig{Key: cfg.GossipKey, Port: cfg.GossipPort}
	for i := range nodes {
		n := newNodeState(nodes[i])
		e.nodes[nodes[i].Name] = n
		if n.peer != nil {
			for _, a := range nodes[i].Addresses {
				if _, taken := e.owner[a]; !taken {
					e.owner[a] = n.node.Name
				}
			}
		}
	}
	e.build(prog)
	for _, n := range e.nodes {
		n.revision = rev
		if n.peer == nil {
			n.revoked = Revoked(rev, n.node.Name)
			n.hash = n.revoked.Hash
		} else {
			n.gossip = e.hasPeers(n)
			e.rehash(n)
		}
		n.version = 1
	}
	return e
}

func newNodeState(sn store.Node) *nodeState {
	n := &nodeState{node: sn}
	if sn.Revoked() {
		return n
	}
	n.hostPfx = make([]netip.Prefix, len(sn.Addresses))
	for i, a := range sn.Addresses {
		n.hostPfx[i] = policy.HostPrefix(a)
	}
	n.peer = PeerOf(&sn)
	n.peerDig = wire.PeerDigest(n.peer)
	n.self = &segmeshv1.Node{Name: sn.Name, Labels: sn.Labels, Addresses: n.peer.AllowedIps, PublicKey: sn.PublicKey, Endpoint: sn.Endpoint}
	return n
}

// build computes segments and groups for prog from the nodes' records, leaving
// each node's published fields (revision, hash, version) alone.
func (e *Engine) build(prog *policy.Program) {
	e.prog = prog
	e.groups = map[string]*groupState{}
	nseg := 0
	if prog != nil {
		nseg = prog.Segments()
	}
	e.segs = make([]*segState, nseg)
	e.peerOf = make([]map[*groupState]struct{}, nseg)
	e.setOf = make([]map[*groupState]struct{}, nseg)
	for si := range nseg {
		e.peerOf[si] = map[*groupState]struct{}{}
		e.setOf[si] = map[*groupState]struct{}{}
	}
	// Segment members first, then groups, whose peer lists need the members.
	pos := map[int32][]netip.Prefix{}
	for _, name := range slices.Sorted(maps.Keys(e.nodes)) {
		n := e.nodes[name]
		n.segs, n.group = nil, nil
		if n.peer == nil || prog == nil {
			continue
		}
		n.segs = prog.Memberships(&policy.Node{Name: n.node.Name, Labels: n.node.Labels}, nil)
		for _, si := range n.segs {
			s := e.seg(si)
			s.members = append(s.members, n) // in name order
			pos[si] = append(pos[si], n.hostPfx...)
		}
	}
	for si, ps := range pos {
		s := e.segs[si]
		slices.SortFunc(ps, comparePrefix)
		s.sorted = slices.Compact(ps)
		for _, p := range s.sorted {
			s.sum = s.sum.Add(wire.PrefixDigest(p.String()))
		}
	}
	for _, n := range e.nodes {
		if n.peer != nil {
			e.join(n)
		}
	}
}

// seg returns the state of node segment si, creating it.
func (e *Engine) seg(si int32) *segState {
	if e.segs[si] == nil {
		e.segs[si] = &segState{name: e.prog.SegmentName(si)}
	}
	return e.segs[si]
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

func groupKey(segs []int32) string {
	var b []byte
	for _, si := range segs {
		b = binary.AppendUvarint(b, uint64(si))
	}
	return string(b)
}

// newGroup creates the group of memberships segs, with its peer list computed
// from the current segment members.
func (e *Engine) newGroup(segs []int32) *groupState {
	g := &groupState{key: groupKey(segs), segs: segs, members: map[*nodeState]struct{}{}}
	var spec policy.GroupSpec
	if e.prog != nil {
		spec = e.prog.Group(segs)
	}
	wf := wire.FilterToProto(spec.Filter)
	g.rules = &segmeshv1.FilterRules{Ingress: wf.Ingress, Egress: wf.Egress}
	g.rulesDig = wire.RulesDigest(g.rules.Ingress, g.rules.Egress)
	g.peerSegs, g.setSegs = spec.PeerSegments, spec.SetSegments
	for i, si := range g.setSegs {
		if e.segs[si] == nil && e.prog.External(si) {
			e.segs[si] = &segState{external: true, name: e.prog.SegmentName(si), sorted: spec.Filter.Sets[i].Prefixes}
			for _, p := range e.segs[si].sorted {
				e.segs[si].sum = e.segs[si].sum.Add(wire.PrefixDigest(p.String()))
			}
		}
		e.seg(si)
		e.setOf[si][g] = struct{}{}
	}
	var members []*nodeState
	for _, si := range g.peerSegs {
		e.peerOf[si][g] = struct{}{}
		members = unionSorted(members, e.seg(si).members)
	}
	g.peers = make([]*segmeshv1.Peer, len(members))
	for i, m := range members {
		g.peers[i] = m.peer
		g.peerSum = g.peerSum.Add(m.peerDig)
	}
	e.refilter(g)
	e.groups[g.key] = g
	return g
}

func comparePeer(a, b *segmeshv1.Peer) int { return cmp.Compare(a.Name, b.Name) }

func compareNode(a, b *nodeState) int { return cmp.Compare(a.node.Name, b.node.Name) }

// unionSorted returns the union of a and b, both sorted by name; it may return a
// or b itself, and the caller must not modify the result.
func unionSorted(a, b []*nodeState) []*nodeState {
	switch {
	case len(a) == 0:
		return b
	case len(b) == 0:
		return a
	}
	out := make([]*nodeState, 0, max(len(a), len(b)))
	i, j := 0, 0
	for i < len(a) && j < len(b) {
		switch c := compareNode(a[i], b[j]); {
		case c < 0:
			out = append(out, a[i])
			i++
		case c > 0:
			out = append(out, b[j])
			j++
		default:
			out = append(out, a[i])
			i++
			j++
		}
	}
	out = append(out, a[i:]...)
	return append(out, b[j:]...)
}

// intersects reports whether the ascending lists a and b share an element.
func intersects(a, b []int32) bool {
	i, j := 0, 0
	for i < len(a) && j < len(b) {
		switch {
		case a[i] < b[j]:
			i++
		case a[i] > b[j]:
			j++
		default:
			return true
		}
	}
	return false
}

// isPeer reports whether n is a member of g's peer segments.
func (g *groupState) isPeer(n *nodeState) bool { return intersects(n.segs, g.peerSegs) }

// refilter recomputes g's filter digest from its sets' Sums.
func (e *Engine) refilter(g *groupState) {
	sets := make([]wire.SetSum, len(g.setSegs))
	for i, si := range g.setSegs {
		sets[i] = wire.SetSum{Name: e.segs[si].name, Sum: e.segs[si].sum}
	}
	g.filter = wire.FilterDigest(g.rulesDig, sets)
}

// join puts active node n into the group of its memberships, creating it.
func (e *Engine) join(n *nodeState) {
	if g, ok := e.groups[groupKey(n.segs)]; ok {
		n.group = g
	} else {
		n.group = e.newGroup(n.segs)
	}
	n.group.members[n] = struct{}{}
}

// leave takes n out of its group, dropping the group when it is empty.
func (e *Engine) leave(n *nodeState) {
	g := n.group
	if g == nil {
		return
	}
	delete(g.members, n)
	n.group = nil
	if len(g.members) == 0 {
		delete(e.groups, g.key)
		for _, si := range g.peerSegs {
			delete(e.peerOf[si], g)
		}
		for _, si := range g.setSegs {
			delete(e.setOf[si], g)
		}
	}
}

// hasPeers reports whether n's netmap lists a peer.
func (e *Engine) hasPeers(n *nodeState) bool {
	g := n.group
	if g == nil {
		return false
	}
	k := len(g.peers)
	if g.isPeer(n) {
		k--
	}
	return k > 0
}

// header returns n's netmap without peers and filter.
func (e *Engine) header(n *nodeState) *segmeshv1.Netmap {
	h := &segmeshv1.Netmap{PolicyRevision: n.revision, Self: n.self, OverlayPrefixes: e.prefixes, KeyRotation: n.node.KeyRotation, HashVersion: wire.HashVersion2}
	if n.gossip {
		h.Gossip = e.gossip
	}
	return h
}

// hashWith returns n's hash for header h, which is e.header(n).
func (e *Engine) hashWith(n *nodeState, h *segmeshv1.Netmap) string {
	g := n.group
	peers := g.peerSum
	if g.isPeer(n) {
		peers = peers.Sub(n.peerDig)
	}
	if k := (hdrKey{h.PolicyRevision, h.Gossip}); k != n.hdrFor || k.revision == 0 && n.hdrDig == (wire.Digest{}) {
		n.hdrDig, n.hdrFor = wire.HeaderDigest(h), k
	}
	return wire.ComposeHash(n.hdrDig, peers, g.filter)
}

// rehash recomputes n's hash.
func (e *Engine) rehash(n *nodeState) {
	n.hash = e.hashWith(n, e.header(n))
}

// Netmap returns the current netmap of node, with Hash set, and its version. The
// message is built for the caller, who may change its top-level fields and
// slices; the messages it points to are shared and must not be modified.
func (e *Engine) Netmap(node string) (*segmeshv1.Netmap, uint64, bool) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	n, ok := e.nodes[node]
	if !ok {
		return nil, 0, false
	}
	return e.materialize(n), n.version, true
}

func (e *Engine) materialize(n *nodeState) *segmeshv1.Netmap {
	if n.peer == nil {
		return proto.Clone(n.revoked).(*segmeshv1.Netmap)
	}
	nm := e.header(n)
	nm.Hash = n.hash
	g := n.group
	if len(g.peers) > 0 {
		nm.Peers = make([]*segmeshv1.Peer, 0, len(g.peers))
		for _, p := range g.peers {
			if p.Name != n.node.Name {
				nm.Peers = append(nm.Peers, p)
			}
		}
		if len(nm.Peers) == 0 {
			nm.Peers = nil
		}
	}
	nm.Filter = &segmeshv1.Filter{Ingress: g.rules.Ingress, Egress: g.rules.Egress}
	for _, si := range g.setSegs {
		s := e.segs[si]
		nm.Filter.Sets = append(nm.Filter.Sets, &segmeshv1.AddressSet{Name: s.name, Prefixes: wire.PrefixStrings(s.sorted)})
	}
	return nm
}

// Hash returns the hash, policy revision and version of node's current netmap.
func (e *Engine) Hash(node string) (hash string, revision, version uint64, ok bool) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	n, ok := e.nodes[node]
	if !ok {
		return "", 0, 0, false
	}
	return n.hash, n.revision, n.version, true
}

// Revision returns the policy revision the Engine computes netmaps for.
func (e *Engine) Revision() uint64 {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.rev
}

// Nodes returns the names of the nodes that have a netmap, sorted.
func (e *Engine) Nodes() []string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return slices.Sorted(maps.Keys(e.nodes))
}

// groupChange is what one group's netmaps gain from a change of one node or
// segment membership: shared by every member.
type groupChange struct {
	upserts []*segmeshv1.Peer
	removes []string
	sets    []*segmeshv1.AddressSetDelta
}

// Upsert adds node or replaces its record (enrollment, relabeling, revocation,
// endpoint, key or identity change) and returns the netmaps that changed. It
// refuses, changing nothing, an active node that policy.CheckNode refuses or that
// holds an overlay address of another active node; the error names both.
func (e *Engine) Upsert(node store.Node) ([]Update, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !node.Revoked() {
		if err := policy.CheckNode(&policy.Node{Name: node.Name, Labels: node.Labels, Addresses: node.Addresses}); err != nil {
			return nil, err
		}
		for _, a := range node.Addresses {
			if o, ok := e.owner[a]; ok && o != node.Name {
				return nil, fmt.Errorf("node %q: overlay address %s is held by node %q", node.Name, a, o)
			}
		}
	}
	return from(e.change(node.Name, &node)), nil
}

// from sets each update's From to the version before it.
func from(us []Update) []Update {
	for i := range us {
		us[i].From = us[i].Version - 1
	}
	return us
}

// MergeUpdates returns the updates of a followed by those of b (both from one
// Engine, b made right after a), one per node: a node in both gets one update
// from its version before a to its version after b, with the deltas composed.
func MergeUpdates(a, b []Update) []Update {
	out := slices.Clone(a)
	at := make(map[string]int, len(a))
	for i, u := range out {
		at[u.Node] = i
	}
	for _, u := range b {
		i, ok := at[u.Node]
		if !ok {
			out = append(out, u)
			continue
		}
		first := out[i]
		merged := u
		merged.From = first.From
		merged.LostGossip = first.LostGossip || u.LostGossip
		merged.Delta = nil
		if first.Delta != nil && u.Delta != nil && !first.Removed && !u.Removed {
			if d, err := wire.ComposeDeltas(first.Delta, u.Delta); err == nil {
				merged.Delta = d
			}
		}
		out[i] = merged
	}
	return out
}

// Remove drops node (deleted) and returns the netmaps that changed, the node's
// own with Removed set.
func (e *Engine) Remove(name string) []Update {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.nodes[name]; !ok {
		return nil
	}
	return from(e.change(name, nil))
}

// change replaces the record of node name with sn (nil: remove).
func (e *Engine) change(name string, sn *store.Node) []Update {
	old := e.nodes[name]
	var segs []int32
	if sn != nil && !sn.Revoked() && e.prog != nil {
		segs = e.prog.Memberships(&policy.Node{Name: sn.Name, Labels: sn.Labels}, nil)
	}
	// A node that stays in its group (same memberships, and the group does not
	// empty meanwhile) gets its group's change and its new header; any other
	// needs its netmap before the change, to diff.
	stays := old != nil && old.group != nil && sn != nil && !sn.Revoked() && len(old.group.members) > 1 && slices.Equal(old.segs, segs)
	var before *segmeshv1.Netmap
	if old != nil && old.peer != nil && !stays {
		before = e.materialize(old)
	}
	// The node's old contributions: peer of some groups, elements of some sets.
	var oldSegs []int32
	var oldPfx []netip.Prefix
	var oldPeer *segmeshv1.Peer
	if old != nil {
		oldSegs, oldPfx, oldPeer = old.segs, old.hostPfx, old.peer
		e.leave(old)
		for _, a := range old.node.Addresses {
			if e.owner[a] == name {
				delete(e.owner, a)
			}
		}
	}
	var n *nodeState
	if sn != nil {
		n = newNodeState(*sn)
		if old != nil {
			n.revision, n.version, n.hash, n.revoked, n.gossip = old.revision, old.version, old.hash, old.revoked, old.gossip
		} else {
			e.incarnation++
			n.version = e.incarnation << 32
		}
		n.segs = segs
		e.nodes[name] = n
		if n.peer != nil {
			for _, a := range sn.Addresses {
				e.owner[a] = name
			}
		}
	} else {
		delete(e.nodes, name)
	}
	var newSegs []int32
	var newPfx []netip.Prefix
	var newPeer *segmeshv1.Peer
	if n != nil {
		newSegs, newPfx, newPeer = n.segs, n.hostPfx, n.peer
	}
	peerChanged := oldPeer != nil && newPeer != nil && oldPeer.Name == newPeer.Name && !proto.Equal(oldPeer, newPeer)

	// Segment members and sets.
	setDeltas := map[int32]*segmeshv1.AddressSetDelta{}
	touchedSegs := map[int32]bool{}
	for _, si := range oldSegs {
		touchedSegs[si] = true
	}
	for _, si := range newSegs {
		touchedSegs[si] = true
	}
	for si := range touchedSegs {
		s := e.seg(si)
		wasIn, isIn := slices.Contains(oldSegs, si), slices.Contains(newSegs, si)
		var rm, add []netip.Prefix
		if wasIn {
			rm = oldPfx
		}
		if isIn {
			add = newPfx
		}
		s.setMember(name, n, isIn)
		if sd := s.edit(rm, add); sd != nil {
			setDeltas[si] = sd
		}
	}

	// Groups whose peer lists or sets change, and what changes for their members.
	affected := map[*groupState]*groupChange{}
	gc := func(g *groupState) *groupChange {
		c := affected[g]
		if c == nil {
			c = &groupChange{}
			affected[g] = c
		}
		return c
	}
	peerGroups := map[*groupState]bool{}
	for si := range touchedSegs {
		for g := range e.peerOf[si] {
			peerGroups[g] = true
		}
	}
	for g := range peerGroups {
		was, is := intersects(oldSegs, g.peerSegs), intersects(newSegs, g.peerSegs)
		switch {
		case was && !is:
			g.removePeer(name, oldPeer)
			gc(g).removes = []string{name}
		case is && !was:
			g.addPeer(newPeer, n.peerDig)
			gc(g).upserts = []*segmeshv1.Peer{newPeer}
		case is && was && peerChanged:
			g.removePeer(name, oldPeer)
			g.addPeer(newPeer, n.peerDig)
			gc(g).upserts = []*segmeshv1.Peer{newPeer}
		}
	}
	for si, sd := range setDeltas {
		for g := range e.setOf[si] {
			c := gc(g)
			c.sets = append(c.sets, sd)
		}
	}
	for g, c := range affected {
		if len(c.sets) > 0 {
			slices.SortFunc(c.sets, func(a, b *segmeshv1.AddressSetDelta) int { return cmp.Compare(a.Name, b.Name) })
			e.refilter(g)
		}
	}

	// The node itself.
	var out []Update
	if n != nil && n.peer != nil {
		e.join(n)
	}
	for g, c := range affected {
		for m := range g.members {
			if m == n {
				continue
			}
			out = append(out, e.deltaFor(m, c))
		}
	}
	switch {
	case n == nil:
		out = append(out, Update{Node: name, Removed: true, Version: old.version + 1})
	case n.peer == nil:
		if old == nil || old.peer != nil {
			n.revoked = Revoked(e.rev, name)
			n.revision, n.hash, n.gossip = e.rev, n.revoked.Hash, false
			n.version++
			out = append(out, Update{Node: name, Version: n.version, Hash: n.hash, Revision: n.revision})
		}
	default:
		n.revoked = nil
		n.gossip = e.hasPeers(n)
		if stays {
			if u, ok := e.stay(n, affected[n.group], old.gossip); ok {
				out = append(out, u)
			}
			break
		}
		if before == nil {
			n.revision = e.rev
			e.rehash(n)
			n.version++
			out = append(out, Update{Node: name, Version: n.version, Hash: n.hash, Revision: n.revision})
			break
		}
		out = append(out, e.settle(n, before, old.gossip)...)
	}
	return out
}

// stay recomputes the hash of node n, which stayed in its group (changed by c,
// nil for no change) while its own record changed, and returns its Update: the
// group's change and n's header; false when its netmap did not change.
func (e *Engine) stay(n *nodeState, c *groupChange, hadGossip bool) (Update, bool) {
	base := n.hash
	if e.hashWith(n, e.header(n)) == base {
		return Update{}, false
	}
	n.revision = e.rev
	h := e.header(n)
	n.hash = e.hashWith(n, h)
	n.version++
	d := &segmeshv1.NetmapDelta{BaseHash: base, Hash: n.hash, PolicyRevision: n.revision, Header: headerOf(h)}
	if c != nil {
		d.UpsertedPeers, d.RemovedPeers, d.Sets = c.upserts, c.removes, c.sets
	}
	return Update{Node: n.node.Name, Version: n.version, Hash: n.hash, Revision: n.revision, Delta: d, LostGossip: hadGossip && !n.gossip}, true
}

// settle recomputes node n's hash after its own record changed and returns its
// Update: a delta from before, computed by diffing the netmaps (its own netmap is
// the one that costs its size).
func (e *Engine) settle(n *nodeState, before *segmeshv1.Netmap, hadGossip bool) []Update {
	e.rehash(n)
	if n.hash == before.Hash {
		return nil
	}
	n.revision = e.rev
	e.rehash(n)
	n.version++
	after := e.materialize(n)
	return []Update{{Node: n.node.Name, Version: n.version, Hash: n.hash, Revision: n.revision,
		Delta: wire.DiffNetmaps(before, after), LostGossip: hadGossip && !n.gossip}}
}

// deltaFor recomputes member m's hash after its group changed by c and returns
// its Update.
func (e *Engine) deltaFor(m *nodeState, c *groupChange) Update {
	base := m.hash
	hadGossip := m.gossip
	m.gossip = e.hasPeers(m)
	m.revision = e.rev
	h := e.header(m)
	m.hash = e.hashWith(m, h)
	m.version++
	d := &segmeshv1.NetmapDelta{BaseHash: base, Hash: m.hash, PolicyRevision: m.revision, UpsertedPeers: c.upserts, RemovedPeers: c.removes, Sets: c.sets}
	if hadGossip != m.gossip {
		d.Header = headerOf(h)
	}
	return Update{Node: m.node.Name, Version: m.version, Hash: m.hash, Revision: m.revision, Delta: d, LostGossip: hadGossip && !m.gossip}
}

func headerOf(h *segmeshv1.Netmap) *segmeshv1.NetmapHeader {
	return &segmeshv1.NetmapHeader{Self: h.Self, Gossip: h.Gossip, OverlayPrefixes: h.OverlayPrefixes, KeyRotation: h.KeyRotation}
}

// setMember makes n (named name) a member of the segment or not; another node
// state of the same name is replaced.
func (s *segState) setMember(name string, n *nodeState, in bool) {
	i, found := slices.BinarySearchFunc(s.members, name, func(m *nodeState, name string) int { return cmp.Compare(m.node.Name, name) })
	switch {
	case found && in:
		s.members[i] = n
	case found:
		s.members = slices.Delete(s.members, i, i+1)
	case in:
		s.members = slices.Insert(s.members, i, n)
	}
}

// edit removes rm and adds add to the set and returns the change, or nil.
func (s *segState) edit(rm, add []netip.Prefix) *segmeshv1.AddressSetDelta {
	sd := &segmeshv1.AddressSetDelta{Name: s.name}
	for _, p := range rm {
		if slices.Contains(add, p) {
			continue
		}
		if i, ok := slices.BinarySearchFunc(s.sorted, p, comparePrefix); ok {
			s.sorted = slices.Delete(s.sorted, i, i+1)
			s.sum = s.sum.Sub(wire.PrefixDigest(p.String()))
			sd.Removed = append(sd.Removed, p.String())
		}
	}
	for _, p := range add {
		if i, ok := slices.BinarySearchFunc(s.sorted, p, comparePrefix); !ok {
			s.sorted = slices.Insert(s.sorted, i, p)
			s.sum = s.sum.Add(wire.PrefixDigest(p.String()))
			sd.Added = append(sd.Added, p.String())
		}
	}
	if len(sd.Added) == 0 && len(sd.Removed) == 0 {
		return nil
	}
	return sd
}

func (g *groupState) addPeer(p *segmeshv1.Peer, d wire.Digest) {
	i, _ := slices.BinarySearchFunc(g.peers, p, comparePeer)
	g.peers = slices.Insert(g.peers, i, p)
	g.peerSum = g.peerSum.Add(d)
}

func (g *groupState) removePeer(name string, p *segmeshv1.Peer) {
	if i, ok := slices.BinarySearchFunc(g.peers, &segmeshv1.Peer{Name: name}, comparePeer); ok {
		g.peers = slices.Delete(g.peers, i, i+1)
		g.peerSum = g.peerSum.Sub(wire.PeerDigest(p))
	}
}

// SetGossipKey replaces the gossip key and returns the netmaps that changed
// (every one that holds the key).
func (e *Engine) SetGossipKey(key []byte) []Update {
	e.mu.Lock()
	defer e.mu.Unlock()
	if bytes.Equal(key, e.gossip.Key) {
		return nil
	}
	e.gossip = &segmeshv1.GossipConfig{Key: key, Port: e.gossip.Port}
	var out []Update
	for _, n := range e.nodes {
		if n.peer == nil || !n.gossip {
			continue
		}
		base := n.hash
		n.revision = e.rev
		h := e.header(n)
		n.hash = e.hashWith(n, h)
		n.version++
		out = append(out, Update{Node: n.node.Name, Version: n.version, Hash: n.hash, Revision: n.revision,
			Delta: &segmeshv1.NetmapDelta{BaseHash: base, Hash: n.hash, PolicyRevision: n.revision, Header: headerOf(h)}})
	}
	return from(out)
}

// SetPolicy makes prog (revision rev; nil is default deny) the policy and returns
// the netmaps that changed. A node whose netmap differs only in its policy
// revision keeps its netmap (and its older revision): a netmap's revision is the
// revision at which it last changed. Deltas are computed once per pair of old
// and new group and shared.
func (e *Engine) SetPolicy(rev uint64, prog *policy.Program) []Update {
	e.mu.Lock()
	defer e.mu.Unlock()
	type oldView struct {
		group *groupState
		peers map[string]*segmeshv1.Peer
		sets  map[string][]netip.Prefix
	}
	oldGroups := map[*groupState]*oldView{}
	oldOf := make(map[*nodeState]*oldView, len(e.nodes))
	for _, n := range e.nodes {
		if n.group == nil {
			continue
		}
		v := oldGroups[n.group]
		if v == nil {
			v = &oldView{group: n.group, peers: make(map[string]*segmeshv1.Peer, len(n.group.peers)), sets: map[string][]netip.Prefix{}}
			for _, p := range n.group.peers {
				v.peers[p.Name] = p
			}
			for _, si := range n.group.setSegs {
				v.sets[e.segs[si].name] = e.segs[si].sorted
			}
			oldGroups[n.group] = v
		}
		oldOf[n] = v
	}
	e.rev = rev
	e.build(prog)

	type pair struct {
		old *oldView
		new *groupState
	}
	changes := map[pair]*groupChange{}
	setDiffs := map[string]*segmeshv1.AddressSetDelta{} // "old\x00new" set identity -> delta
	var out []Update
	for _, n := range e.nodes {
		if n.peer == nil {
			continue
		}
		ov := oldOf[n]
		pk := pair{ov, n.group}
		c, ok := changes[pk]
		if !ok {
			c = e.groupDiff(ov.peers, ov.sets, n.group, setDiffs)
			changes[pk] = c
		}
		hadGossip := n.gossip
		oldHash := n.hash
		n.gossip = e.hasPeers(n)
		h := e.header(n) // at the node's old revision
		if e.hashWith(n, h) == oldHash {
			continue
		}
		n.revision = rev
		h = e.header(n)
		n.hash = e.hashWith(n, h)
		n.version++
		d := &segmeshv1.NetmapDelta{BaseHash: oldHash, Hash: n.hash, PolicyRevision: rev, RemovedPeers: c.removes, Sets: c.sets}
		if n.group.rulesDig != ov.group.rulesDig {
			d.Rules = n.group.rules
		}
		d.UpsertedPeers = c.upserts // with n itself when n is its own peer: ApplyDelta ignores it
		if hadGossip != n.gossip {
			d.Header = headerOf(h)
		}
		out = append(out, Update{Node: n.node.Name, Version: n.version, Hash: n.hash, Revision: n.revision, Delta: d, LostGossip: hadGossip && !n.gossip})
	}
	return from(out)
}

// groupDiff returns the change from a group's old peers and sets to group g's.
func (e *Engine) groupDiff(oldPeers map[string]*segmeshv1.Peer, oldSets map[string][]netip.Prefix, g *groupState, setDiffs map[string]*segmeshv1.AddressSetDelta) *groupChange {
	c := &groupChange{}
	seen := 0
	for _, p := range g.peers {
		o, ok := oldPeers[p.Name]
		if ok {
			seen++
		}
		if !ok || o != p {
			c.upserts = append(c.upserts, p)
		}
	}
	if seen < len(oldPeers) {
		for name := range oldPeers {
			if _, ok := slices.BinarySearchFunc(g.peers, name, func(p *segmeshv1.Peer, name string) int { return cmp.Compare(p.Name, name) }); !ok {
				c.removes = append(c.removes, name)
			}
		}
		slices.Sort(c.removes)
	}
	newSets := map[string]bool{}
	for _, si := range g.setSegs {
		s := e.segs[si]
		newSets[s.name] = true
		old, ok := oldSets[s.name]
		if !ok {
			c.sets = append(c.sets, &segmeshv1.AddressSetDelta{Name: s.name, Replace: true, Prefixes: wire.PrefixStrings(s.sorted)})
			continue
		}
		if slices.Equal(old, s.sorted) {
			continue
		}
		key := s.name
		sd, ok := setDiffs[key]
		if !ok {
			sd = diffPrefixes(s.name, old, s.sorted)
			setDiffs[key] = sd
		}
		c.sets = append(c.sets, sd)
	}
	for _, name := range slices.Sorted(maps.Keys(oldSets)) {
		if !newSets[name] {
			c.sets = append(c.sets, &segmeshv1.AddressSetDelta{Name: name, Deleted: true})
		}
	}
	slices.SortFunc(c.sets, func(a, b *segmeshv1.AddressSetDelta) int { return cmp.Compare(a.Name, b.Name) })
	return c
}

// diffPrefixes returns the change from a to b (both sorted by comparePrefix).
func diffPrefixes(name string, a, b []netip.Prefix) *segmeshv1.AddressSetDelta {
	sd := &segmeshv1.AddressSetDelta{Name: name}
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case j == len(b) || i < len(a) && comparePrefix(a[i], b[j]) < 0:
			sd.Removed = append(sd.Removed, a[i].String())
			i++
		case i == len(a) || comparePrefix(a[i], b[j]) > 0:
			sd.Added = append(sd.Added, b[j].String())
			j++
		default:
			i++
			j++
		}
	}
	return sd
}
