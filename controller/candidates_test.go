package controller

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
	"segmesh/controller/store"
)

func cand(kind, ep string) *segmeshv1.Candidate {
	return &segmeshv1.Candidate{Kind: kind, Endpoint: ep}
}

func TestNodeCandidates(t *testing.T) {
	overlay := DefaultOverlayPrefixes()
	local := func(ep string) store.Candidate { return store.Candidate{Endpoint: ep, Kind: candidateLocal} }
	stun := func(ep string) store.Candidate { return store.Candidate{Endpoint: ep, Kind: candidateSTUN} }
	observed := func(ep string) store.Candidate { return store.Candidate{Endpoint: ep, Kind: candidateObserved} }
	var nine []*segmeshv1.Candidate
	var eight []store.Candidate
	for i := range 9 {
		ep := fmt.Sprintf("10.0.0.%d:51820", i+1)
		nine = append(nine, cand("local", ep))
		if i < 8 {
			eight = append(eight, local(ep))
		}
	}
	tests := []struct {
		name       string
		advertised []*segmeshv1.Candidate
		observed   string
		want       []store.Candidate
		dropped    int
	}{
		{name: "none", want: nil},
		{name: "observed only", observed: "198.51.100.1:51820", want: []store.Candidate{observed("198.51.100.1:51820")}},
		{name: "order local observed stun",
			advertised: []*segmeshv1.Candidate{cand("stun", "203.0.113.5:4000"), cand("local", "10.0.0.1:51820"), cand("local", "[2001:db8::1]:51820")},
			observed:   "198.51.100.1:51820",
			want:       []store.Candidate{local("10.0.0.1:51820"), local("[2001:db8::1]:51820"), observed("198.51.100.1:51820"), stun("203.0.113.5:4000")}},
		{name: "observed equal to a local is left out",
			advertised: []*segmeshv1.Candidate{cand("local", "198.51.100.1:51820")}, observed: "198.51.100.1:51820",
			want: []store.Candidate{local("198.51.100.1:51820")}},
		{name: "observed wins over an equal stun",
			advertised: []*segmeshv1.Candidate{cand("stun", "198.51.100.1:51820")}, observed: "198.51.100.1:51820",
			want: []store.Candidate{observed("198.51.100.1:51820")}},
		{name: "dedupe by endpoint, first kind wins",
			advertised: []*segmeshv1.Candidate{cand("stun", "203.0.113.5:4000"), cand("local", "203.0.113.5:4000"), cand("stun", "203.0.113.5:4000")},
			want:       []store.Candidate{stun("203.0.113.5:4000")}},
		{name: "mapped IPv4 normalised and deduped",
			advertised: []*segmeshv1.Candidate{cand("local", "[::ffff:10.0.0.1]:51820"), cand("local", "10.0.0.1:51820")},
			want:       []store.Candidate{local("10.0.0.1:51820")}},
		{name: "agents cannot claim observed or relay",
			advertised: []*segmeshv1.Candidate{cand("observed", "203.0.113.5:4000"), cand("relay", "203.0.113.6:4000"), cand("", "203.0.113.7:4000"), cand("local", "10.0.0.1:51820")},
			want:       []store.Candidate{local("10.0.0.1:51820")}, dropped: 3},
		{name: "invalid endpoints dropped",
			advertised: []*segmeshv1.Candidate{
				cand("local", "10.0.0.1"), cand("local", "10.0.0.1:0"), cand("local", "0.0.0.0:51820"), cand("local", "[::]:51820"),
				cand("local", "224.0.0.1:51820"), cand("local", "169.254.1.1:51820"), cand("local", "[fe80::1]:51820"),
				cand("local", "100.64.0.7:51820"), cand("stun", "[fd5e:6d65:7368::7]:51820"), cand("local", "host:51820"),
				cand("stun", "203.0.113.5:4000")},
			want: []store.Candidate{stun("203.0.113.5:4000")}, dropped: 10},
		{name: "at most eight accepted", advertised: nine, want: eight, dropped: 1},
		{name: "eight plus observed", advertised: nine[:8], observed: "198.51.100.1:51820", want: append(slices.Clone(eight), observed("198.51.100.1:51820"))},
		{name: "invalid observed left out", observed: "100.64.0.9:51820", want: nil},
		{name: "loopback observed left out", observed: "127.0.0.1:51820", want: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var obs netip.AddrPort
			if tt.observed != "" {
				obs = netip.MustParseAddrPort(tt.observed)
			}
			got, dropped, reason := nodeCandidates(tt.advertised, obs, overlay)
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Errorf("candidates (-want +got):\n%s", d)
			}
			if dropped != tt.dropped || (dropped > 0) != (reason != "") {
				t.Errorf("dropped %d (reason %q), want %d", dropped, reason, tt.dropped)
			}
		})
	}
}

