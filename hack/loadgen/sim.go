package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"segmesh/agent/enroll"
	"segmesh/api/jointoken"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/api/wire"
)

// simAgent is one simulated agent: a real enrollment (WireGuard key, TLS key, CSR)
// and one mutual-TLS AgentService.SyncUpdates stream (Sync with a controller that
// does not serve it), read by one goroutine, which answers every netmap with a
// Report like an agent that applied it.
//
// A verifying agent (verify) applies every delta with wire.ApplyDelta, as the
// agent does, which checks the result's hash; it holds its whole netmap. The
// others keep only the hash and revision of theirs and check that each delta
// applies to that hash (a gap), so that N agents holding full-mesh netmaps (N²
// peers) and rehashing them at every change cost the load generator little memory
// and CPU next to the controller it measures.
type simAgent struct {
	idx      int
	name     string
	verify   bool
	endpoint atomic.Pointer[string]
	client   segmeshv1connect.AgentServiceClient
	hc       *http.Client
	url      string       // the controller's base URL; light agents stream over hc themselves (rawstream.go)
	bytes    atomic.Int64 // SyncUpdates and Sync response body bytes received (connect envelopes)
	msgs     atomic.Int64 // netmap updates received
	size     atomic.Int64 // encoded size of the netmap held, uncompressed; -1 when unknown (a non-verifying agent after a delta)

	mu     sync.Mutex
	cancel context.CancelFunc // ends the open stream
	done   chan struct{}      // closed when the stream goroutine returns
}

// fleet is the set of simulated agents and the watch their netmaps are checked
// against.
type fleet struct {
	log    *slog.Logger
	url    string
	pool   *x509.CertPool
	agents []*simAgent
	// verify is how many agents (the first ones) apply deltas in full (see simAgent).
	verify  int
	watch   atomic.Pointer[watch]
	errs    atomic.Int64 // streams that ended with an error
	resyncs atomic.Int64 // streams reopened because an update did not apply
	legacy  sync.Once    // logs that the controller does not serve SyncUpdates
}

// watch records, for agents [0, len(at)), the first update that satisfies match
// after start.
type watch struct {
	start time.Time
	match func(update) bool
	at    []atomic.Int64 // nanoseconds since start; 0 = not yet
	left  atomic.Int64
	done  chan struct{}
}

func newWatch(n int, match func(update) bool) *watch {
	w := &watch{start: time.Now(), match: match, at: make([]atomic.Int64, n), done: make(chan struct{})}
	w.left.Store(int64(n))
	if n == 0 {
		close(w.done)
	}
	return w
}

// observe records u for agent i.
func (w *watch) observe(i int, u update, now time.Time) {
	if i >= len(w.at) || w.at[i].Load() != 0 || !w.match(u) {
		return
	}
	w.at[i].Store(max(int64(now.Sub(w.start)), 1))
	if w.left.Add(-1) == 0 {
		close(w.done)
	}
}

// wait blocks until every agent matched or timeout; it returns the latencies of
// the agents that matched and how many did not.
func (w *watch) wait(ctx context.Context, timeout time.Duration) (lat []time.Duration, missing int) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-w.done:
	case <-t.C:
	case <-ctx.Done():
	}
	for i := range w.at {
		if ns := w.at[i].Load(); ns != 0 {
			lat = append(lat, time.Duration(ns))
		} else {
			missing++
		}
	}
	return lat, missing
}

// countingBody counts the bytes read through it into n.
type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b countingBody) Read(p []byte) (int, error) {
	k, err := b.ReadCloser.Read(p)
	b.n.Add(int64(k))
	return k, err
}

// countingTransport counts the response body bytes of netmap streams (SyncUpdates
// and Sync) into n.
type countingTransport struct {
	rt http.RoundTripper
	n  *atomic.Int64
}

func (t countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.rt.RoundTrip(r)
	if err == nil && (strings.HasSuffix(r.URL.Path, "/SyncUpdates") || strings.HasSuffix(r.URL.Path, "/Sync")) {
		resp.Body = countingBody{ReadCloser: resp.Body, n: t.n}
	}
	return resp, err
}

