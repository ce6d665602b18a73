package firewall

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"segmesh/policy"
)

// Filter recovers the policy.Filter that t enforces, the inverse of Build for a table
// Build made: a set pair NAME_v4/NAME_v6 becomes AddressSet NAME, the positioned rules
// of chains ingress and egress become FilterRules. hint (may be nil) is the Filter
// last built into the kernel: a set whose intervals are exactly hint's set is given
// hint's prefixes, and a cut comment hint's full Origin; otherwise a set holds the
// fewest prefixes covering its intervals. Whatever Build never makes (foreign sets,
// unpositioned rules) is skipped; Compare reports it.
func (t *Table) Filter(hint *policy.Filter) policy.Filter {
	var out policy.Filter
	hintSets := map[string]policy.AddressSet{}
	origins := map[string]string{}
	if hint != nil {
		for _, s := range hint.Sets {
			hintSets[s.Name] = s
		}
		for _, r := range slices.Concat(hint.Ingress, hint.Egress) {
			origins[Comment(r.Origin)] = r.Origin
		}
	}
	for _, s := range t.Sets {
		base, ok := strings.CutSuffix(s.Name, FamilyIPv4.setSuffix())
		if !ok || s.Type != TypeIPv4 || s.Foreign != "" {
			continue
		}
		v6 := t.Set(base + FamilyIPv6.setSuffix())
		if v6 == nil || v6.Type != TypeIPv6 || v6.Foreign != "" {
			continue
		}
		prefixes := slices.Concat(setPrefixes(s.Elements, hintSets[base], true), setPrefixes(v6.Elements, hintSets[base], false))
		out.Sets = append(out.Sets, policy.AddressSet{Name: base, Prefixes: prefixes})
	}
	if c := t.Chain(ChainIngress); c != nil {
		out.Ingress = filterRules(c.Rules, origins)
	}
	if c := t.Chain(ChainEgress); c != nil {
		out.Egress = filterRules(c.Rules, origins)
	}
	return out
}

// setPrefixes returns the prefixes of one family half: hint's when they render to
// exactly ivs, else the fewest prefixes covering ivs.
func setPrefixes(ivs []Interval, hint policy.AddressSet, v4 bool) []netip.Prefix {
	var mine []netip.Prefix
	for _, p := range hint.Prefixes {
		if p.Addr().Is4() == v4 {
			mine = append(mine, p)
		}
	}
	if len(mine) > 0 && slices.Equal(PrefixIntervals(mine), ivs) {
		return mine
	}
	var out []netip.Prefix
	for _, iv := range ivs {
		out = append(out, IntervalPrefixes(iv)...)
	}
	return out
}

// filterRules recovers FilterRules from the positioned rules of a policy chain.
func filterRules(rules []Rule, origins map[string]string) []policy.FilterRule {
	var out []policy.FilterRule
	lastRule, lastMatch := -1, -1
	for _, r := range rules {
		if r.Unknown != "" || !r.HasPos || r.Set == "" {
			continue
		}
		ri, mi := int(r.Pos>>16), int(r.Pos&0xffff)
		if ri != lastRule {
			origin := r.Comment
			if full, ok := origins[r.Comment]; ok {
				origin = full
			}
			set := strings.TrimSuffix(strings.TrimSuffix(r.Set, FamilyIPv4.setSuffix()), FamilyIPv6.setSuffix())
			out = append(out, policy.FilterRule{Set: set, Origin: origin})
			lastRule, lastMatch = ri, -1
		}
		if mi == PosNoMatch {
			continue
		}
		cur := &out[len(out)-1]
		if mi != lastMatch {
			cur.Matches = append(cur.Matches, policy.PortMatch{Protocol: protocolOf(r)})
			lastMatch = mi
		}
		if r.HasDPort && r.Family == FamilyIPv4 {
			m := &cur.Matches[len(cur.Matches)-1]
			m.Ports = append(m.Ports, r.DPort)
		}
	}
	return out
}

func protocolOf(r Rule) policy.Protocol {
	switch r.L4Proto {
	case 0:
		return policy.ProtoAny
	case ProtoTCP:
		return policy.ProtoTCP
	case ProtoUDP:
		return policy.ProtoUDP
	case ProtoICMP, ProtoICMPv6:
		return policy.ProtoICMP
	}
	return policy.Protocol(fmt.Sprintf("ipproto-%d", r.L4Proto))
}
