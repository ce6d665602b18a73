package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
	"segmesh/hack/internal/benchfig"
	"segmesh/test/lab"
)

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantErr bool
		check   func(t *testing.T, o options)
	}{
		{name: "defaults", check: func(t *testing.T, o options) {
			if o.agents != 1000 || !slices.Equal(o.scenarios, allScenarios) || o.bin != "bin/segmesh-controller" || o.timeout != 5*time.Minute || o.jsonPath != "" || o.verbose {
				t.Errorf("defaults = %+v", o)
			}
		}},
		{name: "scenarios in the order given", args: []string{"-scenario", "join, policy", "-agents", "20", "-json", "x.json"}, check: func(t *testing.T, o options) {
			if !slices.Equal(o.scenarios, []string{"join", "policy"}) || o.agents != 20 || o.jsonPath != "x.json" {
				t.Errorf("options = %+v", o)
			}
			if o.command != "go run ./hack/loadgen -scenario join, policy -agents 20 -json x.json" {
				t.Errorf("command = %q", o.command)
			}
		}},
		{name: "unknown scenario", args: []string{"-scenario", "policy,burst"}, wantErr: true},
		{name: "repeated scenario", args: []string{"-scenario", "join,join"}, wantErr: true},
		{name: "empty scenario list", args: []string{"-scenario", " , "}, wantErr: true},
		{name: "no agents", args: []string{"-agents", "0"}, wantErr: true},
		{name: "too many agents", args: []string{"-agents", "20001"}, wantErr: true},
		{name: "zero timeout", args: []string{"-timeout", "0s"}, wantErr: true},
		{name: "stray argument", args: []string{"x"}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := parseFlags(tt.args, io.Discard)
			if (err != nil) != tt.wantErr {
				t.Fatalf("parseFlags(%q) error = %v, want error %v", tt.args, err, tt.wantErr)
			}
			if err == nil && tt.check != nil {
				tt.check(t, o)
			}
		})
	}
}

func TestRunUsageErrorExits2(t *testing.T) {
	var stderr bytes.Buffer
	if code := run(context.Background(), []string{"-bin", filepath.Join(t.TempDir(), "missing")}, io.Discard, &stderr); code != 2 {
		t.Fatalf("run with a missing binary = %d, want 2", code)
	}
	if !strings.Contains(stderr.String(), "make build") {
		t.Errorf("stderr %q does not say to run make build", stderr.String())
	}
}

func TestPercentile(t *testing.T) {
	msd := func(ns ...int) []time.Duration {
		var d []time.Duration
		for _, n := range ns {
			d = append(d, time.Duration(n)*time.Millisecond)
		}
		return d
	}
	hundred := make([]int64, 100)
	for i := range hundred {
		hundred[i] = int64(100 - i) // 100..1, unsorted
	}
	tests := []struct {
		name string
		v    []time.Duration
		p    float64
		want time.Duration
	}{
		{"empty", nil, 50, 0},
		{"one", msd(7), 99, 7 * time.Millisecond},
		{"median of four is the second", msd(4, 1, 3, 2), 50, 2 * time.Millisecond},
		{"p99 of four is the largest", msd(4, 1, 3, 2), 99, 4 * time.Millisecond},
		{"max", msd(4, 1, 3, 2), 100, 4 * time.Millisecond},
		{"p25 of four", msd(4, 1, 3, 2), 25, 1 * time.Millisecond},
	}
	for _, tt := range tests {
		in := slices.Clone(tt.v)
		if got := percentile(tt.v, tt.p); got != tt.want {
			t.Errorf("%s: percentile(%v, %g) = %v, want %v", tt.name, tt.v, tt.p, got, tt.want)
		}
		if !slices.Equal(in, tt.v) {
			t.Errorf("%s: percentile modified its input", tt.name)
		}
	}
	for p, want := range map[float64]int64{50: 50, 99: 99, 100: 100, 1: 1} {
		if got := percentile(hundred, p); got != want {
			t.Errorf("percentile(1..100, %g) = %d, want %d", p, got, want)
		}
	}
}

func TestByteDeltas(t *testing.T) {
	got := byteDeltas([]int64{10, 0, 5}, []int64{15, 300, 5, 99})
	if want := []int64{5, 300, 0}; !slices.Equal(got, want) {
		t.Errorf("byteDeltas = %v, want %v (an agent added after the first snapshot is left out)", got, want)
	}
}

