package gossip

import (
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"segmesh/agent/internal/testlog"
)

// memberAddr returns the gossip address m lists for member name.
func memberAddr(m *Manager, name string) netip.AddrPort {
	for _, mem := range m.Members() {
		if mem.Name == name {
			return mem.Addr
		}
	}
	return netip.AddrPort{}
}

// crash stops m's memberlist without leaving, as a killed process would.
func crash(t *testing.T, m *Manager) {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	m.logs.stopping.Store(true)
	if err := m.ml.Shutdown(); err != nil {
		t.Fatal(err)
	}
	m.ml, m.delegate, m.cfg, m.logs = nil, nil, Config{}, nil
}

// TestMovedMemberIsSeenAtOnce (issue 10, roaming defect 2): a member that comes
// back under its name from another address is seen there, with its new claim,
// within seconds, whether it left the old address gracefully (a restart after
// its address changed) or not (it crashed, or its leave was lost); memberlist
// alone calls that a conflict until the old entry is dead plus 10 s.
func TestMovedMemberIsSeenAtOnce(t *testing.T) {
	const within = 3 * time.Second
	for _, how := range []string{"graceful", "without leave"} {
		t.Run(how, func(t *testing.T) {
			a := newManager(t, Config{NodeName: "a", BindAddr: loopback, Key: testKey(1), IdentityKey: testIdentity, Meta: metaFor(1, "192.0.2.1:51820")})
			bcfg := Config{NodeName: "b", BindAddr: loopback, Key: testKey(1), IdentityKey: testIdentity, Meta: metaFor(2, "192.0.2.2:51820")}
			b := newManager(t, bcfg)
			if _, err := b.Join([]netip.AddrPort{a.LocalAddr()}); err != nil {
				t.Fatal(err)
			}
			eventually(t, "a sees b", func() bool { _, ok := memberMeta(a, "b"); return ok })
			old := b.LocalAddr()

			// b moves: another port stands for another address (the old one
			// answers nothing any more), and a new endpoint.
			moved := bcfg
			moved.Port = freeUDPPort(t)
			moved.Meta = metaFor(2, "198.51.100.2:51820")
			switch how {
			case "graceful":
				if err := b.Configure(moved); err != nil {
					t.Fatal(err)
				}
			case "without leave":
				crash(t, b)
				b = NewManager(slog.New(slog.NewTextHandler(&testlog.Buffer{}, nil)), nil)
				t.Cleanup(b.Stop)
				if err := b.Configure(moved); err != nil {
					t.Fatal(err)
				}
			}
			start := time.Now()
			if _, err := b.Join([]netip.AddrPort{a.LocalAddr()}); err != nil {
				t.Fatal(err)
			}
			eventually(t, "a sees b's new claim and address", func() bool {
				m, ok := memberMeta(a, "b")
				return ok && m.Endpoint == moved.Meta.Endpoint && memberAddr(a, "b") == b.LocalAddr()
			})
			if took := time.Since(start); took > within {
				t.Errorf("a saw b at its new address %v after %v, want within %v (old address %v)", b.LocalAddr(), took, within, old)
			}
		})
	}
}

// freeUDPPort returns a port free for UDP and TCP on the wildcard address.
func freeUDPPort(t *testing.T) int {
	t.Helper()
	m := NewManager(slog.New(slog.NewTextHandler(&testlog.Buffer{}, nil)), nil)
	if err := m.Configure(Config{NodeName: "probe", BindAddr: loopback, Key: testKey(3), IdentityKey: testIdentity, Meta: metaFor(9, "192.0.2.9:1")}); err != nil {
		t.Fatal(err)
	}
	port := m.LocalAddr().Port()
	m.Stop()
	return int(port)
}
