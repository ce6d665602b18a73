package linux

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"segmesh/agent/dataplane"
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
// tuple has one of the node's addresses at exactly one end and that filter does not
// allow (see dataplane.Allows; the original direction says who opened it). It
// returns how many entries it deleted. d.mu must be held.
func (d *Dataplane) cutRevokedFlows(filter dataplane.Filter, addresses []netip.Prefix) (uint, error) {
	rv := revoked{filter: filter, self: map[netip.Addr]bool{}}
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

// revoked matches the conntrack entries of the node's flows that filter denies.
type revoked struct {
	filter dataplane.Filter
	self   map[netip.Addr]bool
}

func (r revoked) MatchConntrackFlow(ct *netlink.ConntrackFlow) bool {
	fl, ok := flowOf(ct, r.self)
	return ok && !dataplane.Allows(r.filter, fl)
}

// flowOf describes a conntrack entry as a dataplane.Flow from the node's point of
// view. ok is false when neither or both ends of the original tuple are the node's
// addresses (transit or local traffic, which the filter does not judge).
func flowOf(ct *netlink.ConntrackFlow, self map[netip.Addr]bool) (fl dataplane.Flow, ok bool) {
	src, okSrc := netip.AddrFromSlice(ct.Forward.SrcIP)
	dst, okDst := netip.AddrFromSlice(ct.Forward.DstIP)
	if !okSrc || !okDst {
		return fl, false
	}
	if ct.FamilyType == unix.AF_INET {
		src, dst = src.Unmap(), dst.Unmap()
	}
	srcSelf, dstSelf := self[src], self[dst]
	if srcSelf == dstSelf {
		return fl, false
	}
	fl = dataplane.Flow{Ingress: dstSelf, Remote: dst, Protocol: ct.Forward.Protocol}
	if dstSelf {
		fl.Remote = src
	}
	if fl.Protocol == unix.IPPROTO_TCP || fl.Protocol == unix.IPPROTO_UDP {
		fl.DstPort = ct.Forward.DstPort
	}
	return fl, true
}
