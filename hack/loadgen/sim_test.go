package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/api/wire"
)

// simNetmap is a hash version 2 netmap of node sim-0 at revision rev with peers
// sim-1..sim-peers, peer sim-1 at endpoint ep.
func simNetmap(rev uint64, peers int, ep string) *segmeshv1.Netmap {
	nm := &segmeshv1.Netmap{PolicyRevision: rev, HashVersion: wire.HashVersion2,
		Self: &segmeshv1.Node{Name: "sim-0", Addresses: []string{"100.64.0.1/32"}, Endpoint: simEndpoint(0, 0)}}
	for i := 1; i <= peers; i++ {
		p := &segmeshv1.Peer{Name: fmt.Sprintf("sim-%d", i), PublicKey: make([]byte, 32), AllowedIps: []string{fmt.Sprintf("100.64.0.%d/32", i+1)}}
		p.PublicKey[0] = byte(i)
		if i == 1 {
			p.Endpoint = ep
		}
		nm.Peers = append(nm.Peers, p)
	}
	nm.Filter = &segmeshv1.Filter{Sets: []*segmeshv1.AddressSet{{Name: "sim", Prefixes: []string{"100.64.0.2/32"}}}}
	nm.Hash = wire.NetmapHashV2(nm)
	return nm
}

// simController serves AgentService to simulated agents: each SyncUpdates stream
// sends the next of streams (then waits), Sync sends legacy; it records the
// requests and reports.
type simController struct {
	segmeshv1connect.UnimplementedAgentServiceHandler
	streams [][]*segmeshv1.NetmapUpdate // nil: SyncUpdates is unimplemented
	legacy  *segmeshv1.Netmap

	mu      sync.Mutex
	reqs    []*segmeshv1.SyncRequest // SyncUpdates calls
	syncs   int                      // Sync calls
	reports []*segmeshv1.ReportRequest
}

func (c *simController) SyncUpdates(ctx context.Context, req *connect.Request[segmeshv1.SyncRequest], st *connect.ServerStream[segmeshv1.NetmapUpdate]) error {
	c.mu.Lock()
	c.reqs = append(c.reqs, req.Msg)
	n := len(c.reqs)
	c.mu.Unlock()
	if c.streams == nil {
		return c.UnimplementedAgentServiceHandler.SyncUpdates(ctx, req, st)
	}
	if n <= len(c.streams) {
		for _, u := range c.streams[n-1] {
			if err := st.Send(u); err != nil {
				return err
			}
		}
	}
	<-ctx.Done()
	return nil
}

func (c *simController) Sync(ctx context.Context, _ *connect.Request[segmeshv1.SyncRequest], st *connect.ServerStream[segmeshv1.Netmap]) error {
	c.mu.Lock()
	c.syncs++
	c.mu.Unlock()
	if err := st.Send(c.legacy); err != nil {
		return err
	}
	<-ctx.Done()
	return nil
}

func (c *simController) Report(_ context.Context, req *connect.Request[segmeshv1.ReportRequest]) (*connect.Response[segmeshv1.ReportResponse], error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reports = append(c.reports, req.Msg)
	return connect.NewResponse(&segmeshv1.ReportResponse{}), nil
}

func (c *simController) lastReport() *segmeshv1.ReportRequest {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.reports) == 0 {
		return nil
	}
	return c.reports[len(c.reports)-1]
}