func TestObservedEndpoint(t *testing.T) {
	tests := []struct{ source, wg, want string }{
		{"198.51.100.1:40000", "10.0.0.1:51820", "198.51.100.1:51820"},
		{"[::ffff:198.51.100.1]:40000", "10.0.0.1:51820", "198.51.100.1:51820"},
		{"[2001:db8::1]:40000", "10.0.0.1:4242", "[2001:db8::1]:4242"},
		{"198.51.100.1:40000", "", ""},
		{"", "10.0.0.1:51820", ""},
	}
	for _, tt := range tests {
		got := observedEndpoint(tt.source, tt.wg)
		if s := got.String(); (tt.want == "" && got.IsValid()) || (tt.want != "" && s != tt.want) {
			t.Errorf("observedEndpoint(%q, %q) = %v, want %q", tt.source, tt.wg, got, tt.want)
		}
	}
}

// storedCandidates returns node name's stored candidates.
func (tc *testController) storedCandidates(name string) []store.Candidate {
	tc.t.Helper()
	n, _ := tc.node(name)
	return n.Candidates
}

func peerNamed(nm *segmeshv1.Netmap, name string) *segmeshv1.Peer {
	for _, p := range nm.GetPeers() {
		if p.GetName() == name {
			return p
		}
	}
	return nil
}

// TestStreamStoresCandidates: the candidates an agent advertises when it opens
// its stream are checked and stored, and its peers' netmaps list them; invalid
// ones never break the stream. The controller adds the observed candidate from
// the TCP source (loopback here, so it is left out; see
// TestUpdateCandidatesObserved).
func TestStreamStoresCandidates(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	db := tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	apply(t, tc, policyWebDB)
	dbStream := tc.sync(db, &segmeshv1.SyncRequest{Endpoint: "192.0.2.12:51820"})
	webStream := tc.sync(web, &segmeshv1.SyncRequest{Endpoint: "192.0.2.11:51820", Candidates: []*segmeshv1.Candidate{
		cand("stun", "203.0.113.11:40001"), cand("local", "10.1.0.11:51820"), cand("observed", "203.0.113.99:1"), cand("local", "127.0.0.1:51820"),
	}})
	webStream.next(t) // the stream works despite the invalid candidates
	want := []store.Candidate{{Endpoint: "10.1.0.11:51820", Kind: "local"}, {Endpoint: "203.0.113.11:40001", Kind: "stun"}}
	if d := cmp.Diff(want, tc.storedCandidates("web-1")); d != "" {
		t.Fatalf("stored candidates (-want +got):\n%s", d)
	}
	wantPeer := []*segmeshv1.Candidate{cand("local", "10.1.0.11:51820"), cand("stun", "203.0.113.11:40001")}
	nm := dbStream.next(t)
	for ; len(peerNamed(nm, "web-1").GetCandidates()) == 0; nm = dbStream.next(t) {
	}
	if d := cmp.Diff(wantPeer, peerNamed(nm, "web-1").GetCandidates(), protocmp.Transform()); d != "" {
		t.Errorf("db-1's netmap: web-1's candidates (-want +got):\n%s", d)
	}
	if got := peerNamed(nm, "web-1").GetEndpoint(); got != "192.0.2.11:51820" {
		t.Errorf("db-1's netmap: web-1's endpoint %q, want 192.0.2.11:51820 (unchanged by candidates)", got)
	}
}

