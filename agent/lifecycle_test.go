package agent

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"segmesh/agent/dataplane"
	"segmesh/agent/netmap"
	"segmesh/agent/statefile"
	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
)

// ---------------------------------------------------------------- helpers

func revokedErr() *connect.Error {
	return connect.NewError(connect.CodePermissionDenied, errors.New(`node "web-1" is revoked`))
}

func unavailable() *connect.Error {
	return connect.NewError(connect.CodeUnavailable, errors.New("try later"))
}

// revokedWire is the netmap the controller sends a revoked node.
func revokedWire(rev uint64) *segmeshv1.Netmap {
	nm := &segmeshv1.Netmap{
		PolicyRevision:  rev,
		Self:            &segmeshv1.Node{Name: "web-1", Addresses: []string{"100.64.0.1/32", "fd5e:6d65:7368::1/128"}},
		OverlayPrefixes: []string{"100.64.0.0/10", "fd5e:6d65:7368::/48"},
		Revoked:         true,
	}
	nm.Hash = wire.NetmapHash(nm)
	return nm
}

// withRotation is wireNetmap(rev, 0) asking for key rotation generation gen.
func withRotation(rev, gen uint64) *segmeshv1.Netmap {
	nm := wireNetmap(rev, 0)
	nm.KeyRotation = gen
	nm.Hash = wire.NetmapHash(nm)
	return nm
}

func stateDir(t *testing.T, dir string) *statefile.Dir {
	t.Helper()
	d, err := statefile.Open(dir, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func storedWire(t *testing.T, dir string) *segmeshv1.Netmap {
	t.Helper()
	nm, err := stateDir(t, dir).Netmap()
	if err != nil {
		t.Fatal(err)
	}
	return nm
}

func (c *controller) reportCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.reports)
}

// quietFor waits until the agent's reconciler has read the dataplane back n more
// times (n resync intervals passed), so that a test can assert that something did
// not happen meanwhile without sleeping for a fixed time.
func quietFor(t *testing.T, r *run, n int) {
	t.Helper()
	from := r.dp.Stats().Reads
	eventually(t, strconv.Itoa(n)+" resync intervals", func() bool { return r.dp.Stats().Reads >= from+n })
}

// portFree reports whether UDP port on 127.0.0.1 can be bound (gossip stopped).
func portFree(port int) bool {
	pc, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return false
	}
	pc.Close()
	return true
}

func csrKey(t *testing.T, der []byte) *ecdsa.PublicKey {
	t.Helper()
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	if csr.Subject.CommonName != "web-1" {
		t.Errorf("CSR common name %q, want web-1", csr.Subject.CommonName)
	}
	return csr.PublicKey.(*ecdsa.PublicKey)
}

// ---------------------------------------------------------------- revocation

