package fakelinks

import (
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func ipNetOf(s string) *net.IPNet { return ipNet(netip.MustParsePrefix(s)) }

type wgDevices map[string]bool

func (w wgDevices) AddDevice(name string) error { w[name] = true; return nil }
func (w wgDevices) RemoveDevice(name string)    { delete(w, name) }

func TestLinks(t *testing.T) {
	wg := wgDevices{}
	l := New(wg)
	changes := 0
	l.OnChange(func() { changes++ })
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	refused := func(err, want error) {
		t.Helper()
		if !errors.Is(err, want) {
			t.Fatalf("got %v, want %v", err, want)
		}
	}
	must(l.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: "wg0"}}))
	if !wg["wg0"] {
		t.Fatal("a WireGuard link did not bring its device")
	}
	refused(l.LinkAdd(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "wg0"}}), unix.EEXIST)
	if _, err := l.LinkByName("nope"); !errors.Is(err, unix.ENODEV) {
		t.Fatalf("LinkByName of a missing link = %v", err)
	}
	link, err := l.LinkByName("wg0")
	must(err)
	if link.Type() != "wireguard" || link.Attrs().MTU != 1420 || link.Attrs().Flags&net.FlagUp != 0 {
		t.Fatalf("new link %+v", link.Attrs())
	}
	idx := link.Attrs().Index

	must(l.AddrAdd(link, &netlink.Addr{IPNet: ipNetOf("10.0.0.1/24")}))
	must(l.AddrAdd(link, &netlink.Addr{IPNet: ipNetOf("10.0.0.1/32")})) // IPv4: another prefix length is another address
	must(l.AddrAdd(link, &netlink.Addr{IPNet: ipNetOf("fd00::1/64"), Flags: unix.IFA_F_NODAD}))
	refused(l.AddrAdd(link, &netlink.Addr{IPNet: ipNetOf("fd00::1/128")}), unix.EEXIST) // IPv6: not
	refused(l.AddrAdd(link, &netlink.Addr{IPNet: ipNetOf("10.0.0.1/24")}), unix.EEXIST)
	refused(l.AddrDel(link, &netlink.Addr{IPNet: ipNetOf("10.0.0.9/32")}), unix.EADDRNOTAVAIL)
	refused(l.RouteReplace(&netlink.Route{LinkIndex: idx, Dst: ipNetOf("10.1.0.0/16")}), unix.ENETDOWN)
	must(l.RouteReplace(&netlink.Route{LinkIndex: idx, Dst: ipNetOf("fd01::/48")})) // IPv6 through a down link is fine
	must(l.LinkSetUp(link))
	must(l.LinkSetIP6AddrGenMode(link, 1))
	must(l.RouteReplace(&netlink.Route{LinkIndex: idx, Dst: ipNetOf("10.1.0.0/16"), Protocol: unix.RTPROT_STATIC, Scope: netlink.SCOPE_LINK}))
	refused(l.RouteReplace(&netlink.Route{LinkIndex: idx, Dst: ipNetOf("10.1.0.1/16")}), unix.EINVAL)
	refused(l.RouteReplace(&netlink.Route{LinkIndex: 99, Dst: ipNetOf("10.2.0.0/16")}), unix.ENODEV)
	refused(l.RouteDel(&netlink.Route{LinkIndex: idx, Dst: ipNetOf("10.2.0.0/16")}), unix.ESRCH)
	const want = "link wg0 wireguard mtu 1420 up addrgenmode 1\n" +
		"  address 10.0.0.1/24\n" +
		"  address 10.0.0.1/32\n" +
		"  address fd00::1/64 nodad\n" +
		"route main 10.0.0.0/24 dev wg0 proto kernel scope link metric 0 type 1\n" +
		"route main 10.1.0.0/16 dev wg0 proto static scope link metric 0 type 1\n" +
		"route main fd00::/64 dev wg0 proto kernel scope universe metric 256 type 1\n" +
		"route main fd01::/48 dev wg0 proto boot scope universe metric 1024 type 1\n"
	if got := l.String(); got != want {
		t.Fatalf("dump:\n%s\nwant:\n%s", got, want)
	}
	routes, err := l.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{LinkIndex: idx, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
	must(err)
	if len(routes) != 2 {
		t.Fatalf("IPv6 routes %+v", routes)
	}

	// An MTU below 1280 disables IPv6; down flushes the routes.
	refused(l.LinkSetMTU(link, 67), unix.EINVAL)
	must(l.LinkSetMTU(link, 1200))
	must(l.LinkSetDown(link))
	const after = "link wg0 wireguard mtu 1200 down addrgenmode 1\n" +
		"  address 10.0.0.1/24\n" +
		"  address 10.0.0.1/32\n"
	if got := l.String(); got != after {
		t.Fatalf("dump after MTU 1200 and down:\n%s\nwant:\n%s", got, after)
	}
	must(l.LinkDel(link))
	if wg["wg0"] || l.String() != "" {
		t.Fatalf("after LinkDel: devices %v, dump %q", wg, l.String())
	}
	if changes != l.Changes() || changes != 11 {
		t.Errorf("OnChange called %d times, Changes %d; want 11", changes, l.Changes())
	}
}
