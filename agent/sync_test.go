package agent

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
)

// hashV2 gives nm hash version 2 (wire.NetmapHashV2), as SyncUpdates sends it.
func hashV2(nm *segmeshv1.Netmap) *segmeshv1.Netmap {
	nm.HashVersion = wire.HashVersion2
	nm.Hash = wire.NetmapHashV2(nm)
	return nm
}

// deltaNetmaps are the netmaps of TestSyncUpdates, each a change of the one
// before: n1 as in wireNetmap; n2 without peer b; n3 with b back at an endpoint
// and a second address in set db; n4 with rules towards a new set and c moved.
func deltaNetmaps() (n1, n2, n3, n4 *segmeshv1.Netmap) {
	n1 = hashV2(wireNetmap(1, 0))
	n2 = wireNetmap(2, 0)
	n2.Peers = n2.Peers[1:]
	hashV2(n2)
	n3 = wireNetmap(3, 0)
	n3.Peers[0].Endpoint = "192.0.2.2:51820"
	n3.Filter = &segmeshv1.Filter{
		Sets:    []*segmeshv1.AddressSet{{Name: "db", Prefixes: []string{"100.64.0.2/32", "100.64.0.3/32"}}},
		Ingress: testFilter.Ingress,
	}
	hashV2(n3)
	n4 = wireNetmap(4, 0)
	n4.Peers[1].Endpoint = "192.0.2.33:51820"
	n4.Filter = &segmeshv1.Filter{
		Sets: []*segmeshv1.AddressSet{{Name: "cache", Prefixes: []string{"100.64.0.2/32"}}},
		Egress: []*segmeshv1.FilterRule{{Set: "cache", Origin: "web-to-cache (policy.yaml:12:5)",
			Matches: []*segmeshv1.PortMatch{{Protocol: segmeshv1.Protocol_PROTOCOL_TCP, Ports: []*segmeshv1.PortRange{{First: 6379, Last: 6379}}}}}},
	}
	hashV2(n4)
	return n1, n2, n3, n4
}

// TestSyncUpdates: the agent applies the full netmap and the deltas of a
// SyncUpdates stream; an update that does not apply (a gap, a hash mismatch, a
// delta before any full netmap) makes it open a new stream at once, saying why in
// resync_reason, and it ends with the controller's netmap applied, stored and
// reported. A full netmap that the agent rejects is still the base of the next
// delta.
func TestSyncUpdates(t *testing.T) {
	n1, n2, n3, n4 := deltaNetmaps()
	wrongNode := wireNetmap(3, 0)
	wrongNode.Self.Name = "db-1"
	hashV2(wrongNode)
	badHash := wire.DiffNetmaps(n3, n4)
	badHash.Hash = strings.Repeat("0", 64)
	diff := func(a, b *segmeshv1.Netmap) *segmeshv1.NetmapUpdate { return deltaUpdate(wire.DiffNetmaps(a, b)) }
	tests := []struct {
		name string
		// first is the full netmap the stream starts with (nil: none); pushed
		// follow it.
		first  *segmeshv1.Netmap
		pushed []*segmeshv1.NetmapUpdate
		// want is in the resync_reason of the second stream; "" = no resync.
		want []string
	}{
		{name: "deltas apply", first: n1, pushed: []*segmeshv1.NetmapUpdate{diff(n1, n2), diff(n2, n3), diff(n3, n4)}},
		{name: "full netmap again", first: n1, pushed: []*segmeshv1.NetmapUpdate{diff(n1, n2), fullUpdate(n3), diff(n3, n4)}},
		{name: "gap", first: n1, pushed: []*segmeshv1.NetmapUpdate{diff(n1, n2), diff(n2, n3), diff(n2, n4)},
			want: []string{wire.ErrDeltaBase.Error(), "the netmap held is " + n3.GetHash()[:12]}},
		{name: "hash mismatch", first: n1, pushed: []*segmeshv1.NetmapUpdate{diff(n1, n2), diff(n2, n3), deltaUpdate(badHash)},
			want: []string{"delta to revision 4: the result hashes to " + n4.GetHash()[:12]}},
		{name: "delta before any full netmap", pushed: []*segmeshv1.NetmapUpdate{diff(n1, n4)},
			want: []string{"delta to revision 4 before any full netmap"}},
		{name: "rejected full netmap is the base of the next delta", first: n1, pushed: []*segmeshv1.NetmapUpdate{fullUpdate(wrongNode), diff(wrongNode, n4)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newController(t)
			c.setNetmap(tt.first)
			dir := filepath.Join(t.TempDir(), "state")
			r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
			if tt.first != nil {
				eventually(t, "first netmap reported", func() bool { return c.lastReport().GetAppliedHash() == tt.first.GetHash() })
			} else {
				eventually(t, "stream open", func() bool { _, s := c.counts(); return s == 1 })
			}
			// What the controller holds from now on: a new stream starts with n4.
			c.setNetmap(n4)
			for _, u := range tt.pushed {
				c.push <- u
			}
			want4 := expected(t, dir, n4, nil)
			defer func() {
				if t.Failed() {
					t.Logf("last report %v\nlogs:\n%s", c.lastReport(), r.logs)
				}
			}()
			eventually(t, "revision 4 applied and reported", func() bool {
				rep := c.lastReport()
				return holds(r.dp, want4) && rep.GetAppliedRevision() == 4 && rep.GetAppliedHash() == n4.GetHash() && rep.GetError() == ""
			})
			if stored, err := stateDir(t, dir).Netmap(); err != nil || stored.GetHash() != n4.GetHash() {
				t.Errorf("stored netmap %.12s (err %v), want revision 4 %.12s", stored.GetHash(), err, n4.GetHash())
			}
			c.mu.Lock()
			streams := c.syncs
			c.mu.Unlock()
			if streams[0].GetResyncReason() != "" {
				t.Errorf("first stream has resync_reason %q, want none", streams[0].GetResyncReason())
			}
			if len(tt.want) == 0 {
				if len(streams) != 1 {
					t.Fatalf("%d streams, want 1 (no resync); second's reason %q", len(streams), streams[1].GetResyncReason())
				}
				return
			}
			if len(streams) != 2 {
				t.Fatalf("%d streams, want 2 (one resync)", len(streams))
			}
			for _, w := range tt.want {
				if got := streams[1].GetResyncReason(); !strings.Contains(got, w) {
					t.Errorf("resync_reason %q, want it to contain %q", got, w)
				}
			}
			if logs := r.logs.String(); !strings.Contains(logs, "asking for a full netmap") {
				t.Errorf("the resync is not logged:\n%s", logs)
			}
		})
	}
}

