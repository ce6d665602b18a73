package policy

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// PortSet is a set of (protocol, destination port) pairs: TCP and UDP ports
// 0-65535, ICMP echo request (IPv4 and IPv6), and Other, which stands for every
// other IP protocol and every other ICMP type together. A rule's "tcp" holds TCP
// ports 0-65535, "tcp/22" only port 22, "icmp" only ICMP echo, and "any" all of
// it, Other included. The zero value is the empty set; a PortSet is a value and
// its methods never modify their receiver or arguments.
type PortSet struct {
	tcp, udp    []PortRange // sorted, disjoint, not adjacent
	icmp, other bool
}

// fullRange is every port of a protocol, port 0 included.
var fullRange = []PortRange{{0, 65535}}

// PortSetOf returns the set of packets that ms match.
func PortSetOf(ms []PortMatch) PortSet {
	var s PortSet
	for _, m := range ms {
		s = s.Union(portSetOfMatch(m))
	}
	return s
}

func portSetOfMatch(m PortMatch) PortSet {
	switch m.Protocol {
	case ProtoAny:
		return PortSet{tcp: fullRange, udp: fullRange, icmp: true, other: true}
	case ProtoICMP:
		return PortSet{icmp: true}
	case ProtoTCP, ProtoUDP:
		rs := fullRange
		if len(m.Ports) > 0 {
			rs = mergeRanges(m.Ports)
		}
		if m.Protocol == ProtoTCP {
			return PortSet{tcp: rs}
		}
		return PortSet{udp: rs}
	}
	return PortSet{}
}

// Empty reports whether s holds no packet.
func (s PortSet) Empty() bool { return len(s.tcp) == 0 && len(s.udp) == 0 && !s.icmp && !s.other }

// Equal reports whether s and t hold the same packets.
func (s PortSet) Equal(t PortSet) bool {
	return s.icmp == t.icmp && s.other == t.other && slices.Equal(s.tcp, t.tcp) && slices.Equal(s.udp, t.udp)
}

// Union returns s ∪ t.
func (s PortSet) Union(t PortSet) PortSet {
	return PortSet{tcp: unionRanges(s.tcp, t.tcp), udp: unionRanges(s.udp, t.udp), icmp: s.icmp || t.icmp, other: s.other || t.other}
}

// Intersect returns s ∩ t.
func (s PortSet) Intersect(t PortSet) PortSet {
	return PortSet{tcp: intersectRanges(s.tcp, t.tcp), udp: intersectRanges(s.udp, t.udp), icmp: s.icmp && t.icmp, other: s.other && t.other}
}

// Minus returns s \ t.
func (s PortSet) Minus(t PortSet) PortSet {
	return PortSet{tcp: subtractRanges(s.tcp, t.tcp), udp: subtractRanges(s.udp, t.udp), icmp: s.icmp && !t.icmp, other: s.other && !t.other}
}

// Contains reports whether every packet of t is in s.
func (s PortSet) Contains(t PortSet) bool { return t.Minus(s).Empty() }

// Has reports whether s holds the packet pk.
func (s PortSet) Has(pk Packet) bool { return s.Contains(pk.set()) }

// First returns one packet of s, the first in the order ICMP echo, TCP, UDP,
// other, lowest port first but port 0 last; false when s is empty.
func (s PortSet) First() (Packet, bool) {
	first := func(rs []PortRange) uint16 {
		if rs[0].First == 0 && rs[0].Last == 0 && len(rs) > 1 {
			return rs[1].First
		}
		if rs[0].First == 0 && rs[0].Last > 0 {
			return 1
		}
		return rs[0].First
	}
	switch {
	case s.icmp:
		return Packet{Protocol: ProtoICMP}, true
	case len(s.tcp) > 0:
		return Packet{Protocol: ProtoTCP, Port: first(s.tcp)}, true
	case len(s.udp) > 0:
		return Packet{Protocol: ProtoUDP, Port: first(s.udp)}, true
	case s.other:
		return Packet{Protocol: ProtoAny}, true
	}
	return Packet{}, false
}

