package controller

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/jointoken"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/controller/pki"
)

// TestUnauthenticatedAgentAndEnrollBodies: agent calls without a client
// certificate are refused before their body is read, and an oversized declared
// enrollment body is refused up front (issue 6, defect 3).
func TestUnauthenticatedAgentAndEnrollBodies(t *testing.T) {
	tc := startController(t, t.TempDir())
	body := &slowBody{release: make(chan struct{})}
	done := make(chan int, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, tc.url+segmeshv1connect.AgentServiceReportProcedure, body)
		req.Header.Set("Content-Type", "application/proto")
		resp, err := tc.httpClient(nil).Do(req)
		if err != nil {
			done <- -1
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	select {
	case code := <-done:
		if code != http.StatusUnauthorized {
			t.Errorf("Report without a client certificate: HTTP %d, want 401", code)
		}
	case <-time.After(10 * time.Second):
		t.Error("Report without a client certificate: no answer while the body was still being sent")
	}
	body.Close()

	for _, proc := range []string{segmeshv1connect.EnrollServiceEnrollProcedure} {
		req, _ := http.NewRequest(http.MethodPost, tc.url+proc, strings.NewReader(strings.Repeat("x", enrollBodyLimit+1)))
		req.Header.Set("Content-Type", "application/proto")
		resp, err := tc.httpClient(nil).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusTooManyRequests {
			t.Errorf("%s with %d bytes: HTTP %d, want 429", proc, enrollBodyLimit+1, resp.StatusCode)
		}
	}
}

// TestRefusedEnrollmentNameCannotForgeAudit: the name of a refused enrollment
// comes from an unauthenticated client; it is recorded quoted and bounded.
func TestRefusedEnrollmentNameCannotForgeAudit(t *testing.T) {
	tc := startController(t, t.TempDir())
	forged := "evil\n2026-12-01T22:00:01Z  admin  node.revoke  node:db-1  ok\n" + strings.Repeat("A", 5000)
	if _, err := tc.tryEnroll("smjt1_garbage", forged, newIdentity(t), ""); err == nil {
		t.Fatal("enrollment with a garbage token succeeded")
	}
	recs := tc.audit(nil)
	r := recs[len(recs)-1]
	if !strings.HasPrefix(r.Result, "refused:") || strings.ContainsAny(r.Object, "\n\r") || len(r.Object) > 100 {
		t.Errorf("refused enrollment recorded as object %q result %q", r.Object, r.Result)
	}
}

// TestViewerCannotGrowAudit: a viewer's calls to unknown procedures are 404s
// without an audit record, and its refused changes are audited within a budget.
func TestViewerCannotGrowAudit(t *testing.T) {
	tc := startController(t, t.TempDir())
	resp, err := tc.op().CreateOperator(bg, connect.NewRequest(&segmeshv1.CreateOperatorRequest{Name: "v", Role: "viewer"}))
	if err != nil {
		t.Fatal(err)
	}
	viewer := resp.Msg.Token
	before := len(tc.audit(nil))
	if status, _ := tc.callRaw(viewer, "/segmesh.v1.OperatorService/"+strings.Repeat("A", 1000), strings.NewReader("{}")); status != http.StatusNotFound {
		t.Errorf("unknown procedure: HTTP %d, want 404", status)
	}
	if status, _ := tc.callRaw(viewer, segmeshv1connect.OperatorServiceCreateTokenProcedure+"/", strings.NewReader("{}")); status != http.StatusNotFound {
		t.Errorf("procedure with a trailing slash: HTTP %d, want 404", status)
	}
	for range 3 * refusalAuditBurst {
		tc.callRaw(viewer, segmeshv1connect.OperatorServiceCreateTokenProcedure, strings.NewReader("{}"))
	}
	grown := len(tc.audit(nil)) - before
	if grown < 1 || grown > refusalAuditBurst+2 {
		t.Errorf("%d audit records after %d refused calls, want between 1 and the budget %d", grown, 3*refusalAuditBurst, refusalAuditBurst)
	}
}

// TestReenrollmentKeepsLabels: an enrolled node that enrolls again (proof of
// possession) keeps the labels an operator gave it and does not use its token
// up again.
func TestReenrollmentKeepsLabels(t *testing.T) {
	tc := startController(t, t.TempDir())
	tok := tc.createToken(map[string]string{"role": "web"}, false)
	a := tc.enroll(tok, "web-1")
	if _, err := tc.op().LabelNode(bg, connect.NewRequest(&segmeshv1.LabelNodeRequest{Name: "web-1", Set: map[string]string{"quarantine": "yes"}, Remove: []string{"role"}})); err != nil {
		t.Fatal(err)
	}
	resp, err := tc.tryEnroll(tok, "web-1", a.id, "")
	if err != nil {
		t.Fatalf("re-enrollment with proof of possession: %v", err)
	}
	if len(resp.Labels) != 1 || resp.Labels["quarantine"] != "yes" {
		t.Errorf("re-enrollment returned labels %v, want the operator's {quarantine=yes}", resp.Labels)
	}
	if n, _ := tc.node("web-1"); len(n.Labels) != 1 || n.Labels["quarantine"] != "yes" {
		t.Errorf("re-enrollment reset the labels to %v", n.Labels)
	}
	if uses := tc.tokenUses(tok); uses != 1 {
		t.Errorf("single-use token used %d times after a retry by its own node", uses)
	}
}

// enrollFrom enrolls with the client bound to the loopback address src, which
// the controller sees as the source.
func (tc *testController) enrollFrom(src, token, name string) error {
	tc.t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	tr := &http.Transport{DialContext: d.DialContext, ForceAttemptHTTP2: true,
		TLSClientConfig: &tls.Config{RootCAs: tc.pool, ServerName: pki.ServerName, MinVersion: tls.VersionTLS12}}
	defer tr.CloseIdleConnections()
	id := newIdentity(tc.t)
	_, err := segmeshv1connect.NewEnrollServiceClient(&http.Client{Transport: tr}, tc.url).Enroll(context.Background(), connect.NewRequest(&segmeshv1.EnrollRequest{
		Token: token, Name: name, PublicKey: id.publicKey, CsrDer: id.csr,
	}))
	return err
}

// TestTokenHolderNotThrottledByGuessers: wrong secrets for a token from many
// sources use up that token's refusal budget, which then slows further guesses,
// but never refuses the right secret.
func TestTokenHolderNotThrottledByGuessers(t *testing.T) {
	tc := startController(t, t.TempDir())
	tc.c.enrollLimits.burst = refusalBurst
	good := tc.createToken(nil, true)
	tok, _ := jointoken.Decode(good)
	wrong := tok
	wrong.Secret[0] ^= 1
	var last error
	for i := range 3 * refusalBurst {
		last = tc.enrollFrom("127.0.1."+strconv.Itoa(i+1), wrong.String(), "x-1")
	}
	if connect.CodeOf(last) != connect.CodeResourceExhausted {
		t.Errorf("guess %d from a fresh source: %v, want resource_exhausted", 3*refusalBurst, last)
	}
	if err := tc.enrollFrom("127.0.2.1", good, "x-1"); err != nil {
		t.Errorf("the token's holder was refused: %v", err)
	}
}

// TestSourceKeysAndConnectionLimit: IPv6 sources are grouped per /64, and a
// source over its connection limit gets its next connection closed at once.
func TestSourceKeysAndConnectionLimit(t *testing.T) {
	for _, tt := range []struct{ a, b string }{
		{"2001:db8:1:2:aaaa::1", "2001:db8:1:2:bbbb::2"},
		{"::ffff:192.0.2.7", "192.0.2.7"},
	} {
		if ka, kb := sourceKey(netip.MustParseAddr(tt.a)), sourceKey(netip.MustParseAddr(tt.b)); ka != kb {
			t.Errorf("sourceKey(%s) = %s, sourceKey(%s) = %s; want one key", tt.a, ka, tt.b, kb)
		}
	}
	if sourceKey(netip.MustParseAddr("2001:db8:1:2::1")) == sourceKey(netip.MustParseAddr("2001:db8:1:3::1")) {
		t.Error("two /64s share a key")
	}

	ln := &fakeListener{conns: make(chan net.Conn, 8)}
	l := newSourceLimitListener(ln, 2)
	from := func(addr string) net.Conn {
		c, peer := net.Pipe()
		t.Cleanup(func() { c.Close(); peer.Close() })
		return addrConn{Conn: c, remote: netip.MustParseAddrPort(addr)}
	}
	accepted := func() net.Conn {
		c, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	ln.conns <- from("192.0.2.1:1000")
	ln.conns <- from("192.0.2.1:1001")
	first, _ := accepted(), accepted()
	over := from("192.0.2.1:1002")
	ln.conns <- over
	ln.conns <- from("192.0.2.2:1000") // another source is accepted
	if c := accepted(); c.RemoteAddr().String() != "192.0.2.2:1000" {
		t.Fatalf("accepted %s, want the other source (the third connection of 192.0.2.1 must be closed)", c.RemoteAddr())
	}
	if _, err := over.Write([]byte("x")); err == nil {
		t.Error("the connection over the limit was not closed")
	}
	first.Close() // frees a slot
	ln.conns <- from("192.0.2.1:1003")
	if c := accepted(); c.RemoteAddr().String() != "192.0.2.1:1003" {
		t.Fatalf("accepted %s after a slot was freed", c.RemoteAddr())
	}
	ln.conns <- from("127.0.0.1:1000")
	ln.conns <- from("127.0.0.1:1001")
	ln.conns <- from("127.0.0.1:1002")
	for range 3 {
		if c := accepted(); !strings.HasPrefix(c.RemoteAddr().String(), "127.0.0.1:") {
			t.Fatalf("loopback connection not accepted: %s", c.RemoteAddr())
		}
	}
}

type fakeListener struct{ conns chan net.Conn }

func (f *fakeListener) Accept() (net.Conn, error) { return <-f.conns, nil }
func (f *fakeListener) Close() error              { return nil }
func (f *fakeListener) Addr() net.Addr            { return &net.TCPAddr{} }

type addrConn struct {
	net.Conn
	remote netip.AddrPort
}

func (c addrConn) RemoteAddr() net.Addr { return net.TCPAddrFromAddrPort(c.remote) }

// TestPolicyNamedNodeNeedsBoundToken: a name that the policy in force lists in a
// segment is enrolled only with a token bound to it; a token bound to a name
// enrolls nothing else.
func TestPolicyNamedNodeNeedsBoundToken(t *testing.T) {
	tc := startController(t, t.TempDir())
	apply(t, tc, `version: 1
segments:
  - name: ops
    nodes: [ops-1]
  - name: web
    selectors: [{role: web}]
rules:
  - name: ops-admin
    from: [ops]
    to: [web]
    ports: [tcp/22]
`)
	guest := tc.createToken(map[string]string{"role": "guest"}, true)
	_, err := tc.tryEnroll(guest, "ops-1", newIdentity(t), "")
	if ce := wantCode(t, err, connect.CodePermissionDenied); !strings.Contains(ce.Message(), `segment "ops"`) || !strings.Contains(ce.Message(), "--name ops-1") {
		t.Errorf("message %q", ce.Message())
	}
	resp, err := tc.op().CreateToken(bg, connect.NewRequest(&segmeshv1.CreateTokenRequest{Name: "ops-1"}))
	if err != nil {
		t.Fatal(err)
	}
	bound := resp.Msg.Token
	_, err = tc.tryEnroll(bound, "web-9", newIdentity(t), "")
	if ce := wantCode(t, err, connect.CodePermissionDenied); !strings.Contains(ce.Message(), `bound to node name "ops-1"`) {
		t.Errorf("message %q", ce.Message())
	}
	got, err := tc.tryEnroll(bound, "", newIdentity(t), "")
	if err != nil || got.NodeName != "ops-1" {
		t.Fatalf("enrollment with the bound token and no name: %v %v", got, err)
	}
	if toks := tc.listTokens(); !slices.ContainsFunc(toks, func(ti *segmeshv1.TokenInfo) bool { return ti.Name == "ops-1" }) {
		t.Errorf("token list does not show the bound name: %v", toks)
	}
	_, err = tc.op().CreateToken(bg, connect.NewRequest(&segmeshv1.CreateTokenRequest{Name: "Bad Name"}))
	wantCode(t, err, connect.CodeInvalidArgument)
}

// TestEnrollRefusesCompressedBodies: enrollment is unauthenticated, so it takes
// no compressed request (a gzip bomb costs CPU before any check).
func TestEnrollRefusesCompressedBodies(t *testing.T) {
	tc := startController(t, t.TempDir())
	req, _ := http.NewRequest(http.MethodPost, tc.url+segmeshv1connect.EnrollServiceEnrollProcedure, strings.NewReader("\x1f\x8b"))
	req.Header.Set("Content-Type", "application/proto")
	req.Header.Set("Content-Encoding", "gzip")
	resp, err := tc.httpClient(nil).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusTooManyRequests {
		t.Errorf("gzip enrollment: HTTP %d, want a refusal of the encoding", resp.StatusCode)
	}
}

func TestSlotLimiter(t *testing.T) {
	l := newSlotLimiter()
	src := netip.MustParseAddr("192.0.2.1")
	var release []func()
	for range enrollSlotsPerSource {
		r, ok := l.acquire(src)
		if !ok {
			t.Fatal("slot refused below the per-source limit")
		}
		release = append(release, r)
	}
	if _, ok := l.acquire(src); ok {
		t.Error("slot granted above the per-source limit")
	}
	release[0]()
	release[0]() // twice is harmless
	if r, ok := l.acquire(src); !ok {
		t.Error("slot not given back")
	} else {
		r()
	}
	lo := netip.MustParseAddr("127.0.0.1")
	n := 0
	for {
		if _, ok := l.acquire(lo); !ok {
			break
		}
		n++
	}
	if want := enrollSlotsTotal - (enrollSlotsPerSource - 1); n != want {
		t.Errorf("loopback got %d slots, want the rest of the total, %d", n, want)
	}
}

func TestValidateEndpoint(t *testing.T) {
	overlay := DefaultOverlayPrefixes()
	for _, tt := range []struct {
		ep string
		ok bool
	}{
		{"192.0.2.1:51820", true},
		{"[2001:db8::1]:51820", true},
		{"[::ffff:192.0.2.1]:51820", true},
		{"192.0.2.1:0", false},
		{"0.0.0.0:51820", false},
		{"127.0.0.1:53", false},
		{"[::1]:22", false},
		{"224.0.0.1:5353", false},
		{"255.255.255.255:9", false},
		{"169.254.1.1:51820", false},
		{"[fe80::1]:51820", false},
		{"100.64.0.2:51820", false},
		{"[fd5e:6d65:7368::2]:51820", false},
		{"192.0.2.1", false},
	} {
		if err := validateEndpoint(tt.ep, overlay); (err == nil) != tt.ok {
			t.Errorf("validateEndpoint(%s) = %v, want ok %v", tt.ep, err, tt.ok)
		}
	}
}

// TestEndpointChurnThrottled: a node that changes its endpoint on every stream is
// refused once it used up its budget, so it cannot make every peer recompute.
func TestEndpointChurnThrottled(t *testing.T) {
	tc := startController(t, t.TempDir())
	a := tc.enroll(tc.createToken(nil, false), "a-1")
	var last error
	for i := range endpointChangeBurst + 3 {
		stream, err := tc.agent(a).Sync(bg, connect.NewRequest(&segmeshv1.SyncRequest{Endpoint: "192.0.2.1:" + strconv.Itoa(40000+i)}))
		if err == nil {
			stream.Receive()
			err = stream.Err()
			stream.Close()
		}
		last = err
	}
	if connect.CodeOf(last) != connect.CodeResourceExhausted {
		t.Errorf("stream %d with a new endpoint: %v, want resource_exhausted", endpointChangeBurst+3, last)
	}
}

// TestReportCannotInjectIntoStatus: what an agent reports reaches operators
// bounded and without control characters.
func TestReportCannotInjectIntoStatus(t *testing.T) {
	tc := startController(t, t.TempDir())
	a := tc.enroll(tc.createToken(nil, false), "a-1")
	evil := "ok\n\x1b[2K\rdb-1    revoked    fake row" + strings.Repeat("x", 5000)
	_, err := tc.agent(a).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{
		Error: evil, Dataplane: "\x1b[31mkernel", AlivePeers: []string{"b-1", "x\ny", strings.Repeat("p", 300)},
	}))
	if err != nil {
		t.Fatal(err)
	}
	n := tc.status().Nodes[0]
	if strings.ContainsAny(n.Error, "\n\r\x1b") || len(n.Error) > maxReportedError+len("…") {
		t.Errorf("reported error shown as %q", n.Error)
	}
	if n.Dataplane != "" || len(n.AlivePeers) != 1 || n.AlivePeers[0] != "b-1" {
		t.Errorf("dataplane %q alive peers %q", n.Dataplane, n.AlivePeers)
	}
}

