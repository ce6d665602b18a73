package firewall

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"segmesh/policy"
)

// TableName is the name of segmesh's table in the inet family.
const TableName = "segmesh"

// Chain names of the table.
const (
	ChainInput   = "input"
	ChainOutput  = "output"
	ChainForward = "forward"
	ChainIngress = "ingress"
	ChainEgress  = "egress"
	ChainTransit = "transit"
)

// Family is a network protocol family as nftables numbers it (NFPROTO_*); 0 means
// any family.
type Family uint8

// Families.
const (
	FamilyAny  Family = 0
	FamilyIPv4 Family = 2  // NFPROTO_IPV4
	FamilyIPv6 Family = 10 // NFPROTO_IPV6
)

// setSuffix is the suffix of a policy set's half of family f.
func (f Family) setSuffix() string {
	if f == FamilyIPv6 {
		return "_v6"
	}
	return "_v4"
}

// Hook is a netfilter hook of the inet family (NF_INET_*).
type Hook uint32

// Hooks the table uses.
const (
	HookInput   Hook = 1 // NF_INET_LOCAL_IN
	HookForward Hook = 2 // NF_INET_FORWARD
	HookOutput  Hook = 3 // NF_INET_LOCAL_OUT
)

func (h Hook) String() string {
	switch h {
	case 0:
		return "prerouting"
	case HookInput:
		return "input"
	case HookForward:
		return "forward"
	case HookOutput:
		return "output"
	case 4:
		return "postrouting"
	}
	return fmt.Sprintf("hook-%d", uint32(h))
}

// CtState is a mask of conntrack states with the kernel's bit values (NF_CT_STATE_*).
type CtState uint32

// Conntrack states.
const (
	CtInvalid     CtState = 1
	CtEstablished CtState = 2
	CtRelated     CtState = 4
	CtNew         CtState = 8
	CtUntracked   CtState = 64
)

// Verdict is a rule's terminal statement or a base chain's policy.
type Verdict uint8

// Verdicts.
const (
	VerdictNone Verdict = iota // no statement: the packet goes on to the next rule
	VerdictAccept
	VerdictDrop
	VerdictJump
)

func (v Verdict) String() string {
	switch v {
	case VerdictNone:
		return "continue"
	case VerdictAccept:
		return "accept"
	case VerdictDrop:
		return "drop"
	case VerdictJump:
		return "jump"
	}
	return fmt.Sprintf("verdict-%d", uint8(v))
}

// AddrField says which address of the network header a rule looks up in its set.
type AddrField uint8

// Address fields.
const (
	AddrNone AddrField = iota
	AddrSource
	AddrDestination
)

// IANA IP protocol numbers the table matches.
const (
	ProtoICMP   uint8 = 1
	ProtoTCP    uint8 = 6
	ProtoUDP    uint8 = 17
	ProtoICMPv6 uint8 = 58
	ProtoSCTP   uint8 = 132
)

// PortProtocols are the protocols whose denied flows are recorded with their
// destination port (the port is at the same offset of all three headers).
var PortProtocols = []uint8{ProtoTCP, ProtoUDP, ProtoSCTP}

// TCP flags (RFC 9293).
const (
	TCPFin uint8 = 1 << iota
	TCPSyn
	TCPRst
	TCPPsh
	TCPAck
	TCPUrg
	TCPEce
	TCPCwr
)

// ICMP echo request types.
const (
	ICMPEchoRequest   uint8 = 8
	ICMPv6EchoRequest uint8 = 128
)