// String writes s in the policy file's port syntax, entries separated by spaces
// and ranges of one protocol by commas: "any" for every packet, "" for none,
// otherwise e.g. "icmp tcp/22,8000-8100 udp other", where "tcp" alone means every
// TCP port and "other" every protocol and ICMP type that only "any" covers.
func (s PortSet) String() string {
	if s.icmp && s.other && slices.Equal(s.tcp, fullRange) && slices.Equal(s.udp, fullRange) {
		return string(ProtoAny)
	}
	var parts []string
	if s.icmp {
		parts = append(parts, string(ProtoICMP))
	}
	for _, p := range []struct {
		proto Protocol
		rs    []PortRange
	}{{ProtoTCP, s.tcp}, {ProtoUDP, s.udp}} {
		switch {
		case len(p.rs) == 0:
		case slices.Equal(p.rs, fullRange):
			parts = append(parts, string(p.proto))
		default:
			parts = append(parts, string(p.proto)+"/"+formatRanges(p.rs))
		}
	}
	if s.other {
		parts = append(parts, "other")
	}
	return strings.Join(parts, " ")
}

// MarshalText encodes s as String does (JSON output of the tools).
func (s PortSet) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

func formatRanges(rs []PortRange) string {
	parts := make([]string, len(rs))
	for i, r := range rs {
		parts[i] = formatRange(r)
	}
	return strings.Join(parts, ",")
}

func formatRange(r PortRange) string {
	if r.First == r.Last {
		return strconv.Itoa(int(r.First))
	}
	return strconv.Itoa(int(r.First)) + "-" + strconv.Itoa(int(r.Last))
}

func unionRanges(a, b []PortRange) []PortRange {
	switch {
	case len(b) == 0:
		return a
	case len(a) == 0:
		return b
	}
	return mergeRanges(slices.Concat(a, b))
}

func intersectRanges(a, b []PortRange) []PortRange {
	var out []PortRange
	for i, j := 0, 0; i < len(a) && j < len(b); {
		lo, hi := max(a[i].First, b[j].First), min(a[i].Last, b[j].Last)
		if lo <= hi {
			out = append(out, PortRange{lo, hi})
		}
		if a[i].Last < b[j].Last {
			i++
		} else {
			j++
		}
	}
	return out
}

func subtractRanges(a, b []PortRange) []PortRange {
	if len(b) == 0 {
		return a
	}
	var out []PortRange
	j := 0
	for _, r := range a {
		first := int(r.First)
		for j < len(b) && int(b[j].Last) < first {
			j++
		}
		k := j
		for ; k < len(b) && int(b[k].First) <= int(r.Last); k++ {
			if int(b[k].First) > first {
				out = append(out, PortRange{uint16(first), b[k].First - 1})
			}
			first = int(b[k].Last) + 1
		}
		if first <= int(r.Last) {
			out = append(out, PortRange{uint16(first), r.Last})
		}
	}
	return out
}

// Packet is the protocol and destination port of one new connection. Port is 0
// for ICMP echo (Protocol icmp) and for Protocol any, which here stands for a
// packet of a protocol only "any" covers.
type Packet struct {
	Protocol Protocol
	Port     uint16
}

// String writes pk as "tcp/5432", "udp/53", "icmp" or, for Protocol any, "other".
func (pk Packet) String() string {
	switch pk.Protocol {
	case ProtoTCP, ProtoUDP:
		return string(pk.Protocol) + "/" + strconv.Itoa(int(pk.Port))
	case ProtoAny:
		return "other"
	}
	return string(pk.Protocol)
}

func (pk Packet) set() PortSet {
	switch pk.Protocol {
	case ProtoTCP:
		return PortSet{tcp: []PortRange{{pk.Port, pk.Port}}}
	case ProtoUDP:
		return PortSet{udp: []PortRange{{pk.Port, pk.Port}}}
	case ProtoICMP:
		return PortSet{icmp: true}
	case ProtoAny:
		return PortSet{other: true}
	}
	return PortSet{}
}

// ParsePacket parses one packet as the tools take it: "tcp/5432", "udp/53" or
// "icmp". A port range, a protocol without a port, "any" or a port without a
// protocol is an error that says what to write instead.
func ParsePacket(s string) (Packet, error) {
	m, err := parsePort(s)
	if err != nil {
		return Packet{}, err
	}
	switch {
	case m.Protocol == ProtoAny:
		return Packet{}, fmt.Errorf("%q is every packet; name one: tcp/PORT, udp/PORT or icmp", s)
	case m.Protocol == ProtoICMP:
		return Packet{Protocol: ProtoICMP}, nil
	case len(m.Ports) == 0:
		return Packet{}, fmt.Errorf("%q names no port; write %s/PORT", s, s)
	case m.Ports[0].First != m.Ports[0].Last:
		return Packet{}, fmt.Errorf("%q is a range; name one port, e.g. %s/%d", s, m.Protocol, m.Ports[0].First)
	}
	return Packet{Protocol: m.Protocol, Port: m.Ports[0].First}, nil
}
