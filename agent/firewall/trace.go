package firewall

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Packet is what the tracer needs to know about one packet.
type Packet struct {
	// Hook is where the packet meets the table: HookInput (to this host), HookOutput
	// (from it) or HookForward (routed through it).
	Hook Hook
	// IIF and OIF are the input and output interface names ("" when there is none).
	IIF, OIF string
	// Src and Dst are the addresses; both of one family, IPv4 ones not IPv4-mapped.
	Src, Dst netip.Addr
	// Protocol is the IANA IP protocol number.
	Protocol uint8
	// DstPort is the TCP or UDP destination port.
	DstPort uint16
	// TCPFlags are the TCP header's flags (TCPSyn for a connection's first packet).
	TCPFlags uint8
	// ICMPType is the ICMP or ICMPv6 type.
	ICMPType uint8
	// CtState is the packet's conntrack state, one bit: CtNew for the first packet of
	// a connection.
	CtState CtState
}

func (p Packet) family() Family {
	if p.Src.Is4() {
		return FamilyIPv4
	}
	return FamilyIPv6
}

// Step is one rule (or chain policy) a traced packet met that decided something:
// a jump, or the final verdict.
type Step struct {
	Chain string
	// Rule is the rule's index in the chain; -1 for the base chain's policy.
	Rule    int
	Verdict Verdict
	// Comment is the rule's comment (the policy rule's Origin, possibly cut).
	Comment string
}

func (s Step) String() string {
	if s.Rule < 0 {
		return fmt.Sprintf("%s: policy %s", s.Chain, s.Verdict)
	}
	out := fmt.Sprintf("%s[%d]: %s", s.Chain, s.Rule, s.Verdict)
	if s.Comment != "" {
		out += " (" + s.Comment + ")"
	}
	return out
}

// Trace is the outcome of a packet's walk through the table.
type Trace struct {
	// Verdict is VerdictAccept or VerdictDrop.
	Verdict Verdict
	// Steps are the jumps and the deciding rule, in order; the last one decided.
	Steps []Step
}

// Accepted reports whether the table accepts the packet.
func (t Trace) Accepted() bool { return t.Verdict == VerdictAccept }

// Decider returns the step that decided the verdict.
func (t Trace) Decider() Step { return t.Steps[len(t.Steps)-1] }

func (t Trace) String() string {
	parts := make([]string, len(t.Steps))
	for i, s := range t.Steps {
		parts[i] = s.String()
	}
	return strings.Join(parts, " -> ")
}

// maxJumps bounds the chain depth of a trace (the kernel allows 16 jumps).
const maxJumps = 16

// Trace walks p through the table as the kernel would: the base chain of p.Hook, its
// rules in order, a jump entering the target chain and returning to the next rule when
// that chain ends without a verdict; a rule without a verdict (the placeholder of a
// rule without matches, a record rule that adds the packet's flow to a denied-flow
// set) lets the packet continue. A table without a base chain for
// the hook accepts the packet (no filtering there). A rule of a shape Build never
// makes (Unknown) is taken to match nothing. A jump to a missing chain, or deeper
// than 16 chains, drops the packet (the kernel would refuse such a table).
func (t *Table) Trace(p Packet) Trace {
	var tr Trace
	var base *Chain
	for i := range t.Chains {
		if c := &t.Chains[i]; c.Base != nil && c.Base.Hook == p.Hook {
			base = c
			break
		}
	}
	if base == nil {
		return Trace{Verdict: VerdictAccept, Steps: []Step{{Chain: p.Hook.String(), Rule: -1, Verdict: VerdictAccept}}}
	}
	if v, ok := t.walk(base, p, &tr, 0); ok {
		tr.Verdict = v
		return tr
	}
	tr.Verdict = base.Base.Policy
	tr.Steps = append(tr.Steps, Step{Chain: base.Name, Rule: -1, Verdict: base.Base.Policy})
	return tr
}

// walk runs chain c; ok is false when the chain ends without a verdict.
func (t *Table) walk(c *Chain, p Packet, tr *Trace, depth int) (Verdict, bool) {
	for i, r := range c.Rules {
		if !r.matches(t, p) {
			continue
		}
		switch r.Verdict {
		case VerdictNone:
			continue
		case VerdictJump:
			target := t.Chain(r.Jump)
			tr.Steps = append(tr.Steps, Step{Chain: c.Name, Rule: i, Verdict: VerdictJump, Comment: r.Comment})
			if target == nil || depth >= maxJumps {
				tr.Steps = append(tr.Steps, Step{Chain: r.Jump, Rule: -1, Verdict: VerdictDrop})
				return VerdictDrop, true
			}
			if v, ok := t.walk(target, p, tr, depth+1); ok {
				return v, true
			}
		default:
			tr.Steps = append(tr.Steps, Step{Chain: c.Name, Rule: i, Verdict: r.Verdict, Comment: r.Comment})
			return r.Verdict, true
		}
	}
	return VerdictNone, false
}

// matches reports whether every match of r holds for p.
func (r Rule) matches(t *Table, p Packet) bool {
	switch {
	case r.Unknown != "":
		return false
	case r.IIFName != "" && r.IIFName != p.IIF, r.OIFName != "" && r.OIFName != p.OIF:
		return false
	case r.CtState != 0 && r.CtState&p.CtState == 0:
		return false
	case r.Family != FamilyAny && r.Family != p.family():
		return false
	}
	if r.Addr != AddrNone {
		a := p.Src
		if r.Addr == AddrDestination {
			a = p.Dst
		}
		s := t.Set(r.Set)
		if s == nil || s.Type != map[bool]SetType{true: TypeIPv4, false: TypeIPv6}[a.Is4()] || !containsAddr(s.Elements, a) {
			return false
		}
	}
	if r.L4Proto != 0 && r.L4Proto != p.Protocol || r.NotPortProtocols && slices.Contains(PortProtocols, p.Protocol) {
		return false
	}
	if r.HasTCPFlags && (p.Protocol != ProtoTCP || p.TCPFlags&r.TCPFlagsMask == r.TCPFlags) {
		return false
	}
	if r.HasDPort && (p.Protocol != ProtoTCP && p.Protocol != ProtoUDP || p.DstPort < r.DPort.First || p.DstPort > r.DPort.Last) {
		return false
	}
	if r.HasICMPType && (p.Protocol != ProtoICMP && p.Protocol != ProtoICMPv6 || p.ICMPType != r.ICMPType) {
		return false
	}
	return true
}

// Opening returns the first packet of a connection between this node's address
// local and remote over overlay interface iface: opened by remote when ingress (it
// meets the input hook), else by this node (the output hook). proto is the IANA
// protocol number; dport the TCP or UDP destination port. An ICMP or ICMPv6
// connection is taken to be an echo exchange, the only ICMP a rule allows; a TCP
// connection starts with a SYN.
func Opening(iface string, ingress bool, local, remote netip.Addr, proto uint8, dport uint16) Packet {
	p := Packet{Hook: HookOutput, OIF: iface, Src: local, Dst: remote, Protocol: proto, CtState: CtNew}
	if ingress {
		p = Packet{Hook: HookInput, IIF: iface, Src: remote, Dst: local, Protocol: proto, CtState: CtNew}
	}
	switch proto {
	case ProtoTCP:
		p.DstPort, p.TCPFlags = dport, TCPSyn
	case ProtoUDP:
		p.DstPort = dport
	case ProtoICMP:
		p.ICMPType = ICMPEchoRequest
	case ProtoICMPv6:
		p.ICMPType = ICMPv6EchoRequest
	}
	return p
}
