// Package fakelinks is an in-memory rtnetlink with the link, address and route calls
// of *netlink.Handle that the Linux dataplane uses. It records state (links with
// their MTU, up flag and IPv6 address generation mode, addresses, routes of every
// table), not calls, and dumps it as canonical text (String).
//
// It refuses what the kernel refuses: a link name that exists (EEXIST), an MTU
// outside 68-65535 (EINVAL), an address that exists (EEXIST; for IPv6 the same
// address with any prefix length), deleting a missing address (EADDRNOTAVAIL), a
// route with host bits set (EINVAL), an IPv4 route through a link that is down
// (ENETDOWN), deleting a missing route (ESRCH), a missing link (ENODEV). And it
// changes what the kernel changes: a link going down loses its routes; an MTU below
// 1280 disables IPv6 on the link (its IPv6 addresses and routes go); IPv6 routes
// without a metric get 1024; an address that is not a host prefix yields a "proto
// kernel" prefix route in the main table while the link is up. Deleting such a
// derived route is not modelled (ESRCH).
package fakelinks

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// WireGuard is told when a link of type "wireguard" is added or deleted, so that a
// fake WireGuard client (fakewg.Client) gets or loses the device, as with the kernel.
type WireGuard interface {
	AddDevice(name string) error
	RemoveDevice(name string)
}

// Links is the fake. The zero value is not usable; use New. Its methods are safe for
// concurrent use.
type Links struct {
	mu        sync.Mutex
	wg        WireGuard
	links     map[int]*link
	nextIndex int
	routes    []netlink.Route // static routes (not derived from addresses)
	changes   int
	onChange  func()
}

type link struct {
	typ         string
	name        string
	mtu         int
	up          bool
	addrGenMode int
	addrs       []addr
}

type addr struct {
	prefix netip.Prefix
	flags  int
}

// New returns a fake without links; wg (may be nil) follows WireGuard links.
func New(wg WireGuard) *Links {
	return &Links{wg: wg, links: map[int]*link{}, nextIndex: 1}
}

// OnChange registers f, called (without the fake's lock) after every successful
// change, as a netlink event subscription would report it. nil removes it.
func (l *Links) OnChange(f func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.onChange = f
}

// Changes counts successful changes (link, address and route calls that succeeded).
func (l *Links) Changes() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.changes
}

// changed counts a change and returns the hook to call after unlocking.
func (l *Links) changed() func() {
	l.changes++
	if l.onChange == nil {
		return func() {}
	}
	return l.onChange
}

// Close does nothing.
func (l *Links) Close() {}

func (l *Links) find(nl netlink.Link) (int, *link, error) {
	if nl == nil || nl.Attrs() == nil {
		return 0, nil, fmt.Errorf("fakelinks: no link given: %w", unix.EINVAL)
	}
	a := nl.Attrs()
	if a.Index != 0 {
		if lk, ok := l.links[a.Index]; ok {
			return a.Index, lk, nil
		}
		return 0, nil, fmt.Errorf("fakelinks: link index %d: %w", a.Index, unix.ENODEV)
	}
	for i, lk := range l.links {
		if lk.name == a.Name {
			return i, lk, nil
		}
	}
	return 0, nil, fmt.Errorf("fakelinks: link %q: %w", a.Name, unix.ENODEV)
}

func (lk *link) netlinkLink(index int) netlink.Link {
	attrs := netlink.LinkAttrs{Index: index, Name: lk.name, MTU: lk.mtu}
	if lk.up {
		attrs.Flags = net.FlagUp
		attrs.OperState = netlink.OperUnknown
	}
	switch lk.typ {
	case "wireguard":
		return &netlink.Wireguard{LinkAttrs: attrs}
	case "tuntap":
		return &netlink.Tuntap{LinkAttrs: attrs, Mode: netlink.TUNTAP_MODE_TUN}
	default:
		return &netlink.Dummy{LinkAttrs: attrs}
	}
}

