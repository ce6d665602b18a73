package linux

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"segmesh/agent/dataplane"
	"segmesh/agent/firewall"
)

// The filter accepts established and related packets before it looks at the policy,
// so removing a rule or a set element alone would leave the connections it allowed
// working. cutRevokedFlows therefore deletes the conntrack entries of the node's
// connections that the new filter would not accept as new connections; their next
// packet is then judged as a new connection (TCP is picked up mid-stream by
// conntrack) and dropped. Entries the filter still allows stay: deleting them would
// break allowed flows whose next packet comes from the responder's side.

// dumpRetries bounds the conntrack dumps of one sweep interrupted by table changes.
const dumpRetries = 3

// cutRevokedFlows deletes, in both families, every conntrack entry between an
// address of this host (an overlay address, or any other address of the namespace:
// a peer may aim at those through the tunnel, WireGuard checks only the source) and
// an address reached through the overlay (within the overlay routes or a peer's
// allowed IPs) whose first packet table would not accept (firewall.Table.Trace of the
// connection's opening packet; the original direction says who opened it). s is the
// desired state. It returns how many entries it deleted. d.mu must be held.
func (d *Dataplane) cutRevokedFlows(table *firewall.Table, s dataplane.State) (uint, error) {
	rv := revoked{table: table, iface: d.opts.Interface, self: map[netip.Addr]bool{}}
	for _, p := range s.Addresses {
		rv.self[p.Addr()] = true
	}
	if len(rv.self) == 0 {
		return 0, nil
	}
	addrs, err := d.nl.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return 0, fmt.Errorf("listing the namespace's addresses: %w", err)
	}
	for _, a := range addrs {
		if a.IPNet == nil {
			continue
		}
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			rv.self[ip.Unmap()] = true
		}
	}
	rv.overlay = slices.Clone(s.Routes)
	for _, p := range s.Peers {
		rv.overlay = append(rv.overlay, p.AllowedIPs...)
	}
	var total uint
	for _, family := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
		var err error
		for range dumpRetries {
			var n uint
			n, err = d.nl.ConntrackDeleteFilters(netlink.ConntrackTable, family, rv)
			total += n
			if !errors.Is(err, netlink.ErrDumpInterrupted) {
				break
			}
		}
		if err != nil {
			name := map[netlink.InetFamily]string{unix.AF_INET: "IPv4", unix.AF_INET6: "IPv6"}[family]
			return total, fmt.Errorf("deleting %s conntrack entries: %w", name, err)
		}
	}
	return total, nil
}

// revoked matches the conntrack entries of the node's overlay flows that table
// denies.
type revoked struct {
	table *firewall.Table
	iface string
	self  map[netip.Addr]bool
	// overlay are the prefixes reached through the overlay interface.
	overlay []netip.Prefix
}

func (r revoked) MatchConntrackFlow(ct *netlink.ConntrackFlow) bool {
	p, ok := openingOf(ct, r.iface, r.self)
	if !ok {
		return false
	}
	remote := p.Dst
	if p.Hook == firewall.HookInput {
		remote = p.Src
	}
	if !slices.ContainsFunc(r.overlay, func(o netip.Prefix) bool { return o.Contains(remote) }) {
		return false // not the overlay's traffic: the table does not judge it
	}
	return !r.table.Trace(p).Accepted()
}

// openingOf describes the first packet of a conntrack entry's connection as the
// table on iface sees it (after destination NAT). ok is false when neither or both
// ends are the node's addresses (transit or local traffic, which the filter does not
// judge).
func openingOf(ct *netlink.ConntrackFlow, iface string, self map[netip.Addr]bool) (p firewall.Packet, ok bool) {
	// The filter hooks see a packet after destination NAT (nat prerouting and output
	// run before them) and before source NAT: its destination is the source of the
	// reply tuple (the original tuple's unless another table rewrote it).
	src, okSrc := netip.AddrFromSlice(ct.Forward.SrcIP)
	dst, okDst := netip.AddrFromSlice(ct.Reverse.SrcIP)
	dport := ct.Reverse.SrcPort
	if !okDst {
		dst, okDst = netip.AddrFromSlice(ct.Forward.DstIP)
		dport = ct.Forward.DstPort
	}
	if !okSrc || !okDst {
		return p, false
	}
	if ct.FamilyType == unix.AF_INET {
		src, dst = src.Unmap(), dst.Unmap()
	}
	srcSelf, dstSelf := self[src], self[dst]
	if srcSelf == dstSelf {
		return p, false
	}
	if dstSelf {
		return firewall.Opening(iface, true, dst, src, ct.Forward.Protocol, dport), true
	}
	return firewall.Opening(iface, false, src, dst, ct.Forward.Protocol, dport), true
}