// TestCountingTransport checks that only the response bodies of netmap streams
// (SyncUpdates, Sync) are counted, every byte of them, and that snapshotBytes
// reads the per-agent counters.
func TestCountingTransport(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/Sync") || strings.HasSuffix(r.URL.Path, "/SyncUpdates") {
			_, _ = w.Write(bytes.Repeat([]byte("x"), 1000))
			return
		}
		_, _ = w.Write([]byte("report answer"))
	}))
	defer srv.Close()
	a := &simAgent{}
	hc := &http.Client{Transport: countingTransport{rt: http.DefaultTransport, n: &a.bytes}}
	for _, path := range []string{"/segmesh.v1.AgentService/Sync", "/segmesh.v1.AgentService/Report", "/segmesh.v1.AgentService/SyncUpdates", "/segmesh.v1.AgentService/RenewCertificate"} {
		resp, err := hc.Post(srv.URL+path, "application/proto", nil)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	f := &fleet{agents: []*simAgent{a, {}}}
	if got := f.snapshotBytes(); !slices.Equal(got, []int64{2000, 0}) {
		t.Errorf("snapshotBytes = %v, want [2000 0]", got)
	}
}

func TestWatch(t *testing.T) {
	rev := func(r uint64) update { return update{revision: r} }
	w := newWatch(3, func(u update) bool { return u.revision >= 2 })
	now := w.start.Add(5 * time.Millisecond)
	w.observe(0, rev(1), now)                       // does not match
	w.observe(0, rev(2), now)                       // matches at 5 ms
	w.observe(0, rev(3), now.Add(time.Second))      // already recorded
	w.observe(7, rev(2), now)                       // not watched (a node added later)
	w.observe(1, rev(2), now.Add(time.Millisecond)) // 6 ms
	lat, missing := w.wait(context.Background(), 10*time.Millisecond)
	slices.Sort(lat)
	if want := []time.Duration{5 * time.Millisecond, 6 * time.Millisecond}; !slices.Equal(lat, want) || missing != 1 {
		t.Errorf("wait = %v, %d missing; want %v, 1 missing", lat, missing, want)
	}
	w.observe(2, rev(2), now)
	select {
	case <-w.done:
	default:
		t.Error("watch not done after every agent matched")
	}
	if lat, missing := newWatch(0, nil).wait(context.Background(), time.Hour); len(lat) != 0 || missing != 0 {
		t.Errorf("empty watch wait = %v, %d", lat, missing)
	}
}

// TestUpdateView: what the watch sees of a full netmap and of a delta; a delta
// shows only the peers it changes.
func TestUpdateView(t *testing.T) {
	nm := &segmeshv1.Netmap{PolicyRevision: 4, Self: &segmeshv1.Node{Name: "s"}, Peers: []*segmeshv1.Peer{{Name: "a", Endpoint: "198.18.0.1:51820"}, {Name: "b"}}}
	full := fullView(nm)
	delta := deltaView(&segmeshv1.NetmapDelta{PolicyRevision: 5, UpsertedPeers: []*segmeshv1.Peer{{Name: "c", Endpoint: "198.18.0.3:51820"}}, RemovedPeers: []string{"b"}})
	header := deltaView(&segmeshv1.NetmapDelta{PolicyRevision: 6, Header: &segmeshv1.NetmapHeader{Self: &segmeshv1.Node{Name: "s", Endpoint: "198.18.0.0:51821"}}})
	tests := []struct {
		name     string
		u        update
		peer, ep string
		lists    bool
		drops    bool
		rev      uint64
		selfEP   string
	}{
		{name: "full, listed", u: full, peer: "a", lists: true, rev: 4},
		{name: "full, listed at the endpoint", u: full, peer: "a", ep: "198.18.0.1:51820", lists: true, rev: 4},
		{name: "full, listed elsewhere", u: full, peer: "a", ep: "198.18.0.1:51821", rev: 4},
		{name: "full, not listed", u: full, peer: "c", drops: true, rev: 4},
		{name: "delta upserts", u: delta, peer: "c", ep: "198.18.0.3:51820", lists: true, rev: 5},
		{name: "delta removes", u: delta, peer: "b", drops: true, rev: 5},
		{name: "delta leaves alone", u: delta, peer: "a", rev: 5},
		{name: "delta with a header", u: header, peer: "a", rev: 6, selfEP: "198.18.0.0:51821"},
	}
	for _, tt := range tests {
		if got := tt.u.lists(tt.peer, tt.ep); got != tt.lists {
			t.Errorf("%s: lists(%q, %q) = %v, want %v", tt.name, tt.peer, tt.ep, got, tt.lists)
		}
		if got := tt.u.drops(tt.peer); got != tt.drops {
			t.Errorf("%s: drops(%q) = %v, want %v", tt.name, tt.peer, got, tt.drops)
		}
		if tt.u.revision != tt.rev || (tt.selfEP != "" && tt.u.self.GetEndpoint() != tt.selfEP) {
			t.Errorf("%s: revision %d, self %v", tt.name, tt.u.revision, tt.u.self)
		}
	}
	if delta.self != nil {
		t.Errorf("a delta without header shows self %v", delta.self)
	}
	if got, want := simEndpoint(300, 2), "198.18.1.44:51822"; got != want {
		t.Errorf("simEndpoint(300, 2) = %q, want %q", got, want)
	}
}

