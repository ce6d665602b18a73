// Package nftrender renders a node's compiled policy (policy.Filter) as the nftables
// ruleset text of the table `inet segmesh` that the agent programs for it, in the
// format `nft list table inet segmesh` prints, so that an operator sees before or
// after an apply exactly what a node's kernel holds. The text also loads with
// `nft -f`.
//
// The layout follows agent/dataplane/linux/nft, which programs the table over
// netlink: sets NAME_v4/NAME_v6 (interval sets, one pair per policy.AddressSet);
// base chains input, output and forward (hook priority filter, policy accept) that
// jump to ingress, egress and transit for traffic on the overlay interface only;
// ingress and egress accept established/related, drop invalid, then one rule per
// FilterRule, match, family (IPv4 first) and port range, then drop; transit
// accepts established/related and drops the rest. Sets and chains appear sorted by
// name, the order in which the agent creates them. A test compares the rendering
// with the kernel's listing of the agent's table.
//
// Package nftrender is pure: it imports only the policy package and the standard
// library.
package nftrender

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"unicode/utf8"

	"segmesh/policy"
)

// TableName is the table the agent owns, in the inet family.
const TableName = "segmesh"

// MaxComment is nft(8)'s limit on a rule comment in bytes (NFT_COMMENT_MAXLEN), so that
// a listing of the table loads again with `nft -f`.
const MaxComment = 128

type family struct {
	name, suffix, setType string // "ip", "_v4", "ipv4_addr"
	icmp                  string // ICMP echo request match
}

var families = []family{
	{name: "ip", suffix: "_v4", setType: "ipv4_addr", icmp: "icmp type echo-request"},
	{name: "ip6", suffix: "_v6", setType: "ipv6_addr", icmp: "icmpv6 type echo-request"},
}

// Render returns the ruleset of table `inet segmesh` for overlay interface iface
// and filter f, ending with a newline. f is expected to be valid as
// wire.FilterFromProto returns it (every rule's set defined, ports only for TCP
// and UDP, First <= Last); a rule that references an undefined set is rendered
// as is and would not load. Rule comments are the rules' Origin, cut like the
// agent cuts them (240 bytes, "…"); a double quote, which nft(8) cannot quote, is
// shown as a single quote.
func Render(iface string, f policy.Filter) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", TableName)
	var blocks []string
	for _, s := range sortedSets(f.Sets) {
		blocks = append(blocks, renderSet(s.name, s.fam, s.prefixes))
	}
	q := quote(iface)
	chains := map[string][]string{
		"input":   {"type filter hook input priority filter; policy accept;", "iifname " + q + " jump ingress"},
		"output":  {"type filter hook output priority filter; policy accept;", "oifname " + q + " jump egress"},
		"forward": {"type filter hook forward priority filter; policy accept;", "iifname " + q + " jump transit", "oifname " + q + " jump transit"},
		"ingress": policyChain(f.Ingress, "saddr"),
		"egress":  policyChain(f.Egress, "daddr"),
		"transit": {"ct state established,related accept", "drop"},
	}
	for _, name := range []string{"egress", "forward", "ingress", "input", "output", "transit"} {
		var cb strings.Builder
		fmt.Fprintf(&cb, "\tchain %s {\n", name)
		for _, l := range chains[name] {
			fmt.Fprintf(&cb, "\t\t%s\n", l)
		}
		cb.WriteString("\t}\n")
		blocks = append(blocks, cb.String())
	}
	b.WriteString(strings.Join(blocks, "\n"))
	b.WriteString("}\n")
	return b.String()
}

type familySet struct {
	name     string // with suffix
	fam      family
	prefixes []netip.Prefix
}

// sortedSets splits every AddressSet into its two family sets, sorted by name.
func sortedSets(sets []policy.AddressSet) []familySet {
	var out []familySet
	for _, s := range sets {
		for _, fam := range families {
			fs := familySet{name: s.Name + fam.suffix, fam: fam}
			for _, p := range s.Prefixes {
				if p.IsValid() && p.Addr().Is4() == (fam.name == "ip") {
					fs.prefixes = append(fs.prefixes, p)
				}
			}
			out = append(out, fs)
		}
	}
	slices.SortStableFunc(out, func(a, b familySet) int { return strings.Compare(a.name, b.name) })
	return out
}

