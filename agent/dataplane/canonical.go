package dataplane

import (
	"bytes"
	"cmp"
	"net/netip"
	"slices"
)

// Canonical returns a deep copy of s with every list sorted and deduplicated, so that
// two States describing the same dataplane compare equal with Equal (or reflect.DeepEqual).
// Empty lists are normalised to nil.
func Canonical(s State) State {
	out := s
	out.Addresses = sortPrefixes(s.Addresses)
	out.Routes = sortPrefixes(s.Routes)
	out.Peers = nil
	for _, p := range s.Peers {
		p.AllowedIPs = sortPrefixes(p.AllowedIPs)
		out.Peers = append(out.Peers, p)
	}
	slices.SortFunc(out.Peers, func(a, b Peer) int { return bytes.Compare(a.PublicKey[:], b.PublicKey[:]) })
	out.Filter = CanonicalFilter(s.Filter)
	return out
}

// CanonicalFilter sorts sets by name and their prefixes; rule order is kept because it
// is significant for humans reading the ruleset (not for the verdict: rules are a union).
func CanonicalFilter(f Filter) Filter {
	var out Filter
	for _, set := range f.Sets {
		out.Sets = append(out.Sets, AddressSet{Name: set.Name, Prefixes: sortPrefixes(set.Prefixes)})
	}
	slices.SortFunc(out.Sets, func(a, b AddressSet) int { return cmp.Compare(a.Name, b.Name) })
	out.Ingress = cloneRules(f.Ingress)
	out.Egress = cloneRules(f.Egress)
	return out
}

func cloneRules(rs []FilterRule) []FilterRule {
	if len(rs) == 0 {
		return nil
	}
	out := make([]FilterRule, 0, len(rs))
	for _, r := range rs {
		c := FilterRule{Set: r.Set, Origin: r.Origin}
		for _, m := range r.Matches {
			c.Matches = append(c.Matches, PortMatch{Protocol: m.Protocol, Ports: slices.Clone(m.Ports)})
		}
		out = append(out, c)
	}
	return out
}

func sortPrefixes(ps []netip.Prefix) []netip.Prefix {
	if len(ps) == 0 {
		return nil
	}
	out := slices.Clone(ps)
	slices.SortFunc(out, comparePrefix)
	return slices.Compact(out)
}

// comparePrefix orders prefixes by address, then length.
func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}