// LinkByName returns a snapshot of the link; a missing one is ENODEV (which the
// dataplane treats like netlink.LinkNotFoundError).
func (l *Links) LinkByName(name string) (netlink.Link, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, lk := range l.links {
		if lk.name == name {
			return lk.netlinkLink(i), nil
		}
	}
	return nil, fmt.Errorf("fakelinks: link %s not found: %w", name, unix.ENODEV)
}

// LinkAdd adds a link (down) of nl's type ("wireguard", "tuntap", anything else is a
// dummy) with nl's name and MTU (default 1420 for WireGuard, 1500 otherwise).
func (l *Links) LinkAdd(nl netlink.Link) error {
	l.mu.Lock()
	a := nl.Attrs()
	for _, lk := range l.links {
		if lk.name == a.Name {
			l.mu.Unlock()
			return fmt.Errorf("fakelinks: link %s: %w", a.Name, unix.EEXIST)
		}
	}
	if a.Name == "" || len(a.Name) >= unix.IFNAMSIZ {
		l.mu.Unlock()
		return fmt.Errorf("fakelinks: link name %q: %w", a.Name, unix.EINVAL)
	}
	lk := &link{typ: nl.Type(), name: a.Name, mtu: a.MTU}
	if lk.typ != "wireguard" && lk.typ != "tuntap" {
		lk.typ = "dummy"
	}
	if lk.mtu == 0 {
		lk.mtu = 1500
		if lk.typ == "wireguard" {
			lk.mtu = 1420
		}
	}
	if lk.mtu < 68 || lk.mtu > 65535 {
		l.mu.Unlock()
		return fmt.Errorf("fakelinks: MTU %d: %w", lk.mtu, unix.EINVAL)
	}
	if lk.typ == "wireguard" && l.wg != nil {
		if err := l.wg.AddDevice(a.Name); err != nil {
			l.mu.Unlock()
			return err
		}
	}
	l.links[l.nextIndex] = lk
	l.nextIndex++
	hook := l.changed()
	l.mu.Unlock()
	hook()
	return nil
}

// LinkDel deletes the link with its addresses and routes.
func (l *Links) LinkDel(nl netlink.Link) error {
	l.mu.Lock()
	i, lk, err := l.find(nl)
	if err != nil {
		l.mu.Unlock()
		return err
	}
	delete(l.links, i)
	l.routes = slices.DeleteFunc(l.routes, func(r netlink.Route) bool { return r.LinkIndex == i })
	if lk.typ == "wireguard" && l.wg != nil {
		l.wg.RemoveDevice(lk.name)
	}
	hook := l.changed()
	l.mu.Unlock()
	hook()
	return nil
}

// LinkSetMTU sets the MTU; below 1280 the link loses its IPv6 addresses and routes.
func (l *Links) LinkSetMTU(nl netlink.Link, mtu int) error {
	return l.modify(nl, func(i int, lk *link) error {
		if mtu < 68 || mtu > 65535 {
			return fmt.Errorf("fakelinks: MTU %d: %w", mtu, unix.EINVAL)
		}
		lk.mtu = mtu
		if mtu < 1280 {
			lk.addrs = slices.DeleteFunc(lk.addrs, func(a addr) bool { return a.prefix.Addr().Is6() })
			l.routes = slices.DeleteFunc(l.routes, func(r netlink.Route) bool { return r.LinkIndex == i && r.Family == unix.AF_INET6 })
		}
		return nil
	})
}

// LinkSetUp brings the link up.
func (l *Links) LinkSetUp(nl netlink.Link) error {
	return l.modify(nl, func(_ int, lk *link) error {
		lk.up = true
		return nil
	})
}

// LinkSetDown brings the link down; its routes go, its addresses stay.
func (l *Links) LinkSetDown(nl netlink.Link) error {
	return l.modify(nl, func(i int, lk *link) error {
		lk.up = false
		l.routes = slices.DeleteFunc(l.routes, func(r netlink.Route) bool { return r.LinkIndex == i })
		return nil
	})
}

