package controller

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/api/wire"
	"segmesh/controller/pki"
)

// fakeClock is the controller's clock in tests; it starts at the real time.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (f *fakeClock) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.t
}

func (f *fakeClock) Advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.t = f.t.Add(d)
}

// testController is a controller served on 127.0.0.1:0 with real TLS and bbolt.
type testController struct {
	t     *testing.T
	dir   string
	c     *Controller
	clock *fakeClock
	cred  OperatorCredential
	pool  *x509.CertPool
	url   string

	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p))
	return len(p), nil
}

func startController(t *testing.T, dir string) *testController {
	t.Helper()
	return startControllerWith(t, dir, nil)
}

// startControllerWith is startController with Options changed by edit (when not nil).
func startControllerWith(t *testing.T, dir string, edit func(*Options)) *testController {
	t.Helper()
	logger := slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts := Options{DataDir: dir, Listen: "127.0.0.1:0", Logger: logger}
	if edit != nil {
		edit(&opts)
	}
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	clock := &fakeClock{t: time.Now()}
	c.now = clock.Now
	// Tests refuse many enrollments from 127.0.0.1; TestEnrollmentThrottled
	// checks the default budget.
	c.enrollLimits.burst = 1000
	tc := &testController{t: t, dir: dir, c: c, clock: clock, done: make(chan error, 1)}
	raw, err := os.ReadFile(filepath.Join(dir, OperatorFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &tc.cred); err != nil {
		t.Fatal(err)
	}
	tc.pool = x509.NewCertPool()
	if !tc.pool.AppendCertsFromPEM([]byte(tc.cred.CAPEM)) {
		t.Fatal("operator.json ca_pem does not parse")
	}
	tc.url = tc.cred.Controller
	ctx, cancel := context.WithCancel(context.Background())
	tc.cancel = cancel
	go func() { tc.done <- c.Run(ctx) }()
	t.Cleanup(tc.stop)
	return tc
}

// stop shuts the controller down and waits for Run to return.
func (tc *testController) stop() {
	tc.once.Do(func() {
		tc.cancel()
		select {
		case err := <-tc.done:
			if err != nil {
				tc.t.Errorf("Run: %v", err)
			}
		case <-time.After(20 * time.Second):
			tc.t.Error("Run did not return within 20s of cancel")
		}
	})
}

// httpClient returns an HTTP/2 client trusting the controller CA (ServerName
// segmesh-controller), presenting cert when it is not nil.
func (tc *testController) httpClient(cert *tls.Certificate) *http.Client {
	cfg := &tls.Config{RootCAs: tc.pool, ServerName: pki.ServerName, MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	tr := &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}
	tc.t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

func (tc *testController) operator(token string) segmeshv1connect.OperatorServiceClient {
	return segmeshv1connect.NewOperatorServiceClient(tc.httpClient(nil), tc.url,
		connect.WithInterceptors(bearer(token)))
}

func (tc *testController) op() segmeshv1connect.OperatorServiceClient {
	return tc.operator(tc.cred.Token)
}

func (tc *testController) enrollClient() segmeshv1connect.EnrollServiceClient {
	return segmeshv1connect.NewEnrollServiceClient(tc.httpClient(nil), tc.url)
}

func bearer(token string) connect.UnaryInterceptorFunc {
	return func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if token != "" {
				req.Header().Set("Authorization", "Bearer "+token)
			}
			return next(ctx, req)
		}
	}
}

func (tc *testController) createToken(labels map[string]string, reusable bool) string {
	tc.t.Helper()
	resp, err := tc.op().CreateToken(context.Background(), connect.NewRequest(&segmeshv1.CreateTokenRequest{Labels: labels, Reusable: reusable}))
	if err != nil {
		tc.t.Fatalf("CreateToken: %v", err)
	}
	return resp.Msg.Token
}

// agentIdentity is what an agent generates before enrolling.
type agentIdentity struct {
	publicKey []byte
	key       *ecdsa.PrivateKey
	csr       []byte
}

func newIdentity(t *testing.T) agentIdentity {
	t.Helper()
	id := agentIdentity{publicKey: make([]byte, 32)}
	if _, err := rand.Read(id.publicKey); err != nil {
		t.Fatal(err)
	}
	var err error
	if id.key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	if id.csr, err = x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, id.key); err != nil {
		t.Fatal(err)
	}
	return id
}

