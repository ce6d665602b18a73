package reconcile

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/fake"
	"segmesh/agent/internal/testlog"
	"segmesh/agent/netmap"
)

func key(b byte) dataplane.Key {
	var k dataplane.Key
	for i := range k {
		k[i] = b
	}
	return k
}

func pfx(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// drift is the Diff of observed from desired joined with "; "; "" when they are
// equal.
func drift(desired, observed dataplane.State) string {
	var parts []string
	for _, d := range dataplane.Diff(desired, observed) {
		parts = append(parts, d.String())
	}
	return strings.Join(parts, "; ")
}

// testNow is the reconcilers' clock in these tests.
var testNow = time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)

var cmpOpts = cmp.Options{
	cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
	cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b }),
}

var local = Local{
	Interface:  "smtest0",
	PrivateKey: key(9),
	ListenPort: 51820,
	MTU:        1420,
	Addresses:  pfx("100.64.0.1/32", "fd5e:6d65:7368::1/128"),
	Routes:     pfx("100.64.0.0/10", "fd5e:6d65:7368::/48"),
}

var filter = dataplane.Filter{
	Sets: []dataplane.AddressSet{{Name: "db", Prefixes: pfx("100.64.0.3/32")}},
	Ingress: []dataplane.FilterRule{{Set: "db", Origin: "r1",
		Matches: []dataplane.PortMatch{{Protocol: dataplane.ProtoTCP, Ports: []dataplane.PortRange{{First: 5432, Last: 5432}}}}}},
}

func testNetmap() *netmap.Netmap {
	return &netmap.Netmap{
		Revision: 7,
		Hash:     "h7",
		Self:     netmap.Node{Name: "a", Addresses: pfx("100.64.0.1/32", "fd5e:6d65:7368::1/128")},
		Peers: []netmap.Peer{
			{Name: "c", PublicKey: key(3), Endpoint: netip.MustParseAddrPort("192.0.2.3:51820"), AllowedIPs: pfx("fd5e:6d65:7368::3/128", "100.64.0.3/32")},
			{Name: "b", PublicKey: key(2), AllowedIPs: pfx("100.64.0.2/32")},
		},
		Filter:          filter,
		OverlayPrefixes: pfx("100.64.0.0/10", "fd5e:6d65:7368::/48"),
	}
}

