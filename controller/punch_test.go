package controller

import (
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/protobuf/testing/protocmp"

	"segmesh/api/segmeshv1"
)

// TestRequestPunch: a node may ask for hole punching with a peer its netmap
// lists; both ends then get a Punch naming the other, with its key and
// candidates. A node that is no peer, an offline peer (or one whose agent takes
// no Punch) and a pair over its rate limit are refused, each counted.
func TestRequestPunch(t *testing.T) {
	tc := startController(t, t.TempDir())
	webTok, dbTok := tc.createToken(map[string]string{"role": "web"}, true), tc.createToken(map[string]string{"role": "db"}, true)
	agents := map[string]*enrolledAgent{}
	for _, n := range []struct{ name, tok string }{{"web-1", webTok}, {"db-1", dbTok}, {"db-2", dbTok}, {"db-3", dbTok}} {
		agents[n.name] = tc.enroll(n.tok, n.name)
	}
	agents["ops-1"] = tc.enroll(tc.createToken(map[string]string{"role": "ops"}, false), "ops-1")
	apply(t, tc, policyWebDB)
	punchable := []string{featurePunch}
	webCh := tc.rawStream(agents["web-1"], &segmeshv1.SyncRequest{Features: punchable, Candidates: []*segmeshv1.Candidate{cand("local", "10.1.0.11:51820")}})
	dbCh := tc.rawStream(agents["db-1"], &segmeshv1.SyncRequest{Features: punchable, Candidates: []*segmeshv1.Candidate{cand("stun", "203.0.113.12:40000")}})
	tc.rawStream(agents["ops-1"], &segmeshv1.SyncRequest{Features: punchable})
	tc.rawStream(agents["db-3"], &segmeshv1.SyncRequest{}) // predates punching
	// Wait until both netmaps list the other's candidates.
	for _, w := range []struct {
		ch   chan *segmeshv1.NetmapUpdate
		peer string
	}{{webCh, "db-1"}, {dbCh, "web-1"}} {
		for {
			u := recvUpdate(t, w.ch)
			ps := u.GetFull().GetPeers()
			if d := u.GetDelta(); d != nil {
				ps = d.GetUpsertedPeers()
			}
			if len(peerNamedIn(ps, w.peer).GetCandidates()) > 0 {
				break
			}
		}
	}
	eventually(t, "db-3 online", func() bool { on, _ := tc.c.live.online("db-3"); return on })

	tests := []struct {
		name, caller, peer string
		advance            time.Duration
		code               connect.Code // 0: ok
		msg                string
		// drain uses up the caller's budget over all peers first, as requests
		// for as many other peers would.
		drain bool
	}{
		{name: "peer", caller: "web-1", peer: "db-1"},
		{name: "the other end, within the burst", caller: "db-1", peer: "web-1"},
		{name: "over the pair's limit", caller: "web-1", peer: "db-1", code: connect.CodeResourceExhausted},
		{name: "after 2 s", caller: "db-1", peer: "web-1", advance: 2 * time.Second},
		{name: "not a peer", caller: "web-1", peer: "ops-1", code: connect.CodeFailedPrecondition, msg: `peer "ops-1" is not in your netmap`},
		{name: "itself", caller: "web-1", peer: "web-1", code: connect.CodeFailedPrecondition, msg: "not in your netmap"},
		{name: "unknown", caller: "web-1", peer: "ghost\n", code: connect.CodeFailedPrecondition, msg: "not in your netmap"},
		{name: "offline peer", caller: "web-1", peer: "db-2", code: connect.CodeFailedPrecondition, msg: "peer db-2 is offline"},
		{name: "peer without punching", caller: "web-1", peer: "db-3", code: connect.CodeFailedPrecondition, msg: "does not take punch requests"},
		{name: "over the caller's limit over all peers", caller: "db-1", peer: "web-1", advance: 2 * time.Second, drain: true, code: connect.CodeResourceExhausted, msg: "over all peers"},
	}
	for _, tt := range tests {
		tc.clock.Advance(tt.advance)
		for tt.drain && tc.c.punchNodes.allow(tt.caller, tc.c.now()) {
		}
		_, err := tc.agent(agents[tt.caller]).RequestPunch(bg, connect.NewRequest(&segmeshv1.RequestPunchRequest{Peer: tt.peer}))
		if tt.code != 0 {
			if ce := wantCode(t, err, tt.code); !strings.Contains(ce.Message(), tt.msg) {
				t.Errorf("%s: %q, want it to say %q", tt.name, ce.Message(), tt.msg)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		for _, end := range []struct {
			ch         chan *segmeshv1.NetmapUpdate
			other      string
			candidates []*segmeshv1.Candidate
		}{{webCh, "db-1", []*segmeshv1.Candidate{cand("stun", "203.0.113.12:40000")}}, {dbCh, "web-1", []*segmeshv1.Candidate{cand("local", "10.1.0.11:51820")}}} {
			p := recvUpdate(t, end.ch).GetPunch()
			want := &segmeshv1.Punch{Peer: end.other, PublicKey: agents[end.other].id.publicKey, Candidates: end.candidates}
			if d := cmp.Diff(want, p, protocmp.Transform()); d != "" {
				t.Errorf("%s: punch (-want +got):\n%s", tt.name, d)
			}
		}
	}
	for result, want := range map[string]float64{punchOK: 3, punchLimited: 2, punchNotPeer: 3, punchOffline: 2} {
		if got := testutil.ToFloat64(tc.c.metrics.punchRequests.WithLabelValues(result)); got != want {
			t.Errorf("punch requests %s: %v, want %v", result, got, want)
		}
	}
}

func peerNamedIn(ps []*segmeshv1.Peer, name string) *segmeshv1.Peer {
	return peerNamed(&segmeshv1.Netmap{Peers: ps}, name)
}