func TestFormatValue(t *testing.T) {
	tests := []struct {
		v    float64
		unit string
		want string
	}{
		{12.4, "ms", "12 ms"}, {12500, "ms", "12.5 s"}, {900, "B", "900 B"}, {25400, "B", "25.4 KB"},
		{1.5e9, "B", "1500.0 MB"}, {2.345, "s", "2.35 s"}, {20, "agents", "20 agents"},
	}
	for _, tt := range tests {
		if got := formatValue(tt.v, tt.unit); got != tt.want {
			t.Errorf("formatValue(%g, %q) = %q, want %q", tt.v, tt.unit, got, tt.want)
		}
	}
}

// TestRealController runs 20 simulated agents against the controller binary that
// `make build` puts in bin/, scenarios policy, relabel and revoke, and checks the
// figures.
func TestRealController(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	root, err := lab.ModuleRoot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(root, "bin", "segmesh-controller")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("this test runs the real controller, %s: %v; run `make build` first", bin, err)
	}
	out := filepath.Join(t.TempDir(), "figures.json")
	var stdout, stderr bytes.Buffer
	code := run(ctx, []string{"-agents", "20", "-scenario", "mesh,policy,relabel,revoke", "-bin", bin, "-timeout", "60s", "-json", out}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("loadgen exited %d; stderr:\n%s\nstdout:\n%s", code, stderr.String(), stdout.String())
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var figs []benchfig.Figure
	if err := json.Unmarshal(raw, &figs); err != nil {
		t.Fatalf("decoding %s: %v", out, err)
	}
	got := map[string]float64{}
	for _, f := range figs {
		if f.Date == "" || f.Command == "" || f.Conditions == "" || f.Unit == "" {
			t.Errorf("figure %+v lacks date, command, conditions or unit", f)
		}
		if f.Driver != "loadgen" || f.Agents != 20 {
			t.Errorf("figure %s/%s: driver %q, agents %d; want loadgen, 20", f.Scenario, f.Figure, f.Driver, f.Agents)
		}
		got[f.Scenario+"/"+f.Figure] = f.Value
	}
	// relabel and revoke take an extra node out of the mesh: every one of the 20
	// agents must drop it, and the fleet stays the same 20 agents for the next.
	for _, sc := range []string{"mesh", "policy", "relabel", "revoke"} {
		if got[sc+"/agents reached"] != 20 {
			t.Errorf("%s reached %v agents, want 20", sc, got[sc+"/agents reached"])
		}
		// CPU time in /proc counts 10 ms ticks: with deltas, a change to 20
		// agents can take less than one.
		if v, ok := got[sc+"/controller CPU"]; !ok || v < 0 {
			t.Errorf("%s: controller CPU = %v (reported %v), want >= 0", sc, v, ok)
		}
	}
	// A full-mesh netmap of 20 nodes lists 19 peers (name, key, endpoint, addresses
	// each); a rule change under it is a delta of the rules alone.
	if b := got["mesh/bytes to each agent p50"]; b < 19*50 {
		t.Errorf("mesh: bytes to each agent p50 = %v, want at least %d for 19 peers", b, 19*50)
	}
	if b := got["policy/bytes to each agent p50"]; b <= 0 || b >= 19*50 {
		t.Errorf("policy: bytes to each agent p50 = %v, want a delta of the rules, under %d", b, 19*50)
	}
	for _, k := range []string{"policy/delivery p99", "policy/policy apply returns", "policy/controller peak RSS", "policy/controller RSS after, converged", "policy/status shows every node converged"} {
		if got[k] <= 0 {
			t.Errorf("%s = %v, want > 0", k, got[k])
		}
	}
	if !strings.Contains(stdout.String(), "delivery p99") {
		t.Errorf("table lacks the delivery rows:\n%s", stdout.String())
	}
}