func TestDesired(t *testing.T) {
	ep := netip.MustParseAddrPort
	base := dataplane.State{
		Interface: "smtest0", PrivateKey: key(9), ListenPort: 51820, MTU: 1420,
		Addresses: pfx("100.64.0.1/32", "fd5e:6d65:7368::1/128"),
		Routes:    pfx("100.64.0.0/10", "fd5e:6d65:7368::/48"),
	}
	peerB := dataplane.Peer{PublicKey: key(2), AllowedIPs: pfx("100.64.0.2/32"), PersistentKeepalive: 25}
	peerC := dataplane.Peer{PublicKey: key(3), Endpoint: ep("192.0.2.3:51820"), AllowedIPs: pfx("100.64.0.3/32", "fd5e:6d65:7368::3/128"), PersistentKeepalive: 25}
	with := func(peers []dataplane.Peer, f dataplane.Filter) dataplane.State {
		s := base
		s.Peers = peers
		s.Filter = f
		return s
	}
	tests := []struct {
		name      string
		nm        *netmap.Netmap
		endpoints map[dataplane.Key]netip.AddrPort
		want      dataplane.State
	}{
		{name: "no netmap is default deny", nm: nil, want: base},
		{name: "netmap", nm: testNetmap(), want: with([]dataplane.Peer{peerB, peerC}, filter)},
		{
			name:      "gossip endpoint for a known peer overrides",
			nm:        testNetmap(),
			endpoints: map[dataplane.Key]netip.AddrPort{key(2): ep("198.51.100.2:4000"), key(3): ep("198.51.100.3:4000")},
			want: with([]dataplane.Peer{
				{PublicKey: key(2), Endpoint: ep("198.51.100.2:4000"), AllowedIPs: pfx("100.64.0.2/32"), PersistentKeepalive: 25},
				{PublicKey: key(3), Endpoint: ep("198.51.100.3:4000"), AllowedIPs: pfx("100.64.0.3/32", "fd5e:6d65:7368::3/128"), PersistentKeepalive: 25},
			}, filter),
		},
		{
			name:      "gossip can not add a peer",
			nm:        testNetmap(),
			endpoints: map[dataplane.Key]netip.AddrPort{key(4): ep("198.51.100.4:51820")},
			want:      with([]dataplane.Peer{peerB, peerC}, filter),
		},
		{
			name:      "gossip can not add a peer to default deny",
			nm:        nil,
			endpoints: map[dataplane.Key]netip.AddrPort{key(2): ep("198.51.100.2:51820")},
			want:      base,
		},
		{
			name:      "invalid gossip endpoint is ignored",
			nm:        testNetmap(),
			endpoints: map[dataplane.Key]netip.AddrPort{key(3): {}},
			want:      with([]dataplane.Peer{peerB, peerC}, filter),
		},
		{
			name: "netmap addresses and prefixes win over enrollment",
			nm: &netmap.Netmap{Revision: 1, Self: netmap.Node{Name: "a", Addresses: pfx("100.64.0.9/32")},
				OverlayPrefixes: pfx("10.99.0.0/16")},
			want: func() dataplane.State {
				s := base
				s.Addresses = pfx("100.64.0.9/32")
				s.Routes = pfx("10.99.0.0/16")
				return s
			}(),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Desired(local, tt.nm, tt.endpoints)
			if d := cmp.Diff(tt.want, got, cmpOpts); d != "" {
				t.Errorf("Desired mismatch (-want +got):\n%s", d)
			}
		})
	}
}

func TestDrift(t *testing.T) {
	desired := Desired(local, testNetmap(), nil)
	tests := []struct {
		name    string
		mutate  func(s *dataplane.State)
		want    string // substring of the diff; "" means no drift
		notWant string
	}{
		{name: "identical", mutate: func(*dataplane.State) {}},
		{
			name: "learned endpoint of a peer with unknown endpoint is not drift",
			mutate: func(s *dataplane.State) {
				s.Peers[0].Endpoint = netip.MustParseAddrPort("203.0.113.2:1234")
			},
		},
		{
			name: "changed known endpoint is drift",
			mutate: func(s *dataplane.State) {
				s.Peers[1].Endpoint = netip.MustParseAddrPort("203.0.113.3:1234")
			},
			want: "endpoint 203.0.113.3:1234, want 192.0.2.3:51820",
		},
		{name: "missing peer", mutate: func(s *dataplane.State) { s.Peers = s.Peers[:1] }, want: "peer: AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM= missing"},
		{name: "unexpected peer", mutate: func(s *dataplane.State) {
			s.Peers = append(s.Peers, dataplane.Peer{PublicKey: key(4), AllowedIPs: pfx("0.0.0.0/0")})
		}, want: "peer: unexpected BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ= (allowed IPs [0.0.0.0/0])"},
		{name: "keepalive", mutate: func(s *dataplane.State) { s.Peers[0].PersistentKeepalive = 0 }, want: "persistent keepalive 0 s, want 25 s"},
		{name: "MTU", mutate: func(s *dataplane.State) { s.MTU = 1500 }, want: "MTU 1500, want 1420"},
		{name: "set member added", mutate: func(s *dataplane.State) {
			s.Filter.Sets[0].Prefixes = pfx("100.64.0.3/32", "100.64.0.9/32")
		}, want: "nftables: set db: unexpected [100.64.0.9/32]"},
		{name: "rule added by someone else", mutate: func(s *dataplane.State) {
			s.Filter.Ingress = append(s.Filter.Ingress, dataplane.FilterRule{Set: "db", Origin: "drift: accept", Matches: []dataplane.PortMatch{{Protocol: dataplane.ProtoAny}}})
		}, want: "ingress rules [db tcp/5432 (r1); db any (drift: accept)], want [db tcp/5432 (r1)]"},
		{name: "extra allowed IP", mutate: func(s *dataplane.State) {
			s.Peers[0].AllowedIPs = append(s.Peers[0].AllowedIPs, netip.MustParsePrefix("0.0.0.0/0"))
		}, want: "0.0.0.0/0"},
		{name: "filter flushed", mutate: func(s *dataplane.State) { s.Filter = dataplane.Filter{} }, want: "nftables: set db missing; nftables: ingress rules [], want [db tcp/5432 (r1)]"},
		{name: "route removed", mutate: func(s *dataplane.State) { s.Routes = s.Routes[1:] }, want: "route: missing [100.64.0.0/10]"},
		{name: "address added", mutate: func(s *dataplane.State) { s.Addresses = append(s.Addresses, netip.MustParsePrefix("10.0.0.1/32")) }, want: "address: unexpected [10.0.0.1/32]"},
		{
			name:    "private key differs but is not printed",
			mutate:  func(s *dataplane.State) { s.PrivateKey = key(1) },
			want:    "private key differs",
			notWant: "CQkJ",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			observed := dataplane.Canonical(desired)
			tt.mutate(&observed)
			got := drift(desired, observed)
			if tt.want == "" && got != "" {
				t.Fatalf("Drift = %q, want none", got)
			}
			if !strings.Contains(got, tt.want) {
				t.Fatalf("Drift = %q, want it to mention %q", got, tt.want)
			}
			if tt.notWant != "" && strings.Contains(got, tt.notWant) {
				t.Fatalf("Drift = %q, must not contain %q", got, tt.notWant)
			}
		})
	}
}