// TestEnrollSlotTakenBeforeBody: the enrollment slot is taken before the body is
// read, so clients trickling bodies cannot make the controller buffer them: with
// every slot held by a slow body, the next enrollment is refused at once.
func TestEnrollSlotTakenBeforeBody(t *testing.T) {
	tc := startController(t, t.TempDir())
	tc.c.enrollSlots.maxTotal = 1
	slow := &slowBody{release: make(chan struct{})}
	first := make(chan int, 1)
	post := func(body io.Reader, done chan<- int) {
		req, _ := http.NewRequest(http.MethodPost, tc.url+segmeshv1connect.EnrollServiceEnrollProcedure, body)
		req.Header.Set("Content-Type", "application/proto")
		resp, err := tc.httpClient(nil).Do(req)
		if err != nil {
			done <- -1
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}
	go post(slow, first)
	eventually(t, "the slow enrollment holds the slot", func() bool {
		tc.c.enrollSlots.mu.Lock()
		defer tc.c.enrollSlots.mu.Unlock()
		return tc.c.enrollSlots.total == 1
	})
	second := make(chan int, 1)
	go post(strings.NewReader(""), second)
	select {
	case code := <-second:
		if code != http.StatusTooManyRequests {
			t.Errorf("enrollment while every slot is held: HTTP %d, want 429", code)
		}
	case <-time.After(5 * time.Second):
		t.Error("enrollment while every slot is held was not refused at once")
	}
	slow.Close()
	<-first
}
