package main

import (
	"bytes"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite testdata/BENCHMARKS.golden.md")

// fixture reads the inputs in testdata on a fixed machine and date.
func fixture(t *testing.T) *inputs {
	t.Helper()
	in := &inputs{
		machine: machine{cpus: 2, cpu: "AMD EPYC", kernel: "Linux 6.18.44", goVer: "go1.26.8", loadAvg: "1.00 0.80 0.50"},
		now:     time.Date(2026, 12, 2, 3, 0, 0, 0, time.UTC),
	}
	var stderr bytes.Buffer
	err := in.read([]string{"testdata/gotest.txt"},
		[]string{"testdata/loadgen-1000.json", "testdata/lab.json", "testdata/absent.json"}, &stderr)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stderr.String(), "skipping testdata/absent.json") {
		t.Errorf("a missing figures file was not reported: %q", stderr.String())
	}
	return in
}

// rowLine returns the table line of BENCHMARKS.md whose figure cell starts with
// figure.
func rowLine(t *testing.T, md, figure string) string {
	t.Helper()
	for _, line := range strings.Split(md, "\n") {
		if strings.HasPrefix(line, "| "+cell(figure)) {
			return line
		}
	}
	t.Fatalf("no row %q in:\n%s", figure, md)
	return ""
}

func TestRenderGolden(t *testing.T) {
	in := fixture(t)
	var buf bytes.Buffer
	tl, err := in.render(&buf, catalog())
	if err != nil {
		t.Fatal(err)
	}
	md := buf.String()
	golden := filepath.Join("testdata", "BENCHMARKS.golden.md")
	if *update {
		if err := os.WriteFile(golden, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test ./hack/benchreport -update to create it)", err)
	}
	if md != string(want) {
		t.Errorf("the report differs from %s (go test ./hack/benchreport -update rewrites it after checking the change); got:\n%s", golden, md)
	}
	// Met: full apply, membership change, throughput without elements... but
	// throughput with elements (0.91) misses, and so does read-back (6.1 ms).
	if tl.met == 0 || tl.missed == 0 || tl.partial == 0 || tl.unjudged != 4 {
		t.Errorf("tally = %+v, want some met, missed and partial, and the 4 per-change rows judged by hand", tl)
	}
}

// TestIssue8RowsByName checks that every row of issue 8's target table is in
// the report under its name, measured or not.
func TestIssue8RowsByName(t *testing.T) {
	var buf bytes.Buffer
	if _, err := fixture(t).render(&buf, catalog()); err != nil {
		t.Fatal(err)
	}
	md := buf.String()
	for _, name := range []string{
		"one node enrolls, is relabeled, revoked or changes endpoint, 10,000 nodes",
		"policy change reaches every agent, 1,000 / 5,000 simulated agents, full mesh",
		"controller RSS, 5,000 connected agents, full mesh",
		"bytes sent to each existing agent when one node joins a 1,000-node full mesh",
		"compile plus all netmaps, 50,000 nodes",
		"`policy apply` returns",
		// issue 7
		"full apply, 1,000 peers, keepalive 25 s",
		"one membership change at 1,000 peers",
		"re-apply / read-back, 1,000 peers",
		"200,000 prefixes, dataplane only",
		"200,000 prefixes, end to end",
		"agent RSS, 60 s of iperf3 at line rate",
		"agent RSS idle, 100 peers, 2 min",
		"drift restored: nftables rule / route / WireGuard peer",
		"TCP throughput overlay / bare wireguard-go",
	} {
		rowLine(t, md, name)
	}
}

