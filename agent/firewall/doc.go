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
//	                ip saddr @SET_v4 <match> accept; ip6 saddr @SET_v6 <match> accept; ...;
//	                update @denied_in4 { ip saddr . ip daddr . meta l4proto . tcp dport }; ...;
//	                counter drop }
//	chain egress  { the same with daddr and the denied_out* sets }
//	chain transit { ct state established,related accept; drop }
//	set SET_v4 { type ipv4_addr; flags interval }   one pair per policy.AddressSet
//	set SET_v6 { type ipv6_addr; flags interval }
//	set denied_in4 { type ipv4_addr . ipv4_addr . inet_proto . inet_service; size 4096;
//	                 flags dynamic,timeout; counter; timeout 2m }   and 7 more (DeniedSets)
//
// The denied-flow log: before the final drop of chains ingress and egress, record
// rules without a verdict add the packet's flow to a dynamic set of its direction
// and family (keyed with the destination port for TCP, UDP and SCTP, by protocol
// for the others), whose elements count packets and bytes and expire
// DeniedSetTimeout after the last one; the drop rule itself counts what the policy
// dropped. A record rule is separate from the drop because the kernel ends a rule
// whose set is full: the drop still happens. Set elements and counter values are
// kernel state, never compared by the diffs.
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
