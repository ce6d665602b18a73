package policy

import (
	"cmp"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// parsePort parses one entry of a rule's ports list: "any", "icmp", "tcp", "udp"
// (every port of the protocol), "tcp/N" or "tcp/FIRST-LAST" (likewise udp). The
// error message says what is wrong and, where it can, what was probably meant.
func parsePort(s string) (PortMatch, error) {
	proto, ports, hasPorts := strings.Cut(s, "/")
	switch Protocol(proto) {
	case ProtoAny, ProtoICMP:
		if hasPorts {
			return PortMatch{}, fmt.Errorf("protocol %s takes no ports; write %q", proto, proto)
		}
		return PortMatch{Protocol: Protocol(proto)}, nil
	case ProtoTCP, ProtoUDP:
		if !hasPorts {
			return PortMatch{Protocol: Protocol(proto)}, nil
		}
		r, err := parsePortRange(ports)
		if err != nil {
			return PortMatch{}, fmt.Errorf("%w in %q", err, s)
		}
		return PortMatch{Protocol: Protocol(proto), Ports: []PortRange{r}}, nil
	}
	if !hasPorts && looksNumeric(s) {
		return PortMatch{}, fmt.Errorf("port %q has no protocol; did you mean tcp/%s or udp/%s?", s, s, s)
	}
	msg := fmt.Sprintf("unknown protocol %q in %q; want tcp, udp, icmp or any", proto, s)
	if l := strings.ToLower(proto); l != proto && slices.Contains([]string{"tcp", "udp", "icmp", "any"}, l) {
		msg += fmt.Sprintf(" (did you mean %q?)", l)
	}
	return PortMatch{}, fmt.Errorf("%s", msg)
}

// looksNumeric reports whether s is a port or port range without a protocol.
func looksNumeric(s string) bool {
	first, last, _ := strings.Cut(s, "-")
	return allDigits(first) && (last == "" && !strings.Contains(s, "-") || allDigits(last))
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// parsePortRange parses "N" or "FIRST-LAST" with 1 <= FIRST <= LAST <= 65535.
func parsePortRange(s string) (PortRange, error) {
	a, b, isRange := strings.Cut(s, "-")
	first, err := parsePortNumber(a)
	if err != nil {
		return PortRange{}, err
	}
	if !isRange {
		return PortRange{First: first, Last: first}, nil
	}
	last, err := parsePortNumber(b)
	if err != nil {
		return PortRange{}, err
	}
	if first > last {
		return PortRange{}, fmt.Errorf("port range %d-%d has first > last (did you mean %d-%d?)", first, last, last, first)
	}
	return PortRange{First: first, Last: last}, nil
}

func parsePortNumber(s string) (uint16, error) {
	if !allDigits(s) {
		return 0, fmt.Errorf("invalid port %q: want a number 1-65535 or a range FIRST-LAST", s)
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || n == 0 || n > 65535 {
		return 0, fmt.Errorf("port %s is out of range 1-65535", strings.TrimLeft(s, "0")+zeroIfEmpty(s))
	}
	return uint16(n), nil
}

func zeroIfEmpty(s string) string {
	if strings.TrimLeft(s, "0") == "" {
		return "0"
	}
	return ""
}

// protoOrder sorts protocols: any, icmp, tcp, udp.
func protoOrder(p Protocol) int {
	switch p {
	case ProtoAny:
		return 0
	case ProtoICMP:
		return 1
	case ProtoTCP:
		return 2
	case ProtoUDP:
		return 3
	}
	return 4
}

// mergeMatches returns the canonical union of ms: at most one match per protocol,
// sorted by protocol (any, icmp, tcp, udp); "any" subsumes every other match; a
// match without ports subsumes every port list of its protocol; port ranges are
// sorted and overlapping or adjacent ranges merged. ms is not modified.
func mergeMatches(ms []PortMatch) []PortMatch {
	if len(ms) == 0 {
		return nil
	}
	type acc struct {
		seen, all bool
		ranges    []PortRange
	}
	var by [4]acc
	for _, m := range ms {
		i := protoOrder(m.Protocol)
		if i > 3 {
			continue
		}
		a := &by[i]
		a.seen = true
		if len(m.Ports) == 0 {
			a.all = true
		} else if !a.all {
			a.ranges = append(a.ranges, m.Ports...)
		}
	}
	if by[0].seen {
		return []PortMatch{{Protocol: ProtoAny}}
	}
	var out []PortMatch
	for i, p := range []Protocol{ProtoAny, ProtoICMP, ProtoTCP, ProtoUDP} {
		a := by[i]
		if !a.seen {
			continue
		}
		m := PortMatch{Protocol: p}
		if !a.all && (p == ProtoTCP || p == ProtoUDP) {
			m.Ports = mergeRanges(a.ranges)
		}
		out = append(out, m)
	}
	return out
}

// mergeRanges sorts rs into a new slice and merges overlapping or adjacent ranges.
func mergeRanges(rs []PortRange) []PortRange {
	s := slices.Clone(rs)
	slices.SortFunc(s, func(a, b PortRange) int {
		return cmp.Or(cmp.Compare(a.First, b.First), cmp.Compare(a.Last, b.Last))
	})
	out := s[:0]
	for _, r := range s {
		if n := len(out); n > 0 && int(r.First) <= int(out[n-1].Last)+1 {
			out[n-1].Last = max(out[n-1].Last, r.Last)
			continue
		}
		out = append(out, r)
	}
	return slices.Clip(out)
}
