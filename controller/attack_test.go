package controller

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/controller/store"
)

const policyTwoMeshes = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: db
    selectors: [{role: db}]
rules:
  - name: web-mesh
    from: [web]
    to: [web]
    ports: [tcp/8080]
  - name: db-mesh
    from: [db]
    to: [db]
    ports: [tcp/5432]
`

// storedGossipKey returns the gossip key the controller stored (the one it
// starts with after a restart).
func (tc *testController) storedGossipKey() []byte {
	tc.t.Helper()
	var k []byte
	if err := tc.c.store.View(func(tx store.Tx) error {
		var err error
		k, err = tx.Meta(metaGossipKey)
		return err
	}); err != nil {
		tc.t.Fatal(err)
	}
	return k
}

// TestGossipKeyStoredIsPublishedAfterCutOff: revoking web-2 leaves web-1 without
// a peer, so publishing the revocation rotates the key (LostGossip) and stores
// it; then cutOff publishes the key it stored before. The store must hold the
// key the netmaps carry, or a restart hands every node another key.
func TestGossipKeyStoredIsPublishedAfterCutOff(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.createToken(map[string]string{"role": "web"}, true)
	db := tc.createToken(map[string]string{"role": "db"}, true)
	tc.enroll(web, "web-1")
	tc.enroll(web, "web-2")
	tc.enroll(db, "db-1")
	tc.enroll(db, "db-2")
	apply(t, tc, policyTwoMeshes)
	if _, err := tc.op().RevokeNode(bg, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: "web-2"})); err != nil {
		t.Fatal(err)
	}
	nm, _, ok := tc.c.engine.Netmap("db-1")
	if !ok || nm.GetGossip() == nil {
		t.Fatalf("db-1 has no gossip key: %v", nm)
	}
	if stored := tc.storedGossipKey(); !bytes.Equal(stored, nm.GetGossip().GetKey()) {
		t.Errorf("stored gossip key %x, netmaps carry %x: a restart changes every node's key", stored[:4], nm.GetGossip().GetKey()[:4])
	}
}

// openStreams returns how many netmap streams of node the controller serves.
func (tc *testController) openStreams(node string) int {
	l := tc.c.live
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.get(node).conns)
}

// TestStreamsPerNodeBounded: one node (its credentials stolen, or a buggy agent
// that never closes a stream) opens many SyncUpdates streams. Each holds a
// subscription with up to fanout.MaxPending deltas, a goroutine and, while its
// send is stuck in flow control, a share of sendBudget for up to sendTimeout:
// the streams of one node must be bounded (a new stream ending the oldest, as a
// reconnect does), or a single node grows the controller's memory without bound
// and can hold all of sendBudget, stalling every other agent's heavy updates.
func TestStreamsPerNodeBounded(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.createToken(map[string]string{"role": "web"}, true)
	a := tc.enroll(web, "web-1")
	tc.enroll(web, "web-2")
	apply(t, tc, policyTwoMeshes)
	const streams = 32
	for range streams {
		s := tc.sync(a, &segmeshv1.SyncRequest{})
		s.next(t)
	}
	if n := tc.openStreams("web-1"); n > 4 {
		t.Errorf("web-1 holds %d open netmap streams; a node should hold a few at most", n)
	}
}

// fullNetmapUpdate returns a whole netmap of peers peers (each also a set
// element), as a stream sends to an agent of a full mesh.
func fullNetmapUpdate(peers int) *segmeshv1.NetmapUpdate {
	nm := &segmeshv1.Netmap{Self: &segmeshv1.Node{Name: "n"}, Filter: &segmeshv1.Filter{Sets: []*segmeshv1.AddressSet{{Name: "all"}}}}
	for i := range peers {
		nm.Peers = append(nm.Peers, &segmeshv1.Peer{Name: fmt.Sprintf("p%d", i)})
		nm.Filter.Sets[0].Prefixes = append(nm.Filter.Sets[0].Prefixes, fmt.Sprintf("100.64.%d.%d/32", i>>8, i&255))
	}
	return &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Full{Full: nm}}
}

// TestStuckAgentsDoNotDelayOthers: in a 5,000-node full mesh a whole netmap is
// 10,000 peers and set elements, so seven agents whose sends are stuck in flow
// control (hosts suspended with their TCP connections open, or agents that never
// read) hold all of sendBudget until their write deadline (sendTimeout, 30 s),
// and every other agent's heavy update (a whole netmap after a reconnect, the
// delta of a policy change) waits behind them. The issue asks that a stuck agent
// never delays others.
func TestStuckAgentsDoNotDelayOthers(t *testing.T) {
	tc := startController(t, t.TempDir())
	stuck := make(chan struct{})
	defer close(stuck)
	heavy := fullNetmapUpdate(5000)
	for range 7 {
		go func() {
			_ = tc.c.sendLimited(bg, heavy, func(*segmeshv1.NetmapUpdate) error { <-stuck; return nil })
		}()
	}
	eventually(t, "the stuck sends hold the budget", func() bool {
		if tc.c.sendBudget.TryAcquire(1) {
			tc.c.sendBudget.Release(1)
			return false
		}
		return true
	})
	done := make(chan error, 1)
	go func() {
		done <- tc.c.sendLimited(bg, fullNetmapUpdate(300), func(*segmeshv1.NetmapUpdate) error { return nil })
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a healthy agent's update waited 5 s behind 7 stuck agents (it waits until their write deadline)")
	}
}
