package policy

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"pgregory.net/rapid"
)

// Pools the generators draw from; small so that random policies overlap a lot.
var (
	labelPool = []map[string]string{{"role": "a"}, {"role": "b"}, {"role": "c"}, {"env": "x"}, {"env": "y"}, {"role": "a", "env": "x"}}
	cidrPool  = []CIDR{
		{Prefix: netip.MustParsePrefix("192.0.2.0/24")},
		{Prefix: netip.MustParsePrefix("198.51.100.0/24"), Except: pfxs("198.51.100.128/25")},
		{Prefix: netip.MustParsePrefix("10.0.0.0/8"), Except: pfxs("10.1.0.0/16", "10.2.3.0/24")},
		{Prefix: netip.MustParsePrefix("2001:db8::/32"), Except: pfxs("2001:db8:1::/48")},
		// External segments may hold overlay addresses too: they open filters but
		// make no peers.
		{Prefix: netip.MustParsePrefix("100.64.0.0/30")},
		{Prefix: netip.MustParsePrefix("fd00::/126")},
	}
	portPool = []string{"tcp/22", "tcp/80-90", "tcp/85-100", "tcp/101", "tcp/103", "udp/53", "udp", "tcp", "icmp", "any", "tcp/65535", "udp/1-10"}
	// probePorts covers every boundary of portPool.
	probePorts = []uint16{1, 9, 10, 11, 21, 22, 23, 53, 79, 80, 85, 90, 91, 100, 101, 102, 103, 104, 443, 65534, 65535}
	// externalProbes holds addresses inside, outside and in the excepts of cidrPool.
	externalProbes = []netip.Addr{
		netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.200"),
		netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("10.2.3.4"), netip.MustParseAddr("10.2.4.4"),
		netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8:1::1"), netip.MustParseAddr("203.0.113.1"),
		// Inside the overlay-covering pool entries; 100.64.0.0 and fd00:: are no
		// node's address, the others may be.
		netip.MustParseAddr("100.64.0.0"), netip.MustParseAddr("100.64.0.3"), netip.MustParseAddr("100.64.0.4"),
		netip.MustParseAddr("fd00::"), netip.MustParseAddr("fd00::3"), netip.MustParseAddr("fd00::4"),
	}
)

func genInventory(t *rapid.T) []Node {
	n := rapid.IntRange(0, 10).Draw(t, "nodes")
	nodes := make([]Node, n)
	for i := range nodes {
		labels := map[string]string{}
		for _, l := range rapid.SliceOfN(rapid.SampledFrom(labelPool), 0, 2).Draw(t, fmt.Sprintf("labels%d", i)) {
			for k, v := range l {
				labels[k] = v
			}
		}
		nodes[i] = Node{Name: fmt.Sprintf("n%d", i), Labels: labels,
			Addresses: []netip.Addr{netip.AddrFrom4([4]byte{100, 64, 0, byte(i + 1)})}}
		if rapid.Bool().Draw(t, fmt.Sprintf("v6-%d", i)) {
			nodes[i].Addresses = append(nodes[i].Addresses, netip.AddrFrom16([16]byte{0: 0xfd, 15: byte(i + 1)}))
		}
	}
	return nodes
}

func genSegment(t *rapid.T, i int) Segment {
	s := Segment{Name: fmt.Sprintf("s%d", i), Pos: Pos{"p.yaml", 100 + i, 5}}
	if rapid.IntRange(0, 3).Draw(t, s.Name+"-kind") == 0 {
		s.CIDRs = rapid.SliceOfNDistinct(rapid.SampledFrom(cidrPool), 1, 3, func(c CIDR) string { return c.Prefix.String() }).Draw(t, s.Name+"-cidrs")
		return s
	}
	for _, l := range rapid.SliceOfN(rapid.SampledFrom(labelPool), 0, 2).Draw(t, s.Name+"-selectors") {
		s.Selectors = append(s.Selectors, Selector(l))
	}
	names := rapid.SliceOfN(rapid.SampledFrom([]string{"n0", "n1", "n2", "n3", "ghost"}), 0, 2).Draw(t, s.Name+"-nodes")
	if len(s.Selectors) == 0 && len(names) == 0 {
		names = []string{"n0"}
	}
	s.Nodes = names
	return s
}

func genRule(t *rapid.T, name string, pos Pos, segs []Segment) Rule {
	r := Rule{Name: name, Pos: pos}
	refs := []string{AllSegment}
	for _, s := range segs {
		refs = append(refs, s.Name)
	}
	side := func(label string) []string {
		l := rapid.SliceOfNDistinct(rapid.SampledFrom(refs), 1, 3, rapid.ID[string]).Draw(t, label)
		if slices.Contains(l, AllSegment) {
			return []string{AllSegment}
		}
		return l
	}
	r.From, r.To = side(name+"-from"), side(name+"-to")
	if externalOnly(segs, r.From) && externalOnly(segs, r.To) {
		r.To = []string{AllSegment}
	}
	for _, ps := range rapid.SliceOfN(rapid.SampledFrom(portPool), 1, 3).Draw(t, name+"-ports") {
		m, err := parsePort(ps)
		if err != nil {
			t.Fatal(err)
		}
		r.Ports = append(r.Ports, m)
	}
	return r
}

