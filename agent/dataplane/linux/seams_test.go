package linux

// Tests of the interface steps of Apply and Read (WireGuard peer diff, link, address
// and route diff, keepalive batches, read caches) against the in-memory fakes of
// internal/fakewg and internal/fakelinks. They need no root and no namespace.

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux/internal/fakelinks"
	"segmesh/agent/dataplane/linux/internal/fakewg"
)

const fakeIface = "sm0"

// tb is what the helpers need of *testing.T and *rapid.T.
type tb interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
}

// fakeKernel is a Dataplane whose links and WireGuard client are fakes: kernel
// WireGuard (a link of type "wireguard" brings its device), no nftables.
type fakeKernel struct {
	dp    *Dataplane
	links *fakelinks.Links
	wg    *fakewg.Client
	// late is set while the dataplane changes the fakes: their change reports
	// (tracked) are then held back and delivered after the next read, as rtnetlink
	// events may arrive after a read that follows the change.
	late             atomic.Bool
	lateWG, lateLink atomic.Int32
}

// newFakeKernel returns a fakeKernel holding an unrelated link "eth0" (an address, a
// route) that Apply must never touch. With tracked, the fakes report their changes
// to the Dataplane's generations as UAPI "set" and rtnetlink events would (those of
// the dataplane's own changes late, see fakeKernel.late), so reads may be skipped;
// without, every read goes to the fakes.
func newFakeKernel(t tb, tracked bool) *fakeKernel {
	t.Helper()
	wg := fakewg.New()
	l := fakelinks.New(wg)
	f := &fakeKernel{links: l, wg: wg}
	if err := l.LinkAdd(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}}); err != nil {
		t.Fatal(err)
	}
	eth, _ := l.LinkByName("eth0")
	for _, err := range []error{
		l.LinkSetUp(eth),
		l.AddrAdd(eth, &netlink.Addr{IPNet: ipNetPtr(netip.MustParsePrefix("192.0.2.1/24"))}),
		l.RouteReplace(&netlink.Route{LinkIndex: eth.Attrs().Index, Dst: ipNetPtr(netip.MustParsePrefix("198.51.100.0/24"))}),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	d := &Dataplane{opts: Options{Interface: fakeIface}, log: slog.New(slog.DiscardHandler), rtnl: l, wg: wg,
		kick: make(chan struct{}, 1)}
	d.openWG = func() (wgClient, error) { return wg, nil }
	d.closing, d.cancel = context.WithCancel(context.Background())
	d.wgGen.down()
	d.linkGen.down()
	if tracked {
		wg.OnSet(func(string) {
			if f.late.Load() {
				f.lateWG.Add(1)
			} else {
				d.wgGen.bump()
			}
		})
		l.OnChange(func() {
			if f.late.Load() {
				f.lateLink.Add(1)
			} else {
				d.linkGen.bump()
			}
		})
		d.wgGen.up()
		d.linkGen.up()
	}
	f.dp = d
	return f
}

// apply runs the interface steps of Apply (validation, device, WireGuard, link).
func (f *fakeKernel) apply(s dataplane.State) error {
	d := f.dp
	want := dataplane.Canonical(s)
	if err := d.validate(want); err != nil {
		return err
	}
	mtu := want.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	f.late.Store(true)
	defer f.late.Store(false)
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.applyInterface(context.Background(), want, mtu); err != nil {
		return err
	}
	d.applied = &want
	return nil
}

// read runs the interface part of Read.
func (f *fakeKernel) read(t tb) dataplane.Observed {
	t.Helper()
	d := f.dp
	d.mu.Lock()
	defer d.mu.Unlock()
	var s dataplane.State
	if err := d.readInterface(&s); err != nil {
		t.Fatalf("reading: %v", err)
	}
	o := dataplane.Observed{State: dataplane.Canonical(s)}
	if d.applied != nil {
		o.Drift = dataplane.Diff(*d.applied, o.State)
	}
	if f.lateWG.Swap(0) > 0 {
		d.wgGen.bump()
	}
	if f.lateLink.Swap(0) > 0 {
		d.linkGen.bump()
	}
	return o
}

