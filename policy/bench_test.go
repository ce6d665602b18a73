package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
)

// benchPolicy builds a policy and an inventory of n nodes shaped like a real
// deployment: 20 roles of equal size in 2 environments and 5 zones, 37 segments
// (roles, environments, zones, role-and-environment, explicit names, external
// CIDRs) and 50 rules; a node has about 4,100 peers on average, 10,000 at most.
func benchPolicy(n int) (*Policy, []Node) {
	const roles = 20
	p := &Policy{File: "bench.yaml", Version: 1}
	pos := func(i int) Pos { return Pos{"bench.yaml", i + 1, 5} }
	for r := range roles {
		p.Segments = append(p.Segments, Segment{Name: fmt.Sprintf("role%d", r), Pos: pos(len(p.Segments)), Selectors: []Selector{{"role": fmt.Sprintf("r%d", r)}}})
	}
	for _, env := range []string{"prod", "staging"} {
		p.Segments = append(p.Segments, Segment{Name: env, Pos: pos(len(p.Segments)), Selectors: []Selector{{"env": env}}})
	}
	for z := range 5 {
		p.Segments = append(p.Segments, Segment{Name: fmt.Sprintf("zone%d", z), Pos: pos(len(p.Segments)), Selectors: []Selector{{"zone": fmt.Sprintf("z%d", z)}}})
	}
	for r := range 5 {
		p.Segments = append(p.Segments, Segment{Name: fmt.Sprintf("prod-role%d", r), Pos: pos(len(p.Segments)),
			Selectors: []Selector{{"role": fmt.Sprintf("r%d", r), "env": "prod"}, {"role": fmt.Sprintf("r%d", r+10), "env": "prod"}}})
	}
	var admins []string
	for i := range 50 {
		admins = append(admins, fmt.Sprintf("node-%05d", i*97%n))
	}
	p.Segments = append(p.Segments,
		Segment{Name: "admins", Pos: pos(len(p.Segments)), Nodes: admins},
		Segment{Name: "partner", Pos: pos(len(p.Segments) + 1), CIDRs: []CIDR{
			{Prefix: netip.MustParsePrefix("192.0.2.0/24")},
			{Prefix: netip.MustParsePrefix("198.51.100.0/24"), Except: []netip.Prefix{netip.MustParsePrefix("198.51.100.128/25")}},
		}},
		Segment{Name: "internet", Pos: pos(len(p.Segments) + 2), CIDRs: []CIDR{
			{Prefix: netip.MustParsePrefix("0.0.0.0/0"), Except: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("100.64.0.0/10")}},
		}},
	)
	rule := func(from, to []string, ports ...string) {
		r := Rule{Name: fmt.Sprintf("rule%d", len(p.Rules)), Pos: pos(100 + len(p.Rules)), From: from, To: to}
		for _, s := range ports {
			m, err := parsePort(s)
			if err != nil {
				panic(err)
			}
			r.Ports = append(r.Ports, m)
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

	nodes := make([]Node, n)
	for i := range nodes {
		env := "prod"
		if i%4 == 3 {
			env = "staging"
		}
		nodes[i] = Node{
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

// BenchmarkCompile10k measures compiling the benchmark policy for 10,000 nodes
// and producing every node's view (the budget is 1 s on 2 cores). It reports
// the average number of peers per node.
func BenchmarkCompile10k(b *testing.B) {
	p, nodes := benchPolicy(10_000)
	b.ReportAllocs()
	var peers int
	for b.Loop() {
		c, err := Compile(p, nodes)
		if err != nil {
			b.Fatal(err)
		}
		peers = 0
		for _, name := range c.Nodes() {
			v, _ := c.Node(name)
			peers += len(v.Peers)
		}
	}
	b.ReportMetric(float64(peers)/float64(len(nodes)), "peers/node")
}

// BenchmarkCompileOnly10k measures Compile alone: memberships, sets and the
// per-group filters, without building each node's peer list.
func BenchmarkCompileOnly10k(b *testing.B) {
	p, nodes := benchPolicy(10_000)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Compile(p, nodes); err != nil {
			b.Fatal(err)
		}
	}
}

// benchTests are assertions over the benchmark policy: flow tests between
// roles and an only test per environment.
func benchTests(p *Policy) {
	pos := func(i int) Pos { return Pos{"bench.yaml", 500 + i, 5} }
	for r := range 20 {
		p.Tests = append(p.Tests, Test{Name: fmt.Sprintf("t%d", r), Pos: pos(r),
			From: Endpoint{Name: fmt.Sprintf("role%d", r)}, To: Endpoint{Name: fmt.Sprintf("role%d", (r+1)%20)},
			Allow: []PortMatch{{Protocol: ProtoTCP, Ports: []PortRange{{uint16(8000 + r), uint16(8000 + r)}}}},
			Deny:  []PortMatch{{Protocol: ProtoUDP}}})
	}
	p.Tests = append(p.Tests, Test{Name: "staging-only", Pos: pos(30), From: Endpoint{Name: "staging"},
		Only: []Endpoint{{Name: "role19"}, {Name: "role1"}, {Name: "internet"}}})
}

// BenchmarkRunTests10k runs 21 tests on the prototype and on 10,000 nodes.
func BenchmarkRunTests10k(b *testing.B) {
	p, nodes := benchPolicy(10_000)
	benchTests(p)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := RunTests(p, nodes); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDiff10k diffs the benchmark policy against a copy with one more
// rule on 10,000 nodes.
func BenchmarkDiff10k(b *testing.B) {
	p, nodes := benchPolicy(10_000)
	q := *p
	q.Rules = append(slices.Clone(p.Rules), Rule{Name: "extra", Pos: Pos{"bench.yaml", 999, 5},
		From: []string{"role3"}, To: []string{"prod"}, Ports: []PortMatch{{Protocol: ProtoTCP, Ports: []PortRange{{443, 443}}}}})
	b.ReportAllocs()
	for b.Loop() {
		d, err := Diff(p, &q, nodes)
		if err != nil {
			b.Fatal(err)
		}
		if d.Identical() {
			b.Fatal("identical")
		}
	}
}

// BenchmarkWarnings10k measures Warnings on the 10,000-node inventory with a
// policy that also has empty segments, missing node names and dead rules.
func BenchmarkWarnings10k(b *testing.B) {
	p, nodes := benchPolicy(10000)
	for i := range 20 {
		p.Segments = append(p.Segments, Segment{Name: fmt.Sprintf("empty%d", i), Pos: Pos{"bench.yaml", 500 + i, 5},
			Selectors: []Selector{{"role": fmt.Sprintf("missing%d", i)}}, Nodes: []string{fmt.Sprintf("ghost-%d", i)}})
		p.Rules = append(p.Rules, Rule{Name: fmt.Sprintf("dead%d", i), Pos: Pos{"bench.yaml", 600 + i, 5},
			From: []string{fmt.Sprintf("empty%d", i)}, To: []string{"all"}, Ports: []PortMatch{{Protocol: ProtoTCP}}})
	}
	b.ReportAllocs()
	for b.Loop() {
		if ws := Warnings(p, nodes); len(ws) != 60 {
			b.Fatalf("%d warnings, want 60", len(ws))
		}
	}
}
