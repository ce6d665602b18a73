package fanout

import (
	"slices"
	"testing"

	"segmesh/api/segmeshv1"
)

func nm(rev uint64, hash string) *segmeshv1.Netmap {
	return &segmeshv1.Netmap{PolicyRevision: rev, Hash: hash}
}

func woken(s *Subscription) bool {
	select {
	case <-s.Wake():
		return true
	default:
		return false
	}
}

// TestChangeReachesOnlyChangedNodes publishes netmap sets step by step and checks,
// for every subscribed node, whether its stream is woken and what Next yields.
func TestChangeReachesOnlyChangedNodes(t *testing.T) {
	h := New()
	subs := map[string]*Subscription{}
	for _, n := range []string{"a", "b", "c"} {
		subs[n] = h.Subscribe(n)
		t.Cleanup(subs[n].Close)
	}
	steps := []struct {
		name    string
		publish map[string]*segmeshv1.Netmap
		changed []string
		// want maps node -> hash Next must yield; nodes absent must see nothing.
		want map[string]string
	}{
		{
			name:    "initial",
			publish: map[string]*segmeshv1.Netmap{"a": nm(0, "a0"), "b": nm(0, "b0"), "c": nm(0, "c0")},
			changed: []string{"a", "b", "c"},
			want:    map[string]string{"a": "a0", "b": "b0", "c": "c0"},
		},
		{
			name:    "policy change touching only b",
			publish: map[string]*segmeshv1.Netmap{"a": nm(1, "a0"), "b": nm(1, "b1"), "c": nm(1, "c0")},
			changed: []string{"b"},
			want:    map[string]string{"b": "b1"},
		},
		{
			name:    "no change at all",
			publish: map[string]*segmeshv1.Netmap{"a": nm(2, "a0"), "b": nm(2, "b1"), "c": nm(2, "c0")},
			changed: nil,
			want:    map[string]string{},
		},
		{
			name:    "a and c change, new node d appears",
			publish: map[string]*segmeshv1.Netmap{"a": nm(3, "a3"), "b": nm(3, "b1"), "c": nm(3, "c3"), "d": nm(3, "d3")},
			changed: []string{"a", "c", "d"},
			want:    map[string]string{"a": "a3", "c": "c3"},
		},
	}
	// The subscriptions start woken with nothing to send yet.
	for n, s := range subs {
		if !woken(s) {
			t.Fatalf("%s: new subscription not woken", n)
		}
		if got, ok := s.Next(); ok {
			t.Fatalf("%s: Next before any publish = %v", n, got)
		}
	}
	for _, st := range steps {
		got := h.Publish(st.publish)
		slices.Sort(got)
		if !slices.Equal(got, st.changed) {
			t.Errorf("%s: Publish changed = %v, want %v", st.name, got, st.changed)
		}
		for n, s := range subs {
			wantHash, wantSend := st.want[n]
			if w := woken(s); w != wantSend {
				t.Errorf("%s: node %s woken = %v, want %v", st.name, n, w, wantSend)
			}
			nmGot, ok := s.Next()
			if ok != wantSend || (ok && nmGot.Hash != wantHash) {
				t.Errorf("%s: node %s Next = %v %v, want hash %q sent=%v", st.name, n, nmGot, ok, wantHash, wantSend)
			}
		}
	}
}

// TestCoalesce: a stream that does not keep up sees one wake-up for a burst and
// then only the newest netmap.
func TestCoalesce(t *testing.T) {
	h := New()
	s := h.Subscribe("a")
	defer s.Close()
	for i, hash := range []string{"h1", "h2", "h3"} {
		h.Publish(map[string]*segmeshv1.Netmap{"a": nm(uint64(i), hash)})
	}
	if !woken(s) {
		t.Fatal("not woken")
	}
	if woken(s) {
		t.Fatal("woken twice for one burst")
	}
	got, ok := s.Next()
	if !ok || got.Hash != "h3" {
		t.Fatalf("Next = %v %v, want h3", got, ok)
	}
	if _, ok := s.Next(); ok {
		t.Fatal("second Next sent the same netmap again")
	}
}

// TestSubscribeAfterPublish: a stream opened later gets the current netmap at once;
// each stream tracks what it sent on its own (a reconnecting agent gets it again).
func TestSubscribeAfterPublish(t *testing.T) {
	h := New()
	h.Publish(map[string]*segmeshv1.Netmap{"a": nm(1, "h1")})
	s1 := h.Subscribe("a")
	defer s1.Close()
	if got, ok := s1.Next(); !ok || got.Hash != "h1" {
		t.Fatalf("first stream Next = %v %v", got, ok)
	}
	s2 := h.Subscribe("a")
	defer s2.Close()
	if !woken(s2) {
		t.Fatal("second stream not woken at subscribe")
	}
	if got, ok := s2.Next(); !ok || got.Hash != "h1" {
		t.Fatalf("second stream Next = %v %v", got, ok)
	}
}

func TestCloseStopsWakeups(t *testing.T) {
	h := New()
	s := h.Subscribe("a")
	woken(s)
	s.Close()
	h.Publish(map[string]*segmeshv1.Netmap{"a": nm(1, "h1")})
	if woken(s) {
		t.Fatal("closed subscription woken")
	}
	if len(h.subs) != 0 {
		t.Fatalf("subs not cleaned up: %v", h.subs)
	}
}

func TestRemovedNode(t *testing.T) {
	h := New()
	h.Publish(map[string]*segmeshv1.Netmap{"a": nm(1, "h1"), "b": nm(1, "b1")})
	changed := h.Publish(map[string]*segmeshv1.Netmap{"b": nm(1, "b1")})
	if !slices.Equal(changed, []string{"a"}) {
		t.Errorf("changed = %v, want [a]", changed)
	}
	if _, ok := h.Latest("a"); ok {
		t.Error("removed node still has a netmap")
	}
}