// drain turns every pending keepalive on, as the keepalive goroutine would.
func (f *fakeKernel) drain(t tb) {
	t.Helper()
	f.late.Store(true)
	defer f.late.Store(false)
	for i := 0; f.dp.enableKeepalives(keepaliveBatch); i++ {
		if i > 1000 {
			t.Fatal("keepalives stay pending")
		}
	}
}

func (f *fakeKernel) pending() int {
	f.dp.mu.Lock()
	defer f.dp.mu.Unlock()
	return len(f.dp.pending)
}

// dump is the fakes' state: links, addresses and routes, then WireGuard devices.
func (f *fakeKernel) dump() string { return f.links.String() + f.wg.String() }

// expect is what the fakes hold after an Apply of s (keepalives on), given the
// endpoints and listen port the device keeps where s leaves them zero: built by
// programming fresh fakes directly, not through the code under test.
func expect(t tb, s dataplane.State, endpoints map[dataplane.Key]netip.AddrPort, port int) string {
	t.Helper()
	ref := newFakeKernel(t, false)
	l, wg := ref.links, ref.wg
	mtu := s.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("building the expected state: %v", err)
		}
	}
	must(l.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: s.Interface, MTU: mtu}}))
	link, err := l.LinkByName(s.Interface)
	must(err)
	must(l.LinkSetIP6AddrGenMode(link, addrGenModeNone))
	for _, a := range s.Addresses {
		na := &netlink.Addr{IPNet: ipNetPtr(a)}
		if a.Addr().Is6() {
			na.Flags = unix.IFA_F_NODAD
		}
		must(l.AddrAdd(link, na))
	}
	must(l.LinkSetUp(link))
	for _, r := range s.Routes {
		nr := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNetPtr(r), Protocol: unix.RTPROT_STATIC, Scope: netlink.SCOPE_LINK}
		if r.Addr().Is6() {
			nr.Scope = netlink.SCOPE_UNIVERSE
		}
		must(l.RouteReplace(nr))
	}
	key := wgtypes.Key(s.PrivateKey)
	if s.ListenPort != 0 {
		port = s.ListenPort
	}
	cfg := wgtypes.Config{PrivateKey: &key, ListenPort: &port, ReplacePeers: true}
	for _, p := range s.Peers {
		ka := time.Duration(p.PersistentKeepalive) * time.Second
		pc := wgtypes.PeerConfig{PublicKey: wgtypes.Key(p.PublicKey), AllowedIPs: ipNets(p.AllowedIPs), PersistentKeepaliveInterval: &ka}
		ep := p.Endpoint
		if !ep.IsValid() {
			ep = endpoints[p.PublicKey]
		}
		if ep.IsValid() {
			pc.Endpoint = net.UDPAddrFromAddrPort(ep)
		}
		cfg.Peers = append(cfg.Peers, pc)
	}
	must(wg.ConfigureDevice(s.Interface, cfg))
	return ref.dump()
}

func key(b byte) dataplane.Key { return dataplane.Key{0: b, 31: 0x40} }

// privKey returns a private key whose public key differs from every key().
func privKey(b byte) dataplane.Key { return dataplane.Key{0: 0xf0 | b, 1: 1} }

var (
	pfx = netip.MustParsePrefix
	ap  = netip.MustParseAddrPort
)

// baseState is a node with two addresses, two routes and no peers.
func baseState() dataplane.State {
	return dataplane.State{Interface: fakeIface, PrivateKey: privKey(1), ListenPort: 51820, MTU: 1420,
		Addresses: []netip.Prefix{pfx("100.64.0.1/32"), pfx("fd5e::1/128")},
		Routes:    []netip.Prefix{pfx("100.64.0.0/10"), pfx("fd5e::/48")}}
}

func withPeers(s dataplane.State, peers ...dataplane.Peer) dataplane.State {
	s.Peers = peers
	return s
}

