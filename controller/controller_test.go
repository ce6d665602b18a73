package controller

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/jointoken"
	"segmesh/api/segmeshv1"
	"segmesh/controller/store"
)

var bg = context.Background()

func TestFirstStartFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	tc := startController(t, dir)
	fi, err := os.Stat(dir)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("data dir: %v mode %v, want 0700", err, fi.Mode().Perm())
	}
	for name, perm := range map[string]os.FileMode{"ca.crt": 0o644, "ca.key": 0o600, OperatorFile: 0o600, StoreFile: 0o600} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != perm {
			t.Errorf("%s mode %v, want %v", name, fi.Mode().Perm(), perm)
		}
	}
	if want := "https://" + tc.c.Addr().String(); tc.cred.Controller != want {
		t.Errorf("operator.json controller = %q, want %q", tc.cred.Controller, want)
	}
	if tc.cred.Token == "" {
		t.Error("operator.json has no token")
	}
}

func TestEnrollGoodToken(t *testing.T) {
	tc := startController(t, t.TempDir())
	token := tc.createToken(map[string]string{"role": "db", "env": "prod"}, false)
	a := tc.enroll(token, "db-1")
	r := a.resp
	if r.NodeName != "db-1" {
		t.Errorf("name = %q", r.NodeName)
	}
	if !slices.Equal(r.Addresses, []string{"100.64.0.2/32", "fd5e:6d65:7368::2/128"}) {
		t.Errorf("addresses = %v", r.Addresses)
	}
	if r.Labels["role"] != "db" || r.Labels["env"] != "prod" || len(r.Labels) != 2 {
		t.Errorf("labels = %v", r.Labels)
	}
	if !slices.Equal(r.OverlayPrefixes, []string{"100.64.0.0/10", "fd5e:6d65:7368::/48"}) {
		t.Errorf("overlay prefixes = %v", r.OverlayPrefixes)
	}
	// CA pinning: the token's fingerprint is the SHA-256 of the returned CA DER,
	// which is the CA in operator.json, and the node certificate chains to it.
	tok, err := jointoken.Decode(token)
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(r.CaDer) != tok.CAFingerprint || !tok.MatchesCA(r.CaDer) {
		t.Error("token CA fingerprint does not match the returned CA")
	}
	ca, err := x509.ParseCertificate(r.CaDer)
	if err != nil {
		t.Fatal(err)
	}
	if !tc.pool.Equal(func() *x509.CertPool { p := x509.NewCertPool(); p.AddCert(ca); return p }()) {
		t.Error("returned CA differs from operator.json's CA")
	}
	cert, err := x509.ParseCertificate(r.CertificateDer)
	if err != nil {
		t.Fatal(err)
	}
	if cert.Subject.CommonName != "db-1" || !slices.Contains(cert.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		t.Errorf("node certificate CN %q EKU %v", cert.Subject.CommonName, cert.ExtKeyUsage)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: tc.pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("node certificate does not verify: %v", err)
	}

	nodes, err := tc.op().ListNodes(bg, connect.NewRequest(&segmeshv1.ListNodesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes.Msg.Nodes) != 1 || nodes.Msg.Nodes[0].Name != "db-1" || nodes.Msg.Nodes[0].Endpoint != "192.0.2.1:51820" {
		t.Fatalf("ListNodes = %v", nodes.Msg.Nodes)
	}
	// The enrollment and the token use are recorded together.
	err = tc.c.store.View(func(tx store.Tx) error {
		tk, _, err := tx.Token(tok.IDString())
		if tk.UsedBy != "db-1" || tk.Uses != 1 {
			t.Errorf("token record: used by %q, uses %d", tk.UsedBy, tk.Uses)
		}
		audit, _ := tx.Audit()
		var actions []string
		for _, e := range audit {
			actions = append(actions, e.Action)
		}
		if !slices.Equal(actions, []string{"operator.create", "token.create", "node.enroll"}) {
			t.Errorf("audit actions = %v", actions)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestEnrollRefused(t *testing.T) {
	tc := startController(t, t.TempDir())
	used := tc.createToken(map[string]string{"role": "db"}, false)
	first := tc.enroll(used, "db-1")
	expiring := tc.createToken(nil, false)
	good := tc.createToken(nil, true)

	goodTok, _ := jointoken.Decode(good)
	wrongSecret := goodTok
	wrongSecret.Secret[0] ^= 1
	unknown := goodTok
	unknown.ID[0] ^= 1
	foreign := goodTok
	foreign.CAFingerprint[0] ^= 1

	otherKey := newIdentity(t)
	badCSR := newIdentity(t)
	badCSR.csr = badCSR.csr[:len(badCSR.csr)-4]
	shortKey := newIdentity(t)
	shortKey.publicKey = shortKey.publicKey[:31]
	sameKey := newIdentity(t)
	sameKey.publicKey = first.id.publicKey

	tests := []struct {
		name     string
		token    string
		node     string
		id       agentIdentity
		endpoint string
		advance  time.Duration
		code     connect.Code
		msg      string
	}{
		{"malformed token", "hello", "x-1", newIdentity(t), "", 0, connect.CodeUnauthenticated, "join token is not valid: malformed join token"},
		{"wrong secret", wrongSecret.String(), "x-1", newIdentity(t), "", 0, connect.CodeUnauthenticated, "join token is not valid (unknown token or wrong secret)"},
		{"unknown token", unknown.String(), "x-1", newIdentity(t), "", 0, connect.CodeUnauthenticated, "join token is not valid (unknown token or wrong secret)"},
		{"other controller's token", foreign.String(), "x-1", newIdentity(t), "", 0, connect.CodePermissionDenied, "different controller"},
		{"reused single-use token", used, "db-2", newIdentity(t), "", 0, connect.CodePermissionDenied,
			`join token was already used by node "db-1" at ` + tc.clock.Now().UTC().Format(time.RFC3339) + " (it is single-use; create a new one with `segmesh token create`)"},
		{"name taken by another host", good, "db-1", otherKey, "", 0, connect.CodePermissionDenied, `node "db-1" is already enrolled; enrolling it again needs its current identity`},
		{"key taken by another node", good, "db-9", sameKey, "", 0, connect.CodeAlreadyExists, `WireGuard public key already belongs to node "db-1"`},
		{"bad name", good, "DB_1", newIdentity(t), "", 0, connect.CodeInvalidArgument, `node name "DB_1" is not valid`},
		{"bad key", good, "x-1", shortKey, "", 0, connect.CodeInvalidArgument, "32 bytes"},
		{"bad csr", good, "x-1", badCSR, "", 0, connect.CodeInvalidArgument, "certificate signing request"},
		{"bad endpoint", good, "x-1", newIdentity(t), "192.0.2.1", 0, connect.CodeInvalidArgument, "not ip:port"},
		// Last: moves the clock past every token's expiry.
		{"expired token", expiring, "x-1", newIdentity(t), "", 25 * time.Hour, connect.CodePermissionDenied, "join token expired at "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tc.clock.Advance(tt.advance)
			_, err := tc.tryEnroll(tt.token, tt.node, tt.id, tt.endpoint)
			ce := wantCode(t, err, tt.code)
			if !strings.Contains(ce.Message(), tt.msg) {
				t.Errorf("message %q does not contain %q", ce.Message(), tt.msg)
			}
		})
	}
	// Nothing but db-1 was enrolled, and the refused attempts did not use tokens.
	nodes, err := tc.op().ListNodes(bg, connect.NewRequest(&segmeshv1.ListNodesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes.Msg.Nodes) != 1 {
		t.Errorf("nodes after refusals: %v", nodes.Msg.Nodes)
	}
}

func TestReusableTokenAndIdempotentReenroll(t *testing.T) {
	tc := startController(t, t.TempDir())
	reusable := tc.createToken(map[string]string{"role": "web"}, true)
	a := tc.enroll(reusable, "web-1")
	b := tc.enroll(reusable, "web-2")
	if slices.Equal(a.resp.Addresses, b.resp.Addresses) {
		t.Fatalf("two nodes got the same addresses %v", a.resp.Addresses)
	}

	// Same name and key again (an agent that lost the response): same addresses,
	// a fresh certificate, even with a used single-use token.
	single := tc.createToken(map[string]string{"role": "db"}, false)
	d := tc.enroll(single, "db-1")
	again, err := tc.tryEnroll(single, "db-1", d.id, "")
	if err != nil {
		t.Fatalf("re-enroll with the same key: %v", err)
	}
	if !slices.Equal(again.Addresses, d.resp.Addresses) {
		t.Errorf("re-enroll addresses %v, want %v", again.Addresses, d.resp.Addresses)
	}
	if slices.Equal(again.CertificateDer, d.resp.CertificateDer) {
		t.Error("re-enroll did not issue a new certificate")
	}
	nodes, _ := tc.op().ListNodes(bg, connect.NewRequest(&segmeshv1.ListNodesRequest{}))
	if len(nodes.Msg.Nodes) != 3 {
		t.Errorf("nodes = %d, want 3", len(nodes.Msg.Nodes))
	}
	// The endpoint from the first enrollment survives a re-enroll without one.
	for _, n := range nodes.Msg.Nodes {
		if n.Name == "db-1" && n.Endpoint != "192.0.2.1:51820" {
			t.Errorf("db-1 endpoint = %q", n.Endpoint)
		}
	}
}

func TestHostnameName(t *testing.T) {
	tc := startController(t, t.TempDir())
	token := tc.createToken(nil, true)
	id := newIdentity(t)
	resp, err := tc.enrollClient().Enroll(bg, connect.NewRequest(&segmeshv1.EnrollRequest{
		Token: token, Hostname: "Web-7.Example", PublicKey: id.publicKey, CsrDer: id.csr,
	}))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Msg.NodeName != "web-7.example" {
		t.Errorf("name = %q, want web-7.example", resp.Msg.NodeName)
	}
	id2 := newIdentity(t)
	_, err = tc.enrollClient().Enroll(bg, connect.NewRequest(&segmeshv1.EnrollRequest{
		Token: token, Hostname: "under_score", PublicKey: id2.publicKey, CsrDer: id2.csr,
	}))
	ce := wantCode(t, err, connect.CodeInvalidArgument)
	if !strings.Contains(ce.Message(), "--name") {
		t.Errorf("message %q does not suggest --name", ce.Message())
	}
}

func TestIPAMUniqueAndPersistent(t *testing.T) {
	dir := t.TempDir()
	tc := startController(t, dir)
	token := tc.createToken(nil, true)
	seen := map[string]string{}
	record := func(a *enrolledAgent) {
		for _, addr := range a.resp.Addresses {
			if other, dup := seen[addr]; dup {
				t.Fatalf("address %s given to %s and %s", addr, other, a.name)
			}
			p := netip.MustParsePrefix(addr)
			if p.Addr() == netip.MustParseAddr("100.64.0.0") || p.Addr() == netip.MustParseAddr("100.64.0.1") {
				t.Fatalf("reserved address %s allocated", addr)
			}
			seen[addr] = a.name
		}
	}
	for _, n := range []string{"n-1", "n-2", "n-3", "n-4"} {
		record(tc.enroll(token, n))
	}
	caBefore := tc.cred.CAPEM
	opBefore := tc.cred.Token
	tc.stop()

	tc2 := startController(t, dir)
	if tc2.cred.CAPEM != caBefore || tc2.cred.Token != opBefore {
		t.Error("restart changed the CA or the operator token")
	}
	// The token, nodes and IPAM state survived.
	record(tc2.enroll(token, "n-5"))
	nodes, err := tc2.op().ListNodes(bg, connect.NewRequest(&segmeshv1.ListNodesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, n := range nodes.Msg.Nodes {
		names = append(names, n.Name)
	}
	if !slices.Equal(names, []string{"n-1", "n-2", "n-3", "n-4", "n-5"}) {
		t.Errorf("nodes after restart = %v", names)
	}
	if len(seen) != 10 {
		t.Errorf("%d distinct addresses, want 10", len(seen))
	}
}

func TestOperatorAuth(t *testing.T) {
	tc := startController(t, t.TempDir())
	for _, token := range []string{"", "wrong", tc.cred.Token + "x"} {
		op := tc.operator(token)
		calls := map[string]func() error{
			"Status": func() error { _, err := op.Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{})); return err },
			"ListNodes": func() error {
				_, err := op.ListNodes(bg, connect.NewRequest(&segmeshv1.ListNodesRequest{}))
				return err
			},
			"CreateToken": func() error {
				_, err := op.CreateToken(bg, connect.NewRequest(&segmeshv1.CreateTokenRequest{}))
				return err
			},
			"ApplyPolicy": func() error {
				_, err := op.ApplyPolicy(bg, connect.NewRequest(&segmeshv1.ApplyPolicyRequest{Content: []byte("version: 1\n")}))
				return err
			},
			"GetPolicy": func() error {
				_, err := op.GetPolicy(bg, connect.NewRequest(&segmeshv1.GetPolicyRequest{}))
				return err
			},
			"ListPolicyRevisions": func() error {
				_, err := op.ListPolicyRevisions(bg, connect.NewRequest(&segmeshv1.ListPolicyRevisionsRequest{}))
				return err
			},
			"RollbackPolicy": func() error {
				_, err := op.RollbackPolicy(bg, connect.NewRequest(&segmeshv1.RollbackPolicyRequest{Revision: 1}))
				return err
			},
			"GetNetmap": func() error {
				_, err := op.GetNetmap(bg, connect.NewRequest(&segmeshv1.GetNetmapRequest{Node: "a-1"}))
				return err
			},
		}
		for name, call := range calls {
			t.Run(name+"/"+token, func(t *testing.T) { wantCode(t, call(), connect.CodeUnauthenticated) })
		}
	}
	// Nothing was applied by the refused calls.
	_, err := tc.op().GetPolicy(bg, connect.NewRequest(&segmeshv1.GetPolicyRequest{}))
	wantCode(t, err, connect.CodeNotFound)
}

func TestAgentAuth(t *testing.T) {
	tc := startController(t, t.TempDir())
	a := tc.enroll(tc.createToken(nil, false), "a-1")

	// No client certificate.
	noCert := &enrolledAgent{name: "none"}
	_, err := tc.agent(noCert).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{}))
	wantCode(t, err, connect.CodeUnauthenticated)

	// A CA-signed certificate for a name that is not enrolled.
	ghost := newIdentity(t)
	csr, _ := x509.ParseCertificateRequest(ghost.csr)
	der, err := tc.c.ca.SignClient(csr, "ghost", time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	g := &enrolledAgent{name: "ghost", cert: a.cert}
	g.cert.Certificate = [][]byte{der}
	g.cert.PrivateKey = ghost.key
	_, err = tc.agent(g).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{}))
	ce := wantCode(t, err, connect.CodePermissionDenied)
	if !strings.Contains(ce.Message(), `"ghost" is not enrolled`) {
		t.Errorf("message %q", ce.Message())
	}
	stream, err := tc.agent(g).Sync(bg, connect.NewRequest(&segmeshv1.SyncRequest{}))
	if err == nil {
		if stream.Receive() {
			t.Fatal("unenrolled node received a netmap")
		}
		err = stream.Err()
	}
	wantCode(t, err, connect.CodePermissionDenied)

	// The enrolled node is accepted.
	if _, err := tc.agent(a).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{})); err != nil {
		t.Fatalf("Report with a valid certificate: %v", err)
	}

	// A CA-signed certificate with the node's name but another key (an old
	// certificate of a renewed node, or one obtained by a re-enrollment attempt) is
	// refused although it verifies at the TLS layer.
	other := newIdentity(t)
	csr, _ = x509.ParseCertificateRequest(other.csr)
	der, err = tc.c.ca.SignClient(csr, "a-1", time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	stale := &enrolledAgent{name: "a-1", cert: a.cert}
	stale.cert.Certificate = [][]byte{der}
	stale.cert.PrivateKey = other.key
	_, err = tc.agent(stale).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{}))
	if ce := wantCode(t, err, connect.CodeUnauthenticated); !strings.Contains(ce.Message(), "no longer node \"a-1\"'s") {
		t.Errorf("stale certificate: message %q", ce.Message())
	}

	// Past the certificate's expiry (the controller's clock), every call is refused.
	tc.clock.Advance(DefaultNodeCertTTL + time.Minute)
	_, err = tc.agent(a).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{}))
	if ce := wantCode(t, err, connect.CodeUnauthenticated); !strings.Contains(ce.Message(), "expired at") {
		t.Errorf("expired certificate: message %q", ce.Message())
	}
}

