package reconcile

import (
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"segmesh/agent/dataplane"
)

// clock is a settable reconciler clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// peerEndpoint returns the endpoint the fake "kernel" holds for peer k.
func peerEndpoint(dp *fakeDP, k dataplane.Key) netip.AddrPort {
	s, _ := dp.State()
	for _, p := range s.Peers {
		if p.PublicKey == k {
			return p.Endpoint
		}
	}
	return netip.AddrPort{}
}

// TestReconcilerRoaming: an endpoint the device learned from a peer whose latest
// handshake is fresh and newer than the moment the desired endpoint was set is the
// peer roaming, not drift; an endpoint without such a handshake is drift and is
// repaired back to the desired one.
func TestReconcilerRoaming(t *testing.T) {
	desiredEP := netip.MustParseAddrPort("192.0.2.3:51820") // peer c in testNetmap
	roamedEP := netip.MustParseAddrPort("198.51.100.33:51820")
	tests := []struct {
		name string
		// handshake is the peer's latest handshake relative to the moment the
		// desired endpoint was set (the netmap applied); nil: no stats at all.
		handshake *time.Duration
		// after advances the clock before the device learns the endpoint.
		after     time.Duration
		wantRoam  bool
		wantDrift string // a substring of the repair, when !wantRoam
	}{
		{name: "fresh handshake after the endpoint was set: roaming", handshake: ptr(2 * time.Second), after: 3 * time.Second, wantRoam: true},
		{name: "handshake before the endpoint was set: drift", handshake: ptr(-time.Second), after: 3 * time.Second, wantDrift: "endpoint 198.51.100.33:51820, want 192.0.2.3:51820"},
		{name: "no handshake: drift", handshake: nil, after: 3 * time.Second, wantDrift: "want 192.0.2.3:51820"},
		{name: "handshake too old: drift", handshake: ptr(time.Second), after: RoamFresh + 2*time.Second, wantDrift: "want 192.0.2.3:51820"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := &clock{t: testNow}
			r, dp, logs := startWithClock(t, time.Hour, clk.now)
			nm := testNetmap()
			wait(t, r, r.SetNetmap(nm))
			clk.add(tt.after)
			if tt.handshake != nil {
				dp.SetPeerStats(map[dataplane.Key]dataplane.PeerStats{key(3): {LastHandshake: testNow.Add(*tt.handshake)}})
			} else {
				dp.SetPeerStats(map[dataplane.Key]dataplane.PeerStats{})
			}
			dp.Mutate(func(s *dataplane.State) {
				for i := range s.Peers {
					if s.Peers[i].PublicKey == key(3) {
						s.Peers[i].Endpoint = roamedEP
					}
				}
			})
			reads := dp.Stats().Reads
			dp.Notify()
			eventually(t, "a read-back", func() bool { return dp.Stats().Reads > reads })
			// A second step settles whatever the first decided.
			reads = dp.Stats().Reads
			dp.Notify()
			eventually(t, "a second read-back", func() bool { return dp.Stats().Reads > reads })
			st := r.Status()
			if tt.wantRoam {
				if got := peerEndpoint(dp, key(3)); got != roamedEP {
					t.Fatalf("endpoint %v, want the roamed %v kept", got, roamedEP)
				}
				if st.Repairs.Count != 0 || !st.InSync {
					t.Fatalf("roaming counted as drift: repairs %d (%s), in sync %v", st.Repairs.Count, st.Repairs.Fixed, st.InSync)
				}
				if strings.Contains(logs.String(), "drift repaired") {
					t.Fatalf("roaming logged as a drift repair:\n%s", logs)
				}
				return
			}
			eventually(t, "the repair", func() bool { return peerEndpoint(dp, key(3)) == desiredEP })
			if st := r.Status(); st.Repairs.Count != 1 || !strings.Contains(st.Repairs.Fixed.String(), tt.wantDrift) {
				t.Fatalf("repairs %d (%s), want 1 naming %q", st.Repairs.Count, st.Repairs.Fixed, tt.wantDrift)
			}
		})
	}
}

// TestReconcilerRoamingEnds: an adopted endpoint holds only while handshakes
// prove it: once the latest handshake is older than RoamFresh the desired
// endpoint applies again, and a new desired endpoint (gossip, controller)
// replaces an adopted one at once.
func TestReconcilerRoamingEnds(t *testing.T) {
	desiredEP := netip.MustParseAddrPort("192.0.2.3:51820")
	roamedEP := netip.MustParseAddrPort("198.51.100.33:51820")
	gossipEP := netip.MustParseAddrPort("203.0.113.3:51820")
	for _, end := range []string{"handshakes stop", "new desired endpoint"} {
		t.Run(end, func(t *testing.T) {
			clk := &clock{t: testNow}
			r, dp, _ := startWithClock(t, time.Hour, clk.now)
			wait(t, r, r.SetNetmap(testNetmap()))
			clk.add(time.Second)
			dp.SetPeerStats(map[dataplane.Key]dataplane.PeerStats{key(3): {LastHandshake: clk.now()}})
			dp.Mutate(func(s *dataplane.State) {
				for i := range s.Peers {
					if s.Peers[i].PublicKey == key(3) {
						s.Peers[i].Endpoint = roamedEP
					}
				}
			})
			dp.Notify()
			eventually(t, "the adoption", func() bool {
				h := dp.History()
				return len(h) >= 2 && endpointIn(h[len(h)-1], key(3)) == roamedEP
			})
			want := desiredEP
			switch end {
			case "handshakes stop":
				clk.add(RoamFresh)
				dp.Notify()
			case "new desired endpoint":
				clk.add(time.Second)
				r.SetEndpoints(map[dataplane.Key]netip.AddrPort{key(3): gossipEP})
				want = gossipEP
			}
			eventually(t, "the desired endpoint again", func() bool { return peerEndpoint(dp, key(3)) == want })
			if st := r.Status(); st.Repairs.Count != 0 {
				t.Errorf("repairs %d (%s), want 0: the change is a desired one", st.Repairs.Count, st.Repairs.Fixed)
			}
		})
	}
}

func endpointIn(s dataplane.State, k dataplane.Key) netip.AddrPort {
	for _, p := range s.Peers {
		if p.PublicKey == k {
			return p.Endpoint
		}
	}
	return netip.AddrPort{}
}

func ptr[T any](v T) *T { return &v }
