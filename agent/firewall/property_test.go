package firewall

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"pgregory.net/rapid"

	"segmesh/policy"
)

// Pools the generators draw from: few labels, ports with shared boundaries, and
// external prefixes (one inside the overlay) so that random policies overlap a lot.
var (
	labelPool = []map[string]string{{"role": "a"}, {"role": "b"}, {"role": "c"}, {"env": "x"}}
	cidrPool  = []string{"192.0.2.0/24", "10.0.0.0/8", "100.64.0.0/30", "198.51.100.128/25"}
	portPool  = []policy.PortMatch{
		{Protocol: policy.ProtoTCP, Ports: []policy.PortRange{{First: 22, Last: 22}}},
		{Protocol: policy.ProtoTCP, Ports: []policy.PortRange{{First: 80, Last: 90}}},
		{Protocol: policy.ProtoTCP},
		{Protocol: policy.ProtoUDP, Ports: []policy.PortRange{{First: 53, Last: 53}}},
		{Protocol: policy.ProtoUDP},
		{Protocol: policy.ProtoICMP},
		{Protocol: policy.ProtoAny},
	}
	// probes cover every boundary of portPool.
	probes = []struct {
		query string
		proto uint8
		port  uint16
	}{
		{"tcp/21", ProtoTCP, 21}, {"tcp/22", ProtoTCP, 22}, {"tcp/80", ProtoTCP, 80}, {"tcp/90", ProtoTCP, 90},
		{"tcp/91", ProtoTCP, 91}, {"udp/53", ProtoUDP, 53}, {"udp/54", ProtoUDP, 54}, {"icmp", ProtoICMP, 0},
	}
	externalProbes = []netip.Addr{netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("10.1.2.3"),
		netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.200"), netip.MustParseAddr("203.0.113.1")}
)

func genPolicy(t *rapid.T) (*policy.Policy, []policy.Node) {
	nodes := make([]policy.Node, rapid.IntRange(2, 6).Draw(t, "nodes"))
	for i := range nodes {
		labels := map[string]string{}
		for _, l := range rapid.SliceOfN(rapid.SampledFrom(labelPool), 0, 2).Draw(t, fmt.Sprintf("labels%d", i)) {
			for k, v := range l {
				labels[k] = v
			}
		}
		nodes[i] = policy.Node{Name: fmt.Sprintf("n%d", i), Labels: labels,
			Addresses: []netip.Addr{netip.AddrFrom4([4]byte{100, 64, 0, byte(i + 1)})}}
	}
	p := &policy.Policy{File: "p.yaml", Version: 1}
	refs := []string{policy.AllSegment}
	for i := range rapid.IntRange(0, 4).Draw(t, "segments") {
		s := policy.Segment{Name: fmt.Sprintf("s%d", i), Pos: policy.Pos{File: "p.yaml", Line: 100 + i, Col: 5}}
		if rapid.IntRange(0, 2).Draw(t, s.Name+"-external") == 0 {
			for _, c := range rapid.SliceOfNDistinct(rapid.SampledFrom(cidrPool), 1, 2, rapid.ID[string]).Draw(t, s.Name+"-cidrs") {
				s.CIDRs = append(s.CIDRs, policy.CIDR{Prefix: netip.MustParsePrefix(c)})
			}
		} else {
			for _, l := range rapid.SliceOfN(rapid.SampledFrom(labelPool), 0, 2).Draw(t, s.Name+"-selectors") {
				s.Selectors = append(s.Selectors, policy.Selector(l))
			}
			s.Nodes = rapid.SliceOfNDistinct(rapid.SampledFrom([]string{"n0", "n1", "n2"}), 0, 2, rapid.ID[string]).Draw(t, s.Name+"-nodes")
			if len(s.Selectors) == 0 && len(s.Nodes) == 0 {
				s.Nodes = []string{"n0"}
			}
		}
		p.Segments = append(p.Segments, s)
		refs = append(refs, s.Name)
	}
	external := func(name string) bool {
		i := slices.IndexFunc(p.Segments, func(s policy.Segment) bool { return s.Name == name })
		return i >= 0 && len(p.Segments[i].CIDRs) > 0
	}
	for i := range rapid.IntRange(0, 5).Draw(t, "rules") {
		r := policy.Rule{Name: fmt.Sprintf("r%d", i), Pos: policy.Pos{File: "p.yaml", Line: 10 + i, Col: 5}}
		r.From = []string{rapid.SampledFrom(refs).Draw(t, r.Name+"-from")}
		r.To = []string{rapid.SampledFrom(refs).Draw(t, r.Name+"-to")}
		if external(r.From[0]) && external(r.To[0]) {
			r.To = []string{policy.AllSegment}
		}
		r.Ports = rapid.SliceOfN(rapid.SampledFrom(portPool), 1, 3).Draw(t, r.Name+"-ports")
		p.Rules = append(p.Rules, r)
	}
	return p, nodes
}

// TestTraceAgreesWithPolicy checks, on random policies, that the tables built from
// the compiled filters accept exactly the flows policy.Explain allows: a flow between
// two nodes needs the source's egress and the destination's ingress to accept its
// first packet, and the two nodes to be peers; a flow to or from an external address
// needs the node's chain alone.
func TestTraceAgreesWithPolicy(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p, nodes := genPolicy(t)
		c, err := policy.Compile(p, nodes)
		if err != nil {
			t.Skipf("policy does not compile: %v", err) // e.g. rejected combinations; rapid draws another
		}
		tables := map[string]*Table{}
		peers := map[string][]string{}
		for _, n := range nodes {
			v, _ := c.Node(n.Name)
			tab, err := Build("sm0", v.Filter)
			if err != nil {
				t.Fatalf("Build(%s): %v", n.Name, err)
			}
			tables[n.Name], peers[n.Name] = tab, v.Peers
		}
		explain := func(from, to, pkt string) bool {
			x, err := policy.Explain(p, nodes, policy.Query{From: from, To: to, Packet: pkt})
			if err != nil {
				t.Fatalf("Explain(%s -> %s %s): %v", from, to, pkt, err)
			}
			return x.Verdict == policy.Allowed
		}
		for _, a := range nodes {
			for _, pr := range probes {
				for _, b := range nodes {
					if a.Name == b.Name {
						continue
					}
					src, dst := a.Addresses[0], b.Addresses[0]
					out := tables[a.Name].Trace(Opening("sm0", false, src, dst, pr.proto, pr.port))
					in := tables[b.Name].Trace(Opening("sm0", true, dst, src, pr.proto, pr.port))
					got := out.Accepted() && in.Accepted() && slices.Contains(peers[a.Name], b.Name)
					if want := explain(a.Name, b.Name, pr.query); got != want {
						t.Fatalf("%s -> %s %s: tables say %v (egress %s; ingress %s), Explain says %v",
							a.Name, b.Name, pr.query, got, out, in, want)
					}
				}
				for _, ext := range externalProbes {
					out := tables[a.Name].Trace(Opening("sm0", false, a.Addresses[0], ext, pr.proto, pr.port))
					if want := explain(a.Name, ext.String(), pr.query); out.Accepted() != want {
						t.Fatalf("%s -> %s %s: egress says %s, Explain says %v", a.Name, ext, pr.query, out, want)
					}
					in := tables[a.Name].Trace(Opening("sm0", true, a.Addresses[0], ext, pr.proto, pr.port))
					if want := explain(ext.String(), a.Name, pr.query); in.Accepted() != want {
						t.Fatalf("%s -> %s %s: ingress says %s, Explain says %v", ext, a.Name, pr.query, in, want)
					}
				}
			}
		}
	})
}