func peer(b byte, ep string, keepalive int, allowed ...string) dataplane.Peer {
	p := dataplane.Peer{PublicKey: key(b), PersistentKeepalive: keepalive}
	if ep != "" {
		p.Endpoint = ap(ep)
	}
	for _, a := range allowed {
		p.AllowedIPs = append(p.AllowedIPs, pfx(a))
	}
	return p
}

// TestPeerDiff applies a start state, then a desired one, and checks that the second
// Apply sends at most one WireGuard configuration, leaves the fakes holding exactly
// the desired state, and that a third Apply of it sends nothing.
func TestPeerDiff(t *testing.T) {
	p1 := peer(1, "192.0.2.11:51820", 25, "100.64.0.11/32", "fd5e::11/128")
	p2 := peer(2, "192.0.2.12:51820", 0, "100.64.0.12/32")
	p3 := peer(3, "[2001:db8::13]:51820", 25, "100.64.0.13/32", "10.13.0.0/16")
	tests := []struct {
		name        string
		start, want dataplane.State
		// foreign changes the device behind the dataplane's back after start.
		foreign func(t *testing.T, f *fakeKernel)
		// sets is how many configurations the second Apply sends (0 or 1).
		sets int
		// pending is how many keepalives the second Apply leaves to the goroutine.
		pending int
		// endpoints the device keeps for peers whose desired endpoint is zero.
		endpoints map[dataplane.Key]netip.AddrPort
	}{
		{name: "first peers", start: baseState(), want: withPeers(baseState(), p1, p2, p3), sets: 1, pending: 2},
		{name: "unchanged", start: withPeers(baseState(), p1, p2), want: withPeers(baseState(), p1, p2)},
		{name: "endpoint only", start: withPeers(baseState(), p1, p2),
			want: withPeers(baseState(), peer(1, "192.0.2.99:4000", 25, "100.64.0.11/32", "fd5e::11/128"), p2), sets: 1},
		{name: "peer removed and another added", start: withPeers(baseState(), p1, p2),
			want: withPeers(baseState(), p2, p3), sets: 1, pending: 1},
		{name: "all peers removed", start: withPeers(baseState(), p1, p2, p3), want: baseState(), sets: 1},
		{name: "allowed IP moves between peers", start: withPeers(baseState(), p1, p2),
			want: withPeers(baseState(), peer(1, "192.0.2.11:51820", 25, "fd5e::11/128"),
				peer(2, "192.0.2.12:51820", 0, "100.64.0.12/32", "100.64.0.11/32")), sets: 1},
		{name: "allowed IPs swap between peers", start: withPeers(baseState(), p1, p2),
			want: withPeers(baseState(), peer(1, "192.0.2.11:51820", 25, "100.64.0.12/32"),
				peer(2, "192.0.2.12:51820", 0, "100.64.0.11/32", "fd5e::11/128")), sets: 1},
		{name: "keepalive changed and turned off", start: withPeers(baseState(), p1, p3),
			want: withPeers(baseState(), peer(1, "192.0.2.11:51820", 10, "100.64.0.11/32", "fd5e::11/128"),
				peer(3, "[2001:db8::13]:51820", 0, "100.64.0.13/32", "10.13.0.0/16")), sets: 1},
		{name: "keepalive turned on later", start: withPeers(baseState(), p2),
			want: withPeers(baseState(), peer(2, "192.0.2.12:51820", 25, "100.64.0.12/32")), pending: 1},
		{name: "private key and listen port", start: withPeers(baseState(), p1),
			want: func() dataplane.State {
				s := withPeers(baseState(), p1)
				s.PrivateKey, s.ListenPort = privKey(2), 40000
				return s
			}(), sets: 1},
		{name: "zero listen port keeps the port", start: withPeers(baseState(), p1),
			want: func() dataplane.State {
				s := withPeers(baseState(), p1)
				s.ListenPort = 0
				return s
			}()},
		{name: "zero endpoint keeps the learned one", start: withPeers(baseState(), p2),
			want:      withPeers(baseState(), peer(2, "", 0, "100.64.0.12/32")),
			endpoints: map[dataplane.Key]netip.AddrPort{key(2): ap("192.0.2.12:51820")}},
		{name: "stray peer, preshared key and allowed IP", start: withPeers(baseState(), p1, p2),
			foreign: func(t *testing.T, f *fakeKernel) {
				psk := wgtypes.Key{7}
				err := f.wg.ConfigureDevice(fakeIface, wgtypes.Config{Peers: []wgtypes.PeerConfig{
					{PublicKey: wgtypes.Key(key(9)), AllowedIPs: ipNets([]netip.Prefix{pfx("10.9.0.0/16")})},
					{PublicKey: wgtypes.Key(key(1)), PresharedKey: &psk},
					{PublicKey: wgtypes.Key(key(2)), AllowedIPs: ipNets([]netip.Prefix{pfx("10.2.0.0/16")})},
				}})
				if err != nil {
					t.Fatal(err)
				}
			},
			want: withPeers(baseState(), p1, p2), sets: 1},
		{name: "peer removed behind our back", start: withPeers(baseState(), p1, p2),
			foreign: func(t *testing.T, f *fakeKernel) {
				if err := f.wg.ConfigureDevice(fakeIface, wgtypes.Config{Peers: []wgtypes.PeerConfig{
					{PublicKey: wgtypes.Key(key(1)), Remove: true}}}); err != nil {
					t.Fatal(err)
				}
			},
			want: withPeers(baseState(), p1, p2), sets: 1, pending: 1},
	}
	for _, tt := range tests {
		for _, tracked := range []bool{false, true} {
			name := tt.name
			if tracked {
				name += "/tracked"
			}
			t.Run(name, func(t *testing.T) {
				f := newFakeKernel(t, tracked)
				if err := f.apply(tt.start); err != nil {
					t.Fatalf("applying the start state: %v", err)
				}
				f.drain(t)
				if tt.foreign != nil {
					tt.foreign(t, f)
				}
				before := f.wg.Sets()
				if err := f.apply(tt.want); err != nil {
					t.Fatalf("Apply: %v", err)
				}
				if got := f.wg.Sets() - before; got != tt.sets {
					t.Errorf("Apply sent %d WireGuard configurations, want %d", got, tt.sets)
				}
				if got := f.pending(); got != tt.pending {
					t.Errorf("%d keepalives pending, want %d", got, tt.pending)
				}
				if o := f.read(t); len(o.Drift) > 0 {
					t.Errorf("Read right after Apply reports drift: %v", o.Drift)
				}
				f.drain(t)
				port := tt.start.ListenPort
				if d := cmp.Diff(expect(t, tt.want, tt.endpoints, port), f.dump()); d != "" {
					t.Errorf("the fakes hold (-want +got):\n%s", d)
				}
				before = f.wg.Sets()
				if err := f.apply(tt.want); err != nil {
					t.Fatal(err)
				}
				if n := f.wg.Sets() - before; n != 0 {
					t.Errorf("re-applying an unchanged state sent %d configurations", n)
				}
			})
		}
	}
}

