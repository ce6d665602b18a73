package netmap

import (
	"cmp"
	"slices"

	"segmesh/api/segmeshv1"
)

// Segments returns the names of the node segments of the policy in force that
// node belongs to, sorted: those a rule references (the memberships its netmap
// depends on, "all" included when a rule names it). It returns nil for a node the
// Engine does not hold, a revoked node, and under default deny. The slice is the
// caller's; the strings are shared.
func (e *Engine) Segments(node string) []string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	n, ok := e.nodes[node]
	if !ok || len(n.segs) == 0 || e.prog == nil {
		return nil
	}
	out := make([]string, len(n.segs))
	for i, si := range n.segs {
		out[i] = e.prog.SegmentName(si)
	}
	slices.Sort(out)
	return out
}

// PeerNames returns the names of the peers node's netmap lists, sorted, without
// building the netmap; nil for a node the Engine does not hold, a revoked node,
// or one without peers.
func (e *Engine) PeerNames(node string) []string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	n, ok := e.nodes[node]
	if !ok || n.group == nil {
		return nil
	}
	var out []string
	for _, p := range n.group.peers {
		if p.Name != node {
			out = append(out, p.Name)
		}
	}
	return out
}

// Peer returns the entry of peer in node's netmap, without building the
// netmap; false when node's netmap does not list peer (a node the Engine does
// not hold, revoked, or not connected to peer by the policy; a node is never
// its own peer). The entry is shared and must not be modified.
func (e *Engine) Peer(node, peer string) (*segmeshv1.Peer, bool) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	n, ok := e.nodes[node]
	if !ok || n.group == nil || peer == node {
		return nil, false
	}
	i, found := slices.BinarySearchFunc(n.group.peers, peer, func(p *segmeshv1.Peer, name string) int { return cmp.Compare(p.Name, name) })
	if !found {
		return nil, false
	}
	return n.group.peers[i], true
}