// LinkSetIP6AddrGenMode records the IPv6 address generation mode (1 is "none").
func (l *Links) LinkSetIP6AddrGenMode(nl netlink.Link, mode int) error {
	return l.modify(nl, func(_ int, lk *link) error {
		lk.addrGenMode = mode
		return nil
	})
}

func (l *Links) modify(nl netlink.Link, f func(int, *link) error) error {
	l.mu.Lock()
	i, lk, err := l.find(nl)
	if err == nil {
		err = f(i, lk)
	}
	if err != nil {
		l.mu.Unlock()
		return err
	}
	hook := l.changed()
	l.mu.Unlock()
	hook()
	return nil
}

func prefixOfIPNet(n *net.IPNet) (netip.Prefix, error) {
	if n == nil {
		return netip.Prefix{}, fmt.Errorf("fakelinks: no prefix: %w", unix.EINVAL)
	}
	ones, bits := n.Mask.Size()
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok || (bits != 32 && bits != 128) {
		return netip.Prefix{}, fmt.Errorf("fakelinks: prefix %v: %w", n, unix.EINVAL)
	}
	if bits == 32 {
		a = a.Unmap()
	}
	if (bits == 32) != a.Is4() {
		return netip.Prefix{}, fmt.Errorf("fakelinks: prefix %v: address and mask of different families: %w", n, unix.EINVAL)
	}
	return netip.PrefixFrom(a, ones), nil
}

// AddrAdd adds an address; IFA_F_NODAD is the only flag kept.
func (l *Links) AddrAdd(nl netlink.Link, a *netlink.Addr) error {
	return l.modify(nl, func(_ int, lk *link) error {
		p, err := prefixOfIPNet(a.IPNet)
		if err != nil {
			return err
		}
		if p.Addr().Is6() && lk.mtu < 1280 {
			return fmt.Errorf("fakelinks: IPv6 is disabled on %s (MTU %d): %w", lk.name, lk.mtu, unix.EACCES)
		}
		for _, h := range lk.addrs {
			if h.prefix == p || (p.Addr().Is6() && h.prefix.Addr() == p.Addr()) {
				return fmt.Errorf("fakelinks: address %s: %w", p, unix.EEXIST)
			}
		}
		lk.addrs = append(lk.addrs, addr{prefix: p, flags: a.Flags & unix.IFA_F_NODAD})
		return nil
	})
}

// AddrDel deletes an address given with its prefix length.
func (l *Links) AddrDel(nl netlink.Link, a *netlink.Addr) error {
	return l.modify(nl, func(_ int, lk *link) error {
		p, err := prefixOfIPNet(a.IPNet)
		if err != nil {
			return err
		}
		n := len(lk.addrs)
		lk.addrs = slices.DeleteFunc(lk.addrs, func(h addr) bool { return h.prefix == p })
		if len(lk.addrs) == n {
			return fmt.Errorf("fakelinks: address %s: %w", p, unix.EADDRNOTAVAIL)
		}
		return nil
	})
}

// AddrList lists the link's addresses of family (netlink.FAMILY_ALL, _V4, _V6).
func (l *Links) AddrList(nl netlink.Link, family int) ([]netlink.Addr, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	i, lk, err := l.find(nl)
	if err != nil {
		return nil, err
	}
	var out []netlink.Addr
	for _, a := range lk.addrs {
		if !familyMatches(family, a.prefix.Addr()) {
			continue
		}
		out = append(out, netlink.Addr{IPNet: ipNet(a.prefix), Flags: a.flags | unix.IFA_F_PERMANENT, LinkIndex: i})
	}
	return out, nil
}