func (tc *testController) tryEnroll(token, name string, id agentIdentity, endpoint string) (*segmeshv1.EnrollResponse, error) {
	resp, err := tc.enrollClient().Enroll(context.Background(), connect.NewRequest(&segmeshv1.EnrollRequest{
		Token: token, Name: name, Hostname: name, PublicKey: id.publicKey, Endpoint: endpoint, CsrDer: id.csr,
	}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// enrolledAgent is an enrolled node with its client certificate.
type enrolledAgent struct {
	name string
	id   agentIdentity
	resp *segmeshv1.EnrollResponse
	cert tls.Certificate
}

func (tc *testController) enroll(token, name string) *enrolledAgent {
	tc.t.Helper()
	id := newIdentity(tc.t)
	resp, err := tc.tryEnroll(token, name, id, "192.0.2.1:51820")
	if err != nil {
		tc.t.Fatalf("Enroll %s: %v", name, err)
	}
	return &enrolledAgent{name: name, id: id, resp: resp, cert: tls.Certificate{Certificate: [][]byte{resp.CertificateDer}, PrivateKey: id.key}}
}

func (tc *testController) agent(a *enrolledAgent) segmeshv1connect.AgentServiceClient {
	return segmeshv1connect.NewAgentServiceClient(tc.httpClient(&a.cert), tc.url)
}

// wantCode fails unless err is a connect error with code.
func wantCode(t *testing.T, err error, code connect.Code) *connect.Error {
	t.Helper()
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != code {
		t.Fatalf("err = %v, want code %v", err, code)
	}
	return ce
}

// eventually polls cond every 10ms until it holds or 10s pass.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// netmapStream receives a Sync stream's netmaps in a goroutine so tests can wait
// for the next one with a deadline or check that none arrives.
type netmapStream struct {
	ch     chan *segmeshv1.Netmap
	cancel context.CancelFunc
	err    chan error
}

// sync opens a SyncUpdates stream for a, as an agent does: the stream's channel
// carries the whole netmap after each update (deltas applied with
// wire.ApplyDelta, which checks each result's hash); a delta that does not apply
// ends the stream with its error.
func (tc *testController) sync(a *enrolledAgent, req *segmeshv1.SyncRequest) *netmapStream {
	tc.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := tc.agent(a).SyncUpdates(ctx, connect.NewRequest(req))
	if err != nil {
		cancel()
		tc.t.Fatalf("SyncUpdates %s: %v", a.name, err)
	}
	s := &netmapStream{ch: make(chan *segmeshv1.Netmap, 16), cancel: cancel, err: make(chan error, 1)}
	go func() {
		defer stream.Close()
		var held *segmeshv1.Netmap
		for stream.Receive() {
			u := stream.Msg()
			if u.GetFull() == nil && u.GetDelta() == nil {
				continue // out-of-band (punch, relay, controllers): not a netmap
			}
			if f := u.GetFull(); f != nil {
				held = f
			} else if held, err = wire.ApplyDelta(held, u.GetDelta()); err != nil {
				s.err <- fmt.Errorf("applying a delta: %w", err)
				return
			}
			s.ch <- held
		}
		s.err <- stream.Err()
	}()
	tc.t.Cleanup(cancel)
	return s
}

// syncLegacy opens a Sync stream for a, as an agent that predates deltas does.
func (tc *testController) syncLegacy(a *enrolledAgent, req *segmeshv1.SyncRequest) *netmapStream {
	tc.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := tc.agent(a).Sync(ctx, connect.NewRequest(req))
	if err != nil {
		cancel()
		tc.t.Fatalf("Sync %s: %v", a.name, err)
	}
	s := &netmapStream{ch: make(chan *segmeshv1.Netmap, 16), cancel: cancel, err: make(chan error, 1)}
	go func() {
		for stream.Receive() {
			s.ch <- stream.Msg()
		}
		s.err <- stream.Err()
		_ = stream.Close()
	}()
	tc.t.Cleanup(cancel)
	return s
}

func (s *netmapStream) next(t *testing.T) *segmeshv1.Netmap {
	t.Helper()
	select { // netmaps that arrived before the stream ended come first
	case nm := <-s.ch:
		return nm
	default:
	}
	select {
	case nm := <-s.ch:
		return nm
	case err := <-s.err:
		t.Fatalf("stream ended: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("no netmap within 10s")
	}
	return nil
}

// none checks that nothing is pending on the stream after a synchronisation point
// (a later call that is known to be ordered after any push).
func (s *netmapStream) none(t *testing.T) {
	t.Helper()
	select {
	case nm := <-s.ch:
		t.Fatalf("unexpected netmap revision %d peers %v", nm.PolicyRevision, nm.Peers)
	default:
	}
}