// TestLinkDiff checks MTU, address and route reconciliation against the fakes: start
// state, a change behind the dataplane's back, desired state.
func TestLinkDiff(t *testing.T) {
	link := func(t *testing.T, f *fakeKernel) netlink.Link {
		t.Helper()
		l, err := f.links.LinkByName(fakeIface)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	with := func(mod func(*dataplane.State)) dataplane.State {
		s := baseState()
		mod(&s)
		return s
	}
	tests := []struct {
		name        string
		start, want dataplane.State
		foreign     func(t *testing.T, f *fakeKernel)
	}{
		{name: "fresh interface", want: baseState()},
		{name: "default MTU", start: baseState(), want: with(func(s *dataplane.State) { s.MTU = 0 })},
		{name: "MTU", start: baseState(), want: with(func(s *dataplane.State) { s.MTU = 1380 })},
		{name: "addresses replaced", start: baseState(), want: with(func(s *dataplane.State) {
			s.Addresses = []netip.Prefix{pfx("100.64.0.2/32"), pfx("fd5e::2/128"), pfx("10.1.0.1/24")}
		})},
		{name: "routes replaced", start: baseState(), want: with(func(s *dataplane.State) {
			s.Routes = []netip.Prefix{pfx("0.0.0.0/0"), pfx("::/0"), pfx("10.2.0.0/16")}
		})},
		{name: "no addresses or routes", start: baseState(), want: with(func(s *dataplane.State) {
			s.Addresses, s.Routes = nil, nil
		})},
		{name: "address prefix route is the kernel's", start: baseState(), want: with(func(s *dataplane.State) {
			s.Addresses = append(s.Addresses, pfx("10.1.0.1/24"), pfx("fd00:1::1/64"))
		})},
		{name: "drift repaired", start: baseState(), want: baseState(), foreign: func(t *testing.T, f *fakeKernel) {
			l := link(t, f)
			for _, err := range []error{
				f.links.AddrDel(l, &netlink.Addr{IPNet: ipNetPtr(pfx("100.64.0.1/32"))}),
				f.links.AddrAdd(l, &netlink.Addr{IPNet: ipNetPtr(pfx("10.9.9.9/32"))}),
				f.links.RouteDel(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNetPtr(pfx("fd5e::/48"))}),
				f.links.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNetPtr(pfx("10.10.0.0/16")), Protocol: unix.RTPROT_STATIC}),
				f.links.LinkSetMTU(l, 1300),
			} {
				if err != nil {
					t.Fatal(err)
				}
			}
		}},
		{name: "link down", start: baseState(), want: baseState(), foreign: func(t *testing.T, f *fakeKernel) {
			if err := f.links.LinkSetDown(link(t, f)); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "interface deleted", start: withPeers(baseState(), peer(1, "192.0.2.1:1", 25, "100.64.0.9/32")),
			want: withPeers(baseState(), peer(1, "192.0.2.1:1", 25, "100.64.0.9/32")),
			foreign: func(t *testing.T, f *fakeKernel) {
				if err := f.links.LinkDel(link(t, f)); err != nil {
					t.Fatal(err)
				}
			}},
		{name: "interface of another type replaced", want: baseState(), foreign: func(t *testing.T, f *fakeKernel) {
			l := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: fakeIface}, Mode: netlink.TUNTAP_MODE_TUN}
			if err := f.links.LinkAdd(l); err != nil {
				t.Fatal(err)
			}
			if err := f.links.AddrAdd(link(t, f), &netlink.Addr{IPNet: ipNetPtr(pfx("100.64.9.9/32"))}); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		for _, tracked := range []bool{false, true} {
			name := tt.name
			if tracked {
				name += "/tracked"
			}
			t.Run(name, func(t *testing.T) {
				f := newFakeKernel(t, tracked)
				if tt.start.Interface != "" {
					if err := f.apply(tt.start); err != nil {
						t.Fatalf("applying the start state: %v", err)
					}
				}
				if tt.foreign != nil {
					tt.foreign(t, f)
					if tt.start.Interface != "" {
						if o := f.read(t); len(o.Drift) == 0 {
							t.Fatal("Read after the change reports no drift")
						}
					}
				}
				if err := f.apply(tt.want); err != nil {
					t.Fatalf("Apply: %v", err)
				}
				if o := f.read(t); len(o.Drift) > 0 {
					t.Errorf("Read right after Apply reports drift: %v", o.Drift)
				}
				f.drain(t)
				if d := cmp.Diff(expect(t, tt.want, nil, tt.start.ListenPort), f.dump()); d != "" {
					t.Errorf("the fakes hold (-want +got):\n%s", d)
				}
				changes, sets := f.links.Changes(), f.wg.Sets()
				if err := f.apply(tt.want); err != nil {
					t.Fatal(err)
				}
				if c, s := f.links.Changes()-changes, f.wg.Sets()-sets; c != 0 || s != 0 {
					t.Errorf("re-applying an unchanged state made %d link changes and %d WireGuard configurations", c, s)
				}
			})
		}
	}
}