// simEndpoint is agent i's underlay endpoint: 198.18.0.0/15 (RFC 2544 benchmark
// addresses) plus i, port 51820, and with gen > 0 port 51820+gen.
func simEndpoint(i, gen int) string {
	v := uint32(198<<24|18<<16) + uint32(i)
	a := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	return netip.AddrPortFrom(a, uint16(51820+gen)).String()
}

// enrollAgent enrolls agent idx with tok (a fresh WireGuard key, a fresh TLS key
// and its CSR, as the agent does) and prepares its mutual-TLS client.
func (f *fleet) enrollAgent(ctx context.Context, tok jointoken.Token, idx int) (*simAgent, error) {
	wg, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	name := fmt.Sprintf("sim-%d", idx)
	ep := simEndpoint(idx, 0)
	pub := wg.PublicKey()
	var res *enroll.Result
	for attempt := 0; ; attempt++ {
		res, err = enroll.Enroll(ctx, enroll.Request{
			Controller: f.url, Token: tok, Name: name, Hostname: name,
			PublicKey: pub[:], Endpoint: ep, TLSKey: key,
		})
		if err == nil || !enroll.Retryable(err) || attempt == 4 || ctx.Err() != nil {
			break
		}
		time.Sleep(time.Duration(attempt+1) * 200 * time.Millisecond)
	}
	if err != nil {
		return nil, fmt.Errorf("enrolling %s: %w", name, err)
	}
	a := &simAgent{idx: idx, name: res.NodeName, verify: idx < f.verify}
	a.endpoint.Store(&ep)
	cert := tls.Certificate{Certificate: [][]byte{res.CertDER}, PrivateKey: key}
	hc := enroll.NewHTTPClient(&tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		RootCAs: f.pool, ServerName: enroll.ServerName,
	})
	hc.Transport = countingTransport{rt: hc.Transport, n: &a.bytes}
	a.hc, a.url = hc, f.url
	a.client = segmeshv1connect.NewAgentServiceClient(hc, f.url, connect.WithCodec(lightCodec{size: &a.size, whole: a.verify}))
	return a, nil
}

// lightCodec is the protobuf codec of a simulated agent's client. It records the
// size of every full netmap (a Netmap, or the full of a NetmapUpdate) and, unless
// whole, decodes only what the load generator looks at: from a Netmap its
// policy_revision, hash, self's name and endpoint and every peer's name and
// endpoint; from a NetmapDelta its hashes, policy_revision, header's self (name,
// endpoint), upserted peers (name, endpoint) and removed peers. So N agents
// decoding full-mesh netmaps (N² peers) cost the load generator little memory and
// CPU next to the controller it measures. Every other message is a plain protobuf.
type lightCodec struct {
	size  *atomic.Int64
	whole bool // decode netmaps in full (a verifying agent)
}

func (lightCodec) Name() string { return "proto" }

func (lightCodec) Marshal(m any) ([]byte, error) {
	pm, ok := m.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("marshaling %T: not a protobuf message", m)
	}
	return proto.Marshal(pm)
}

func (c lightCodec) Unmarshal(b []byte, m any) error {
	switch m := m.(type) {
	case *segmeshv1.Netmap:
		c.size.Store(int64(len(b)))
		if !c.whole {
			return decodeNetmapSummary(b, m)
		}
	case *segmeshv1.NetmapUpdate: // verifying agents only: light ones skim (rawstream.go)
		if err := proto.Unmarshal(b, m); err != nil {
			return err
		}
		if full := m.GetFull(); full != nil {
			c.size.Store(int64(proto.Size(full)))
		}
		return nil
	}
	pm, ok := m.(proto.Message)
	if !ok {
		return fmt.Errorf("unmarshaling into %T: not a protobuf message", m)
	}
	return proto.Unmarshal(b, pm)
}