// TestUpdateCandidatesObserved: the controller adds the endpoint it observes (the
// TCP source's IP with the WireGuard port), writes only on change, and refuses
// a revoked node.
func TestUpdateCandidatesObserved(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	node := func() store.Node {
		n, _ := tc.node(web.name)
		return n
	}
	adv := []*segmeshv1.Candidate{cand("stun", "198.51.100.7:51820"), cand("local", "10.1.0.11:51820")}
	if err := tc.c.updateCandidates(node(), "198.51.100.7:41234", "10.1.0.11:51820", adv); err != nil {
		t.Fatal(err)
	}
	want := []store.Candidate{{Endpoint: "10.1.0.11:51820", Kind: "local"}, {Endpoint: "198.51.100.7:51820", Kind: "observed"}}
	if d := cmp.Diff(want, tc.storedCandidates(web.name)); d != "" {
		t.Fatalf("stored candidates (-want +got):\n%s", d)
	}
	// The stored endpoint's port when the call names none (a report).
	if err := tc.c.updateCandidates(node(), "198.51.100.8:41234", "", nil); err != nil {
		t.Fatal(err)
	}
	want = []store.Candidate{{Endpoint: "198.51.100.8:51820", Kind: "observed"}}
	if d := cmp.Diff(want, tc.storedCandidates(web.name)); d != "" {
		t.Fatalf("stored candidates without an endpoint in the call (-want +got):\n%s", d)
	}
	// No change, no budget: more than the burst of unchanged updates pass.
	for range endpointChangeBurst + 1 {
		if err := tc.c.updateCandidates(node(), "198.51.100.8:41234", "", nil); err != nil {
			t.Fatalf("unchanged candidates: %v", err)
		}
	}
	var last error
	for i := range endpointChangeBurst {
		last = tc.c.updateCandidates(node(), fmt.Sprintf("198.51.100.%d:1", 20+i), "", nil)
	}
	wantCode(t, last, connect.CodeResourceExhausted)
	tc.clock.Advance(time.Minute)
	if _, err := tc.op().RevokeNode(bg, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: web.name})); err != nil {
		t.Fatal(err)
	}
	wantCode(t, tc.c.updateCandidates(node(), "198.51.100.9:1", "", nil), connect.CodePermissionDenied)
}

// rawStream receives a SyncUpdates stream's messages as sent.
func (tc *testController) rawStream(a *enrolledAgent, req *segmeshv1.SyncRequest) chan *segmeshv1.NetmapUpdate {
	tc.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	tc.t.Cleanup(cancel)
	stream, err := tc.agent(a).SyncUpdates(ctx, connect.NewRequest(req))
	if err != nil {
		tc.t.Fatalf("SyncUpdates %s: %v", a.name, err)
	}
	ch := make(chan *segmeshv1.NetmapUpdate, 64)
	go func() {
		defer close(ch)
		defer stream.Close()
		for stream.Receive() {
			ch <- stream.Msg()
		}
	}()
	return ch
}

func recvUpdate(t *testing.T, ch chan *segmeshv1.NetmapUpdate) *segmeshv1.NetmapUpdate {
	t.Helper()
	select {
	case u, ok := <-ch:
		if !ok {
			t.Fatal("stream ended")
		}
		return u
	case <-time.After(10 * time.Second):
		t.Fatal("no update within 10s")
	}
	return nil
}

// TestCandidateChangeDelta: a node's new candidates (a report) reach its peer
// as a delta that upserts the node, whose result hash agrees with api/wire.
func TestCandidateChangeDelta(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	db := tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	tc.enroll(tc.createToken(map[string]string{"role": "ops"}, false), "ops-1")
	apply(t, tc, policyWebDB)
	ch := tc.rawStream(db, &segmeshv1.SyncRequest{})
	held := recvUpdate(t, ch).GetFull()
	if held == nil || peerNamed(held, "web-1") == nil {
		t.Fatalf("first update %v, want a whole netmap listing web-1", held)
	}
	adv := []*segmeshv1.Candidate{cand("local", "10.1.0.11:51820"), cand("stun", "203.0.113.11:40001")}
	if _, err := tc.agent(web).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{Candidates: adv})); err != nil {
		t.Fatal(err)
	}
	d := recvUpdate(t, ch).GetDelta()
	if d == nil || len(d.GetUpsertedPeers()) != 1 || d.GetUpsertedPeers()[0].GetName() != "web-1" {
		t.Fatalf("update after web-1's candidates changed: %v, want a delta upserting web-1", d)
	}
	if d := cmp.Diff(adv, d.GetUpsertedPeers()[0].GetCandidates(), protocmp.Transform()); d != "" {
		t.Errorf("upserted web-1's candidates (-want +got):\n%s", d)
	}
	after, err := wire.ApplyDelta(held, d)
	if err != nil {
		t.Fatalf("applying the delta: %v", err)
	}
	if h := wire.NetmapHashV2(after); h != d.GetHash() {
		t.Errorf("delta result hashes to %.12s with api/wire, delta says %.12s", h, d.GetHash())
	}
	if want, _, _ := tc.c.engine.Netmap("db-1"); !cmp.Equal(want, after, protocmp.Transform()) {
		t.Errorf("netmap after the delta differs from the controller's:\n%s", cmp.Diff(want, after, protocmp.Transform()))
	}
}
