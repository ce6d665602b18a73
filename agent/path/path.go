// Package path chooses, for every WireGuard peer, the endpoint the agent sends
// to: one of the peer's direct candidates (local addresses, the address the
// controller observes, the STUN mapping of its WireGuard port) when one
// answers, else a relay the controller authorised for the pair.
//
// The method is that of ICE (RFC 8445) reduced to what WireGuard needs:
//
//   - Connectivity checks. With embedded wireguard-go the agent sends a STUN
//     Binding request from its WireGuard socket to every direct candidate at
//     once (Options.Probe, see agent/dataplane/stunbind); the peer's socket
//     answers. The first candidate in preference order that answers becomes the
//     path: candidates come best first (local, observed, STUN), so a LAN path
//     beats a NAT path. Sending the check also opens this host's NAT towards the
//     candidate.
//   - Hole punching. When no candidate answers, the agent asks the controller
//     to make both ends send to each other at once (Options.RequestPunch; the
//     peer gets a Punch and probes back, Selector.Punch), and checks again every
//     second.
//   - Relay fallback. After Options.FallbackAfter without an answer the agent
//     asks for a relay session (Options.RequestRelay) and sends to the relay's
//     port; the peer was told the other port by the controller (Selector.Punch
//     with a relay candidate). A relay path is renewed at half its lifetime, and
//     direct candidates are checked every Options.DirectRetry: the first answer
//     moves the peer back to direct.
//   - Without connectivity checks (kernel WireGuard cannot share its socket),
//     the path is the peer's first candidate while the peer's WireGuard
//     handshakes are fresh; otherwise each candidate is tried for
//     Options.HandshakeTrial, then the relay.
//
// A candidate that is one of this host's own endpoints is never used (it would
// answer its own check). A peer's private (RFC 1918, RFC 6598, ULA) local
// candidates are used only when the peer shares this host's public address (the
// same NAT) or when either side has no known public address: the same private
// address on another site is another host, which would answer the check and
// then never complete a handshake.
//
// The Selector never adds a peer: it only chooses among the endpoints the netmap
// (and gossip, through the caller) gave for peers the netmap lists.
package path

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"segmesh/agent/dataplane"
	"segmesh/agent/netmap"
)

// Path kinds, as reported in segmesh.v1.PeerStatus.path.
const (
	Direct = "direct"
	Relay  = "relay"
)

// Defaults for Options.
const (
	DefaultFallbackAfter  = 5 * time.Second
	DefaultDirectRetry    = 30 * time.Second
	DefaultHandshakeTrial = 6 * time.Second
	// DefaultProbeTimeout bounds one connectivity check (stunbind retransmits at
	// 0, 250 ms, 750 ms and 1.75 s within it).
	DefaultProbeTimeout = 2500 * time.Millisecond
	// punchEvery is the least time between two punch requests for one peer.
	punchEvery = 10 * time.Second
	// relayRetry is the least time between two failed relay requests for one peer.
	relayRetry = 10 * time.Second
	// failRetry is the time between connectivity checks while a peer has no path
	// and is still within FallbackAfter.
	failRetry = time.Second
	// handshakeFresh is how recent a handshake must be to prove the path in use
	// (WireGuard rekeys every 2 minutes while persistent keepalives flow).
	handshakeFresh = 150 * time.Second
	// maxRounds is the most connectivity-check rounds in flight.
	maxRounds = 16
	// preferWait is how long a round waits, after a candidate answered, for
	// better ones still in flight.
	preferWait = 200 * time.Millisecond
	// tick is how often Run looks for due rounds.
	tick = 250 * time.Millisecond
	// dudFor is how long a candidate that answers checks but on which WireGuard
	// did not handshake for handshakeFresh is left out (unless the peer's
	// candidates change first).
	dudFor = 10 * time.Minute
)

// ErrOffline is what RequestPunch returns (wrapped) when the controller says
// the peer is not connected: no relay is asked for such a peer.
var ErrOffline = errors.New("peer is offline")

// Peer is one peer as the netmap and gossip describe it.
type Peer struct {
	Key  dataplane.Key
	Name string
	// Candidates are the peer's direct endpoints, best first (the caller puts the
	// endpoint of a verified gossip claim first, then the netmap's candidates and
	// endpoint); relay candidates here are offers like those of Punch.
	Candidates []netmap.Candidate
}

