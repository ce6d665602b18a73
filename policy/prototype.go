package policy

import (
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// Prototype overlay prefixes: the default overlay prefixes of segmesh, from
// which PrototypeInventory numbers its nodes.
var (
	prototypeV4 = netip.MustParsePrefix("100.64.0.0/10")
	prototypeV6 = netip.MustParsePrefix("fd5e:6d65:7368::/48")
)

// PrototypeInventory derives an inventory from policies alone, so that tests,
// explanations and diffs can be evaluated without a real one. It holds, in this
// order and without duplicates:
//
//   - for every distinct selector of a node segment, two nodes carrying exactly
//     the selector's labels, named after them: "role=web#1" and "role=web#2"
//     (labels sorted and joined by commas: "env=prod,role=web#1");
//   - for every explicit node name of a segment, one node of that name without labels;
//   - two nodes without labels, "unlabeled#1" and "unlabeled#2", that only the
//     built-in segment holds.
//
// Node i (0-based) has the overlay addresses 100.64.0.0 + i+1 and
// fd5e:6d65:7368:: + i+1. A prototype node stands for every real node with the
// same labels; real nodes that combine the labels of several selectors, and
// labelled nodes listed by name, need a real inventory to be evaluated.
func PrototypeInventory(ps ...*Policy) []Node {
	var out []Node
	seen := map[string]bool{}
	add := func(name string, labels map[string]string) {
		if seen[name] {
			return
		}
		seen[name] = true
		i := uint64(len(out) + 1)
		v4, v6 := toU128(prototypeV4.Addr()), toU128(prototypeV6.Addr())
		v4.lo += i
		v6.lo += i
		out = append(out, Node{Name: name, Labels: labels, Addresses: []netip.Addr{fromU128(v4, 32), fromU128(v6, 128)}})
	}
	for _, p := range ps {
		for _, s := range p.Segments {
			for _, sel := range s.Selectors {
				name := selectorName(sel)
				add(name+"#1", maps.Clone(map[string]string(sel)))
				add(name+"#2", maps.Clone(map[string]string(sel)))
			}
		}
	}
	var explicit []string
	for _, p := range ps {
		for _, s := range p.Segments {
			explicit = append(explicit, s.Nodes...)
		}
	}
	slices.Sort(explicit)
	for _, n := range slices.Compact(explicit) {
		add(n, nil)
	}
	add("unlabeled#1", nil)
	add("unlabeled#2", nil)
	return out
}

// selectorName writes a selector as "k1=v1,k2=v2", keys sorted.
func selectorName(sel Selector) string {
	keys := slices.Sorted(maps.Keys(sel))
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + sel[k]
	}
	return strings.Join(parts, ",")
}

// inPrototypeOverlay reports whether a lies in the prefixes PrototypeInventory
// numbers its nodes from: such an address names a real node only in a real inventory.
func inPrototypeOverlay(a netip.Addr) bool {
	return prototypeV4.Contains(a) || prototypeV6.Contains(a)
}