// Rule is one kernel rule: the conjunction, in this order, of optional matches
// (interface name, conntrack state, family with an address set lookup, layer-4
// protocol, TCP flags, destination port or ICMP type) and an optional verdict, plus
// its comment and position. Rules compare with ==.
type Rule struct {
	IIFName, OIFName string
	// CtState matches "ct state & CtState != 0"; 0 means no conntrack match.
	CtState CtState
	// Family restricts the rule to one family; it is set whenever Addr is.
	Family Family
	// Addr and Set: the packet's Addr address must be in the interval set Set.
	Addr AddrField
	Set  string
	// L4Proto is the IP protocol number; 0 means any.
	L4Proto uint8
	// HasDPort and DPort: the destination port must be in DPort (TCP or UDP).
	HasDPort bool
	DPort    policy.PortRange
	// HasTCPFlags, TCPFlagsMask and TCPFlags: the TCP flags under the mask must
	// differ from TCPFlags ("tcp flags != syn / fin,syn,rst,ack").
	HasTCPFlags  bool
	TCPFlagsMask uint8
	TCPFlags     uint8
	// HasICMPType and ICMPType: the ICMP (or ICMPv6) type must be ICMPType.
	HasICMPType bool
	ICMPType    uint8
	// NotPortProtocols: the layer-4 protocol must be none of PortProtocols ("meta
	// l4proto != tcp meta l4proto != udp meta l4proto != sctp").
	NotPortProtocols bool
	// Counter counts the packets and bytes that reach the rule's verdict (a
	// "counter" statement); the values are kernel state, never part of a Rule.
	Counter bool
	// Record names the dynamic set the rule adds the packet's flow to, or refreshes
	// it in ("update @SET { ip saddr . ip daddr . meta l4proto [. th dport] }", the
	// addresses of Family); "" for none. RecordPort adds the destination port of
	// L4Proto (one of PortProtocols) to the key. A record rule has no verdict: when
	// its set is full the kernel ends the rule and the packet goes on to the next.
	Record     string
	RecordPort bool
	Verdict    Verdict
	// Jump is the target chain of VerdictJump.
	Jump string
	// Comment is the rule's nft comment (see Comment).
	Comment string
	// HasPos and Pos: the position of the FilterRule this rule renders, rule index
	// << 16 | match index (PosNoMatch for the placeholder of a rule without matches).
	HasPos bool
	Pos    uint32
	// Unknown describes a kernel rule of a shape this package never builds (read-back
	// only); such a rule is never rendered to the kernel.
	Unknown string
}

// PosNoMatch is the match index of the verdict-less placeholder rule that keeps a
// FilterRule without matches in the table.
const PosNoMatch = 0xffff

// SetType is the key type of a set, as nftables names it.
type SetType string

// Key types of the table's sets: addresses for the policy sets, flows (source
// address . destination address . protocol [. destination port]) for the sets of
// denied flows.
const (
	TypeIPv4       SetType = "ipv4_addr"
	TypeIPv6       SetType = "ipv6_addr"
	TypeFlow4      SetType = "ipv4_addr . ipv4_addr . inet_proto . inet_service"
	TypeFlow4Proto SetType = "ipv4_addr . ipv4_addr . inet_proto"
	TypeFlow6      SetType = "ipv6_addr . ipv6_addr . inet_proto . inet_service"
	TypeFlow6Proto SetType = "ipv6_addr . ipv6_addr . inet_proto"
)

// Set is a named set of the table.
type Set struct {
	Name string
	Type SetType
	// Interval is the interval flag; every policy set Build makes has it.
	Interval bool
	// Dynamic is the flag of a set the packet path fills (the denied-flow sets):
	// its elements are kernel state, so Elements stays empty, in Build's table and
	// in one read back, and diffs never compare them.
	Dynamic bool
	// Size is the most elements the set holds (0: no limit).
	Size uint32
	// Timeout is how long an element lives after it was last added or refreshed
	// (0: forever), with millisecond resolution.
	Timeout time.Duration
	// Counter gives every element a packet and byte counter.
	Counter bool
	// Foreign lists set flags and expressions this package never uses (anonymous,
	// constant, map, concatenation, a timeout flag without a timeout, expressions
	// other than one counter), read-back only; "" for Build's sets.
	Foreign string
	// Elements are sorted, non-overlapping intervals of addresses of the set's family.
	Elements []Interval
}

// Bounds of the denied-flow sets, so that memory and work stay bounded whatever
// traffic arrives: at most DeniedSetSize flows per set (8 sets: direction ×
// family × with or without port; the kernel keeps about 200 bytes per element
// and CPU, so about 6.5 MiB in all on 2 CPUs), each forgotten DeniedSetTimeout
// after its last dropped packet. A full set records no new flow; the packet is
// still dropped and counted by the drop rule.
const (
	DeniedSetSize    = 4096
	DeniedSetTimeout = 120 * time.Second
)

// DeniedSet describes one set of denied flows.
type DeniedSet struct {
	Name string
	// Chain is ChainIngress or ChainEgress, whose final drop records into the set.
	Chain  string
	Family Family
	// Ports: keyed by destination port too (the flows of PortProtocols); else by
	// protocol only (every other protocol).
	Ports bool
}

