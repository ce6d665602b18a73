package controller

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/controller/relays"
	"segmesh/controller/store"
)

// Relay sessions (issue 10).
//
// A node is an available relay while it has a netmap stream whose
// SyncRequest.features lists "relay" with valid relay_ports, and the policy in
// force names it in its relays section. A node asks for a session to a peer with
// RequestRelay; the controller picks the available relay the policy lets both
// use with the fewest sessions, allocates a port pair on it (controller/relays),
// tells the peer in a Punch and pushes the relay its whole RelayConfig. Every
// change of a relay's session set pushes it the whole set again: allocation,
// expiry (relaySweepInterval), and pruning of sessions the policy or inventory
// no longer authorises (a revoked, deleted or relabeled end, a rotated key, a
// policy change).

// candidateRelay is the kind of relay candidates (segmeshv1.Candidate.kind).
const candidateRelay = "relay"

// relaySweepInterval is how often expired sessions are removed and their
// relays told.
const relaySweepInterval = 30 * time.Second

// RequestRelay calls a node may make: relayRequestBurst at once, then
// relayRequestRate per second.
const (
	relayRequestBurst = 5
	relayRequestRate  = 1.0
)

// Results of segmesh_controller_relay_requests_total.
const (
	relayOK        = "ok"
	relayNotPeer   = "not_peer"
	relayNoRelay   = "no_relay"
	relayOffline   = "offline"
	relayLimited   = "limited"
	relayExhausted = "exhausted"
	relayError     = "error"
)

var relayResults = []string{relayOK, relayNotPeer, relayNoRelay, relayOffline, relayLimited, relayExhausted, relayError}

// relayState is the controller's relay bookkeeping.
type relayState struct {
	alloc    *relays.Allocator
	requests *actorLimiter

	// mu serialises changes of the session sets with the pushes of their
	// RelayConfig (so that a relay never gets an older set after a newer one),
	// and RequestRelay's authorisation check with its allocation (so that a
	// prune after an inventory or policy change sees every session allocated
	// under the old state).
	mu sync.Mutex
	// streams holds, per node, the port range of each open netmap stream that
	// offers to relay.
	streams map[string]map[uint64]relayPorts
}

type relayPorts struct{ first, last uint16 }

func newRelayState(now func() time.Time) *relayState {
	return &relayState{
		alloc:    relays.New(relays.Options{Now: now}),
		requests: newActorLimiterWith(relayRequestRate, relayRequestBurst),
		streams:  map[string]map[uint64]relayPorts{},
	}
}

// relayStreamOpened records stream conn of node when its features (the known
// ones, streamFeatures) list "relay", with the ports of SyncRequest.relay_ports,
// makes node an available relay when the policy names it, and pushes it its
// session set. A stream that lists the feature with invalid ports is logged and
// not used.
func (c *Controller) relayStreamOpened(node string, conn uint64, features []string, ports string) {
	if !slices.Contains(features, featureRelay) {
		return
	}
	first, last, err := relays.ParsePorts(ports)
	if err != nil {
		c.log.Warn("agent offers to relay with invalid ports; not used as a relay", "node", node, "err", err)
		return
	}
	rs := c.relays
	rs.mu.Lock()
	defer rs.mu.Unlock()
	m := rs.streams[node]
	if m == nil {
		m = map[uint64]relayPorts{}
		rs.streams[node] = m
	}
	m[conn] = relayPorts{first, last}
	c.refreshRelayLocked(node, true)
}

// relayStreamClosed forgets stream conn of node; with its last relay stream
// gone, node is no longer an available relay and its sessions are dropped.
func (c *Controller) relayStreamClosed(node string, conn uint64) {
	rs := c.relays
	rs.mu.Lock()
	defer rs.mu.Unlock()
	m := rs.streams[node]
	if _, ok := m[conn]; !ok {
		return
	}
	delete(m, conn)
	if len(m) == 0 {
		delete(rs.streams, node)
	}
	c.refreshRelayLocked(node, false)
}

