package controller

import (
	"bytes"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/protobuf/testing/protocmp"

	"segmesh/api/segmeshv1"
	"segmesh/controller/relays"
)

// policyRelay connects web to db and ops; relay-1 may relay for web and db
// (not ops).
const policyRelay = policyWebDB + `  - name: web-to-ops
    from: [web]
    to: [ops]
    ports: [tcp/22]
relays:
  - node: relay-1
    for: [web, db]
`

// relayLab is a controller with policyRelay, the nodes web-1, db-1, ops-1 and
// relay-1, streams for web-1, db-1 and ops-1 (feature punch) and relay-1
// (feature relay, ports 40000-40009, STUN candidate 203.0.113.50).
type relayLab struct {
	tc                *testController
	web, db, ops, rel *enrolledAgent
	webCh, dbCh       chan *segmeshv1.NetmapUpdate
	relCh             chan *segmeshv1.NetmapUpdate
}

func newRelayLab(t *testing.T) *relayLab {
	t.Helper()
	tc := startController(t, t.TempDir())
	l := &relayLab{tc: tc,
		web: tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1"),
		db:  tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1"),
		ops: tc.enroll(tc.createToken(map[string]string{"role": "ops"}, false), "ops-1"),
		rel: tc.enroll(tc.createToken(map[string]string{"role": "relay"}, false), "relay-1"),
	}
	apply(t, tc, policyRelay)
	punch := &segmeshv1.SyncRequest{Features: []string{featurePunch}}
	l.webCh = tc.rawStream(l.web, punch)
	l.dbCh = tc.rawStream(l.db, punch)
	opsCh := tc.rawStream(l.ops, punch)
	for _, ch := range []chan *segmeshv1.NetmapUpdate{l.webCh, l.dbCh, opsCh} {
		if u := recvUpdate(t, ch); u.GetFull() == nil {
			t.Fatalf("first update %v, want a whole netmap", u)
		}
	}
	l.relCh = l.relayStream(t, "40000-40009")
	if got := l.nextRelayConfig(t); len(got.GetSessions()) != 0 {
		t.Fatalf("relay config at stream open = %v, want no sessions", got)
	}
	return l
}

// relayStream opens a relay-1 stream offering ports and waits for its netmap.
func (l *relayLab) relayStream(t *testing.T, ports string) chan *segmeshv1.NetmapUpdate {
	t.Helper()
	ch := l.tc.rawStream(l.rel, &segmeshv1.SyncRequest{Endpoint: "192.0.2.50:51820", Features: []string{featureRelay}, RelayPorts: ports,
		Candidates: []*segmeshv1.Candidate{cand("stun", "203.0.113.50:51820")}})
	if u := recvUpdate(t, ch); u.GetFull() == nil {
		t.Fatalf("relay-1 first update %v, want a whole netmap", u)
	}
	return ch
}

// nextOf returns the next update of ch that pick accepts (netmaps skipped).
func nextOf[T any](t *testing.T, ch chan *segmeshv1.NetmapUpdate, pick func(*segmeshv1.NetmapUpdate) (T, bool)) T {
	t.Helper()
	for {
		u := recvUpdate(t, ch)
		if v, ok := pick(u); ok {
			return v
		}
		if u.GetFull() == nil && u.GetDelta() == nil {
			t.Fatalf("unexpected update %v", u)
		}
	}
}

func (l *relayLab) nextRelayConfig(t *testing.T) *segmeshv1.RelayConfig {
	t.Helper()
	return nextOf(t, l.relCh, func(u *segmeshv1.NetmapUpdate) (*segmeshv1.RelayConfig, bool) {
		return u.GetRelay(), u.GetRelay() != nil
	})
}

func nextPunch(t *testing.T, ch chan *segmeshv1.NetmapUpdate) *segmeshv1.Punch {
	t.Helper()
	return nextOf(t, ch, func(u *segmeshv1.NetmapUpdate) (*segmeshv1.Punch, bool) { return u.GetPunch(), u.GetPunch() != nil })
}

