package policy_test

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"sync"
	"testing"

	"segmesh/policy"
	"segmesh/policy/policytest"
)

// explainerCases returns addresses to query: every node address, addresses of
// the external segments (inside, at the edges, in an except), overlay addresses
// no node holds, and addresses outside everything.
func explainerAddrs(nodes []policy.Node, extra ...string) []netip.Addr {
	var out []netip.Addr
	for _, n := range nodes {
		out = append(out, n.Addresses...)
	}
	for _, s := range extra {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

// TestExplainerMatchesExplain checks that an Explainer answers every flow
// between the given addresses exactly as Explain does, on the bench policy
// (external segments with excepts, both families) and a policy with an
// external segment that holds overlay addresses of nodes.
func TestExplainerMatchesExplain(t *testing.T) {
	bench, benchNodes := policytest.BenchPolicy(60)
	mixed, err := policy.Parse("mixed.yaml", []byte(`version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: db
    selectors: [{role: db}]
  - name: lan
    cidrs: [10.0.0.0/8, "fd00::/8"]
  - name: overlay-range
    cidrs: [100.64.0.0/30]
rules:
  - name: web-to-db
    from: [web]
    to: [db]
    ports: [tcp/5432]
  - name: lan-to-web
    from: [lan]
    to: [web]
    ports: [tcp/443, icmp]
  - name: db-out
    from: [db]
    to: [lan, overlay-range]
    ports: [udp/53]
  - name: web-any
    from: [web]
    to: [web]
    ports: [any]
`))
	if err != nil {
		t.Fatal(err)
	}
	mixedNodes := []policy.Node{
		{Name: "web-1", Labels: map[string]string{"role": "web"}, Addresses: []netip.Addr{netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("fd5e::1")}},
		{Name: "web-2", Labels: map[string]string{"role": "web"}, Addresses: []netip.Addr{netip.MustParseAddr("100.64.0.2")}},
		{Name: "db-1", Labels: map[string]string{"role": "db"}, Addresses: []netip.Addr{netip.MustParseAddr("100.64.0.9"), netip.MustParseAddr("fd5e::9")}},
		{Name: "other", Labels: map[string]string{"role": "x"}, Addresses: []netip.Addr{netip.MustParseAddr("100.64.0.10")}},
	}
	tests := []struct {
		name  string
		p     *policy.Policy
		nodes []policy.Node
		addrs []netip.Addr
	}{
		{"bench", bench, benchNodes[:12], explainerAddrs(benchNodes[:12],
			"192.0.2.7", "198.51.100.1", "198.51.100.200", "8.8.8.8", "10.1.2.3", "100.64.200.1", "fd5e:6d65:7368::ffff", "2001:db8::1")},
		{"mixed", mixed, mixedNodes, explainerAddrs(mixedNodes,
			"10.0.0.1", "10.255.255.255", "100.64.0.3", "100.64.0.4", "fd00::5", "fd5e::77", "192.0.2.1")},
	}
	packets := []policy.Packet{{Protocol: policy.ProtoTCP, Port: 5432}, {Protocol: policy.ProtoTCP, Port: 443}, {Protocol: policy.ProtoUDP, Port: 53},
		{Protocol: policy.ProtoTCP, Port: 8001}, {Protocol: policy.ProtoTCP, Port: 22}, {Protocol: policy.ProtoICMP}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := policy.NewExplainer(tt.p, tt.nodes)
			if err != nil {
				t.Fatal(err)
			}
			compared, errs := 0, 0
			for _, src := range tt.addrs {
				for _, dst := range tt.addrs {
					_, srcNode := e.Node(src)
					_, dstNode := e.Node(dst)
					if !srcNode && !dstNode {
						continue // no node filters a flow between two external addresses (see ExplainFlow)
					}
					for _, pk := range packets {
						q := policy.Query{From: src.String(), To: dst.String(), Packet: pk.String()}
						want, wantErr := policy.Explain(tt.p, tt.nodes, q)
						got, gotErr := e.ExplainFlow(src, dst, pk)
						if (wantErr != nil) != (gotErr != nil) {
							t.Fatalf("%v: Explain error %v, ExplainFlow error %v", q, wantErr, gotErr)
						}
						if wantErr != nil {
							errs++
							continue
						}
						if !reflect.DeepEqual(got, want) {
							t.Fatalf("%v: ExplainFlow gave\n%s\nExplain gave\n%s", q, got.Text(), want.Text())
						}
						compared++
					}
				}
			}
			if compared == 0 || errs == 0 {
				t.Fatalf("compared %d explanations and %d errors; want both (same-node and cross-family pairs are errors)", compared, errs)
			}
		})
	}
}

