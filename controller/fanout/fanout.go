// Package fanout tells each node's open streams how that node's netmap changed.
//
// Publish hands every subscription of a changed node the Update (a delta from the
// previous netmap, shared by all) and wakes it with a non-blocking send on a
// one-slot channel, so a slow or stuck stream never blocks Publish or other
// streams. A subscription's stream then takes what piled up in one Next: the
// deltas composed into one (a burst coalesces), or the whole netmap when the node
// needs it (first message, a change without a delta, a gap) or when more than
// MaxPending changes piled up, which bounds the memory a stuck agent holds.
//
// Push queues an update that is not a netmap (a hole-punching request, a relay
// configuration) for the streams of one node whose agents understand it (the
// features they subscribed with), at most MaxPushed per stream.
package fanout

import (
	"fmt"
	"slices"
	"sync"

	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
	"segmesh/controller/netmap"
)

// MaxPushed is the number of out-of-band updates (Push) a subscription queues
// for its stream; past it, the oldest is dropped.
const MaxPushed = 64

// MaxPending is the number of changes a subscription keeps for its stream; past
// it, the stream gets the whole netmap instead.
const MaxPending = 64

// Source builds a node's current netmap and tells its version (see
// netmap.Engine.Netmap).
type Source interface {
	Netmap(node string) (*segmeshv1.Netmap, uint64, bool)
}

// Hub holds the latest hash of every node's netmap and the subscriptions. It is
// safe for concurrent use.
type Hub struct {
	src  Source
	mu   sync.Mutex
	hash map[string]Latest
	subs map[string]map[*Subscription]struct{}
}

// Latest is what the Hub knows about one node's current netmap.
type Latest struct {
	Hash     string
	Revision uint64
}

// New returns a Hub whose netmaps come from src; latest holds the current hash of
// every node's netmap.
func New(src Source, latest map[string]Latest) *Hub {
	return &Hub{src: src, hash: latest, subs: map[string]map[*Subscription]struct{}{}}
}

// Publish records updates (as returned by netmap.Engine, in order) and wakes the
// subscriptions of the nodes they name.
func (h *Hub) Publish(updates []netmap.Update) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i := range updates {
		u := &updates[i]
		if u.Removed {
			delete(h.hash, u.Node)
		} else {
			h.hash[u.Node] = Latest{Hash: u.Hash, Revision: u.Revision}
		}
		for s := range h.subs[u.Node] {
			if u.Removed {
				// A node of the same name may enroll later, its versions
				// counting from 1 again: nothing sent before applies to it.
				s.pending, s.needFull, s.reset = nil, true, true
			} else if s.deltas && !s.needFull {
				if len(s.pending) >= MaxPending {
					s.pending, s.needFull = nil, true
				} else {
					s.pending = append(s.pending, u)
				}
			}
			s.wakeUp()
		}
	}
}

// Latest returns the hash and policy revision of node's current netmap.
func (h *Hub) Latest(node string) (Latest, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	l, ok := h.hash[node]
	return l, ok
}

// All returns the latest hash of every node's netmap.
func (h *Hub) All() map[string]Latest {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make(map[string]Latest, len(h.hash))
	for k, v := range h.hash {
		out[k] = v
	}
	return out
}

// Subscribe registers a stream for node: with deltas, Next yields deltas after the
// first netmap; without, always whole netmaps. features name the kinds of
// out-of-band update the stream's agent understands (see Push). The
// subscription starts woken, so the first Next yields the current netmap. Close
// it when the stream ends.
func (h *Hub) Subscribe(node string, deltas bool, features ...string) *Subscription {
	s := &Subscription{hub: h, node: node, deltas: deltas, features: slices.Clone(features), wake: make(chan struct{}, 1)}
	s.wakeUp()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.subs[node] == nil {
		h.subs[node] = map[*Subscription]struct{}{}
	}
	h.subs[node][s] = struct{}{}
	return s
}