func TestRows(t *testing.T) {
	var buf bytes.Buffer
	if _, err := fixture(t).render(&buf, catalog()); err != nil {
		t.Fatal(err)
	}
	md := buf.String()
	tests := []struct {
		figure string
		want   []string // substrings of the row's line
		not    []string
	}{
		{"compile plus all netmaps, 50,000 nodes", []string{"| not measured: BenchmarkEngine50k (controller/netmap) is not written yet", "≤ 3 s, ≤ 1 GB allocated — not measured |"}, nil},
		{"policy change reaches every agent, 1,000 / 5,000 simulated agents, full mesh: 1,000 agents", []string{"p99, rule change under the full mesh: **6.66 s**", "p50: 4.98 s", "p99 ≤ 1 s — missed", "2 CPUs (AMD EPYC), Linux 6.18.44, go1.26.8; 1000 simulated agents over loopback", "`go run ./hack/loadgen -agents 1000", "2026-12-02 02:40 UTC"}, nil},
		{"policy change reaches every agent, 1,000 / 5,000 simulated agents, full mesh: 5,000 agents", []string{"| not measured: no figures from a 5,000-agent run of hack/loadgen (make bench runs it with LOADGEN_LARGE_AGENTS=5000) |", "— not measured"}, nil},
		{"bytes sent to each existing agent when one node joins a 1,000-node full mesh", []string{"p99: 640 B", "p50: 121 KB", "≤ 1 KB — met"}, nil},
		{"one node enrolls, is relabeled, revoked or changes endpoint, 10,000 nodes: is relabeled", []string{"controller CPU, 1,000 agents, full mesh: 12.0 ms", "engine, 10,000 nodes: not measured: BenchmarkEngineChange10k/relabel", "judged by hand) |"}, []string{"— met"}},
		{"one node enrolls, is relabeled, revoked or changes endpoint, 10,000 nodes: is revoked", []string{"controller CPU, 1,000 agents, full mesh: not measured: a 1,000-agent run of hack/loadgen has no figure \"controller CPU\" of scenario revoke"}, nil},
		{"controller RSS, 5,000 connected agents, full mesh", []string{"| 5,000 agents, peak while every agent gains 4,999 peers and 5,000 agents, after it converged and 5,000 agents, peak during a rule change and 5,000 agents, after all went back to no peers: not measured: no figures from a 5,000-agent run", "; 1,000 agents, peak while every agent gains 999 peers: not measured", "— not measured"}, nil},
		{"full apply, 1,000 peers, keepalive 25 s", []string{"keepalive 25 s: 129 ms", "without keepalive: 152 ms", "≤ 200 ms — met", "Go benchmark in segmesh/agent/dataplane/linux", "-benchtime 5x", "2026-12-02 02:30 UTC"}, nil},
		{"re-apply / read-back, 1,000 peers", []string{"re-apply: 3.50 ms", "read-back: **6.10 ms**", "— missed"}, nil},
		{"drift restored: nftables rule / route / WireGuard peer", []string{"nftables rule: 65.0 ms", "route: 41.0 ms", "WireGuard peer: not measured: no result for BenchmarkDriftRestore/wireguard-peer in the go test output (it failed or was not run)", "— not judged", "-benchtime 3x"}, nil},
		{"200,000 prefixes, end to end", []string{"| not measured: no figures from hack/prefixes (the step failed or was skipped) |"}, nil},
		{"TCP throughput overlay / bare wireguard-go", []string{"no set elements: 1.01", "with set elements: **0.91**", "≥ 0.95 — missed", `netns lab \| 3 runs`}, nil},
	}
	for _, tt := range tests {
		line := rowLine(t, md, tt.figure)
		for _, w := range tt.want {
			if !strings.Contains(line, w) {
				t.Errorf("row %q lacks %q:\n%s", tt.figure, w, line)
			}
		}
		for _, w := range tt.not {
			if strings.Contains(line, w) {
				t.Errorf("row %q has %q:\n%s", tt.figure, w, line)
			}
		}
	}
	// Every benchmark result is listed, with its custom metric.
	if !strings.Contains(md, "| BenchmarkCompile10k | segmesh/policy | 812 ms, 4100 peers/node, 412 MB, 900000 allocs |") {
		t.Errorf("the benchmark list lacks BenchmarkCompile10k with every value:\n%s", md)
	}
}

func TestFormat(t *testing.T) {
	tests := []struct {
		v    float64
		unit string
		want string
	}{
		{0.129, "sec/op", "129 ms"}, {3.5e-3, "sec/op", "3.50 ms"}, {2.5e-7, "sec/op", "250 ns"}, {4.2e-5, "sec/op", "42.0 µs"},
		{27.5, "sec/op", "27.5 s"}, {6660, "ms", "6.66 s"}, {12, "ms", "12.0 ms"}, {0.086, "gone-s", "86.0 ms"},
		{6.9e9, "B/op", "6.90 GB"}, {825e6, "B", "825 MB"}, {121400, "B", "121 KB"}, {640, "B", "640 B"},
		{0.912, "ratio", "0.91"}, {1001, "agents", "1001 agents"}, {1800, "Mbit/s", "1800 Mbit/s"}, {0, "s", "0 s"},
	}
	for _, tt := range tests {
		if got := format(tt.v, tt.unit); got != tt.want {
			t.Errorf("format(%g, %q) = %q, want %q", tt.v, tt.unit, got, tt.want)
		}
	}
	for n, want := range map[int]string{5: "5", 1000: "1,000", 50000: "50,000", 1234567: "1,234,567"} {
		if got := count(n); got != want {
			t.Errorf("count(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestRunWritesReport(t *testing.T) {
	out := filepath.Join(t.TempDir(), "BENCHMARKS.md")
	var stdout, stderr bytes.Buffer
	code := run([]string{"-gotest", "testdata/gotest.txt", "-figures", "testdata/loadgen-1000.json", "-out", out}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("run = %d; stderr: %s", code, stderr.String())
	}
	md, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(md), "# Benchmarks\n") || !strings.Contains(stdout.String(), "wrote "+out) {
		t.Errorf("report %q..., stdout %q", md[:min(len(md), 40)], stdout.String())
	}
	for _, args := range [][]string{{"-figures", "testdata/gotest.txt", "-out", out}, {"-bogus"}, {"stray"}} {
		if code := run(args, io.Discard, io.Discard); code == 0 {
			t.Errorf("run(%q) = 0, want an error", args)
		}
	}
}