// TestRevokedGoesToDefaultDeny: however the agent learns of its revocation (a
// revoked netmap on the stream, or PermissionDenied "revoked" on the stream or on
// a report), it drops every peer and keeps an empty filter, stores that so that a
// restart stays at default deny, stops gossip, tells the operator how to bring the
// host back, and stops reporting and reconnecting at the normal pace.
func TestRevokedGoesToDefaultDeny(t *testing.T) {
	tests := []struct {
		name   string
		revoke func(c *controller)
	}{
		{name: "revoked netmap on the stream", revoke: func(c *controller) {
			c.mu.Lock()
			c.syncErr = revokedErr()
			c.mu.Unlock()
			c.push <- fullUpdate(revokedWire(4))
		}},
		{name: "stream refused", revoke: func(c *controller) {
			c.mu.Lock()
			c.syncErr = revokedErr()
			c.mu.Unlock()
			c.push <- fullUpdate(wireNetmap(4, 0))
		}},
		{name: "stream refused for a deleted node", revoke: func(c *controller) {
			c.mu.Lock()
			c.syncErr = connect.NewError(connect.CodePermissionDenied, errors.New(`node "web-1" is not enrolled (deleted by an operator?); its credentials are no longer valid`))
			c.mu.Unlock()
			c.push <- fullUpdate(wireNetmap(4, 0))
		}},
		{name: "report refused", revoke: func(c *controller) {
			c.mu.Lock()
			c.reportErr = revokedErr()
			c.mu.Unlock()
			c.push <- fullUpdate(wireNetmap(4, 0))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			port := freePort(t)
			c := newController(t)
			pb := wireNetmap(3, port)
			c.setNetmap(pb)
			dir := filepath.Join(t.TempDir(), "state")
			r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
			eventually(t, "revision 3 applied with gossip running", func() bool {
				rep := c.lastReport()
				return rep != nil && rep.GetAppliedRevision() == 3 && !portFree(port)
			})

			tt.revoke(c)
			deny := expected(t, dir, nil, nil)
			eventually(t, "default deny", func() bool { return holds(r.dp, deny) })
			got, _ := r.dp.State()
			if len(got.Peers) != 0 || len(got.Filter.Sets)+len(got.Filter.Ingress)+len(got.Filter.Egress) != 0 {
				t.Fatalf("revoked node's dataplane %+v, want no peers and an empty filter", got)
			}
			eventually(t, "gossip stopped", func() bool { return portFree(port) })
			eventually(t, "operator told", func() bool {
				l := r.logs.String()
				return strings.Contains(l, "level=ERROR") && strings.Contains(l, "revoked by an operator") && strings.Contains(l, "`segmesh nodes delete web-1` (unless done already)") &&
					strings.Contains(l, "new join token")
			})
			// (A netmap the controller still streams un-revokes the node until the
			// next refusal; in the end the revoked netmap is stored.)
			eventually(t, "revoked netmap stored", func() bool {
				st := storedWire(t, dir)
				return st.GetRevoked() && len(st.GetPeers()) == 0 && holds(r.dp, deny)
			})

			// No more reports; at most one more stream attempt, then every 30 s.
			reports := c.reportCount()
			_, syncs := c.counts()
			quietFor(t, r, 10)
			if n := c.reportCount(); n != reports {
				t.Errorf("%d reports after the revocation, want none", n-reports)
			}
			if _, s := c.counts(); s > syncs+1 {
				t.Errorf("%d stream attempts after the revocation, want at most 1", s-syncs)
			}
			if strings.Contains(r.logs.String(), "controller stream ended; reconnecting") && !strings.Contains(r.logs.String(), "in=30s") {
				t.Error("revoked node reconnects at the normal pace")
			}

			// A restart stays at default deny from the first apply on.
			if err := r.stop(t); err != nil {
				t.Fatal(err)
			}
			r2 := start(t, Options{StateDir: dir})
			eventually(t, "revoked message at restart", func() bool { return strings.Contains(r2.logs.String(), "revoked by an operator") })
			eventually(t, "default deny after the restart", func() bool { return holds(r2.dp, deny) })
			if h := r2.dp.History(); len(h) == 0 || len(h[0].Peers) != 0 {
				t.Fatalf("restart of a revoked node first applied %+v, want default deny", h)
			}
		})
	}
}