// Push queues u, an update that is not a netmap, for every subscription of node
// that lists feature, and wakes them; their streams take it with Pushed. A
// RelayConfig (a relay's whole session set) replaces a queued older one. A
// subscription that holds MaxPushed already drops its oldest queued update
// other than a RelayConfig (the queue holds at most one). It returns how many
// subscriptions queued u (0: the node has no stream that understands feature)
// and how many older updates were dropped for it (replaced RelayConfigs do
// not count).
func (h *Hub) Push(node, feature string, u *segmeshv1.NetmapUpdate) (queued, dropped int) {
	isRelay := func(u *segmeshv1.NetmapUpdate) bool { return u.GetRelay() != nil }
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs[node] {
		if !slices.Contains(s.features, feature) {
			continue
		}
		if isRelay(u) {
			s.pushed = slices.DeleteFunc(s.pushed, isRelay)
		}
		if len(s.pushed) >= MaxPushed {
			i := max(0, slices.IndexFunc(s.pushed, func(u *segmeshv1.NetmapUpdate) bool { return !isRelay(u) }))
			s.pushed = slices.Delete(s.pushed, i, i+1)
			dropped++
		}
		s.pushed = append(s.pushed, u)
		queued++
		s.wakeUp()
	}
	return queued, dropped
}

// Subscription is one stream's view of its node's netmap. Next, Pushed and Wake
// are meant for the one goroutine that serves the stream.
type Subscription struct {
	hub      *Hub
	node     string
	deltas   bool
	features []string
	wake     chan struct{}
	sent     uint64 // version of the netmap the stream has; 0 for none

	// guarded by hub.mu
	pending  []*netmap.Update
	needFull bool
	reset    bool                      // the node was removed: forget sent
	pushed   []*segmeshv1.NetmapUpdate // see Push, oldest first
}

// Pushed returns the updates Push queued for the stream since the last call,
// oldest first, and empties the queue.
func (s *Subscription) Pushed() []*segmeshv1.NetmapUpdate {
	s.hub.mu.Lock()
	defer s.hub.mu.Unlock()
	out := s.pushed
	s.pushed = nil
	return out
}

func (s *Subscription) wakeUp() {
	select {
	case s.wake <- struct{}{}:
	default: // already pending: coalesce
	}
}

// Wake receives a value when the node's netmap may have changed since the last Next.
func (s *Subscription) Wake() <-chan struct{} { return s.wake }

// Next returns what the stream must send to bring its agent to the node's current
// netmap, and records it as sent: one delta composed of every change since the
// last Next, or the whole netmap. It returns false when there is nothing to send
// (or the node has no netmap).
func (s *Subscription) Next() (*segmeshv1.NetmapUpdate, bool) {
	h := s.hub
	h.mu.Lock()
	if s.reset {
		s.sent = 0
	}
	pending, full := s.pending, s.needFull || s.sent == 0 || !s.deltas
	s.pending, s.needFull, s.reset = nil, false, false
	h.mu.Unlock()
	if !full {
		if d, last, err := compose(pending, s.sent); err == nil {
			if d == nil {
				return nil, false
			}
			s.sent = last
			return &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Delta{Delta: d}}, true
		}
	}
	nm, version, ok := h.src.Netmap(s.node)
	if !ok || version == s.sent {
		return nil, false
	}
	h.mu.Lock()
	kept := s.pending[:0]
	for _, u := range s.pending {
		if u.Version > version {
			kept = append(kept, u)
		}
	}
	s.pending = kept
	h.mu.Unlock()
	s.sent = version
	return &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Full{Full: nm}}, true
}

// compose folds the updates after version sent into one delta; nil when there are
// none. It fails when an update has no delta or the versions have a gap.
func compose(updates []*netmap.Update, sent uint64) (*segmeshv1.NetmapDelta, uint64, error) {
	var d *segmeshv1.NetmapDelta
	last := sent
	for _, u := range updates {
		if u.Version <= last {
			continue // older than a whole netmap sent meanwhile
		}
		if u.From != last || u.Delta == nil || u.Removed {
			return nil, 0, fmt.Errorf("update %d of %s after %d: no delta", u.Version, u.Node, last)
		}
		if d == nil {
			d = u.Delta
		} else {
			var err error
			if d, err = wire.ComposeDeltas(d, u.Delta); err != nil {
				return nil, 0, err
			}
		}
		last = u.Version
	}
	return d, last, nil
}

// Close unregisters the subscription.
func (s *Subscription) Close() {
	s.hub.mu.Lock()
	defer s.hub.mu.Unlock()
	delete(s.hub.subs[s.node], s)
	if len(s.hub.subs[s.node]) == 0 {
		delete(s.hub.subs, s.node)
	}
}