func (l *relayLab) request(a *enrolledAgent, peer string) (*segmeshv1.RequestRelayResponse, error) {
	resp, err := l.tc.agent(a).RequestRelay(bg, connect.NewRequest(&segmeshv1.RequestRelayRequest{Peer: peer}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

func (l *relayLab) mustRequest(t *testing.T, a *enrolledAgent, peer string) *segmeshv1.RequestRelayResponse {
	t.Helper()
	resp, err := l.request(a, peer)
	if err != nil {
		t.Fatalf("RequestRelay %s -> %s: %v", a.name, peer, err)
	}
	return resp
}

func relayResult(tc *testController, result string) float64 {
	return testutil.ToFloat64(tc.c.metrics.relayRequests.WithLabelValues(result))
}

// TestRequestRelay: an authorised pair gets a session on the relay; the caller
// its candidate, the peer its own in a Punch, the relay its RelayConfig; the
// peer asking in turn renews the same session.
func TestRequestRelay(t *testing.T) {
	l := newRelayLab(t)
	tc := l.tc
	expires := tc.clock.Now().Add(relays.DefaultTTL).Unix()

	resp := l.mustRequest(t, l.web, "db-1")
	want := &segmeshv1.RequestRelayResponse{Candidate: cand("relay", "203.0.113.50:40000"), ExpiresUnix: expires}
	want.Candidate.Relay = "relay-1"
	if d := cmp.Diff(want, resp, protocmp.Transform()); d != "" {
		t.Errorf("response (-want +got):\n%s", d)
	}
	wantPunch := &segmeshv1.Punch{Peer: "web-1", PublicKey: l.web.id.publicKey, Candidates: []*segmeshv1.Candidate{
		{Endpoint: "203.0.113.50:40001", Kind: "relay", Relay: "relay-1"}}}
	if d := cmp.Diff(wantPunch, nextPunch(t, l.dbCh), protocmp.Transform()); d != "" {
		t.Errorf("punch to db-1 (-want +got):\n%s", d)
	}
	wantCfg := &segmeshv1.RelayConfig{Sessions: []*segmeshv1.RelaySession{{Id: 1, KeyA: l.web.id.publicKey, KeyB: l.db.id.publicKey,
		PortA: 40000, PortB: 40001, ExpiresUnix: expires}}}
	if d := cmp.Diff(wantCfg, l.nextRelayConfig(t), protocmp.Transform()); d != "" {
		t.Errorf("relay config (-want +got):\n%s", d)
	}

	// db-1 asks later: the same session, renewed, with db-1's port.
	tc.clock.Advance(time.Minute)
	resp = l.mustRequest(t, l.db, "web-1")
	if ep := resp.GetCandidate().GetEndpoint(); ep != "203.0.113.50:40001" || resp.GetExpiresUnix() != expires+60 {
		t.Errorf("db-1's response %v, want 203.0.113.50:40001 expiring at %d", resp, expires+60)
	}
	if p := nextPunch(t, l.webCh); p.GetPeer() != "db-1" || p.GetCandidates()[0].GetEndpoint() != "203.0.113.50:40000" {
		t.Errorf("punch to web-1 = %v, want db-1 via 203.0.113.50:40000", p)
	}
	if cfg := l.nextRelayConfig(t); len(cfg.GetSessions()) != 1 || cfg.GetSessions()[0].GetId() != 1 || cfg.GetSessions()[0].GetExpiresUnix() != expires+60 {
		t.Errorf("relay config after renewal = %v, want session 1 expiring at %d", cfg, expires+60)
	}
	if n := testutil.ToFloat64(tc.c.metrics.relaySessions); n != 1 {
		t.Errorf("relay sessions gauge = %v, want 1", n)
	}
	if n := relayResult(tc, relayOK); n != 2 {
		t.Errorf("ok requests = %v, want 2", n)
	}
}

// TestRequestRelayRefused: pairs the policy does not connect, or whose relay
// `for` leaves one out, or whose peer is offline, get no session.
func TestRequestRelayRefused(t *testing.T) {
	l := newRelayLab(t)
	tc := l.tc
	tests := []struct {
		name       string
		from       *enrolledAgent
		peer       string
		code       connect.Code
		msg        string
		metricName string
	}{
		{"not peers", l.db, "ops-1", connect.CodeFailedPrecondition, "not in your netmap", relayNotPeer},
		{"unknown peer", l.db, "nobody", connect.CodeFailedPrecondition, "not in your netmap", relayNotPeer},
		{"self", l.db, "db-1", connect.CodeFailedPrecondition, "not in your netmap", relayNotPeer},
		{"relay for leaves ops out", l.web, "ops-1", connect.CodeFailedPrecondition, "no relay the policy lets web-1 and ops-1 both use is online", relayNoRelay},
		{"relay itself", l.web, "relay-1", connect.CodeFailedPrecondition, "not in your netmap", relayNotPeer},
	}
	for _, tt := range tests {
		_, err := l.request(tt.from, tt.peer)
		if ce := wantCode(t, err, tt.code); !strings.Contains(ce.Message(), tt.msg) {
			t.Errorf("%s: message %q, want it to contain %q", tt.name, ce.Message(), tt.msg)
		}
		if n := relayResult(tc, tt.metricName); n == 0 {
			t.Errorf("%s: %s not counted", tt.name, tt.metricName)
		}
	}
	if n := tc.c.relays.alloc.Total(); n != 0 {
		t.Errorf("refused requests left %d sessions", n)
	}
}

// TestRequestRelayPeerOffline: a peer without a stream taking punches gets no
// session.
func TestRequestRelayPeerOffline(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	db := tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	rel := tc.enroll(tc.createToken(map[string]string{"role": "relay"}, false), "relay-1")
	apply(t, tc, policyRelay)
	recvUpdate(t, tc.rawStream(rel, &segmeshv1.SyncRequest{Features: []string{featureRelay}, RelayPorts: "40000-40009"}))
	l := &relayLab{tc: tc}
	_, err := l.request(web, "db-1")
	wantCode(t, err, connect.CodeFailedPrecondition)
	dbStream := tc.sync(db, &segmeshv1.SyncRequest{}) // no punch feature
	dbStream.next(t)
	_, err = l.request(web, "db-1")
	if ce := wantCode(t, err, connect.CodeFailedPrecondition); !strings.Contains(ce.Message(), "offline") {
		t.Errorf("message %q, want offline", ce.Message())
	}
	if n := relayResult(tc, relayOffline); n != 2 {
		t.Errorf("offline requests = %v, want 2", n)
	}
}

// TestRelayLifecycle: expiry, revocation, key rotation, a policy that no
// longer names the relay, and the relay's stream closing each remove sessions
// (the relay told each time).
func TestRelayLifecycle(t *testing.T) {
	l := newRelayLab(t)
	tc := l.tc
	session := func() {
		t.Helper()
		l.mustRequest(t, l.web, "db-1")
		if cfg := l.nextRelayConfig(t); len(cfg.GetSessions()) != 1 {
			t.Fatalf("relay config = %v, want one session", cfg)
		}
	}
	wantEmpty := func(what string) {
		t.Helper()
		if cfg := l.nextRelayConfig(t); len(cfg.GetSessions()) != 0 {
			t.Fatalf("%s: relay config = %v, want no sessions", what, cfg)
		}
		if n := tc.c.relays.alloc.Total(); n != 0 {
			t.Fatalf("%s: %d sessions left", what, n)
		}
	}

	// Expiry.
	session()
	tc.clock.Advance(relays.DefaultTTL - time.Second)
	tc.c.relaySweep()
	if n := tc.c.relays.alloc.Total(); n != 1 {
		t.Fatalf("before expiry: %d sessions, want 1", n)
	}
	tc.clock.Advance(time.Second)
	tc.c.relaySweep()
	wantEmpty("expiry")

	// Key rotation of an end.
	session()
	gen, err := tc.op().RotateNodeKey(bg, connect.NewRequest(&segmeshv1.RotateNodeKeyRequest{Name: "db-1"}))
	if err != nil {
		t.Fatal(err)
	}
	newKey := bytes.Repeat([]byte{7}, 32)
	if _, err := tc.agent(l.db).RotateKey(bg, connect.NewRequest(&segmeshv1.RotateKeyRequest{PublicKey: newKey, Generation: gen.Msg.GetGeneration()})); err != nil {
		t.Fatal(err)
	}
	wantEmpty("key rotation")
	l.mustRequest(t, l.web, "db-1")
	if cfg := l.nextRelayConfig(t); len(cfg.GetSessions()) != 1 || !bytes.Equal(cfg.GetSessions()[0].GetKeyB(), newKey) {
		t.Fatalf("relay config after rotation = %v, want one session with db-1's new key", cfg)
	}

	// A policy without the relay: it is told it has no sessions, and none is given.
	apply(t, tc, strings.Replace(policyRelay, "relay-1", "relay-2", 1))
	wantEmpty("policy without relay-1")
	_, err = l.request(l.web, "db-1")
	wantCode(t, err, connect.CodeFailedPrecondition)
	// The policy names it again: it is a relay again at once.
	apply(t, tc, policyRelay)
	wantEmpty("policy with relay-1 again") // pushed when it becomes a relay
	session()

	// Relabeling an end out of the relay's for: still peers (web-to-ops), no
	// longer a pair the relay may serve.
	relabel := func(role string) {
		t.Helper()
		if _, err := tc.op().LabelNode(bg, connect.NewRequest(&segmeshv1.LabelNodeRequest{Name: "db-1", Set: map[string]string{"role": role}})); err != nil {
			t.Fatal(err)
		}
	}
	relabel("ops")
	wantEmpty("relabel out of for")
	relabel("db")
	tc.clock.Advance(5 * time.Second) // web-1's request budget
	session()

	// Revocation of an end.
	if _, err := tc.op().RevokeNode(bg, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: "db-1"})); err != nil {
		t.Fatal(err)
	}
	wantEmpty("revocation")
	if n := tc.c.relays.alloc.Total(); n != 0 {
		t.Fatalf("after revocation: %d sessions", n)
	}
}

// TestRelayStreams: a relay is available while one of its streams offers to
// relay with valid ports; a newer stream's ports are used; invalid ports are
// ignored.
func TestRelayStreams(t *testing.T) {
	l := newRelayLab(t)
	tc := l.tc
	l.mustRequest(t, l.web, "db-1")
	l.nextRelayConfig(t)

	// A second stream with another range: the newest stream's range is used,
	// sessions outside it are dropped.
	old := l.relCh
	l.relCh = l.relayStream(t, "41000-41009")
	if cfg := l.nextRelayConfig(t); len(cfg.GetSessions()) != 0 {
		t.Fatalf("relay config of the new stream = %v, want none (the old ports are outside)", cfg)
	}
	if resp := l.mustRequest(t, l.web, "db-1"); resp.GetCandidate().GetEndpoint() != "203.0.113.50:41000" {
		t.Errorf("candidate %v, want port 41000", resp.GetCandidate())
	}

	// A stream with invalid ports does not make a relay.
	tc.c.relayStreamOpened("ops-1", 99, []string{featureRelay}, "80-90")
	if tc.c.relays.alloc.Online("ops-1") {
		t.Error("ops-1 with ports 80-90 is a relay")
	}
	// Relay streams of a node the policy does not name make no relay.
	tc.c.relayStreamOpened("ops-1", 99, []string{featureRelay}, "40000-40009")
	if tc.c.relays.alloc.Online("ops-1") {
		t.Error("ops-1, not named by the policy, is a relay")
	}
	tc.c.relayStreamClosed("ops-1", 99)
	tc.c.relayStreamClosed("relay-1", 0) // an unknown stream changes nothing
	if !tc.c.relays.alloc.Online("relay-1") {
		t.Fatal("closing an unknown stream took relay-1 offline")
	}

	// Revoking the relay ends its streams: it is offline, its sessions gone.
	if _, err := tc.op().RevokeNode(bg, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: "relay-1"})); err != nil {
		t.Fatal(err)
	}
	waitClosed(t, old)
	waitClosed(t, l.relCh)
	if tc.c.relays.alloc.Online("relay-1") || tc.c.relays.alloc.Total() != 0 {
		t.Fatalf("after the relay's streams ended: online %v, %d sessions", tc.c.relays.alloc.Online("relay-1"), tc.c.relays.alloc.Total())
	}
	_, err := l.request(l.web, "db-1")
	if ce := wantCode(t, err, connect.CodeFailedPrecondition); !strings.Contains(ce.Message(), "no relay") {
		t.Errorf("message %q, want no relay", ce.Message())
	}
}

