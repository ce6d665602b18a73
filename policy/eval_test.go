package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"pgregory.net/rapid"
)

// compiledAllows is what the dataplane does with a new connection: the source
// node's egress filter, the destination node's ingress filter and, between two
// nodes, WireGuard (they must be peers). src or dst is nil for an external address.
func compiledAllows(c *Compiled, src, dst *Node, srcAddr, dstAddr netip.Addr, pk Packet) bool {
	if src != nil {
		v, _ := c.Node(src.Name)
		if !viewAllows(v, true, dstAddr, pk.Protocol, pk.Port) {
			return false
		}
		if dst != nil && !slices.Contains(v.Peers, dst.Name) {
			return false
		}
	}
	if dst != nil {
		v, _ := c.Node(dst.Name)
		if !viewAllows(v, false, srcAddr, pk.Protocol, pk.Port) {
			return false
		}
	}
	return src != nil || dst != nil
}

func addrOf(n Node, f int) (netip.Addr, bool) {
	for _, a := range n.Addresses {
		if family(a) == f {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// TestEvaluatorMatchesCompiled checks, on random policies and inventories, that
// the evaluator behind RunTests, Explain and Diff gives, for every pair of nodes,
// node and external address, family and probe packet, the verdict of the
// compiled filters and peer lists.
func TestEvaluatorMatchesCompiled(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p, nodes := genPolicy(t), genInventory(t)
		c, err := Compile(p, nodes)
		if err != nil {
			t.Fatal(err)
		}
		u, err := newUniverse(p, nodes, nil)
		if err != nil {
			t.Fatal(err)
		}
		classOf := func(n Node) *class { return u.classes[u.classOf[u.nodeIndex[n.Name]]] }
		for _, a := range nodes {
			for f := range 2 {
				aa, ok := addrOf(a, f)
				if !ok {
					continue
				}
				for _, b := range nodes {
					ba, ok := addrOf(b, f)
					if a.Name == b.Name || !ok {
						continue
					}
					got := u.allowed(classOf(a), classOf(b), f)
					for _, pk := range probePackets() {
						if want := compiledAllows(c, &a, &b, aa, ba, pk); got.Has(pk) != want {
							t.Fatalf("%s -> %s %s over %s: evaluator %v, compiled %v", a.Name, b.Name, pk, familyName(f), got.Has(pk), want)
						}
					}
				}
				for _, x := range externalProbes {
					if family(x) != f {
						continue
					}
					if _, owned := u.addrOwner[x]; owned {
						continue
					}
					xc := u.classes[u.atoms[u.atomAt(x)].class]
					out, in := u.allowed(classOf(a), xc, f), u.allowed(xc, classOf(a), f)
					for _, pk := range probePackets() {
						if want := compiledAllows(c, &a, nil, aa, x, pk); out.Has(pk) != want {
							t.Fatalf("%s -> %s %s: evaluator %v, compiled %v", a.Name, x, pk, out.Has(pk), want)
						}
						if want := compiledAllows(c, nil, &a, x, aa, pk); in.Has(pk) != want {
							t.Fatalf("%s -> %s %s: evaluator %v, compiled %v", x, a.Name, pk, in.Has(pk), want)
						}
					}
				}
			}
		}
		for _, a := range nodes {
			for _, b := range nodes {
				if a.Name == b.Name {
					continue
				}
				v, _ := c.Node(a.Name)
				if got, want := u.peers(classOf(a), classOf(b)), slices.Contains(v.Peers, b.Name); got != want {
					t.Fatalf("peers %s %s: evaluator %v, compiled %v", a.Name, b.Name, got, want)
				}
			}
		}
	})
}

// TestRunTestsMatchesCompiled builds random flow tests between node segments
// and checks that RunTests fails one on the inventory exactly when a pair of
// distinct member nodes has a compiled verdict that contradicts it.
func TestRunTestsMatchesCompiled(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p, nodes := genPolicy(t), genInventory(t)
		c, err := Compile(p, nodes)
		if err != nil {
			t.Fatal(err)
		}
		refs := []string{AllSegment}
		for _, s := range p.Segments {
			if !s.External() {
				refs = append(refs, s.Name)
			}
		}
		ref := reference{p: p}
		from, to := rapid.SampledFrom(refs).Draw(t, "from"), rapid.SampledFrom(refs).Draw(t, "to")
		pm, err := parsePort(rapid.SampledFrom(portPool).Draw(t, "port"))
		if err != nil {
			t.Fatal(err)
		}
		allow := rapid.Bool().Draw(t, "allow")
		test := Test{Name: "t", Pos: Pos{"p.yaml", 90, 5}, From: Endpoint{Name: from}, To: Endpoint{Name: to}}
		if allow {
			test.Allow = []PortMatch{pm}
		} else {
			test.Deny = []PortMatch{pm}
		}
		p.Tests = []Test{test}
		want, pairs := false, 0
		for _, a := range nodes {
			for _, b := range nodes {
				if a.Name == b.Name || !ref.member(from, a) || !ref.member(to, b) {
					continue
				}
				for f := range 2 {
					aa, ok1 := addrOf(a, f)
					ba, ok2 := addrOf(b, f)
					if !ok1 || !ok2 {
						continue
					}
					pairs++
					for _, pk := range probePackets() {
						if !setHas([]PortMatch{pm}, pk) {
							continue
						}
						if compiledAllows(c, &a, &b, aa, ba, pk) != allow {
							want = true
						}
					}
				}
			}
		}
		failures, err := RunTests(p, nodes)
		if err != nil {
			t.Fatal(err)
		}
		var got *TestFailure
		for i := range failures {
			if failures[i].Inventory == InventoryRun {
				got = &failures[i]
			}
		}
		switch {
		case pairs == 0:
			if got == nil || !got.NoMatch {
				t.Fatalf("test %+v with no flow: failure %+v, want a NoMatch failure", test, got)
			}
		case (got != nil) != want:
			t.Fatalf("test %+v: failure %+v, compiled views say failing=%v", test, got, want)
		}
	})
}