func start(t *testing.T, resync time.Duration) (*Reconciler, *fake.Dataplane, *testlog.Buffer) {
	t.Helper()
	return startWithClock(t, resync, func() time.Time { return testNow })
}

// startWithClock is start with now as the reconciler's clock.
func startWithClock(t *testing.T, resync time.Duration, now func() time.Time) (*Reconciler, *fake.Dataplane, *testlog.Buffer) {
	t.Helper()
	dp := fake.New(dataplane.KindUserspace)
	logs := &testlog.Buffer{}
	r := New(dp, local, slog.New(slog.NewTextHandler(logs, nil)))
	r.now = now
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); r.Run(ctx, resync) }()
	t.Cleanup(func() { cancel(); <-done })
	return r, dp, logs
}

func wait(t *testing.T, r *Reconciler, gen uint64) Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := r.Wait(ctx, gen)
	if err != nil {
		t.Fatalf("waiting for generation %d: %v", gen, err)
	}
	return st
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestReconcilerAppliesNetmap(t *testing.T) {
	r, dp, _ := start(t, time.Hour)
	st := wait(t, r, r.SetNetmap(nil))
	if st.Err != nil || !st.Programmed || st.Revision != 0 || st.Hash != "" || st.Kind != dataplane.KindUserspace {
		t.Fatalf("status after default deny = %+v", st)
	}
	got, up := dp.State()
	if d := cmp.Diff(Desired(local, nil, nil), got, cmpOpts); !up || d != "" {
		t.Fatalf("default deny state (up=%v):\n%s", up, d)
	}
	if len(got.Peers) != 0 || len(got.Filter.Ingress)+len(got.Filter.Egress) != 0 {
		t.Fatalf("default deny must have no peers and no rules: %+v", got)
	}

	nm := testNetmap()
	st = wait(t, r, r.SetNetmap(nm))
	if st.Err != nil || st.Revision != 7 || st.Hash != "h7" {
		t.Fatalf("status after netmap = %+v", st)
	}
	got, _ = dp.State()
	if d := cmp.Diff(Desired(local, nm, nil), got, cmpOpts); d != "" {
		t.Fatalf("state after netmap (-want +got):\n%s", d)
	}
}

