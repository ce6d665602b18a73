package firewall

import (
	"net/netip"
	"strings"
	"testing"

	"segmesh/policy"
)

func TestTrace(t *testing.T) {
	pfx := netip.MustParsePrefix
	addr := netip.MustParseAddr
	tcp := func(ranges ...policy.PortRange) policy.PortMatch {
		return policy.PortMatch{Protocol: policy.ProtoTCP, Ports: ranges}
	}
	udp := func(ranges ...policy.PortRange) policy.PortMatch {
		return policy.PortMatch{Protocol: policy.ProtoUDP, Ports: ranges}
	}
	one := func(p uint16) policy.PortRange { return policy.PortRange{First: p, Last: p} }

	// web holds two nodes of both families, ops one IPv4 node, ext an external /24.
	f := policy.Filter{
		Sets: []policy.AddressSet{
			{Name: "web", Prefixes: []netip.Prefix{pfx("100.64.0.2/32"), pfx("100.64.0.3/32"), pfx("fd5e:6d65:7368::2/128")}},
			{Name: "ops", Prefixes: []netip.Prefix{pfx("100.64.0.9/32"), pfx("fd5e:6d65:7368::9/128")}},
			{Name: "ext", Prefixes: []netip.Prefix{pfx("198.51.100.0/24")}},
			{Name: "empty"},
		},
		Ingress: []policy.FilterRule{
			{Set: "web", Matches: []policy.PortMatch{tcp(one(8080), policy.PortRange{First: 9000, Last: 9100})}, Origin: "web-to-api"},
			{Set: "ops", Matches: []policy.PortMatch{tcp(one(22)), {Protocol: policy.ProtoICMP}}, Origin: "ops-admin"},
			{Set: "ext", Matches: nil, Origin: "rule without matches"},
			{Set: "empty", Matches: []policy.PortMatch{{Protocol: policy.ProtoAny}}, Origin: "empty set"},
		},
		Egress: []policy.FilterRule{
			{Set: "ops", Matches: []policy.PortMatch{udp(one(514))}, Origin: "syslog"},
			{Set: "ext", Matches: []policy.PortMatch{{Protocol: policy.ProtoAny}}, Origin: "any to ext"},
			{Set: "web", Matches: []policy.PortMatch{tcp()}, Origin: "every tcp port"},
		},
	}
	tab := mustBuild(t, "sm0", f)
	self4, self6 := addr("100.64.0.1"), addr("fd5e:6d65:7368::1")
	open := func(ingress bool, remote string, proto uint8, port uint16) Packet {
		r := addr(remote)
		self := self4
		if r.Is6() {
			self = self6
		}
		return Opening("sm0", ingress, self, r, proto, port)
	}
	in := func(remote string, proto uint8, port uint16) Packet { return open(true, remote, proto, port) }
	out := func(remote string, proto uint8, port uint16) Packet { return open(false, remote, proto, port) }
	tests := []struct {
		name string
		pkt  Packet
		want bool
		by   string // comment of the deciding rule when accepted
	}{
		{"ingress tcp port in set", in("100.64.0.2", ProtoTCP, 8080), true, "web-to-api"},
		{"ingress tcp second member", in("100.64.0.3", ProtoTCP, 8080), true, "web-to-api"},
		{"ingress tcp IPv6 member", in("fd5e:6d65:7368::2", ProtoTCP, 8080), true, "web-to-api"},
		{"ingress tcp range low end", in("100.64.0.2", ProtoTCP, 9000), true, "web-to-api"},
		{"ingress tcp range high end", in("100.64.0.2", ProtoTCP, 9100), true, "web-to-api"},
		{"ingress tcp above range", in("100.64.0.2", ProtoTCP, 9101), false, ""},
		{"ingress tcp other port", in("100.64.0.2", ProtoTCP, 22), false, ""},
		{"ingress udp on a tcp port", in("100.64.0.2", ProtoUDP, 8080), false, ""},
		{"ingress remote not in set", in("100.64.0.4", ProtoTCP, 8080), false, ""},
		{"ingress IPv6 of a node whose IPv6 is not in the set", in("fd5e:6d65:7368::3", ProtoTCP, 8080), false, ""},
		{"ingress icmp echo", in("100.64.0.9", ProtoICMP, 0), true, "ops-admin"},
		{"ingress icmpv6 echo", in("fd5e:6d65:7368::9", ProtoICMPv6, 0), true, "ops-admin"},
		{"ingress icmp from a set without icmp", in("100.64.0.2", ProtoICMP, 0), false, ""},
		{"ingress ssh from ops", in("100.64.0.9", ProtoTCP, 22), true, "ops-admin"},
		{"rule without matches allows nothing", in("198.51.100.7", ProtoTCP, 80), false, ""},
		{"any on an empty set allows nothing", in("100.64.0.77", ProtoUDP, 53), false, ""},
		{"egress rule does not open ingress", in("198.51.100.7", ProtoUDP, 53), false, ""},
		{"egress udp port", out("100.64.0.9", ProtoUDP, 514), true, "syslog"},
		{"egress udp other port", out("100.64.0.9", ProtoUDP, 515), false, ""},
		{"egress any: tcp", out("198.51.100.200", ProtoTCP, 443), true, "any to ext"},
		{"egress any: icmp", out("198.51.100.1", ProtoICMP, 0), true, "any to ext"},
		{"egress any: other protocol", out("198.51.100.1", 47, 0), true, "any to ext"},
		{"egress any: outside the prefix", out("198.51.101.1", ProtoTCP, 443), false, ""},
		{"egress tcp without ports: any port", out("100.64.0.3", ProtoTCP, 1), true, "every tcp port"},
		{"egress tcp without ports: not udp", out("100.64.0.3", ProtoUDP, 1), false, ""},
		{"ingress rule does not open egress (ops ssh)", out("100.64.0.9", ProtoTCP, 22), false, ""},
		{"other protocol not matched by tcp", out("100.64.0.3", 132, 80), false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := tab.Trace(tt.pkt)
			if tr.Accepted() != tt.want {
				t.Fatalf("Trace(%+v) = %s, want accepted=%v", tt.pkt, tr, tt.want)
			}
			if tt.want && tr.Decider().Comment != tt.by {
				t.Errorf("decided by %q, want %q (%s)", tr.Decider().Comment, tt.by, tr)
			}
			if !tt.want && tr.Decider() != (Step{Chain: map[bool]string{true: ChainIngress, false: ChainEgress}[tt.pkt.Hook == HookInput], Rule: len(tab.Chain(map[bool]string{true: ChainIngress, false: ChainEgress}[tt.pkt.Hook == HookInput]).Rules) - 1, Verdict: VerdictDrop}) {
				t.Errorf("denied by %s, want the final drop", tr.Decider())
			}
		})
	}
	t.Run("established passes, other interfaces are not filtered", func(t *testing.T) {
		p := in("198.51.100.7", ProtoTCP, 80)
		p.CtState = CtEstablished
		if tr := tab.Trace(p); !tr.Accepted() || tr.Decider().Rule != 0 {
			t.Errorf("established packet: %s", tr)
		}
		p = in("198.51.100.7", ProtoTCP, 80)
		p.IIF = "eth0"
		if tr := tab.Trace(p); !tr.Accepted() || tr.Decider().Rule != -1 {
			t.Errorf("packet on eth0: %s, want the input chain's policy", tr)
		}
		p.CtState = CtInvalid
		p.IIF = "sm0"
		if tr := tab.Trace(p); tr.Accepted() || !strings.Contains(tr.String(), "ingress[1]: drop") {
			t.Errorf("invalid packet: %s", tr)
		}
		fwd := Packet{Hook: HookForward, IIF: "sm0", OIF: "eth0", Src: addr("100.64.0.2"), Dst: addr("192.0.2.1"), Protocol: ProtoTCP, DstPort: 80, CtState: CtNew}
		if tr := tab.Trace(fwd); tr.Accepted() || tr.String() != "forward[0]: jump -> transit[1]: drop" {
			t.Errorf("forwarded packet: %s", tr)
		}
	})
	t.Run("default deny", func(t *testing.T) {
		empty := mustBuild(t, "sm0", policy.Filter{})
		for _, tt := range tests {
			if empty.Trace(tt.pkt).Accepted() {
				t.Errorf("empty filter accepts %+v", tt.pkt)
			}
		}
	})
}