// Path is the endpoint chosen for a peer.
type Path struct {
	Endpoint netip.AddrPort
	// Kind is Direct or Relay; empty while nothing was chosen (Endpoint is then
	// the peer's first candidate, unproven).
	Kind string
	// Candidate is the kind of the chosen candidate (netmap.Candidate*).
	Candidate string
	// Relay is the relay node's name for Kind Relay.
	Relay string
}

// Device is what the WireGuard device holds for a peer.
type Device struct {
	// Endpoint is where the device sends now: the one configured, or the source
	// of the peer's latest authenticated packet (WireGuard roaming).
	Endpoint netip.AddrPort
	// LastHandshake is the latest completed handshake; zero for none.
	LastHandshake time.Time
}

// CandidateHandshake is the Path.Candidate of a direct path that WireGuard
// proved (an endpoint the device learned from the peer's authenticated
// packets, such as a mapping of a NAT that maps per destination) where no
// connectivity check answered.
const CandidateHandshake = "handshake"

// Options configure a Selector. Zero durations take the defaults.
type Options struct {
	// Probe sends a connectivity check to dst from the WireGuard socket and
	// returns when dst answered (nil) or ctx ended. Nil when the socket cannot
	// carry one (kernel WireGuard).
	Probe func(ctx context.Context, dst netip.AddrPort) error
	// Device returns what the WireGuard device holds for every peer: its
	// endpoint now and its latest handshake.
	Device func() map[dataplane.Key]Device
	// RequestPunch asks the controller to make the peer send to this node now;
	// nil disables hole punching.
	RequestPunch func(ctx context.Context, peer string) error
	// RequestRelay asks the controller for a relay session with the peer and
	// returns this node's relay candidate and when the session ends; nil
	// disables relays.
	RequestRelay                                             func(ctx context.Context, peer string) (netmap.Candidate, time.Time, error)
	FallbackAfter, DirectRetry, HandshakeTrial, ProbeTimeout time.Duration
	Now                                                      func() time.Time
	Logger                                                   *slog.Logger
}

// Selector holds the path of every peer. Use New; all methods are safe for
// concurrent use.
type Selector struct {
	o       Options
	log     *slog.Logger
	changed chan struct{}
	sem     chan struct{}
	bg      sync.WaitGroup // rounds and requests in flight

	mu    sync.Mutex
	self  []netip.AddrPort // this host's own endpoints (local, STUN)
	pub   netip.Addr       // this host's public address (its STUN mapping), if known
	peers map[dataplane.Key]*peer
}

// offer is a relay candidate and when its session ends.
type offer struct {
	c       netmap.Candidate
	got     time.Time
	expires time.Time
}

type peer struct {
	Peer
	punched []netmap.Candidate // direct candidates from the latest Punch
	relay   *offer
	path    Path
	// failingSince is when the checks stopped answering; zero while a direct
	// path answers (or before the first round).
	failingSince time.Time
	next         time.Time // when the next round is due
	running      bool      // a round is in flight
	// gen counts changes of what a round checks (candidates, punches, this
	// host's endpoints); a round that started before the latest is discarded.
	gen        uint64
	checkedGen uint64 // gen of the latest round that finished
	punchAsked time.Time
	relayAsked time.Time
	offline    bool
	// trial is the candidate index tried by handshake (no Probe), and since when.
	trial      int
	trialSince time.Time
	// directSince is when a check made the direct path what it is.
	directSince time.Time
	// duds are candidates that answer checks but WireGuard does not handshake
	// on (something else speaks STUN there), left out until the time given.
	duds map[netip.AddrPort]time.Time
}

