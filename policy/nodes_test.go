package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

func routed(n Node, routes ...string) Node {
	for _, r := range routes {
		n.Routes = append(n.Routes, netip.MustParsePrefix(r))
	}
	return n
}

// TestCompileInventoryConflicts checks that Compile refuses overlay addresses
// held twice and routes that overlap across nodes, naming both nodes, and
// accepts what does not conflict.
func TestCompileInventoryConflicts(t *testing.T) {
	p := mustParse(t, "p.yaml", "version: 1\n")
	a := func(addrs ...string) Node { return node("a", nil, addrs...) }
	b := func(addrs ...string) Node { return node("b", nil, addrs...) }
	tests := []struct {
		name  string
		nodes []Node
		want  string // "" when accepted
	}{
		{"distinct addresses", []Node{a("100.64.0.1", "fd5e::1"), b("100.64.0.2", "fd5e::2")}, ""},
		{"same IPv4", []Node{a("100.64.0.1"), b("100.64.0.1")}, `nodes "a" and "b" both hold overlay address 100.64.0.1`},
		{"same IPv6", []Node{a("100.64.0.1", "fd5e::1"), b("100.64.0.2", "fd5e::1")}, `nodes "a" and "b" both hold overlay address fd5e::1`},
		{"IPv6 spelled differently", []Node{a("fd5e:0:0::1"), b("fd5e::0:1")}, `nodes "a" and "b" both hold overlay address fd5e::1`},
		{"v4 and v6 of the same bits differ", []Node{a("0.0.0.1"), b("::1")}, ""},
		{"three holders", []Node{a("100.64.0.1"), b("100.64.0.1"), node("c", nil, "100.64.0.1")},
			"nodes \"a\" and \"b\" both hold overlay address 100.64.0.1\nnodes \"a\" and \"c\" both hold overlay address 100.64.0.1"},
		{"two IPv4 on one node", []Node{a("100.64.0.1", "100.64.0.2")}, `node "a" has two IPv4 overlay addresses, 100.64.0.1 and 100.64.0.2`},
		{"adjacent routes", []Node{routed(a("100.64.0.1"), "10.0.0.0/9"), routed(b("100.64.0.2"), "10.128.0.0/9")}, ""},
		{"nested routes", []Node{routed(a("100.64.0.1"), "10.0.0.0/8"), routed(b("100.64.0.2"), "10.1.0.0/16")},
			`route 10.1.0.0/16 of node "b" overlaps route 10.0.0.0/8 of node "a"`},
		{"equal routes", []Node{routed(a("100.64.0.1"), "10.0.0.0/8"), routed(b("100.64.0.2"), "10.0.0.0/8")},
			`route 10.0.0.0/8 of node "b" overlaps route 10.0.0.0/8 of node "a"`},
		{"a /0 route overlaps everything", []Node{routed(a("100.64.0.1"), "0.0.0.0/0"), routed(b("fd5e::2"), "255.255.255.255/32")},
			`route 255.255.255.255/32 of node "b" overlaps route 0.0.0.0/0 of node "a"`},
		{"host routes at the top of the v6 space", []Node{routed(a("fd5e::1"), "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/128"), routed(b("fd5e::2"), "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128")}, ""},
		{"/127 holds both /128", []Node{routed(a("fd5e::1"), "2001:db8::/127"), routed(b("fd5e::2"), "2001:db8::1/128")},
			`route 2001:db8::1/128 of node "b" overlaps route 2001:db8::/127 of node "a"`},
		{"overlapping routes of one node", []Node{routed(a("100.64.0.1"), "10.0.0.0/8", "10.1.0.0/16")}, ""},
		{"route of the same node holds its address", []Node{routed(a("100.64.0.1"), "100.64.0.0/24")}, ""},
		{"route holds another node's address", []Node{routed(a("100.64.0.1"), "100.64.0.0/24"), b("100.64.0.200")},
			`route 100.64.0.0/24 of node "a" holds overlay address 100.64.0.200 of node "b"`},
		{"route holds another node's v6 address at its last address", []Node{routed(a("fd5e::1"), "fd5e:0:0:1::/64"), b("fd5e::1:ffff:ffff:ffff:ffff")},
			`route fd5e:0:0:1::/64 of node "a" holds overlay address fd5e::1:ffff:ffff:ffff:ffff of node "b"`},
		{"route ends just before another node's address", []Node{routed(a("fd5e::1"), "100.64.0.0/25"), b("100.64.0.128")}, ""},
		{"route with host bits", []Node{{Name: "a", Routes: []netip.Prefix{netip.PrefixFrom(netip.MustParseAddr("10.1.0.0"), 8)}}},
			`node "a": route 10.1.0.0/8 has host bits set (did you mean 10.0.0.0/8?)`},
		{"invalid route", []Node{{Name: "a", Routes: []netip.Prefix{{}}}}, `node "a": invalid route "invalid Prefix"`},
	}
	for _, tt := range tests {
		_, err := Compile(p, tt.nodes)
		got := ""
		if err != nil {
			got = strings.TrimPrefix(err.Error(), "compiling policy: ")
		}
		if got != tt.want {
			t.Errorf("%s: Compile error\n%s\nwant\n%s", tt.name, got, tt.want)
		}
	}
}

