package controller

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	bolt "go.etcd.io/bbolt"

	"segmesh/api/jointoken"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/controller/store"
)

const policyMesh = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: db
    selectors: [{role: db}]
  - name: admins
    selectors: [{admin: "yes"}]
rules:
  - name: web-mesh
    from: [web]
    to: [web]
    ports: [tcp/8080]
  - name: web-to-db
    from: [web]
    to: [db]
    ports: [tcp/5432]
  - name: admin-ssh
    from: [admins]
    to: [db]
    ports: [tcp/22]
tests:
  - name: web-reaches-db
    from: web
    to: db
    allow: [tcp/5432]
  - name: web-has-no-ssh-to-db
    from: web
    to: db
    deny: [tcp/22]
`

func (tc *testController) node(name string) (store.Node, bool) {
	tc.t.Helper()
	var n store.Node
	var ok bool
	if err := tc.c.store.View(func(tx store.Tx) error {
		var err error
		n, ok, err = tx.Node(name)
		return err
	}); err != nil {
		tc.t.Fatal(err)
	}
	return n, ok
}

func (tc *testController) tokenUses(token string) int {
	tc.t.Helper()
	tok, err := jointoken.Decode(token)
	if err != nil {
		tc.t.Fatal(err)
	}
	for _, ti := range tc.listTokens() {
		if ti.Id == tok.IDString() {
			return int(ti.Uses)
		}
	}
	tc.t.Fatalf("token not listed")
	return 0
}

func (tc *testController) listTokens() []*segmeshv1.TokenInfo {
	tc.t.Helper()
	resp, err := tc.op().ListTokens(bg, connect.NewRequest(&segmeshv1.ListTokensRequest{}))
	if err != nil {
		tc.t.Fatal(err)
	}
	return resp.Msg.Tokens
}

// csrFor returns a CSR with common name name for a new P-256 key.
func csrFor(t *testing.T, name string) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: name}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return key, der
}

// TestReenrollmentNeedsProofOfPossession is defect 1 of issue 6: a join token
// plus a node's public data (name, WireGuard key) must not take the node over,
// and a refused attempt changes nothing.
func TestReenrollmentNeedsProofOfPossession(t *testing.T) {
	tc := startController(t, t.TempDir())
	victim := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	before, _ := tc.node("web-1")

	attackerToken := tc.createToken(map[string]string{"role": "db"}, true)
	attacker := newIdentity(t)
	attacker.publicKey = victim.id.publicKey // public: peers and operators see it
	_, err := tc.tryEnroll(attackerToken, "web-1", attacker, "203.0.113.66:51820")
	if ce := wantCode(t, err, connect.CodePermissionDenied); !strings.Contains(ce.Message(), "needs its current identity") {
		t.Errorf("message %q", ce.Message())
	}
	after, _ := tc.node("web-1")
	if !equalJSON(t, before, after) {
		t.Errorf("refused takeover changed the node:\nbefore %+v\nafter  %+v", before, after)
	}
	if n := tc.tokenUses(attackerToken); n != 0 {
		t.Errorf("refused takeover used the token %d times", n)
	}
	if _, err := tc.agent(victim).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{})); err != nil {
		t.Errorf("the victim's certificate stopped working: %v", err)
	}

	// The node itself, proving possession of its TLS key (a CSR signed with it),
	// may enroll again: an agent that lost the response, or whose certificate
	// expired.
	resp, err := tc.tryEnroll(attackerToken, "web-1", victim.id, "192.0.2.1:51820")
	if err != nil {
		t.Fatalf("re-enrollment with proof of possession: %v", err)
	}
	if !slices.Equal(resp.Addresses, victim.resp.Addresses) {
		t.Errorf("re-enrollment moved addresses %v -> %v", victim.resp.Addresses, resp.Addresses)
	}
	// ... but not with another WireGuard key.
	changedKey := victim.id
	changedKey.publicKey = bytes.Repeat([]byte{9}, 32)
	_, err = tc.tryEnroll(attackerToken, "web-1", changedKey, "")
	wantCode(t, err, connect.CodePermissionDenied)

	actions := tc.auditActions()
	if !slices.Contains(actions, "node.reenroll") {
		t.Errorf("audit %v lacks the re-enrollment", actions)
	}
	var refused int
	for _, r := range tc.audit(nil) {
		if r.Action == "node.enroll" && strings.HasPrefix(r.Result, "refused:") && r.Object == "node:web-1" {
			refused++
		}
	}
	if refused != 2 {
		t.Errorf("%d refused enrollments audited, want 2", refused)
	}
}

func equalJSON(t *testing.T, a, b any) bool {
	t.Helper()
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return bytes.Equal(ja, jb)
}

func (tc *testController) audit(req *segmeshv1.ListAuditRequest) []*segmeshv1.AuditRecord {
	tc.t.Helper()
	if req == nil {
		req = &segmeshv1.ListAuditRequest{}
	}
	resp, err := tc.op().ListAudit(bg, connect.NewRequest(req))
	if err != nil {
		tc.t.Fatal(err)
	}
	return resp.Msg.Records
}

// nextWhere reads netmaps until one satisfies cond.
func (s *netmapStream) nextWhere(t *testing.T, cond func(*segmeshv1.Netmap) bool) *segmeshv1.Netmap {
	t.Helper()
	for {
		if nm := s.next(t); cond(nm) {
			return nm
		}
	}
}

// TestRevokeAndDelete: a revoked node disappears from every netmap, gets a
// revoked netmap on its open stream, which then ends; every later call is
// refused; the gossip key changes; its name and key cannot enroll until the node
// is deleted; a deleted node's addresses stay quarantined.
func TestRevokeAndDelete(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.createToken(map[string]string{"role": "web"}, true)
	a, b := tc.enroll(web, "web-1"), tc.enroll(web, "web-2")
	apply(t, tc, policyMesh)
	as := tc.sync(a, &segmeshv1.SyncRequest{})
	bs := tc.sync(b, &segmeshv1.SyncRequest{})
	hasPeer := func(name string) func(*segmeshv1.Netmap) bool {
		return func(nm *segmeshv1.Netmap) bool {
			return slices.ContainsFunc(nm.Peers, func(p *segmeshv1.Peer) bool { return p.Name == name })
		}
	}
	before := as.nextWhere(t, hasPeer("web-2"))
	bs.nextWhere(t, hasPeer("web-1"))

	if _, err := tc.op().RevokeNode(bg, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: "web-2"})); err != nil {
		t.Fatal(err)
	}
	after := as.nextWhere(t, func(nm *segmeshv1.Netmap) bool { return !hasPeer("web-2")(nm) })
	if bytes.Equal(after.GetGossip().GetKey(), before.GetGossip().GetKey()) {
		t.Error("gossip key not rotated on revocation")
	}
	for _, set := range after.GetFilter().GetSets() {
		for _, p := range set.Prefixes {
			if slices.Contains(b.resp.Addresses, p) {
				t.Errorf("set %s still holds the revoked node's address %s", set.Name, p)
			}
		}
	}
	revoked := bs.nextWhere(t, func(nm *segmeshv1.Netmap) bool { return nm.Revoked })
	if len(revoked.Peers) != 0 || revoked.Gossip != nil || len(revoked.GetFilter().GetIngress()) != 0 {
		t.Errorf("revoked netmap carries access: %v", revoked)
	}
	select {
	case err := <-bs.err:
		wantCode(t, err, connect.CodePermissionDenied)
	case <-time.After(10 * time.Second):
		t.Fatal("the revoked node's stream stayed open")
	}
	_, err := tc.agent(b).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{}))
	if ce := wantCode(t, err, connect.CodePermissionDenied); !strings.Contains(ce.Message(), "revoked") {
		t.Errorf("message %q", ce.Message())
	}
	st := tc.status()
	if i := slices.IndexFunc(st.Nodes, func(n *segmeshv1.NodeStatus) bool { return n.Name == "web-2" }); i < 0 || st.Nodes[i].State != "revoked" || st.Nodes[i].RevokedBy != AdminOperator {
		t.Errorf("status of web-2: %v", st.Nodes)
	}
	// Neither its name (even with proof of possession) nor its key may enroll.
	_, err = tc.tryEnroll(web, "web-2", b.id, "")
	if ce := wantCode(t, err, connect.CodePermissionDenied); !strings.Contains(ce.Message(), "nodes delete web-2") {
		t.Errorf("message %q", ce.Message())
	}
	sameKey := newIdentity(t)
	sameKey.publicKey = b.id.publicKey
	_, err = tc.tryEnroll(web, "web-3", sameKey, "")
	wantCode(t, err, connect.CodeAlreadyExists)
	_, err = tc.op().RevokeNode(bg, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: "web-2"}))
	wantCode(t, err, connect.CodeFailedPrecondition)

	del, err := tc.op().DeleteNode(bg, connect.NewRequest(&segmeshv1.DeleteNodeRequest{Name: "web-2"}))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(del.Msg.Addresses, b.resp.Addresses) || del.Msg.QuarantinedUntilUnix != tc.clock.Now().Add(DefaultAddressQuarantine).Unix() {
		t.Errorf("delete: %v", del.Msg)
	}
	if _, ok := tc.node("web-2"); ok {
		t.Error("deleted node still stored")
	}
	// A new host may take the name now, but not the quarantined addresses.
	c := tc.enroll(web, "web-2")
	for _, addr := range c.resp.Addresses {
		if slices.Contains(b.resp.Addresses, addr) {
			t.Errorf("quarantined address %s handed out again", addr)
		}
	}
	if _, err := tc.op().DeleteNode(bg, connect.NewRequest(&segmeshv1.DeleteNodeRequest{Name: "nope"})); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("deleting an unknown node: %v", err)
	}
	for _, want := range []string{"node.revoke", "node.delete"} {
		if !slices.Contains(tc.auditActions(), want) {
			t.Errorf("audit lacks %s", want)
		}
	}
}

// TestAddressQuarantineEnds: with a prefix of two allocatable addresses, a
// deleted node's address is not handed out while quarantined (the overlay is
// full), and is once the quarantine ended.
func TestAddressQuarantineEnds(t *testing.T) {
	tc := startControllerWith(t, t.TempDir(), func(o *Options) {
		o.AddressQuarantine = time.Hour
		o.OverlayPrefixes = []netip.Prefix{netip.MustParsePrefix("100.64.0.0/30")}
	})
	tok := tc.createToken(nil, true)
	a := tc.enroll(tok, "a-1")
	for i := 0; ; i++ { // fill the prefix
		if _, err := tc.tryEnroll(tok, fmt.Sprintf("b-%d", i), newIdentity(t), ""); connect.CodeOf(err) == connect.CodeResourceExhausted {
			break
		} else if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tc.op().DeleteNode(bg, connect.NewRequest(&segmeshv1.DeleteNodeRequest{Name: "a-1"})); err != nil {
		t.Fatal(err)
	}
	_, err := tc.tryEnroll(tok, "c-1", newIdentity(t), "")
	wantCode(t, err, connect.CodeResourceExhausted)
	tc.clock.Advance(time.Hour + time.Second)
	if c := tc.enroll(tok, "c-1"); !slices.Equal(c.resp.Addresses, a.resp.Addresses) {
		t.Errorf("after the quarantine c-1 got %v, want the freed %v", c.resp.Addresses, a.resp.Addresses)
	}
}

// TestLabelNode: a relabel changes memberships; one that would make a policy test
// fail is refused, names the test and changes nothing.
func TestLabelNode(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	other := tc.enroll(tc.createToken(map[string]string{"role": "spare"}, false), "spare-1")
	apply(t, tc, policyMesh)
	ws := tc.sync(web, &segmeshv1.SyncRequest{})
	ws.nextWhere(t, func(nm *segmeshv1.Netmap) bool { return len(nm.Peers) == 1 })

	// spare-1 becomes a db: web-1 gains it as a peer.
	resp, err := tc.op().LabelNode(bg, connect.NewRequest(&segmeshv1.LabelNodeRequest{Name: "spare-1", Set: map[string]string{"role": "db", "env": "prod"}}))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Msg.Labels["role"] != "db" || resp.Msg.Labels["env"] != "prod" {
		t.Errorf("labels %v", resp.Msg.Labels)
	}
	nm := ws.nextWhere(t, func(nm *segmeshv1.Netmap) bool { return len(nm.Peers) == 2 })
	if !slices.ContainsFunc(nm.Peers, func(p *segmeshv1.Peer) bool { return p.Name == other.name }) {
		t.Errorf("web-1 peers %v lack spare-1", nm.Peers)
	}
	// Removing a label: kubectl's k- form is the CLI's; here the remove list.
	if resp, err := tc.op().LabelNode(bg, connect.NewRequest(&segmeshv1.LabelNodeRequest{Name: "spare-1", Remove: []string{"env"}})); err != nil || resp.Msg.Labels["env"] != "" {
		t.Fatalf("removing env: %v %v", resp, err)
	}

	// Making web-1 an admin would let web reach db on tcp/22: test
	// web-has-no-ssh-to-db fails, the relabel is refused.
	before, _ := tc.node("web-1")
	_, err = tc.op().LabelNode(bg, connect.NewRequest(&segmeshv1.LabelNodeRequest{Name: "web-1", Set: map[string]string{"admin": "yes"}}))
	ce := wantCode(t, err, connect.CodeFailedPrecondition)
	if !strings.Contains(ce.Message(), `web-has-no-ssh-to-db`) || !strings.Contains(ce.Message(), "nothing was changed") {
		t.Errorf("message %q", ce.Message())
	}
	if after, _ := tc.node("web-1"); !equalJSON(t, before, after) {
		t.Errorf("refused relabel changed the node: %+v", after)
	}
	// Moving the last two dbs away would leave test web-reaches-db with nothing
	// to check (it passed for real before): refused too.
	if _, err := tc.op().LabelNode(bg, connect.NewRequest(&segmeshv1.LabelNodeRequest{Name: "spare-1", Set: map[string]string{"role": "spare"}})); err != nil {
		t.Fatal(err)
	}
	_, err = tc.op().LabelNode(bg, connect.NewRequest(&segmeshv1.LabelNodeRequest{Name: "db-1", Set: map[string]string{"role": "spare"}}))
	if ce := wantCode(t, err, connect.CodeFailedPrecondition); !strings.Contains(ce.Message(), "web-reaches-db") {
		t.Errorf("message %q", ce.Message())
	}
	// An enrollment can break a test (its token's labels are the operator's
	// choice); relabels that have nothing to do with it still go through.
	tc.enroll(tc.createToken(map[string]string{"role": "web", "admin": "yes"}, false), "web-9")
	if _, err := tc.op().LabelNode(bg, connect.NewRequest(&segmeshv1.LabelNodeRequest{Name: "spare-1", Set: map[string]string{"env": "x"}})); err != nil {
		t.Errorf("a relabel unrelated to a test an enrollment broke was refused: %v", err)
	}
	for _, bad := range []map[string]string{{" role": "x"}, {"role": strings.Repeat("x", 64)}, {"röle": "x"}} {
		_, err := tc.op().LabelNode(bg, connect.NewRequest(&segmeshv1.LabelNodeRequest{Name: "db-1", Set: bad}))
		wantCode(t, err, connect.CodeInvalidArgument)
	}
}

// TestRenewCertificate: a node renews over its current certificate with a new
// key; from then on only the new certificate is accepted.
func TestRenewCertificate(t *testing.T) {
	tc := startControllerWith(t, t.TempDir(), func(o *Options) { o.NodeCertTTL = time.Hour })
	a := tc.enroll(tc.createToken(nil, false), "a-1")
	cert, _ := x509.ParseCertificate(a.resp.CertificateDer)
	if d := cert.NotAfter.Sub(tc.clock.Now()); d > time.Hour || d < 59*time.Minute {
		t.Errorf("certificate lifetime %v, want the configured hour", d)
	}
	_, csr := csrFor(t, "a-1")
	_, wrongName := csrFor(t, "b-1")
	if _, err := tc.agent(a).RenewCertificate(bg, connect.NewRequest(&segmeshv1.RenewCertificateRequest{CsrDer: wrongName})); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("renewal for another name: %v", err)
	}
	tc.clock.Advance(45 * time.Minute)
	resp, err := tc.agent(a).RenewCertificate(bg, connect.NewRequest(&segmeshv1.RenewCertificateRequest{CsrDer: csr}))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Msg.NotAfterUnix != tc.clock.Now().Add(time.Hour).Unix() {
		t.Errorf("not after %d", resp.Msg.NotAfterUnix)
	}
	// An agent that crashed before storing the renewed certificate still has
	// only the old one: it may not do anything with it but renew again, within
	// the grace.
	_, err = tc.agent(a).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{}))
	wantCode(t, err, connect.CodeUnauthenticated)
	tc.clock.Advance(10 * time.Minute)
	key, csr := csrFor(t, "a-1")
	resp, err = tc.agent(a).RenewCertificate(bg, connect.NewRequest(&segmeshv1.RenewCertificateRequest{CsrDer: csr}))
	if err != nil {
		t.Fatalf("renewing again with the previous certificate: %v", err)
	}
	renewed := &enrolledAgent{name: "a-1", cert: tls.Certificate{Certificate: [][]byte{resp.Msg.CertificateDer}, PrivateKey: key}}
	if _, err := tc.agent(renewed).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{})); err != nil {
		t.Fatalf("renewed certificate refused: %v", err)
	}
	// Once the new certificate was used, the old one cannot even renew.
	_, again := csrFor(t, "a-1")
	_, err = tc.agent(a).RenewCertificate(bg, connect.NewRequest(&segmeshv1.RenewCertificateRequest{CsrDer: again}))
	wantCode(t, err, connect.CodeUnauthenticated)
	_, err = tc.agent(a).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{}))
	wantCode(t, err, connect.CodeUnauthenticated)
	if n, _ := tc.node("a-1"); n.CertNotAfter.Unix() != resp.Msg.NotAfterUnix {
		t.Errorf("stored expiry %v", n.CertNotAfter)
	}
}

// TestPreviousCertificateGraceEnds: past prevIdentityGrace a previous
// certificate cannot renew, even if the new one was never used (a thief of the
// old key gets no lasting foothold).
func TestPreviousCertificateGraceEnds(t *testing.T) {
	tc := startControllerWith(t, t.TempDir(), func(o *Options) { o.NodeCertTTL = 3 * prevIdentityGrace })
	a := tc.enroll(tc.createToken(nil, false), "a-1")
	_, csr := csrFor(t, "a-1")
	if _, err := tc.agent(a).RenewCertificate(bg, connect.NewRequest(&segmeshv1.RenewCertificateRequest{CsrDer: csr})); err != nil {
		t.Fatal(err)
	}
	tc.clock.Advance(prevIdentityGrace + time.Minute)
	_, late := csrFor(t, "a-1")
	_, err := tc.agent(a).RenewCertificate(bg, connect.NewRequest(&segmeshv1.RenewCertificateRequest{CsrDer: late}))
	if ce := wantCode(t, err, connect.CodeUnauthenticated); !strings.Contains(ce.Message(), "no longer") {
		t.Errorf("message %q", ce.Message())
	}
}

// TestRotateKey: an operator asks for a new WireGuard key; the node's netmap says
// so, the agent reports its new key, and peers get it.
func TestRotateKey(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.createToken(map[string]string{"role": "web"}, true)
	a, b := tc.enroll(web, "web-1"), tc.enroll(web, "web-2")
	apply(t, tc, policyMesh)
	as := tc.sync(a, &segmeshv1.SyncRequest{})
	bs := tc.sync(b, &segmeshv1.SyncRequest{})
	resp, err := tc.op().RotateNodeKey(bg, connect.NewRequest(&segmeshv1.RotateNodeKeyRequest{Name: "web-2"}))
	if err != nil || resp.Msg.Generation != 1 {
		t.Fatalf("RotateNodeKey: %v %v", resp, err)
	}
	bs.nextWhere(t, func(nm *segmeshv1.Netmap) bool { return nm.KeyRotation == 1 })
	newKey := bytes.Repeat([]byte{42}, 32)
	if _, err := tc.agent(b).RotateKey(bg, connect.NewRequest(&segmeshv1.RotateKeyRequest{PublicKey: newKey, Generation: 2})); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Errorf("rotation of a generation not requested: %v", err)
	}
	if _, err := tc.agent(b).RotateKey(bg, connect.NewRequest(&segmeshv1.RotateKeyRequest{PublicKey: a.id.publicKey, Generation: 1})); connect.CodeOf(err) != connect.CodeAlreadyExists {
		t.Errorf("rotation to another node's key: %v", err)
	}
	if _, err := tc.agent(b).RotateKey(bg, connect.NewRequest(&segmeshv1.RotateKeyRequest{PublicKey: newKey, Generation: 1})); err != nil {
		t.Fatal(err)
	}
	as.nextWhere(t, func(nm *segmeshv1.Netmap) bool {
		return slices.ContainsFunc(nm.Peers, func(p *segmeshv1.Peer) bool { return p.Name == "web-2" && bytes.Equal(p.PublicKey, newKey) })
	})
	// A retry of the completed rotation is fine; another key for it is not.
	if _, err := tc.agent(b).RotateKey(bg, connect.NewRequest(&segmeshv1.RotateKeyRequest{PublicKey: newKey, Generation: 1})); err != nil {
		t.Errorf("retry: %v", err)
	}
	if _, err := tc.agent(b).RotateKey(bg, connect.NewRequest(&segmeshv1.RotateKeyRequest{PublicKey: bytes.Repeat([]byte{43}, 32), Generation: 1})); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Errorf("second key for a completed rotation: %v", err)
	}
}

// operatorProcedures lists every OperatorService procedure from the service
// descriptor, so that a procedure added later is covered without editing the test.
func operatorProcedures() []string {
	svc := segmeshv1.File_segmesh_v1_segmesh_proto.Services().ByName("OperatorService")
	var out []string
	for i := range svc.Methods().Len() {
		out = append(out, "/"+string(svc.FullName())+"/"+string(svc.Methods().Get(i).Name()))
	}
	return out
}

// callRaw posts body to procedure with the Connect protocol (JSON) and returns
// the HTTP status and the error code in the answer.
func (tc *testController) callRaw(token, procedure string, body io.Reader) (int, string) {
	tc.t.Helper()
	streaming := procedure == segmeshv1connect.OperatorServiceBackupProcedure
	req, _ := http.NewRequest(http.MethodPost, tc.url+procedure, body)
	req.Header.Set("Content-Type", "application/json")
	if streaming {
		req.Header.Set("Content-Type", "application/connect+json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := tc.httpClient(nil).Do(req)
	if err != nil {
		tc.t.Fatalf("%s: %v", procedure, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if streaming && len(raw) > 5 { // an end-of-stream envelope: 5-byte prefix, then JSON
		raw = raw[5:]
		var end struct {
			Error struct{ Code string } `json:"error"`
		}
		_ = json.Unmarshal(raw, &end)
		return resp.StatusCode, end.Error.Code
	}
	var e struct{ Code string }
	_ = json.Unmarshal(raw, &e)
	return resp.StatusCode, e.Code
}

// TestOperatorRoles: a viewer may read and is refused every change; a revoked
// credential is refused everything; the last admin cannot be revoked.
func TestOperatorRoles(t *testing.T) {
	tc := startController(t, t.TempDir())
	resp, err := tc.op().CreateOperator(bg, connect.NewRequest(&segmeshv1.CreateOperatorRequest{Name: "alice", Role: "viewer"}))
	if err != nil {
		t.Fatal(err)
	}
	viewer := resp.Msg.Token
	for _, proc := range operatorProcedures() {
		status, code := tc.callRaw(viewer, proc, strings.NewReader("{}"))
		if viewerProcedures[proc] {
			if code == "permission_denied" || code == "unauthenticated" {
				t.Errorf("viewer refused a read: %s -> %d %s", proc, status, code)
			}
			continue
		}
		if code != "permission_denied" {
			t.Errorf("viewer calling %s: HTTP %d code %q, want permission_denied", proc, status, code)
		}
	}
	if _, err := tc.operator(viewer).ListAudit(bg, connect.NewRequest(&segmeshv1.ListAuditRequest{})); err != nil {
		t.Errorf("viewer reading the audit log: %v", err)
	}
	_, err = tc.op().CreateOperator(bg, connect.NewRequest(&segmeshv1.CreateOperatorRequest{Name: "alice", Role: "admin"}))
	wantCode(t, err, connect.CodeAlreadyExists)
	_, err = tc.op().CreateOperator(bg, connect.NewRequest(&segmeshv1.CreateOperatorRequest{Name: "bob", Role: "root"}))
	wantCode(t, err, connect.CodeInvalidArgument)
	_, err = tc.op().RevokeOperator(bg, connect.NewRequest(&segmeshv1.RevokeOperatorRequest{Name: AdminOperator}))
	wantCode(t, err, connect.CodeFailedPrecondition)
	if _, err := tc.op().RevokeOperator(bg, connect.NewRequest(&segmeshv1.RevokeOperatorRequest{Name: "alice"})); err != nil {
		t.Fatal(err)
	}
	_, err = tc.operator(viewer).Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{}))
	wantCode(t, err, connect.CodeUnauthenticated)
	list, err := tc.op().ListOperators(bg, connect.NewRequest(&segmeshv1.ListOperatorsRequest{}))
	if err != nil || len(list.Msg.Operators) != 2 || list.Msg.Operators[1].Name != "alice" || list.Msg.Operators[1].RevokedUnix == 0 {
		t.Errorf("operators: %v %v", list, err)
	}
	// The audit log names who did what.
	var actors []string
	for _, r := range tc.audit(nil) {
		if (r.Action == "operator.create" || r.Action == "operator.revoke") && r.Result == "ok" {
			actors = append(actors, r.Actor+" "+r.Action+" "+r.Object)
		}
	}
	want := []string{"controller operator.create operator:admin", "admin operator.create operator:alice", "admin operator.revoke operator:alice"}
	if !slices.Equal(actors, want) {
		t.Errorf("audit %v, want %v", actors, want)
	}
}

// slowBody yields one byte, then blocks until it is closed: a client that starts a
// large body and trickles it. The HTTP/2 transport closes the body when the
// server answered the request before reading it.
type slowBody struct {
	sent    bool
	release chan struct{}
	once    sync.Once
}

func (b *slowBody) Read(p []byte) (int, error) {
	if !b.sent {
		b.sent = true
		return copy(p, "{"), nil
	}
	<-b.release
	return 0, io.EOF
}

func (b *slowBody) Close() error {
	b.once.Do(func() { close(b.release) })
	return nil
}

// TestUnauthenticatedBodyNotRead is defect 3 of issue 6: the controller answers a
// call without a valid credential from its headers, before reading the body.
func TestUnauthenticatedBodyNotRead(t *testing.T) {
	tc := startController(t, t.TempDir())
	for _, token := range []string{"", "wrong"} {
		body := &slowBody{release: make(chan struct{})}
		done := make(chan string, 1)
		go func() {
			_, code := tc.callRaw(token, segmeshv1connect.OperatorServiceApplyPolicyProcedure, body)
			done <- code
		}()
		select {
		case code := <-done:
			if code != "unauthenticated" {
				t.Errorf("token %q: code %q", token, code)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("token %q: no answer while the body was still being sent", token)
		}
		body.Close()
	}
	// A declared body larger than the procedure accepts is refused up front.
	req, _ := http.NewRequest(http.MethodPost, tc.url+segmeshv1connect.OperatorServiceCreateTokenProcedure, bytes.NewReader(make([]byte, smallBodyLimit+1)))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+tc.cred.Token)
	resp, err := tc.httpClient(nil).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized CreateToken body: HTTP %d", resp.StatusCode)
	}
}

// TestTokensListAndRevoke: listing never shows a secret; a revoked token enrolls
// nothing.
func TestTokensListAndRevoke(t *testing.T) {
	tc := startController(t, t.TempDir())
	tok := tc.createToken(map[string]string{"role": "web"}, true)
	toks := tc.listTokens()
	if len(toks) != 1 || toks[0].Creator != AdminOperator || toks[0].Labels["role"] != "web" {
		t.Fatalf("tokens %v", toks)
	}
	raw, _ := json.Marshal(toks)
	dec, err := jointoken.Decode(tok)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{tok, hex.EncodeToString(dec.Secret[:]), base64.StdEncoding.EncodeToString(dec.Secret[:]), base64.RawURLEncoding.EncodeToString(dec.Secret[:])} {
		if bytes.Contains(raw, []byte(secret)) {
			t.Errorf("token list contains the secret (as %q)", secret)
		}
	}
	if _, err := tc.op().RevokeToken(bg, connect.NewRequest(&segmeshv1.RevokeTokenRequest{Id: toks[0].Id})); err != nil {
		t.Fatal(err)
	}
	_, err = tc.tryEnroll(tok, "web-1", newIdentity(t), "")
	if ce := wantCode(t, err, connect.CodePermissionDenied); !strings.Contains(ce.Message(), "revoked") {
		t.Errorf("message %q", ce.Message())
	}
	_, err = tc.op().RevokeToken(bg, connect.NewRequest(&segmeshv1.RevokeTokenRequest{Id: "ffff"}))
	wantCode(t, err, connect.CodeNotFound)
	// The refusal is audited under the action and object a success would have.
	recs := tc.audit(nil)
	if r := recs[len(recs)-1]; r.Action != "token.revoke" || r.Object != "token:ffff" || !strings.HasPrefix(r.Result, "refused: no join token") {
		t.Errorf("refused revocation audited as %s %s %q", r.Action, r.Object, r.Result)
	}
}

// TestAuditVerify: the chain verifies; a record edited in the store file is
// named by VerifyAudit.
func TestAuditVerify(t *testing.T) {
	dir := t.TempDir()
	tc := startController(t, dir)
	tc.createToken(nil, false)
	apply(t, tc, policyMesh)
	tc.createToken(nil, false)
	v, err := tc.op().VerifyAudit(bg, connect.NewRequest(&segmeshv1.VerifyAuditRequest{}))
	if err != nil || !v.Msg.Ok || v.Msg.Records != 4 {
		t.Fatalf("VerifyAudit on an intact log: %v %v", v, err)
	}
	tc.stop()
	db, err := bolt.Open(dir+"/"+StoreFile, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("audit"))
		k, v := b.Cursor().Seek([]byte{0, 0, 0, 0, 0, 0, 0, 3})
		edited := bytes.Replace(v, []byte(`"admin"`), []byte(`"mallory"`), 1)
		if bytes.Equal(edited, v) {
			t.Fatalf("record 3 %s has no admin actor", v)
		}
		return b.Put(k, edited)
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	tc2 := startController(t, dir)
	v, err = tc2.op().VerifyAudit(bg, connect.NewRequest(&segmeshv1.VerifyAuditRequest{}))
	if err != nil || v.Msg.Ok || v.Msg.FirstBadSeq != 3 || !strings.Contains(v.Msg.Problem, "edited") {
		t.Fatalf("VerifyAudit after an edit: %v %v", v, err)
	}
}

// TestEnrollmentThrottled is defect 5 of issue 6: refusals are rate limited per
// source address, so guessing secrets is slow; a host with the right secret
// behind the same address is not locked out.
func TestEnrollmentThrottled(t *testing.T) {
	tc := startController(t, t.TempDir())
	tc.c.enrollLimits.burst = refusalBurst
	good := tc.createToken(nil, false)
	tok, _ := jointoken.Decode(good)
	wrongTok := tok
	wrongTok.Secret[0] ^= 1
	unknown := tok
	unknown.ID[0] ^= 1
	var codes []connect.Code
	for i := range refusalBurst + 3 {
		try := wrongTok.String()
		if i%2 == 1 {
			try = unknown.String() // another token ID: only the source budget applies
		}
		_, err := tc.tryEnroll(try, "x-1", newIdentity(t), "")
		codes = append(codes, connect.CodeOf(err))
	}
	if codes[0] == connect.CodeResourceExhausted || codes[len(codes)-1] != connect.CodeResourceExhausted || codes[len(codes)-2] != connect.CodeResourceExhausted {
		t.Fatalf("codes %v: want refusals first, then resource_exhausted", codes)
	}
	for _, bad := range []string{"smjt1_garbage", unknown.String()} {
		_, err := tc.tryEnroll(bad, "x-1", newIdentity(t), "")
		wantCode(t, err, connect.CodeResourceExhausted)
	}
	// The right secret from the same address goes through.
	if _, err := tc.tryEnroll(good, "x-1", newIdentity(t), ""); err != nil {
		t.Fatalf("enrollment with the right secret from a throttled address: %v", err)
	}
	// Once the budget refilled, refusals say what is wrong again.
	tc.clock.Advance(refusalBurst * time.Second)
	if _, err := tc.tryEnroll(unknown.String(), "x-2", newIdentity(t), ""); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("enrollment after the budget refilled: %v", err)
	}
	var audited int
	for _, r := range tc.audit(nil) {
		if strings.HasPrefix(r.Result, "refused:") {
			audited++
		}
	}
	if audited == 0 || audited > 2*int(refusalLogRate)+1 {
		t.Errorf("%d refusals audited, want between 1 and the log budget", audited)
	}
}

// TestAuditVerifyAgainstHead: someone with write access to the store who edits a
// record and recomputes every later hash and the head passes the chain check;
// the head an operator kept outside the controller catches it.
func TestAuditVerifyAgainstHead(t *testing.T) {
	dir := t.TempDir()
	tc := startController(t, dir)
	tc.createToken(nil, false)
	tc.createToken(nil, false)
	v, err := tc.op().VerifyAudit(bg, connect.NewRequest(&segmeshv1.VerifyAuditRequest{}))
	if err != nil || !v.Msg.Ok || v.Msg.HeadSeq != 3 || len(v.Msg.HeadHash) != 64 {
		t.Fatalf("VerifyAudit: %v %v", v, err)
	}
	head := fmt.Sprintf("%d:%s", v.Msg.HeadSeq, v.Msg.HeadHash)
	tc.stop()

	// Rewrite record 2 and rechain everything after it.
	db, err := bolt.Open(dir+"/"+StoreFile, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("audit"))
		prev := ""
		return b.ForEach(func(k, raw []byte) error {
			var e store.AuditEntry
			if err := json.Unmarshal(raw, &e); err != nil {
				return err
			}
			if e.Seq == 2 {
				e.Actor = "mallory"
			}
			e.PrevHash = prev
			e.Hash = store.AuditHash(e)
			prev = e.Hash
			out, _ := json.Marshal(e)
			if err := b.Put(k, out); err != nil {
				return err
			}
			return tx.Bucket([]byte("meta")).Put([]byte("audit-head"), fmt.Appendf(nil, "%d %s", e.Seq, e.Hash))
		})
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	tc2 := startController(t, dir)
	v, err = tc2.op().VerifyAudit(bg, connect.NewRequest(&segmeshv1.VerifyAuditRequest{}))
	if err != nil || !v.Msg.Ok {
		t.Fatalf("a consistently rewritten chain: %v %v (the chain alone is expected to pass)", v, err)
	}
	v, err = tc2.op().VerifyAudit(bg, connect.NewRequest(&segmeshv1.VerifyAuditRequest{ExpectHead: head}))
	if err != nil || v.Msg.Ok || v.Msg.FirstBadSeq != 3 || !strings.Contains(v.Msg.Problem, "rewritten") {
		t.Fatalf("VerifyAudit against the kept head: %v %v", v, err)
	}
	_, err = tc2.op().VerifyAudit(bg, connect.NewRequest(&segmeshv1.VerifyAuditRequest{ExpectHead: "3"}))
	wantCode(t, err, connect.CodeInvalidArgument)
}

// TestGossipKeyRotatedWhenNodeLosesPeers: a node relabeled out of every rule
// loses the gossip key, and the others get a new one, so that it can read no
// further gossip (least privilege, as for a revoked node).
func TestGossipKeyRotatedWhenNodeLosesPeers(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.createToken(map[string]string{"role": "web"}, true)
	a, b := tc.enroll(web, "web-1"), tc.enroll(web, "web-2")
	tc.enroll(web, "web-3")
	apply(t, tc, policyMesh)
	as := tc.sync(a, &segmeshv1.SyncRequest{})
	bs := tc.sync(b, &segmeshv1.SyncRequest{})
	before := as.nextWhere(t, func(nm *segmeshv1.Netmap) bool { return len(nm.Peers) == 2 }).GetGossip().GetKey()
	bs.nextWhere(t, func(nm *segmeshv1.Netmap) bool { return len(nm.Peers) == 2 })
	if _, err := tc.op().LabelNode(bg, connect.NewRequest(&segmeshv1.LabelNodeRequest{Name: "web-2", Set: map[string]string{"role": "spare"}})); err != nil {
		t.Fatal(err)
	}
	isolated := bs.nextWhere(t, func(nm *segmeshv1.Netmap) bool { return len(nm.Peers) == 0 })
	if isolated.Gossip != nil {
		t.Errorf("the isolated node kept a gossip configuration")
	}
	after := as.nextWhere(t, func(nm *segmeshv1.Netmap) bool { return len(nm.Peers) == 1 }).GetGossip().GetKey()
	if len(after) != 32 || bytes.Equal(after, before) {
		t.Errorf("gossip key not rotated after web-2 lost its peers")
	}
	if !slices.Contains(tc.auditActions(), "gossip.rotate") {
		t.Errorf("audit lacks the rotation: %v", tc.auditActions())
	}
}