// TestExplainerSegmentsAndNodes checks the segments and nodes the Explainer
// names for addresses.
func TestExplainerSegmentsAndNodes(t *testing.T) {
	p, nodes := policytest.BenchPolicy(40)
	e, err := policy.NewExplainer(p, nodes)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		addr     string
		node     string
		segments []string
	}{
		{"100.64.0.0", "node-00000", []string{"admins", "prod", "prod-role0", "role0", "zone0"}},
		{"fd5e:6d65:7368::3", "node-00003", []string{"admins", "role3", "staging", "zone0"}},
		{"192.0.2.9", "", []string{"internet", "partner"}},
		{"198.51.100.129", "", []string{"internet"}},
		{"10.0.0.1", "", nil},
		{"100.64.99.99", "", nil},
	}
	for _, tt := range tests {
		a := netip.MustParseAddr(tt.addr)
		node, ok := e.Node(a)
		if node != tt.node || ok != (tt.node != "") {
			t.Errorf("Node(%s) = %q, %v; want %q", a, node, ok, tt.node)
		}
		if got := e.Segments(a); !slices.Equal(got, tt.segments) {
			t.Errorf("Segments(%s) = %v, want %v", a, got, tt.segments)
		}
	}
	if got := e.Segments(netip.Addr{}); got != nil {
		t.Errorf("Segments(invalid) = %v, want nil", got)
	}
	if _, err := e.ExplainFlow(netip.Addr{}, netip.MustParseAddr("100.64.0.1"), policy.Packet{Protocol: policy.ProtoICMP}); err == nil {
		t.Error("ExplainFlow with an invalid source: no error")
	}
}

// TestExplainerOtherProtocol checks that a packet of another protocol is
// allowed only by "any" rules.
func TestExplainerOtherProtocol(t *testing.T) {
	p, nodes := policytest.BenchPolicy(40)
	e, err := policy.NewExplainer(p, nodes)
	if err != nil {
		t.Fatal(err)
	}
	other := policy.Packet{Protocol: policy.ProtoAny}
	// node-00003 is staging and node-00019 is role19: rule "staging -> role19 any".
	x, err := e.ExplainFlow(netip.MustParseAddr("100.64.0.3"), netip.MustParseAddr("100.64.0.19"), other)
	if err != nil {
		t.Fatal(err)
	}
	if x.Verdict != policy.Allowed {
		t.Errorf("staging -> role19, other protocol: %s, want allowed:\n%s", x.Verdict, x.Text())
	}
	x, err = e.ExplainFlow(netip.MustParseAddr("100.64.0.0"), netip.MustParseAddr("100.64.0.1"), other)
	if err != nil {
		t.Fatal(err)
	}
	if x.Verdict != policy.Denied || len(x.Cases) != 1 || len(x.Cases[0].Closest) == 0 {
		t.Errorf("role0 -> role1, other protocol: want denied with closest rules, got\n%s", x.Text())
	}
}

// TestExplainerConcurrent runs queries from several goroutines (for the race
// detector) and checks they agree.
func TestExplainerConcurrent(t *testing.T) {
	p, nodes := policytest.BenchPolicy(100)
	e, err := policy.NewExplainer(p, nodes)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]string, 50)
	explain := func(i int) string {
		x, err := e.ExplainFlow(nodes[i].Addresses[i%2], nodes[i+50].Addresses[i%2], policy.Packet{Protocol: policy.ProtoTCP, Port: uint16(8000 + i%20)})
		if err != nil {
			return err.Error()
		}
		return x.Text()
	}
	for i := range want {
		want[i] = explain(i)
	}
	var wg sync.WaitGroup
	errs := make(chan string, 4*len(want))
	for range 4 {
		wg.Go(func() {
			for i := range want {
				if got := explain(i); got != want[i] {
					errs <- fmt.Sprintf("query %d: got %s, want %s", i, got, want[i])
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

// BenchmarkExplainer10k measures building an Explainer for the benchmark
// policy at 10,000 nodes and answering one flow query, next to one Explain call.
func BenchmarkExplainer10k(b *testing.B) {
	p, nodes := policytest.BenchPolicy(10_000)
	src, dst := nodes[0].Addresses[0], nodes[4321].Addresses[0]
	pk := policy.Packet{Protocol: policy.ProtoTCP, Port: 5432}
	b.Run("build", func(b *testing.B) {
		for b.Loop() {
			if _, err := policy.NewExplainer(p, nodes); err != nil {
				b.Fatal(err)
			}
		}
	})
	e, err := policy.NewExplainer(p, nodes)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("flow", func(b *testing.B) {
		for b.Loop() {
			if _, err := e.ExplainFlow(src, dst, pk); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("explain", func(b *testing.B) {
		q := policy.Query{From: src.String(), To: dst.String(), Packet: pk.String()}
		for b.Loop() {
			if _, err := policy.Explain(p, nodes, q); err != nil {
				b.Fatal(err)
			}
		}
	})
}