// decodeDeltaSummary fills d with the base hash, hash, policy revision, header's
// self (name, endpoint), upserted peers (name, endpoint) and removed peers of the
// encoded NetmapDelta b, skipping every other field.
func decodeDeltaSummary(b []byte, d *segmeshv1.NetmapDelta) error {
	err := eachField(b, func(num protowire.Number, typ protowire.Type, v []byte, n uint64) error {
		switch {
		case num == 1 && typ == protowire.BytesType:
			d.BaseHash = string(v)
		case num == 2 && typ == protowire.BytesType:
			d.Hash = string(v)
		case num == 3 && typ == protowire.VarintType:
			d.PolicyRevision = n
		case num == 4 && typ == protowire.BytesType:
			d.Header = &segmeshv1.NetmapHeader{}
			return eachField(v, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
				if num == 1 && typ == protowire.BytesType {
					d.Header.Self = &segmeshv1.Node{}
					return nameEndpoint(v, 1, 5, &d.Header.Self.Name, &d.Header.Self.Endpoint)
				}
				return nil
			})
		case num == 5 && typ == protowire.BytesType:
			p := &segmeshv1.Peer{}
			d.UpsertedPeers = append(d.UpsertedPeers, p)
			return nameEndpoint(v, 1, 3, &p.Name, &p.Endpoint)
		case num == 6 && typ == protowire.BytesType:
			d.RemovedPeers = append(d.RemovedPeers, string(v))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("decoding a netmap delta: %w", err)
	}
	return nil
}

// decodeNetmapSummary fills nm with the policy revision, hash, self (name,
// endpoint) and peers (name, endpoint) of the encoded Netmap b, skipping every
// other field.
func decodeNetmapSummary(b []byte, nm *segmeshv1.Netmap) error {
	proto.Reset(nm)
	err := eachField(b, func(num protowire.Number, typ protowire.Type, v []byte, n uint64) error {
		switch {
		case num == 1 && typ == protowire.VarintType:
			nm.PolicyRevision = n
		case num == 7 && typ == protowire.BytesType:
			nm.Hash = string(v)
		case num == 2 && typ == protowire.BytesType:
			nm.Self = &segmeshv1.Node{}
			return nameEndpoint(v, 1, 5, &nm.Self.Name, &nm.Self.Endpoint)
		case num == 3 && typ == protowire.BytesType:
			p := &segmeshv1.Peer{}
			nm.Peers = append(nm.Peers, p)
			return nameEndpoint(v, 1, 3, &p.Name, &p.Endpoint)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("decoding a netmap: %w", err)
	}
	return nil
}

// nameEndpoint reads the string fields nameNum and epNum of the message b.
func nameEndpoint(b []byte, nameNum, epNum protowire.Number, name, ep *string) error {
	return eachField(b, func(num protowire.Number, typ protowire.Type, v []byte, _ uint64) error {
		if typ == protowire.BytesType {
			switch num {
			case nameNum:
				*name = string(v)
			case epNum:
				*ep = string(v)
			}
		}
		return nil
	})
}

// eachField calls fn for every field of the encoded message b with its number,
// wire type and value (v for length-delimited fields, n for varints).
func eachField(b []byte, fn func(num protowire.Number, typ protowire.Type, v []byte, n uint64) error) error {
	for len(b) > 0 {
		num, typ, k := protowire.ConsumeTag(b)
		if k < 0 {
			return protowire.ParseError(k)
		}
		b = b[k:]
		var v []byte
		var n uint64
		switch typ {
		case protowire.VarintType:
			n, k = protowire.ConsumeVarint(b)
		case protowire.BytesType:
			v, k = protowire.ConsumeBytes(b)
		default:
			k = protowire.ConsumeFieldValue(num, typ, b)
		}
		if k < 0 {
			return protowire.ParseError(k)
		}
		b = b[k:]
		if err := fn(num, typ, v, n); err != nil {
			return err
		}
	}
	return nil
}

// start opens agent a's Sync stream in a goroutine of its own (ending any open
// one first).
func (f *fleet) start(ctx context.Context, a *simAgent) {
	a.stop()
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	a.mu.Lock()
	a.cancel, a.done = cancel, done
	a.mu.Unlock()
	go func() {
		defer close(done)
		err := f.stream(ctx, a)
		if ctx.Err() == nil {
			f.errs.Add(1)
			f.log.Warn("simulated agent's stream ended", "node", a.name, "err", err)
		}
	}()
}

// stop ends a's open stream and waits for its goroutine.
func (a *simAgent) stop() {
	a.mu.Lock()
	cancel, done := a.cancel, a.done
	a.cancel, a.done = nil, nil
	a.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// maxResyncs is how many times in a row one simulated agent reopens its stream
// because an update did not apply before it gives up (the stream then counts as
// ended with an error): a controller that keeps sending bad deltas cannot make it
// spin.
const maxResyncs = 3

// errResync ends a SyncUpdates stream: an update did not apply; the reason goes
// into the resync_reason of the next stream.
type errResync struct{ reason string }

func (e *errResync) Error() string { return "an update did not apply: " + e.reason }

// stream runs a's netmap streams until one ends: SyncUpdates, reopened at once
// (at most maxResyncs times) when an update does not apply, or Sync when the
// controller does not serve SyncUpdates (CodeUnimplemented; logged once per run).
// Every netmap is checked against the current watch and answered with a Report
// (applied revision and hash, in sync).
func (f *fleet) stream(ctx context.Context, a *simAgent) error {
	req := &segmeshv1.SyncRequest{
		Endpoint: *a.endpoint.Load(), Dataplane: "userspace", Version: "loadgen", Interface: "segmesh0",
	}
	for resyncs := 0; ; resyncs++ {
		stream := f.streamUpdatesRaw
		if a.verify {
			stream = f.streamUpdates
		}
		received, err := stream(ctx, a, req)
		var re *errResync
		switch {
		case errors.As(err, &re) && resyncs < maxResyncs:
			f.resyncs.Add(1)
			f.log.Warn("simulated agent asks for a full netmap", "node", a.name, "reason", re.reason)
			req.ResyncReason = re.reason
			continue
		case !received && connect.CodeOf(err) == connect.CodeUnimplemented && ctx.Err() == nil:
			f.legacy.Do(func() {
				f.log.Info("the controller does not serve SyncUpdates; simulated agents receive full netmaps (Sync)")
			})
			req.ResyncReason = ""
			return f.streamFull(ctx, a, req)
		}
		return err
	}
}

// streamUpdates runs one SyncUpdates stream; it reports whether an update arrived.
// It ends with an *errResync when an update does not apply to the netmap held.
func (f *fleet) streamUpdates(ctx context.Context, a *simAgent, req *segmeshv1.SyncRequest) (bool, error) {
	st, err := a.client.SyncUpdates(ctx, connect.NewRequest(req))
	if err != nil {
		return false, fmt.Errorf("opening the netmap stream: %w", err)
	}
	defer st.Close()
	received := false
	var held *segmeshv1.Netmap // a verifying agent's netmap
	var heldHash string
	for st.Receive() {
		received = true
		u := st.Msg()
		if err := f.onUpdate(ctx, a, u, &heldHash, &held); err != nil {
			return received, err
		}
		if !a.verify {
			// The stream keeps its latest message until the next one: empty it,
			// so that N agents do not hold N peer lists between changes.
			proto.Reset(u)
		}
	}
	if err := st.Err(); err != nil {
		return received, err
	}
	return received, errors.New("stream closed by the controller")
}

// onUpdate handles one update of a SyncUpdates stream: a verifying agent applies
// it to held with wire.ApplyDelta, a light one checks its base against heldHash;
// then the agent reports. It returns an *errResync when the update does not
// apply.
func (f *fleet) onUpdate(ctx context.Context, a *simAgent, u *segmeshv1.NetmapUpdate, heldHash *string, held **segmeshv1.Netmap) error {
	var view update // what the watch sees
	switch {
	case u.GetFull() != nil:
		*held, *heldHash, view = u.GetFull(), u.GetFull().GetHash(), fullView(u.GetFull())
	case u.GetDelta() == nil:
		return &errResync{reason: "netmap update of an unknown kind"}
	case *heldHash == "":
		return &errResync{reason: fmt.Sprintf("delta to revision %d before any full netmap", u.GetDelta().GetPolicyRevision())}
	case a.verify:
		next, err := wire.ApplyDelta(*held, u.GetDelta())
		if err != nil {
			return &errResync{reason: err.Error()}
		}
		*held, *heldHash, view = next, next.GetHash(), fullView(next)
		a.size.Store(int64(proto.Size(next)))
	default:
		d := u.GetDelta()
		if d.GetBaseHash() != *heldHash {
			return &errResync{reason: fmt.Sprintf("%v: delta applies to %.12s, the netmap held is %.12s", wire.ErrDeltaBase, d.GetBaseHash(), *heldHash)}
		}
		*heldHash, view = d.GetHash(), deltaView(d)
		a.size.Store(-1)
	}
	f.applied(ctx, a, view.revision, *heldHash, view)
	return nil
}

// streamFull runs one Sync stream (a controller that does not serve SyncUpdates)
// until it ends.
func (f *fleet) streamFull(ctx context.Context, a *simAgent, req *segmeshv1.SyncRequest) error {
	st, err := a.client.Sync(ctx, connect.NewRequest(req))
	if err != nil {
		return fmt.Errorf("opening the netmap stream: %w", err)
	}
	defer st.Close()
	for st.Receive() {
		nm := st.Msg()
		f.applied(ctx, a, nm.GetPolicyRevision(), nm.GetHash(), fullView(nm))
		// See streamUpdates.
		proto.Reset(nm)
	}
	if err := st.Err(); err != nil {
		return err
	}
	return errors.New("stream closed by the controller")
}

// applied records that a holds the netmap of revision rev and hash (view is what
// the watch checks) and reports it like an agent that applied it.
func (f *fleet) applied(ctx context.Context, a *simAgent, rev uint64, hash string, view update) {
	now := time.Now()
	a.msgs.Add(1)
	if w := f.watch.Load(); w != nil {
		w.observe(a.idx, view, now)
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	_, err := a.client.Report(rctx, connect.NewRequest(&segmeshv1.ReportRequest{
		AppliedRevision: rev, AppliedHash: hash, Dataplane: "userspace", InSync: true,
	}))
	cancel()
	if err != nil && ctx.Err() == nil {
		f.log.Debug("report failed", "node", a.name, "err", err)
	}
}

// close ends every stream and drops the connections.
func (f *fleet) close() {
	var wg sync.WaitGroup
	for _, a := range f.agents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.stop()
			a.hc.CloseIdleConnections()
		}()
	}
	wg.Wait()
}

// update is what the watch sees of one netmap update an agent received: the
// revision of the resulting netmap and what the update shows of it. A full netmap
// (and a verifying agent's netmap after a delta) shows all of it; a delta shows
// its header's self (nil when it leaves the header alone), the peers it upserts
// and those it removes, so that a peer's arrival, change or departure is seen in
// the update that makes it.
type update struct {
	revision uint64
	full     bool
	self     *segmeshv1.Node
	peers    []*segmeshv1.Peer
	removed  []string
}

// fullView is the update of the whole netmap nm.
func fullView(nm *segmeshv1.Netmap) update {
	return update{revision: nm.GetPolicyRevision(), full: true, self: nm.GetSelf(), peers: nm.GetPeers()}
}

// deltaView is the update of delta d.
func deltaView(d *segmeshv1.NetmapDelta) update {
	return update{revision: d.GetPolicyRevision(), self: d.GetHeader().GetSelf(), peers: d.GetUpsertedPeers(), removed: d.GetRemovedPeers()}
}

// lists reports whether u shows the netmap listing a peer called name (with
// endpoint ep when ep is not empty).
func (u update) lists(name, ep string) bool {
	for _, p := range u.peers {
		if p.GetName() == name {
			return ep == "" || p.GetEndpoint() == ep
		}
	}
	return false
}

// drops reports whether u shows the netmap without a peer called name: a full
// netmap that does not list it, or a delta that removes it.
func (u update) drops(name string) bool {
	if u.full {
		return !u.lists(name, "")
	}
	return slices.Contains(u.removed, name)
}