// TestCheckNodesMatchesBruteForce draws random routes and addresses near each
// other and checks checkNodes against a brute-force oracle: a route gets an
// "overlaps" problem exactly when it overlaps a route of another node that sorts
// before it (by address range, then node), and a "holds" problem exactly when it
// holds another node's overlay address. So every overlapping pair of routes of
// two nodes is reported, at the later route.
func TestCheckNodesMatchesBruteForce(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		n := rapid.IntRange(1, 6).Draw(t, "nodes")
		nodes := make([]Node, n)
		used := map[byte]bool{}
		for i := range nodes {
			nodes[i] = Node{Name: fmt.Sprintf("n%d", i)}
			if b := rapid.ByteRange(0, 63).Draw(t, fmt.Sprintf("a%d", i)); !used[b] && rapid.Bool().Draw(t, fmt.Sprintf("addr%d", i)) {
				used[b] = true
				nodes[i].Addresses = []netip.Addr{netip.AddrFrom4([4]byte{10, 0, 0, b})}
			}
			for j := range rapid.IntRange(0, 3).Draw(t, fmt.Sprintf("routes%d", i)) {
				bits := rapid.IntRange(24, 32).Draw(t, fmt.Sprintf("bits%d-%d", i, j))
				a := netip.AddrFrom4([4]byte{10, 0, 0, rapid.ByteRange(0, 63).Draw(t, fmt.Sprintf("r%d-%d", i, j))})
				nodes[i].Routes = append(nodes[i].Routes, netip.PrefixFrom(a, bits).Masked())
			}
		}
		before := func(i, k, j, l int) bool {
			if c := compareRanges(prefixRange(nodes[i].Routes[k]), prefixRange(nodes[j].Routes[l])); c != 0 {
				return c < 0
			}
			return i < j || i == j && k < l
		}
		want := map[string]bool{}
		for i, ni := range nodes {
			for k, r := range ni.Routes {
				for j, nj := range nodes {
					if i == j {
						continue
					}
					for l, q := range nj.Routes {
						if r.Overlaps(q) && before(j, l, i, k) {
							want[fmt.Sprintf("overlaps %d/%d", i, k)] = true
						}
					}
					for _, a := range nj.Addresses {
						if r.Contains(a) {
							want[fmt.Sprintf("holds %d/%d", i, k)] = true
						}
					}
				}
			}
		}
		ptrs := make([]*Node, len(nodes))
		for i := range nodes {
			ptrs[i] = &nodes[i]
		}
		got := map[string]bool{}
		for _, pr := range checkNodes(ptrs, false) {
			kind := "overlaps"
			if strings.Contains(pr.msg, " holds ") {
				kind = "holds"
			}
			got[fmt.Sprintf("%s %d/%d", kind, pr.node, pr.item)] = true
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("problems %v, want %v for %+v", got, want, nodes)
		}
	})
}