func TestReconcilerRepairsdrift(t *testing.T) {
	tests := []struct {
		name   string
		resync time.Duration
		notify bool
		mutate func(s *dataplane.State)
	}{
		{name: "peer removed, watch event", resync: time.Hour, notify: true, mutate: func(s *dataplane.State) { s.Peers = nil }},
		{name: "filter flushed, watch event", resync: time.Hour, notify: true, mutate: func(s *dataplane.State) { s.Filter = dataplane.Filter{} }},
		{name: "allowed IPs widened, resync tick", resync: 20 * time.Millisecond, mutate: func(s *dataplane.State) {
			s.Peers[0].AllowedIPs = pfx("0.0.0.0/0")
		}},
		{name: "address removed, resync tick", resync: 20 * time.Millisecond, mutate: func(s *dataplane.State) { s.Addresses = nil }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, dp, logs := start(t, tt.resync)
			nm := testNetmap()
			wait(t, r, r.SetNetmap(nm))
			want := Desired(local, nm, nil)
			applies := dp.Stats().Applies

			dp.Mutate(tt.mutate)
			if got, _ := dp.State(); drift(want, got) == "" {
				t.Fatal("mutation did not cause drift")
			}
			if tt.notify {
				dp.Notify()
			}
			eventually(t, "drift repair", func() bool {
				got, _ := dp.State()
				return drift(want, got) == ""
			})
			if dp.Stats().Applies != applies+1 {
				t.Errorf("applies = %d, want %d", dp.Stats().Applies, applies+1)
			}
			eventually(t, "drift log", func() bool { return strings.Contains(logs.String(), "drift repaired") })
		})
	}
}

func TestReconcilerNoApplyWithoutdrift(t *testing.T) {
	r, dp, _ := start(t, time.Hour)
	wait(t, r, r.SetNetmap(testNetmap()))
	// A peer with an unknown endpoint gets one from its handshake: not drift.
	dp.Mutate(func(s *dataplane.State) { s.Peers[0].Endpoint = netip.MustParseAddrPort("203.0.113.9:999") })
	reads := dp.Stats().Reads
	for range 3 {
		dp.Notify()
		eventually(t, "read back", func() bool { return dp.Stats().Reads > reads })
		reads = dp.Stats().Reads
	}
	if got := dp.Stats().Applies; got != 1 {
		t.Fatalf("applies = %d, want 1 (read-back without drift must not apply)", got)
	}
}

// TestReconcilerRecordsLastApply: Status.LastApply is the time the latest
// successful apply finished (a new netmap, a drift repair), with its duration; a
// read-back that finds nothing to do and a failed apply leave both as they were.
func TestReconcilerRecordsLastApply(t *testing.T) {
	var mu sync.Mutex
	clock := testNow
	advance := func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		clock = clock.Add(time.Second)
		return clock
	}
	now := func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		return clock
	}
	r, dp, _ := startWithClock(t, time.Hour, now)
	if st := r.Status(); !st.LastApply.IsZero() || st.LastApplyDuration != 0 {
		t.Fatalf("before any step: last apply %v took %v, want none", st.LastApply, st.LastApplyDuration)
	}
	st := wait(t, r, r.SetNetmap(testNetmap()))
	if !st.LastApply.Equal(testNow) || st.LastApplyDuration <= 0 {
		t.Fatalf("after the first apply: last apply %v took %v, want %v and a duration", st.LastApply, st.LastApplyDuration, testNow)
	}

	// A read-back without drift applies nothing.
	t1 := advance()
	reads := dp.Stats().Reads
	dp.Notify()
	eventually(t, "read back", func() bool { return dp.Stats().Reads > reads })
	if st := r.Status(); !st.LastApply.Equal(testNow) {
		t.Fatalf("after a read-back without drift: last apply %v, want still %v", st.LastApply, testNow)
	}

	// A repair is an apply.
	dp.Mutate(func(s *dataplane.State) { s.Routes = nil })
	dp.Notify()
	eventually(t, "the repair", func() bool { return r.Status().Repairs.Count == 1 })
	if st := r.Status(); !st.LastApply.Equal(t1) || st.LastApplyDuration <= 0 {
		t.Fatalf("after the repair: last apply %v took %v, want %v", st.LastApply, st.LastApplyDuration, t1)
	}

	// A failed apply is not.
	advance()
	dp.FailApply(errors.New("nftables: boom"))
	nm := testNetmap()
	nm.Revision, nm.Hash = 8, "h8"
	nm.Peers = nm.Peers[:1]
	if st := wait(t, r, r.SetNetmap(nm)); st.Err == nil || !st.LastApply.Equal(t1) {
		t.Fatalf("after a failed apply: err %v, last apply %v; want an error and still %v", st.Err, st.LastApply, t1)
	}
}