// waitClosed reads ch until the stream behind it ends.
func waitClosed(t *testing.T, ch chan *segmeshv1.NetmapUpdate) {
	t.Helper()
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-time.After(10 * time.Second):
			t.Fatal("stream did not end within 10s")
		}
	}
}

// TestRequestRelayRateLimit: past the burst a node's requests are refused with
// ResourceExhausted until the budget refills.
func TestRequestRelayRateLimit(t *testing.T) {
	l := newRelayLab(t)
	tc := l.tc
	for i := range relayRequestBurst {
		if _, err := l.request(l.web, "db-1"); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	_, err := l.request(l.web, "db-1")
	wantCode(t, err, connect.CodeResourceExhausted)
	if n := relayResult(tc, relayLimited); n != 1 {
		t.Errorf("limited requests = %v, want 1", n)
	}
	// Another node is not limited by web-1.
	l.mustRequest(t, l.db, "web-1")
	tc.clock.Advance(time.Second)
	l.mustRequest(t, l.web, "db-1")
}

// TestRequestRelayExhausted: a relay without free ports refuses further pairs
// with ResourceExhausted; renewing a pair it holds still works.
func TestRequestRelayExhausted(t *testing.T) {
	l := newRelayLab(t)
	tc := l.tc
	l.relCh = l.relayStream(t, "40000-40001") // one session
	web2 := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-2")
	recvUpdate(t, tc.rawStream(web2, &segmeshv1.SyncRequest{Features: []string{featurePunch}}))
	l.mustRequest(t, l.web, "db-1")
	_, err := l.request(web2, "db-1")
	if ce := wantCode(t, err, connect.CodeResourceExhausted); !strings.Contains(ce.Message(), "no free ports") {
		t.Errorf("message %q, want no free ports", ce.Message())
	}
	if n := relayResult(tc, relayExhausted); n != 1 {
		t.Errorf("exhausted requests = %v, want 1", n)
	}
	l.mustRequest(t, l.db, "web-1")
}

// TestRequestRelayRenewsOnItsRelay: asking again renews the pair's session on
// the relay it is on, even when another relay has fewer sessions; otherwise
// every request (or renewal) could take one more session of both ends' budgets,
// one per relay, and move the pair.
func TestRequestRelayRenewsOnItsRelay(t *testing.T) {
	l := newRelayLab(t)
	tc := l.tc
	rel2 := tc.enroll(tc.createToken(map[string]string{"role": "relay"}, false), "relay-2")
	apply(t, tc, policyRelay+`  - node: relay-2
    for: [web, db]
`)
	ch := tc.rawStream(rel2, &segmeshv1.SyncRequest{Endpoint: "192.0.2.51:51820", Features: []string{featureRelay}, RelayPorts: "42000-42009",
		Candidates: []*segmeshv1.Candidate{cand("stun", "203.0.113.51:51820")}})
	recvUpdate(t, ch)
	eventually(t, "relay-2 online", func() bool { return tc.c.relays.alloc.Online("relay-2") })
	first := l.mustRequest(t, l.web, "db-1").GetCandidate()
	for _, asker := range []*enrolledAgent{l.web, l.db} {
		got := l.mustRequest(t, asker, map[string]string{"web-1": "db-1", "db-1": "web-1"}[asker.name]).GetCandidate()
		if got.GetRelay() != first.GetRelay() {
			t.Errorf("%s asked again: relay %s, want the pair's %s", asker.name, got.GetRelay(), first.GetRelay())
		}
	}
	if n := tc.c.relays.alloc.Total(); n != 1 {
		t.Fatalf("%d sessions for one pair, want 1", n)
	}
}

// TestRelayPruneWaitsForRequestInFlight: an inventory change that ends a pair's
// authorisation while a RequestRelay for the pair has passed its checks (it
// holds the relay lock) but not yet allocated must still prune the session it
// allocates, not skip the pair for having no session yet.
func TestRelayPruneWaitsForRequestInFlight(t *testing.T) {
	l := newRelayLab(t)
	tc := l.tc
	rs := tc.c.relays
	rs.mu.Lock() // the request in flight
	unlocked := false
	defer func() {
		if !unlocked {
			rs.mu.Unlock()
		}
	}()
	done := make(chan error, 1)
	go func() { // db-1 out of relay-1's for; still web-1's peer (web-to-ops)
		_, err := tc.op().LabelNode(bg, connect.NewRequest(&segmeshv1.LabelNodeRequest{Name: "db-1", Set: map[string]string{"role": "ops"}}))
		done <- err
	}()
	eventually(t, "the engine sees the relabel", func() bool {
		return tc.c.isPeer("web-1", "db-1") && !slices.Contains(tc.c.engine.RelaysFor("web-1", "db-1"), "relay-1")
	})
	web, db := relays.Party{Name: "web-1"}, relays.Party{Name: "db-1"}
	copy(web.Key[:], l.web.id.publicKey)
	copy(db.Key[:], l.db.id.publicKey)
	if _, err := rs.alloc.Allocate("relay-1", web, db); err != nil {
		t.Fatal(err)
	}
	rs.mu.Unlock()
	unlocked = true
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	eventually(t, "the session allocated under the old labels pruned", func() bool { return rs.alloc.Total() == 0 })
}
