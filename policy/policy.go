package policy

import (
	"fmt"
	"net/netip"
)

// Pos is a position in a policy file; Line and Col are 1-based.
type Pos struct {
	File      string
	Line, Col int
}

// String formats the position as "file:line:col".
func (p Pos) String() string { return fmt.Sprintf("%s:%d:%d", p.File, p.Line, p.Col) }

// Node is one inventory entry the compiler resolves segments against.
type Node struct {
	Name   string
	Labels map[string]string
	// Addresses are the node's overlay addresses, normally one IPv4 and one IPv6.
	Addresses []netip.Addr
	// Routes are prefixes the node routes into the overlay (for example a subnet
	// behind it). Routes of two nodes never overlap, and no route holds another
	// node's overlay address: Compile refuses the inventory otherwise.
	Routes []netip.Prefix
}

// NodeView is what one node receives from a compiled policy (least privilege).
type NodeView struct {
	// Peers are the names of the other nodes this node may exchange traffic with in
	// either direction, sorted. Every address in a node-segment set of Filter belongs
	// to one of them (or to the node itself).
	Peers  []string
	Filter Filter
}