func TestIsRevokedError(t *testing.T) {
	tests := []struct {
		err  error
		want bool
	}{
		{revokedErr(), true},
		{fmt.Errorf("netmap stream: %w", revokedErr()), true},
		{connect.NewError(connect.CodeUnauthenticated, errors.New("this certificate is no longer node \"web-1\"'s")), false},
		{unavailable(), false},
		{errors.New("permission denied"), false},
		{nil, false},
	}
	for _, tt := range tests {
		if got := isRevokedError(tt.err); got != tt.want {
			t.Errorf("isRevokedError(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}

// TestRevokedNodeReenrolls: a revoked node started with a join token re-enrolls
// under its name with its current keys once an operator deleted it (before that,
// the controller refuses and the node stays at default deny).
func TestRevokedNodeReenrolls(t *testing.T) {
	c := newController(t)
	dir := enrolled(t, c, wireNetmap(3, 0))
	if err := stateDir(t, dir).SaveNetmap(revokedWire(3)); err != nil {
		t.Fatal(err)
	}
	tlsKey, err := stateDir(t, dir).TLSKey()
	if err != nil {
		t.Fatal(err)
	}
	wgPriv, err := stateDir(t, dir).WireGuardKey()
	if err != nil {
		t.Fatal(err)
	}
	wgPub := wgPriv.PublicKey()
	deny := expected(t, dir, nil, nil)

	// Not deleted yet: refused.
	c.mu.Lock()
	c.enrollErrs = []*connect.Error{connect.NewError(connect.CodeFailedPrecondition, errors.New(`node "web-1" is revoked; an operator must delete it first`))}
	c.current = revokedWire(3)
	c.syncErr = revokedErr()
	c.mu.Unlock()
	enrolls, _ := c.counts()
	r := start(t, Options{StateDir: dir, Token: c.token()})
	eventually(t, "refusal logged", func() bool {
		return strings.Contains(r.logs.String(), "re-enrollment failed; the agent stays at default deny")
	})
	if !holds(r.dp, deny) {
		t.Fatal("refused re-enrollment left default deny")
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}

	// Deleted: accepted.
	pb := wireNetmap(5, 0)
	c.mu.Lock()
	c.syncErr = nil
	c.current = pb
	c.mu.Unlock()
	r = start(t, Options{StateDir: dir, Token: c.token()})
	eventually(t, "revision 5 applied and reported", func() bool {
		rep := c.lastReport()
		return rep != nil && rep.GetAppliedHash() == pb.GetHash() && holds(r.dp, expected(t, dir, pb, nil))
	})
	c.mu.Lock()
	reqs := c.enrolls[enrolls:]
	c.mu.Unlock()
	if len(reqs) != 2 {
		t.Fatalf("%d enrollments, want 2 (refused, accepted)", len(reqs))
	}
	for _, req := range reqs {
		if req.GetName() != "web-1" || !csrKey(t, req.GetCsrDer()).Equal(&tlsKey.PublicKey) || !bytes.Equal(req.GetPublicKey(), wgPub[:]) {
			t.Errorf("re-enrollment %v: want name web-1, the current TLS key and the current WireGuard key", req)
		}
	}
	if st := storedWire(t, dir); st.GetRevoked() {
		t.Error("revoked netmap still stored after re-enrollment")
	}
	if !strings.Contains(r.logs.String(), "re-enrolled") {
		t.Error("re-enrollment not logged")
	}
}

// ---------------------------------------------------------------- renewal

// TestCertificateRenewal: with a short lifetime the agent renews its certificate
// every time two thirds of it passed, each time with a fresh TLS key, over the
// current certificate; afterwards streams and reports present the new certificate
// and the state directory holds the matching key and certificate.
func TestCertificateRenewal(t *testing.T) {
	c := newController(t)
	c.certLifetime = 3 * time.Second
	pb := wireNetmap(3, 0)
	c.setNetmap(pb)
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
	eventually(t, "two renewals, then a stream and a report with the latest certificate", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		if len(c.renews) < 2 || len(c.issued) < 3 {
			return false
		}
		last := certID(c.issued[len(c.issued)-1])
		syncs, reports := c.presented["stream"], c.presented["Report"]
		return len(syncs) > 0 && syncs[len(syncs)-1] == last && len(reports) > 0 && reports[len(reports)-1] == last
	})
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	keys := []*ecdsa.PublicKey{csrKey(t, c.enrolls[0].GetCsrDer())}
	for i, req := range c.renews {
		k := csrKey(t, req.GetCsrDer())
		for _, prev := range keys {
			if k.Equal(prev) {
				t.Errorf("renewal %d reuses an earlier TLS key", i)
			}
		}
		keys = append(keys, k)
		if got, want := c.presented["RenewCertificate"][i], certID(c.issued[i]); got != want {
			t.Errorf("renewal %d was made over certificate %s, want the current one %s", i, got, want)
		}
	}
	// What is on disk after the stop: the last issued certificate and its key.
	d := stateDir(t, dir)
	cert, err := d.ClientCertificate()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(cert.Certificate[0], c.issued[len(c.issued)-1]) {
		t.Error("node.crt is not the last issued certificate")
	}
	if _, err := os.Stat(filepath.Join(dir, statefile.NextTLSKeyFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s left behind: %v", statefile.NextTLSKeyFile, err)
	}
	if strings.Contains(r.logs.String(), "level=ERROR") {
		t.Errorf("renewals logged errors:\n%s", r.logs.String())
	}
	if !holds(r.dp, expected(t, dir, pb, nil)) {
		t.Error("renewal changed the dataplane")
	}
}

// TestCheckNodeCertificate: a renewed certificate is used only when it is a client
// certificate for the new key, for this node, from the stored CA.
func TestCheckNodeCertificate(t *testing.T) {
	c := newController(t)
	dir := enrolled(t, c, nil)
	a := &agent{id: statefile.Identity{NodeName: "web-1"}, dir: stateDir(t, dir), log: slog.New(slog.DiscardHandler)}
	key := identities[1]
	other := newController(t)
	tests := []struct {
		name string
		der  []byte
		want string
	}{
		{name: "valid", der: c.ca.ClientCert(t, "web-1", key)},
		{name: "other key", der: c.ca.ClientCert(t, "web-1", identities[2]), want: "not for the new TLS key"},
		{name: "other name", der: c.ca.ClientCert(t, "db-1", key), want: `common name "db-1"`},
		{name: "other CA", der: other.ca.ClientCert(t, "web-1", key), want: "unknown authority"},
		{name: "server certificate", der: c.ca.ServerCert(t, "web-1").Certificate[0], want: "incompatible key usage"},
		{name: "garbage", der: []byte("nope"), want: "parsing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := a.checkNodeCertificate(tt.der, key)
			if tt.want == "" && err != nil || tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
				t.Fatalf("checkNodeCertificate = %v, want %q", err, tt.want)
			}
		})
	}
}

// TestExpiredCertificate: when renewal keeps failing and the certificate expires,
// the agent keeps enforcing its last netmap, says that it expired and needs a new
// token, and stops calling the controller; a restart without a token stays so; a
// restart with a token re-enrolls under the same name with the current TLS and
// WireGuard keys, and the agent is back.
func TestExpiredCertificate(t *testing.T) {
	c := newController(t)
	c.certLifetime = 1500 * time.Millisecond
	for range 1000 {
		c.renewErrs = append(c.renewErrs, unavailable())
	}
	pb := wireNetmap(3, 0)
	c.setNetmap(pb)
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
	eventually(t, "expiry logged", func() bool { return strings.Contains(r.logs.String(), "the node certificate expired at") })
	want := expected(t, dir, pb, nil)
	if !holds(r.dp, want) {
		t.Fatal("expired agent does not enforce its last netmap")
	}
	for _, w := range []string{"level=ERROR", "fail static", "new join token", "re-enroll as web-1"} {
		if !strings.Contains(r.logs.String(), w) {
			t.Errorf("expiry message does not say %q", w)
		}
	}
	// A renewal or report sent just before the expiry may still land; count from
	// two resync intervals later.
	quietFor(t, r, 2)
	c.mu.Lock()
	renews := len(c.renews)
	c.mu.Unlock()
	reports := c.reportCount()
	quietFor(t, r, 10)
	c.mu.Lock()
	if n := len(c.renews); n != renews {
		t.Errorf("%d renewal attempts after expiry", n-renews)
	}
	c.mu.Unlock()
	if n := c.reportCount(); n != reports {
		t.Errorf("%d reports after expiry", n-reports)
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}

	// Without a token: fail static from the start, no stream.
	_, syncs := c.counts()
	r = start(t, Options{StateDir: dir})
	eventually(t, "expiry logged at start", func() bool { return strings.Contains(r.logs.String(), "the node certificate expired at") })
	eventually(t, "stored netmap applied", func() bool { return holds(r.dp, want) })
	quietFor(t, r, 5)
	if _, s := c.counts(); s != syncs {
		t.Errorf("%d streams opened with an expired certificate", s-syncs)
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}

	// With a token: re-enrollment with the current keys.
	d := stateDir(t, dir)
	tlsKey, _ := d.TLSKey()
	wgPriv, _ := d.WireGuardKey()
	wgPub := wgPriv.PublicKey()
	c.mu.Lock()
	c.certLifetime = 0
	c.renewErrs = nil
	enrolls := len(c.enrolls)
	c.mu.Unlock()
	r = start(t, Options{StateDir: dir, Token: c.token()})
	eventually(t, "reports again", func() bool { return c.reportCount() > reports })
	if h := r.dp.History(); len(dataplane.Diff(want, h[0])) > 0 {
		t.Error("the restart did not apply the last netmap before re-enrolling")
	}
	c.mu.Lock()
	reqs := c.enrolls[enrolls:]
	c.mu.Unlock()
	if len(reqs) != 1 || reqs[0].GetName() != "web-1" || !csrKey(t, reqs[0].GetCsrDer()).Equal(&tlsKey.PublicKey) || !bytes.Equal(reqs[0].GetPublicKey(), wgPub[:]) {
		t.Fatalf("re-enrollments %v: want one, as web-1 with the current TLS and WireGuard keys", reqs)
	}
	if k, _ := stateDir(t, dir).WireGuardKey(); k != wgPriv {
		t.Error("re-enrollment changed the WireGuard key")
	}
}

// ---------------------------------------------------------------- key rotation

func wgKeyOnDisk(t *testing.T, dir string) dataplane.Key {
	t.Helper()
	k, err := stateDir(t, dir).WireGuardKey()
	if err != nil {
		t.Fatal(err)
	}
	return dataplane.Key(k)
}

// TestKeyRotation: a netmap whose key_rotation is above the completed generation
// makes the agent generate a new WireGuard key, tell the controller (retrying a
// failure with the same key), store it, record the generation and program it,
// without touching peers or the filter; the same generation again does nothing.
func TestKeyRotation(t *testing.T) {
	c := newController(t)
	c.setNetmap(wireNetmap(3, 0))
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
	eventually(t, "revision 3", func() bool { rep := c.lastReport(); return rep != nil && rep.GetAppliedRevision() == 3 })
	old := wgKeyOnDisk(t, dir)

	c.mu.Lock()
	c.rotateErrs = []*connect.Error{unavailable()}
	c.mu.Unlock()
	pb := withRotation(4, 1)
	c.push <- fullUpdate(pb)
	eventually(t, "new key programmed", func() bool {
		st, _ := r.dp.State()
		return st.PrivateKey != old && st.PrivateKey == wgKeyOnDisk(t, dir)
	})
	newKey := wgKeyOnDisk(t, dir)
	if !holds(r.dp, expected(t, dir, pb, nil)) {
		t.Fatal("rotation changed more than the key")
	}
	c.mu.Lock()
	rotates := append([]*segmeshv1.RotateKeyRequest(nil), c.rotates...)
	c.mu.Unlock()
	pub := publicKey(newKey)
	if len(rotates) != 2 {
		t.Fatalf("%d RotateKey calls, want 2 (a failure, then the retry)", len(rotates))
	}
	for _, req := range rotates {
		if !bytes.Equal(req.GetPublicKey(), pub[:]) || req.GetGeneration() != 1 {
			t.Errorf("RotateKey %v, want the new public key and generation 1", req)
		}
	}
	if id, err := stateDir(t, dir).Identity(); err != nil || id.KeyGeneration != 1 {
		t.Errorf("identity key generation %d (%v), want 1", id.KeyGeneration, err)
	}
	if _, err := os.Stat(filepath.Join(dir, statefile.NextWireGuardKeyFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pending key left: %v", err)
	}

	// The same generation again: nothing. A new one: another key.
	pb5 := withRotation(5, 1)
	c.push <- fullUpdate(pb5)
	eventually(t, "revision 5", func() bool { rep := c.lastReport(); return rep != nil && rep.GetAppliedRevision() == 5 })
	pb6 := withRotation(6, 2)
	c.push <- fullUpdate(pb6)
	eventually(t, "second rotation", func() bool {
		st, _ := r.dp.State()
		return st.PrivateKey != newKey && st.PrivateKey != old && st.PrivateKey == wgKeyOnDisk(t, dir)
	})
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.rotates) != 3 || c.rotates[2].GetGeneration() != 2 || bytes.Equal(c.rotates[2].GetPublicKey(), pub[:]) {
		t.Fatalf("RotateKey calls %v, want a third one for generation 2 with another key", c.rotates)
	}
}

// TestKeyRotationAfterRestart: a rotation interrupted by a restart is finished:
// with its generation not recorded, the RPC is retried with the pending key (not a
// new one); with its generation recorded, the pending key is installed without an
// RPC.
func TestKeyRotationAfterRestart(t *testing.T) {
	tests := []struct {
		name     string
		recorded bool
		rpcs     int
	}{
		{name: "controller not yet told", rpcs: 1},
		{name: "generation recorded, rename missing", recorded: true, rpcs: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newController(t)
			pb := withRotation(3, 1)
			dir := enrolled(t, c, wireNetmap(3, 0))
			d := stateDir(t, dir)
			if err := d.SaveNetmap(pb); err != nil {
				t.Fatal(err)
			}
			pending, _, err := d.NextWireGuardKey()
			if err != nil {
				t.Fatal(err)
			}
			if tt.recorded {
				id, _ := d.Identity()
				id.KeyGeneration = 1
				if err := d.SaveIdentity(id); err != nil {
					t.Fatal(err)
				}
			}
			c.mu.Lock()
			c.rotates = nil
			c.mu.Unlock()
			c.setNetmap(pb)
			r := start(t, Options{StateDir: dir})
			eventually(t, "pending key programmed", func() bool {
				st, _ := r.dp.State()
				return st.PrivateKey == dataplane.Key(pending) && wgKeyOnDisk(t, dir) == dataplane.Key(pending)
			})
			eventually(t, "reported", func() bool { rep := c.lastReport(); return rep != nil && rep.GetAppliedHash() == pb.GetHash() })
			c.mu.Lock()
			defer c.mu.Unlock()
			if len(c.rotates) != tt.rpcs {
				t.Fatalf("%d RotateKey calls, want %d", len(c.rotates), tt.rpcs)
			}
			pub := pending.PublicKey()
			for _, req := range c.rotates {
				if !bytes.Equal(req.GetPublicKey(), pub[:]) || req.GetGeneration() != 1 {
					t.Errorf("RotateKey %v, want the pending key and generation 1", req)
				}
			}
		})
	}
}

// TestStartFinishesInterruptedRenewal: a crash after node.crt was written but
// before tls.key.next was renamed over tls.key leaves a pair the agent completes at
// start, and it connects with the renewed certificate.
func TestStartFinishesInterruptedRenewal(t *testing.T) {
	c := newController(t)
	pb := wireNetmap(3, 0)
	dir := enrolled(t, c, pb)
	d := stateDir(t, dir)
	next, err := d.NewNextTLSKey()
	if err != nil {
		t.Fatal(err)
	}
	id, err := d.Identity()
	if err != nil {
		t.Fatal(err)
	}
	renewed := c.ca.ClientCert(t, "web-1", next)
	if err := d.SaveEnrollment(id, c.ca.DER, renewed); err != nil { // writes node.crt, not tls.key
		t.Fatal(err)
	}
	start(t, Options{StateDir: dir})
	eventually(t, "stream with the renewed certificate", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		s := c.presented["stream"]
		return len(s) > 0 && s[len(s)-1] == certID(renewed)
	})
	if k, err := stateDir(t, dir).TLSKey(); err != nil || !k.Equal(next) {
		t.Fatalf("tls.key is not the renewed key (%v)", err)
	}
}

