package agent

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"segmesh/agent/internal/testlog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/fake"
	"segmesh/agent/gossip"
	"segmesh/agent/internal/testpki"
	"segmesh/agent/netmap"
	"segmesh/agent/path"
	"segmesh/agent/reconcile"
	"segmesh/agent/statefile"
	"segmesh/api/jointoken"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/api/wire"
)

// ---------------------------------------------------------------- test controller

// controller is a small in-test controller: EnrollService and AgentService over
// real TLS (HTTP/2, client certificates verified against its CA).
type controller struct {
	segmeshv1connect.UnimplementedAgentServiceHandler
	t   *testing.T
	ca  *testpki.CA
	url string
	srv *httptest.Server

	mu         sync.Mutex
	enrollErrs []*connect.Error // returned by the next Enroll calls, in order
	enrolls    []*segmeshv1.EnrollRequest
	syncs      []*segmeshv1.SyncRequest // of the netmap streams served (Sync or SyncUpdates)
	updateReqs []*segmeshv1.SyncRequest // of every SyncUpdates call, served or refused
	reports    []*segmeshv1.ReportRequest
	current    *segmeshv1.Netmap
	push       chan *segmeshv1.NetmapUpdate // for the open stream, in order (deltas on SyncUpdates only)
	// legacy makes the controller one from before deltas: SyncUpdates is
	// unimplemented, agents must use Sync.
	legacy      bool
	firstAccess func() // called once, at the first request of any kind
	accessed    bool

	// certLifetime is the validity of issued node certificates, from the moment of
	// issue; 0 issues them as testpki.SignCSR does (valid for a day).
	certLifetime time.Duration
	syncErr      *connect.Error   // returned by Sync and SyncUpdates (after sending current, if any)
	reportErr    *connect.Error   // returned by Report
	renewErrs    []*connect.Error // returned by the next RenewCertificate calls
	rotateErrs   []*connect.Error // returned by the next RotateKey calls
	renews       []*segmeshv1.RenewCertificateRequest
	rotates      []*segmeshv1.RotateKeyRequest
	issued       [][]byte            // DER of every certificate issued, in order
	presented    map[string][]string // RPC name ("stream" for Sync and SyncUpdates) -> hex SHA-256 of the client certificate, per call
}

type tlsStateKey struct{}

// clientCertID is the hex SHA-256 of the client certificate of the call, or "".
func clientCertID(ctx context.Context) string {
	cs, _ := ctx.Value(tlsStateKey{}).(*tls.ConnectionState)
	if cs == nil || len(cs.PeerCertificates) == 0 {
		return ""
	}
	return certID(cs.PeerCertificates[0].Raw)
}

func certID(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

func (c *controller) record(ctx context.Context, rpc string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.presented == nil {
		c.presented = map[string][]string{}
	}
	c.presented[rpc] = append(c.presented[rpc], clientCertID(ctx))
}

// sign issues a node certificate for the CSR, with certLifetime when set.
func (c *controller) sign(csr []byte, name string) ([]byte, error) {
	c.mu.Lock()
	life := c.certLifetime
	c.mu.Unlock()
	var der []byte
	var err error
	if life == 0 {
		der, err = c.ca.SignCSR(csr, name)
	} else {
		now := time.Now()
		der, err = c.ca.SignCSRFor(csr, name, now.Add(-time.Second), now.Add(life))
	}
	if err == nil {
		c.mu.Lock()
		c.issued = append(c.issued, der)
		c.mu.Unlock()
	}
	return der, err
}

func newController(t *testing.T) *controller {
	t.Helper()
	return newReplica(t, testpki.NewCA(t, "segmesh test CA"))
}

// newReplica is newController with a given CA: replicas of one fleet share it
// (each has its own server certificate for "segmesh-controller").
func newReplica(t *testing.T, ca *testpki.CA) *controller {
	t.Helper()
	c := &controller{t: t, ca: ca, push: make(chan *segmeshv1.NetmapUpdate, 8)}
	mux := http.NewServeMux()
	mux.Handle(segmeshv1connect.NewEnrollServiceHandler(c))
	mux.Handle(segmeshv1connect.NewAgentServiceHandler(c))
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		hook := c.firstAccess
		first := !c.accessed
		c.accessed = true
		c.mu.Unlock()
		if first && hook != nil {
			hook()
		}
		mux.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), tlsStateKey{}, r.TLS)))
	}))
	srv.EnableHTTP2 = true
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.TLS = &tls.Config{
		Certificates: []tls.Certificate{c.ca.ServerCert(t, "segmesh-controller")},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    c.ca.Pool(),
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	c.url = srv.URL
	c.srv = srv
	return c
}

// kill stops the controller as kill -9 would: its connections drop (the agent's
// end sees them closed) and its port refuses new ones.
func (c *controller) kill() {
	c.srv.CloseClientConnections()
	c.srv.Close()
}

func (c *controller) token() string {
	tok, err := jointoken.New(c.ca.DER)
	if err != nil {
		c.t.Fatal(err)
	}
	return tok.String()
}

func (c *controller) Enroll(_ context.Context, req *connect.Request[segmeshv1.EnrollRequest]) (*connect.Response[segmeshv1.EnrollResponse], error) {
	c.mu.Lock()
	c.enrolls = append(c.enrolls, req.Msg)
	refuse := popErr(&c.enrollErrs)
	c.mu.Unlock()
	if refuse != nil {
		return nil, refuse
	}
	name := req.Msg.GetName()
	cert, err := c.sign(req.Msg.GetCsrDer(), name)
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	return connect.NewResponse(&segmeshv1.EnrollResponse{
		NodeName:        name,
		Addresses:       []string{"100.64.0.1/32", "fd5e:6d65:7368::1/128"},
		CertificateDer:  cert,
		CaDer:           c.ca.DER,
		Labels:          map[string]string{"role": "web"},
		OverlayPrefixes: []string{"100.64.0.0/10", "fd5e:6d65:7368::/48"},
	}), nil
}

func (c *controller) Sync(ctx context.Context, req *connect.Request[segmeshv1.SyncRequest], stream *connect.ServerStream[segmeshv1.Netmap]) error {
	return c.serve(ctx, req.Msg, func(u *segmeshv1.NetmapUpdate) error {
		if u.GetFull() == nil {
			c.t.Errorf("the test pushed a delta to a Sync stream")
			return nil
		}
		return stream.Send(u.GetFull())
	})
}

func (c *controller) SyncUpdates(ctx context.Context, req *connect.Request[segmeshv1.SyncRequest], stream *connect.ServerStream[segmeshv1.NetmapUpdate]) error {
	c.mu.Lock()
	c.updateReqs = append(c.updateReqs, req.Msg)
	legacy := c.legacy
	c.mu.Unlock()
	if legacy {
		return c.UnimplementedAgentServiceHandler.SyncUpdates(ctx, req, stream)
	}
	return c.serve(ctx, req.Msg, stream.Send)
}

