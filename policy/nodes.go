package policy

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
)

// NodeNameSyntax is the syntax of node names, as a regular expression without
// anchors: 1 to 63 characters, lowercase letters, digits, '.' and '-', starting
// with a letter or digit. The controller assigns and accepts only such names.
const NodeNameSyntax = "[a-z0-9][a-z0-9.-]{0,62}"

var nodeNameRE = regexp.MustCompile("^" + NodeNameSyntax + "$")

// ValidNodeName reports whether s matches NodeNameSyntax.
func ValidNodeName(s string) bool { return nodeNameRE.MatchString(s) }

// nodeProblem is one problem of an inventory, reported at one node's field.
type nodeProblem struct {
	node  int    // index of the node the problem is reported at
	field string // "name", "addresses" or "routes"
	item  int    // index into the field's list; 0 for the name
	msg   string
}

// checkNodes validates an inventory: names non-empty and unique; at most one
// overlay address per family, each valid, unzoned, specified and not
// IPv4-mapped; no overlay address held by two nodes; routes valid and masked; no
// route of one node overlapping a route or an overlay address of another. Every
// problem that names two nodes names both. Problems come in a deterministic
// order; nodes is not modified.
//
// When sorted is set, nodes are sorted by name and duplicate names are found
// without a map (Compile's fast path).
func checkNodes(nodes []*Node, sorted bool) []nodeProblem {
	var probs []nodeProblem
	add := func(node int, field string, item int, format string, args ...any) {
		probs = append(probs, nodeProblem{node, field, item, fmt.Sprintf(format, args...)})
	}
	var byName map[string]int
	if !sorted {
		byName = make(map[string]int, len(nodes))
	}
	var byFam [2][]ownedAddr
	byFam[0] = make([]ownedAddr, 0, len(nodes))
	byFam[1] = make([]ownedAddr, 0, len(nodes))
	var routes []ownedRange
	for i, n := range nodes {
		if n.Name == "" {
			add(i, "name", 0, "a node has an empty name")
		} else if sorted {
			if i > 0 && nodes[i-1].Name == n.Name {
				add(i, "name", 0, "duplicate node name %q", n.Name)
			}
		} else if _, dup := byName[n.Name]; dup {
			add(i, "name", 0, "duplicate node name %q", n.Name)
		} else {
			byName[n.Name] = i
		}
		var fam [2]int // index+1 of the first address of each family
		for k, a := range n.Addresses {
			if !a.IsValid() || a.IsUnspecified() || a.Zone() != "" || a.Is4In6() {
				add(i, "addresses", k, "node %q: invalid overlay address %q", n.Name, a)
				continue
			}
			f := family(a)
			if fam[f] != 0 {
				add(i, "addresses", k, "node %q has two %s overlay addresses, %s and %s", n.Name, familyName(f), n.Addresses[fam[f]-1], a)
				continue
			}
			fam[f] = k + 1
			byFam[f] = append(byFam[f], ownedAddr{toU128(a), int32(i), int32(k), int8(f)})
		}
		for k, r := range n.Routes {
			switch {
			case !r.IsValid():
				add(i, "routes", k, "node %q: invalid route %q", n.Name, r)
				continue
			case r.Addr().Is4In6():
				add(i, "routes", k, "node %q: route %s is an IPv4-mapped IPv6 prefix; write it as an IPv4 prefix", n.Name, r)
				continue
			case r.Masked() != r:
				add(i, "routes", k, "node %q: route %s has host bits set (did you mean %s?)", n.Name, r, r.Masked())
				continue
			}
			routes = append(routes, ownedRange{prefixRange(r), r, i, k})
		}
	}
	// Addresses held by two nodes: sort (fast on the usual, nearly sorted
	// inventories) and compare neighbours; the first holder keeps the address.
	addrs := make([]ownedAddr, 0, len(byFam[0])+len(byFam[1]))
	for _, fa := range byFam {
		if !slices.IsSortedFunc(fa, compareOwned) {
			slices.SortFunc(fa, compareOwned)
		}
		for _, oa := range fa {
			if n := len(addrs); n > 0 && addrs[n-1].fam == oa.fam && addrs[n-1].v == oa.v {
				add(int(oa.node), "addresses", int(oa.item), "nodes %q and %q both hold overlay address %s", nodes[addrs[n-1].node].Name, nodes[oa.node].Name, oa.addr())
				continue
			}
			addrs = append(addrs, oa)
		}
	}
	if len(routes) == 0 {
		return sortProblems(probs)
	}
	// Overlapping routes of different nodes: sweep the routes in address order,
	// keeping the earlier route that reaches furthest (m1) and the one that
	// reaches furthest among other nodes than m1's (m2). A route overlaps an
	// earlier route of another node exactly when it overlaps the one of those two
	// that belongs to another node, so every such route gets a problem.
	slices.SortFunc(routes, func(a, b ownedRange) int {
		return cmp.Or(compareRanges(a.r, b.r), cmp.Compare(a.node, b.node), cmp.Compare(a.item, b.item))
	})
	m1, m2 := -1, -1
	for i, cur := range routes {
		if i > 0 && routes[i-1].r.bitLen != cur.r.bitLen {
			m1, m2 = -1, -1
		}
		other := m1
		if m1 >= 0 && routes[m1].node == cur.node {
			other = m2
		}
		if other >= 0 && routes[other].r.last.cmp(cur.r.first) >= 0 {
			prev := routes[other]
			add(cur.node, "routes", cur.item, "route %s of node %q overlaps route %s of node %q",
				cur.pfx, nodes[cur.node].Name, prev.pfx, nodes[prev.node].Name)
		}
		switch {
		case m1 < 0:
			m1 = i
		case cur.r.last.cmp(routes[m1].r.last) > 0:
			if cur.node != routes[m1].node {
				m2 = m1
			}
			m1 = i
		case cur.node != routes[m1].node && (m2 < 0 || cur.r.last.cmp(routes[m2].r.last) > 0):
			m2 = i
		}
	}
	// Routes holding another node's overlay address.
	for _, rt := range routes {
		f := 0
		if rt.r.bitLen == 128 {
			f = 1
		}
		k, _ := slices.BinarySearchFunc(addrs, ownedAddr{fam: int8(f), v: rt.r.first}, func(a, b ownedAddr) int {
			return cmp.Or(cmp.Compare(a.fam, b.fam), a.v.cmp(b.v))
		})
		for ; k < len(addrs) && int(addrs[k].fam) == f && addrs[k].v.cmp(rt.r.last) <= 0; k++ {
			if int(addrs[k].node) != rt.node {
				add(rt.node, "routes", rt.item, "route %s of node %q holds overlay address %s of node %q",
					rt.pfx, nodes[rt.node].Name, addrs[k].addr(), nodes[addrs[k].node].Name)
				break
			}
		}
	}
	return sortProblems(probs)
}

