package policy_test

import (
	"fmt"
	"reflect"
	"slices"
	"testing"

	"segmesh/policy"
	"segmesh/policy/policytest"
)

// BenchmarkCompile10k measures compiling the benchmark policy for 10,000 nodes
// and producing every node's view (the budget is 1 s on 2 cores). It reports
// the average number of peers per node.
func BenchmarkCompile10k(b *testing.B) {
	p, nodes := policytest.BenchPolicy(10_000)
	b.ReportAllocs()
	var peers int
	for b.Loop() {
		c, err := policy.Compile(p, nodes)
		if err != nil {
			b.Fatal(err)
		}
		peers = 0
		for _, name := range c.Nodes() {
			v, _ := c.Node(name)
			peers += len(v.Peers)
		}
	}
	b.ReportMetric(float64(peers)/float64(len(nodes)), "peers/node")
}

// BenchmarkCompileOnly10k measures Compile alone: memberships, sets and the
// per-group filters, without building each node's peer list.
func BenchmarkCompileOnly10k(b *testing.B) {
	p, nodes := policytest.BenchPolicy(10_000)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := policy.Compile(p, nodes); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRunTests10k runs 21 tests on the prototype and on 10,000 nodes.
func BenchmarkRunTests10k(b *testing.B) {
	p, nodes := policytest.BenchPolicy(10_000)
	policytest.BenchTests(p)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := policy.RunTests(p, nodes); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDiff10k diffs the benchmark policy against a copy with one more
// rule on 10,000 nodes.
func BenchmarkDiff10k(b *testing.B) {
	p, nodes := policytest.BenchPolicy(10_000)
	q := *p
	q.Rules = append(slices.Clone(p.Rules), policy.Rule{Name: "extra", Pos: policy.Pos{"bench.yaml", 999, 5},
		From: []string{"role3"}, To: []string{"prod"}, Ports: []policy.PortMatch{{Protocol: policy.ProtoTCP, Ports: []policy.PortRange{{443, 443}}}}})
	b.ReportAllocs()
	for b.Loop() {
		d, err := policy.Diff(p, &q, nodes)
		if err != nil {
			b.Fatal(err)
		}
		if d.Identical() {
			b.Fatal("identical")
		}
	}
}

// BenchmarkWarnings10k measures Warnings on the 10,000-node inventory with a
// policy that also has empty segments, missing node names and dead rules.
func BenchmarkWarnings10k(b *testing.B) {
	p, nodes := policytest.BenchPolicy(10000)
	for i := range 20 {
		p.Segments = append(p.Segments, policy.Segment{Name: fmt.Sprintf("empty%d", i), Pos: policy.Pos{"bench.yaml", 500 + i, 5},
			Selectors: []policy.Selector{{"role": fmt.Sprintf("missing%d", i)}}, Nodes: []string{fmt.Sprintf("ghost-%d", i)}})
		p.Rules = append(p.Rules, policy.Rule{Name: fmt.Sprintf("dead%d", i), Pos: policy.Pos{"bench.yaml", 600 + i, 5},
			From: []string{fmt.Sprintf("empty%d", i)}, To: []string{"all"}, Ports: []policy.PortMatch{{Protocol: policy.ProtoTCP}}})
	}
	b.ReportAllocs()
	for b.Loop() {
		if ws := policy.Warnings(p, nodes); len(ws) != 60 {
			b.Fatalf("%d warnings, want 60", len(ws))
		}
	}
}

// TestNodeConcurrent calls Node from several goroutines (run with -race): peer
// lists are built lazily, once per group of nodes.
func TestNodeConcurrent(t *testing.T) {
	p, nodes := policytest.BenchPolicy(500)
	c := compile(t, p, nodes)
	want := map[string]policy.NodeView{}
	for _, n := range c.Nodes() {
		want[n], _ = c.Node(n)
	}
	c = compile(t, p, nodes)
	done := make(chan struct{})
	for range 4 {
		go func() {
			defer func() { done <- struct{}{} }()
			for _, n := range c.Nodes() {
				if v, _ := c.Node(n); !reflect.DeepEqual(v, want[n]) {
					t.Errorf("concurrent Node(%q) differs", n)
					return
				}
			}
		}()
	}
	for range 4 {
		<-done
	}
}

func compile(t *testing.T, p *policy.Policy, nodes []policy.Node) *policy.Compiled {
	t.Helper()
	c, err := policy.Compile(p, nodes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
