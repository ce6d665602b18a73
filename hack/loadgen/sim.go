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
)

// simAgent is one simulated agent: a real enrollment (WireGuard key, TLS key, CSR)
// and one mutual-TLS AgentService.Sync stream, read by one goroutine, which
// answers every netmap with a Report like an agent that applied it.
type simAgent struct {
	idx      int
	name     string
	endpoint atomic.Pointer[string]
	client   segmeshv1connect.AgentServiceClient
	hc       *http.Client
	bytes    atomic.Int64 // Sync response body bytes received (connect envelopes)
	msgs     atomic.Int64 // netmaps received
	size     atomic.Int64 // encoded size of the latest netmap, uncompressed

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
	watch  atomic.Pointer[watch]
	errs   atomic.Int64 // streams that ended with an error
}

// watch records, for agents [0, len(at)), the first netmap that satisfies match
// after start.
type watch struct {
	start time.Time
	match func(*segmeshv1.Netmap) bool
	at    []atomic.Int64 // nanoseconds since start; 0 = not yet
	left  atomic.Int64
	done  chan struct{}
}

func newWatch(n int, match func(*segmeshv1.Netmap) bool) *watch {
	w := &watch{start: time.Now(), match: match, at: make([]atomic.Int64, n), done: make(chan struct{})}
	w.left.Store(int64(n))
	if n == 0 {
		close(w.done)
	}
	return w
}

// observe records nm for agent i.
func (w *watch) observe(i int, nm *segmeshv1.Netmap, now time.Time) {
	if i >= len(w.at) || w.at[i].Load() != 0 || !w.match(nm) {
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

// countingTransport counts the response body bytes of Sync streams into n.
type countingTransport struct {
	rt http.RoundTripper
	n  *atomic.Int64
}

func (t countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.rt.RoundTrip(r)
	if err == nil && strings.HasSuffix(r.URL.Path, "/Sync") {
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
	a := &simAgent{idx: idx, name: res.NodeName}
	a.endpoint.Store(&ep)
	cert := tls.Certificate{Certificate: [][]byte{res.CertDER}, PrivateKey: key}
	hc := enroll.NewHTTPClient(&tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		RootCAs: f.pool, ServerName: enroll.ServerName,
	})
	hc.Transport = countingTransport{rt: hc.Transport, n: &a.bytes}
	a.hc = hc
	a.client = segmeshv1connect.NewAgentServiceClient(hc, f.url, connect.WithCodec(lightCodec{size: &a.size}))
	return a, nil
}

// lightCodec is the protobuf codec of a simulated agent's client. It decodes only
// what the load generator looks at from a Netmap (policy_revision, hash, self's
// name and endpoint, every peer's name and endpoint) and records the size of the
// encoded netmap, so that N agents holding or decoding full-mesh netmaps (N² peers)
// cost the load generator little memory and CPU next to the controller it
// measures. Every other message is a plain protobuf.
type lightCodec struct{ size *atomic.Int64 }

func (lightCodec) Name() string { return "proto" }

func (lightCodec) Marshal(m any) ([]byte, error) {
	pm, ok := m.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("marshaling %T: not a protobuf message", m)
	}
	return proto.Marshal(pm)
}

func (c lightCodec) Unmarshal(b []byte, m any) error {
	nm, ok := m.(*segmeshv1.Netmap)
	if !ok {
		pm, ok := m.(proto.Message)
		if !ok {
			return fmt.Errorf("unmarshaling into %T: not a protobuf message", m)
		}
		return proto.Unmarshal(b, pm)
	}
	c.size.Store(int64(len(b)))
	return decodeNetmapSummary(b, nm)
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

// stream runs one Sync stream until it ends: every netmap is checked against the
// current watch and answered with a Report (applied revision and hash, in sync).
func (f *fleet) stream(ctx context.Context, a *simAgent) error {
	st, err := a.client.Sync(ctx, connect.NewRequest(&segmeshv1.SyncRequest{
		Endpoint: *a.endpoint.Load(), Dataplane: "userspace", Version: "loadgen", Interface: "segmesh0",
	}))
	if err != nil {
		return fmt.Errorf("opening the netmap stream: %w", err)
	}
	defer st.Close()
	for st.Receive() {
		nm := st.Msg()
		now := time.Now()
		a.msgs.Add(1)
		if w := f.watch.Load(); w != nil {
			w.observe(a.idx, nm, now)
		}
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := a.client.Report(rctx, connect.NewRequest(&segmeshv1.ReportRequest{
			AppliedRevision: nm.GetPolicyRevision(), AppliedHash: nm.GetHash(),
			Dataplane: "userspace", InSync: true,
		}))
		cancel()
		if err != nil && ctx.Err() == nil {
			f.log.Debug("report failed", "node", a.name, "err", err)
		}
		// The stream keeps its latest message until the next one: empty it, so
		// that N agents do not hold N peer lists between changes.
		proto.Reset(nm)
	}
	if err := st.Err(); err != nil {
		return err
	}
	return errors.New("stream closed by the controller")
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

// hasPeer reports whether nm lists a peer called name (with endpoint ep when ep
// is not empty).
func hasPeer(nm *segmeshv1.Netmap, name, ep string) bool {
	for _, p := range nm.GetPeers() {
		if p.GetName() == name {
			return ep == "" || p.GetEndpoint() == ep
		}
	}
	return false
}