// TestDiffMatchesCompiled checks Diff against the compiled views: a policy and
// its reordering are identical; adding a rule removes nothing and adds exactly
// what the views gain; Identical holds exactly when no probe flow and no peer changes.
func TestDiffMatchesCompiled(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		p, nodes := genPolicy(t), genInventory(t)
		q := &Policy{File: p.File, Version: p.Version, Segments: permute(t, "segments", slices.Clone(p.Segments)), Rules: permute(t, "rules", slices.Clone(p.Rules))}
		if d, err := Diff(p, q, nodes); err != nil || !d.Identical() {
			t.Fatalf("Diff of a policy and its reordering: %v\n%s", err, d.Text())
		}
		p2 := *p
		p2.Rules = append(slices.Clone(p.Rules), genRule(t, "extra", Pos{"p.yaml", 99, 5}, p.Segments))
		d, err := Diff(p, &p2, nodes)
		if err != nil {
			t.Fatal(err)
		}
		if len(d.Removed) > 0 || slices.ContainsFunc(d.Peers, func(pc PeerChange) bool { return pc.RemovedCount > 0 }) {
			t.Fatalf("adding a rule removed flows or peers:\n%s", d.Text())
		}
		before, err := Compile(p, nodes)
		if err != nil {
			t.Fatal(err)
		}
		after, err := Compile(&p2, nodes)
		if err != nil {
			t.Fatal(err)
		}
		changed := false
		for _, a := range nodes {
			v1, _ := before.Node(a.Name)
			v2, _ := after.Node(a.Name)
			if !slices.Equal(v1.Peers, v2.Peers) {
				changed = true
			}
		}
		probe := func(src, dst *Node, sa, da netip.Addr) {
			for _, pk := range probePackets() {
				if compiledAllows(before, src, dst, sa, da, pk) != compiledAllows(after, src, dst, sa, da, pk) {
					changed = true
				}
			}
		}
		for i := range nodes {
			for f := range 2 {
				aa, ok := addrOf(nodes[i], f)
				if !ok {
					continue
				}
				for j := range nodes {
					if ba, ok := addrOf(nodes[j], f); ok && i != j {
						probe(&nodes[i], &nodes[j], aa, ba)
					}
				}
				for _, x := range externalProbes {
					if family(x) == f && !slices.ContainsFunc(nodes, func(n Node) bool { return slices.Contains(n.Addresses, x) }) {
						probe(&nodes[i], nil, aa, x)
						probe(nil, &nodes[i], x, aa)
					}
				}
			}
		}
		if d.Identical() == changed {
			t.Fatalf("Diff identical=%v, compiled views changed=%v\n%s", d.Identical(), changed, d.Text())
		}
		for _, ch := range d.Added {
			if ch.Count == 0 || len(ch.Flows) == 0 || len(ch.Rules) == 0 || ch.Ports.Empty() {
				t.Fatalf("incomplete change %+v", ch)
			}
			if !slices.ContainsFunc(ch.Rules, func(r RuleRef) bool { return r.Name == "extra" }) {
				t.Fatalf("added flows %+v not attributed to the added rule", ch)
			}
		}
	})
}

