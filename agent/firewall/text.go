package firewall

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"
)

// String returns the table as nft(8) lists it (`nft list table inet segmesh`, nftables
// 1.0) right after the agent programmed it, ending with a newline; the text loads
// with `nft -f`. Counters read 0 and the denied-flow sets are empty: a listing of a
// table that has seen traffic differs in those only (see ZeroKernelState). Sets come first, then
// chains, each sorted by name and separated by an empty line. A double quote in an
// interface name or comment, which nft(8) cannot quote, is written as a single quote.
// A rule read back from the kernel in a shape Build never makes (Rule.Unknown) is
// written as an nft comment line, so the text then no longer loads as it was.
func (t *Table) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", TableName)
	if t.Flags != 0 {
		fmt.Fprintf(&b, "\t# flags %#x\n", t.Flags)
	}
	first := true
	sep := func() {
		if !first {
			b.WriteString("\n")
		}
		first = false
	}
	for _, s := range t.Sets {
		sep()
		writeSet(&b, s)
	}
	for _, c := range t.Chains {
		sep()
		fmt.Fprintf(&b, "\tchain %s {\n", c.Name)
		if c.Base != nil {
			fmt.Fprintf(&b, "\t\ttype %s hook %s priority %s; policy %s;\n", c.Base.Type, c.Base.Hook,
				priorityText(c.Base.Priority), c.Base.Policy)
		}
		for _, r := range c.Rules {
			fmt.Fprintf(&b, "\t\t%s\n", r.String())
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

func priorityText(p int32) string {
	switch {
	case p == 0:
		return "filter"
	case p > 0:
		return fmt.Sprintf("filter + %d", p)
	}
	return fmt.Sprintf("filter - %d", -p)
}

func writeSet(b *strings.Builder, s Set) {
	fmt.Fprintf(b, "\tset %s {\n\t\ttype %s\n", s.Name, s.Type)
	if s.Size > 0 {
		fmt.Fprintf(b, "\t\tsize %d\n", s.Size)
	}
	var flags []string
	if s.Interval {
		flags = append(flags, "interval")
	}
	if s.Dynamic {
		flags = append(flags, "dynamic")
	}
	if s.Timeout > 0 {
		flags = append(flags, "timeout")
	}
	if len(flags) > 0 {
		fmt.Fprintf(b, "\t\tflags %s\n", strings.Join(flags, ","))
	}
	if s.Counter {
		b.WriteString("\t\tcounter\n")
	}
	if s.Timeout > 0 {
		fmt.Fprintf(b, "\t\ttimeout %s\n", durationText(s.Timeout))
	}
	if s.Foreign != "" {
		fmt.Fprintf(b, "\t\t# also %s\n", s.Foreign)
	}
	if len(s.Elements) == 0 {
		b.WriteString("\t}\n")
		return
	}
	// nft(8) (calculate_delim in src/expression.c) puts two IPv4 addresses per line
	// and one IPv6 address per line.
	perLine := 1
	if s.Type == TypeIPv4 {
		perLine = 2
	}
	b.WriteString("\t\telements = { ")
	for i, iv := range s.Elements {
		if i > 0 {
			if i%perLine == 0 {
				b.WriteString(",\n\t\t\t     ")
			} else {
				b.WriteString(", ")
			}
		}
		b.WriteString(elementText(iv))
	}
	b.WriteString(" }\n\t}\n")
}

// durationText writes d as nft(8) does (time_print in src/datatype.c): days, hours,
// minutes, seconds and milliseconds, each only when not zero ("2m", "1h30m5s").
func durationText(d time.Duration) string {
	ms := d.Milliseconds()
	var b strings.Builder
	for _, u := range []struct {
		ms   int64
		name string
	}{{86400000, "d"}, {3600000, "h"}, {60000, "m"}, {1000, "s"}, {1, "ms"}} {
		if n := ms / u.ms; n > 0 {
			fmt.Fprintf(&b, "%d%s", n, u.name)
			ms -= n * u.ms
		}
	}
	if b.Len() == 0 {
		return "0s"
	}
	return b.String()
}

// elementText writes an interval as nft(8) does: an address, a prefix, or a range.
func elementText(iv Interval) string {
	if p, ok := iv.Prefix(); ok {
		if p.IsSingleIP() {
			return p.Addr().String()
		}
		return p.String()
	}
	return iv.First.String() + "-" + iv.Last.String()
}

// String returns the rule as nft(8) lists it. For a record rule (Record set),
// nft(8) leaves out the family and protocol matches its key implies ("update
// @denied_in4 { ip saddr . ip daddr . meta l4proto . tcp dport }"), and so does
// String.
func (r Rule) String() string {
	if r.Unknown != "" {
		return "# rule segmesh does not write: " + r.Unknown
	}
	var parts []string
	add := func(format string, args ...any) { parts = append(parts, fmt.Sprintf(format, args...)) }
	if r.IIFName != "" {
		add("iifname %s", quote(r.IIFName))
	}
	if r.OIFName != "" {
		add("oifname %s", quote(r.OIFName))
	}
	if r.CtState != 0 {
		add("ct state %s", ctStateText(r.CtState))
	}
	if r.Addr != AddrNone {
		fam, dir := "ip", "saddr"
		if r.Family == FamilyIPv6 {
			fam = "ip6"
		}
		if r.Addr == AddrDestination {
			dir = "daddr"
		}
		add("%s %s @%s", fam, dir, r.Set)
	} else if r.Family != FamilyAny && r.Record == "" {
		add("meta nfproto %s", map[Family]string{FamilyIPv4: "ipv4", FamilyIPv6: "ipv6"}[r.Family])
	}
	if r.NotPortProtocols {
		for _, p := range PortProtocols {
			add("meta l4proto != %s", protoName(p))
		}
	}
	if r.HasTCPFlags {
		add("tcp flags != %s / %s", tcpFlagsText(r.TCPFlags), tcpFlagsText(r.TCPFlagsMask))
	}
	switch {
	case r.HasTCPFlags:
	case r.HasDPort:
		if r.DPort.First == r.DPort.Last {
			add("%s dport %d", protoName(r.L4Proto), r.DPort.First)
		} else {
			add("%s dport %d-%d", protoName(r.L4Proto), r.DPort.First, r.DPort.Last)
		}
	case r.HasICMPType:
		name := "icmp"
		if r.L4Proto == ProtoICMPv6 {
			name = "icmpv6"
		}
		if r.ICMPType == ICMPEchoRequest && name == "icmp" || r.ICMPType == ICMPv6EchoRequest && name == "icmpv6" {
			add("%s type echo-request", name)
		} else {
			add("%s type %d", name, r.ICMPType)
		}
	case r.L4Proto != 0 && !(r.Record != "" && r.RecordPort):
		add("meta l4proto %s", protoName(r.L4Proto))
	}
	if r.Counter {
		add("counter packets 0 bytes 0")
	}
	if r.Record != "" {
		fam := "ip"
		if r.Family == FamilyIPv6 {
			fam = "ip6"
		}
		key := fmt.Sprintf("%[1]s saddr . %[1]s daddr . meta l4proto", fam)
		if r.RecordPort {
			key += fmt.Sprintf(" . %s dport", protoName(r.L4Proto))
		}
		add("update @%s { %s }", r.Record, key)
	}
	switch r.Verdict {
	case VerdictAccept, VerdictDrop:
		add("%s", r.Verdict)
	case VerdictJump:
		add("jump %s", r.Jump)
	}
	if r.Comment != "" {
		add("comment %s", quote(r.Comment))
	}
	return strings.Join(parts, " ")
}

// tcpFlagsText names the flags of f as nft(8) does, in bit order.
func tcpFlagsText(f uint8) string {
	names := []string{"fin", "syn", "rst", "psh", "ack", "urg", "ecn", "cwr"}
	var out []string
	for i, n := range names {
		if f&(1<<i) != 0 {
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		return "0x0"
	}
	return strings.Join(out, ",")
}

func protoName(p uint8) string {
	switch p {
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	case ProtoICMP:
		return "icmp"
	case ProtoICMPv6:
		return "ipv6-icmp"
	case ProtoSCTP:
		return "sctp"
	}
	return fmt.Sprint(p)
}

// ctStateText names the states of mask m in nft(8)'s order.
func ctStateText(m CtState) string {
	var names []string
	for _, s := range []struct {
		bit  CtState
		name string
	}{{CtInvalid, "invalid"}, {CtEstablished, "established"}, {CtRelated, "related"}, {CtNew, "new"}, {CtUntracked, "untracked"}} {
		if m&s.bit != 0 {
			names = append(names, s.name)
			m &^= s.bit
		}
	}
	if m != 0 {
		names = append(names, fmt.Sprintf("%#x", uint32(m)))
	}
	return strings.Join(names, ",")
}

// quote returns s as an nft string literal.
func quote(s string) string { return `"` + strings.ReplaceAll(s, `"`, "'") + `"` }

var counterValues = regexp.MustCompile(`counter packets [0-9]+ bytes [0-9]+`)

// ZeroKernelState returns a listing of the table by nft(8) with what the kernel
// changes by itself taken out, so that it compares with Table.String: every
// counter's values read 0, and the elements of dynamic sets (the denied flows) are
// left out. It is the one place that knows how that state looks in nft(8) text.
func ZeroKernelState(listing string) string {
	listing = counterValues.ReplaceAllString(listing, "counter packets 0 bytes 0")
	var b strings.Builder
	dynamic, skipping := false, false
	for _, line := range strings.SplitAfter(listing, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case skipping:
			skipping = !strings.HasSuffix(trimmed, "}")
			continue
		case strings.HasPrefix(trimmed, "set "):
			dynamic = false
		case strings.HasPrefix(trimmed, "flags ") && strings.Contains(trimmed, "dynamic"):
			dynamic = true
		case dynamic && strings.HasPrefix(trimmed, "elements = {"):
			skipping = !strings.HasSuffix(trimmed, "}")
			continue
		}
		b.WriteString(line)
	}
	return b.String()
}

// NormalizeListing is ZeroKernelState with the table's sets put in name order,
// as Table.String writes them. nft(8) lists sets in the order they were created,
// and an update in place (PlanUpdate) adds new sets after the ones the table
// already holds, so two listings of the same table may order their sets
// differently. Chains keep their order: it is part of the table's meaning.
func NormalizeListing(listing string) string {
	listing = ZeroKernelState(listing)
	lines := strings.SplitAfter(listing, "\n")
	var head, tail []string
	type block struct {
		name  string
		lines []string
	}
	var sets []block
	for i := 0; i < len(lines); i++ {
		name, ok := strings.CutPrefix(lines[i], "\tset ")
		if !ok {
			if len(sets) == 0 {
				head = append(head, lines[i])
			} else {
				tail = append(tail, lines[i])
			}
			continue
		}
		if len(tail) > 0 && strings.TrimSpace(strings.Join(tail, "")) != "" {
			return listing // a set after a chain: not a listing nft(8) writes
		}
		tail = nil
		b := block{name: strings.TrimSuffix(strings.TrimSpace(name), " {")}
		for ; i < len(lines); i++ {
			b.lines = append(b.lines, lines[i])
			if lines[i] == "\t}\n" {
				break
			}
		}
		// The blank line that separates it from the next block.
		if i+1 < len(lines) && lines[i+1] == "\n" {
			i++
			b.lines = append(b.lines, lines[i])
		}
		sets = append(sets, b)
	}
	if len(sets) == 0 {
		return listing
	}
	last := sets[len(sets)-1].lines
	sep := last[len(last)-1] == "\n"
	slices.SortStableFunc(sets, func(a, b block) int { return strings.Compare(a.name, b.name) })
	var out strings.Builder
	for _, l := range head {
		out.WriteString(l)
	}
	for i, s := range sets {
		ls := s.lines
		if ls[len(ls)-1] == "\n" {
			ls = ls[:len(ls)-1]
		}
		for _, l := range ls {
			out.WriteString(l)
		}
		if i < len(sets)-1 || sep {
			out.WriteString("\n")
		}
	}
	for _, l := range tail {
		out.WriteString(l)
	}
	return out.String()
}
