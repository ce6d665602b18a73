package linux

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux/internal/nstest"
	"segmesh/policy"
)

func allow(set string, ms ...policy.PortMatch) policy.FilterRule {
	return policy.FilterRule{Set: set, Origin: "test rule " + set, Matches: ms}
}

func tcpPort(p uint16) policy.PortMatch {
	return policy.PortMatch{Protocol: policy.ProtoTCP, Ports: []policy.PortRange{{First: p, Last: p}}}
}

var icmp = policy.PortMatch{Protocol: policy.ProtoICMP}

// peerSet is an address set holding the given node addresses.
func peerSet(name string, addrs ...netip.Addr) policy.AddressSet {
	s := policy.AddressSet{Name: name}
	for _, a := range addrs {
		s.Prefixes = append(s.Prefixes, netip.PrefixFrom(a, a.BitLen()))
	}
	return s
}

// TestOverlayEnforcesFilter sends real packets through two wireguard-go dataplanes in
// two namespaces and checks that the filters decide what passes.
func TestOverlayEnforcesFilter(t *testing.T) {
	a, b := newPair(t)

	// probe is one connectivity check from one node to another.
	type probe struct {
		name     string
		from, to *node
		dst      netip.Addr
		port     uint16 // 0: ICMP echo
		want     bool
	}
	run := func(t *testing.T, probes []probe) {
		t.Helper()
		// Positive probes first, polled (the first packets wait for the handshake);
		// then negative ones, each one attempt over the proven tunnel.
		slices.SortStableFunc(probes, func(x, y probe) int {
			switch {
			case x.want == y.want:
				return 0
			case x.want:
				return -1
			}
			return 1
		})
		for _, p := range probes {
			try := func() error {
				if p.port == 0 {
					return p.from.ping(p.dst)
				}
				return p.from.dial(p.dst, p.port, time.Second)
			}
			if p.want {
				eventually(t, 15*time.Second, p.name, try)
			} else if err := try(); err == nil {
				t.Errorf("%s: passed, want blocked", p.name)
			}
		}
	}

	// The filter of a node allows from/to the set "peer", which holds the other
	// node's addresses.
	aSet := peerSet("peer", b.v4, b.v6)
	bSet := peerSet("peer", a.v4, a.v6)
	aFilter := policy.Filter{Sets: []policy.AddressSet{aSet},
		Egress: []policy.FilterRule{allow("peer", tcpPort(8080), tcpPort(9090), icmp)}}
	bFilter := policy.Filter{Sets: []policy.AddressSet{bSet},
		Ingress: []policy.FilterRule{allow("peer", tcpPort(8080), icmp)}}
	a.apply(t, a.state(aFilter, b))
	b.apply(t, b.state(bFilter, a))
	if msgs := a.log.take(); !hasPrefix(msgs, "programmed nftables") || !hasPrefix(msgs, "configured WireGuard") {
		t.Fatalf("first Apply logged %q, want its changes", msgs)
	}
	for _, port := range []uint16{8080, 9090} {
		b.listen(t, b.v4, port)
		b.listen(t, b.v6, port)
		a.listen(t, a.v4, port)
	}

	t.Run("wg show", func(t *testing.T) {
		// The UAPI socket serves wg(8) like a kernel device.
		out := a.ns.MustExec(t, "wg", "show", a.iface)
		if !strings.Contains(out, "peer: "+b.key.PublicKey().String()) || !strings.Contains(out, "listening port: 51820") {
			t.Errorf("wg show %s:\n%s", a.iface, out)
		}
	})

	t.Run("IPv6 address without DAD", func(t *testing.T) {
		a.ns.Do(t, func() error {
			link, err := netlink.LinkByName(a.iface)
			if err != nil {
				return err
			}
			addrs, err := netlink.AddrList(link, netlink.FAMILY_V6)
			if err != nil {
				return err
			}
			if len(addrs) != 1 || addrs[0].Flags&unix.IFA_F_NODAD == 0 || addrs[0].Flags&unix.IFA_F_TENTATIVE != 0 {
				t.Errorf("IPv6 addresses = %+v, want exactly %s with nodad, not tentative", addrs, a.v6)
			}
			return nil
		})
	})

	t.Run("policy", func(t *testing.T) {
		run(t, []probe{
			{"a->b tcp/8080 v4", a, b, b.v4, 8080, true},
			{"a->b tcp/8080 v6", a, b, b.v6, 8080, true},
			{"a->b icmp v4", a, b, b.v4, 0, true},
			{"a->b icmp v6", a, b, b.v6, 0, true},
			{"a->b tcp/9090 v4 (not in b's ingress)", a, b, b.v4, 9090, false},
			{"a->b tcp/9090 v6 (not in b's ingress)", a, b, b.v6, 9090, false},
			{"b->a tcp/8080 v4 (not in b's egress)", b, a, a.v4, 8080, false},
			{"b->a icmp v4 (not in b's egress)", b, a, a.v4, 0, false},
		})
	})

	// Re-applying the same states changes nothing: no log of a change, and the
	// WireGuard session keeps its handshake.
	t.Run("idempotent", func(t *testing.T) {
		hs := a.peerInfo(t, b.key.PublicKey()).LastHandshakeTime
		if hs.IsZero() {
			t.Fatal("no handshake after traffic")
		}
		// Read reports it, once the device snapshot (see device) is older
		// than the handshake: drop it rather than wait for wgCacheMaxAge.
		a.dp.mu.Lock()
		a.dp.wgCache = nil
		a.dp.mu.Unlock()
		obs, err := a.dp.Read(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		got := obs.PeerStats[dataplane.Key(b.key.PublicKey())]
		if !got.LastHandshake.Equal(hs) {
			t.Errorf("Read: handshake with b at %v, want %v as wgctrl reports", got.LastHandshake, hs)
		}
		if got.RxBytes == 0 || got.TxBytes == 0 {
			t.Errorf("Read: %d bytes received from b, %d sent, want both counted after traffic", got.RxBytes, got.TxBytes)
		}
		a.log.take()
		b.log.take()
		a.apply(t, a.state(aFilter, b))
		b.apply(t, b.state(bFilter, a))
		msgs := slices.Concat(a.log.take(), b.log.take())
		if hasPrefix(msgs, "programmed nftables") || hasPrefix(msgs, "configured WireGuard") {
			t.Errorf("second Apply changed something: %q", msgs)
		}
		if err := a.dial(b.v4, 8080, 5*time.Second); err != nil {
			t.Fatal(err)
		}
		if got := a.peerInfo(t, b.key.PublicKey()).LastHandshakeTime; !got.Equal(hs) {
			t.Errorf("handshake time changed from %v to %v: session was reset", hs, got)
		}
	})

	// An unrelated peer change (a new peer) and an endpoint-only change keep the
	// session with b.
	t.Run("unrelated peer change keeps session", func(t *testing.T) {
		hs := a.peerInfo(t, b.key.PublicKey()).LastHandshakeTime
		other, _ := wgtypes.GeneratePrivateKey()
		s := a.state(aFilter, b)
		s.Peers = append(s.Peers, dataplane.Peer{PublicKey: dataplane.Key(other.PublicKey()),
			Endpoint: netip.MustParseAddrPort("192.0.2.77:51820"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("100.64.0.77/32")},
			PersistentKeepalive: 25})
		a.apply(t, s)
		s.Peers[1].Endpoint = netip.MustParseAddrPort("192.0.2.78:51821")
		a.apply(t, s)
		if err := a.dial(b.v4, 8080, 5*time.Second); err != nil {
			t.Fatal(err)
		}
		if got := a.peerInfo(t, b.key.PublicKey()).LastHandshakeTime; !got.Equal(hs) {
			t.Errorf("handshake time changed from %v to %v: session was reset", hs, got)
		}
		a.apply(t, a.state(aFilter, b))
	})

	// The sets decide per family: with only a's IPv4 address in b's set, IPv6 from a
	// is denied while IPv4 passes.
	t.Run("family decided by set", func(t *testing.T) {
		f := bFilter
		f.Sets = []policy.AddressSet{peerSet("peer", a.v4)}
		b.apply(t, b.state(f, a))
		run(t, []probe{
			{"a->b tcp/8080 v4", a, b, b.v4, 8080, true},
			{"a->b icmp v4", a, b, b.v4, 0, true},
			{"a->b tcp/8080 v6 (a's v6 not in set)", a, b, b.v6, 8080, false},
			{"a->b icmp v6 (a's v6 not in set)", a, b, b.v6, 0, false},
		})
	})

	// With empty filters nothing passes, although the tunnel works.
	t.Run("default deny", func(t *testing.T) {
		a.apply(t, a.state(policy.Filter{}, b))
		b.apply(t, b.state(policy.Filter{}, a))
		run(t, []probe{
			{"a->b tcp/8080 v4", a, b, b.v4, 8080, false},
			{"a->b tcp/8080 v6", a, b, b.v6, 8080, false},
			{"a->b icmp v4", a, b, b.v4, 0, false},
			{"a->b icmp v6", a, b, b.v6, 0, false},
			{"b->a tcp/8080 v4", b, a, a.v4, 8080, false},
		})
		// Egress allowed on a but ingress still denied on b: packets cross the tunnel
		// (b's WireGuard receives them) and b's filter drops them.
		a.apply(t, a.state(aFilter, b))
		rx := b.peerInfo(t, a.key.PublicKey()).ReceiveBytes
		run(t, []probe{{"a->b icmp v4 (b denies)", a, b, b.v4, 0, false}})
		if got := b.peerInfo(t, a.key.PublicKey()).ReceiveBytes; got <= rx {
			t.Errorf("b received %d bytes from a before the ping and %d after: the ping never crossed the tunnel", rx, got)
		}
		b.apply(t, b.state(bFilter, a))
		run(t, []probe{{"a->b icmp v4 (b allows again)", a, b, b.v4, 0, true}})
	})
}

// TestDriftIsNoticedWatchedAndRepaired changes the kernel behind the dataplane's back
// and checks Read, Watch and Apply.
func TestDriftIsNoticedWatchedAndRepaired(t *testing.T) {
	stranger, _ := wgtypes.GeneratePrivateKey()
	tests := []struct {
		name string
		// cmd returns the command to run in the namespace.
		cmd func(n *node, peer wgtypes.Key) []string
		// event: the change is visible to netlink, nftables or UAPI notifications.
		event bool
	}{
		{"address removed", func(n *node, _ wgtypes.Key) []string {
			return []string{"ip", "addr", "del", n.v4.String() + "/32", "dev", n.iface}
		}, true},
		{"address added", func(n *node, _ wgtypes.Key) []string {
			return []string{"ip", "addr", "add", "10.9.9.9/32", "dev", n.iface}
		}, true},
		{"IPv6 address removed", func(n *node, _ wgtypes.Key) []string {
			return []string{"ip", "-6", "addr", "del", n.v6.String() + "/128", "dev", n.iface}
		}, true},
		{"route removed", func(n *node, _ wgtypes.Key) []string {
			return []string{"ip", "route", "del", overlay4.String(), "dev", n.iface}
		}, true},
		{"route added", func(n *node, _ wgtypes.Key) []string {
			return []string{"ip", "route", "add", "10.10.0.0/16", "dev", n.iface}
		}, true},
		{"link down", func(n *node, _ wgtypes.Key) []string {
			return []string{"ip", "link", "set", n.iface, "down"}
		}, true},
		{"MTU changed", func(n *node, _ wgtypes.Key) []string {
			return []string{"ip", "link", "set", n.iface, "mtu", "1300"}
		}, true},
		{"interface deleted", func(n *node, _ wgtypes.Key) []string {
			return []string{"ip", "link", "del", n.iface}
		}, true},
		{"nftables table flushed", func(*node, wgtypes.Key) []string {
			return []string{"nft", "flush", "table", "inet", "segmesh"}
		}, true},
		{"nftables rule deleted", func(*node, wgtypes.Key) []string {
			return []string{"nft", "flush", "chain", "inet", "segmesh", "ingress"}
		}, true},
		{"set element added", func(*node, wgtypes.Key) []string {
			return []string{"nft", "add", "element", "inet", "segmesh", "peer_v4", "{ 100.64.9.9 }"}
		}, true},
		{"peer removed", func(n *node, peer wgtypes.Key) []string {
			return []string{"wg", "set", n.iface, "peer", peer.String(), "remove"}
		}, true},
		{"peer endpoint changed", func(n *node, peer wgtypes.Key) []string {
			return []string{"wg", "set", n.iface, "peer", peer.String(), "endpoint", "192.0.2.99:1234"}
		}, true},
		{"peer allowed IPs changed", func(n *node, peer wgtypes.Key) []string {
			return []string{"wg", "set", n.iface, "peer", peer.String(), "allowed-ips", "100.64.0.2/32"}
		}, true},
		{"stray peer added", func(n *node, _ wgtypes.Key) []string {
			return []string{"wg", "set", n.iface, "peer", stranger.PublicKey().String(), "allowed-ips", "10.1.1.1/32"}
		}, true},
		{"listen port changed", func(n *node, _ wgtypes.Key) []string {
			return []string{"wg", "set", n.iface, "listen-port", "40001"}
		}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := nstest.New(t)
			n := newNode(t, ns, netip.MustParseAddr("192.0.2.1"), 1)
			peerKey, _ := wgtypes.GeneratePrivateKey()
			peer := &node{key: peerKey, underlay: netip.MustParseAddr("192.0.2.2"),
				v4: netip.MustParseAddr("100.64.0.2"), v6: netip.MustParseAddr("fd5e:6d65:7368::2")}
			f := policy.Filter{Sets: []policy.AddressSet{peerSet("peer", peer.v4, peer.v6)},
				Ingress: []policy.FilterRule{allow("peer", tcpPort(22), icmp)}}
			want := n.state(f, peer)
			n.apply(t, want)

			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			events, err := n.dp.Watch(ctx)
			if err != nil {
				t.Fatal(err)
			}
			ns.MustExec(t, tt.cmd(n, peerKey.PublicKey())...)

			if tt.event {
				select {
				case <-events:
				case <-time.After(5 * time.Second):
					t.Fatal("Watch did not fire")
				}
			}
			got, err := n.dp.Read(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if cmp.Equal(dataplane.Canonical(want), got.State, cmpOpts) {
				t.Fatal("Read after drift equals the desired state")
			}
			if len(got.Drift) == 0 {
				t.Fatal("Read after drift reports no differences")
			}
			n.apply(t, want)
			cancel()
			for range events { // closed after cancel
			}
		})
	}
}

// TestConvergesFromEarlierProcess applies with a second Dataplane over state left by a
// first one that has exited (closed): its stale table, and a stale interface of
// another kind that took the name meanwhile.
func TestConvergesFromEarlierProcess(t *testing.T) {
	ns := nstest.New(t)
	first := newNode(t, ns, netip.MustParseAddr("192.0.2.1"), 1)
	mkPeer := func(b byte) *node {
		k, _ := wgtypes.GeneratePrivateKey()
		return &node{key: k, underlay: netip.AddrFrom4([4]byte{192, 0, 2, b}),
			v4: netip.AddrFrom4([4]byte{100, 64, 0, b}), v6: netip.AddrFrom16([16]byte{0: 0xfd, 1: 0x5e, 15: b})}
	}
	p2, p3, p4 := mkPeer(2), mkPeer(3), mkPeer(4)
	old := first.state(policy.Filter{Sets: []policy.AddressSet{peerSet("old", p2.v4)},
		Egress: []policy.FilterRule{allow("old", tcpPort(1))}}, p2, p3)
	first.apply(t, old)

	// The first process exits: its TUN disappears, its table stays; a plain TUN
	// device without WireGuard takes the name.
	if err := first.dp.Close(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "first device gone", func() error {
		if _, err := ns.Exec("ip", "link", "show", first.iface); err == nil {
			return os.ErrExist
		}
		return nil
	})
	ns.MustExec(t, "nft", "list", "set", "inet", "segmesh", "old_v4")
	ns.MustExec(t, "ip", "tuntap", "add", "dev", first.iface, "mode", "tun")
	ns.MustExec(t, "ip", "addr", "add", "100.64.9.9/32", "dev", first.iface)

	second := *first
	second.log = &recorder{}
	second.dp = newDataplane(t, ns, first.iface, second.log)
	want := first.state(policy.Filter{Sets: []policy.AddressSet{peerSet("new", p3.v6, p4.v4)},
		Ingress: []policy.FilterRule{allow("new", icmp)}}, p3, p4)
	want.Peers[0].Endpoint = netip.MustParseAddrPort("192.0.2.33:51820")
	second.apply(t, want)
	if k := second.dp.Kind(); k != dataplane.KindUserspace {
		t.Errorf("Kind = %q", k)
	}
	if msgs := second.log.take(); !hasPrefix(msgs, "replacing interface") {
		t.Errorf("Apply over a stale TUN logged %q, want it replaced", msgs)
	}
	if _, err := os.Stat(filepath.Join("/var/run/wireguard", first.iface+".sock")); err != nil {
		t.Errorf("UAPI socket of the new device: %v", err)
	}
}

func TestDownAndClose(t *testing.T) {
	ns := nstest.New(t)
	n := newNode(t, ns, netip.MustParseAddr("192.0.2.1"), 1)
	n.apply(t, n.state(policy.Filter{}))
	ctx := context.Background()
	for i := range 2 {
		if err := n.dp.Down(ctx); err != nil {
			t.Fatalf("Down #%d: %v", i+1, err)
		}
	}
	obs, err := n.dp.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := obs.State
	if got.Interface != "" || got.Peers != nil || obs.Firewall || obs.Drift != nil || len(got.Filter.Ingress) != 0 {
		t.Errorf("Read after Down = %+v, want no interface, no table and no drift", obs)
	}
	if out, err := ns.Exec("ip", "link", "show", n.iface); err == nil {
		t.Errorf("interface still exists: %s", out)
	}
	if _, err := os.Stat(filepath.Join("/var/run/wireguard", n.iface+".sock")); !os.IsNotExist(err) {
		t.Errorf("UAPI socket after Down: %v", err)
	}
	// Apply works again after Down; Close leaves the table (it outlives the process).
	n.apply(t, n.state(policy.Filter{}))
	if err := n.dp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.dp.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := n.dp.Apply(ctx, n.state(policy.Filter{})); err != ErrClosed {
		t.Errorf("Apply after Close = %v, want ErrClosed", err)
	}
	ns.MustExec(t, "nft", "list", "table", "inet", "segmesh")
	ns.MustExec(t, "nft", "delete", "table", "inet", "segmesh")
}

func TestApplyRejectsInvalidState(t *testing.T) {
	ns := nstest.New(t)
	n := newNode(t, ns, netip.MustParseAddr("192.0.2.1"), 1)
	peerKey, _ := wgtypes.GeneratePrivateKey()
	base := func() dataplane.State {
		return n.state(policy.Filter{}, &node{key: peerKey, v4: netip.MustParseAddr("100.64.0.2"), v6: netip.MustParseAddr("fd5e:6d65:7368::2")})
	}
	tests := []struct {
		name   string
		mutate func(*dataplane.State)
	}{
		{"other interface", func(s *dataplane.State) { s.Interface = "other0" }},
		{"unmasked allowed IP", func(s *dataplane.State) {
			s.Peers[0].AllowedIPs = []netip.Prefix{netip.MustParsePrefix("100.64.0.2/10")}
		}},
		{"duplicate peer", func(s *dataplane.State) { s.Peers = append(s.Peers, s.Peers[0]) }},
		{"unmasked route", func(s *dataplane.State) { s.Routes = []netip.Prefix{netip.MustParsePrefix("100.64.0.1/10")} }},
		{"MTU too small", func(s *dataplane.State) { s.MTU = 100 }},
		{"undefined set", func(s *dataplane.State) { s.Filter.Ingress = []policy.FilterRule{allow("nope", icmp)} }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := base()
			tt.mutate(&s)
			if err := n.dp.Apply(context.Background(), s); err == nil {
				t.Fatal("Apply succeeded")
			}
		})
	}
	// Nothing was created by the rejected states.
	if out, err := ns.Exec("ip", "link", "show", n.iface); err == nil {
		t.Errorf("interface exists after rejected applies: %s", out)
	}
}

