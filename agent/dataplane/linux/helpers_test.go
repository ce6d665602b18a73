package linux

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux/internal/nstest"
	"segmesh/policy"
)

var cmpOpts = cmp.Options{
	cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
	cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b }),
	cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
}

var (
	overlay4 = netip.MustParsePrefix("100.64.0.0/10")
	overlay6 = netip.MustParsePrefix("fd5e:6d65:7368::/48")
)

// recorder is a slog.Handler that keeps the messages of records at Info and above.
type recorder struct {
	mu   sync.Mutex
	msgs []string
}

func (r *recorder) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelInfo }
func (r *recorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, rec.Message)
	return nil
}
func (r *recorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *recorder) WithGroup(string) slog.Handler      { return r }

// take returns and forgets the recorded messages.
func (r *recorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.msgs
	r.msgs = nil
	return m
}

// node is one host: a namespace, a Dataplane in it, and its addresses.
type node struct {
	ns       nstest.NS
	dp       *Dataplane
	iface    string
	key      wgtypes.Key
	underlay netip.Addr
	v4, v6   netip.Addr
	log      *recorder
}

// newDataplane creates a userspace Dataplane inside ns; t.Cleanup tears it down.
func newDataplane(t testing.TB, ns nstest.NS, iface string, log *recorder) *Dataplane {
	t.Helper()
	var h slog.Handler = slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})
	if log != nil {
		h = log
	}
	var dp *Dataplane
	ns.Do(t, func() (err error) {
		dp, err = New(Options{Interface: iface, ForceUserspace: true, Logger: slog.New(h)})
		return err
	})
	t.Cleanup(func() {
		if err := dp.Down(context.Background()); err != nil && err != ErrClosed {
			t.Errorf("Down: %v", err)
		}
		dp.Close()
	})
	return dp
}

func newNode(t testing.TB, ns nstest.NS, underlay netip.Addr, hostByte byte) *node {
	t.Helper()
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	n := &node{ns: ns, iface: nstest.IfaceName(t), key: key, underlay: underlay, log: &recorder{},
		v4: netip.AddrFrom4([4]byte{100, 64, 0, hostByte}),
		v6: netip.MustParseAddr(fmt.Sprintf("fd5e:6d65:7368::%x", hostByte))}
	n.dp = newDataplane(t, ns, n.iface, n.log)
	return n
}

// newPair returns two nodes in two namespaces joined by a veth pair (192.0.2.1/24 and
// 192.0.2.2/24), overlay addresses 100.64.0.1/.2 and fd5e:6d65:7368::1/::2.
func newPair(t testing.TB) (*node, *node) {
	t.Helper()
	nsA, nsB := nstest.New(t), nstest.New(t)
	ua, ub := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	nsA.Do(t, func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "ula"}, PeerName: "ulb", PeerNamespace: netlink.NsFd(nsB.Handle)}
		return netlink.LinkAdd(veth)
	})
	for _, x := range []struct {
		ns   nstest.NS
		name string
		addr netip.Addr
	}{{nsA, "ula", ua}, {nsB, "ulb", ub}} {
		x.ns.Do(t, func() error {
			l, err := netlink.LinkByName(x.name)
			if err != nil {
				return err
			}
			if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: ipNetPtr(netip.PrefixFrom(x.addr, 24))}); err != nil {
				return err
			}
			return netlink.LinkSetUp(l)
		})
	}
	return newNode(t, nsA, ua, 1), newNode(t, nsB, ub, 2)
}

// state returns n's desired state with peer (if any) and filter f.
func (n *node) state(f policy.Filter, peers ...*node) dataplane.State {
	s := dataplane.State{
		Interface:  n.iface,
		PrivateKey: dataplane.Key(n.key),
		ListenPort: 51820,
		Addresses:  []netip.Prefix{netip.PrefixFrom(n.v4, 32), netip.PrefixFrom(n.v6, 128)},
		Routes:     []netip.Prefix{overlay4, overlay6},
		MTU:        1420,
		Filter:     f,
	}
	for _, p := range peers {
		s.Peers = append(s.Peers, dataplane.Peer{
			PublicKey:  dataplane.Key(p.key.PublicKey()),
			Endpoint:   netip.AddrPortFrom(p.underlay, 51820),
			AllowedIPs: []netip.Prefix{netip.PrefixFrom(p.v4, 32), netip.PrefixFrom(p.v6, 128)},
		})
	}
	return s
}

// apply applies s and checks that Read returns exactly Canonical(s).
func (n *node) apply(t testing.TB, s dataplane.State) {
	t.Helper()
	ctx := context.Background()
	if err := n.dp.Apply(ctx, s); err != nil {
		t.Fatalf("Apply on %s: %v", n.iface, err)
	}
	checkRead(t, n.dp, s)
}

func checkRead(t testing.TB, dp *Dataplane, s dataplane.State) {
	t.Helper()
	obs, err := dp.Read(context.Background())
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	got := obs.State
	if d := cmp.Diff(dataplane.Canonical(s), got, cmpOpts); d != "" || got.PrivateKey != s.PrivateKey {
		t.Fatalf("Read differs from applied state (-want +got):\n%s", d)
	}
	if len(obs.Drift) > 0 {
		t.Fatalf("Read reports drift right after Apply: %v", obs.Drift)
	}
}

// listen accepts TCP connections on addr:port inside n's namespace until the test ends.
func (n *node) listen(t testing.TB, addr netip.Addr, port uint16) {
	t.Helper()
	var l net.Listener
	n.ns.Do(t, func() (err error) {
		l, err = net.Listen("tcp", netip.AddrPortFrom(addr, port).String())
		return err
	})
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("ok"))
			c.Close()
		}
	}()
}

// dial connects from n's namespace to addr:port and reads the server's greeting.
func (n *node) dial(addr netip.Addr, port uint16, timeout time.Duration) error {
	return n.ns.Run(func() error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(addr, port).String(), timeout)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		buf := make([]byte, 2)
		if _, err := c.Read(buf); err != nil || string(buf) != "ok" {
			return fmt.Errorf("reading greeting: %q, %v", buf, err)
		}
		return nil
	})
}

// ping sends one ICMP(v6) echo request from n's namespace.
func (n *node) ping(addr netip.Addr) error {
	out, err := n.ns.Exec("ping", "-c", "1", "-W", "1", addr.String())
	if err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	return nil
}

// eventually polls f until it returns nil or the deadline passes.
func eventually(t testing.TB, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %v: %v", what, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// peerInfo reads n's WireGuard peer with key k through wgctrl (UAPI socket).
func (n *node) peerInfo(t testing.TB, k wgtypes.Key) wgtypes.Peer {
	t.Helper()
	c, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dev, err := c.Device(n.iface)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range dev.Peers {
		if p.PublicKey == k {
			return p
		}
	}
	t.Fatalf("%s has no peer %s", n.iface, k)
	return wgtypes.Peer{}
}

func hasPrefix(msgs []string, prefix string) bool {
	for _, m := range msgs {
		if strings.HasPrefix(m, prefix) {
			return true
		}
	}
	return false
}