// refreshRelayLocked brings node's relay role up to date with its streams and
// the policy in force, and pushes its session set when it changed (or always,
// when force); rs.mu is held.
func (c *Controller) refreshRelayLocked(node string, force bool) {
	rs := c.relays
	m := rs.streams[node]
	if len(m) == 0 {
		if rs.alloc.RemoveRelay(node) {
			c.log.Info("relay offline", "relay", node)
		}
		return
	}
	if !slices.Contains(c.engine.Relays(), node) {
		if rs.alloc.RemoveRelay(node) {
			c.log.Info("relay no longer named by the policy", "relay", node)
			force = true
		}
		if force {
			c.pushRelayConfigLocked(node)
		}
		return
	}
	ports := m[slices.Max(slices.Collect(maps.Keys(m)))] // the newest stream's
	online := rs.alloc.Online(node)
	if rs.alloc.SetRelay(node, ports.first, ports.last) || !online {
		force = true
	}
	if !online {
		c.log.Info("relay online", "relay", node, "ports", fmt.Sprintf("%d-%d", ports.first, ports.last))
	}
	if force {
		c.pushRelayConfigLocked(node)
	}
}

// pushRelayConfigLocked sends relay its whole session set (feature "relay");
// rs.mu is held.
func (c *Controller) pushRelayConfigLocked(relay string) {
	cfg := &segmeshv1.RelayConfig{}
	for _, s := range c.relays.alloc.Sessions(relay) {
		cfg.Sessions = append(cfg.Sessions, &segmeshv1.RelaySession{
			Id: s.ID, KeyA: slices.Clone(s.A.Key[:]), KeyB: slices.Clone(s.B.Key[:]),
			PortA: uint32(s.PortA), PortB: uint32(s.PortB), ExpiresUnix: s.Expires.Unix(),
		})
	}
	if !c.push(relay, featureRelay, &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Relay{Relay: cfg}}) {
		c.log.Debug("relay config not delivered: no stream with the relay feature", "relay", relay, "sessions", len(cfg.Sessions))
	}
}

// pushRelayConfigsLocked pushes each of relays its session set; rs.mu is held.
func (c *Controller) pushRelayConfigsLocked(relays []string) {
	for _, r := range relays {
		c.pushRelayConfigLocked(r)
	}
}

// relaySweep removes expired sessions and pushes the relays whose set changed.
func (c *Controller) relaySweep() {
	rs := c.relays
	rs.mu.Lock()
	defer rs.mu.Unlock()
	c.pushRelayConfigsLocked(rs.alloc.Expire())
}

// relaySweepLoop runs relaySweep every relaySweepInterval until ctx is done.
func (c *Controller) relaySweepLoop(ctx context.Context) {
	t := time.NewTicker(relaySweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.relaySweep()
		}
	}
}

// relaysPolicyChanged brings every relay's role and sessions up to date with a
// new policy in force: relays it no longer names are dropped, relays it names
// now are added, and sessions it no longer authorises are removed.
func (c *Controller) relaysPolicyChanged() {
	rs := c.relays
	rs.mu.Lock()
	defer rs.mu.Unlock()
	for _, node := range slices.Sorted(maps.Keys(rs.streams)) {
		c.refreshRelayLocked(node, false)
	}
	var sessions []relays.Session
	for _, r := range rs.alloc.Relays() {
		sessions = append(sessions, rs.alloc.Sessions(r)...)
	}
	c.pruneRelaysLocked(sessions)
}

// relaysNodesChanged removes the sessions of names (whose records changed) that
// are no longer authorised (a revoked or deleted relay loses its role when its
// streams end). It is cheap for nodes without sessions. The caller updated the
// engine first.
func (c *Controller) relaysNodesChanged(names []string) {
	rs := c.relays
	// Under the lock, always: a RequestRelay that checked the pair under the old
	// inventory and has not allocated yet holds it, and its session must be seen.
	rs.mu.Lock()
	defer rs.mu.Unlock()
	var sessions []relays.Session
	for _, n := range names {
		sessions = append(sessions, rs.alloc.Of(n)...)
	}
	c.pruneRelaysLocked(sessions)
}

