package gossip

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"log/slog"
	"net/netip"
	"segmesh/agent/internal/testlog"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/memberlist"
)

var loopback = netip.MustParseAddr("127.0.0.1")

// testIdentity signs every test member's claims.
var testIdentity = func() *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	return k
}()

func newIdentity(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func testKey(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

func metaFor(b byte, ep string) Meta {
	var m Meta
	for i := range m.PublicKey {
		m.PublicKey[i] = b
	}
	m.Endpoint = netip.MustParseAddrPort(ep)
	return m
}

func newManager(t *testing.T, cfg Config) *Manager {
	t.Helper()
	m := NewManager(slog.New(slog.NewTextHandler(&testlog.Buffer{}, nil)), nil)
	if err := m.Configure(cfg); err != nil {
		t.Fatalf("Configure(%s): %v", cfg.NodeName, err)
	}
	t.Cleanup(m.Stop)
	return m
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func memberMeta(m *Manager, name string) (Meta, bool) {
	for _, mem := range m.Members() {
		if mem.Name == name {
			if !mem.Claim.Verify(&testIdentity.PublicKey) || mem.Claim.Name != name {
				return Meta{}, false
			}
			return mem.Claim.Meta, true
		}
	}
	return Meta{}, false
}

func TestClaimSignVerifyEncode(t *testing.T) {
	other := newIdentity(t)
	ts := time.Unix(1700000000, 42)
	signed := func(name string, m Meta) Claim {
		c, err := SignClaim(name, m, ts, testIdentity)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	good := signed("web-1", metaFor(1, "192.0.2.1:51820"))
	tests := []struct {
		name  string
		claim Claim
		key   *ecdsa.PublicKey
		want  bool
	}{
		{name: "valid", claim: good, key: &testIdentity.PublicKey, want: true},
		{name: "valid IPv6", claim: signed("db-1", metaFor(2, "[2001:db8::1]:4000")), key: &testIdentity.PublicKey, want: true},
		{name: "valid without endpoint", claim: signed("db-1", Meta{PublicKey: metaFor(3, "1.2.3.4:5").PublicKey}), key: &testIdentity.PublicKey, want: true},
		{name: "longest name", claim: signed(strings.Repeat("n", maxNameLen), metaFor(2, "[2001:db8:1:2:3:4:5:6]:65535")), key: &testIdentity.PublicKey, want: true},
		{name: "another key", claim: good, key: &other.PublicKey},
		{name: "no key", claim: good},
		{name: "tampered endpoint", claim: func() Claim { c := good; c.Endpoint = netip.MustParseAddrPort("203.0.113.1:51820"); return c }(), key: &testIdentity.PublicKey},
		{name: "tampered name", claim: func() Claim { c := good; c.Name = "web-2"; return c }(), key: &testIdentity.PublicKey},
		{name: "tampered key", claim: func() Claim { c := good; c.PublicKey[0] ^= 1; return c }(), key: &testIdentity.PublicKey},
		{name: "tampered timestamp", claim: func() Claim { c := good; c.Timestamp++; return c }(), key: &testIdentity.PublicKey},
		{name: "no signature", claim: func() Claim { c := good; c.Signature = nil; return c }(), key: &testIdentity.PublicKey},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.claim.Verify(tt.key); got != tt.want {
				t.Fatalf("Verify = %v, want %v", got, tt.want)
			}
			if !tt.want {
				return
			}
			b := tt.claim.Encode()
			if len(b) > memberlist.MetaMaxSize {
				t.Fatalf("encoded claim has %d bytes, limit %d", len(b), memberlist.MetaMaxSize)
			}
			got, err := DecodeClaim(b)
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tt.claim, got, cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); d != "" {
				t.Fatalf("round trip (-want +got):\n%s", d)
			}
			if !got.Verify(tt.key) {
				t.Fatal("decoded claim does not verify")
			}
		})
	}
	if _, err := SignClaim(strings.Repeat("n", maxNameLen+1), metaFor(1, "192.0.2.1:1"), ts, testIdentity); err == nil {
		t.Error("SignClaim accepted a name longer than the limit")
	}
	for _, bad := range []string{"", "{}", `{"k":"AAAA","s":"AA=="}`, `{"k":"` + strings.Repeat("A", 43) + `=","e":"nope","s":"AA=="}`, `{"k":"` + strings.Repeat("A", 43) + `="}`} {
		if _, err := DecodeClaim([]byte(bad)); err == nil {
			t.Errorf("DecodeClaim(%q) succeeded", bad)
		}
	}
}

func TestConfigureNeedsIdentityKey(t *testing.T) {
	m := NewManager(slog.New(slog.NewTextHandler(&testlog.Buffer{}, nil)), nil)
	t.Cleanup(m.Stop)
	if err := m.Configure(Config{NodeName: "a", BindAddr: loopback, Key: testKey(1), Meta: metaFor(1, "192.0.2.1:51820")}); err == nil || !strings.Contains(err.Error(), "identity key") {
		t.Fatalf("Configure without an identity key = %v, want an error", err)
	}
}

func TestClusterSeesMetaAndUpdates(t *testing.T) {
	a := newManager(t, Config{NodeName: "a", BindAddr: loopback, Key: testKey(1), IdentityKey: testIdentity, Meta: metaFor(1, "192.0.2.1:51820")})
	b := newManager(t, Config{NodeName: "b", BindAddr: loopback, Key: testKey(1), IdentityKey: testIdentity, Meta: metaFor(2, "192.0.2.2:51820")})
	if n, err := b.Join([]netip.AddrPort{a.LocalAddr()}); err != nil || n != 1 {
		t.Fatalf("Join = %d, %v", n, err)
	}
	eventually(t, "a sees b", func() bool { m, ok := memberMeta(a, "b"); return ok && m == metaFor(2, "192.0.2.2:51820") })
	eventually(t, "b sees a", func() bool { _, ok := memberMeta(b, "a"); return ok })
	if n, err := b.Join([]netip.AddrPort{a.LocalAddr()}); err != nil || n != 0 {
		t.Fatalf("second Join of a known member = %d, %v; want 0, nil", n, err)
	}

	// Only the endpoint changes: metadata is re-advertised without a restart.
	b.mu.Lock()
	before := b.ml
	b.mu.Unlock()
	if err := b.Configure(Config{NodeName: "b", BindAddr: loopback, Key: testKey(1), IdentityKey: testIdentity, Meta: metaFor(2, "198.51.100.2:40000")}); err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	after := b.ml
	b.mu.Unlock()
	if before != after {
		t.Fatal("a metadata change restarted memberlist")
	}
	eventually(t, "a sees b's new endpoint", func() bool {
		m, ok := memberMeta(a, "b")
		return ok && m.Endpoint == netip.MustParseAddrPort("198.51.100.2:40000")
	})

	// A new key restarts gossip: b is no longer in a's cluster.
	if err := b.Configure(Config{NodeName: "b", BindAddr: loopback, Key: testKey(2), IdentityKey: testIdentity, Meta: metaFor(2, "198.51.100.2:40000")}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a drops b after its key change", func() bool { _, ok := memberMeta(a, "b"); return !ok })
	if _, err := b.Join([]netip.AddrPort{a.LocalAddr()}); err == nil {
		t.Fatal("joining a cluster with another key succeeded")
	}

	// An empty key stops gossip.
	if err := b.Configure(Config{NodeName: "b"}); err != nil {
		t.Fatal(err)
	}
	if b.LocalAddr().IsValid() || b.Members() != nil {
		t.Fatal("gossip still running after an empty key")
	}
}

func TestWrongKeyCannotJoin(t *testing.T) {
	a := newManager(t, Config{NodeName: "a", BindAddr: loopback, Key: testKey(1), IdentityKey: testIdentity, Meta: metaFor(1, "192.0.2.1:51820")})
	c := newManager(t, Config{NodeName: "c", BindAddr: loopback, Key: testKey(9), IdentityKey: testIdentity, Meta: metaFor(3, "192.0.2.3:51820")})
	if _, err := c.Join([]netip.AddrPort{a.LocalAddr()}); err == nil {
		t.Fatal("join with a wrong key succeeded")
	}
	if len(a.Members()) != 0 {
		t.Fatalf("a has members %v after a join with a wrong key", a.Members())
	}
}

func TestLogWriterLevels(t *testing.T) {
	const closedPing = "[ERR] memberlist: Failed to send UDP ping: write udp 127.0.0.1:7946->127.0.0.1:7947: use of closed network connection"
	tests := []struct {
		in, level, msg string
		stopping       bool // memberlist is shutting down
	}{
		{in: "[DEBUG] memberlist: Stream connection from=1.2.3.4", level: "DEBUG", msg: "Stream connection from=1.2.3.4"},
		{in: "[WARN] memberlist: Was able to connect", level: "WARN", msg: "Was able to connect"},
		{in: "[ERR] memberlist: Failed to send", level: "ERROR", msg: "Failed to send"},
		{in: "[INFO] memberlist: Suspect b", level: "INFO", msg: "Suspect b"},
		{in: "plain line", level: "INFO", msg: "plain line"},
		{in: closedPing, level: "ERROR", msg: "Failed to send UDP ping"},
		{in: closedPing, level: "DEBUG", msg: "Failed to send UDP ping", stopping: true},
		{in: "[ERR] memberlist: Failed to send gossip to 127.0.0.1:7947: use of closed network connection", level: "DEBUG", msg: "Failed to send gossip", stopping: true},
		{in: "[ERR] memberlist: Failed to send UDP ping: write udp: network is unreachable", level: "ERROR", msg: "network is unreachable", stopping: true},
	}
	for _, tt := range tests {
		var buf testlog.Buffer
		w := &logWriter{log: slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))}
		w.stopping.Store(tt.stopping)
		if _, err := w.Write([]byte(tt.in + "\n")); err != nil {
			t.Fatal(err)
		}
		got := buf.String()
		if !strings.Contains(got, "level="+tt.level) || !strings.Contains(got, tt.msg) || strings.Contains(got, "memberlist:") {
			t.Errorf("%q logged as %q, want level %s and message %q", tt.in, got, tt.level, tt.msg)
		}
	}
}

