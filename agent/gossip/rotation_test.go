package gossip

import (
	"net/netip"
	"testing"
)

// TestRotatedKeyShutsOutRevokedMember is the gossip half of revocation (issue 6):
// three members share a key; the controller revokes r and gives the others a new
// key. From then on r, which keeps the old key, can neither join nor see them,
// and they do not list r.
func TestRotatedKeyShutsOutRevokedMember(t *testing.T) {
	cfg := func(name string, key byte, ep string) Config {
		return Config{NodeName: name, BindAddr: loopback, Key: testKey(key), IdentityKey: testIdentity, Meta: metaFor(key, ep)}
	}
	a := newManager(t, cfg("a", 1, "192.0.2.1:51820"))
	b := newManager(t, cfg("b", 1, "192.0.2.2:51820"))
	r := newManager(t, cfg("r", 1, "192.0.2.3:51820"))
	for _, m := range []*Manager{b, r} {
		if _, err := m.Join([]netip.AddrPort{a.LocalAddr()}); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "a sees b and r", func() bool {
		_, okB := memberMeta(a, "b")
		_, okR := memberMeta(a, "r")
		return okB && okR
	})

	// Rotation: a and b get key 2 (the netmaps of the remaining nodes), r keeps 1.
	for _, m := range []struct {
		m    *Manager
		name string
		ep   string
	}{{a, "a", "192.0.2.1:51820"}, {b, "b", "192.0.2.2:51820"}} {
		if err := m.m.Configure(cfg(m.name, 2, m.ep)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.Join([]netip.AddrPort{a.LocalAddr()}); err != nil {
		t.Fatalf("members with the new key cannot join each other: %v", err)
	}
	eventually(t, "a sees b under the new key", func() bool { _, ok := memberMeta(a, "b"); return ok })
	if _, err := r.Join([]netip.AddrPort{a.LocalAddr()}); err == nil {
		t.Fatal("the revoked member joined with the old key")
	}
	if _, err := r.Join([]netip.AddrPort{b.LocalAddr()}); err == nil {
		t.Fatal("the revoked member joined b with the old key")
	}
	for _, m := range []*Manager{a, b} {
		if _, ok := memberMeta(m, "r"); ok {
			t.Errorf("a member with the new key lists the revoked member")
		}
	}
	eventually(t, "r no longer sees a or b", func() bool {
		_, okA := memberMeta(r, "a")
		_, okB := memberMeta(r, "b")
		return !okA && !okB
	})
}