// TestSyncFallback: a controller from before deltas does not serve SyncUpdates;
// the agent takes full netmaps over Sync instead, tries SyncUpdates again at every
// reconnect, and says so in the log once.
func TestSyncFallback(t *testing.T) {
	c := newController(t)
	c.legacy = true
	pb := wireNetmap(3, 0)
	c.setNetmap(pb)
	// Every Sync stream ends after its netmap, so that the agent reconnects.
	c.syncErr = connect.NewError(connect.CodeUnavailable, errors.New("restarting"))
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
	eventually(t, "three Sync streams", func() bool { _, s := c.counts(); return s >= 3 })
	eventually(t, "revision 3 applied and reported", func() bool {
		return holds(r.dp, expected(t, dir, pb, nil)) && c.lastReport().GetAppliedHash() == pb.GetHash()
	})
	c.mu.Lock()
	tries, streams := len(c.updateReqs), len(c.syncs)
	c.mu.Unlock()
	if tries < streams {
		t.Errorf("%d SyncUpdates calls for %d Sync streams; want one before each", tries, streams)
	}
	if n := strings.Count(r.logs.String(), "does not serve netmap deltas"); n != 1 {
		t.Errorf("the fallback is logged %d times, want once", n)
	}
}

// TestRestartAppliesStoredNetmapV2: a netmap that came over SyncUpdates (hash
// version 2, the result of a delta) is stored and applied again at restart before
// the controller answers.
func TestRestartAppliesStoredNetmapV2(t *testing.T) {
	n1, _, _, n4 := deltaNetmaps()
	c := newController(t)
	c.setNetmap(n1)
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
	eventually(t, "revision 1 reported", func() bool { return c.lastReport().GetAppliedHash() == n1.GetHash() })
	c.push <- deltaUpdate(wire.DiffNetmaps(n1, n4))
	eventually(t, "revision 4 reported", func() bool { return c.lastReport().GetAppliedHash() == n4.GetHash() })
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	c.kill()
	r = start(t, Options{StateDir: dir})
	want := expected(t, dir, n4, nil)
	eventually(t, "stored revision 4 applied", func() bool { return holds(r.dp, want) })
	if logs := r.logs.String(); !strings.Contains(logs, "applying stored netmap") || !strings.Contains(logs, "hash="+n4.GetHash()) {
		t.Errorf("stored netmap not applied:\n%s", logs)
	}
}

func TestResyncLimiter(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	tests := []struct {
		name  string
		times []float64 // seconds after t0 at which a resync is wanted
		want  []float64 // seconds to wait for each
	}{
		{name: "three at once", times: []float64{0, 0, 0}, want: []float64{0, 0, 0}},
		{name: "the fourth waits for the window", times: []float64{0, 1, 2, 3}, want: []float64{0, 0, 0, 57}},
		{name: "delayed ones count where they happen", times: []float64{0, 0, 0, 0, 0}, want: []float64{0, 0, 0, 60, 60}},
		{name: "the sixth waits a second window", times: []float64{0, 0, 0, 0, 0, 0}, want: []float64{0, 0, 0, 60, 60, 60}},
		{name: "seventh", times: []float64{0, 0, 0, 0, 0, 0, 0}, want: []float64{0, 0, 0, 60, 60, 60, 120}},
		{name: "spread out never waits", times: []float64{0, 30, 60, 90, 120}, want: []float64{0, 0, 0, 0, 0}},
		{name: "old ones expire", times: []float64{0, 1, 2, 61}, want: []float64{0, 0, 0, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := resyncLimiter{n: 3, window: time.Minute}
			for i, s := range tt.times {
				if got, want := l.next(at(s)), time.Duration(tt.want[i]*float64(time.Second)); got != want {
					t.Errorf("resync %d at %vs: wait %v, want %v", i, s, got, want)
				}
			}
		})
	}
}