// TestKindMatchesInterface applies without ForceUserspace: the dataplane uses kernel
// WireGuard where the kernel has it and wireguard-go otherwise, and Kind says which.
func TestKindMatchesInterface(t *testing.T) {
	ns := nstest.New(t)
	iface := nstest.IfaceName(t)
	var dp *Dataplane
	ns.Do(t, func() (err error) {
		dp, err = New(Options{Interface: iface})
		return err
	})
	t.Cleanup(func() {
		if err := dp.Down(context.Background()); err != nil {
			t.Errorf("Down: %v", err)
		}
		dp.Close()
	})
	if k := dp.Kind(); k != "" {
		t.Errorf("Kind before Apply = %q, want unknown", k)
	}
	key, _ := wgtypes.GeneratePrivateKey()
	n := &node{iface: iface, key: key, v4: netip.MustParseAddr("100.64.0.1"), v6: netip.MustParseAddr("fd5e:6d65:7368::1")}
	s := n.state(policy.Filter{})
	s.MTU, s.ListenPort = 0, 0 // implementation defaults
	if err := dp.Apply(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	checkRead(t, dp, s)
	var linkType string
	var mtu int
	ns.Do(t, func() error {
		l, err := netlink.LinkByName(iface)
		if err != nil {
			return err
		}
		linkType, mtu = l.Type(), l.Attrs().MTU
		return nil
	})
	want := map[string]dataplane.Kind{"wireguard": dataplane.KindKernel, "tuntap": dataplane.KindUserspace}[linkType]
	if got := dp.Kind(); got == "" || got != want {
		t.Errorf("Kind = %q for a link of type %q", got, linkType)
	}
	if mtu != DefaultMTU {
		t.Errorf("MTU = %d, want default %d", mtu, DefaultMTU)
	}
	t.Logf("WireGuard provided by %s", dp.Kind())
}
