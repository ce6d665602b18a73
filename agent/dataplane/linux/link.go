package linux

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"segmesh/agent/dataplane"
)

// configureLink sets MTU and addresses, brings the link (and a wireguard-go device)
// up, and sets routes. Addresses end up exactly s.Addresses; routes in the main table
// through the link, other than those the kernel derives from addresses, end up
// exactly s.Routes. Routes through other links are never touched. Nothing is changed
// when the link already matches. d.mu must be held.
func (d *Dataplane) configureLink(link netlink.Link, s dataplane.State, mtu int) error {
	snap, err := d.linkState()
	if err != nil {
		return err
	}
	if snap.link == nil || snap.link.Attrs().Index != link.Attrs().Index {
		return fmt.Errorf("interface %s vanished", d.opts.Interface)
	}
	link = snap.link
	changed := false
	defer func() {
		if changed {
			d.linkChanged()
		}
	}()
	if link.Attrs().MTU != mtu {
		changed = true
		if err := d.rtnl.LinkSetMTU(link, mtu); err != nil {
			return fmt.Errorf("setting MTU %d: %w", mtu, err)
		}
	}
	for _, p := range minus(snap.addrs, s.Addresses) {
		changed = true
		if err := d.rtnl.AddrDel(link, &netlink.Addr{IPNet: ipNetPtr(p)}); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("removing address %s: %w", p, err)
		}
	}
	for _, p := range minus(s.Addresses, snap.addrs) {
		changed = true
		a := &netlink.Addr{IPNet: ipNetPtr(p)}
		if p.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD // usable at once; the overlay has no duplicates to detect
		}
		if err := d.rtnl.AddrAdd(link, a); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("adding address %s: %w", p, err)
		}
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		changed = true
		if err := d.rtnl.LinkSetUp(link); err != nil {
			return fmt.Errorf("setting link up: %w", err)
		}
	}
	if d.user != nil {
		// wireguard-go also comes up on the TUN's up event; doing it here makes its
		// UDP socket exist when Apply returns and reports a busy port.
		if err := d.user.dev.Up(); err != nil {
			return fmt.Errorf("bringing up wireguard-go: %w", err)
		}
	}
	var haveDst []netip.Prefix
	for _, r := range snap.routes {
		p, _ := routeDst(r)
		if !contains(s.Routes, p) {
			changed = true
			if err := d.rtnl.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("removing route %s: %w", p, err)
			}
			continue
		}
		haveDst = append(haveDst, p)
	}
	for _, p := range minus(s.Routes, haveDst) {
		changed = true
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNetPtr(p), Table: unix.RT_TABLE_MAIN,
			Protocol: unix.RTPROT_STATIC, Scope: netlink.SCOPE_LINK}
		if p.Addr().Is6() {
			r.Scope = netlink.SCOPE_UNIVERSE
		}
		if err := d.rtnl.RouteReplace(r); err != nil {
			return fmt.Errorf("adding route %s: %w", p, err)
		}
	}
	return nil
}

// addresses returns the link's addresses as prefixes.
func (d *Dataplane) addresses(link netlink.Link) ([]netip.Prefix, error) {
	var addrs []netlink.Addr
	err := retryInterrupted(func() (err error) {
		addrs, err = d.rtnl.AddrList(link, netlink.FAMILY_ALL)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		if a.IPNet == nil {
			continue
		}
		if p, ok := prefixOf(*a.IPNet); ok {
			out = append(out, p)
		}
	}
	return out, nil
}

// routeList returns the main-table routes through link that the kernel did not derive
// from addresses.
func (d *Dataplane) routeList(link netlink.Link) ([]netlink.Route, error) {
	var all []netlink.Route
	filter := &netlink.Route{LinkIndex: link.Attrs().Index, Table: unix.RT_TABLE_MAIN}
	err := retryInterrupted(func() (err error) {
		all, err = d.rtnl.RouteListFiltered(netlink.FAMILY_ALL, filter, netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listing routes: %w", err)
	}
	var out []netlink.Route
	for _, r := range all {
		if _, ok := routeDst(r); ok && r.Protocol != unix.RTPROT_KERNEL && r.Type == unix.RTN_UNICAST {
			out = append(out, r)
		}
	}
	return out, nil
}

// routeDst returns a route's destination; a nil Dst is the default route of its family.
func routeDst(r netlink.Route) (netip.Prefix, bool) {
	if r.Dst == nil {
		switch r.Family {
		case unix.AF_INET:
			return netip.PrefixFrom(netip.IPv4Unspecified(), 0), true
		case unix.AF_INET6:
			return netip.PrefixFrom(netip.IPv6Unspecified(), 0), true
		}
		return netip.Prefix{}, false
	}
	return prefixOf(*r.Dst)
}

// retryInterrupted retries a netlink dump the kernel interrupted because the list
// changed meanwhile.
func retryInterrupted(f func() error) error {
	var err error
	for range 5 {
		if err = f(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
	}
	return err
}

func ipNetPtr(p netip.Prefix) *net.IPNet {
	n := ipNet(p)
	return &n
}

func contains(ps []netip.Prefix, p netip.Prefix) bool {
	for _, q := range ps {
		if q == p {
			return true
		}
	}
	return false
}

// minus returns the prefixes of a that are not in b.
func minus(a, b []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range a {
		if !contains(b, p) {
			out = append(out, p)
		}
	}
	return out
}
