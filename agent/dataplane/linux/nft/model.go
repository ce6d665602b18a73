package nft

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"segmesh/api/nftrender"
	"segmesh/policy"
)

// Chain names of the table.
const (
	chainInput   = "input"
	chainOutput  = "output"
	chainForward = "forward"
	chainIngress = "ingress"
	chainEgress  = "egress"
	chainTransit = "transit"
)

// Set name suffixes per family.
const (
	suffixV4 = "_v4"
	suffixV6 = "_v6"
)

// chainSpec is a chain's definition in comparable form; Hooked is false for regular chains.
type chainSpec struct {
	Hooked bool
	Hook   uint32
	Prio   int32
	Type   nftables.ChainType
	Policy nftables.ChainPolicy
}

// setSpec is a set's definition in comparable form.
type setSpec struct {
	KeyType                                       string
	Interval, Anonymous, Constant, IsMap, Timeout bool
	Dynamic, Concatenation, Counter               bool
}

// model is the content of the table in comparable form: what this package renders
// from a Filter, and what it reads back from the kernel.
type model struct {
	Present bool
	Flags   uint32
	Chains  map[string]chainSpec
	Rules   map[string][]ruleSpec
	Sets    map[string]setSpec
	Elems   map[string][]interval

	// handles are the kernel's rule handles per chain (read-back only).
	handles map[string][]uint64
}

// sameStructure reports whether a and b have the same table flags, chains, rules and
// set definitions, i.e. whether they can differ at most in set elements.
func sameStructure(a, b *model) bool {
	if !a.Present || !b.Present || a.Flags != b.Flags || len(a.Chains) != len(b.Chains) ||
		len(a.Sets) != len(b.Sets) {
		return false
	}
	for name, c := range a.Chains {
		if bc, ok := b.Chains[name]; !ok || bc != c || !slices.Equal(a.Rules[name], b.Rules[name]) {
			return false
		}
	}
	for name, s := range a.Sets {
		if bs, ok := b.Sets[name]; !ok || bs != s {
			return false
		}
	}
	return true
}

// baseChain is a filter chain on hook with priority filter and policy accept.
func baseChain(hook *nftables.ChainHook) chainSpec {
	return chainSpec{Hooked: true, Hook: uint32(*hook), Prio: int32(*nftables.ChainPriorityFilter),
		Type: nftables.ChainTypeFilter, Policy: nftables.ChainPolicyAccept}
}

var (
	v4SetSpec = setSpec{KeyType: nftables.TypeIPAddr.Name, Interval: true}
	v6SetSpec = setSpec{KeyType: nftables.TypeIP6Addr.Name, Interval: true}
)

// fixedChains returns every chain of the table, and the rules of all chains except
// ingress and egress, whose rules depend on the filter.
func fixedChains(iface string) (map[string]chainSpec, map[string][]ruleSpec) {
	chains := map[string]chainSpec{
		chainInput:   baseChain(nftables.ChainHookInput),
		chainOutput:  baseChain(nftables.ChainHookOutput),
		chainForward: baseChain(nftables.ChainHookForward),
		chainIngress: {},
		chainEgress:  {},
		chainTransit: {},
	}
	rules := map[string][]ruleSpec{
		chainInput:   {{IIFName: iface, Verdict: verdictJump, Jump: chainIngress}},
		chainOutput:  {{OIFName: iface, Verdict: verdictJump, Jump: chainEgress}},
		chainForward: {{IIFName: iface, Verdict: verdictJump, Jump: chainTransit}, {OIFName: iface, Verdict: verdictJump, Jump: chainTransit}},
		chainTransit: {ctEstablished, {Verdict: verdictDrop}},
	}
	return chains, rules
}

var (
	ctEstablished = ruleSpec{CtState: expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED, Verdict: verdictAccept}
	ctInvalid     = ruleSpec{CtState: expr.CtStateBitINVALID, Verdict: verdictDrop}
	finalDrop     = ruleSpec{Verdict: verdictDrop}
)

// direction selects which address of a packet a policy rule matches.
type direction bool

const (
	dirIngress direction = true  // source address
	dirEgress  direction = false // destination address
)

type family struct {
	nfproto        byte
	suffix         string
	addrLen        uint32
	srcOff, dstOff uint32
	icmpProto      byte
	echoRequest    byte
}

var (
	famV4 = family{nfproto: unix.NFPROTO_IPV4, suffix: suffixV4, addrLen: 4, srcOff: 12, dstOff: 16,
		icmpProto: unix.IPPROTO_ICMP, echoRequest: 8}
	famV6 = family{nfproto: unix.NFPROTO_IPV6, suffix: suffixV6, addrLen: 16, srcOff: 8, dstOff: 24,
		icmpProto: unix.IPPROTO_ICMPV6, echoRequest: 128}
	families = []family{famV4, famV6}
)

