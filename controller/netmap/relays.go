package netmap

import "slices"

// Relays returns the relay node names of the policy in force, in policy order;
// nil under default deny. The slice is the caller's.
func (e *Engine) Relays() []string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.prog == nil {
		return nil
	}
	return e.prog.Relays()
}

// RelaysFor returns the relay nodes the policy in force lets nodes a and b both
// use (policy.Program.RelaysFor on their memberships), in policy order, a and b
// left out (a relay never relays for itself). It returns nil when the Engine
// does not hold a or b, either is revoked, or under default deny. It does not
// check that the policy connects a and b (Peer). The slice is the caller's.
func (e *Engine) RelaysFor(a, b string) []string {
	e.mu.RLock()
	defer e.mu.RUnlock()
	na, nb := e.nodes[a], e.nodes[b]
	if na == nil || nb == nil || na.peer == nil || nb.peer == nil || e.prog == nil {
		return nil
	}
	return slices.DeleteFunc(e.prog.RelaysFor(na.segs, nb.segs), func(r string) bool { return r == a || r == b })
}
