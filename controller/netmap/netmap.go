// Package netmap reduces the policy and the inventory to one netmap per node: the
// node itself, the peers it may talk to, its compiled filter, the gossip settings
// and the policy revision, hashed with wire.NetmapHashV2.
//
// Two computations give the same netmaps: FromCompiled computes every netmap from
// scratch (the reference, and a candidate policy's preview); Engine keeps them up
// to date change by change, sharing peer lists per group of nodes, and emits a
// delta per netmap that changed.
package netmap

import (
	"net/netip"

	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
	"segmesh/controller/store"
	"segmesh/policy"
)

// Config holds the inputs that are the same for every netmap.
type Config struct {
	// GossipKey is the 32-byte memberlist encryption key.
	GossipKey []byte
	// GossipPort is the memberlist port agents bind.
	GossipPort uint32
	// OverlayPrefixes are the prefixes node addresses are allocated from.
	OverlayPrefixes []netip.Prefix
}

// Inventory converts stored nodes to the inventory the policy compiler resolves
// segments against (name, labels, overlay addresses), in the same order. Revoked
// nodes are left out: no segment holds them, so no netmap lists them as a peer or
// a set element.
func Inventory(nodes []store.Node) []policy.Node {
	inv := make([]policy.Node, 0, len(nodes))
	for _, n := range nodes {
		if n.Revoked() {
			continue
		}
		inv = append(inv, policy.Node{Name: n.Name, Labels: n.Labels, Addresses: n.Addresses})
	}
	return inv
}

// Revoked returns the netmap of a revoked node: its name, Revoked set, nothing
// else (no peers, default deny, no gossip key), with a version 2 Hash.
func Revoked(rev uint64, name string) *segmeshv1.Netmap {
	nm := &segmeshv1.Netmap{PolicyRevision: rev, Self: &segmeshv1.Node{Name: name}, Filter: &segmeshv1.Filter{}, Revoked: true, HashVersion: wire.HashVersion2}
	nm.Hash = wire.NetmapHashV2(nm)
	return nm
}

// FromCompiled returns every node's netmap, keyed by node name, each with Hash set,
// computed from scratch from compiled (revision rev), a policy compiled against
// Inventory(nodes); a nil compiled is the default-deny policy: no peers and an
// empty filter (callers pass rev 0 then). It is the reference the Engine is
// tested against.
//
// prev returns a node's previously published netmap (nil for none). When a node's
// new netmap differs from its previous one only in PolicyRevision, the previous
// netmap is returned unchanged, so a policy revision that does not concern a node
// leaves its netmap, hash and PolicyRevision as they were: a netmap's
// PolicyRevision is the revision at which that node's netmap last changed.
func FromCompiled(cfg Config, rev uint64, compiled *policy.Compiled, nodes []store.Node, prev func(node string) *segmeshv1.Netmap) map[string]*segmeshv1.Netmap {
	byName := indexNodes(nodes)
	out := make(map[string]*segmeshv1.Netmap, len(nodes))
	for i := range nodes {
		out[nodes[i].Name] = fromCompiled(cfg, rev, compiled, byName, &nodes[i], prev(nodes[i].Name))
	}
	return out
}

// NodeFromCompiled is FromCompiled for the one node named name, whose previous
// netmap is prev (nil for none); nil when nodes has no such node.
func NodeFromCompiled(cfg Config, rev uint64, compiled *policy.Compiled, nodes []store.Node, name string, prev *segmeshv1.Netmap) *segmeshv1.Netmap {
	byName := indexNodes(nodes)
	n, ok := byName[name]
	if !ok {
		return nil
	}
	return fromCompiled(cfg, rev, compiled, byName, n, prev)
}

func indexNodes(nodes []store.Node) map[string]*store.Node {
	byName := make(map[string]*store.Node, len(nodes))
	for i := range nodes {
		byName[nodes[i].Name] = &nodes[i]
	}
	return byName
}

func fromCompiled(cfg Config, rev uint64, compiled *policy.Compiled, byName map[string]*store.Node, n *store.Node, old *segmeshv1.Netmap) *segmeshv1.Netmap {
	if n.Revoked() {
		if old.GetRevoked() {
			return old
		}
		return Revoked(rev, n.Name)
	}
	var view policy.NodeView
	if compiled != nil {
		view, _ = compiled.Node(n.Name) // a node the compiler does not know gets nothing
	}
	nm := &segmeshv1.Netmap{
		PolicyRevision: rev,
		Self: &segmeshv1.Node{
			Name:      n.Name,
			Labels:    n.Labels,
			Addresses: HostPrefixes(n.Addresses),
			PublicKey: n.PublicKey,
			Endpoint:  n.Endpoint,
		},
		Filter:          wire.FilterToProto(view.Filter),
		OverlayPrefixes: wire.PrefixStrings(cfg.OverlayPrefixes),
		KeyRotation:     n.KeyRotation,
		HashVersion:     wire.HashVersion2,
	}
	for _, name := range view.Peers {
		p, ok := byName[name]
		if !ok || name == n.Name || p.Revoked() {
			continue
		}
		nm.Peers = append(nm.Peers, PeerOf(p))
	}
	// Least privilege: only a node with peers gossips, so a node the policy
	// isolates never learns the key (and with it the member list).
	if len(nm.Peers) > 0 {
		nm.Gossip = &segmeshv1.GossipConfig{Key: cfg.GossipKey, Port: cfg.GossipPort}
	}
	if old != nil && old.GetPolicyRevision() != rev {
		nm.PolicyRevision = old.GetPolicyRevision()
		if wire.NetmapHashV2(nm) == old.GetHash() {
			return old
		}
		nm.PolicyRevision = rev
	}
	nm.Hash = wire.NetmapHashV2(nm)
	return nm
}

// PeerOf returns node n's entry in its peers' netmaps: its key, endpoint, overlay
// addresses as allowed IPs, identity key and stored candidates (nil when it has
// none).
func PeerOf(n *store.Node) *segmeshv1.Peer {
	p := &segmeshv1.Peer{Name: n.Name, PublicKey: n.PublicKey, Endpoint: n.Endpoint, AllowedIps: HostPrefixes(n.Addresses), IdentityKey: n.IdentityKey}
	if len(n.Candidates) > 0 {
		p.Candidates = make([]*segmeshv1.Candidate, len(n.Candidates))
		for i, c := range n.Candidates {
			p.Candidates[i] = &segmeshv1.Candidate{Endpoint: c.Endpoint, Kind: c.Kind}
		}
	}
	return p
}

// HostPrefixes formats addresses as single-address prefixes ("100.64.0.2/32",
// "fd5e:6d65:7368::2/128").
func HostPrefixes(addrs []netip.Addr) []string {
	out := make([]string, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, netip.PrefixFrom(a, a.BitLen()).String())
	}
	return out
}