// serve runs one netmap stream: current (when set) as a full netmap, then what the
// test pushes; after each message it returns syncErr when set. A full netmap
// pushed becomes current.
func (c *controller) serve(ctx context.Context, req *segmeshv1.SyncRequest, send func(*segmeshv1.NetmapUpdate) error) error {
	c.record(ctx, "stream")
	c.mu.Lock()
	c.syncs = append(c.syncs, req)
	cur, refuse := c.current, c.syncErr
	c.mu.Unlock()
	if cur != nil {
		if err := send(fullUpdate(cur)); err != nil {
			return err
		}
	}
	if refuse != nil {
		return refuse
	}
	for {
		var u *segmeshv1.NetmapUpdate
		select {
		case <-ctx.Done():
			return nil
		case u = <-c.push:
		}
		if nm := u.GetFull(); nm != nil {
			c.mu.Lock()
			c.current = nm
			c.mu.Unlock()
		}
		if err := send(u); err != nil {
			return err
		}
		c.mu.Lock()
		refuse := c.syncErr
		c.mu.Unlock()
		if refuse != nil {
			return refuse
		}
	}
}

func fullUpdate(nm *segmeshv1.Netmap) *segmeshv1.NetmapUpdate {
	return &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Full{Full: nm}}
}

func deltaUpdate(d *segmeshv1.NetmapDelta) *segmeshv1.NetmapUpdate {
	return &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Delta{Delta: d}}
}

func (c *controller) Report(ctx context.Context, req *connect.Request[segmeshv1.ReportRequest]) (*connect.Response[segmeshv1.ReportResponse], error) {
	c.record(ctx, "Report")
	c.mu.Lock()
	refuse := c.reportErr
	if refuse == nil {
		c.reports = append(c.reports, req.Msg)
	}
	c.mu.Unlock()
	if refuse != nil {
		return nil, refuse
	}
	return connect.NewResponse(&segmeshv1.ReportResponse{}), nil
}

// popErr returns and removes the first of errs (the errors injected for the next
// calls), or nil. The caller holds c.mu.
func popErr(errs *[]*connect.Error) *connect.Error {
	if len(*errs) == 0 {
		return nil
	}
	e := (*errs)[0]
	*errs = (*errs)[1:]
	return e
}

func (c *controller) RenewCertificate(ctx context.Context, req *connect.Request[segmeshv1.RenewCertificateRequest]) (*connect.Response[segmeshv1.RenewCertificateResponse], error) {
	c.record(ctx, "RenewCertificate")
	c.mu.Lock()
	c.renews = append(c.renews, req.Msg)
	refuse := popErr(&c.renewErrs)
	c.mu.Unlock()
	if refuse != nil {
		return nil, refuse
	}
	der, err := c.sign(req.Msg.GetCsrDer(), "web-1")
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	cert, _ := x509.ParseCertificate(der)
	return connect.NewResponse(&segmeshv1.RenewCertificateResponse{CertificateDer: der, NotAfterUnix: cert.NotAfter.Unix()}), nil
}

func (c *controller) RotateKey(ctx context.Context, req *connect.Request[segmeshv1.RotateKeyRequest]) (*connect.Response[segmeshv1.RotateKeyResponse], error) {
	c.record(ctx, "RotateKey")
	c.mu.Lock()
	c.rotates = append(c.rotates, req.Msg)
	refuse := popErr(&c.rotateErrs)
	c.mu.Unlock()
	if refuse != nil {
		return nil, refuse
	}
	return connect.NewResponse(&segmeshv1.RotateKeyResponse{}), nil
}

func (c *controller) setNetmap(nm *segmeshv1.Netmap) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.current = nm
}

// lastReport returns the latest report, or nil.
func (c *controller) lastReport() *segmeshv1.ReportRequest {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.reports) == 0 {
		return nil
	}
	return c.reports[len(c.reports)-1]
}

func (c *controller) counts() (enrolls, syncs int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.enrolls), len(c.syncs)
}

// ---------------------------------------------------------------- helpers

func key(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

func dkey(b byte) dataplane.Key { return dataplane.Key(key(b)) }

// identities are the identity (TLS client) keys of test nodes, by the byte of their
// WireGuard key: 1 is web-1, 2 and 3 are peers b and c, 9 is an intruder.
var identities = func() map[byte]*ecdsa.PrivateKey {
	out := map[byte]*ecdsa.PrivateKey{}
	for _, b := range []byte{1, 2, 3, 9} {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			panic(err)
		}
		out[b] = k
	}
	return out
}()

// identityDER is the PKIX DER of test node b's identity key, as netmaps carry it.
func identityDER(b byte) []byte {
	der, err := x509.MarshalPKIXPublicKey(&identities[b].PublicKey)
	if err != nil {
		panic(err)
	}
	return der
}

var testFilter = &segmeshv1.Filter{
	Sets: []*segmeshv1.AddressSet{{Name: "db", Prefixes: []string{"100.64.0.3/32"}}},
	Ingress: []*segmeshv1.FilterRule{{Set: "db", Origin: "db-to-web (policy.yaml:9:5)",
		Matches: []*segmeshv1.PortMatch{{Protocol: segmeshv1.Protocol_PROTOCOL_TCP, Ports: []*segmeshv1.PortRange{{First: 8080, Last: 8080}}}}}},
}

// wireNetmap builds a hashed netmap for node "web-1" with peers b (unknown
// endpoint) and c.
func wireNetmap(rev uint64, gossipPort int) *segmeshv1.Netmap {
	nm := &segmeshv1.Netmap{
		PolicyRevision: rev,
		Self:           &segmeshv1.Node{Name: "web-1", Addresses: []string{"100.64.0.1/32", "fd5e:6d65:7368::1/128"}},
		Peers: []*segmeshv1.Peer{
			{Name: "b", PublicKey: key(2), AllowedIps: []string{"100.64.0.2/32", "fd5e:6d65:7368::2/128"}, IdentityKey: identityDER(2)},
			{Name: "c", PublicKey: key(3), Endpoint: "192.0.2.3:51820", AllowedIps: []string{"100.64.0.3/32"}, IdentityKey: identityDER(3)},
		},
		Filter:          testFilter,
		OverlayPrefixes: []string{"100.64.0.0/10", "fd5e:6d65:7368::/48"},
	}
	if gossipPort != 0 {
		nm.Gossip = &segmeshv1.GossipConfig{Key: key(7), Port: uint32(gossipPort)}
	}
	nm.Hash = wire.NetmapHash(nm)
	return nm
}

type run struct {
	dp     *fake.Dataplane
	logs   *testlog.Buffer
	cancel context.CancelFunc
	done   chan error
	ifaces chan string
}