// TestGossipAdvertisesNewKeys: after a key rotation the agent's gossip claim
// carries the new WireGuard public key, and after a renewal it is signed with the
// new TLS key, so that peers (whose netmaps the controller updates) keep counting
// the node.
func TestGossipAdvertisesNewKeys(t *testing.T) {
	logger := slog.New(slog.DiscardHandler)
	a := newGossipAgent(t, logger)
	nm, err := netmap.Parse(wireNetmap(1, freePort(t)))
	if err != nil {
		t.Fatal(err)
	}
	b := startMember(t, "b", 2, netip.MustParseAddrPort("198.51.100.2:51820"))
	// sees reports whether b sees web-1 advertising WireGuard key wg, signed by sig.
	sees := func(wg dataplane.Key, sig *ecdsa.PrivateKey) func() bool {
		return func() bool {
			if _, err := b.Join([]netip.AddrPort{a.gossip.LocalAddr()}); err != nil {
				return false
			}
			for _, m := range b.Members() {
				if m.Name == "web-1" && m.Claim.PublicKey == publicKey(wg) && m.Claim.Verify(&sig.PublicKey) {
					return true
				}
			}
			return false
		}
	}
	a.gossipStep(nm)
	eventually(t, "the first claim", sees(dkey(1), identities[1]))

	a.mu.Lock()
	a.wgKey = dkey(5) // what commitKey does
	a.mu.Unlock()
	a.gossipStep(nm)
	eventually(t, "the claim with the rotated WireGuard key", sees(dkey(5), identities[1]))

	a.setCertificate(&tls.Certificate{}, identities[3]) // what renew does
	a.gossipStep(nm)
	eventually(t, "the claim signed with the renewed TLS key", sees(dkey(5), identities[3]))
}
