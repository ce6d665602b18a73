package policy

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/goccy/go-yaml/ast"
)

// ParseInventory parses an inventory file (NODES.yaml), the offline stand-in for
// the controller's node list:
//
//	nodes:
//	  - name: web-1                 # [a-z0-9][a-z0-9.-]{0,62}, unique
//	    labels: {role: web}          # optional; string keys and values
//	    addresses: [100.64.0.2, "fd5e:6d65:7368::2"]  # at most one per family
//	    routes: [10.1.0.0/16]        # optional; prefixes the node routes into the overlay
//
// filename only labels positions. On any problem it returns nil and an ErrorList
// of every problem, each at the offending key or value: YAML and type errors,
// unknown fields, invalid names, labels, addresses and prefixes (with the
// canonical prefix as a hint for host bits), and the conflicts Compile refuses
// (duplicate names, an address held by two nodes, overlapping routes of two
// nodes, a route holding another node's address), which name both nodes. The
// nodes are returned in file order.
func ParseInventory(filename string, data []byte) ([]Node, error) {
	p := &fileParser{file: filename}
	nodes := p.parseInventory(data)
	if len(p.errs) > 0 {
		return nil, p.errs.sort()
	}
	return nodes, nil
}

// nodePositions are where a node's values are in an inventory file.
type nodePositions struct {
	entry, name   Pos
	addrs, routes []Pos
}

func (p *fileParser) parseInventory(data []byte) []Node {
	body, ok := p.document(data, "an inventory file")
	if !ok {
		return nil
	}
	if body == nil {
		p.errorf(Pos{File: p.file, Line: 1, Col: 1}, `missing "nodes:" (an empty inventory is "nodes: []")`)
		return nil
	}
	top, ok := p.mapping(body, "inventory", []string{"nodes"})
	if !ok {
		return nil
	}
	v, ok := top["nodes"]
	if !ok {
		p.errorf(p.pos(body), `missing "nodes:" (an empty inventory is "nodes: []")`)
		return nil
	}
	items, _ := p.list(v.Value, "nodes")
	nodes := []Node{}
	var positions []nodePositions
	var named []*Node // nodes whose name is valid: conflicts among them are real
	var namedPos []nodePositions
	valid := true
	for _, item := range items {
		n, pos, ok := p.parseInventoryNode(item)
		valid = valid && ok
		nodes = append(nodes, n)
		positions = append(positions, pos)
	}
	for i := range nodes {
		if nodes[i].Name != "" {
			named = append(named, &nodes[i])
			namedPos = append(namedPos, positions[i])
		}
	}
	// Conflicts between nodes are reported even when other values are invalid,
	// so that one run shows every problem; invalid values were left out.
	for _, pr := range checkNodes(named, false) {
		pos := namedPos[pr.node]
		at := pos.name
		switch pr.field {
		case "addresses":
			at = pos.addrs[pr.item]
		case "routes":
			at = pos.routes[pr.item]
		}
		p.errorf(at, "%s", pr.msg)
	}
	if !valid {
		return nil
	}
	return nodes
}

func (p *fileParser) parseInventoryNode(n ast.Node) (Node, nodePositions, bool) {
	var nd Node
	pos := nodePositions{entry: p.pos(n)}
	pos.name = pos.entry
	m, ok := p.mapping(n, "node", []string{"name", "labels", "addresses", "routes"})
	if !ok {
		return nd, pos, false
	}
	valid := true
	if v, ok := m["name"]; !ok {
		p.errorf(pos.entry, "node is missing its name")
		valid = false
	} else if s, ok := p.str(v.Value, "node name"); !ok {
		valid = false
	} else if !ValidNodeName(s) {
		p.errorf(p.pos(v.Value), "invalid node name %q: must match %s", s, NodeNameSyntax)
		valid = false
	} else {
		nd.Name, pos.name = s, p.pos(v.Value)
	}
	if v, ok := m["labels"]; ok {
		if _, isNull := p.value(v.Value).(*ast.NullNode); !isNull {
			lm, ok := p.mapping(v.Value, "labels", nil)
			valid = valid && ok
			for k, mv := range lm {
				s, ok := p.label(k, mv)
				if !ok {
					valid = false
					continue
				}
				if nd.Labels == nil {
					nd.Labels = map[string]string{}
				}
				nd.Labels[k] = s
			}
		}
	}
	if v, ok := m["addresses"]; ok {
		items, ok := p.list(v.Value, "addresses")
		valid = valid && ok
		for _, item := range items {
			s, ok := p.str(item, "address")
			if !ok {
				valid = false
				continue
			}
			a, err := netip.ParseAddr(s)
			switch {
			case err != nil:
				msg := fmt.Sprintf("invalid address %q: %s", s, stripQuoted(err))
				if _, perr := netip.ParsePrefix(s); perr == nil {
					msg = fmt.Sprintf("address %q is a prefix; write the node's overlay address without /BITS (routed prefixes go in routes)", s)
				}
				p.errorf(p.pos(item), "%s", msg)
				valid = false
				continue
			case a.Zone() != "", a.Is4In6(), a.IsUnspecified():
				_, err := parseEndpointAddr(s)
				p.errorf(p.pos(item), "%v", err)
				valid = false
				continue
			}
			nd.Addresses = append(nd.Addresses, a)
			pos.addrs = append(pos.addrs, p.pos(item))
		}
	}
	if v, ok := m["routes"]; ok {
		items, ok := p.list(v.Value, "routes")
		valid = valid && ok
		for _, item := range items {
			pfx, ok := p.parsePrefix(item, "route")
			if !ok {
				valid = false
				continue
			}
			nd.Routes = append(nd.Routes, pfx)
			pos.routes = append(pos.routes, p.pos(item))
		}
	}
	return nd, pos, valid
}

// MarshalInventory writes nodes in the format ParseInventory reads, sorted by
// name, labels sorted by key, every string double-quoted; ParseInventory of the
// result returns the same nodes (in name order). Nodes are not validated.
func MarshalInventory(nodes []Node) []byte {
	sorted := slices.Clone(nodes)
	slices.SortStableFunc(sorted, func(a, b Node) int { return cmp.Compare(a.Name, b.Name) })
	var b strings.Builder
	if len(sorted) == 0 {
		b.WriteString("nodes: []\n")
		return []byte(b.String())
	}
	b.WriteString("nodes:\n")
	for _, n := range sorted {
		fmt.Fprintf(&b, "  - name: %s\n", strconv.Quote(n.Name))
		if len(n.Labels) > 0 {
			keys := slices.Sorted(maps.Keys(n.Labels))
			parts := make([]string, len(keys))
			for i, k := range keys {
				parts[i] = strconv.Quote(k) + ": " + strconv.Quote(n.Labels[k])
			}
			fmt.Fprintf(&b, "    labels: {%s}\n", strings.Join(parts, ", "))
		}
		parts := make([]string, len(n.Addresses))
		for i, a := range n.Addresses {
			parts[i] = strconv.Quote(a.String())
		}
		fmt.Fprintf(&b, "    addresses: [%s]\n", strings.Join(parts, ", "))
		if len(n.Routes) > 0 {
			parts := make([]string, len(n.Routes))
			for i, r := range n.Routes {
				parts[i] = strconv.Quote(r.String())
			}
			fmt.Fprintf(&b, "    routes: [%s]\n", strings.Join(parts, ", "))
		}
	}
	return []byte(b.String())
}
