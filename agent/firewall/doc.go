// Package firewall is the nftables table `inet segmesh` as data: the one place where
// the meaning of a node's compiled policy (policy.Filter) in packets is written down.
//
// Build turns a Filter into a Table (sets, chains, rules). From the Table come:
//   - its canonical ruleset text (Table.String), in the format `nft list table inet
//     segmesh` prints, which also loads with `nft -f`;
//   - a packet tracer (Table.Trace) that says which rule decides a packet, used by the
//     agent's conntrack sweep and by tests;
//   - the structural diff (PlanUpdate) that decides what one batch must change:
//     set elements only; chains, rules and some sets while the other sets keep their
//     elements; or the whole table; and the list of differences (Compare) reported
//     as drift;
//   - the way back from a Table read from the kernel to the Filter it enforces
//     (Table.Filter).
//
// Layout of the table for overlay interface IFACE:
//
//	chain input   { type filter hook input priority filter; policy accept; iifname IFACE jump ingress }
//	chain output  { type filter hook output priority filter; policy accept; oifname IFACE jump egress }
//	chain forward { type filter hook forward priority filter; policy accept;
//	                iifname IFACE jump transit; oifname IFACE jump transit }
//	chain ingress { ct state established,related accept; ct state invalid drop;
//	                ip saddr @SET_v4 <match> accept; ip6 saddr @SET_v6 <match> accept; ...; drop }
//	chain egress  { the same with daddr }
//	chain transit { ct state established,related accept; drop }
//	set SET_v4 { type ipv4_addr; flags interval }   one pair per policy.AddressSet
//	set SET_v6 { type ipv6_addr; flags interval }
//
// Every policy rule becomes one kernel rule per match, family (IPv4 first) and port
// range; each carries the FilterRule's Origin as its comment and its position (rule
// index, match index) as rule userdata, so the Filter can be recovered exactly.
//
// The package is pure: it imports only the standard library and segmesh/policy. The
// Linux code in agent/dataplane/linux/nft encodes a Table to netlink and decodes the
// kernel's table back into one; numeric values (hooks, families, conntrack state
// bits, verdicts) are the kernel's, so that encoding is a direct mapping.
package firewall
