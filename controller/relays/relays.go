// Package relays allocates relay sessions for the controller (issue 10): for a
// pair of nodes that cannot reach each other directly, two UDP ports on a relay
// node, like a TURN allocation (RFC 8656), that the relay forwards WireGuard
// packets between (see agent/relay for the forwarding side and
// api/segmesh/v1 RelaySession for the wire form).
//
// The package is pure bookkeeping: it knows which relays are online with which
// port range, which sessions each holds and until when. Who may use which relay
// is decided by the caller (policy.Program.RelaysFor); pushing a relay its
// session set is the caller's job too, after every call that reports or implies
// a change (Allocate, Expire, DropNode, SetRelay, RemoveRelay).
//
// An Allocator is safe for concurrent use.
package relays

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Defaults and limits of Options and ParsePorts.
const (
	DefaultTTL         = 10 * time.Minute
	DefaultMaxPerNode  = 64
	DefaultMaxPerRelay = 1024 // agent/relay's default MaxSessions
	// MinPort is the lowest port a relay range may start at (no privileged ports).
	MinPort = 1024
)

// Errors of Allocate.
var (
	// ErrUnknownRelay: the relay is not online (no SetRelay, or RemoveRelay since).
	ErrUnknownRelay = errors.New("relay not online")
	// ErrNoPorts: the relay has fewer than two free ports, or MaxPerRelay sessions.
	ErrNoPorts = errors.New("relay has no free ports")
	// ErrNodeCap: one of the two ends already has MaxPerNode sessions (all relays).
	ErrNodeCap = errors.New("node has too many relay sessions")
	// ErrInvalidPair: the two ends are the same node, or one of them is the relay.
	ErrInvalidPair = errors.New("invalid relay pair")
)

// ParsePorts parses a relay port range "first-last" (inclusive, decimal, as in
// api SyncRequest.relay_ports), e.g. "40000-40999". The range must lie within
// MinPort..65535 and hold at least two ports (one session). Errors name the
// offending part.
func ParsePorts(s string) (first, last uint16, err error) {
	lo, hi, ok := strings.Cut(strings.TrimSpace(s), "-")
	if !ok {
		return 0, 0, fmt.Errorf("relay ports %q: want first-last, e.g. 40000-40999", s)
	}
	f, err := parsePort(lo)
	if err != nil {
		return 0, 0, fmt.Errorf("relay ports %q: first: %w", s, err)
	}
	l, err := parsePort(hi)
	if err != nil {
		return 0, 0, fmt.Errorf("relay ports %q: last: %w", s, err)
	}
	if l <= f {
		return 0, 0, fmt.Errorf("relay ports %q: last must be greater than first (a session needs two ports)", s)
	}
	return f, l, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	if err != nil {
		return 0, fmt.Errorf("port %q: want a number %d-65535", s, MinPort)
	}
	if n < MinPort {
		return 0, fmt.Errorf("port %d: below %d", n, MinPort)
	}
	return uint16(n), nil
}

// Party is one end of a session: a node's name and WireGuard public key.
type Party struct {
	Name string
	Key  [32]byte
}

// Session is one authorised pair on one relay. A sends its WireGuard packets
// for B to Relay:PortA and B sends to Relay:PortB. Expires is when the relay
// stops forwarding unless Allocate renews it.
type Session struct {
	ID           uint64 // unique in the Allocator, increasing in allocation order
	Relay        string
	A, B         Party
	PortA, PortB uint16
	Expires      time.Time
}

// PortFor returns the relay port the end named name sends to (PortA for A,
// PortB for B); false when name is neither end.
func (s Session) PortFor(name string) (uint16, bool) {
	switch name {
	case s.A.Name:
		return s.PortA, true
	case s.B.Name:
		return s.PortB, true
	}
	return 0, false
}

// same reports whether a and b are the session's ends, in either order.
func (s *Session) same(a, b Party) bool {
	return (s.A == a && s.B == b) || (s.A == b && s.B == a)
}