// compareOwned orders addresses of one family by value, then holder.
func compareOwned(a, b ownedAddr) int {
	if c := a.v.cmp(b.v); c != 0 {
		return c
	}
	return cmp.Compare(a.node, b.node)
}

// sortProblems orders problems by node, field and item, stably.
func sortProblems(probs []nodeProblem) []nodeProblem {
	slices.SortStableFunc(probs, func(a, b nodeProblem) int {
		return cmp.Or(cmp.Compare(a.node, b.node), cmp.Compare(a.field, b.field), cmp.Compare(a.item, b.item))
	})
	return probs
}

type ownedRange struct {
	r          addrRange
	pfx        netip.Prefix
	node, item int
}

type ownedAddr struct {
	v          u128
	node, item int32
	fam        int8
}

func (o ownedAddr) addr() netip.Addr { return fromU128(o.v, 32+96*int(o.fam)) }

// family returns 0 for IPv4 and 1 for IPv6.
func family(a netip.Addr) int {
	if a.Is4() {
		return 0
	}
	return 1
}

func familyName(f int) string {
	if f == 0 {
		return "IPv4"
	}
	return "IPv6"
}

// CheckNode returns the problems Compile would find with n alone (an empty name,
// an invalid overlay address, two addresses of one family, an invalid route),
// joined one per line; nil when there are none. Conflicts with other nodes (a
// shared address, overlapping routes) are for the caller to check.
func CheckNode(n *Node) error {
	probs := checkNodes([]*Node{n}, true)
	if len(probs) == 0 {
		return nil
	}
	errs := make([]error, len(probs))
	for i, p := range probs {
		errs[i] = errors.New(p.msg)
	}
	return errors.Join(errs...)
}