// start runs the agent with a fake dataplane until the test ends (or stop).
func start(t *testing.T, opts Options) *run {
	t.Helper()
	return startWith(t, fake.New(dataplane.KindUserspace), opts)
}

// startWith is start with a given fake dataplane.
func startWith(t *testing.T, dp *fake.Dataplane, opts Options) *run {
	t.Helper()
	r := &run{dp: dp, logs: &testlog.Buffer{}, done: make(chan error, 1), ifaces: make(chan string, 4)}
	opts.Logger = slog.New(slog.NewTextHandler(r.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts.NewDataplane = func(iface string) (dataplane.Dataplane, error) {
		r.ifaces <- iface
		return r.dp, nil
	}
	if opts.Resync == 0 {
		opts.Resync = 50 * time.Millisecond
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- Run(ctx, opts) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop cancels the run and returns Run's error.
func (r *run) stop(t *testing.T) error {
	t.Helper()
	r.cancel()
	select {
	case err, ok := <-r.done:
		if ok {
			close(r.done)
			return err
		}
		return nil
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return after cancel")
		return nil
	}
}

// wait returns Run's error, failing if it does not return in time.
func (r *run) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.done:
		close(r.done)
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return")
		return nil
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// expected is the dataplane state the agent must program for nm.
func expected(t *testing.T, dir string, pb *segmeshv1.Netmap, endpoints map[dataplane.Key]netip.AddrPort) dataplane.State {
	t.Helper()
	d, err := statefile.Open(dir, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	k, err := d.WireGuardKey()
	if err != nil {
		t.Fatal(err)
	}
	id, err := d.Identity()
	if err != nil {
		t.Fatal(err)
	}
	addrs, _ := wire.ParsePrefixes(id.Addresses)
	routes, _ := wire.ParsePrefixes(id.OverlayPrefixes)
	local := reconcile.Local{Interface: id.Interface, PrivateKey: dataplane.Key(k), ListenPort: id.ListenPort, MTU: MTU, Addresses: addrs, Routes: routes}
	var nm *netmap.Netmap
	if pb != nil {
		if nm, err = netmap.Parse(pb); err != nil {
			t.Fatal(err)
		}
	}
	return reconcile.Desired(local, nm, endpoints)
}

func holds(dp *fake.Dataplane, want dataplane.State) bool {
	got, up := dp.State()
	return up && len(dataplane.Diff(want, got)) == 0
}

// enrolled runs a first start against c that applies pb, then stops, leaving an
// enrolled state directory (with pb stored when non-nil).
func enrolled(t *testing.T, c *controller, pb *segmeshv1.Netmap) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "state")
	c.setNetmap(pb)
	_, syncs := c.counts()
	c.mu.Lock()
	reports := len(c.reports)
	c.mu.Unlock()
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
	if pb != nil {
		eventually(t, "first netmap applied", func() bool {
			c.mu.Lock()
			defer c.mu.Unlock()
			for _, rep := range c.reports[reports:] {
				if rep.GetAppliedHash() == pb.GetHash() {
					return true
				}
			}
			return false
		})
	} else {
		eventually(t, "first sync", func() bool { _, s := c.counts(); return s > syncs })
	}
	if err := r.stop(t); err != nil {
		t.Fatalf("Run: %v", err)
	}
	return dir
}

// ---------------------------------------------------------------- tests

func TestFirstStartEnrollsAppliesAndReports(t *testing.T) {
	c := newController(t)
	pb := wireNetmap(3, 0)
	c.setNetmap(pb)
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0", ListenPort: 51999})
	if got := <-r.ifaces; got != "smt0" {
		t.Fatalf("dataplane opened for %q, want smt0", got)
	}
	eventually(t, "report of revision 3", func() bool {
		rep := c.lastReport()
		return rep != nil && rep.GetAppliedRevision() == 3 && rep.GetAppliedHash() == pb.GetHash() && rep.GetDataplane() == "userspace" && rep.GetError() == ""
	})
	want := expected(t, dir, pb, nil)
	if got, _ := r.dp.State(); len(dataplane.Diff(want, got)) > 0 {
		t.Fatalf("dataplane:\n%s", driftText(want, got))
	}
	if logs := r.logs.String(); strings.Contains(logs, "ignoring the join token") {
		t.Errorf("the first start says it ignores the join token it just enrolled with:\n%s", logs)
	}
	if len(want.Peers) != 2 || want.ListenPort != 51999 || want.Interface != "smt0" || len(want.Filter.Ingress) != 1 {
		t.Fatalf("unexpected desired state %+v", want)
	}

	c.mu.Lock()
	enrollReq, syncReq := c.enrolls[0], c.syncs[0]
	c.mu.Unlock()
	k, err := os.ReadFile(filepath.Join(dir, statefile.WireGuardKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	priv, err := wgtypes.ParseKey(strings.TrimSpace(string(k)))
	if err != nil {
		t.Fatal(err)
	}
	pub := priv.PublicKey()
	if !bytes.Equal(enrollReq.GetPublicKey(), pub[:]) {
		t.Error("enrollment did not send the WireGuard public key")
	}
	if bytes.Contains([]byte(enrollReq.String()), priv[:]) {
		t.Error("enrollment request contains the private key")
	}
	if enrollReq.GetEndpoint() != "127.0.0.1:51999" || syncReq.GetEndpoint() != "127.0.0.1:51999" {
		t.Errorf("endpoints: enroll %q, sync %q; want 127.0.0.1:51999 (local address towards the controller)", enrollReq.GetEndpoint(), syncReq.GetEndpoint())
	}
	if syncReq.GetDataplane() != "userspace" || syncReq.GetVersion() == "" {
		t.Errorf("sync request %v", syncReq)
	}
	for name, mode := range map[string]os.FileMode{
		"": 0o700, statefile.WireGuardKeyFile: 0o600, statefile.TLSKeyFile: 0o600, statefile.IdentityFile: 0o600, statefile.NetmapFile: 0o600,
		statefile.CAFile: 0o600, statefile.CertFile: 0o600,
	} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil || st.Mode().Perm() != mode {
			t.Errorf("%s: mode %v, err %v; want %v", name, st.Mode().Perm(), err, mode)
		}
	}

	// A new netmap on the open stream is applied, stored and reported.
	pb4 := wireNetmap(4, 0)
	pb4.Peers = pb4.Peers[1:]
	pb4.Hash = wire.NetmapHash(pb4)
	c.push <- fullUpdate(pb4)
	want4 := expected(t, dir, pb4, nil)
	eventually(t, "revision 4 applied and reported", func() bool {
		rep := c.lastReport()
		return holds(r.dp, want4) && rep != nil && rep.GetAppliedRevision() == 4 && rep.GetAppliedHash() == pb4.GetHash()
	})
	d, _ := statefile.Open(dir, slog.Default())
	if stored, err := d.Netmap(); err != nil || stored.GetHash() != pb4.GetHash() {
		t.Errorf("stored netmap hash %q, err %v; want revision 4", stored.GetHash(), err)
	}

	if err := r.stop(t); err != nil {
		t.Fatalf("Run returned %v after cancel, want nil", err)
	}
	if !r.dp.Closed() || r.dp.Stats().Downs != 0 {
		t.Errorf("after stop: closed=%v downs=%d; want the dataplane closed, not taken down", r.dp.Closed(), r.dp.Stats().Downs)
	}
	if !holds(r.dp, want4) {
		t.Error("stopping changed the dataplane state; the filter must stay")
	}
	if n, _ := c.counts(); n != 1 {
		t.Errorf("enrollments = %d, want 1", n)
	}
}

func TestRestartAppliesStoredNetmapBeforeContactingController(t *testing.T) {
	c := newController(t)
	pb := wireNetmap(5, 0)
	dir := enrolled(t, c, pb)
	want := expected(t, dir, pb, nil)

	// The controller now has a newer netmap; what matters is the state at the
	// moment the restarted agent first reaches it.
	pb6 := wireNetmap(6, 0)
	pb6.Peers = nil
	pb6.Hash = wire.NetmapHash(pb6)
	c.setNetmap(pb6)
	var mu sync.Mutex
	var atContact *dataplane.State
	dp := fake.New(dataplane.KindUserspace)
	c.mu.Lock()
	c.accessed = false
	c.firstAccess = func() {
		mu.Lock()
		defer mu.Unlock()
		s, _ := dp.State()
		atContact = &s
	}
	c.mu.Unlock()
	r := startWith(t, dp, Options{StateDir: dir})
	eventually(t, "revision 6", func() bool { rep := c.lastReport(); return rep != nil && rep.GetAppliedRevision() == 6 })
	mu.Lock()
	defer mu.Unlock()
	if atContact == nil {
		t.Fatal("controller never contacted")
	}
	if d := driftText(want, *atContact); d != "" {
		t.Fatalf("at first controller contact the dataplane did not hold the stored netmap:\n%s", d)
	}
	if h := r.dp.History(); len(h) == 0 || len(dataplane.Diff(want, h[0])) > 0 {
		t.Fatal("first apply was not the stored netmap")
	}
	if n, _ := c.counts(); n != 1 {
		t.Errorf("enrollments = %d, want 1 (restart reuses the identity)", n)
	}
}

func TestRestartWithoutController(t *testing.T) {
	pb := wireNetmap(5, 0)
	tests := []struct {
		name    string
		prepare func(t *testing.T, dir string)
		netmap  *segmeshv1.Netmap // expected state; nil = default deny
		log     string
	}{
		{name: "stored netmap", prepare: func(*testing.T, string) {}, netmap: pb, log: "applying stored netmap"},
		{name: "no netmap: default deny", prepare: func(t *testing.T, dir string) {
			if err := os.Remove(filepath.Join(dir, statefile.NetmapFile)); err != nil {
				t.Fatal(err)
			}
		}, log: "no stored netmap"},
		{name: "corrupted netmap: default deny", prepare: func(t *testing.T, dir string) {
			if err := os.WriteFile(filepath.Join(dir, statefile.NetmapFile), []byte("\xff\xff garbage"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, log: "stored netmap is unusable"},
		{name: "tampered netmap: default deny", prepare: func(t *testing.T, dir string) {
			bad := wireNetmap(5, 0)
			bad.Peers[0].AllowedIps = []string{"0.0.0.0/0"} // hash no longer matches
			d, _ := statefile.Open(dir, slog.Default())
			if err := d.SaveNetmap(bad); err != nil {
				t.Fatal(err)
			}
		}, log: "hash mismatch"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newController(t)
			dir := enrolled(t, c, pb)
			tt.prepare(t, dir)
			c.kill()
			r := start(t, Options{StateDir: dir})
			want := expected(t, dir, tt.netmap, nil)
			eventually(t, "initial state", func() bool { return holds(r.dp, want) })
			if tt.netmap == nil {
				got, _ := r.dp.State()
				if len(got.Peers) != 0 || len(got.Filter.Ingress) != 0 || len(got.Addresses) != 2 || len(got.Routes) != 2 {
					t.Fatalf("default deny state %+v", got)
				}
			}
			eventually(t, "log "+tt.log, func() bool { return strings.Contains(r.logs.String(), tt.log) })
			eventually(t, "reconnect attempts", func() bool { return strings.Contains(r.logs.String(), "controller stream ended; reconnecting") })
			if h := r.dp.History(); len(h) != 1 {
				t.Errorf("applies = %d, want exactly 1", len(h))
			}
		})
	}
}

func TestEnrollmentRefusedExits(t *testing.T) {
	tests := []struct {
		name    string
		errs    []*connect.Error
		want    string // "" = success
		enrolls int
	}{
		{name: "reused token", errs: []*connect.Error{connect.NewError(connect.CodePermissionDenied, errors.New("join token already used"))},
			want: "join token already used", enrolls: 1},
		{name: "unknown token", errs: []*connect.Error{connect.NewError(connect.CodeUnauthenticated, errors.New("unknown join token"))},
			want: "unknown join token", enrolls: 1},
		{name: "name taken", errs: []*connect.Error{connect.NewError(connect.CodeAlreadyExists, errors.New(`node "web-1" exists`))},
			want: `node "web-1" exists`, enrolls: 1},
		{name: "unavailable is retried", errs: []*connect.Error{connect.NewError(connect.CodeUnavailable, errors.New("starting up"))}, enrolls: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newController(t)
			c.enrollErrs = tt.errs
			c.setNetmap(wireNetmap(1, 0))
			dir := filepath.Join(t.TempDir(), "state")
			r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
			if tt.want != "" {
				err := r.wait(t)
				// The controller's message once, after a short prefix; no connect code.
				if want := "enrollment refused: " + tt.want; err == nil || err.Error() != want {
					t.Fatalf("Run = %v, want %q", err, want)
				}
				if _, err := os.Stat(filepath.Join(dir, statefile.IdentityFile)); !errors.Is(err, os.ErrNotExist) {
					t.Error("identity stored after a refused enrollment")
				}
			} else {
				eventually(t, "report after retry", func() bool { return c.lastReport() != nil })
			}
			if n, _ := c.counts(); n != tt.enrolls {
				t.Errorf("enroll calls = %d, want %d", n, tt.enrolls)
			}
		})
	}
}

func TestStartErrors(t *testing.T) {
	c := newController(t)
	dir := enrolled(t, c, nil)
	other := newController(t)
	tests := []struct {
		name string
		opts Options
		want string
	}{
		{name: "other name", opts: Options{StateDir: dir, Name: "db-1"}, want: `enrolled as node "web-1", not "db-1"`},
		{name: "first start without token", opts: Options{StateDir: filepath.Join(t.TempDir(), "s"), Controllers: []string{c.url}}, want: "needs a join token (--token-file FILE"},
		{name: "first start without anything", opts: Options{StateDir: filepath.Join(t.TempDir(), "s2")}, want: "needs --controller URL and a join token"},
		{name: "malformed token", opts: Options{StateDir: filepath.Join(t.TempDir(), "s"), Controllers: []string{c.url}, Token: "nope"}, want: "malformed join token"},
		{name: "token for another CA", opts: Options{StateDir: filepath.Join(t.TempDir(), "s"), Controllers: []string{c.url}, Token: other.token()}, want: "controller CA does not match the join token"},
		{name: "long interface name", opts: Options{StateDir: dir, Interface: "much-too-long-name"}, want: "1 to 15 bytes"},
		{name: "too many controller URLs", opts: Options{StateDir: dir, Controllers: func() (urls []string) {
			for i := range MaxControllers + 1 {
				urls = append(urls, fmt.Sprintf("https://10.0.0.%d:7443", i+1))
			}
			return urls
		}()}, want: "at most 16 are kept"},
		{name: "one bad controller URL of several", opts: Options{StateDir: dir, Controllers: []string{c.url, "http://192.0.2.1:7443"}}, want: `--controller "http://192.0.2.1:7443": scheme "http" refused`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := start(t, tt.opts)
			err := r.wait(t)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Run = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func TestRejectsBadNetmapFromController(t *testing.T) {
	c := newController(t)
	pb := wireNetmap(5, 0)
	c.setNetmap(pb)
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
	eventually(t, "revision 5", func() bool { rep := c.lastReport(); return rep != nil && rep.GetAppliedRevision() == 5 })
	want := expected(t, dir, pb, nil)

	bad := wireNetmap(6, 0)
	bad.Hash = wire.NetmapHash(bad)
	bad.Peers[0].AllowedIps = []string{"0.0.0.0/0"} // after hashing: tampered
	c.push <- fullUpdate(bad)
	eventually(t, "rejection reported", func() bool {
		rep := c.lastReport()
		return rep != nil && strings.Contains(rep.GetError(), "hash mismatch") && rep.GetAppliedRevision() == 5
	})
	if !holds(r.dp, want) {
		t.Fatal("a rejected netmap changed the dataplane")
	}
	d, _ := statefile.Open(dir, slog.Default())
	if stored, _ := d.Netmap(); stored.GetPolicyRevision() != 5 {
		t.Fatalf("stored revision %d, want 5", stored.GetPolicyRevision())
	}

	other := wireNetmap(7, 0)
	other.Self.Name = "db-1"
	other.Hash = wire.NetmapHash(other)
	c.push <- fullUpdate(other)
	eventually(t, "wrong-node rejection reported", func() bool {
		rep := c.lastReport()
		return rep != nil && strings.Contains(rep.GetError(), `netmap is for node "db-1"`)
	})
	if !holds(r.dp, want) {
		t.Fatal("a netmap for another node changed the dataplane")
	}
}

func TestGossipOverridesEndpointOfKnownPeer(t *testing.T) {
	port := freePort(t)
	c := newController(t)
	pb := wireNetmap(9, port)
	c.setNetmap(pb)
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
	eventually(t, "revision 9", func() bool { rep := c.lastReport(); return rep != nil && rep.GetAppliedRevision() == 9 })

	// Peer b (in the netmap, endpoint unknown there) and an intruder that holds the
	// gossip key but is no peer.
	newEP := netip.MustParseAddrPort("198.51.100.2:40000")
	b := startMember(t, "b", 2, newEP)
	x := startMember(t, "x", 9, netip.MustParseAddrPort("198.51.100.9:51820"))
	for _, m := range []*gossip.Manager{b, x} {
		eventually(t, "join the agent's gossip", func() bool {
			_, err := m.Join([]netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))})
			return err == nil
		})
	}
	want := expected(t, dir, pb, map[dataplane.Key]netip.AddrPort{dkey(2): newEP})
	eventually(t, "b's gossip endpoint programmed and b reported alive", func() bool {
		rep := c.lastReport()
		return holds(r.dp, want) && rep != nil && slices.Equal(rep.GetAlivePeers(), []string{"b"})
	})
	got, _ := r.dp.State()
	if len(got.Peers) != 2 {
		t.Fatalf("peers = %d, want 2: gossip must not add the intruder", len(got.Peers))
	}
	for _, p := range got.Peers {
		if p.PublicKey == dkey(2) && (p.Endpoint != newEP || len(p.AllowedIPs) != 2) {
			t.Fatalf("peer b = %+v", p)
		}
	}
}

// startMember runs a gossip member named name with test node k's WireGuard and
// identity keys, advertising ep.
func startMember(t *testing.T, name string, k byte, ep netip.AddrPort) *gossip.Manager {
	t.Helper()
	m := gossip.NewManager(slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	cfg := gossip.Config{NodeName: name, BindAddr: netip.MustParseAddr("127.0.0.1"), Key: key(7), Meta: gossip.Meta{PublicKey: dkey(k), Endpoint: ep}, IdentityKey: identities[k]}
	if err := m.Configure(cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Stop)
	return m
}

// freePort returns a port that was free for both TCP and UDP on 127.0.0.1.
func freePort(t *testing.T) int {
	t.Helper()
	for range 20 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		pc, err := net.ListenPacket("udp", ln.Addr().String())
		ln.Close()
		if err == nil {
			pc.Close()
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}

func TestGossipView(t *testing.T) {
	nm, err := netmap.Parse(wireNetmap(1, 0))
	if err != nil {
		t.Fatal(err)
	}
	noIdentity := wireNetmap(1, 0)
	noIdentity.Peers[0].IdentityKey = nil
	noIdentity.Hash = wire.NetmapHash(noIdentity)
	nmNoIdentity, err := netmap.Parse(noIdentity)
	if err != nil {
		t.Fatal(err)
	}
	ep := netip.MustParseAddrPort
	// claim is member name's claim with test node k's WireGuard key, endpoint e
	// (none when empty) and timestamp ts, signed with test node signer's identity.
	claim := func(name string, k byte, e string, ts int64, signer byte) gossip.Claim {
		m := gossip.Meta{PublicKey: dkey(k)}
		if e != "" {
			m.Endpoint = ep(e)
		}
		c, err := gossip.SignClaim(name, m, time.Unix(0, ts), identities[signer])
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	member := func(name string, c gossip.Claim) gossip.Member { return gossip.Member{Name: name, Claim: c} }
	signed := func(name string, k byte, e string, ts int64) gossip.Member {
		return member(name, claim(name, k, e, ts, k))
	}
	tampered := signed("b", 2, "198.51.100.2:1", 10)
	tampered.Claim.Endpoint = ep("203.0.113.66:51820")
	bNew := claim("b", 2, "198.51.100.2:2", 20, 2)
	tests := []struct {
		name     string
		nm       *netmap.Netmap          // nil: nm
		accepted map[string]gossip.Claim // accepted while the netmap said what nm says
		// acceptedWhen, when set, is the netmap endpoint under which accepted was
		// accepted (instead of nm's)
		acceptedWhen map[string]netip.AddrPort
		members      []gossip.Member
		endpoints    map[dataplane.Key]netip.AddrPort
		alive        []string
		wantTS       map[string]int64 // timestamps of the accepted claims afterwards
	}{
		{name: "none"},
		{name: "valid claim accepted", members: []gossip.Member{signed("b", 2, "198.51.100.2:1", 10)},
			endpoints: map[dataplane.Key]netip.AddrPort{dkey(2): ep("198.51.100.2:1")}, alive: []string{"b"}, wantTS: map[string]int64{"b": 10}},
		{name: "same endpoint as the netmap", members: []gossip.Member{signed("c", 3, "192.0.2.3:51820", 10)}, alive: []string{"c"}, wantTS: map[string]int64{"c": 10}},
		{name: "no endpoint advertised", members: []gossip.Member{signed("c", 3, "", 10)}, alive: []string{"c"}, wantTS: map[string]int64{"c": 10}},
		// A peer signs its own claims: like the controller for candidates, the
		// agent must not send to an address no peer on another host has.
		{name: "loopback endpoint not used", members: []gossip.Member{signed("b", 2, "127.0.0.1:22", 10)}, alive: []string{"b"}, wantTS: map[string]int64{"b": 10}},
		{name: "link-local endpoint not used", members: []gossip.Member{signed("b", 2, "169.254.169.254:80", 10)}, alive: []string{"b"}, wantTS: map[string]int64{"b": 10}},
		{name: "multicast endpoint not used", members: []gossip.Member{signed("b", 2, "224.0.0.251:5353", 10)}, alive: []string{"b"}, wantTS: map[string]int64{"b": 10}},
		{name: "broadcast endpoint not used", members: []gossip.Member{signed("b", 2, "255.255.255.255:51820", 10)}, alive: []string{"b"}, wantTS: map[string]int64{"b": 10}},
		{name: "port 0 not used", members: []gossip.Member{signed("b", 2, "198.51.100.2:0", 10)}, alive: []string{"b"}, wantTS: map[string]int64{"b": 10}},
		{name: "overlay endpoint not used", members: []gossip.Member{signed("b", 2, "100.64.0.3:51820", 10)}, alive: []string{"b"}, wantTS: map[string]int64{"b": 10}},
		{name: "unknown key ignored", members: []gossip.Member{signed("x", 9, "198.51.100.9:1", 10)}},
		{name: "peer's key under another name ignored", members: []gossip.Member{member("x", claim("x", 2, "198.51.100.9:1", 10, 2))}},
		{name: "claim names another member", members: []gossip.Member{member("b", claim("c", 2, "198.51.100.9:1", 10, 2))}},
		{name: "claim signed by another node's key refused", members: []gossip.Member{member("b", claim("b", 2, "198.51.100.9:1", 10, 3))}},
		{name: "claim signed by an intruder refused", members: []gossip.Member{member("b", claim("b", 2, "198.51.100.9:1", 10, 9))}},
		{name: "tampered endpoint refused", members: []gossip.Member{tampered}},
		{name: "replayed older claim refused", accepted: map[string]gossip.Claim{"b": bNew},
			members: []gossip.Member{signed("b", 2, "198.51.100.2:1", 10)}, endpoints: map[dataplane.Key]netip.AddrPort{dkey(2): ep("198.51.100.2:2")}, alive: []string{"b"}, wantTS: map[string]int64{"b": 20}},
		{name: "other claim with the accepted timestamp refused", accepted: map[string]gossip.Claim{"b": bNew},
			members: []gossip.Member{signed("b", 2, "198.51.100.2:1", 20)}, endpoints: map[dataplane.Key]netip.AddrPort{dkey(2): ep("198.51.100.2:2")}, alive: []string{"b"}, wantTS: map[string]int64{"b": 20}},
		{name: "the accepted claim again still counts", accepted: map[string]gossip.Claim{"b": bNew},
			members:   []gossip.Member{member("b", bNew)},
			endpoints: map[dataplane.Key]netip.AddrPort{dkey(2): ep("198.51.100.2:2")}, alive: []string{"b"}, wantTS: map[string]int64{"b": 20}},
		{name: "newer claim replaces the accepted one", accepted: map[string]gossip.Claim{"b": bNew},
			members:   []gossip.Member{signed("b", 2, "198.51.100.2:3", 30)},
			endpoints: map[dataplane.Key]netip.AddrPort{dkey(2): ep("198.51.100.2:3")}, alive: []string{"b"}, wantTS: map[string]int64{"b": 30}},
		{name: "peer without identity key refused", nm: nmNoIdentity, members: []gossip.Member{signed("b", 2, "198.51.100.2:1", 10)},
			alive: []string{"b"}},
		{name: "sorted", members: []gossip.Member{signed("c", 3, "", 10), signed("b", 2, "", 10)}, alive: []string{"b", "c"},
			wantTS: map[string]int64{"b": 10, "c": 10}},
		// Issue 10, roaming defect 4: a roamed peer marked failed keeps the
		// endpoint gossip last accepted, until the controller's is newer.
		{name: "failed member keeps the last accepted endpoint", accepted: map[string]gossip.Claim{"b": bNew},
			endpoints: map[dataplane.Key]netip.AddrPort{dkey(2): ep("198.51.100.2:2")}, wantTS: map[string]int64{"b": 20}},
		{name: "the controller's newer endpoint replaces it", accepted: map[string]gossip.Claim{"b": bNew},
			acceptedWhen: map[string]netip.AddrPort{"b": ep("192.0.2.99:51820")}, wantTS: map[string]int64{"b": 20}},
		{name: "the accepted claim again does not outrank the controller's newer endpoint", accepted: map[string]gossip.Claim{"b": bNew},
			acceptedWhen: map[string]netip.AddrPort{"b": ep("192.0.2.99:51820")}, members: []gossip.Member{member("b", bNew)},
			alive: []string{"b"}, wantTS: map[string]int64{"b": 20}},
		{name: "a claim of a name that is no longer a peer is forgotten", accepted: map[string]gossip.Claim{"gone": claim("gone", 9, "198.51.100.9:1", 10, 9)}},
	}
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			view := nm
			if tt.nm != nil {
				view = tt.nm
			}
			accepted := map[string]acceptedClaim{}
			for k, v := range tt.accepted {
				a := acceptedClaim{Claim: v}
				if p, ok := view.Peer(v.PublicKey); ok {
					a.netmapEndpoint = p.Endpoint
				}
				if e, ok := tt.acceptedWhen[k]; ok {
					a.netmapEndpoint = e
				}
				accepted[k] = a
			}
			eps, alive := gossipView(view, tt.members, accepted, logger)
			if d := cmp.Diff(tt.endpoints, eps, cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); d != "" {
				t.Errorf("endpoints (-want +got):\n%s", d)
			}
			if !slices.Equal(alive, tt.alive) {
				t.Errorf("alive = %v, want %v", alive, tt.alive)
			}
			gotTS := map[string]int64{}
			for k, c := range accepted {
				gotTS[k] = c.Timestamp
			}
			if d := cmp.Diff(tt.wantTS, gotTS, cmpopts.EquateEmpty()); d != "" {
				t.Errorf("accepted claims (-want +got):\n%s", d)
			}
		})
	}
	if eps, alive := gossipView(nil, []gossip.Member{signed("b", 2, "198.51.100.2:1", 10)}, map[string]acceptedClaim{}, logger); eps != nil || alive != nil {
		t.Error("members counted without a netmap")
	}
}

// downDP is a fake whose Down and Read can be made to fail.
type downDP struct {
	*fake.Dataplane
	downErr error
}

func (d *downDP) Down(ctx context.Context) error {
	if d.downErr != nil {
		return d.downErr
	}
	return d.Dataplane.Down(ctx)
}

func TestDown(t *testing.T) {
	c := newController(t)
	dir := enrolled(t, c, wireNetmap(1, 0))
	pb := wireNetmap(1, 0)
	full := expected(t, dir, pb, nil)
	running := errors.New("agent with pid 42 still runs; stop it first")
	tests := []struct {
		name    string
		prepare func(dp *downDP)
		want    DownResult
		wantMsg string
		wantErr string
	}{
		{name: "interface and table exist", prepare: func(dp *downDP) { _ = dp.Apply(context.Background(), full) },
			want:    DownResult{Interface: "smt0", InterfaceRemoved: true, TableRemoved: true},
			wantMsg: "removed interface smt0 and table inet segmesh"},
		{name: "nothing exists", prepare: func(*downDP) {},
			want:    DownResult{Interface: "smt0"},
			wantMsg: "nothing to remove: neither interface smt0 nor table inet segmesh exists"},
		{name: "read back fails", prepare: func(dp *downDP) {
			_ = dp.Apply(context.Background(), full)
			dp.FailRead(errors.New("netlink: boom"))
		}, want: DownResult{Interface: "smt0", Unknown: true},
			wantMsg: "removed interface smt0 and table inet segmesh (whichever existed)"},
		{name: "Down refuses", prepare: func(dp *downDP) { dp.downErr = running },
			wantErr: "taking down smt0: agent with pid 42 still runs; stop it first"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dp := &downDP{Dataplane: fake.New(dataplane.KindUserspace)}
			tt.prepare(dp)
			var opened string
			res, err := Down(context.Background(), dir, func(iface string) (dataplane.Dataplane, error) {
				opened = iface
				return dp, nil
			})
			if opened != "smt0" || !dp.Closed() {
				t.Errorf("Down opened %q, closed %v; want smt0 opened and closed", opened, dp.Closed())
			}
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr || !errors.Is(err, running) {
					t.Fatalf("Down = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if res != tt.want || res.String() != tt.wantMsg {
				t.Errorf("Down = %+v %q, want %+v %q", res, res, tt.want, tt.wantMsg)
			}
			if _, up := dp.State(); up {
				t.Error("dataplane still up after Down")
			}
		})
	}
	if _, err := Down(context.Background(), filepath.Join(t.TempDir(), "nothing"), nil); err == nil || !strings.Contains(err.Error(), "no state directory") {
		t.Fatalf("Down on a missing directory = %v", err)
	}
}

func TestDownResultString(t *testing.T) {
	tests := []struct {
		r    DownResult
		want string
	}{
		{DownResult{Interface: "sm0", InterfaceRemoved: true, TableRemoved: true}, "removed interface sm0 and table inet segmesh"},
		{DownResult{Interface: "sm0", InterfaceRemoved: true}, "removed interface sm0 (table inet segmesh did not exist)"},
		{DownResult{Interface: "sm0", TableRemoved: true}, "removed table inet segmesh (interface sm0 did not exist)"},
		{DownResult{Interface: "sm0"}, "nothing to remove: neither interface sm0 nor table inet segmesh exists"},
		{DownResult{Interface: "sm0", Unknown: true}, "removed interface sm0 and table inet segmesh (whichever existed)"},
	}
	for _, tt := range tests {
		if got := tt.r.String(); got != tt.want {
			t.Errorf("%+v: %q, want %q", tt.r, got, tt.want)
		}
	}
}

// TestPeerlessNetmapIsReported: a node that no rule mentions gets a netmap without
// peers or rules, whose dataplane equals the default deny already in force. The
// agent still enforces it and must report its revision and hash.
func TestPeerlessNetmapIsReported(t *testing.T) {
	c := newController(t)
	pb := &segmeshv1.Netmap{
		PolicyRevision:  6,
		Self:            &segmeshv1.Node{Name: "web-1", Addresses: []string{"100.64.0.1/32", "fd5e:6d65:7368::1/128"}},
		OverlayPrefixes: []string{"100.64.0.0/10", "fd5e:6d65:7368::/48"},
	}
	pb.Hash = wire.NetmapHash(pb)
	c.setNetmap(pb)
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
	eventually(t, "report of revision 6", func() bool {
		rep := c.lastReport()
		return rep != nil && rep.GetAppliedRevision() == 6 && rep.GetAppliedHash() == pb.GetHash() && rep.GetError() == ""
	})
	if !holds(r.dp, expected(t, dir, nil, nil)) {
		t.Error("dataplane is not default deny")
	}
	if got := r.dp.Stats().Applies; got != 1 {
		t.Errorf("applies = %d, want 1 (the netmap needs no kernel change)", got)
	}
}

// TestControllerURLMustBeHTTPS: any other scheme (the join token would travel in
// cleartext) or a URL without a host is refused before any connection, and before
// the state directory is touched.
func TestControllerURLMustBeHTTPS(t *testing.T) {
	// A listener that counts connections: nothing may reach it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var mu sync.Mutex
	conns := 0
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns++
			mu.Unlock()
			c.Close()
		}
	}()
	addr := ln.Addr().String()
	c := newController(t)
	tests := []struct {
		url  string
		want string
	}{
		{"http://" + addr, `scheme "http" refused`},
		{"HTTP://" + addr, `scheme "http" refused`},
		{"ftp://" + addr, `scheme "ftp" refused`},
		{"https://", "has no host"},
		{"https:///segmesh", "has no host"},
		{"https://:7443", "has no host"},
		{addr, "not a URL"},
		{"//" + addr, "has no scheme"},
		{"https://user:secret@" + addr, "must not carry user information"},
	}
	for _, tt := range tests {
		t.Run(tt.url, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "state")
			r := start(t, Options{Controllers: []string{tt.url}, Token: c.token(), StateDir: dir, Name: "web-1"})
			err := r.wait(t)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "--controller") || !strings.Contains(err.Error(), "want https://HOST:PORT") {
				t.Fatalf("Run = %v, want an error naming --controller and %q", err, tt.want)
			}
			if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
				t.Error("state directory created before the URL was checked")
			}
		})
	}
	mu.Lock()
	defer mu.Unlock()
	if conns != 0 || len(c.enrolls) != 0 {
		t.Fatalf("connections = %d, enrollments = %d; want none", conns, len(c.enrolls))
	}

	// A stored identity with a cleartext URL (written by hand or by an older agent)
	// is refused as well.
	dir := enrolled(t, c, nil)
	d, _ := statefile.Open(dir, slog.Default())
	id, err := d.Identity()
	if err != nil {
		t.Fatal(err)
	}
	id.Controller = "http://" + addr
	if err := d.SaveIdentity(id); err != nil {
		t.Fatal(err)
	}
	r := start(t, Options{StateDir: dir})
	if err := r.wait(t); err == nil || !strings.Contains(err.Error(), `scheme "http" refused`) || !strings.Contains(err.Error(), "pass --controller") {
		t.Fatalf("Run with a stored http URL = %v", err)
	}
	if conns != 0 {
		t.Fatalf("connections = %d after a stored http URL", conns)
	}
}

