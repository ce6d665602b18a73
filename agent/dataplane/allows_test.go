package dataplane

import (
	"net/netip"
	"testing"
)

func TestAllows(t *testing.T) {
	pfx := netip.MustParsePrefix
	addr := netip.MustParseAddr
	tcp := func(ranges ...PortRange) PortMatch { return PortMatch{Protocol: ProtoTCP, Ports: ranges} }
	udp := func(ranges ...PortRange) PortMatch { return PortMatch{Protocol: ProtoUDP, Ports: ranges} }
	one := func(p uint16) PortRange { return PortRange{First: p, Last: p} }

	// web holds two nodes of both families, ops one IPv4 node, ext an external /24.
	f := Filter{
		Sets: []AddressSet{
			{Name: "web", Prefixes: []netip.Prefix{pfx("100.64.0.2/32"), pfx("100.64.0.3/32"), pfx("fd5e:6d65:7368::2/128")}},
			{Name: "ops", Prefixes: []netip.Prefix{pfx("100.64.0.9/32")}},
			{Name: "ext", Prefixes: []netip.Prefix{pfx("198.51.100.0/24")}},
			{Name: "empty"},
		},
		Ingress: []FilterRule{
			{Set: "web", Matches: []PortMatch{tcp(one(8080), PortRange{First: 9000, Last: 9100})}, Origin: "web-to-api"},
			{Set: "ops", Matches: []PortMatch{tcp(one(22)), {Protocol: ProtoICMP}}, Origin: "ops-admin"},
			{Set: "ext", Matches: nil, Origin: "rule without matches"},
			{Set: "empty", Matches: []PortMatch{{Protocol: ProtoAny}}, Origin: "empty set"},
			{Set: "undefined", Matches: []PortMatch{{Protocol: ProtoAny}}, Origin: "undefined set"},
		},
		Egress: []FilterRule{
			{Set: "ops", Matches: []PortMatch{udp(one(514))}, Origin: "syslog"},
			{Set: "ext", Matches: []PortMatch{{Protocol: ProtoAny}}, Origin: "any to ext"},
			{Set: "web", Matches: []PortMatch{tcp()}, Origin: "every tcp port"},
		},
	}
	in := func(remote string, proto uint8, port uint16) Flow {
		return Flow{Ingress: true, Remote: addr(remote), Protocol: proto, DstPort: port}
	}
	out := func(remote string, proto uint8, port uint16) Flow {
		return Flow{Remote: addr(remote), Protocol: proto, DstPort: port}
	}
	tests := []struct {
		name string
		flow Flow
		want bool
	}{
		{"ingress tcp port in set", in("100.64.0.2", IPProtoTCP, 8080), true},
		{"ingress tcp second member", in("100.64.0.3", IPProtoTCP, 8080), true},
		{"ingress tcp IPv6 member", in("fd5e:6d65:7368::2", IPProtoTCP, 8080), true},
		{"ingress tcp range low end", in("100.64.0.2", IPProtoTCP, 9000), true},
		{"ingress tcp range high end", in("100.64.0.2", IPProtoTCP, 9100), true},
		{"ingress tcp above range", in("100.64.0.2", IPProtoTCP, 9101), false},
		{"ingress tcp other port", in("100.64.0.2", IPProtoTCP, 22), false},
		{"ingress udp on a tcp port", in("100.64.0.2", IPProtoUDP, 8080), false},
		{"ingress remote not in set", in("100.64.0.4", IPProtoTCP, 8080), false},
		{"ingress IPv6 of a node whose IPv6 is not in the set", in("fd5e:6d65:7368::3", IPProtoTCP, 8080), false},
		{"ingress icmp echo", in("100.64.0.9", IPProtoICMP, 0), true},
		{"ingress icmpv6 echo", in("100.64.0.9", IPProtoICMPv6, 0), true},
		{"ingress icmp from a set without icmp", in("100.64.0.2", IPProtoICMP, 0), false},
		{"ingress ssh from ops", in("100.64.0.9", IPProtoTCP, 22), true},
		{"rule without matches allows nothing", in("198.51.100.7", IPProtoTCP, 80), false},
		{"any on an empty set allows nothing", in("100.64.0.77", IPProtoUDP, 53), false},
		{"egress rule does not open ingress", in("198.51.100.7", IPProtoUDP, 53), false},
		{"egress udp port", out("100.64.0.9", IPProtoUDP, 514), true},
		{"egress udp other port", out("100.64.0.9", IPProtoUDP, 515), false},
		{"egress any: tcp", out("198.51.100.200", IPProtoTCP, 443), true},
		{"egress any: icmp", out("198.51.100.1", IPProtoICMP, 0), true},
		{"egress any: other protocol", out("198.51.100.1", 47, 0), true},
		{"egress any: outside the prefix", out("198.51.101.1", IPProtoTCP, 443), false},
		{"egress tcp without ports: any port", out("100.64.0.3", IPProtoTCP, 1), true},
		{"egress tcp without ports: not udp", out("100.64.0.3", IPProtoUDP, 1), false},
		{"egress to web on tcp/8080 (every tcp port)", out("100.64.0.2", IPProtoTCP, 8080), true},
		{"ingress rule does not open egress (ops ssh)", out("100.64.0.9", IPProtoTCP, 22), false},
		{"other protocol not matched by tcp", out("100.64.0.3", 132, 80), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Allows(f, tt.flow); got != tt.want {
				t.Errorf("Allows(%+v) = %v, want %v", tt.flow, got, tt.want)
			}
		})
	}
	t.Run("empty filter allows nothing", func(t *testing.T) {
		for _, tt := range tests {
			if Allows(Filter{}, tt.flow) {
				t.Errorf("empty filter allows %+v", tt.flow)
			}
		}
	})
}