// Type returns the set's key type.
func (d DeniedSet) Type() SetType {
	switch {
	case d.Family == FamilyIPv6 && d.Ports:
		return TypeFlow6
	case d.Family == FamilyIPv6:
		return TypeFlow6Proto
	case d.Ports:
		return TypeFlow4
	}
	return TypeFlow4Proto
}

// DeniedSets returns the denied-flow sets of the table, by name: denied_in4,
// denied_in4_proto, denied_in6, denied_in6_proto, then denied_out*. No name ends in
// a policy set's family suffix, so they never collide with policy sets.
func DeniedSets() []DeniedSet {
	var out []DeniedSet
	for _, dir := range []struct{ chain, name string }{{ChainIngress, "in"}, {ChainEgress, "out"}} {
		for _, f := range families {
			for _, ports := range []bool{true, false} {
				name := fmt.Sprintf("denied_%s%d", dir.name, map[Family]int{FamilyIPv4: 4, FamilyIPv6: 6}[f])
				if !ports {
					name += "_proto"
				}
				out = append(out, DeniedSet{Name: name, Chain: dir.chain, Family: f, Ports: ports})
			}
		}
	}
	return out
}

// BaseChain is the hook part of a base chain.
type BaseChain struct {
	// Type is the chain type, e.g. "filter".
	Type     string
	Hook     Hook
	Priority int32
	// Policy is VerdictAccept or VerdictDrop.
	Policy Verdict
}

// Chain is a chain of the table; Base is nil for a regular chain.
type Chain struct {
	Name  string
	Base  *BaseChain
	Rules []Rule
}

// Table is the whole table `inet segmesh`: sets and chains, each sorted by name
// (the order in which the agent creates them and nft(8) lists them).
type Table struct {
	// Flags are the table's flags; Build's table has none.
	Flags  uint32
	Sets   []Set
	Chains []Chain
}

// Set returns the set named name, or nil.
func (t *Table) Set(name string) *Set {
	i, ok := slices.BinarySearchFunc(t.Sets, name, func(s Set, n string) int { return strings.Compare(s.Name, n) })
	if !ok {
		return nil
	}
	return &t.Sets[i]
}

// Chain returns the chain named name, or nil.
func (t *Table) Chain(name string) *Chain {
	i, ok := slices.BinarySearchFunc(t.Chains, name, func(c Chain, n string) int { return strings.Compare(c.Name, n) })
	if !ok {
		return nil
	}
	return &t.Chains[i]
}

// ElementCount returns the number of elements (intervals) of all sets.
func (t *Table) ElementCount() int {
	n := 0
	for _, s := range t.Sets {
		n += len(s.Elements)
	}
	return n
}

