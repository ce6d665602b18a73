package relay

import (
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/crypto/curve25519"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"
)

type wgNode struct {
	tun     *tuntest.ChannelTUN
	dev     *device.Device
	priv    [32]byte
	pub     [32]byte
	overlay netip.Addr
}

func newWGNode(t *testing.T, overlay string) *wgNode {
	t.Helper()
	n := &wgNode{tun: tuntest.NewChannelTUN(), priv: randKey(t), overlay: netip.MustParseAddr(overlay)}
	n.priv[0] &= 248
	n.priv[31] = (n.priv[31] & 127) | 64
	pub, err := curve25519.X25519(n.priv[:], curve25519.Basepoint)
	if err != nil {
		t.Fatal(err)
	}
	copy(n.pub[:], pub)
	n.dev = device.NewDevice(n.tun.TUN(), conn.NewDefaultBind(), device.NewLogger(device.LogLevelSilent, ""))
	t.Cleanup(n.dev.Close)
	return n
}

// configure points n at peer through relayPort. Both ends keep alive: the
// relay latches an end only from its own handshake, so each must send one.
func (n *wgNode) configure(t *testing.T, peer *wgNode, relayPort uint16) {
	t.Helper()
	cfg := fmt.Sprintf("private_key=%s\nlisten_port=0\nreplace_peers=true\npublic_key=%s\nprotocol_version=1\npersistent_keepalive_interval=1\nendpoint=127.0.0.1:%d\nallowed_ip=%s/32\n",
		hex.EncodeToString(n.priv[:]), hex.EncodeToString(peer.pub[:]), relayPort, peer.overlay)
	if err := n.dev.IpcSet(cfg); err != nil {
		t.Fatalf("IpcSet: %v", err)
	}
	if err := n.dev.Up(); err != nil {
		t.Fatalf("Up: %v", err)
	}
}

func TestWireGuardThroughRelay(t *testing.T) {
	for _, tc := range []struct {
		name       string
		authorised bool
	}{
		{"authorised pair", true},
		{"other pair", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := newWGNode(t, "10.99.0.1"), newWGNode(t, "10.99.0.2")
			f := New(Options{ListenAddr: loopback, Logger: slog.New(slog.DiscardHandler)})
			defer f.Close()
			p := freePorts(t, 2)
			s := Session{ID: 1, KeyA: a.pub, KeyB: b.pub, PortA: p[0], PortB: p[1], Expires: time.Now().Add(time.Hour)}
			if !tc.authorised {
				s.KeyA, s.KeyB = randKey(t), randKey(t)
			}
			if err := f.Set([]Session{s}); err != nil {
				t.Fatal(err)
			}
			a.configure(t, b, p[0])
			b.configure(t, a, p[1])
			ping := tuntest.Ping(b.overlay, a.overlay)
			deadline := time.After(3 * time.Second)
			tick := time.NewTicker(200 * time.Millisecond)
			defer tick.Stop()
			a.tun.Outbound <- ping
			for {
				select {
				case got := <-b.tun.Inbound:
					if !tc.authorised {
						t.Fatal("packet arrived through a relay session for another pair")
					}
					if string(got) != string(ping) {
						t.Fatalf("got %x, want %x", got, ping)
					}
					return
				case <-tick.C:
					a.tun.Outbound <- ping
				case <-deadline:
					if tc.authorised {
						t.Fatalf("no packet within deadline; stats %+v", f.Stats())
					}
					// The relay counts drops in its own goroutines: wait
					// for the first mac1 drop rather than read them once.
					st := waitStat(t, f, func(s Stats) bool { return s.Dropped[DropMAC1.String()] > 0 })
					if st.Packets != 0 {
						t.Fatalf("other pair: stats %+v, want no forwarding and mac1 drops", st)
					}
					return
				}
			}
		})
	}
}
