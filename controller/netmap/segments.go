package netmap

import "slices"

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