// Sort orders sets and chains by name (after a read-back, which may list them in any
// order).
func (t *Table) Sort() {
	slices.SortFunc(t.Sets, func(a, b Set) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(t.Chains, func(a, b Chain) int { return strings.Compare(a.Name, b.Name) })
}

var (
	ctEstablished = Rule{CtState: CtEstablished | CtRelated, Verdict: VerdictAccept}
	ctInvalid     = Rule{CtState: CtInvalid, Verdict: VerdictDrop}
	// newNotSyn drops a new TCP connection that does not start with a SYN: without
	// it, conntrack picks a connection up mid-stream (nf_conntrack_tcp_loose), so a
	// flow whose entry the agent deleted because a new policy denies it would come
	// back as a new connection opened by whichever side speaks next.
	newNotSyn = Rule{CtState: CtNew, L4Proto: ProtoTCP, HasTCPFlags: true,
		TCPFlagsMask: TCPFin | TCPSyn | TCPRst | TCPAck, TCPFlags: TCPSyn, Verdict: VerdictDrop}
	finalDrop = Rule{Verdict: VerdictDrop}
	// policyDrop is the final drop of the policy chains: it counts what the policy
	// dropped (the record rules before it say which flows).
	policyDrop = Rule{Counter: true, Verdict: VerdictDrop}
)

// recordRules returns the rules of chain that record a packet reaching the policy
// drop into the denied-flow sets: per family, one rule per protocol with ports,
// then one for every other protocol.
func recordRules(chain string) []Rule {
	var out []Rule
	for _, d := range DeniedSets() {
		if d.Chain != chain {
			continue
		}
		if !d.Ports {
			out = append(out, Rule{Family: d.Family, NotPortProtocols: true, Record: d.Name})
			continue
		}
		for _, p := range PortProtocols {
			out = append(out, Rule{Family: d.Family, L4Proto: p, Record: d.Name, RecordPort: true})
		}
	}
	return out
}

func baseChain(h Hook) *BaseChain {
	return &BaseChain{Type: "filter", Hook: h, Priority: 0, Policy: VerdictAccept}
}

// fixedChains returns every chain of the table for iface, the ingress and egress
// chains without their policy rules.
func fixedChains(iface string) []Chain {
	return []Chain{
		{Name: ChainEgress},
		{Name: ChainForward, Base: baseChain(HookForward), Rules: []Rule{
			{IIFName: iface, Verdict: VerdictJump, Jump: ChainTransit},
			{OIFName: iface, Verdict: VerdictJump, Jump: ChainTransit}}},
		{Name: ChainIngress},
		{Name: ChainInput, Base: baseChain(HookInput), Rules: []Rule{{IIFName: iface, Verdict: VerdictJump, Jump: ChainIngress}}},
		{Name: ChainOutput, Base: baseChain(HookOutput), Rules: []Rule{{OIFName: iface, Verdict: VerdictJump, Jump: ChainEgress}}},
		{Name: ChainTransit, Rules: []Rule{ctEstablished, finalDrop}},
	}
}

// MaxInterface is the longest interface name in bytes (IFNAMSIZ - 1).
const MaxInterface = 15

// maxSetName leaves room for the family suffix within NFT_SET_MAXNAMELEN (256 with NUL).
const maxSetName = 255 - len("_v4")

// CheckFilter reports the first reason why f cannot become a table, in the form
// "ingress rule 2 (web-to-db (p.yaml:3:5)): set \"db\" is not defined": a set name
// that is empty, longer than 252 bytes, holds a NUL or is defined twice; a prefix
// that is invalid or IPv4-mapped IPv6; a rule naming an undefined set, with ports for
// a protocol without ports (any, icmp), an empty port range or an unknown protocol;
// 65,535 or more rules per direction or matches per rule. It allocates only for the
// error.
func CheckFilter(f policy.Filter) error {
	sets := make(map[string]struct{}, len(f.Sets))
	for _, s := range f.Sets {
		if s.Name == "" || len(s.Name) > maxSetName || strings.ContainsRune(s.Name, 0) {
			return fmt.Errorf("set name %q: must be 1 to %d bytes without NUL", s.Name, maxSetName)
		}
		if _, dup := sets[s.Name]; dup {
			return fmt.Errorf("set %q is defined twice", s.Name)
		}
		sets[s.Name] = struct{}{}
		for _, p := range s.Prefixes {
			switch {
			case !p.IsValid():
				return fmt.Errorf("set %q: invalid prefix", s.Name)
			case p.Addr().Is4In6():
				return fmt.Errorf("set %q: prefix %s is IPv4-mapped IPv6; use the IPv4 form", s.Name, p)
			}
		}
	}
	for _, dir := range []struct {
		name  string
		rules []policy.FilterRule
	}{{"ingress", f.Ingress}, {"egress", f.Egress}} {
		if len(dir.rules) >= PosNoMatch {
			return fmt.Errorf("%s: %d rules: at most %d supported", dir.name, len(dir.rules), PosNoMatch-1)
		}
		for i, r := range dir.rules {
			if _, ok := sets[r.Set]; !ok {
				return fmt.Errorf("%s rule %d (%s): set %q is not defined", dir.name, i, r.Origin, r.Set)
			}
			if len(r.Matches) >= PosNoMatch {
				return fmt.Errorf("%s rule %d (%s): %d matches: at most %d supported", dir.name, i, r.Origin, len(r.Matches), PosNoMatch-1)
			}
			for _, m := range r.Matches {
				switch m.Protocol {
				case policy.ProtoTCP, policy.ProtoUDP:
				case policy.ProtoAny, policy.ProtoICMP:
					if len(m.Ports) > 0 {
						return fmt.Errorf("%s rule %d (%s): protocol %s takes no ports", dir.name, i, r.Origin, m.Protocol)
					}
				default:
					return fmt.Errorf("%s rule %d (%s): unknown protocol %q", dir.name, i, r.Origin, m.Protocol)
				}
				for _, pr := range m.Ports {
					if pr.First > pr.Last {
						return fmt.Errorf("%s rule %d (%s): port range %d-%d is empty", dir.name, i, r.Origin, pr.First, pr.Last)
					}
				}
			}
		}
	}
	return nil
}

// Build returns the table that enforces f on overlay interface iface. Errors: an
// interface name of 0 or more than 15 bytes, or one holding a NUL; any error of
// CheckFilter.
func Build(iface string, f policy.Filter) (*Table, error) {
	if iface == "" || len(iface) > MaxInterface || strings.ContainsRune(iface, 0) {
		return nil, fmt.Errorf("interface name %q: must be 1 to %d bytes without NUL", iface, MaxInterface)
	}
	if err := CheckFilter(f); err != nil {
		return nil, err
	}
	t := &Table{Chains: fixedChains(iface)}
	for _, s := range f.Sets {
		var v4, v6 []netip.Prefix
		for _, p := range s.Prefixes {
			if p.Addr().Is4() {
				v4 = append(v4, p)
			} else {
				v6 = append(v6, p)
			}
		}
		t.Sets = append(t.Sets,
			Set{Name: s.Name + "_v4", Type: TypeIPv4, Interval: true, Elements: PrefixIntervals(v4)},
			Set{Name: s.Name + "_v6", Type: TypeIPv6, Interval: true, Elements: PrefixIntervals(v6)})
	}
	for _, d := range DeniedSets() {
		t.Sets = append(t.Sets, Set{Name: d.Name, Type: d.Type(), Dynamic: true, Size: DeniedSetSize, Timeout: DeniedSetTimeout, Counter: true})
	}
	slices.SortStableFunc(t.Sets, func(a, b Set) int { return cmp.Compare(a.Name, b.Name) })
	t.Chain(ChainIngress).Rules = slices.Concat([]Rule{ctEstablished, ctInvalid, newNotSyn}, policyRules(f.Ingress, AddrSource),
		recordRules(ChainIngress), []Rule{policyDrop})
	t.Chain(ChainEgress).Rules = slices.Concat([]Rule{ctEstablished, ctInvalid, newNotSyn}, policyRules(f.Egress, AddrDestination),
		recordRules(ChainEgress), []Rule{policyDrop})
	return t, nil
}

var families = []Family{FamilyIPv4, FamilyIPv6}

// policyRules renders FilterRules (checked by CheckFilter): for each rule, each
// match, each family (IPv4 first), each port range one Rule. A FilterRule without
// matches becomes one verdict-less placeholder per family so that it survives a
// read-back.
func policyRules(rules []policy.FilterRule, addr AddrField) []Rule {
	var out []Rule
	for i, r := range rules {
		base := func(f Family, match int) Rule {
			return Rule{Family: f, Addr: addr, Set: r.Set + f.setSuffix(), Comment: Comment(r.Origin),
				HasPos: true, Pos: uint32(i)<<16 | uint32(match)}
		}
		if len(r.Matches) == 0 {
			for _, f := range families {
				out = append(out, base(f, PosNoMatch))
			}
			continue
		}
		for j, m := range r.Matches {
			for _, f := range families {
				s := base(f, j)
				s.Verdict = VerdictAccept
				switch m.Protocol {
				case policy.ProtoAny:
					out = append(out, s)
				case policy.ProtoICMP:
					s.L4Proto, s.HasICMPType, s.ICMPType = ProtoICMP, true, ICMPEchoRequest
					if f == FamilyIPv6 {
						s.L4Proto, s.ICMPType = ProtoICMPv6, ICMPv6EchoRequest
					}
					out = append(out, s)
				case policy.ProtoTCP, policy.ProtoUDP:
					s.L4Proto = ProtoTCP
					if m.Protocol == policy.ProtoUDP {
						s.L4Proto = ProtoUDP
					}
					if len(m.Ports) == 0 {
						out = append(out, s)
					}
					for _, pr := range m.Ports {
						ps := s
						ps.HasDPort, ps.DPort = true, pr
						out = append(out, ps)
					}
				}
			}
		}
	}
	return out
}