func TestReconcilerErrors(t *testing.T) {
	r, dp, _ := start(t, 20*time.Millisecond)
	wait(t, r, r.SetNetmap(testNetmap()))

	boom := errors.New("nftables: boom")
	dp.FailApply(boom)
	nm2 := testNetmap()
	nm2.Revision, nm2.Hash = 8, "h8"
	nm2.Peers = nm2.Peers[:1]
	st := wait(t, r, r.SetNetmap(nm2))
	if !errors.Is(st.Err, boom) || st.Revision != 7 || st.Hash != "h7" {
		t.Fatalf("status after failed apply = %+v, want error and revision 7 still in force", st)
	}
	dp.FailApply(nil)
	eventually(t, "retry after failure", func() bool {
		st := r.Status()
		return st.Err == nil && st.Revision == 8
	})
	got, _ := dp.State()
	if d := drift(Desired(local, nm2, nil), got); d != "" {
		t.Fatalf("after retry:\n%s", d)
	}

	readErr := errors.New("netlink: read failed")
	dp.FailRead(readErr)
	eventually(t, "read error in status", func() bool { return errors.Is(r.Status().Err, readErr) })
	dp.FailRead(nil)
	eventually(t, "healthy again", func() bool { return r.Status().Err == nil })
}

func TestReconcilerGossipEndpoints(t *testing.T) {
	r, dp, _ := start(t, time.Hour)
	nm := testNetmap()
	wait(t, r, r.SetNetmap(nm))

	newEP := netip.MustParseAddrPort("198.51.100.3:40000")
	gen, changed := r.SetEndpoints(map[dataplane.Key]netip.AddrPort{key(3): newEP, key(7): netip.MustParseAddrPort("198.51.100.7:1")})
	if !changed {
		t.Fatal("SetEndpoints reported no change")
	}
	wait(t, r, gen)
	got, _ := dp.State()
	if len(got.Peers) != 2 {
		t.Fatalf("peers = %d, want 2 (gossip must not add peers)", len(got.Peers))
	}
	i := slices.IndexFunc(got.Peers, func(p dataplane.Peer) bool { return p.PublicKey == key(3) })
	if i < 0 {
		t.Fatal("peer c is missing")
	}
	p := got.Peers[i]
	if p.Endpoint != newEP {
		t.Fatalf("peer c endpoint = %v, want %v", p.Endpoint, newEP)
	}
	if d := cmp.Diff(pfx("100.64.0.3/32", "fd5e:6d65:7368::3/128"), p.AllowedIPs, cmpOpts); d != "" {
		t.Fatalf("allowed IPs changed:\n%s", d)
	}
	if _, changed := r.SetEndpoints(map[dataplane.Key]netip.AddrPort{key(3): newEP, key(7): netip.MustParseAddrPort("198.51.100.7:1")}); changed {
		t.Fatal("same endpoints reported as a change")
	}
}