// TestTraceRecordRules: a packet the policy denies meets exactly one record rule,
// the one of its direction, family and protocol kind, which lets it go on to the
// counted drop.
func TestTraceRecordRules(t *testing.T) {
	tab := mustBuild(t, "sm0", policy.Filter{})
	self4, self6 := netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("fd5e:6d65:7368::1")
	remote4, remote6 := netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("fd5e:6d65:7368::2")
	tests := []struct {
		name    string
		pkt     Packet
		record  string
		withKey bool // the key holds the port
	}{
		{"tcp in", Opening("sm0", true, self4, remote4, ProtoTCP, 22), "denied_in4", true},
		{"udp out", Opening("sm0", false, self4, remote4, ProtoUDP, 53), "denied_out4", true},
		{"sctp in v6", Opening("sm0", true, self6, remote6, ProtoSCTP, 80), "denied_in6", true},
		{"icmp in", Opening("sm0", true, self4, remote4, ProtoICMP, 0), "denied_in4_proto", false},
		{"icmpv6 out", Opening("sm0", false, self6, remote6, ProtoICMPv6, 0), "denied_out6_proto", false},
		{"gre out", Opening("sm0", false, self4, remote4, 47, 0), "denied_out4_proto", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			chain := tab.Chain(map[bool]string{true: ChainIngress, false: ChainEgress}[tt.pkt.Hook == HookInput])
			var met []Rule
			for _, r := range chain.Rules {
				if r.Record != "" && r.matches(tab, tt.pkt) {
					met = append(met, r)
				}
			}
			if len(met) != 1 || met[0].Record != tt.record || met[0].RecordPort != tt.withKey || met[0].Verdict != VerdictNone {
				t.Fatalf("record rules met: %+v, want one without verdict into %s (port %v)", met, tt.record, tt.withKey)
			}
			if tab.Set(tt.record) == nil {
				t.Fatalf("set %s is missing", tt.record)
			}
			tr := tab.Trace(tt.pkt)
			last := chain.Rules[len(chain.Rules)-1]
			if tr.Accepted() || tr.Decider().Rule != len(chain.Rules)-1 || !last.Counter || last.Verdict != VerdictDrop {
				t.Errorf("trace %s, want the counted final drop (%s)", tr, last)
			}
		})
	}
}