// TestStopSaysWhatStays: the stop message must be true for the dataplane kind.
func TestStopSaysWhatStays(t *testing.T) {
	tests := []struct {
		kind          dataplane.Kind
		want, notWant string
	}{
		{dataplane.KindKernel, "kernel WireGuard interface (peers, addresses, routes) and the nftables table stay in force", "went away"},
		{dataplane.KindUserspace, "userspace WireGuard interface went away with the process", "interface (peers"},
	}
	for _, tt := range tests {
		t.Run(string(tt.kind), func(t *testing.T) {
			c := newController(t)
			pb := wireNetmap(3, 0)
			c.setNetmap(pb)
			r := startWith(t, fake.New(tt.kind), Options{Controllers: []string{c.url}, Token: c.token(), StateDir: filepath.Join(t.TempDir(), "state"), Name: "web-1", Interface: "smt0"})
			eventually(t, "revision 3 reported", func() bool { rep := c.lastReport(); return rep != nil && rep.GetAppliedRevision() == 3 })
			if err := r.stop(t); err != nil {
				t.Fatal(err)
			}
			logs := r.logs.String()
			var line string
			for l := range strings.Lines(logs) {
				if strings.Contains(l, "agent stopped") {
					line = l
				}
			}
			if !strings.Contains(line, tt.want) || strings.Contains(line, tt.notWant) || !strings.Contains(line, "revision=3") ||
				!strings.Contains(line, "interface=smt0") || !strings.Contains(line, `table="inet segmesh"`) {
				t.Fatalf("stop message %q, want %q with interface, table and revision", line, tt.want)
			}
			if strings.Contains(logs, "level=ERROR") {
				t.Errorf("stopping logged an error:\n%s", logs)
			}
		})
	}
}