// Options configure an Allocator. Zero values take the defaults.
type Options struct {
	// TTL is how long a session lives after Allocate; default DefaultTTL.
	TTL time.Duration
	// MaxPerNode is the most unexpired sessions one node may be an end of,
	// across all relays; default DefaultMaxPerNode.
	MaxPerNode int
	// MaxPerRelay is the most sessions one relay holds; default DefaultMaxPerRelay.
	MaxPerRelay int
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// Allocator keeps the online relays and their sessions.
type Allocator struct {
	opts Options

	mu     sync.Mutex
	lastID uint64
	relays map[string]*relay
	// byNode indexes sessions by end name, for the per-node cap and DropNode.
	byNode map[string]map[uint64]*Session
}

// relay is one online relay: its port range and sessions.
type relay struct {
	first, last uint16
	sessions    map[uint64]*Session
	used        map[uint16]bool
	// next is where the search for a free port starts, so that a freed port is
	// reused as late as possible (stale packets of an old session do not reach
	// a new one).
	next uint16
}

func (r *relay) inRange(p uint16) bool { return p >= r.first && p <= r.last }

// free returns the number of free ports.
func (r *relay) free() int {
	if r.last < r.first {
		return 0
	}
	return int(r.last-r.first) + 1 - len(r.used)
}

// take marks and returns a free port, searching from next (the caller checked
// free() > 0).
func (r *relay) take() uint16 {
	p := r.next
	for {
		if !r.inRange(p) {
			p = r.first
		}
		if !r.used[p] {
			r.used[p] = true
			r.next = p + 1
			return p
		}
		p++
	}
}

// New returns an empty Allocator (no relay online).
func New(opts Options) *Allocator {
	if opts.TTL <= 0 {
		opts.TTL = DefaultTTL
	}
	if opts.MaxPerNode <= 0 {
		opts.MaxPerNode = DefaultMaxPerNode
	}
	if opts.MaxPerRelay <= 0 {
		opts.MaxPerRelay = DefaultMaxPerRelay
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Allocator{
		opts:   opts,
		relays: map[string]*relay{},
		byNode: map[string]map[uint64]*Session{},
	}
}

// TTL returns the session lifetime in force.
func (a *Allocator) TTL() time.Duration { return a.opts.TTL }

// SetRelay marks relay name online with ports first..last (inclusive, as
// ParsePorts returns). For a relay already online with another range, the
// sessions whose ports fall outside the new range are removed; it reports
// whether any was.
func (a *Allocator) SetRelay(name string, first, last uint16) (changed bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.relays[name]
	if r == nil {
		a.relays[name] = &relay{first: first, last: last, next: first,
			sessions: map[uint64]*Session{}, used: map[uint16]bool{}}
		return false
	}
	r.first, r.last = first, last
	for _, s := range r.sessions {
		if !r.inRange(s.PortA) || !r.inRange(s.PortB) {
			a.remove(r, s)
			changed = true
		}
	}
	return changed
}

// RemoveRelay marks relay name offline and drops its sessions; it reports
// whether the relay was online.
func (a *Allocator) RemoveRelay(name string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.relays[name]
	if r == nil {
		return false
	}
	for _, s := range r.sessions {
		a.remove(r, s)
	}
	delete(a.relays, name)
	return true
}

// Online reports whether relay name is online (SetRelay without RemoveRelay).
func (a *Allocator) Online(name string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.relays[name] != nil
}

// Relays returns the names of the online relays, sorted.
func (a *Allocator) Relays() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	names := make([]string, 0, len(a.relays))
	for n := range a.relays {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Allocate returns a session for the unordered pair a, b on relay. An unexpired
// session of the same relay and the same two parties (name and key, in either
// order) is renewed (Expires = now+TTL) and returned as it is, A and B as first
// allocated; otherwise a new one takes two free ports of the relay, A = a.
// Expired sessions of the relay are removed first.
//
// Errors: ErrInvalidPair, ErrUnknownRelay, ErrNoPorts, ErrNodeCap (wrapped with
// context; test with errors.Is).
func (a *Allocator) Allocate(relayName string, pa, pb Party) (Session, error) {
	if pa.Name == pb.Name || pa.Name == relayName || pb.Name == relayName {
		return Session{}, fmt.Errorf("relay %s for %s and %s: %w", relayName, pa.Name, pb.Name, ErrInvalidPair)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.relays[relayName]
	if r == nil {
		return Session{}, fmt.Errorf("relay %s: %w", relayName, ErrUnknownRelay)
	}
	now := a.opts.Now()
	a.expire(r, now)
	for _, s := range a.byNode[pa.Name] {
		if s.Relay == relayName && s.same(pa, pb) {
			s.Expires = now.Add(a.opts.TTL)
			return *s, nil
		}
	}
	for _, p := range []Party{pa, pb} {
		if n := a.live(p.Name, now); n >= a.opts.MaxPerNode {
			return Session{}, fmt.Errorf("node %s has %d sessions: %w", p.Name, n, ErrNodeCap)
		}
	}
	if len(r.sessions) >= a.opts.MaxPerRelay {
		return Session{}, fmt.Errorf("relay %s has %d sessions (the most): %w", relayName, len(r.sessions), ErrNoPorts)
	}
	if r.free() < 2 {
		return Session{}, fmt.Errorf("relay %s ports %d-%d: %w", relayName, r.first, r.last, ErrNoPorts)
	}
	a.lastID++
	s := &Session{ID: a.lastID, Relay: relayName, A: pa, B: pb,
		PortA: r.take(), PortB: r.take(), Expires: now.Add(a.opts.TTL)}
	r.sessions[s.ID] = s
	for _, p := range []Party{pa, pb} {
		m := a.byNode[p.Name]
		if m == nil {
			m = map[uint64]*Session{}
			a.byNode[p.Name] = m
		}
		m[s.ID] = s
	}
	return *s, nil
}

// live counts the unexpired sessions node is an end of.
func (a *Allocator) live(node string, now time.Time) int { return countLive(a.byNode[node], now) }

// countLive counts the sessions of m unexpired at now.
func countLive(m map[uint64]*Session, now time.Time) int {
	n := 0
	for _, s := range m {
		if now.Before(s.Expires) {
			n++
		}
	}
	return n
}

// Sessions returns relay's unexpired sessions by ID (nil for a relay not online).
func (a *Allocator) Sessions(relayName string) []Session {
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.relays[relayName]
	if r == nil {
		return nil
	}
	return liveSorted(r.sessions, a.opts.Now())
}

// Count returns the number of unexpired sessions of relay (0 when not online).
func (a *Allocator) Count(relayName string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.relays[relayName]
	if r == nil {
		return 0
	}
	return countLive(r.sessions, a.opts.Now())
}

// Total returns the number of unexpired sessions on all relays.
func (a *Allocator) Total() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.opts.Now()
	n := 0
	for _, r := range a.relays {
		n += countLive(r.sessions, now)
	}
	return n
}

// Of returns the unexpired sessions node is an end of, on every relay, by ID.
func (a *Allocator) Of(node string) []Session {
	a.mu.Lock()
	defer a.mu.Unlock()
	return liveSorted(a.byNode[node], a.opts.Now())
}

// liveSorted returns copies of the sessions of m unexpired at now, by ID.
func liveSorted(m map[uint64]*Session, now time.Time) []Session {
	out := make([]Session, 0, len(m))
	for _, s := range m {
		if now.Before(s.Expires) {
			out = append(out, *s)
		}
	}
	slices.SortFunc(out, func(x, y Session) int { return cmp.Compare(x.ID, y.ID) })
	return out
}

// Drop removes session id and returns its relay; false when there is none.
func (a *Allocator) Drop(id uint64) (relay string, ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for name, r := range a.relays {
		if s := r.sessions[id]; s != nil {
			a.remove(r, s)
			return name, true
		}
	}
	return "", false
}

// Expire removes the expired sessions (Expires at or before now) and returns
// the relays whose session set changed, sorted.
func (a *Allocator) Expire() (relays []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.opts.Now()
	for name, r := range a.relays {
		if a.expire(r, now) {
			relays = append(relays, name)
		}
	}
	slices.Sort(relays)
	return relays
}

// expire removes r's expired sessions; it reports whether there were any.
func (a *Allocator) expire(r *relay, now time.Time) bool {
	changed := false
	for _, s := range r.sessions {
		if !now.Before(s.Expires) {
			a.remove(r, s)
			changed = true
		}
	}
	return changed
}

// DropNode removes every session node is an end of (it was revoked, deleted or
// rotated its key) and returns the relays whose session set changed, sorted.
// The node's own relay role is RemoveRelay's.
func (a *Allocator) DropNode(node string) (relays []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, s := range a.byNode[node] {
		if r := a.relays[s.Relay]; r != nil {
			a.remove(r, s)
			if !slices.Contains(relays, s.Relay) {
				relays = append(relays, s.Relay)
			}
		}
	}
	slices.Sort(relays)
	return relays
}

// remove deletes s from r and from the node index, freeing its ports.
func (a *Allocator) remove(r *relay, s *Session) {
	delete(r.sessions, s.ID)
	delete(r.used, s.PortA)
	delete(r.used, s.PortB)
	for _, name := range []string{s.A.Name, s.B.Name} {
		m := a.byNode[name]
		delete(m, s.ID)
		if len(m) == 0 {
			delete(a.byNode, name)
		}
	}
}