func externalOnly(segs []Segment, refs []string) bool {
	for _, r := range refs {
		i := slices.IndexFunc(segs, func(s Segment) bool { return s.Name == r })
		if i < 0 || !segs[i].External() {
			return false
		}
	}
	return true
}

func genPolicy(t *rapid.T) *Policy {
	p := &Policy{File: "p.yaml", Version: 1}
	for i := range rapid.IntRange(0, 5).Draw(t, "segments") {
		p.Segments = append(p.Segments, genSegment(t, i))
	}
	for i := range rapid.IntRange(0, 6).Draw(t, "rules") {
		p.Rules = append(p.Rules, genRule(t, fmt.Sprintf("r%d", i), Pos{"p.yaml", 10 + i, 5}, p.Segments))
	}
	return p
}

// reference is a direct, unoptimised reading of the policy semantics, used as
// the oracle for Compile.
type reference struct {
	p     *Policy
	nodes map[string]Node
}

func (r reference) member(seg string, n Node) bool {
	if seg == AllSegment {
		return true
	}
	for _, s := range r.p.Segments {
		if s.Name == seg {
			return !s.External() && (slices.Contains(s.Nodes, n.Name) || anySelector(s.Selectors, n.Labels))
		}
	}
	return false
}

// holds reports whether address a belongs to segment seg.
func (r reference) holds(seg string, a netip.Addr) bool {
	for _, s := range r.p.Segments {
		if s.Name == seg && s.External() {
			for _, c := range s.CIDRs {
				if c.Prefix.Contains(a) && !slices.ContainsFunc(c.Except, func(e netip.Prefix) bool { return e.Contains(a) }) {
					return true
				}
			}
			return false
		}
	}
	for _, n := range r.nodes {
		if slices.Contains(n.Addresses, a) && r.member(seg, n) {
			return true
		}
	}
	return false
}

func portsAllow(ms []PortMatch, proto Protocol, port uint16) bool {
	for _, m := range ms {
		switch {
		case m.Protocol == ProtoAny:
			return true
		case m.Protocol != proto:
		case len(m.Ports) == 0:
			return true
		default:
			for _, pr := range m.Ports {
				if pr.First <= port && port <= pr.Last {
					return true
				}
			}
		}
	}
	return false
}

// allows says whether the policy lets node n accept (ingress) or open (egress) a
// connection with remote address a.
func (r reference) allows(n Node, egress bool, a netip.Addr, proto Protocol, port uint16) bool {
	for _, rule := range r.p.Rules {
		for _, f := range rule.From {
			for _, to := range rule.To {
				local, remote := to, f
				if egress {
					local, remote = f, to
				}
				if r.member(local, n) && r.holds(remote, a) && portsAllow(rule.Ports, proto, port) {
					return true
				}
			}
		}
	}
	return false
}

