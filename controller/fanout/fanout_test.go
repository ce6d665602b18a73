package fanout

import (
	"fmt"
	"net/netip"
	"testing"

	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
	"segmesh/controller/netmap"
	"segmesh/controller/store"
)

const mesh = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
rules:
  - name: web-mesh
    from: [web]
    to: [web]
    ports: [tcp/80]
`

func node(name, role string, i int) store.Node {
	return store.Node{Name: name, Labels: map[string]string{"role": role},
		Addresses: []netip.Addr{netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)})}, PublicKey: []byte{byte(i >> 8), byte(i), 31: 1}}
}

// fixture returns an engine with web-1, web-2 in a web mesh and db-1 alone, and
// a hub over it.
func fixture(t *testing.T) (*netmap.Engine, *Hub) {
	t.Helper()
	prog := prepare(t, mesh)
	cfg := netmap.Config{GossipKey: make([]byte, 32), GossipPort: 7946, OverlayPrefixes: []netip.Prefix{netip.MustParsePrefix("100.64.0.0/10")}}
	e := netmap.NewEngine(cfg, 1, prog, []store.Node{node("web-1", "web", 1), node("web-2", "web", 2), node("db-1", "db", 3)})
	latest := map[string]Latest{}
	for _, n := range e.Nodes() {
		h, r, _, _ := e.Hash(n)
		latest[n] = Latest{Hash: h, Revision: r}
	}
	return e, New(e, latest)
}

func woken(s *Subscription) bool {
	select {
	case <-s.Wake():
		return true
	default:
		return false
	}
}

// next calls Next and fails unless it yields an update.
func next(t *testing.T, s *Subscription) *segmeshv1.NetmapUpdate {
	t.Helper()
	u, ok := s.Next()
	if !ok {
		t.Fatal("Next yielded nothing")
	}
	return u
}

// apply applies u to held as an agent would.
func apply(t *testing.T, held *segmeshv1.Netmap, u *segmeshv1.NetmapUpdate) *segmeshv1.Netmap {
	t.Helper()
	if f := u.GetFull(); f != nil {
		return f
	}
	nm, err := wire.ApplyDelta(held, u.GetDelta())
	if err != nil {
		t.Fatalf("applying the delta: %v", err)
	}
	return nm
}

func current(t *testing.T, e *netmap.Engine, name string) *segmeshv1.Netmap {
	t.Helper()
	nm, _, ok := e.Netmap(name)
	if !ok {
		t.Fatalf("no netmap for %s", name)
	}
	return nm
}

// TestDeltasReachOnlyChangedNodes checks that a join wakes the nodes whose
// netmap changed, which get a delta, and not the others.
func TestDeltasReachOnlyChangedNodes(t *testing.T) {
	e, h := fixture(t)
	web, db := h.Subscribe("web-1", true), h.Subscribe("db-1", true)
	defer web.Close()
	defer db.Close()
	for _, s := range []*Subscription{web, db} {
		if !woken(s) {
			t.Fatal("a new subscription is not woken")
		}
	}
	held := next(t, web).GetFull()
	if held == nil {
		t.Fatal("the first update is not a whole netmap")
	}
	next(t, db)
	if _, ok := web.Next(); ok {
		t.Fatal("Next yielded an update without a change")
	}

	h.Publish(must(e.Upsert(node("web-3", "web", 4))))
	if woken(db) {
		t.Error("db-1 woken by a change that does not concern it")
	}
	if !woken(web) {
		t.Fatal("web-1 not woken")
	}
	u := next(t, web)
	if u.GetDelta() == nil {
		t.Fatalf("update after a join is %v, want a delta", u)
	}
	if got := len(u.GetDelta().GetUpsertedPeers()); got != 1 {
		t.Errorf("delta upserts %d peers, want 1", got)
	}
	if held = apply(t, held, u); !proto.Equal(held, current(t, e, "web-1")) {
		t.Fatalf("after the delta the agent holds\n%v\nwant\n%v", held, current(t, e, "web-1"))
	}
	if l, _ := h.Latest("web-1"); l.Hash != held.GetHash() {
		t.Errorf("Latest = %v, want hash %s", l, held.GetHash())
	}
}

// TestCoalesce checks that changes made while a stream is busy become one wake-up
// and one composed delta, and that past MaxPending changes the stream gets the
// whole netmap.
func TestCoalesce(t *testing.T) {
	e, h := fixture(t)
	s := h.Subscribe("web-1", true)
	defer s.Close()
	<-s.Wake()
	held := next(t, s).GetFull()
	for i := range 3 {
		h.Publish(must(e.Upsert(node(fmt.Sprintf("web-%d", 10+i), "web", 10+i))))
	}
	<-s.Wake()
	if woken(s) {
		t.Fatal("three changes woke the stream more than once")
	}
	u := next(t, s)
	if d := u.GetDelta(); d == nil || len(d.GetUpsertedPeers()) != 3 {
		t.Fatalf("coalesced update = %v, want one delta with 3 peers", u)
	}
	held = apply(t, held, u)
	if !proto.Equal(held, current(t, e, "web-1")) {
		t.Fatal("the composed delta does not give the current netmap")
	}

	for i := range MaxPending + 1 {
		h.Publish(must(e.Upsert(node(fmt.Sprintf("web-%d", 100+i), "web", 100+i))))
	}
	u = next(t, s)
	if u.GetFull() == nil {
		t.Fatalf("after %d changes the update is a delta, want the whole netmap", MaxPending+1)
	}
	if !proto.Equal(apply(t, held, u), current(t, e, "web-1")) {
		t.Fatal("the whole netmap is not the current one")
	}
	if _, ok := s.Next(); ok {
		t.Fatal("changes older than the whole netmap were sent again")
	}
}

// TestWholeNetmapsOnly checks a subscription without deltas (an agent that
// predates them): whole netmaps, and nothing when nothing changed.
func TestWholeNetmapsOnly(t *testing.T) {
	e, h := fixture(t)
	s := h.Subscribe("web-1", false)
	defer s.Close()
	next(t, s)
	if _, ok := s.Next(); ok {
		t.Fatal("Next yielded an update without a change")
	}
	h.Publish(must(e.Upsert(node("web-3", "web", 4))))
	if u := next(t, s); u.GetFull() == nil || !proto.Equal(u.GetFull(), current(t, e, "web-1")) {
		t.Fatalf("update = %v, want the current whole netmap", u)
	}
}

// TestStuckStream checks that a stream that never reads neither blocks Publish
// nor holds more than MaxPending changes.
func TestStuckStream(t *testing.T) {
	e, h := fixture(t)
	s := h.Subscribe("web-1", true)
	defer s.Close()
	next(t, s)
	for i := range 5 * MaxPending {
		h.Publish(must(e.Upsert(node(fmt.Sprintf("web-%d", 100+i), "web", 100+i))))
	}
	h.mu.Lock()
	pending, full := len(s.pending), s.needFull
	h.mu.Unlock()
	if pending > MaxPending || !full {
		t.Fatalf("stuck stream holds %d changes (needFull %v), want at most %d and a whole netmap next", pending, full, MaxPending)
	}
}

// TestRemovedNode checks that a deleted node's subscription yields nothing and
// its hash is gone.
func TestRemovedNode(t *testing.T) {
	e, h := fixture(t)
	s := h.Subscribe("db-1", true)
	defer s.Close()
	next(t, s)
	h.Publish(e.Remove("db-1"))
	if !woken(s) {
		t.Fatal("a deleted node's subscription is not woken")
	}
	if u, ok := s.Next(); ok {
		t.Fatalf("deleted node got %v", u)
	}
	if _, ok := h.Latest("db-1"); ok {
		t.Error("Latest still knows the deleted node")
	}
}

// TestCloseStopsWakeups checks that a closed subscription is not woken.
func TestCloseStopsWakeups(t *testing.T) {
	e, h := fixture(t)
	s := h.Subscribe("web-1", true)
	<-s.Wake()
	s.Close()
	h.Publish(must(e.Upsert(node("web-3", "web", 4))))
	if woken(s) {
		t.Fatal("a closed subscription was woken")
	}
}

func must(u []netmap.Update, err error) []netmap.Update {
	if err != nil {
		panic(err)
	}
	return u
}

// TestDeletedAndEnrolledAgain checks that a subscription open across a node's
// deletion and a new enrollment under its name gets the new node's whole netmap,
// never a delta chained to the deleted node's.
func TestDeletedAndEnrolledAgain(t *testing.T) {
	e, h := fixture(t)
	s := h.Subscribe("web-2", true)
	defer s.Close()
	next(t, s)
	h.Publish(e.Remove("web-2"))
	if _, ok := s.Next(); ok {
		t.Fatal("a deleted node got an update")
	}
	h.Publish(must(e.Upsert(node("web-2", "web", 9))))
	u := next(t, s)
	if u.GetFull() == nil || !proto.Equal(u.GetFull(), current(t, e, "web-2")) {
		t.Fatalf("update after enrolling again = %v, want the new whole netmap", u)
	}
}

func punchFor(peer string) *segmeshv1.NetmapUpdate {
	return &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Punch{Punch: &segmeshv1.Punch{Peer: peer}}}
}

// TestPush: an out-of-band update reaches only the streams of its node that
// subscribed with its feature, wakes them, is taken once, in order, and the queue
// keeps the newest MaxPushed.
func TestPush(t *testing.T) {
	_, h := fixture(t)
	with := h.Subscribe("web-1", true, "relay", "punch")
	without := h.Subscribe("web-1", true)
	other := h.Subscribe("web-2", true, "punch")
	for _, s := range []*Subscription{with, without, other} {
		next(t, s) // the first netmap
		woken(s)
	}
	tests := []struct {
		node, feature       string
		queued              int
		withGets, otherGets bool
	}{
		{"web-1", "punch", 1, true, false},
		{"web-1", "relay", 1, true, false},
		{"web-1", "gossip", 0, false, false},
		{"web-2", "punch", 1, false, true},
		{"db-1", "punch", 0, false, false}, // no stream
	}
	for _, tt := range tests {
		q, d := h.Push(tt.node, tt.feature, punchFor(tt.feature))
		if q != tt.queued || d != 0 {
			t.Errorf("Push(%s, %s) = %d queued %d dropped, want %d, 0", tt.node, tt.feature, q, d, tt.queued)
		}
		if got := woken(with); got != tt.withGets {
			t.Errorf("Push(%s, %s): web-1's punch stream woken %v, want %v", tt.node, tt.feature, got, tt.withGets)
		}
		if got := woken(other); got != tt.otherGets {
			t.Errorf("Push(%s, %s): web-2's stream woken %v, want %v", tt.node, tt.feature, got, tt.otherGets)
		}
		if woken(without) {
			t.Errorf("Push(%s, %s) woke a stream without features", tt.node, tt.feature)
		}
	}
	if got := with.Pushed(); len(got) != 2 || got[0].GetPunch().GetPeer() != "punch" || got[1].GetPunch().GetPeer() != "relay" {
		t.Errorf("web-1 Pushed = %v, want the punch then the relay update", got)
	}
	if got := with.Pushed(); got != nil {
		t.Errorf("second Pushed = %v, want nothing", got)
	}
	if got := without.Pushed(); got != nil {
		t.Errorf("Pushed of a stream without features = %v", got)
	}
	if _, ok := with.Next(); ok {
		t.Error("a push made Next yield a netmap")
	}

	dropped := 0
	for i := range MaxPushed + 3 {
		_, d := h.Push("web-2", "punch", punchFor(fmt.Sprint(i)))
		dropped += d
	}
	got := other.Pushed()
	if dropped != 4 || len(got) != MaxPushed || got[0].GetPunch().GetPeer() != "3" || got[MaxPushed-1].GetPunch().GetPeer() != fmt.Sprint(MaxPushed+2) {
		t.Errorf("after %d pushes to a queue of %d (one queued before): dropped %d, kept %d from %q to %q; want 4 dropped, the newest %d kept",
			MaxPushed+3, MaxPushed, dropped, len(got), got[0].GetPunch().GetPeer(), got[len(got)-1].GetPunch().GetPeer(), MaxPushed)
	}
	other.Close()
	if q, _ := h.Push("web-2", "punch", punchFor("x")); q != 0 {
		t.Errorf("Push after Close queued %d", q)
	}
}

// TestPushKeepsRelayConfig: a RelayConfig is a relay's whole session set, so a
// newer one replaces a queued older one, and a burst of punches (which peers of
// the relay node can cause) drops punches, never the latest RelayConfig: the
// relay would not serve its newest sessions until its set changed again.
func TestPushKeepsRelayConfig(t *testing.T) {
	_, h := fixture(t)
	s := h.Subscribe("web-1", true, "relay", "punch")
	next(t, s)
	relayCfg := func(id uint64) *segmeshv1.NetmapUpdate {
		return &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Relay{Relay: &segmeshv1.RelayConfig{Sessions: []*segmeshv1.RelaySession{{Id: id}}}}}
	}
	h.Push("web-1", "relay", relayCfg(1))
	h.Push("web-1", "relay", relayCfg(2))
	for i := range MaxPushed {
		h.Push("web-1", "punch", punchFor(fmt.Sprint("p", i)))
	}
	got := s.Pushed()
	var cfgs []uint64
	for _, u := range got {
		if r := u.GetRelay(); r != nil {
			cfgs = append(cfgs, r.GetSessions()[0].GetId())
		}
	}
	if len(got) != MaxPushed || len(cfgs) != 1 || cfgs[0] != 2 {
		t.Fatalf("queued %d updates with relay configs %v, want %d with only the newest config (2)", len(got), cfgs, MaxPushed)
	}
	if last := got[len(got)-1].GetPunch().GetPeer(); last != fmt.Sprint("p", MaxPushed-1) {
		t.Errorf("newest queued punch %q, want the last one pushed", last)
	}
}
