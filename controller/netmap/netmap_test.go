package netmap

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
	"segmesh/controller/store"
	"segmesh/policy"
)

func node(name, role string, n byte) store.Node {
	return store.Node{
		Name: name, Labels: map[string]string{"role": role},
		Addresses: []netip.Addr{netip.AddrFrom4([4]byte{100, 64, 0, n}), netip.AddrFrom16([16]byte{0xfd, 0x5e, 15: n})},
		PublicKey: []byte{n, 31: 1}, Endpoint: "192.0.2." + string('0'+rune(n)) + ":51820",
	}
}

var cfg = Config{GossipKey: make([]byte, 32), GossipPort: 7946, OverlayPrefixes: []netip.Prefix{netip.MustParsePrefix("100.64.0.0/10")}}

func mustParse(t *testing.T, src string) *policy.Policy {
	t.Helper()
	p, err := policy.Parse("p.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

const webToDB = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: db
    selectors: [{role: db}]
  - name: ops
    selectors: [{role: ops}]
rules:
  - name: web-to-db
    from: [web]
    to: [db]
    ports: [tcp/5432]
`

func none(string) *segmeshv1.Netmap { return nil }

func TestDefaultDeny(t *testing.T) {
	nodes := []store.Node{node("web-1", "web", 2), node("db-1", "db", 3)}
	nms, err := compute(cfg, 0, nil, nodes, none)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		nm := nms[n.Name]
		if nm == nil {
			t.Fatalf("no netmap for %s", n.Name)
		}
		if len(nm.Peers) != 0 || len(nm.GetFilter().GetIngress()) != 0 || len(nm.GetFilter().GetEgress()) != 0 || nm.PolicyRevision != 0 {
			t.Errorf("%s: default deny netmap has peers %v filter %v rev %d", n.Name, nm.Peers, nm.Filter, nm.PolicyRevision)
		}
		if nm.Hash != wire.NetmapHashV2(nm) || nm.Hash == "" {
			t.Errorf("%s: hash %q is not NetmapHashV2", n.Name, nm.Hash)
		}
		if nm.GetSelf().GetName() != n.Name || !slices.Equal(nm.GetSelf().GetAddresses(), HostPrefixes(n.Addresses)) {
			t.Errorf("%s: self = %v", n.Name, nm.GetSelf())
		}
		// A node without peers never receives the gossip key (least privilege).
		if nm.Gossip != nil || !slices.Equal(nm.OverlayPrefixes, []string{"100.64.0.0/10"}) {
			t.Errorf("%s: gossip %v prefixes %v", n.Name, nm.Gossip, nm.OverlayPrefixes)
		}
	}
}

func TestPeersAndFilter(t *testing.T) {
	nodes := []store.Node{node("web-1", "web", 2), node("db-1", "db", 3), node("ops-1", "ops", 4)}
	nms, err := compute(cfg, 1, mustParse(t, webToDB), nodes, none)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		node      string
		peers     []string
		allowedIP []string
		ingress   int
		egress    int
	}{
		{"web-1", []string{"db-1"}, []string{"100.64.0.3/32", "fd5e::3/128"}, 0, 1},
		{"db-1", []string{"web-1"}, []string{"100.64.0.2/32", "fd5e::2/128"}, 1, 0},
		{"ops-1", nil, nil, 0, 0},
	}
	for _, tt := range tests {
		nm := nms[tt.node]
		var names []string
		var allowed []string
		for _, p := range nm.GetPeers() {
			names = append(names, p.GetName())
			allowed = append(allowed, p.GetAllowedIps()...)
			if p.GetEndpoint() == "" || len(p.GetPublicKey()) != 32 {
				t.Errorf("%s: peer %s lacks endpoint or key", tt.node, p.GetName())
			}
		}
		if !slices.Equal(names, tt.peers) || !slices.Equal(allowed, tt.allowedIP) {
			t.Errorf("%s: peers %v allowed IPs %v; want %v %v", tt.node, names, allowed, tt.peers, tt.allowedIP)
		}
		if len(nm.GetFilter().GetIngress()) != tt.ingress || len(nm.GetFilter().GetEgress()) != tt.egress {
			t.Errorf("%s: filter %v", tt.node, nm.GetFilter())
		}
		if nm.PolicyRevision != 1 {
			t.Errorf("%s: revision %d, want 1", tt.node, nm.PolicyRevision)
		}
		// Only nodes with peers gossip.
		if hasGossip := nm.GetGossip().GetPort() == 7946 && len(nm.GetGossip().GetKey()) == 32; hasGossip != (len(tt.peers) > 0) {
			t.Errorf("%s: gossip config %v with %d peers", tt.node, nm.GetGossip(), len(tt.peers))
		}
	}
}

// TestUnconcernedNodeKeepsNetmap: a new revision that does not change a node's
// netmap keeps the previous netmap object, revision and hash for that node.
func TestUnconcernedNodeKeepsNetmap(t *testing.T) {
	nodes := []store.Node{node("web-1", "web", 2), node("db-1", "db", 3), node("ops-1", "ops", 4)}
	first, err := compute(cfg, 1, mustParse(t, webToDB), nodes, none)
	if err != nil {
		t.Fatal(err)
	}
	second, err := compute(cfg, 2, mustParse(t, webToDB+`  - name: ops-ssh
    from: [ops]
    to: [db]
    ports: [tcp/22]
`), nodes, func(n string) *segmeshv1.Netmap { return first[n] })
	if err != nil {
		t.Fatal(err)
	}
	if second["web-1"] != first["web-1"] {
		t.Errorf("web-1 netmap replaced although the new rule does not concern it")
	}
	for _, n := range []string{"db-1", "ops-1"} {
		if second[n].Hash == first[n].Hash || second[n].PolicyRevision != 2 {
			t.Errorf("%s: hash unchanged or revision %d (want 2)", n, second[n].PolicyRevision)
		}
	}
}

func TestCompileError(t *testing.T) {
	dup := []store.Node{node("a", "web", 2), node("a", "db", 3)}
	if _, err := compute(cfg, 1, mustParse(t, webToDB), dup, none); err == nil {
		t.Fatal("duplicate node names compiled")
	}
}

// compute compiles pol against nodes and returns FromCompiled's netmaps.
func compute(cfg Config, rev uint64, pol *policy.Policy, nodes []store.Node, prev func(node string) *segmeshv1.Netmap) (map[string]*segmeshv1.Netmap, error) {
	var compiled *policy.Compiled
	if pol != nil {
		var err error
		if compiled, err = policy.Compile(pol, Inventory(nodes)); err != nil {
			return nil, fmt.Errorf("compiling policy revision %d against %d nodes: %w", rev, len(nodes), err)
		}
	}
	return FromCompiled(cfg, rev, compiled, nodes, prev), nil
}