func familyMatches(family int, a netip.Addr) bool {
	switch family {
	case netlink.FAMILY_V4:
		return a.Is4()
	case netlink.FAMILY_V6:
		return a.Is6()
	}
	return true
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// normalise fills in what the kernel fills in and checks the destination.
func normalise(r netlink.Route) (netlink.Route, netip.Prefix, error) {
	var dst netip.Prefix
	if r.Dst == nil {
		switch r.Family {
		case unix.AF_INET:
			dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		case unix.AF_INET6:
			dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		default:
			return r, dst, fmt.Errorf("fakelinks: route without destination or family: %w", unix.EINVAL)
		}
	} else {
		var err error
		if dst, err = prefixOfIPNet(r.Dst); err != nil {
			return r, dst, err
		}
	}
	if dst != dst.Masked() {
		return r, dst, fmt.Errorf("fakelinks: route %s: invalid prefix for given prefix length: %w", dst, unix.EINVAL)
	}
	r.Dst = ipNet(dst)
	r.Family = unix.AF_INET
	if dst.Addr().Is6() {
		r.Family = unix.AF_INET6
	}
	if r.Table == 0 {
		r.Table = unix.RT_TABLE_MAIN
	}
	if r.Type == 0 {
		r.Type = unix.RTN_UNICAST
	}
	if r.Protocol == 0 {
		r.Protocol = unix.RTPROT_BOOT
	}
	if r.Family == unix.AF_INET6 && r.Priority == 0 {
		r.Priority = 1024
	}
	return r, dst, nil
}

// sameKey reports whether a and b (normalised) are the same kernel route: same table,
// destination and metric.
func sameKey(a, b netlink.Route) bool {
	return a.Table == b.Table && a.Family == b.Family && a.Dst.String() == b.Dst.String() && a.Priority == b.Priority
}

// RouteReplace adds the route or replaces the one with the same table, destination
// and metric.
func (l *Links) RouteReplace(r *netlink.Route) error {
	l.mu.Lock()
	nr, dst, err := normalise(*r)
	if err == nil {
		lk, ok := l.links[nr.LinkIndex]
		switch {
		case !ok:
			err = fmt.Errorf("fakelinks: route %s: link index %d: %w", dst, nr.LinkIndex, unix.ENODEV)
		case nr.Family == unix.AF_INET && !lk.up:
			err = fmt.Errorf("fakelinks: route %s: link %s is down: %w", dst, lk.name, unix.ENETDOWN)
		case nr.Family == unix.AF_INET6 && lk.mtu < 1280:
			err = fmt.Errorf("fakelinks: route %s: IPv6 is disabled on %s: %w", dst, lk.name, unix.EACCES)
		}
	}
	if err != nil {
		l.mu.Unlock()
		return err
	}
	if i := slices.IndexFunc(l.routes, func(h netlink.Route) bool { return sameKey(h, nr) }); i >= 0 {
		l.routes[i] = nr
	} else {
		l.routes = append(l.routes, nr)
	}
	hook := l.changed()
	l.mu.Unlock()
	hook()
	return nil
}

// RouteDel deletes the route with r's table, destination and metric (IPv6: 1024 when
// zero), and r's link and protocol when given.
func (l *Links) RouteDel(r *netlink.Route) error {
	l.mu.Lock()
	nr, dst, err := normalise(*r)
	if err != nil {
		l.mu.Unlock()
		return err
	}
	i := slices.IndexFunc(l.routes, func(h netlink.Route) bool {
		return sameKey(h, nr) && (r.LinkIndex == 0 || h.LinkIndex == r.LinkIndex) && (r.Protocol == 0 || h.Protocol == r.Protocol)
	})
	if i < 0 {
		l.mu.Unlock()
		return fmt.Errorf("fakelinks: route %s: %w", dst, unix.ESRCH)
	}
	l.routes = slices.Delete(l.routes, i, i+1)
	hook := l.changed()
	l.mu.Unlock()
	hook()
	return nil
}

// derived returns the prefix routes the kernel keeps for the addresses of links that
// are up.
func (l *Links) derived() []netlink.Route {
	var out []netlink.Route
	for i, lk := range l.links {
		if !lk.up {
			continue
		}
		for _, a := range lk.addrs {
			if a.prefix.IsSingleIP() {
				continue
			}
			r := netlink.Route{LinkIndex: i, Dst: ipNet(a.prefix.Masked()), Table: unix.RT_TABLE_MAIN,
				Type: unix.RTN_UNICAST, Protocol: unix.RTPROT_KERNEL}
			if a.prefix.Addr().Is4() {
				r.Family, r.Scope, r.Src = unix.AF_INET, netlink.SCOPE_LINK, a.prefix.Addr().AsSlice()
			} else {
				r.Family, r.Priority = unix.AF_INET6, 256
			}
			if !slices.ContainsFunc(out, func(h netlink.Route) bool { return sameKey(h, r) && h.LinkIndex == i }) {
				out = append(out, r)
			}
		}
	}
	return out
}

// RouteListFiltered lists routes of family (netlink.FAMILY_ALL, _V4, _V6), filtered
// by filter's output link (netlink.RT_FILTER_OIF) and table (netlink.RT_FILTER_TABLE);
// other filter bits are not supported (EINVAL).
func (l *Links) RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	if mask&^(netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE) != 0 {
		return nil, fmt.Errorf("fakelinks: route filter %#x not supported: %w", mask, unix.EINVAL)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []netlink.Route
	for _, r := range slices.Concat(l.routes, l.derived()) {
		switch {
		case family == netlink.FAMILY_V4 && r.Family != unix.AF_INET, family == netlink.FAMILY_V6 && r.Family != unix.AF_INET6:
			continue
		case mask&netlink.RT_FILTER_OIF != 0 && r.LinkIndex != filter.LinkIndex:
			continue
		case mask&netlink.RT_FILTER_TABLE != 0 && r.Table != filter.Table:
			continue
		}
		c := r
		d := *r.Dst
		c.Dst = &d
		out = append(out, c)
	}
	return out, nil
}

// String dumps the state, links by name with their addresses, then routes by table,
// destination and metric, derived ones included:
//
//	link wg0 wireguard mtu 1420 up addrgenmode 1
//	  address 10.0.0.1/24
//	  address fd00::1/128 nodad
//	route main 10.0.0.0/24 dev wg0 proto kernel scope link metric 0
//
// Link indexes are not shown: they depend on the order of creation.
func (l *Links) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	idx := make([]int, 0, len(l.links))
	for i := range l.links {
		idx = append(idx, i)
	}
	slices.SortFunc(idx, func(a, c int) int { return cmp.Compare(l.links[a].name, l.links[c].name) })
	for _, i := range idx {
		lk := l.links[i]
		state := "down"
		if lk.up {
			state = "up"
		}
		fmt.Fprintf(&b, "link %s %s mtu %d %s addrgenmode %d\n", lk.name, lk.typ, lk.mtu, state, lk.addrGenMode)
		addrs := slices.Clone(lk.addrs)
		slices.SortFunc(addrs, func(a, c addr) int { return comparePrefix(a.prefix, c.prefix) })
		for _, a := range addrs {
			fmt.Fprintf(&b, "  address %s", a.prefix)
			if a.flags&unix.IFA_F_NODAD != 0 {
				b.WriteString(" nodad")
			}
			b.WriteString("\n")
		}
	}
	var lines []string
	for _, r := range slices.Concat(l.routes, l.derived()) {
		dst, _ := prefixOfIPNet(r.Dst)
		name := fmt.Sprintf("index%d", r.LinkIndex)
		if lk, ok := l.links[r.LinkIndex]; ok {
			name = lk.name
		}
		table := fmt.Sprint(r.Table)
		if r.Table == unix.RT_TABLE_MAIN {
			table = "main"
		}
		lines = append(lines, fmt.Sprintf("route %s %s dev %s proto %s scope %s metric %d type %d\n",
			table, dst, name, proto(r.Protocol), r.Scope, r.Priority, r.Type))
	}
	slices.Sort(lines)
	for _, s := range lines {
		b.WriteString(s)
	}
	return b.String()
}

func proto(p netlink.RouteProtocol) string {
	switch p {
	case unix.RTPROT_KERNEL:
		return "kernel"
	case unix.RTPROT_BOOT:
		return "boot"
	case unix.RTPROT_STATIC:
		return "static"
	}
	return fmt.Sprint(int(p))
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}