// pruneRelaysLocked drops each of sessions that is no longer authorised (see
// relayAuthorised) and pushes the relays whose set changed; rs.mu is held.
func (c *Controller) pruneRelaysLocked(sessions []relays.Session) {
	if len(sessions) == 0 {
		return
	}
	recs := map[string]store.Node{}
	err := c.store.View(func(tx store.Tx) error {
		for _, s := range sessions {
			for _, name := range []string{s.A.Name, s.B.Name} {
				if _, ok := recs[name]; ok {
					continue
				}
				n, _, err := tx.Node(name)
				if err != nil {
					return err
				}
				recs[name] = n // zero when missing
			}
		}
		return nil
	})
	if err != nil {
		c.log.Error("checking relay sessions: reading nodes; they stay until they expire", "err", err)
		return
	}
	var changed []string
	for _, s := range sessions {
		if c.relayAuthorised(s.Relay, recs[s.A.Name], recs[s.B.Name], s.A.Key, s.B.Key) {
			continue
		}
		if r, ok := c.relays.alloc.Drop(s.ID); ok {
			c.log.Info("relay session dropped: no longer authorised", "relay", r, "a", s.A.Name, "b", s.B.Name, "id", s.ID)
			if !slices.Contains(changed, r) {
				changed = append(changed, r)
			}
		}
	}
	c.pushRelayConfigsLocked(changed)
}

// relayAuthorised reports whether relay may forward between nodes a and b with
// the WireGuard keys ka and kb: both active with those keys, connected by the
// policy, and relay one the policy lets both use.
func (c *Controller) relayAuthorised(relay string, a, b store.Node, ka, kb [32]byte) bool {
	return a.Name != "" && b.Name != "" && !a.Revoked() && !b.Revoked() &&
		string(a.PublicKey) == string(ka[:]) && string(b.PublicKey) == string(kb[:]) &&
		c.isPeer(a.Name, b.Name) && slices.Contains(c.engine.RelaysFor(a.Name, b.Name), relay)
}

// isPeer reports whether node's netmap lists peer.
func (c *Controller) isPeer(node, peer string) bool {
	_, ok := c.engine.Peer(node, peer)
	return ok
}

// party returns n as a session end.
func party(n store.Node) relays.Party {
	p := relays.Party{Name: n.Name}
	copy(p.Key[:], n.PublicKey)
	return p
}

// relayAddr returns the address peers reach relay node n at: the IP of its
// "stun" candidate, else of its "observed" one, else of its endpoint.
func relayAddr(n store.Node) (netip.Addr, bool) {
	for _, kind := range []string{candidateSTUN, candidateObserved} {
		for _, cand := range n.Candidates {
			if cand.Kind != kind {
				continue
			}
			if ap, err := netip.ParseAddrPort(cand.Endpoint); err == nil {
				return ap.Addr().Unmap(), true
			}
		}
	}
	ap, err := netip.ParseAddrPort(n.Endpoint)
	if err != nil {
		return netip.Addr{}, false
	}
	return ap.Addr().Unmap(), true
}