// TestStopDemotesClosedSocketErrors checks that Stop marks the running instance's log
// sink as stopping (before memberlist's Shutdown closes its sockets while probes may
// still be in flight), so those errors do not reach the log as ERROR.
func TestStopDemotesClosedSocketErrors(t *testing.T) {
	var buf testlog.Buffer
	m := NewManager(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})), nil)
	if err := m.Configure(Config{NodeName: "a", BindAddr: loopback, Key: testKey(1), IdentityKey: testIdentity, Meta: metaFor(1, "192.0.2.1:51820")}); err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	lw := m.logs
	m.mu.Unlock()
	if lw == nil || lw.stopping.Load() {
		t.Fatal("running instance has no log sink or is already stopping")
	}
	m.Stop()
	if !lw.stopping.Load() {
		t.Fatal("Stop did not mark the log sink as stopping")
	}
	// What memberlist's probe goroutine logs when it loses the race with Shutdown.
	if _, err := lw.Write([]byte("[ERR] memberlist: Failed to send UDP ping: write udp 127.0.0.1:1->127.0.0.1:2: use of closed network connection\n")); err != nil {
		t.Fatal(err)
	}
	logs := buf.String()
	if strings.Contains(logs, "level=ERROR") {
		t.Errorf("stopping logged an error:\n%s", logs)
	}
	if !strings.Contains(logs, `msg="gossip stopped"`) {
		t.Errorf("Stop was not logged:\n%s", logs)
	}
}