const policyWebDB = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: db
    selectors: [{role: db}]
  - name: ops
    selectors: [{role: ops}]
rules:
  - name: web-to-db
    from: [web]
    to: [db]
    ports: [tcp/5432]
`

func apply(t *testing.T, tc *testController, content string) *segmeshv1.ApplyPolicyResponse {
	t.Helper()
	resp, err := tc.op().ApplyPolicy(bg, connect.NewRequest(&segmeshv1.ApplyPolicyRequest{Filename: "policy.yaml", Content: []byte(content)}))
	if err != nil {
		t.Fatalf("ApplyPolicy: %v", err)
	}
	return resp.Msg
}

func TestApplyPolicy(t *testing.T) {
	tc := startController(t, t.TempDir())
	_, err := tc.op().GetPolicy(bg, connect.NewRequest(&segmeshv1.GetPolicyRequest{}))
	wantCode(t, err, connect.CodeNotFound)

	if r := apply(t, tc, policyWebDB); r.Revision != 1 || r.Unchanged {
		t.Fatalf("first apply = %+v", r)
	}
	if r := apply(t, tc, policyWebDB); r.Revision != 1 || !r.Unchanged {
		t.Fatalf("identical apply = %+v, want revision 1 unchanged", r)
	}

	bad := strings.Replace(policyWebDB, "to: [db]", "to: [dbx]", 1) + "  - name: broken\n    from: [web]\n    to: [db]\n    ports: [tcp/99999]\n"
	_, err = tc.op().ApplyPolicy(bg, connect.NewRequest(&segmeshv1.ApplyPolicyRequest{Filename: "bad.yaml", Content: []byte(bad)}))
	ce := wantCode(t, err, connect.CodeInvalidArgument)
	lines := strings.Split(ce.Message(), "\n")
	if len(lines) < 2 {
		t.Errorf("want every error, one per line; got %q", ce.Message())
	}
	for _, l := range lines {
		if !strings.HasPrefix(l, "bad.yaml:") || strings.Count(l, ":") < 3 {
			t.Errorf("error line %q lacks bad.yaml:line:col", l)
		}
	}
	if !strings.Contains(ce.Message(), "bad.yaml:12:10:") {
		t.Errorf("message %q does not point at the undefined segment (bad.yaml:12:10)", ce.Message())
	}

	// An external segment may not cover overlay addresses (it would select nodes by
	// address, bypassing labels).
	overlap := "version: 1\nsegments:\n  - name: partners\n    cidrs: [100.64.0.0/16]\n  - name: db\n    selectors: [{role: db}]\n" +
		"rules:\n  - name: partners-ssh\n    from: [partners]\n    to: [db]\n    ports: [tcp/22]\n"
	_, err = tc.op().ApplyPolicy(bg, connect.NewRequest(&segmeshv1.ApplyPolicyRequest{Filename: "overlap.yaml", Content: []byte(overlap)}))
	ce = wantCode(t, err, connect.CodeInvalidArgument)
	if !strings.HasPrefix(ce.Message(), "overlap.yaml:4:13: ") || !strings.Contains(ce.Message(), "overlaps the overlay prefix 100.64.0.0/10") {
		t.Errorf("overlapping external cidr: message %q", ce.Message())
	}

	got, err := tc.op().GetPolicy(bg, connect.NewRequest(&segmeshv1.GetPolicyRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if got.Msg.Revision != 1 || string(got.Msg.Content) != policyWebDB || got.Msg.Filename != "policy.yaml" || got.Msg.AppliedBy != AdminOperator {
		t.Errorf("GetPolicy after a rejected apply = rev %d file %q by %q", got.Msg.Revision, got.Msg.Filename, got.Msg.AppliedBy)
	}
	st, err := tc.op().Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{}))
	if err != nil || st.Msg.PolicyRevision != 1 {
		t.Fatalf("Status revision = %v, %v", st, err)
	}

	if r := apply(t, tc, policyWebDB+"  - name: ops-ssh\n    from: [ops]\n    to: [db]\n    ports: [tcp/22]\n"); r.Revision != 2 {
		t.Fatalf("second apply revision %d, want 2", r.Revision)
	}
	old, err := tc.op().GetPolicy(bg, connect.NewRequest(&segmeshv1.GetPolicyRequest{Revision: 1}))
	if err != nil || string(old.Msg.Content) != policyWebDB {
		t.Fatalf("GetPolicy(1) = %v, %v", old, err)
	}
	_, err = tc.op().GetPolicy(bg, connect.NewRequest(&segmeshv1.GetPolicyRequest{Revision: 7}))
	wantCode(t, err, connect.CodeNotFound)
}

func TestCreateTokenValidation(t *testing.T) {
	tc := startController(t, t.TempDir())
	tests := []struct {
		name   string
		req    *segmeshv1.CreateTokenRequest
		code   connect.Code
		expiry time.Duration
	}{
		{"default ttl", &segmeshv1.CreateTokenRequest{Labels: map[string]string{"role": "db"}}, 0, DefaultTokenTTL},
		{"explicit ttl", &segmeshv1.CreateTokenRequest{TtlSeconds: 600}, 0, 10 * time.Minute},
		{"prefixed key, empty value", &segmeshv1.CreateTokenRequest{Labels: map[string]string{"example.com/tier": ""}}, 0, DefaultTokenTTL},
		{"ttl beyond the CA lifetime", &segmeshv1.CreateTokenRequest{TtlSeconds: 11 * 365 * 24 * 3600}, connect.CodeInvalidArgument, 0},
		{"negative ttl", &segmeshv1.CreateTokenRequest{TtlSeconds: -1}, connect.CodeInvalidArgument, 0},
		{"bad key", &segmeshv1.CreateTokenRequest{Labels: map[string]string{"role!": "db"}}, connect.CodeInvalidArgument, 0},
		{"empty key", &segmeshv1.CreateTokenRequest{Labels: map[string]string{"": "db"}}, connect.CodeInvalidArgument, 0},
		{"bad value", &segmeshv1.CreateTokenRequest{Labels: map[string]string{"role": "d b"}}, connect.CodeInvalidArgument, 0},
		{"long value", &segmeshv1.CreateTokenRequest{Labels: map[string]string{"role": strings.Repeat("a", 64)}}, connect.CodeInvalidArgument, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := tc.op().CreateToken(bg, connect.NewRequest(tt.req))
			if tt.code != 0 {
				wantCode(t, err, tt.code)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tok, err := jointoken.Decode(resp.Msg.Token)
			if err != nil || tok.IDString() != resp.Msg.Id {
				t.Fatalf("token %q id %q: %v", resp.Msg.Token, resp.Msg.Id, err)
			}
			if want := tc.clock.Now().Add(tt.expiry).Unix(); resp.Msg.ExpiresUnix != want {
				t.Errorf("expires %d, want %d", resp.Msg.ExpiresUnix, want)
			}
		})
	}
}

// TestSyncPushesOnlyChangedNetmaps: a stream gets the current netmap at once, a
// new one after an apply that changes the node's netmap, and none after an apply
// that does not.
func TestSyncPushesOnlyChangedNetmaps(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	db := tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	ops := tc.enroll(tc.createToken(map[string]string{"role": "ops"}, false), "ops-1")

	webStream := tc.sync(web, &segmeshv1.SyncRequest{Endpoint: "192.0.2.11:51820", Dataplane: "userspace", Version: "test"})
	opsStream := tc.sync(ops, &segmeshv1.SyncRequest{Endpoint: "192.0.2.13:51820", Dataplane: "kernel"})

	// At once: the default-deny netmap (revision 0, no peers). The endpoint change
	// recomputes netmaps, so wait for the one carrying the new endpoint.
	var nm *segmeshv1.Netmap
	for nm = webStream.next(t); nm.GetSelf().GetEndpoint() != "192.0.2.11:51820"; nm = webStream.next(t) {
	}
	if nm.PolicyRevision != 0 || len(nm.Peers) != 0 || nm.GetSelf().GetName() != "web-1" || nm.Gossip != nil {
		t.Fatalf("initial netmap: rev %d peers %v self %v", nm.PolicyRevision, nm.Peers, nm.Self)
	}
	for nm = opsStream.next(t); nm.GetSelf().GetEndpoint() != "192.0.2.13:51820"; nm = opsStream.next(t) {
	}

	// Revision 1 gives web-1 a peer: pushed to web-1.
	apply(t, tc, policyWebDB)
	nm = webStream.next(t)
	if nm.PolicyRevision != 1 || len(nm.Peers) != 1 || nm.Peers[0].Name != "db-1" || len(nm.GetGossip().GetKey()) != 32 {
		t.Fatalf("after revision 1: rev %d peers %v gossip %v", nm.PolicyRevision, nm.Peers, nm.Gossip)
	}
	if !slices.Equal(nm.Peers[0].AllowedIps, db.resp.Addresses) || string(nm.Peers[0].PublicKey) != string(db.id.publicKey) {
		t.Errorf("peer db-1: allowed IPs %v, want %v", nm.Peers[0].AllowedIps, db.resp.Addresses)
	}
	if len(nm.GetFilter().GetEgress()) != 1 {
		t.Errorf("web-1 filter = %v", nm.Filter)
	}
	// ops-1 is in no rule of revision 1: its netmap did not change.

	// Revision 2 adds ops -> db: web-1's netmap is unchanged and not pushed,
	// ops-1's changes. Revision 3 then changes web-1; the next message web-1 sees
	// must be revision 3, proving revision 2 sent nothing to it.
	apply(t, tc, policyWebDB+"  - name: ops-ssh\n    from: [ops]\n    to: [db]\n    ports: [tcp/22]\n")
	nm = opsStream.next(t)
	if nm.PolicyRevision != 2 || len(nm.Peers) != 1 || nm.Peers[0].Name != "db-1" {
		t.Fatalf("ops-1 after revision 2: rev %d peers %v", nm.PolicyRevision, nm.Peers)
	}
	apply(t, tc, policyWebDB+"  - name: ops-ssh\n    from: [ops]\n    to: [db, web]\n    ports: [tcp/22]\n")
	nm = webStream.next(t)
	if nm.PolicyRevision != 3 || len(nm.Peers) != 2 {
		t.Fatalf("web-1's next netmap: rev %d peers %v; want revision 3 with db-1 and ops-1", nm.PolicyRevision, nm.Peers)
	}
	webStream.none(t)

	// Revision 3 changed ops-1 as well (it now reaches web-1).
	nm = opsStream.next(t)
	if nm.PolicyRevision != 3 || len(nm.Peers) != 2 {
		t.Fatalf("ops-1 after revision 3: rev %d peers %v", nm.PolicyRevision, nm.Peers)
	}
}

func TestStatusAfterReport(t *testing.T) {
	tc := startController(t, t.TempDir())
	a := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	b := tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	apply(t, tc, policyWebDB)

	wantRev := uint64(1)
	status := func() map[string]*segmeshv1.NodeStatus {
		t.Helper()
		resp, err := tc.op().Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		if resp.Msg.PolicyRevision != wantRev {
			t.Fatalf("policy revision %d, want %d", resp.Msg.PolicyRevision, wantRev)
		}
		out := map[string]*segmeshv1.NodeStatus{}
		var names []string
		for _, n := range resp.Msg.Nodes {
			out[n.Name] = n
			names = append(names, n.Name)
		}
		if !slices.Equal(names, []string{"db-1", "web-1"}) {
			t.Fatalf("status nodes %v, want sorted [db-1 web-1]", names)
		}
		return out
	}
	st := status()
	if st["web-1"].Online || st["web-1"].AppliedRevision != 0 || st["web-1"].DesiredRevision != 1 {
		t.Fatalf("before sync: %+v", st["web-1"])
	}

	stream := tc.sync(a, &segmeshv1.SyncRequest{Dataplane: "userspace"})
	nm := stream.next(t)
	eventually(t, "web-1 online", func() bool { return status()["web-1"].Online })
	_, err := tc.agent(a).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{
		AppliedRevision: nm.PolicyRevision, AppliedHash: nm.Hash, Dataplane: "userspace", AlivePeers: []string{"db-1"},
	}))
	if err != nil {
		t.Fatal(err)
	}
	st = status()
	w := st["web-1"]
	if !w.Online || w.AppliedRevision != 1 || w.DesiredRevision != 1 || w.AppliedHash != w.DesiredHash || w.Dataplane != "userspace" ||
		!slices.Equal(w.AlivePeers, []string{"db-1"}) || w.LastSeenUnix == 0 || w.PublicKey == "" || len(w.Labels) != 1 {
		t.Errorf("web-1 status after report: %+v", w)
	}
	if st["db-1"].Online || st["db-1"].AppliedRevision != 0 {
		t.Errorf("db-1 status: %+v", st["db-1"])
	}

	// Revision 2 does not change web-1's netmap: nothing is pushed, and web-1,
	// which enforces exactly what revision 2 wants for it, counts as applied.
	apply(t, tc, policyWebDB+"  - name: ops-ssh\n    from: [ops]\n    to: [db]\n    ports: [tcp/22]\n")
	wantRev = 2
	if w := status()["web-1"]; w.DesiredRevision != 2 || w.AppliedRevision != 2 || w.AppliedHash != w.DesiredHash {
		t.Errorf("web-1 after a revision that does not concern it: desired %d applied %d", w.DesiredRevision, w.AppliedRevision)
	}
	// Revision 3 changes web-1's netmap: applied stays at what it reported.
	apply(t, tc, policyWebDB+"  - name: ops-ssh\n    from: [ops]\n    to: [db, web]\n    ports: [tcp/22]\n")
	wantRev = 3
	if w := status()["web-1"]; w.DesiredRevision != 3 || w.AppliedRevision != 1 || w.AppliedHash == w.DesiredHash {
		t.Errorf("web-1 after a revision that changes it: desired %d applied %d", w.DesiredRevision, w.AppliedRevision)
	}
	nm = stream.next(t)
	if _, err := tc.agent(a).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{AppliedRevision: nm.PolicyRevision, AppliedHash: nm.Hash})); err != nil {
		t.Fatal(err)
	}
	if w := status()["web-1"]; w.AppliedRevision != 3 || w.AppliedHash != w.DesiredHash {
		t.Errorf("web-1 after reporting revision 3: applied %d", w.AppliedRevision)
	}

	// A second stream (reconnect) keeps the node online when the first ends.
	second := tc.sync(a, &segmeshv1.SyncRequest{Dataplane: "userspace"})
	second.next(t)
	stream.cancel()
	eventually(t, "first stream closed", func() bool {
		tc.c.live.mu.Lock()
		defer tc.c.live.mu.Unlock()
		return len(tc.c.live.nodes["web-1"].conns) == 1
	})
	if !status()["web-1"].Online {
		t.Error("node offline while its second stream is open")
	}
	second.cancel()
	eventually(t, "web-1 offline", func() bool { return !status()["web-1"].Online })
	_ = b
}

// TestShutdownEndsStreams: a stream open at shutdown ends with Unavailable.
func TestShutdownEndsStreams(t *testing.T) {
	tc := startController(t, t.TempDir())
	a := tc.enroll(tc.createToken(nil, false), "a-1")
	s := tc.sync(a, &segmeshv1.SyncRequest{})
	s.next(t)
	tc.stop()
	select {
	case err := <-s.err:
		wantCode(t, err, connect.CodeUnavailable)
	case <-time.After(10 * time.Second):
		t.Fatal("stream did not end at shutdown")
	}
}

// A second controller on the same data directory fails on the store lock before it
// writes anything, so the running controller's operator.json stays valid.
func TestSecondControllerSameDataDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	startController(t, dir)
	before, err := os.ReadFile(filepath.Join(dir, OperatorFile))
	if err != nil {
		t.Fatal(err)
	}
	_, err = New(Options{DataDir: dir, Listen: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler)})
	if !errors.Is(err, store.ErrLocked) || !strings.Contains(err.Error(), "another segmesh-controller") {
		t.Fatalf("second New error = %v, want store.ErrLocked naming another controller", err)
	}
	after, err := os.ReadFile(filepath.Join(dir, OperatorFile))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Errorf("operator.json changed by the refused second start:\n%s\n->\n%s", before, after)
	}
}

func TestNetmapPeerCarriesIdentityKey(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	db := tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	stream := tc.sync(web, &segmeshv1.SyncRequest{Dataplane: "userspace"})
	apply(t, tc, policyWebDB)
	var nm *segmeshv1.Netmap
	for nm = stream.next(t); len(nm.GetPeers()) == 0; nm = stream.next(t) {
	}
	want, err := x509.MarshalPKIXPublicKey(&db.id.key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	p := nm.GetPeers()[0]
	if p.GetName() != "db-1" || !bytes.Equal(p.GetIdentityKey(), want) {
		t.Fatalf("peer %s identity key = %x, want db-1 with the PKIX key of its CSR %x", p.GetName(), p.GetIdentityKey(), want)
	}
	k, err := x509.ParsePKIXPublicKey(p.GetIdentityKey())
	if err != nil || !db.id.key.PublicKey.Equal(k) {
		t.Fatalf("identity key parses to %v, %v; want db-1's CSR key", k, err)
	}
}