// policyRules renders FilterRules as kernel rules: for each rule, each match, each
// family (IPv4 first), each port range one rule. A FilterRule without matches becomes
// one verdict-less placeholder rule per family so that it survives a read-back.
func policyRules(rules []policy.FilterRule, dir direction, sets map[string]bool) ([]ruleSpec, error) {
	if len(rules) >= posNoMatch {
		return nil, fmt.Errorf("%d rules: at most %d supported", len(rules), posNoMatch-1)
	}
	var out []ruleSpec
	for i, r := range rules {
		if !sets[r.Set] {
			return nil, fmt.Errorf("rule %d (%s): set %q is not defined", i, r.Origin, r.Set)
		}
		if len(r.Matches) >= posNoMatch {
			return nil, fmt.Errorf("rule %d (%s): %d matches: at most %d supported", i, r.Origin, len(r.Matches), posNoMatch-1)
		}
		base := func(f family, match int) ruleSpec {
			s := ruleSpec{NFProto: f.nfproto, AddrLen: f.addrLen, Set: r.Set + f.suffix,
				Comment: nftrender.Comment(r.Origin), HasPos: true, Pos: uint32(i)<<16 | uint32(match)}
			s.AddrOff = f.dstOff
			if dir == dirIngress {
				s.AddrOff = f.srcOff
			}
			return s
		}
		if len(r.Matches) == 0 {
			for _, f := range families {
				out = append(out, base(f, posNoMatch))
			}
			continue
		}
		for j, m := range r.Matches {
			for _, f := range families {
				s := base(f, j)
				s.Verdict = verdictAccept
				switch m.Protocol {
				case policy.ProtoAny, policy.ProtoICMP:
					if len(m.Ports) > 0 {
						return nil, fmt.Errorf("rule %d (%s): protocol %s takes no ports", i, r.Origin, m.Protocol)
					}
					if m.Protocol == policy.ProtoICMP {
						s.L4Proto, s.HasICMPType, s.ICMPType = f.icmpProto, true, f.echoRequest
					}
					out = append(out, s)
				case policy.ProtoTCP, policy.ProtoUDP:
					s.L4Proto = unix.IPPROTO_TCP
					if m.Protocol == policy.ProtoUDP {
						s.L4Proto = unix.IPPROTO_UDP
					}
					if len(m.Ports) == 0 {
						out = append(out, s)
					}
					for _, pr := range m.Ports {
						if pr.First > pr.Last {
							return nil, fmt.Errorf("rule %d (%s): port range %d-%d is empty", i, r.Origin, pr.First, pr.Last)
						}
						ps := s
						ps.HasDPort, ps.DPort = true, pr
						out = append(out, ps)
					}
				default:
					return nil, fmt.Errorf("rule %d (%s): unknown protocol %q", i, r.Origin, m.Protocol)
				}
			}
		}
	}
	return out, nil
}

// maxSetName leaves room for the family suffix within NFT_SET_MAXNAMELEN (256 with NUL).
const maxSetName = 255 - len(suffixV4)

// desiredModel renders f for interface iface.
func desiredModel(iface string, f policy.Filter) (*model, error) {
	m := &model{Present: true, Sets: map[string]setSpec{}, Elems: map[string][]interval{}}
	m.Chains, m.Rules = fixedChains(iface)
	defined := map[string]bool{}
	for _, s := range f.Sets {
		if s.Name == "" || len(s.Name) > maxSetName || strings.ContainsRune(s.Name, 0) {
			return nil, fmt.Errorf("set name %q: must be 1 to %d bytes without NUL", s.Name, maxSetName)
		}
		if defined[s.Name] {
			return nil, fmt.Errorf("set %q is defined twice", s.Name)
		}
		defined[s.Name] = true
		var v4, v6 []netip.Prefix
		for _, p := range s.Prefixes {
			switch {
			case !p.IsValid():
				return nil, fmt.Errorf("set %q: invalid prefix", s.Name)
			case p.Addr().Is4():
				v4 = append(v4, p)
			default:
				v6 = append(v6, p)
			}
		}
		m.Sets[s.Name+suffixV4], m.Elems[s.Name+suffixV4] = v4SetSpec, prefixIntervals(v4)
		m.Sets[s.Name+suffixV6], m.Elems[s.Name+suffixV6] = v6SetSpec, prefixIntervals(v6)
	}
	in, err := policyRules(f.Ingress, dirIngress, defined)
	if err != nil {
		return nil, fmt.Errorf("ingress: %w", err)
	}
	out, err := policyRules(f.Egress, dirEgress, defined)
	if err != nil {
		return nil, fmt.Errorf("egress: %w", err)
	}
	m.Rules[chainIngress] = append(append([]ruleSpec{ctEstablished, ctInvalid}, in...), finalDrop)
	m.Rules[chainEgress] = append(append([]ruleSpec{ctEstablished, ctInvalid}, out...), finalDrop)
	return m, nil
}