// New returns a Selector with no peers.
func New(o Options) *Selector {
	if o.FallbackAfter <= 0 {
		o.FallbackAfter = DefaultFallbackAfter
	}
	if o.DirectRetry <= 0 {
		o.DirectRetry = DefaultDirectRetry
	}
	if o.HandshakeTrial <= 0 {
		o.HandshakeTrial = DefaultHandshakeTrial
	}
	if o.ProbeTimeout <= 0 {
		o.ProbeTimeout = DefaultProbeTimeout
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Device == nil {
		o.Device = func() map[dataplane.Key]Device { return nil }
	}
	return &Selector{o: o, log: o.Logger, changed: make(chan struct{}, 1), sem: make(chan struct{}, maxRounds), peers: map[dataplane.Key]*peer{}}
}

// Changed is signalled (coalesced) whenever a peer's path changed.
func (s *Selector) Changed() <-chan struct{} { return s.changed }

func (s *Selector) signal() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// SetSelf sets this host's own endpoints (never used as a peer's) and its public
// address (its STUN mapping; invalid when unknown).
func (s *Selector) SetSelf(own []netip.AddrPort, public netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if slices.Equal(s.self, own) && s.pub == public {
		return
	}
	s.self = slices.Clone(own)
	s.pub = public
	for _, p := range s.peers {
		p.next = time.Time{}
		p.gen++
	}
}

// SetPeers replaces the peers. A peer whose candidates changed is checked at
// once; a peer that is no longer listed is forgotten with its relay offer.
func (s *Selector) SetPeers(peers []Peer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	keep := make(map[dataplane.Key]bool, len(peers))
	changed := false
	for _, in := range peers {
		keep[in.Key] = true
		p, ok := s.peers[in.Key]
		if !ok {
			p = &peer{}
			s.peers[in.Key] = p
		}
		var direct []netmap.Candidate
		for _, c := range in.Candidates {
			if c.Kind == netmap.CandidateRelay {
				p.relay = &offer{c: c, got: s.o.Now(), expires: s.o.Now().Add(10 * time.Minute)}
				continue
			}
			direct = append(direct, c)
		}
		in.Candidates = direct
		if ok && p.Name == in.Name && slices.Equal(p.Candidates, in.Candidates) {
			continue
		}
		p.Peer = in
		p.punched = nil // the netmap is newer
		p.next = time.Time{}
		p.gen++
		p.trial, p.trialSince = 0, time.Time{}
		p.duds = nil
		if p.path.Kind == Direct && !slices.ContainsFunc(s.usable(p), func(c netmap.Candidate) bool { return c.Endpoint == p.path.Endpoint }) {
			p.path = Path{}
		}
		changed = true
	}
	for k := range s.peers {
		if !keep[k] {
			delete(s.peers, k)
			changed = true
		}
	}
	if changed {
		s.signal()
	}
}

// Punch records what the controller's Punch for a peer carried: direct
// candidates are checked at once; a relay candidate becomes the peer's relay
// offer and, unless a direct path answers, its path now. Punches for keys that
// are not peers are ignored.
func (s *Selector) Punch(k dataplane.Key, cands []netmap.Candidate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.peers[k]
	if !ok {
		return
	}
	now := s.o.Now()
	p.punched = p.punched[:0]
	for _, c := range cands {
		if c.Kind == netmap.CandidateRelay {
			p.relay = &offer{c: c, got: now, expires: now.Add(10 * time.Minute)}
			continue
		}
		p.punched = append(p.punched, c)
	}
	p.offline = false
	p.next = time.Time{}
	p.gen++
	if p.relay != nil && p.path.Kind != Direct {
		s.setPath(p, Path{Endpoint: p.relay.c.Endpoint, Kind: Relay, Candidate: netmap.CandidateRelay, Relay: p.relay.c.Relay})
	}
}

// Paths returns the path of every peer: the chosen one, or the first usable
// candidate (Kind empty) before any choice; peers without any are left out.
func (s *Selector) Paths() map[dataplane.Key]Path {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[dataplane.Key]Path, len(s.peers))
	for k, p := range s.peers {
		if p.path.Endpoint.IsValid() {
			out[k] = p.path
		} else if c := s.usable(p); len(c) > 0 {
			out[k] = Path{Endpoint: c[0].Endpoint, Candidate: c[0].Kind}
		}
	}
	return out
}

// Endpoints is Paths reduced to the endpoints (the reconciler's overrides).
func (s *Selector) Endpoints() map[dataplane.Key]netip.AddrPort {
	ps := s.Paths()
	out := make(map[dataplane.Key]netip.AddrPort, len(ps))
	for k, p := range ps {
		out[k] = p.Endpoint
	}
	return out
}

