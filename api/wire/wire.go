// Package wire converts between the pure policy types and the protobuf messages of
// the wire API (package segmeshv1), and hashes netmaps. Both the controller and the
// agent use it, so a filter means the same thing on both ends.
package wire

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"

	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
	"segmesh/policy"
)

var protoToPB = map[policy.Protocol]segmeshv1.Protocol{
	policy.ProtoAny:  segmeshv1.Protocol_PROTOCOL_ANY,
	policy.ProtoTCP:  segmeshv1.Protocol_PROTOCOL_TCP,
	policy.ProtoUDP:  segmeshv1.Protocol_PROTOCOL_UDP,
	policy.ProtoICMP: segmeshv1.Protocol_PROTOCOL_ICMP,
}

// FilterToProto converts a compiled filter to its wire form.
func FilterToProto(f policy.Filter) *segmeshv1.Filter {
	out := &segmeshv1.Filter{}
	for _, s := range f.Sets {
		out.Sets = append(out.Sets, &segmeshv1.AddressSet{Name: s.Name, Prefixes: PrefixStrings(s.Prefixes)})
	}
	out.Ingress = rulesToProto(f.Ingress)
	out.Egress = rulesToProto(f.Egress)
	return out
}

func rulesToProto(rs []policy.FilterRule) []*segmeshv1.FilterRule {
	var out []*segmeshv1.FilterRule
	for _, r := range rs {
		pr := &segmeshv1.FilterRule{Set: r.Set, Origin: r.Origin}
		for _, m := range r.Matches {
			pm := &segmeshv1.PortMatch{Protocol: protoToPB[m.Protocol]}
			for _, p := range m.Ports {
				pm.Ports = append(pm.Ports, &segmeshv1.PortRange{First: uint32(p.First), Last: uint32(p.Last)})
			}
			pr.Matches = append(pr.Matches, pm)
		}
		out = append(out, pr)
	}
	return out
}

// FilterFromProto converts a wire filter back, validating every field. It returns an
// error naming the offending set or rule when a prefix, protocol or port range is
// invalid or a rule references a set the filter does not define.
func FilterFromProto(f *segmeshv1.Filter) (policy.Filter, error) {
	var out policy.Filter
	if f == nil {
		return out, nil
	}
	names := map[string]bool{}
	for _, s := range f.GetSets() {
		ps, err := ParsePrefixes(s.GetPrefixes())
		if err != nil {
			return policy.Filter{}, fmt.Errorf("set %q: %w", s.GetName(), err)
		}
		names[s.GetName()] = true
		out.Sets = append(out.Sets, policy.AddressSet{Name: s.GetName(), Prefixes: ps})
	}
	var err error
	if out.Ingress, err = rulesFromProto("ingress", f.GetIngress(), names); err != nil {
		return policy.Filter{}, err
	}
	if out.Egress, err = rulesFromProto("egress", f.GetEgress(), names); err != nil {
		return policy.Filter{}, err
	}
	return out, nil
}

func rulesFromProto(dir string, rs []*segmeshv1.FilterRule, sets map[string]bool) ([]policy.FilterRule, error) {
	var out []policy.FilterRule
	for i, r := range rs {
		if !sets[r.GetSet()] {
			return nil, fmt.Errorf("%s rule %d: unknown set %q", dir, i, r.GetSet())
		}
		fr := policy.FilterRule{Set: r.GetSet(), Origin: r.GetOrigin()}
		for _, m := range r.GetMatches() {
			var pm policy.PortMatch
			switch m.GetProtocol() {
			case segmeshv1.Protocol_PROTOCOL_ANY:
				pm.Protocol = policy.ProtoAny
			case segmeshv1.Protocol_PROTOCOL_TCP:
				pm.Protocol = policy.ProtoTCP
			case segmeshv1.Protocol_PROTOCOL_UDP:
				pm.Protocol = policy.ProtoUDP
			case segmeshv1.Protocol_PROTOCOL_ICMP:
				pm.Protocol = policy.ProtoICMP
			default:
				return nil, fmt.Errorf("%s rule %d: unknown protocol %v", dir, i, m.GetProtocol())
			}
			for _, p := range m.GetPorts() {
				if p.GetFirst() == 0 || p.GetFirst() > p.GetLast() || p.GetLast() > 65535 {
					return nil, fmt.Errorf("%s rule %d: invalid port range %d-%d", dir, i, p.GetFirst(), p.GetLast())
				}
				if pm.Protocol != policy.ProtoTCP && pm.Protocol != policy.ProtoUDP {
					return nil, fmt.Errorf("%s rule %d: protocol %s takes no ports", dir, i, pm.Protocol)
				}
				pm.Ports = append(pm.Ports, policy.PortRange{First: uint16(p.GetFirst()), Last: uint16(p.GetLast())})
			}
			fr.Matches = append(fr.Matches, pm)
		}
		out = append(out, fr)
	}
	return out, nil
}

// PrefixStrings formats prefixes with netip.Prefix.String.
func PrefixStrings(ps []netip.Prefix) []string {
	out := make([]string, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.String())
	}
	return out
}

// ParsePrefixes parses prefixes written by PrefixStrings; it rejects host bits set.
func ParsePrefixes(ss []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(ss))
	for _, s := range ss {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, err
		}
		if p != p.Masked() {
			return nil, fmt.Errorf("prefix %s has host bits set (want %s)", p, p.Masked())
		}
		out = append(out, p)
	}
	return out, nil
}

// NetmapHash returns the hex SHA-256 of the deterministic protobuf encoding of nm
// with its Hash field cleared. nm is not modified.
func NetmapHash(nm *segmeshv1.Netmap) string {
	c := proto.Clone(nm).(*segmeshv1.Netmap)
	c.Hash = ""
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(c)
	if err != nil {
		// Marshal of a well-formed message cannot fail; a failure is a programming error.
		panic(fmt.Sprintf("wire: marshal netmap: %v", err))
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}
