package linux

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	"pgregory.net/rapid"

	"segmesh/agent/dataplane"
)

// Pools the random states draw from: few enough that consecutive states share
// peers, addresses and routes, so that the diffs have something to keep.
var (
	poolPeers     = []dataplane.Key{key(1), key(2), key(3), key(4), key(5)}
	poolPrivate   = []dataplane.Key{privKey(1), privKey(2)}
	poolAllowed   = []string{"100.64.0.10/32", "100.64.0.11/32", "100.64.0.12/32", "fd5e::10/128", "fd5e::11/128", "10.1.0.0/16", "10.2.0.0/16", "10.2.3.0/24"}
	poolEndpoints = []string{"", "", "192.0.2.1:51820", "192.0.2.2:51821", "[2001:db8::1]:51820"}
	poolAddresses = []string{"100.64.0.1/32", "fd5e::1/128", "10.9.0.1/24", "fd00:9::1/64"}
	poolRoutes    = []string{"100.64.0.0/10", "fd5e::/48", "0.0.0.0/0", "::/0", "10.3.0.0/16"}
)

// drawState draws a valid desired state.
func drawState(t *rapid.T) dataplane.State {
	s := dataplane.State{Interface: fakeIface,
		PrivateKey: rapid.SampledFrom(poolPrivate).Draw(t, "private key"),
		ListenPort: rapid.SampledFrom([]int{0, 51820, 51821}).Draw(t, "listen port"),
	}
	keys := rapid.SliceOfDistinct(rapid.SampledFrom(poolPeers), func(k dataplane.Key) dataplane.Key { return k }).Draw(t, "peers")
	for _, k := range keys {
		s.Peers = append(s.Peers, dataplane.Peer{PublicKey: k,
			PersistentKeepalive: rapid.SampledFrom([]int{0, 10, 25}).Draw(t, "keepalive")})
		if ep := rapid.SampledFrom(poolEndpoints).Draw(t, "endpoint"); ep != "" {
			s.Peers[len(s.Peers)-1].Endpoint = ap(ep)
		}
	}
	for _, a := range poolAllowed { // each allowed IP on at most one peer
		if owner := rapid.IntRange(-1, len(s.Peers)-1).Draw(t, "owner of "+a); owner >= 0 {
			s.Peers[owner].AllowedIPs = append(s.Peers[owner].AllowedIPs, pfx(a))
		}
	}
	ipv6 := false
	for _, a := range poolAddresses {
		if rapid.Bool().Draw(t, "address "+a) {
			s.Addresses = append(s.Addresses, pfx(a))
			ipv6 = ipv6 || pfx(a).Addr().Is6()
		}
	}
	for _, r := range poolRoutes {
		if rapid.Bool().Draw(t, "route "+r) {
			s.Routes = append(s.Routes, pfx(r))
			ipv6 = ipv6 || pfx(r).Addr().Is6()
		}
	}
	mtus := []int{0, 1420, 1380, 1280}
	if !ipv6 {
		mtus = append(mtus, 1000)
	}
	s.MTU = rapid.SampledFrom(mtus).Draw(t, "MTU")
	return s
}

// model is what the test knows the device keeps where the desired state leaves it to
// the device: the endpoint of each peer and the listen port.
type model struct {
	endpoints map[dataplane.Key]netip.AddrPort
	port      int
}

// applied updates m after an Apply of s.
func (m *model) applied(s dataplane.State) {
	keep := map[dataplane.Key]netip.AddrPort{}
	for _, p := range s.Peers {
		switch {
		case p.Endpoint.IsValid():
			keep[p.PublicKey] = p.Endpoint
		case m.endpoints[p.PublicKey].IsValid():
			keep[p.PublicKey] = m.endpoints[p.PublicKey]
		}
	}
	m.endpoints = keep
	if s.ListenPort != 0 {
		m.port = s.ListenPort
	}
}

// observed is what Read should return after an Apply of s.
func (m *model) observed(s dataplane.State) dataplane.State {
	o := dataplane.Canonical(s)
	for i, p := range o.Peers {
		if !p.Endpoint.IsValid() {
			o.Peers[i].Endpoint = m.endpoints[p.PublicKey]
		}
	}
	return o
}

