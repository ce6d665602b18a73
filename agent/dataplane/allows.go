package dataplane

import (
	"net/netip"
	"slices"
)

// IANA IP protocol numbers a Flow can carry.
const (
	IPProtoICMP   uint8 = 1
	IPProtoTCP    uint8 = 6
	IPProtoUDP    uint8 = 17
	IPProtoICMPv6 uint8 = 58
)

// Flow is a connection as a node's filter judges it when its first packet passes:
// who opened it, the remote address, the IP protocol and the destination port.
type Flow struct {
	// Ingress is true for a flow the remote opened towards this node (judged by
	// Filter.Ingress with Remote as source) and false for a flow this node opened
	// (judged by Filter.Egress with Remote as destination).
	Ingress bool
	// Remote is the other end's address; an IPv4 address must not be IPv4-mapped.
	Remote netip.Addr
	// Protocol is the IANA IP protocol number (IPProtoTCP, IPProtoUDP, IPProtoICMP,
	// IPProtoICMPv6 or any other). An ICMP or ICMPv6 flow is taken to be an echo
	// exchange, the only ICMP a rule allows.
	Protocol uint8
	// DstPort is the destination port of the opening packet (TCP and UDP only).
	DstPort uint16
}

// Allows reports whether filter f accepts fl as a new connection: whether some rule of
// the flow's direction names a set that holds fl.Remote and has a match for the flow
// (ProtoAny matches every protocol; ProtoTCP/ProtoUDP match their protocol and, when
// Ports is not empty, a destination port within one of the ranges; ProtoICMP matches
// ICMP and ICMPv6 echo). It is the verdict of the nftables table rendered from f for
// the flow's first packet; established and related packets are outside its scope.
// A rule whose set f does not define allows nothing.
func Allows(f Filter, fl Flow) bool {
	rules := f.Egress
	if fl.Ingress {
		rules = f.Ingress
	}
	for _, r := range rules {
		if !setContains(f.Sets, r.Set, fl.Remote) {
			continue
		}
		for _, m := range r.Matches {
			if matches(m, fl) {
				return true
			}
		}
	}
	return false
}

func setContains(sets []AddressSet, name string, a netip.Addr) bool {
	i := slices.IndexFunc(sets, func(s AddressSet) bool { return s.Name == name })
	if i < 0 {
		return false
	}
	return slices.ContainsFunc(sets[i].Prefixes, func(p netip.Prefix) bool { return p.Contains(a) })
}

func matches(m PortMatch, fl Flow) bool {
	switch m.Protocol {
	case ProtoAny:
		return true
	case ProtoICMP:
		return fl.Protocol == IPProtoICMP || fl.Protocol == IPProtoICMPv6
	case ProtoTCP, ProtoUDP:
		want := IPProtoTCP
		if m.Protocol == ProtoUDP {
			want = IPProtoUDP
		}
		if fl.Protocol != want {
			return false
		}
		return len(m.Ports) == 0 || slices.ContainsFunc(m.Ports, func(r PortRange) bool {
			return r.First <= fl.DstPort && fl.DstPort <= r.Last
		})
	}
	return false
}
