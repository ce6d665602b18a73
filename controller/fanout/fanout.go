// Package fanout keeps the latest netmap of every node and tells each node's open
// streams when that node's netmap changed.
//
// Publish replaces the whole set of netmaps at once (one compile of the policy)
// and wakes only the subscriptions of nodes whose netmap hash changed. A wake-up is
// a non-blocking send on a one-slot channel, so a slow stream never blocks Publish
// or other streams, and a burst of changes coalesces into one wake-up after which
// Subscription.Next yields only the newest netmap.
package fanout

import (
	"sync"

	"segmesh/api/segmeshv1"
)

// Hub holds the latest netmap per node and the subscriptions. It is safe for
// concurrent use. Netmaps handed to and returned by the Hub are shared and must
// not be modified.
type Hub struct {
	mu     sync.Mutex
	latest map[string]*segmeshv1.Netmap
	subs   map[string]map[*Subscription]struct{}
}

// New returns an empty Hub.
func New() *Hub {
	return &Hub{latest: map[string]*segmeshv1.Netmap{}, subs: map[string]map[*Subscription]struct{}{}}
}

// Publish makes netmaps (node name -> netmap with Hash set) the current set; nodes
// absent from it no longer have a netmap. It wakes the subscriptions of every node
// whose netmap hash differs from the previous one and returns those node names
// (unordered).
func (h *Hub) Publish(netmaps map[string]*segmeshv1.Netmap) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var changed []string
	for name, nm := range netmaps {
		if old, ok := h.latest[name]; !ok || old.GetHash() != nm.GetHash() {
			changed = append(changed, name)
		}
	}
	for name := range h.latest {
		if _, ok := netmaps[name]; !ok {
			changed = append(changed, name)
		}
	}
	h.latest = make(map[string]*segmeshv1.Netmap, len(netmaps))
	for name, nm := range netmaps {
		h.latest[name] = nm
	}
	for _, name := range changed {
		for s := range h.subs[name] {
			s.wakeUp()
		}
	}
	return changed
}

// Latest returns the current netmap of node.
func (h *Hub) Latest(node string) (*segmeshv1.Netmap, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	nm, ok := h.latest[node]
	return nm, ok
}

// Subscribe registers a stream for node. The subscription starts woken, so the
// first Next after Subscribe yields the current netmap if there is one. Close it
// when the stream ends.
func (h *Hub) Subscribe(node string) *Subscription {
	s := &Subscription{hub: h, node: node, wake: make(chan struct{}, 1)}
	s.wakeUp()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.subs[node] == nil {
		h.subs[node] = map[*Subscription]struct{}{}
	}
	h.subs[node][s] = struct{}{}
	return s
}

// Subscription is one stream's view of its node's netmap. Next and Wake are meant
// for the one goroutine that serves the stream.
type Subscription struct {
	hub      *Hub
	node     string
	wake     chan struct{}
	lastSent string
}

func (s *Subscription) wakeUp() {
	select {
	case s.wake <- struct{}{}:
	default: // already pending: coalesce
	}
}

// Wake receives a value when the node's netmap may have changed since the last Next.
func (s *Subscription) Wake() <-chan struct{} { return s.wake }

// Next returns the node's current netmap when its hash differs from the one Next
// last returned on this subscription, and records it as sent; otherwise it
// returns false.
func (s *Subscription) Next() (*segmeshv1.Netmap, bool) {
	nm, ok := s.hub.Latest(s.node)
	if !ok || nm.GetHash() == s.lastSent {
		return nil, false
	}
	s.lastSent = nm.GetHash()
	return nm, true
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
