package policy

import "net/netip"

// Protocol of a PortMatch.
type Protocol string

// Protocols a rule can name. ProtoICMP covers ICMPv4 and ICMPv6 echo request.
const (
	ProtoAny  Protocol = "any"
	ProtoTCP  Protocol = "tcp"
	ProtoUDP  Protocol = "udp"
	ProtoICMP Protocol = "icmp"
)

// PortRange is an inclusive range of transport ports; First == Last for one port.
type PortRange struct{ First, Last uint16 }

// PortMatch matches one protocol and, for TCP and UDP, a list of destination port
// ranges; an empty Ports list means every port of the protocol.
type PortMatch struct {
	Protocol Protocol
	Ports    []PortRange
}

// AddressSet is a named set of prefixes of both families, one per segment that a
// node's filter references. The firewall renders it as two nftables interval sets
// (NAME_v4, NAME_v6), so a membership change only touches set elements.
type AddressSet struct {
	Name     string
	Prefixes []netip.Prefix
}

// FilterRule allows new connections whose remote address (the source for ingress,
// the destination for egress) lies in the set named Set and that match one of
// Matches. Origin says where the rule came from, e.g. "web-to-db (policy.yaml:12:5)".
type FilterRule struct {
	Set     string
	Matches []PortMatch
	Origin  string
}

// Filter is one node's compiled policy. It applies to the overlay interface only:
// established/related traffic is accepted first, then Ingress rules (input) and
// Egress rules (output) for new connections, then everything else is dropped.
type Filter struct {
	Sets    []AddressSet
	Ingress []FilterRule
	Egress  []FilterRule
}