func TestLightCodec(t *testing.T) {
	full := &segmeshv1.Netmap{
		PolicyRevision: 7, Hash: "abc",
		Self: &segmeshv1.Node{Name: "sim-0", Endpoint: "198.18.0.0:51820", Labels: map[string]string{"role": "sim"}, PublicKey: make([]byte, 32)},
		Peers: []*segmeshv1.Peer{
			{Name: "sim-1", Endpoint: "198.18.0.1:51820", PublicKey: make([]byte, 32), AllowedIps: []string{"100.64.0.2/32"}},
			{Name: "sim-2", IdentityKey: []byte{1, 2}},
		},
		Filter:          &segmeshv1.Filter{Sets: []*segmeshv1.AddressSet{{Name: "sim", Prefixes: []string{"100.64.0.0/24"}}}},
		OverlayPrefixes: []string{"100.64.0.0/10"}, KeyRotation: 3,
	}
	raw, err := proto.Marshal(full)
	if err != nil {
		t.Fatal(err)
	}
	var size atomic.Int64
	c := lightCodec{size: &size}
	got := &segmeshv1.Netmap{Revoked: true} // reset before decoding
	if err := c.Unmarshal(raw, got); err != nil {
		t.Fatal(err)
	}
	want := &segmeshv1.Netmap{
		PolicyRevision: 7, Hash: "abc",
		Self:  &segmeshv1.Node{Name: "sim-0", Endpoint: "198.18.0.0:51820"},
		Peers: []*segmeshv1.Peer{{Name: "sim-1", Endpoint: "198.18.0.1:51820"}, {Name: "sim-2"}},
	}
	if !proto.Equal(got, want) {
		t.Errorf("decoded %v, want %v", got, want)
	}
	if size.Load() != int64(len(raw)) {
		t.Errorf("size = %d, want %d", size.Load(), len(raw))
	}
	if err := c.Unmarshal(raw[:len(raw)-3], &segmeshv1.Netmap{}); err == nil {
		t.Error("a truncated netmap decoded without an error")
	}
	// A NetmapUpdate: a full netmap as above, a delta to what the watch looks at.
	for _, tt := range []struct {
		in, want *segmeshv1.NetmapUpdate
	}{
		{in: &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Full{Full: full}}, want: &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Full{Full: want}}},
		{in: &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Delta{Delta: &segmeshv1.NetmapDelta{
			BaseHash: "a", Hash: "b", PolicyRevision: 8,
			Header:        &segmeshv1.NetmapHeader{Self: full.Self, OverlayPrefixes: []string{"100.64.0.0/10"}, KeyRotation: 4},
			UpsertedPeers: full.Peers, RemovedPeers: []string{"sim-3", "sim-4"},
			Sets:  []*segmeshv1.AddressSetDelta{{Name: "sim", Added: []string{"100.64.0.9/32"}}},
			Rules: &segmeshv1.FilterRules{},
		}}}, want: &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Delta{Delta: &segmeshv1.NetmapDelta{
			BaseHash: "a", Hash: "b", PolicyRevision: 8,
			Header:        &segmeshv1.NetmapHeader{Self: want.Self},
			UpsertedPeers: want.Peers, RemovedPeers: []string{"sim-3", "sim-4"},
		}}}},
	} {
		raw, err := proto.Marshal(tt.in)
		if err != nil {
			t.Fatal(err)
		}
		// Light (rawstream.go): skimmed from a reader.
		got, gotSize, err := skimUpdate(bufio.NewReader(bytes.NewReader(raw)))
		if err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(got, tt.want) {
			t.Errorf("skimmed %v, want %v", got, tt.want)
		}
		if wantSize := int64(proto.Size(tt.in.GetFull())); gotSize != wantSize {
			t.Errorf("size = %d, want %d (the full netmap's; 0 for a delta)", gotSize, wantSize)
		}
		if _, _, err := skimUpdate(bufio.NewReader(bytes.NewReader(raw[:len(raw)-1]))); err == nil {
			t.Error("a truncated update skimmed without an error")
		}
		// Whole (a verifying agent): everything.
		whole := &segmeshv1.NetmapUpdate{}
		if err := (lightCodec{size: &size, whole: true}).Unmarshal(raw, whole); err != nil || !proto.Equal(whole, tt.in) {
			t.Errorf("whole decode = %v, %v; want %v", whole, err, tt.in)
		}
	}
	// Other messages decode in full.
	rep := &segmeshv1.ReportRequest{AppliedRevision: 3, AppliedHash: "h", InSync: true}
	b, err := c.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var back segmeshv1.ReportRequest
	if err := c.Unmarshal(b, &back); err != nil || !proto.Equal(&back, rep) {
		t.Errorf("report round trip = %v, %v; want %v", &back, err, rep)
	}
}