// TestApplyRefusesWhatTheKernelRefuses: states the kernel would refuse or change are
// rejected before anything is touched.
func TestApplyRefusesWhatTheKernelRefuses(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*dataplane.State)
		want   string
	}{
		{"other interface", func(s *dataplane.State) { s.Interface = "other0" }, `interface "other0"`},
		{"unmasked allowed IP", func(s *dataplane.State) { s.Peers[0].AllowedIPs = []netip.Prefix{pfx("100.64.0.2/10")} }, "host bits"},
		{"allowed IP on two peers", func(s *dataplane.State) { s.Peers[1].AllowedIPs = s.Peers[0].AllowedIPs }, "is on peers"},
		{"MTU without IPv6", func(s *dataplane.State) { s.MTU = 1200 }, "disables IPv6"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeKernel(t, false)
			before := f.dump()
			s := withPeers(baseState(), peer(1, "", 0, "100.64.0.2/32"), peer(2, "", 0, "100.64.0.3/32"))
			tt.mutate(&s)
			if err := f.apply(s); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Apply = %v, want an error containing %q", err, tt.want)
			}
			if got := f.dump(); got != before {
				t.Errorf("a refused state changed the fakes:\n%s", got)
			}
		})
	}
}

// TestKeepalivesInBatches: new peers are added without keepalive in one
// configuration; Read reports the pending keepalives as set; batches turn them on.
func TestKeepalivesInBatches(t *testing.T) {
	f := newFakeKernel(t, true)
	s := baseState()
	for i := range 5 {
		s.Peers = append(s.Peers, peer(byte(10+i), "", 25, netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, 1, byte(i)}), 32).String()))
	}
	if err := f.apply(s); err != nil {
		t.Fatal(err)
	}
	if n := f.wg.Sets(); n != 1 {
		t.Fatalf("Apply of 5 new peers sent %d configurations, want 1", n)
	}
	if strings.Contains(f.wg.String(), "keepalive 25s") {
		t.Fatalf("a new peer got its keepalive in the first configuration:\n%s", f.wg.String())
	}
	if o := f.read(t); len(o.Drift) > 0 || o.State.Peers[0].PersistentKeepalive != 25 {
		t.Fatalf("Read with keepalives pending: drift %v, keepalive %d", o.Drift, o.State.Peers[0].PersistentKeepalive)
	}
	if more := f.dp.enableKeepalives(2); !more || f.pending() != 3 || strings.Count(f.wg.String(), "keepalive 25s") != 2 {
		t.Fatalf("after a batch of 2: more %v, pending %d\n%s", more, f.pending(), f.wg.String())
	}
	if more := f.dp.enableKeepalives(3); more || f.pending() != 0 || strings.Count(f.wg.String(), "keepalive 25s") != 5 {
		t.Fatalf("after a batch of 3: more %v, pending %d\n%s", more, f.pending(), f.wg.String())
	}
	if o := f.read(t); len(o.Drift) > 0 {
		t.Fatalf("drift after the keepalives are on: %v", o.Drift)
	}

	// A failed batch forgets what is pending, so that Read shows it as drift and the
	// Apply that repairs it makes it pending again.
	s.Peers = append(s.Peers, peer(20, "", 25, "100.64.2.0/32"))
	if err := f.apply(s); err != nil {
		t.Fatal(err)
	}
	f.wg.RemoveDevice(fakeIface)
	if more := f.dp.enableKeepalives(10); more || f.pending() != 0 {
		t.Fatalf("after a failed batch: more %v, pending %d", more, f.pending())
	}
}