func (r reference) peers(n Node) []string {
	var out []string
	for _, m := range r.nodes {
		if m.Name == n.Name {
			continue
		}
		for _, rule := range r.p.Rules {
			for _, f := range rule.From {
				for _, to := range rule.To {
					if r.member(f, n) && r.member(to, m) || r.member(to, n) && r.member(f, m) {
						out = append(out, m.Name)
					}
				}
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// viewAllows evaluates a compiled NodeView the way the firewall does.
func viewAllows(v NodeView, egress bool, a netip.Addr, proto Protocol, port uint16) bool {
	rules := v.Filter.Ingress
	if egress {
		rules = v.Filter.Egress
	}
	for _, fr := range rules {
		i := slices.IndexFunc(v.Filter.Sets, func(s AddressSet) bool { return s.Name == fr.Set })
		if i >= 0 && slices.ContainsFunc(v.Filter.Sets[i].Prefixes, func(p netip.Prefix) bool { return p.Contains(a) }) &&
			portsAllow(fr.Matches, proto, port) {
			return true
		}
	}
	return false
}

// flows calls fn for every probe flow relevant to the inventory.
func flows(nodes []Node, fn func(n Node, egress bool, a netip.Addr, proto Protocol, port uint16)) {
	addrs := slices.Clone(externalProbes)
	for _, n := range nodes {
		addrs = append(addrs, n.Addresses...)
	}
	for _, n := range nodes {
		for _, egress := range []bool{false, true} {
			for _, a := range addrs {
				fn(n, egress, a, ProtoICMP, 0)
				for _, proto := range []Protocol{ProtoTCP, ProtoUDP} {
					for _, port := range probePorts {
						fn(n, egress, a, proto, port)
					}
				}
			}
		}
	}
}

// TestCompileMatchesReference checks Compile against the direct reading of the
// semantics on random policies and inventories: same peers, same verdict for
// every probe flow, canonical matches, and sets only for referenced segments.
func TestCompileMatchesReference(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p, nodes := genPolicy(t), genInventory(t)
		c, err := Compile(p, nodes)
		if err != nil {
			t.Fatal(err)
		}
		ref := reference{p: p, nodes: map[string]Node{}}
		for _, n := range nodes {
			ref.nodes[n.Name] = n
		}
		for _, n := range nodes {
			v, ok := c.Node(n.Name)
			if !ok {
				t.Fatalf("no view for %s", n.Name)
			}
			if want := ref.peers(n); !reflect.DeepEqual(v.Peers, want) {
				t.Fatalf("%s: peers %v, want %v", n.Name, v.Peers, want)
			}
			for _, rules := range [][]FilterRule{v.Filter.Ingress, v.Filter.Egress} {
				for _, fr := range rules {
					if !reflect.DeepEqual(fr.Matches, mergeMatches(fr.Matches)) {
						t.Fatalf("%s: matches of %s not canonical: %+v", n.Name, fr.Set, fr.Matches)
					}
				}
			}
		}
		flows(nodes, func(n Node, egress bool, a netip.Addr, proto Protocol, port uint16) {
			v, _ := c.Node(n.Name)
			if got, want := viewAllows(v, egress, a, proto, port), ref.allows(n, egress, a, proto, port); got != want {
				t.Fatalf("%s egress=%v %v %s/%d: compiled allows=%v, reference %v\n%s", n.Name, egress, a, proto, port, got, want, renderView(n.Name, v))
			}
		})
	})
}

// TestAddingARuleNeverRemoves checks monotonicity: a policy with one more rule
// keeps every peer and every allowed flow of every node.
func TestAddingARuleNeverRemoves(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p, nodes := genPolicy(t), genInventory(t)
		before, err := Compile(p, nodes)
		if err != nil {
			t.Fatal(err)
		}
		p2 := *p
		p2.Rules = append(slices.Clone(p.Rules), genRule(t, "extra", Pos{"p.yaml", 99, 5}, p.Segments))
		after, err := Compile(&p2, nodes)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range nodes {
			v1, _ := before.Node(n.Name)
			v2, _ := after.Node(n.Name)
			for _, peer := range v1.Peers {
				if !slices.Contains(v2.Peers, peer) {
					t.Fatalf("%s lost peer %s after adding a rule", n.Name, peer)
				}
			}
		}
		flows(nodes, func(n Node, egress bool, a netip.Addr, proto Protocol, port uint16) {
			v1, _ := before.Node(n.Name)
			v2, _ := after.Node(n.Name)
			if viewAllows(v1, egress, a, proto, port) && !viewAllows(v2, egress, a, proto, port) {
				t.Fatalf("%s egress=%v %v %s/%d allowed before adding a rule, not after", n.Name, egress, a, proto, port)
			}
		})
	})
}

func permute[T any](t *rapid.T, label string, s []T) []T {
	if len(s) < 2 {
		return s
	}
	return rapid.Permutation(s).Draw(t, label)
}

// TestOrderNeverChangesOutput shuffles every list of the policy and the
// inventory and checks that every NodeView stays identical.
func TestOrderNeverChangesOutput(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p, nodes := genPolicy(t), genInventory(t)
		want, err := Compile(p, nodes)
		if err != nil {
			t.Fatal(err)
		}
		q := &Policy{File: p.File, Version: p.Version}
		for _, s := range permute(t, "segments", p.Segments) {
			s.Selectors = permute(t, s.Name+"-sel", s.Selectors)
			s.Nodes = permute(t, s.Name+"-nodes", s.Nodes)
			s.CIDRs = permute(t, s.Name+"-cidrs", s.CIDRs)
			q.Segments = append(q.Segments, s)
		}
		for _, r := range permute(t, "rules", p.Rules) {
			r.From = permute(t, r.Name+"-from", r.From)
			r.To = permute(t, r.Name+"-to", r.To)
			r.Ports = permute(t, r.Name+"-ports", r.Ports)
			q.Rules = append(q.Rules, r)
		}
		got, err := Compile(q, permute(t, "inventory", nodes))
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got.Nodes(), want.Nodes()) {
			t.Fatalf("Nodes() = %v, want %v", got.Nodes(), want.Nodes())
		}
		for _, n := range want.Nodes() {
			g, _ := got.Node(n)
			w, _ := want.Node(n)
			if !reflect.DeepEqual(g, w) {
				t.Fatalf("reordering changed %s:\n%s\nwant:\n%s", n, renderView(n, g), renderView(n, w))
			}
		}
	})
}
