// Package policytest builds policies and inventories for benchmarks and tests of
// the policy compiler and of what is built on it (the controller's netmaps).
package policytest

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"segmesh/policy"
)

// BenchPolicy builds a policy and an inventory of n nodes shaped like a real
// deployment: 20 roles of equal size in 2 environments and 5 zones, 37 segments
// (roles, environments, zones, role-and-environment, explicit names, external
// CIDRs) and 50 rules; a node has about 4,100 peers on average, 10,000 at most.
func BenchPolicy(n int) (*policy.Policy, []policy.Node) {
	const roles = 20
	p := &policy.Policy{File: "bench.yaml", Version: 1}
	pos := func(i int) policy.Pos { return policy.Pos{File: "bench.yaml", Line: i + 1, Col: 5} }
	for r := range roles {
		p.Segments = append(p.Segments, policy.Segment{Name: fmt.Sprintf("role%d", r), Pos: pos(len(p.Segments)), Selectors: []policy.Selector{{"role": fmt.Sprintf("r%d", r)}}})
	}
	for _, env := range []string{"prod", "staging"} {
		p.Segments = append(p.Segments, policy.Segment{Name: env, Pos: pos(len(p.Segments)), Selectors: []policy.Selector{{"env": env}}})
	}
	for z := range 5 {
		p.Segments = append(p.Segments, policy.Segment{Name: fmt.Sprintf("zone%d", z), Pos: pos(len(p.Segments)), Selectors: []policy.Selector{{"zone": fmt.Sprintf("z%d", z)}}})
	}
	for r := range 5 {
		p.Segments = append(p.Segments, policy.Segment{Name: fmt.Sprintf("prod-role%d", r), Pos: pos(len(p.Segments)),
			Selectors: []policy.Selector{{"role": fmt.Sprintf("r%d", r), "env": "prod"}, {"role": fmt.Sprintf("r%d", r+10), "env": "prod"}}})
	}
	var admins []string
	for i := range 50 {
		admins = append(admins, fmt.Sprintf("node-%05d", i*97%n))
	}
	p.Segments = append(p.Segments,
		policy.Segment{Name: "admins", Pos: pos(len(p.Segments)), Nodes: admins},
		policy.Segment{Name: "partner", Pos: pos(len(p.Segments) + 1), CIDRs: []policy.CIDR{
			{Prefix: netip.MustParsePrefix("192.0.2.0/24")},
			{Prefix: netip.MustParsePrefix("198.51.100.0/24"), Except: []netip.Prefix{netip.MustParsePrefix("198.51.100.128/25")}},
		}},
		policy.Segment{Name: "internet", Pos: pos(len(p.Segments) + 2), CIDRs: []policy.CIDR{
			{Prefix: netip.MustParsePrefix("0.0.0.0/0"), Except: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("100.64.0.0/10")}},
		}},
	)
	rule := func(from, to []string, ports ...string) {
		r := policy.Rule{Name: fmt.Sprintf("rule%d", len(p.Rules)), Pos: pos(100 + len(p.Rules)), From: from, To: to}
		for _, s := range ports {
			r.Ports = append(r.Ports, port(s))
		}
		p.Rules = append(p.Rules, r)
	}
	for r := range roles {
		rule([]string{fmt.Sprintf("role%d", r)}, []string{fmt.Sprintf("role%d", (r+1)%roles)}, fmt.Sprintf("tcp/%d", 8000+r))
	}
	for r := range 10 {
		rule([]string{fmt.Sprintf("role%d", r)}, []string{fmt.Sprintf("role%d", (r+3)%roles), fmt.Sprintf("prod-role%d", r%5)}, "tcp/5432", "tcp/6000-6100")
	}
	for z := range 5 {
		rule([]string{fmt.Sprintf("zone%d", z)}, []string{fmt.Sprintf("prod-role%d", z)}, "udp/7946", "tcp/7946")
	}
	for r := range 5 {
		rule([]string{"partner"}, []string{fmt.Sprintf("prod-role%d", r)}, "tcp/443")
		rule([]string{fmt.Sprintf("prod-role%d", r)}, []string{"internet"}, "tcp/443", "udp/123")
	}
	rule([]string{"admins"}, []string{"all"}, "tcp/22", "icmp")
	rule([]string{"role0"}, []string{"all"}, "tcp/9100")
	rule([]string{"staging"}, []string{"role19"}, "any")
	for len(p.Rules) < 50 {
		rule([]string{"role5"}, []string{"role6"}, fmt.Sprintf("tcp/%d", 9000+len(p.Rules)))
	}

	nodes := make([]policy.Node, n)
	for i := range nodes {
		env := "prod"
		if i%4 == 3 {
			env = "staging"
		}
		nodes[i] = policy.Node{
			Name:   fmt.Sprintf("node-%05d", i),
			Labels: map[string]string{"role": fmt.Sprintf("r%d", i%roles), "env": env, "zone": fmt.Sprintf("z%d", i/7%5)},
			Addresses: []netip.Addr{
				netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}),
				netip.AddrFrom16([16]byte{0xfd, 0x5e, 0x6d, 0x65, 0x73, 0x68, 14: byte(i >> 8), 15: byte(i)}),
			},
		}
	}
	return p, nodes
}

// BenchTests adds to p, the policy of BenchPolicy, assertions over the benchmark policy: flow tests between
// roles and an only test per environment.
func BenchTests(p *policy.Policy) {
	pos := func(i int) policy.Pos { return policy.Pos{File: "bench.yaml", Line: 500 + i, Col: 5} }
	for r := range 20 {
		p.Tests = append(p.Tests, policy.Test{Name: fmt.Sprintf("t%d", r), Pos: pos(r),
			From: policy.Endpoint{Name: fmt.Sprintf("role%d", r)}, To: policy.Endpoint{Name: fmt.Sprintf("role%d", (r+1)%20)},
			Allow: []policy.PortMatch{{Protocol: policy.ProtoTCP, Ports: []policy.PortRange{{First: uint16(8000 + r), Last: uint16(8000 + r)}}}},
			Deny:  []policy.PortMatch{{Protocol: policy.ProtoUDP}}})
	}
	p.Tests = append(p.Tests, policy.Test{Name: "staging-only", Pos: pos(30), From: policy.Endpoint{Name: "staging"},
		Only: []policy.Endpoint{{Name: "role19"}, {Name: "role1"}, {Name: "internet"}}})
}

// port parses "tcp/443", "tcp/6000-6100", "udp/53", "icmp" or "any"; it panics
// on anything else (the callers' literals).
func port(s string) policy.PortMatch {
	proto, ports, _ := strings.Cut(s, "/")
	m := policy.PortMatch{Protocol: policy.Protocol(proto)}
	if ports == "" {
		return m
	}
	first, last, ok := strings.Cut(ports, "-")
	if !ok {
		last = first
	}
	a, err1 := strconv.ParseUint(first, 10, 16)
	b, err2 := strconv.ParseUint(last, 10, 16)
	if err1 != nil || err2 != nil {
		panic("policytest: bad port " + s)
	}
	m.Ports = []policy.PortRange{{First: uint16(a), Last: uint16(b)}}
	return m
}