// TestKeepaliveGoroutine: Apply wakes the goroutine, which converges without a call
// from the test, and stops when the dataplane closes.
func TestKeepaliveGoroutine(t *testing.T) {
	f := newFakeKernel(t, true)
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.dp.keepaliveLoop()
	}()
	s := withPeers(baseState(), peer(1, "", 25, "100.64.0.2/32"), peer(2, "", 25, "100.64.0.3/32"))
	if err := f.apply(s); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for f.pending() > 0 || strings.Count(f.wg.String(), "keepalive 25s") != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("keepalives not turned on:\n%s", f.wg.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	f.dp.cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("keepalive goroutine still runs after Close")
	}
}

// TestReadsSkipWhatDidNotChange: with tracked generations, a change the fakes do not
// report is not seen (the read came from the cache), a reported one is, and the
// dataplane's own changes never leave a stale cache.
func TestReadsSkipWhatDidNotChange(t *testing.T) {
	f := newFakeKernel(t, true)
	s := withPeers(baseState(), peer(1, "192.0.2.2:1", 0, "100.64.0.2/32"))
	if err := f.apply(s); err != nil {
		t.Fatal(err)
	}
	f.read(t) // the events of the Apply arrive after this read...
	f.read(t) // ...and this one fills the caches
	link, _ := f.links.LinkByName(fakeIface)

	// Unreported changes (as if events were lost) stay invisible...
	f.links.OnChange(nil)
	f.wg.OnSet(nil)
	if err := f.links.LinkSetMTU(link, 1300); err != nil {
		t.Fatal(err)
	}
	if err := f.wg.ConfigureDevice(fakeIface, wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: wgtypes.Key(key(1)), Remove: true}}}); err != nil {
		t.Fatal(err)
	}
	if o := f.read(t); len(o.Drift) != 0 {
		t.Fatalf("Read went to the fakes although nothing was reported: %v", o.Drift)
	}
	// ...until they are reported.
	f.dp.linkGen.bump()
	if o := f.read(t); len(o.Drift) != 1 || o.Drift[0].Part != dataplane.PartInterface {
		t.Fatalf("after a link event: drift %v, want the MTU", o.Drift)
	}
	f.dp.wgGen.bump()
	if o := f.read(t); len(o.Drift) != 2 || o.Drift[1].Part != dataplane.PartPeer {
		t.Fatalf("after a UAPI set: drift %v, want the MTU and the peer", o.Drift)
	}
	// The dataplane's own changes invalidate the caches even before (or without)
	// their events.
	if err := f.apply(s); err != nil {
		t.Fatal(err)
	}
	if o := f.read(t); len(o.Drift) != 0 {
		t.Fatalf("Read after the repairing Apply: drift %v", o.Drift)
	}
	// A broken source means every read goes to the kernel.
	f.dp.linkGen.down()
	if err := f.links.LinkSetMTU(link, 1300); err != nil {
		t.Fatal(err)
	}
	if o := f.read(t); len(o.Drift) != 1 {
		t.Fatalf("with a broken subscription: drift %v, want the MTU", o.Drift)
	}
}

