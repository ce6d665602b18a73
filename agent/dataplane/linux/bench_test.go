package linux

import (
	"context"
	"fmt"
	"net/netip"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux/internal/nstest"
	"segmesh/policy"
)

// bigState returns a state with n peers (IPv4 and IPv6 allowed IPs and endpoints)
// and a filter whose sets hold every peer address: the shape of a node that may
// talk to n others.
func bigState(b *testing.B, iface string, n, keepalive int) dataplane.State {
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		b.Fatal(err)
	}
	s := dataplane.State{
		Interface: iface, PrivateKey: dataplane.Key(key), ListenPort: 51820, MTU: 1420,
		Addresses: []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32"), netip.MustParsePrefix("fd5e:6d65:7368::1/128")},
		Routes:    []netip.Prefix{overlay4, overlay6},
	}
	all := policy.AddressSet{Name: "all"}
	web := policy.AddressSet{Name: "web"}
	for i := range n {
		pk, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			b.Fatal(err)
		}
		v4 := netip.AddrFrom4([4]byte{100, 64, byte((i + 2) >> 8), byte(i + 2)})
		v6 := netip.MustParseAddr(fmt.Sprintf("fd5e:6d65:7368::%x", i+2))
		p := dataplane.Peer{
			PublicKey:           dataplane.Key(pk.PublicKey()),
			Endpoint:            netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), 51820),
			AllowedIPs:          []netip.Prefix{netip.PrefixFrom(v4, 32), netip.PrefixFrom(v6, 128)},
			PersistentKeepalive: keepalive,
		}
		s.Peers = append(s.Peers, p)
		all.Prefixes = append(all.Prefixes, p.AllowedIPs...)
		if i%3 == 0 {
			web.Prefixes = append(web.Prefixes, p.AllowedIPs...)
		}
	}
	s.Filter = policy.Filter{
		Sets: []policy.AddressSet{all, web},
		Ingress: []policy.FilterRule{
			{Set: "all", Origin: "ping", Matches: []policy.PortMatch{{Protocol: policy.ProtoICMP}}},
			{Set: "web", Origin: "web", Matches: []policy.PortMatch{{Protocol: policy.ProtoTCP, Ports: []policy.PortRange{{First: 80, Last: 80}, {First: 443, Last: 443}}}}},
		},
		Egress: []policy.FilterRule{{Set: "all", Origin: "out", Matches: []policy.PortMatch{{Protocol: policy.ProtoAny}}}},
	}
	return s
}

// BenchmarkApply1000Peers measures a full apply of 1,000 peers (WireGuard peers via
// wgctrl on wireguard-go, and an nftables table whose sets hold their 2,000 addresses)
// onto a device that has none, in a fresh network namespace. With a persistent
// keepalive (the agent uses 25 s), WireGuard sends a handshake initiation to every new
// peer at once; wireguard-go computes it inside the configuration call.
func BenchmarkApply1000Peers(b *testing.B) {
	for _, keepalive := range []int{0, 25} {
		b.Run(fmt.Sprintf("keepalive=%d", keepalive), func(b *testing.B) {
			ns := nstest.New(b)
			iface := nstest.IfaceName(b)
			dp := newDataplane(b, ns, iface, nil)
			full := bigState(b, iface, 1000, keepalive)
			empty := full
			empty.Peers, empty.Filter = nil, policy.Filter{}
			ctx := context.Background()
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				if err := dp.Apply(ctx, empty); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if err := dp.Apply(ctx, full); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			checkRead(b, dp, full)
		})
	}
}

// BenchmarkReapply1000Peers measures an Apply that finds everything in place (the
// periodic reconcile): one read-back of device, links and table, no changes.
func BenchmarkReapply1000Peers(b *testing.B) {
	ns := nstest.New(b)
	iface := nstest.IfaceName(b)
	dp := newDataplane(b, ns, iface, nil)
	full := bigState(b, iface, 1000, 25)
	ctx := context.Background()
	if err := dp.Apply(ctx, full); err != nil {
		b.Fatal(err)
	}
	waitKeepalives(b, dp)
	b.ResetTimer()
	for range b.N {
		if err := dp.Apply(ctx, full); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRead1000Peers measures Read of a node with 1,000 peers.
func BenchmarkRead1000Peers(b *testing.B) {
	ns := nstest.New(b)
	iface := nstest.IfaceName(b)
	dp := newDataplane(b, ns, iface, nil)
	full := bigState(b, iface, 1000, 25)
	ctx := context.Background()
	if err := dp.Apply(ctx, full); err != nil {
		b.Fatal(err)
	}
	waitKeepalives(b, dp)
	b.ResetTimer()
	for range b.N {
		if _, err := dp.Read(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