func renderSet(name string, fam family, prefixes []netip.Prefix) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\tset %s {\n\t\ttype %s\n\t\tflags interval\n", name, fam.setType)
	if elems := elements(prefixes); len(elems) > 0 {
		// nft(8) (calculate_delim in src/expression.c) puts two IPv4 addresses per
		// line and one IPv6 address per line.
		perLine := 1
		if fam.name == "ip" {
			perLine = 2
		}
		b.WriteString("\t\telements = { ")
		for i, e := range elems {
			if i > 0 {
				if i%perLine == 0 {
					b.WriteString(",\n\t\t\t     ")
				} else {
					b.WriteString(", ")
				}
			}
			b.WriteString(e)
		}
		b.WriteString(" }\n")
	}
	b.WriteString("\t}\n")
	return b.String()
}

// elements returns the set elements of prefixes of one family the way the kernel
// holds them: masked, sorted, every prefix contained in another dropped, a
// single-address prefix written as the address.
func elements(ps []netip.Prefix) []string {
	sorted := make([]netip.Prefix, 0, len(ps))
	for _, p := range ps {
		sorted = append(sorted, p.Masked())
	}
	slices.SortFunc(sorted, func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	var out []string
	var last netip.Prefix
	for _, p := range sorted {
		if last.IsValid() && last.Overlaps(p) {
			continue // sorted by start, then length: an overlapping prefix is contained
		}
		last = p
		if p.IsSingleIP() {
			out = append(out, p.Addr().String())
		} else {
			out = append(out, p.String())
		}
	}
	return out
}

// policyChain returns the lines of the ingress or egress chain; dir is "saddr" or
// "daddr".
func policyChain(rules []policy.FilterRule, dir string) []string {
	lines := []string{"ct state established,related accept", "ct state invalid drop"}
	for _, r := range rules {
		comment := ""
		if c := Comment(r.Origin); c != "" {
			comment = " comment " + quote(c)
		}
		lookup := func(fam family) string { return fmt.Sprintf("%s %s @%s%s", fam.name, dir, r.Set, fam.suffix) }
		if len(r.Matches) == 0 {
			// The agent keeps a match-less rule as a verdict-less placeholder.
			for _, fam := range families {
				lines = append(lines, lookup(fam)+comment)
			}
			continue
		}
		for _, m := range r.Matches {
			for _, fam := range families {
				for _, match := range matches(m, fam) {
					lines = append(lines, lookup(fam)+match+" accept"+comment)
				}
			}
		}
	}
	return append(lines, "drop")
}

// matches returns the protocol and port part of each rule one PortMatch renders
// to in family fam, each with a leading space unless empty.
func matches(m policy.PortMatch, fam family) []string {
	switch m.Protocol {
	case policy.ProtoAny:
		return []string{""}
	case policy.ProtoICMP:
		return []string{" " + fam.icmp}
	case policy.ProtoTCP, policy.ProtoUDP:
		if len(m.Ports) == 0 {
			return []string{" meta l4proto " + string(m.Protocol)}
		}
		var out []string
		for _, p := range m.Ports {
			if p.First == p.Last {
				out = append(out, fmt.Sprintf(" %s dport %d", m.Protocol, p.First))
			} else {
				out = append(out, fmt.Sprintf(" %s dport %d-%d", m.Protocol, p.First, p.Last))
			}
		}
		return out
	}
	return []string{" meta l4proto " + string(m.Protocol)} // unknown protocol: would not load
}

// Comment returns the nftables rule comment for a rule Origin: NULs removed, invalid
// UTF-8 replaced by "?", and cut at a rune boundary to MaxComment bytes including a
// trailing "…". The agent's firewall stores exactly this string.
func Comment(origin string) string {
	origin = strings.ToValidUTF8(strings.ReplaceAll(origin, "\x00", ""), "?")
	if len(origin) <= MaxComment {
		return origin
	}
	cut := MaxComment - len("…")
	for cut > 0 && !utf8.RuneStart(origin[cut]) {
		cut--
	}
	return origin[:cut] + "…"
}

// quote returns s as an nft string literal.
func quote(s string) string { return `"` + strings.ReplaceAll(s, `"`, "'") + `"` }