// TestEvaluatorPrefixEdges checks that an external segment holds exactly the
// addresses netip.Prefix.Contains says, at both ends of every prefix length
// class (/0, /1, /31, /32 and /0, /1, /127, /128) and of except prefixes: for
// each, a flow from the first and last address is allowed, from the addresses
// just outside denied, in the evaluator (Explain) and in the compiled filter alike.
func TestEvaluatorPrefixEdges(t *testing.T) {
	node4 := Node{Name: "n", Labels: map[string]string{"role": "n"},
		Addresses: []netip.Addr{netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("fd5e:6d65:7368::1")}}
	tests := []struct {
		cidr   string
		except []string
	}{
		{"0.0.0.0/0", nil},
		{"0.0.0.0/1", nil},
		{"128.0.0.0/1", nil},
		{"192.0.2.6/31", nil},
		{"192.0.2.7/32", nil},
		{"255.255.255.255/32", nil},
		{"0.0.0.0/32", nil},
		{"::/0", nil},
		{"8000::/1", nil},
		{"2001:db8::6/127", nil},
		{"2001:db8::7/128", nil},
		{"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", nil},
		{"10.0.0.0/8", []string{"10.0.0.0/32", "10.255.255.255/32", "10.1.0.0/16"}},
		{"2001:db8::/32", []string{"2001:db8::/128", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff/128"}},
		{"0.0.0.0/0", []string{"0.0.0.0/1"}},
	}
	for _, tt := range tests {
		t.Run(tt.cidr+fmt.Sprint(tt.except), func(t *testing.T) {
			pfx := netip.MustParsePrefix(tt.cidr)
			cidr := CIDR{Prefix: pfx}
			for _, e := range tt.except {
				cidr.Except = append(cidr.Except, netip.MustParsePrefix(e))
			}
			p := &Policy{File: "p.yaml", Version: 1,
				Segments: []Segment{{Name: "ext", CIDRs: []CIDR{cidr}}, {Name: "n", Selectors: []Selector{{"role": "n"}}}},
				Rules:    []Rule{{Name: "in", Pos: Pos{"p.yaml", 1, 1}, From: []string{"ext"}, To: []string{"n"}, Ports: []PortMatch{{Protocol: ProtoTCP, Ports: []PortRange{{22, 22}}}}}},
			}
			nodes := []Node{node4}
			c := mustCompile(t, p, nodes)
			var probes []netip.Addr
			for _, q := range append([]netip.Prefix{pfx}, cidr.Except...) {
				r := prefixRange(q)
				first, last := fromU128(r.first, r.bitLen), fromU128(r.last, r.bitLen)
				probes = append(probes, first, last, first.Prev(), last.Next(), first.Next(), last.Prev())
			}
			for _, a := range probes {
				if !a.IsValid() || a.IsUnspecified() || slices.Contains(node4.Addresses, a) {
					continue
				}
				want := pfx.Contains(a) && !slices.ContainsFunc(cidr.Except, func(e netip.Prefix) bool { return e.Contains(a) })
				x, err := Explain(p, nodes, Query{From: a.String(), To: "n", Packet: "tcp/22"})
				if err != nil {
					t.Fatal(err)
				}
				if got := x.Verdict == Allowed; got != want {
					t.Errorf("from %s: Explain verdict %s, want allowed=%v", a, x.Verdict, want)
				}
				if got := compiledAllows(c, nil, &nodes[0], a, nodes[0].Addresses[family(a)], Packet{ProtoTCP, 22}); got != want {
					t.Errorf("from %s: compiled filter allows=%v, want %v", a, got, want)
				}
			}
		})
	}
}