// usable returns p's direct candidates (punched ones first) without this host's
// own endpoints, without private local addresses of another site and without
// its duds. s.mu held.
func (s *Selector) usable(p *peer) []netmap.Candidate {
	var peerPub netip.Addr
	for _, c := range slices.Concat(p.punched, p.Candidates) {
		if c.Kind == netmap.CandidateSTUN || c.Kind == netmap.CandidateObserved {
			peerPub = c.Endpoint.Addr()
			break
		}
	}
	otherSite := s.pub.IsValid() && peerPub.IsValid() && s.pub != peerPub
	now := s.o.Now()
	var out []netmap.Candidate
	for _, c := range slices.Concat(p.punched, p.Candidates) {
		switch {
		case slices.Contains(s.self, c.Endpoint):
		case now.Before(p.duds[c.Endpoint]):
		case c.Kind == netmap.CandidateLocal && otherSite && private(c.Endpoint.Addr()):
		case slices.ContainsFunc(out, func(o netmap.Candidate) bool { return o.Endpoint == c.Endpoint }):
		default:
			out = append(out, c)
		}
	}
	return out
}

var cgnat = netip.MustParsePrefix("100.64.0.0/10")

// private reports addresses that several sites use for different hosts.
func private(a netip.Addr) bool { return a.IsPrivate() || cgnat.Contains(a) }

// setPath changes p's path and logs and signals the change. s.mu held.
func (s *Selector) setPath(p *peer, np Path) {
	if p.path == np {
		return
	}
	s.log.Info("peer path", "peer", p.Name, "path", np.Kind, "endpoint", np.Endpoint, "candidate", np.Candidate, "relay", np.Relay, "was", p.path.Endpoint)
	p.path = np
	s.signal()
}

