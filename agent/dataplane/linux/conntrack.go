package linux

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

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

// cutRevokedFlows deletes, in both families, every conntrack entry whose original
// tuple has one of the node's addresses at exactly one end and whose first packet
// table would not accept (firewall.Table.Trace of the connection's opening packet;
// the original direction says who opened it). It returns how many entries it
// deleted. d.mu must be held.
func (d *Dataplane) cutRevokedFlows(table *firewall.Table, addresses []netip.Prefix) (uint, error) {
	rv := revoked{table: table, iface: d.opts.Interface, self: map[netip.Addr]bool{}}
	for _, p := range addresses {
		rv.self[p.Addr()] = true
	}
	if len(rv.self) == 0 {
		return 0, nil
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

// revoked matches the conntrack entries of the node's flows that table denies.
type revoked struct {
	table *firewall.Table
	iface string
	self  map[netip.Addr]bool
}

func (r revoked) MatchConntrackFlow(ct *netlink.ConntrackFlow) bool {
	p, ok := openingOf(ct, r.iface, r.self)
	return ok && !r.table.Trace(p).Accepted()
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