// TestReconcilerRecordsNetmapWithoutKernelChange covers a node that no rule mentions:
// its netmap has no peers and no rules, so its desired state equals the default deny
// already in force. The netmap is still enforced and must be recorded (revision and
// hash), or the agent would report revision 0 forever.
func TestReconcilerRecordsNetmapWithoutKernelChange(t *testing.T) {
	r, dp, logs := start(t, time.Hour)
	if st := wait(t, r, r.SetNetmap(nil)); st.Err != nil || st.Revision != 0 {
		t.Fatalf("status after default deny = %+v", st)
	}
	peerless := func(rev uint64) *netmap.Netmap {
		return &netmap.Netmap{
			Revision:        rev,
			Hash:            fmt.Sprintf("h%d", rev),
			Self:            netmap.Node{Name: "a", Addresses: local.Addresses},
			OverlayPrefixes: local.Routes,
		}
	}
	tests := []struct {
		name     string
		nm       *netmap.Netmap
		wantRev  uint64
		wantHash string
		applies  int // applies in total after the step
	}{
		{name: "peerless netmap after default deny", nm: peerless(6), wantRev: 6, wantHash: "h6", applies: 1},
		{name: "next revision, same state", nm: peerless(7), wantRev: 7, wantHash: "h7", applies: 1},
		{name: "netmap with peers applies", nm: testNetmap(), wantRev: 7, wantHash: "h7", applies: 2},
		{name: "peerless again applies", nm: peerless(8), wantRev: 8, wantHash: "h8", applies: 3},
		{name: "back to default deny, same state", nm: nil, wantRev: 0, wantHash: "", applies: 3},
	}
	for _, tt := range tests {
		st := wait(t, r, r.SetNetmap(tt.nm))
		if st.Err != nil || !st.Programmed || st.Revision != tt.wantRev || st.Hash != tt.wantHash {
			t.Fatalf("%s: status = %+v, want revision %d hash %q", tt.name, st, tt.wantRev, tt.wantHash)
		}
		if got := dp.Stats().Applies; got != tt.applies {
			t.Fatalf("%s: applies = %d, want %d", tt.name, got, tt.applies)
		}
		got, _ := dp.State()
		if d := drift(Desired(local, tt.nm, nil), got); d != "" {
			t.Fatalf("%s: dataplane drifted: %s", tt.name, d)
		}
	}
	if !strings.Contains(logs.String(), "already holds its state") {
		t.Error("enforcing a netmap without a kernel change was not logged")
	}
}

// TestReconcilerSetPrivateKey: a key rotation changes only the device's private
// key; peers, addresses and the filter stay, and the netmap stays enforced.
func TestReconcilerSetPrivateKey(t *testing.T) {
	r, dp, _ := start(t, time.Hour)
	nm := testNetmap()
	wait(t, r, r.SetNetmap(nm))
	before, _ := dp.State()
	st := wait(t, r, r.SetPrivateKey(key(8)))
	if st.Err != nil || st.Hash != "h7" {
		t.Fatalf("status after the key change = %+v", st)
	}
	after, _ := dp.State()
	if after.PrivateKey != key(8) {
		t.Fatal("private key not programmed")
	}
	want := before
	want.PrivateKey = key(8)
	if d := cmp.Diff(want, after, cmpOpts); d != "" {
		t.Fatalf("the key change changed more than the key (-want +got):\n%s", d)
	}
	l := local
	l.PrivateKey = key(8)
	if d := drift(Desired(l, nm, nil), after); d != "" {
		t.Fatal(d)
	}
}

// TestDesiredRevoked: a revoked netmap is default deny even if it lists peers.
func TestDesiredRevoked(t *testing.T) {
	nm := testNetmap()
	nm.Revoked = true
	got := Desired(local, nm, map[dataplane.Key]netip.AddrPort{key(2): netip.MustParseAddrPort("192.0.2.9:1")})
	if d := cmp.Diff(Desired(local, nil, nil), got, cmpOpts); d != "" {
		t.Fatalf("revoked netmap (-default deny +got):\n%s", d)
	}
}