// TestUAPIConnCountsSets: the UAPI connection wrapper reports a "set" after
// wireguard-go answers it, and never for connections that only "get".
func TestUAPIConnCountsSets(t *testing.T) {
	tests := []struct {
		name    string
		request string
		sets    bool
	}{
		{"get", "get=1\n\n", false},
		{"set", "set=1\nprivate_key=00\n\n", true},
		{"get then set", "get=1\n\nset=1\nlisten_port=1\n\n", true},
		{"set split across reads", "se|t=1\n\n", true},
		{"not a set", "xset=1\nset=10\n\n", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			server, client := net.Pipe()
			defer client.Close()
			sets := 0
			c := &uapiConn{Conn: server, onSet: func() { sets++ }}
			go func() {
				for _, part := range strings.Split(tt.request, "|") {
					client.Write([]byte(part))
				}
				buf := make([]byte, 64)
				client.Read(buf)
			}()
			buf := make([]byte, 3) // small reads, as the split case needs
			total := 0
			for total < len(strings.ReplaceAll(tt.request, "|", "")) {
				n, err := c.Read(buf)
				if err != nil {
					t.Fatal(err)
				}
				total += n
			}
			if sets != 0 {
				t.Fatalf("onSet ran before the response")
			}
			if _, err := c.Write([]byte("errno=0\n\n")); err != nil {
				t.Fatal(err)
			}
			if got := sets > 0; got != tt.sets {
				t.Errorf("onSet called %d times, want a call: %v", sets, tt.sets)
			}
			c.Close()
		})
	}
}
