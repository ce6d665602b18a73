package netmap

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"segmesh/controller/store"
	"segmesh/policy"
	"segmesh/policy/policytest"
)

// benchInventory returns the policy of policytest.BenchPolicy(n), prepared, and
// its nodes as stored records with keys and endpoints.
func benchInventory(b *testing.B, n int) (*policy.Program, []store.Node) {
	b.Helper()
	p, inv := policytest.BenchPolicy(n)
	prog, err := policy.Prepare(p)
	if err != nil {
		b.Fatal(err)
	}
	nodes := make([]store.Node, len(inv))
	for i, in := range inv {
		nodes[i] = store.Node{Name: in.Name, Labels: in.Labels, Addresses: in.Addresses,
			PublicKey: []byte{byte(i >> 16), byte(i >> 8), byte(i), 31: 1}, Endpoint: fmt.Sprintf("192.0.2.%d:%d", i%250+1, 1024+i%60000)}
	}
	return prog, nodes
}

// BenchmarkEngine50k measures computing every netmap of 50,000 nodes under the
// benchmark policy of package policytest (about 20,000 peers per node): segment
// memberships, groups with their shared peer lists, and every node's hash. It
// reports the peers per node.
func BenchmarkEngine50k(b *testing.B) {
	prog, nodes := benchInventory(b, 50_000)
	b.ReportAllocs()
	var e *Engine
	for b.Loop() {
		e = NewEngine(cfg, 1, prog, nodes)
	}
	peers := 0
	for _, n := range e.nodes {
		peers += len(n.group.peers)
	}
	b.ReportMetric(float64(peers)/float64(len(nodes)), "peers/node")
}

// BenchmarkEngineSetPolicy10k measures a policy change at 10,000 nodes: one rule
// more, so that every node that the rule concerns gets a delta.
func BenchmarkEngineSetPolicy10k(b *testing.B) {
	p, _ := policytest.BenchPolicy(10_000)
	q := *p
	q.Rules = append(append([]policy.Rule(nil), p.Rules...), policy.Rule{Name: "extra", Pos: policy.Pos{File: "bench.yaml", Line: 999, Col: 5},
		From: []string{"role3"}, To: []string{"prod"}, Ports: []policy.PortMatch{{Protocol: policy.ProtoTCP, Ports: []policy.PortRange{{First: 443, Last: 443}}}}})
	progs := make([]*policy.Program, 2)
	for i, pol := range []*policy.Policy{p, &q} {
		var err error
		if progs[i], err = policy.Prepare(pol); err != nil {
			b.Fatal(err)
		}
	}
	_, nodes := benchInventory(b, 10_000)
	e := NewEngine(cfg, 1, progs[0], nodes)
	b.ReportAllocs()
	rev, changed := uint64(1), 0
	for b.Loop() {
		rev++
		changed = len(e.SetPolicy(rev, progs[rev%2]))
	}
	b.ReportMetric(float64(changed), "netmaps/op")
}

// BenchmarkEngineChange10k measures one inventory change at 10,000 nodes under
// the benchmark policy: a node enrolls, is relabeled to another role, is revoked,
// or changes endpoint. It reports the netmaps that change per change.
func BenchmarkEngineChange10k(b *testing.B) {
	prog, nodes := benchInventory(b, 10_000)
	for _, kind := range []string{"enroll", "relabel", "revoke", "endpoint"} {
		b.Run(kind, func(b *testing.B) {
			e := NewEngine(cfg, 1, prog, nodes)
			b.ReportAllocs()
			i, changed := 0, 0
			for b.Loop() {
				n := nodes[i%len(nodes)]
				switch kind {
				case "enroll":
					k := len(nodes) + i
					n = store.Node{Name: fmt.Sprintf("new-%05d", i), Labels: map[string]string{"role": fmt.Sprintf("r%d", i%20), "env": "prod", "zone": "z1"},
						Addresses: []netip.Addr{netip.AddrFrom4([4]byte{100, 65 + byte(k>>16), byte(k >> 8), byte(k)})}, PublicKey: []byte{9, byte(k >> 8), byte(k), 31: 1}}
				case "relabel":
					n.Labels = map[string]string{"role": fmt.Sprintf("r%d", (i+1)%20), "env": n.Labels["env"], "zone": n.Labels["zone"]}
				case "revoke":
					n.RevokedAt = time.Unix(1, 0)
				case "endpoint":
					n.Endpoint = fmt.Sprintf("198.51.100.%d:%d", i%250+1, 2000+i%1000)
				}
				u, err := e.Upsert(n)
				if err != nil {
					b.Fatal(err)
				}
				changed = len(u)
				i++
			}
			b.ReportMetric(float64(changed), "netmaps/op")
		})
	}
}