// RequestRelay implements AgentService.RequestRelay: a relay session between the
// caller N and peer P: an existing session of the pair on a relay still
// available to both is renewed, else one on the available relay the policy
// lets both use with the fewest sessions. N gets its
// relay candidate in the response, P its own in a Punch (feature "punch"), the
// relay its session set. Errors: ResourceExhausted past the caller's rate
// (relayRequestRate, burst relayRequestBurst) or when no relay has room;
// FailedPrecondition when P is not in N's netmap, is offline or its agent does
// not take punches, or when no relay both may use is online.
func (s *agentService) RequestRelay(ctx context.Context, req *connect.Request[segmeshv1.RequestRelayRequest]) (*connect.Response[segmeshv1.RequestRelayResponse], error) {
	c := s.c
	node, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	resp, result, err := c.requestRelay(node.Name, req.Msg.GetPeer())
	c.metrics.relayRequest(result)
	if err != nil {
		c.log.Debug("relay request refused", "node", node.Name, "peer", reportedText(req.Msg.GetPeer(), 64), "result", result, "err", err)
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

// requestRelay is RequestRelay for the authenticated node name; it returns the
// metric result with the response or the error.
func (c *Controller) requestRelay(name, peer string) (*segmeshv1.RequestRelayResponse, string, error) {
	rs := c.relays
	if !rs.requests.allow(name, c.now()) {
		return nil, relayLimited, connect.NewError(connect.CodeResourceExhausted, errors.New("relay requests too often; retry in a second"))
	}
	rs.mu.Lock()
	defer rs.mu.Unlock()
	if !c.isPeer(name, peer) {
		return nil, relayNotPeer, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("peer %q is not in your netmap", reportedText(peer, 64)))
	}
	if online, features := c.live.online(peer); !online || !slices.Contains(features, featurePunch) {
		return nil, relayOffline, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("peer %q is offline or its agent does not take relay candidates", peer))
	}
	var candidates []string
	for _, r := range c.engine.RelaysFor(name, peer) {
		if rs.alloc.Online(r) {
			candidates = append(candidates, r)
		}
	}
	if len(candidates) == 0 {
		return nil, relayNoRelay, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("no relay the policy lets %s and %s both use is online", name, peer))
	}
	// The relay the pair already has a session on first (asking again renews
	// it there, rather than taking one more session of both ends' budgets on
	// another relay and moving the pair), then fewest sessions; policy order
	// among equals.
	onPair := map[string]bool{}
	for _, s := range rs.alloc.Of(name) {
		if s.A.Name == peer || s.B.Name == peer {
			onPair[s.Relay] = true
		}
	}
	slices.SortStableFunc(candidates, func(x, y string) int {
		if onPair[x] != onPair[y] {
			if onPair[x] {
				return -1
			}
			return 1
		}
		return rs.alloc.Count(x) - rs.alloc.Count(y)
	})

	recs := map[string]store.Node{}
	err := c.store.View(func(tx store.Tx) error {
		for _, n := range append([]string{name, peer}, candidates...) {
			rec, ok, err := tx.Node(n)
			if err != nil {
				return err
			}
			if ok && !rec.Revoked() {
				recs[n] = rec
			}
		}
		return nil
	})
	if err != nil {
		return nil, relayError, internalOr("reading the nodes of a relay request", err)
	}
	me, them := recs[name], recs[peer]
	if me.Name == "" || them.Name == "" {
		return nil, relayNotPeer, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("peer %q is not in your netmap", peer))
	}
	var errs []error
	for _, r := range candidates {
		addr, ok := relayAddr(recs[r])
		if !ok {
			errs = append(errs, fmt.Errorf("relay %s: no known address", r))
			continue
		}
		sess, err := rs.alloc.Allocate(r, party(me), party(them))
		if errors.Is(err, relays.ErrNodeCap) {
			return nil, relayExhausted, connect.NewError(connect.CodeResourceExhausted, err)
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		mine, _ := sess.PortFor(name)
		theirs, _ := sess.PortFor(peer)
		punch := &segmeshv1.Punch{Peer: name, PublicKey: slices.Clone(me.PublicKey), Candidates: []*segmeshv1.Candidate{
			{Endpoint: netip.AddrPortFrom(addr, theirs).String(), Kind: candidateRelay, Relay: r}}}
		c.pushRelayConfigLocked(r) // first: the peer may send at once
		if !c.push(peer, featurePunch, &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Punch{Punch: punch}}) {
			c.log.Debug("relay candidate not delivered to the peer", "node", name, "peer", peer, "relay", r)
		}
		c.log.Info("relay session", "relay", r, "a", sess.A.Name, "b", sess.B.Name, "id", sess.ID, "expires", sess.Expires)
		return &segmeshv1.RequestRelayResponse{
			Candidate:   &segmeshv1.Candidate{Endpoint: netip.AddrPortFrom(addr, mine).String(), Kind: candidateRelay, Relay: r},
			ExpiresUnix: sess.Expires.Unix(),
		}, relayOK, nil
	}
	return nil, relayExhausted, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("no relay for %s and %s has room: %w", name, peer, errors.Join(errs...)))
}