// TestSimStream runs one simulated agent, verifying or not, against a controller
// whose first SyncUpdates stream has a gap and whose second is right, and one
// against a controller without SyncUpdates: it must end reporting the hash of the
// controller's last netmap, counting the stream bytes, with the gap's resync.
func TestSimStream(t *testing.T) {
	n1, n2, n3 := simNetmap(1, 3, ""), simNetmap(2, 2, ""), simNetmap(3, 4, "198.18.9.9:51820")
	n4 := simNetmap(4, 4, "198.18.9.9:51821")
	full := func(nm *segmeshv1.Netmap) *segmeshv1.NetmapUpdate {
		return &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Full{Full: nm}}
	}
	delta := func(a, b *segmeshv1.Netmap) *segmeshv1.NetmapUpdate {
		return &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Delta{Delta: wire.DiffNetmaps(a, b)}}
	}
	badHash := wire.DiffNetmaps(n3, n4)
	badHash.Hash = strings.Repeat("0", 64)
	tests := []struct {
		name   string
		verify bool
		c      *simController
		want   *segmeshv1.Netmap // last reported
		resync string            // in the second stream's resync_reason; "" = no second stream
		legacy bool              // served over Sync
		// sizeUnknown: the agent does not know the size of its netmap (not
		// verifying, the last update a delta).
		sizeUnknown bool
	}{
		{name: "verifying, gap", verify: true, c: &simController{streams: [][]*segmeshv1.NetmapUpdate{
			{full(n1), delta(n1, n2), delta(n1, n3)}, {full(n3), delta(n3, n4)}}}, want: n4, resync: "delta base mismatch"},
		{name: "light, gap", c: &simController{streams: [][]*segmeshv1.NetmapUpdate{
			{full(n1), delta(n1, n2), delta(n1, n3)}, {full(n3), delta(n3, n4)}}}, want: n4, resync: "delta base mismatch", sizeUnknown: true},
		{name: "verifying, hash mismatch", verify: true, c: &simController{streams: [][]*segmeshv1.NetmapUpdate{
			{full(n1), delta(n1, n3), {Update: &segmeshv1.NetmapUpdate_Delta{Delta: badHash}}}, {full(n4)}}}, want: n4, resync: "the result hashes to"},
		{name: "delta first", c: &simController{streams: [][]*segmeshv1.NetmapUpdate{
			{delta(n1, n2)}, {full(n4)}}}, want: n4, resync: "before any full netmap"},
		{name: "verifying, deltas apply", verify: true, c: &simController{streams: [][]*segmeshv1.NetmapUpdate{
			{full(n1), delta(n1, n2), delta(n2, n3), delta(n3, n4)}}}, want: n4},
		{name: "controller without SyncUpdates", c: &simController{legacy: n4}, want: n4, legacy: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mux := http.NewServeMux()
			mux.Handle(segmeshv1connect.NewAgentServiceHandler(tt.c))
			srv := httptest.NewServer(mux)
			t.Cleanup(srv.Close)
			a := &simAgent{name: "sim-0", verify: tt.verify}
			ep := simEndpoint(0, 0)
			a.endpoint.Store(&ep)
			a.hc, a.url = &http.Client{Transport: countingTransport{rt: srv.Client().Transport, n: &a.bytes}}, srv.URL
			a.client = segmeshv1connect.NewAgentServiceClient(a.hc, srv.URL, connect.WithCodec(lightCodec{size: &a.size, whole: a.verify}))
			f := &fleet{log: slog.New(slog.NewTextHandler(io.Discard, nil)), agents: []*simAgent{a}}
			w := newWatch(1, func(u update) bool { return u.lists("sim-1", "198.18.9.9:51821") })
			f.watch.Store(w)
			ctx, cancel := context.WithCancel(context.Background())
			t.Cleanup(cancel)
			f.start(ctx, a)
			deadline := time.Now().Add(10 * time.Second)
			for tt.c.lastReport().GetAppliedHash() != tt.want.GetHash() {
				if time.Now().After(deadline) {
					t.Fatalf("last report %v, want hash %.12s of revision %d", tt.c.lastReport(), tt.want.GetHash(), tt.want.GetPolicyRevision())
				}
				time.Sleep(5 * time.Millisecond)
			}
			if lat, missing := w.wait(ctx, time.Second); len(lat) != 1 || missing != 0 {
				t.Errorf("the watch did not see sim-1's new endpoint")
			}
			a.stop()
			if rep := tt.c.lastReport(); rep.GetAppliedRevision() != tt.want.GetPolicyRevision() || !rep.GetInSync() {
				t.Errorf("last report %v", rep)
			}
			tt.c.mu.Lock()
			reqs, syncs := tt.c.reqs, tt.c.syncs
			tt.c.mu.Unlock()
			wantStreams := 1
			if tt.resync != "" {
				wantStreams = 2
			}
			if len(reqs) != wantStreams || reqs[0].GetResyncReason() != "" {
				t.Fatalf("SyncUpdates calls %v, want %d, the first without resync_reason", reqs, wantStreams)
			}
			if tt.resync != "" && !strings.Contains(reqs[1].GetResyncReason(), tt.resync) {
				t.Errorf("resync_reason %q, want it to contain %q", reqs[1].GetResyncReason(), tt.resync)
			}
			if got := f.resyncs.Load(); got != int64(wantStreams-1) {
				t.Errorf("resyncs = %d, want %d", got, wantStreams-1)
			}
			if tt.legacy != (syncs == 1) {
				t.Errorf("Sync calls = %d, want legacy %v", syncs, tt.legacy)
			}
			wantSize := int64(proto.Size(tt.want))
			if tt.sizeUnknown {
				wantSize = -1
			}
			if got := a.size.Load(); got != wantSize {
				t.Errorf("netmap size = %d, want %d", got, wantSize)
			}
			if a.bytes.Load() < 100 { // gzip-compressed: less than the netmaps' size
				t.Errorf("stream bytes counted = %d, want the stream's", a.bytes.Load())
			}
			if f.errs.Load() != 0 {
				t.Errorf("stream errors = %d", f.errs.Load())
			}
		})
	}
}

// TestSimStreamGivesUp: a controller that sends a bad delta on every stream makes a
// simulated agent reopen its stream maxResyncs times, then stop.
func TestSimStreamGivesUp(t *testing.T) {
	n1, n2 := simNetmap(1, 1, ""), simNetmap(2, 2, "")
	gap := &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Delta{Delta: wire.DiffNetmaps(n2, n1)}}
	var streams [][]*segmeshv1.NetmapUpdate
	for range maxResyncs + 5 {
		streams = append(streams, []*segmeshv1.NetmapUpdate{{Update: &segmeshv1.NetmapUpdate_Full{Full: n1}}, gap})
	}
	c := &simController{streams: streams}
	mux := http.NewServeMux()
	mux.Handle(segmeshv1connect.NewAgentServiceHandler(c))
	srv := httptest.NewServer(mux)
	defer srv.Close()
	a := &simAgent{name: "sim-0"}
	ep := simEndpoint(0, 0)
	a.endpoint.Store(&ep)
	var size atomic.Int64
	a.hc, a.url = srv.Client(), srv.URL
	a.client = segmeshv1connect.NewAgentServiceClient(srv.Client(), srv.URL, connect.WithCodec(lightCodec{size: &size}))
	f := &fleet{log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if err := f.stream(context.Background(), a); err == nil || !strings.Contains(err.Error(), "delta base mismatch") {
		t.Fatalf("stream = %v, want the last resync's reason", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.reqs) != maxResyncs+1 || f.resyncs.Load() != maxResyncs {
		t.Fatalf("%d streams, %d resyncs; want %d and %d", len(c.reqs), f.resyncs.Load(), maxResyncs+1, maxResyncs)
	}
}