// Run checks paths until ctx ends, and returns when its rounds and requests
// have ended.
func (s *Selector) Run(ctx context.Context) {
	t := time.NewTicker(tick)
	defer t.Stop()
	defer s.bg.Wait()
	for {
		s.step(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// step starts the rounds that are due. It reads the device only when one is.
func (s *Selector) step(ctx context.Context) {
	s.mu.Lock()
	now := s.o.Now()
	due := false
	for _, p := range s.peers {
		due = due || !p.running && !now.Before(p.next)
	}
	s.mu.Unlock()
	if !due {
		return
	}
	devs := s.o.Device()
	s.mu.Lock()
	defer s.mu.Unlock()
	now = s.o.Now()
	for k, p := range s.peers {
		if p.running || now.Before(p.next) {
			continue
		}
		if s.o.Probe == nil {
			s.trialStep(ctx, p, devs[k].LastHandshake, now)
			continue
		}
		if d := devs[k]; p.path.Kind == Direct && p.checkedGen == p.gen && d.Endpoint == p.path.Endpoint && now.Sub(d.LastHandshake) < handshakeFresh && p.failingSince.IsZero() {
			// WireGuard proves the direct path and nothing changed since the
			// last round; check again later.
			p.next = now.Add(s.o.DirectRetry)
			continue
		}
		cands := s.usable(p)
		if len(cands) == 0 && p.relay == nil && s.o.RequestRelay == nil {
			p.next = now.Add(s.o.DirectRetry)
			continue
		}
		select {
		case s.sem <- struct{}{}:
		default:
			continue // next tick
		}
		p.running = true
		gen, started := p.gen, now
		s.bg.Go(func() {
			defer func() { <-s.sem }()
			answered := s.probeAll(ctx, cands)
			dev := devs[k]
			s.mu.Lock()
			defer s.mu.Unlock()
			p.running = false
			switch cur, ok := s.peers[k]; {
			case !ok || cur != p || ctx.Err() != nil:
			case p.gen != gen:
				p.next = time.Time{} // checked what is no longer current: again
			default:
				p.checkedGen = gen
				s.finish(ctx, p, cands, answered, dev, started)
			}
		})
	}
}

// probeAll checks every candidate at once and returns the first one in cands
// order that answered (index -1: none). It returns as soon as that is known: a
// candidate answered and every better one failed, or preferWait passed since
// the first answer (a better candidate that answers later loses).
func (s *Selector) probeAll(ctx context.Context, cands []netmap.Candidate) int {
	if len(cands) == 0 {
		return -1
	}
	ctx, cancel := context.WithTimeout(ctx, s.o.ProbeTimeout)
	defer cancel()
	type result struct {
		i  int
		ok bool
	}
	results := make(chan result, len(cands))
	for i, c := range cands {
		go func() { results <- result{i, s.o.Probe(ctx, c.Endpoint) == nil} }()
	}
	done := make([]bool, len(cands))
	best := -1
	var grace <-chan time.Time
	for range cands {
		select {
		case r := <-results:
			done[r.i] = true
			if r.ok && (best < 0 || r.i < best) {
				best = r.i
				if grace == nil {
					grace = time.After(preferWait)
				}
			}
		case <-grace:
			return best
		}
		if best >= 0 && !slices.Contains(done[:best], false) {
			return best
		}
	}
	return best
}

// finish applies the outcome of a round that started at started. s.mu held.
func (s *Selector) finish(ctx context.Context, p *peer, cands []netmap.Candidate, answered int, dev Device, started time.Time) {
	now := s.o.Now()
	fresh := !dev.LastHandshake.IsZero() && now.Sub(dev.LastHandshake) < handshakeFresh
	if answered < 0 && fresh && dev.Endpoint.IsValid() && !(p.path.Kind == Relay && dev.Endpoint == p.path.Endpoint) &&
		(p.relay == nil || dev.Endpoint != p.relay.c.Endpoint) && !slices.Contains(s.self, dev.Endpoint) {
		// No check answered, but WireGuard handshakes with the peer at the
		// device's endpoint: the peer's NAT maps per destination, and the
		// peer's own packets opened the way. Keep what works.
		p.failingSince = time.Time{}
		s.setPath(p, Path{Endpoint: dev.Endpoint, Kind: Direct, Candidate: CandidateHandshake})
		p.next = now.Add(s.o.DirectRetry)
		return
	}
	if o := p.relay; o != nil && p.path.Kind == Relay && now.Sub(o.got) > handshakeFresh && !fresh {
		// The relay carries no handshakes (it went away): ask for another.
		s.log.Info("relay path without handshakes; asking for a new relay session", "peer", p.Name, "relay", o.c.Relay)
		p.relay = nil
	}
	if answered >= 0 && s.dud(p, cands[answered], dev, now) {
		answered = -1
	}
	if answered >= 0 {
		c := cands[answered]
		p.failingSince = time.Time{}
		p.offline = false
		np := Path{Endpoint: c.Endpoint, Kind: Direct, Candidate: c.Kind}
		if p.path != np {
			p.directSince = now
		}
		s.setPath(p, np)
		p.next = now.Add(s.o.DirectRetry)
		return
	}
	if p.failingSince.IsZero() {
		p.failingSince = started // FallbackAfter counts from the first check
		if p.path.Kind == Direct {
			p.path = Path{}
			s.signal()
		}
	}
	s.noDirect(ctx, p, now)
}

// dud reports whether c, which answered a check, is the direct path a check
// chose at least handshakeFresh ago without WireGuard handshaking there since: the
// check proves only that something there speaks STUN (a STUN server, another
// host that took the address over), not that the peer is there. A dud is left
// out for dudFor, or until the peer's candidates change. s.mu held.
func (s *Selector) dud(p *peer, c netmap.Candidate, dev Device, now time.Time) bool {
	if p.path.Kind != Direct || p.path.Endpoint != c.Endpoint || p.path.Candidate == CandidateHandshake ||
		now.Sub(p.directSince) < handshakeFresh || dev.Endpoint == c.Endpoint && dev.LastHandshake.After(p.directSince) {
		return false
	}
	s.log.Warn("peer candidate answers checks but WireGuard does not handshake there; leaving it out", "peer", p.Name, "endpoint", c.Endpoint, "for", dudFor)
	if p.duds == nil {
		p.duds = map[netip.AddrPort]time.Time{}
	}
	p.duds[c.Endpoint] = now.Add(dudFor)
	return true
}

// noDirect is the next step for a peer no direct candidate answers for: punch,
// then relay. s.mu held.
func (s *Selector) noDirect(ctx context.Context, p *peer, now time.Time) {
	if s.o.RequestPunch != nil && now.Sub(p.punchAsked) >= punchEvery {
		p.punchAsked = now
		s.async(ctx, func(ctx context.Context) {
			err := s.o.RequestPunch(ctx, p.Name)
			if err != nil {
				s.log.Debug("asking for a punch", "peer", p.Name, "err", err)
			}
			s.mu.Lock()
			p.offline = errors.Is(err, ErrOffline)
			s.mu.Unlock()
		})
	}
	if now.Sub(p.failingSince) < s.o.FallbackAfter {
		p.next = now.Add(failRetry)
		return
	}
	p.next = now.Add(s.o.DirectRetry)
	if o := p.relay; o != nil && now.Before(o.expires) {
		s.setPath(p, Path{Endpoint: o.c.Endpoint, Kind: Relay, Candidate: netmap.CandidateRelay, Relay: o.c.Relay})
	}
	s.renewRelay(ctx, p, now)
}

// renewRelay asks for a relay session when p has none, or at half the life of
// the one it has. s.mu held.
func (s *Selector) renewRelay(ctx context.Context, p *peer, now time.Time) {
	if o := p.relay; o != nil && now.Before(o.expires) && now.Sub(o.got) < o.expires.Sub(now) {
		return
	}
	if s.o.RequestRelay == nil || p.offline || now.Sub(p.relayAsked) < relayRetry {
		return
	}
	p.relayAsked = now
	s.async(ctx, func(ctx context.Context) {
		c, exp, err := s.o.RequestRelay(ctx, p.Name)
		s.mu.Lock()
		defer s.mu.Unlock()
		if err != nil {
			s.log.Info("no relay for a peer without a direct path", "peer", p.Name, "err", err)
			return
		}
		p.relay = &offer{c: c, got: s.o.Now(), expires: exp}
		if p.path.Kind != Direct {
			s.setPath(p, Path{Endpoint: c.Endpoint, Kind: Relay, Candidate: netmap.CandidateRelay, Relay: c.Relay})
		}
	})
}

// trialStep is one step of choosing by handshake, without connectivity checks
// (kernel WireGuard): the path in use stands while its handshakes are fresh;
// otherwise each candidate gets HandshakeTrial, then the relay. s.mu held.
func (s *Selector) trialStep(ctx context.Context, p *peer, last time.Time, now time.Time) {
	cands := s.usable(p)
	if !last.IsZero() && now.Sub(last) < handshakeFresh {
		if p.path.Kind == "" {
			np := p.path
			if !np.Endpoint.IsValid() && len(cands) > 0 {
				np = Path{Endpoint: cands[0].Endpoint, Candidate: cands[0].Kind}
			}
			if np.Endpoint.IsValid() {
				np.Kind = Direct
				s.setPath(p, np)
			}
		}
		if p.path.Kind == Relay {
			s.renewRelay(ctx, p, now)
		} else {
			p.failingSince = time.Time{}
		}
		p.trialSince = time.Time{}
		p.next = now.Add(s.o.DirectRetry)
		return
	}
	switch {
	case p.trialSince.IsZero():
		p.trialSince = now
	case now.Sub(p.trialSince) >= s.o.HandshakeTrial:
		p.trialSince = now
		if p.path.Kind != Relay {
			p.trial++
		}
		if p.trial < len(cands) {
			s.setPath(p, Path{Endpoint: cands[p.trial].Endpoint, Candidate: cands[p.trial].Kind})
			break
		}
		p.trial = 0
		if p.failingSince.IsZero() {
			p.failingSince = now.Add(-s.o.FallbackAfter)
		}
		s.noDirect(ctx, p, now)
	}
	p.next = p.trialSince.Add(s.o.HandshakeTrial)
}

// async runs f off the lock, bounded by the round semaphore's ctx.
func (s *Selector) async(ctx context.Context, f func(ctx context.Context)) {
	s.bg.Go(func() {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		f(ctx)
	})
}