// drift makes one random change behind the dataplane's back, as another program
// would, and records in m what the device then keeps.
func drift(t *rapid.T, f *fakeKernel, m *model, s dataplane.State) {
	link, err := f.links.LinkByName(fakeIface)
	if err != nil {
		t.Fatalf("no link: %v", err)
	}
	wgSet := func(cfg wgtypes.Config) {
		if err := f.wg.ConfigureDevice(fakeIface, cfg); err != nil {
			t.Fatalf("drift: %v", err)
		}
	}
	var pk wgtypes.Key
	if len(s.Peers) > 0 {
		pk = wgtypes.Key(rapid.SampledFrom(s.Peers).Draw(t, "drifting peer").PublicKey)
	}
	ka := 7 * time.Second
	switch kind := rapid.IntRange(0, 10).Draw(t, "drift"); kind {
	case 0:
		if err := f.links.LinkSetMTU(link, 1300); err != nil {
			t.Fatal(err)
		}
	case 1:
		if err := f.links.LinkSetDown(link); err != nil {
			t.Fatal(err)
		}
	case 2:
		if err := f.links.AddrAdd(link, &netlink.Addr{IPNet: ipNetPtr(pfx("10.99.0.1/32"))}); err != nil {
			t.Fatal(err)
		}
	case 3:
		if len(s.Addresses) > 0 {
			a := rapid.SampledFrom(s.Addresses).Draw(t, "address")
			if err := f.links.AddrDel(link, &netlink.Addr{IPNet: ipNetPtr(a)}); err != nil {
				t.Fatal(err)
			}
		}
	case 4:
		if err := f.links.RouteReplace(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNetPtr(pfx("10.98.0.0/16"))}); err != nil {
			t.Fatal(err)
		}
	case 5:
		routes, _ := f.links.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{LinkIndex: link.Attrs().Index}, netlink.RT_FILTER_OIF)
		routes = slices.DeleteFunc(routes, func(r netlink.Route) bool { return r.Protocol == unix.RTPROT_KERNEL })
		if len(routes) > 0 {
			r := rapid.SampledFrom(routes).Draw(t, "route")
			if err := f.links.RouteDel(&r); err != nil {
				t.Fatal(err)
			}
		}
	case 6:
		if err := f.links.LinkDel(link); err != nil {
			t.Fatal(err)
		}
		*m = model{}
	case 7:
		if pk != (wgtypes.Key{}) {
			wgSet(wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: pk, Remove: true}}})
			delete(m.endpoints, dataplane.Key(pk))
		}
	case 8:
		if pk != (wgtypes.Key{}) {
			ep := ap("198.51.100.7:1000")
			wgSet(wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: pk, UpdateOnly: true,
				Endpoint: net.UDPAddrFromAddrPort(ep), PersistentKeepaliveInterval: &ka,
				AllowedIPs: ipNets([]netip.Prefix{pfx("10.97.0.0/16")})}}})
			m.endpoints[dataplane.Key(pk)] = ep // learned: kept where the desired endpoint is zero
		}
	case 9:
		wgSet(wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: wgtypes.Key(key(99)),
			AllowedIPs: ipNets([]netip.Prefix{pfx("10.96.0.0/16")})}}})
	case 10:
		port := 40404
		wgSet(wgtypes.Config{ListenPort: &port})
		m.port = port
	default:
		panic(fmt.Sprint("drift kind ", kind))
	}
}

// TestApplyConvergesToRandomStates replays random sequences of desired states, with
// random changes behind the dataplane's back in between, and checks after each Apply
// that Read reports exactly that state without drift, that (keepalives turned on)
// the fakes hold exactly its canonical rendering, and that applying it again changes
// nothing at all. Half of the runs let the fakes report their changes, so that reads
// are skipped when nothing changed.
func TestApplyConvergesToRandomStates(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		tracked := rapid.Bool().Draw(t, "tracked")
		f := newFakeKernel(t, tracked)
		defer f.dp.cancel()
		var m model
		steps := rapid.IntRange(1, 8).Draw(t, "steps")
		var prev dataplane.State
		for i := range steps {
			if i > 0 && rapid.Bool().Draw(t, "drift?") {
				drift(t, f, &m, prev)
			}
			s := drawState(t)
			if err := f.apply(s); err != nil {
				t.Fatalf("step %d: Apply: %v", i, err)
			}
			m.applied(s)
			o := f.read(t)
			if len(o.Drift) > 0 {
				t.Fatalf("step %d: Read right after Apply reports drift %v", i, o.Drift)
			}
			want := m.observed(s)
			if !dataplane.Equal(want, o.State) || o.State.PrivateKey != want.PrivateKey {
				t.Fatalf("step %d: Read = %+v, want %+v", i, o.State, want)
			}
			f.drain(t)
			if got, want := f.dump(), expect(t, s, m.endpoints, m.port); got != want {
				t.Fatalf("step %d: the fakes hold\n%s\nwant\n%s", i, got, want)
			}
			changes, sets := f.links.Changes(), f.wg.Sets()
			if err := f.apply(s); err != nil {
				t.Fatalf("step %d: re-Apply: %v", i, err)
			}
			if c, n := f.links.Changes()-changes, f.wg.Sets()-sets; c != 0 || n != 0 {
				t.Fatalf("step %d: re-applying an unchanged state made %d link changes and sent %d WireGuard configurations", i, c, n)
			}
			prev = s
		}
	})
}