// newGossipAgent is an agent web-1 with a fake dataplane and a gossip manager,
// for tests of the gossip step without the controller.
func newGossipAgent(t *testing.T, logger *slog.Logger) *agent {
	t.Helper()
	a := &agent{
		opts:    Options{Endpoint: "127.0.0.1:51820"},
		log:     logger,
		id:      statefile.Identity{NodeName: "web-1", Controller: "https://127.0.0.1:7443", ListenPort: 51820},
		ctl:     newControllers([]string{"https://127.0.0.1:7443"}, ""),
		wgKey:   dkey(1),
		tlsKey:  identities[1],
		claims:  map[string]acceptedClaim{},
		gossipC: make(chan struct{}, 1),
		reportC: make(chan struct{}, 1),
	}
	a.rec = reconcile.New(fake.New(dataplane.KindUserspace), reconcile.Local{Interface: "smt0"}, logger)
	a.gossip = gossip.NewManager(logger, nil)
	t.Cleanup(a.gossip.Stop)
	a.path = path.New(path.Options{Logger: logger})
	a.peers = &peerTable{}
	return a
}

// TestGossipOnlyWithPeers: memberlist runs only while the netmap configures gossip
// and lists a peer; a peerless node opens no gossip port even with the key.
func TestGossipOnlyWithPeers(t *testing.T) {
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	a := newGossipAgent(t, logger)
	parse := func(pb *segmeshv1.Netmap) *netmap.Netmap {
		pb.Hash = wire.NetmapHash(pb)
		nm, err := netmap.Parse(pb)
		if err != nil {
			t.Fatal(err)
		}
		return nm
	}
	withPeers := func() *netmap.Netmap { return parse(wireNetmap(1, freePort(t))) }
	peerless := func() *netmap.Netmap {
		pb := wireNetmap(2, freePort(t))
		pb.Peers = nil
		return parse(pb)
	}
	noKey := func() *netmap.Netmap { return parse(wireNetmap(3, 0)) }
	steps := []struct {
		name    string
		nm      func() *netmap.Netmap
		running bool
		joins   int
	}{
		{name: "peers and key", nm: withPeers, running: true, joins: 1}, // b has no endpoint; c does
		{name: "key but no peers", nm: peerless},
		{name: "peers again", nm: withPeers, running: true, joins: 1},
		{name: "no netmap", nm: func() *netmap.Netmap { return nil }},
		{name: "peers but no key", nm: noKey},
		{name: "key but no peers while stopped", nm: peerless},
	}
	for _, st := range steps {
		join := a.gossipStep(st.nm())
		if got := a.gossip.LocalAddr().IsValid(); got != st.running {
			t.Fatalf("%s: gossip running = %v, want %v", st.name, got, st.running)
		}
		if len(join) != st.joins {
			t.Fatalf("%s: join addresses %v, want %d", st.name, join, st.joins)
		}
	}
}

func TestBackoff(t *testing.T) {
	b := newBackoff(time.Second, 30*time.Second)
	want := []time.Duration{1, 2, 4, 8, 16, 30, 30}
	for i, w := range want {
		d := b.next()
		lo, hi := time.Duration(float64(w*time.Second)*0.8), time.Duration(float64(w*time.Second)*1.2)
		if d < lo || d > hi {
			t.Errorf("attempt %d: %v, want within [%v, %v]", i, d, lo, hi)
		}
	}
	b.reset()
	if d := b.next(); d > 1200*time.Millisecond {
		t.Errorf("after reset: %v", d)
	}
}

// driftText joins the differences of got from want with "; " ("" when equal).
func driftText(want, got dataplane.State) string {
	var parts []string
	for _, d := range dataplane.Diff(want, got) {
		parts = append(parts, d.String())
	}
	return strings.Join(parts, "; ")
}
