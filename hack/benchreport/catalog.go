package main

// The rows of BENCHMARKS.md: every row of issue 8's and issue 7's target tables,
// each with where its value comes from. A Go benchmark is named as `go test`
// prints it without the "Benchmark" prefix and the -GOMAXPROCS suffix
// ("Apply1000Peers/keepalive=25"); a driver figure by driver, scenario, figure
// and (loadgen) the run's agent count.
//
// Benchmarks not written yet, by the name this catalog expects (each shows as "not
// measured" until it exists):
//
//   - BenchmarkEngine50k (controller/netmap): compile plus every node's netmap
//     from scratch for 50,000 nodes, one iteration = one full computation, with
//     b.ReportAllocs (B/op is the allocation figure).
//   - BenchmarkEngineChange10k/{enroll,relabel,revoke,endpoint}
//     (controller/netmap): one such change applied incrementally to an engine
//     holding 10,000 nodes, one iteration = one change (and its deltas).

const (
	engine50kMissing = "BenchmarkEngine50k (controller/netmap) is not written yet, or failed: see the go test output"
	engineChangeMiss = "BenchmarkEngineChange10k/%s (controller/netmap) is not written yet, or failed: see the go test output"
	targetPerChange  = "≤ 20 ms controller CPU plus work proportional to the nodes whose netmap really changes (in a full mesh every netmap changes; judged by hand)"
	issue8Intro      = "The load generator (`hack/loadgen`: simulated agents with real enrollment and one mutual-TLS stream each, over loopback, sharing the cores with the controller) and the controller's Go benchmarks. The target of each row is issue 8's."
	issue7Intro      = "The Linux dataplane's Go benchmarks and the netns lab drivers (`hack/prefixes`, `hack/throughput`, `hack/agentmem`). The target of each row is issue 7's."
)

// catalog returns the sections of the report.
func catalog() []section {
	perChange := func(what, kind, scenario string) row {
		r := row{
			figure: "one node enrolls, is relabeled, revoked or changes endpoint, 10,000 nodes: " + what,
			target: targetPerChange,
			parts: []part{
				{label: "engine, 10,000 nodes", bench: "EngineChange10k/" + kind, unit: "sec/op", missing: sprintf(engineChangeMiss, kind)},
			},
		}
		for _, n := range []int{1000, 5000} {
			r.parts = append(r.parts, part{label: "controller CPU, " + count(n) + " agents, full mesh", driver: "loadgen", scenario: scenario, figure: "controller CPU", agents: n})
		}
		return r
	}
	lg := func(label, scenario, figure string, agents int, max float64) part {
		return part{label: label, driver: "loadgen", scenario: scenario, figure: figure, agents: agents, max: max}
	}
	return []section{
		{
			title: "Issue 8: controller at scale",
			intro: issue8Intro,
			rows: []row{
				perChange("enrolls", "enroll", "join"),
				perChange("is relabeled", "relabel", "relabel"),
				perChange("is revoked", "revoke", "revoke"),
				perChange("changes endpoint", "endpoint", "endpoint"),
				{
					figure: "policy change reaches every agent, 1,000 / 5,000 simulated agents, full mesh: 1,000 agents",
					target: "p99 ≤ 1 s",
					parts: []part{lg("p99, rule change under the full mesh", "policy", "delivery p99", 1000, 1000), lg("p50", "policy", "delivery p50", 1000, 0),
						lg("p99, no peers to full mesh (every agent gains 999 peers)", "mesh", "delivery p99", 1000, 0), lg("p50", "mesh", "delivery p50", 1000, 0)},
				},
				{
					figure: "policy change reaches every agent, 1,000 / 5,000 simulated agents, full mesh: 5,000 agents",
					target: "p99 ≤ 3 s",
					parts: []part{lg("p99, rule change under the full mesh", "policy", "delivery p99", 5000, 3000), lg("p50", "policy", "delivery p50", 5000, 0),
						lg("p99, no peers to full mesh (every agent gains 4,999 peers)", "mesh", "delivery p99", 5000, 0), lg("p50", "mesh", "delivery p50", 5000, 0),
						lg("p99, full mesh to no peers (every agent drops 4,999 peers)", "nopeers", "delivery p99", 5000, 0), lg("p50", "nopeers", "delivery p50", 5000, 0)},
				},
				{
					figure: "controller RSS, 5,000 connected agents, full mesh",
					target: "≤ 500 MB",
					parts: []part{
						lg("5,000 agents, peak while every agent gains 4,999 peers", "mesh", "controller peak RSS", 5000, 500e6),
						lg("5,000 agents, after it converged", "mesh", "controller RSS after, converged", 5000, 0),
						lg("5,000 agents, peak during a rule change", "policy", "controller peak RSS", 5000, 500e6),
						lg("5,000 agents, after all went back to no peers", "nopeers", "controller RSS after, converged", 5000, 0),
						lg("1,000 agents, peak while every agent gains 999 peers", "mesh", "controller peak RSS", 1000, 0),
					},
				},
				{
					figure: "bytes sent to each existing agent when one node joins a 1,000-node full mesh",
					target: "≤ 1 KB",
					parts:  []part{lg("p99", "join", "bytes to each agent p99", 1000, 1000), lg("p50", "join", "bytes to each agent p50", 1000, 0)},
				},
				{
					figure: "compile plus all netmaps, 50,000 nodes",
					target: "≤ 3 s, ≤ 1 GB allocated",
					parts: []part{
						{label: "time", bench: "Engine50k", unit: "sec/op", max: 3, missing: engine50kMissing},
						{label: "allocated", bench: "Engine50k", unit: "B/op", max: 1e9, missing: engine50kMissing},
					},
				},
				{
					figure: "`policy apply` returns",
					target: "≤ 1 s at 5,000 agents",
					parts: []part{
						lg("5,000 agents, rule change under the full mesh", "policy", "policy apply returns", 5000, 1000),
						lg("5,000 agents, no peers to full mesh", "mesh", "policy apply returns", 5000, 1000),
						lg("5,000 agents, full mesh to no peers", "nopeers", "policy apply returns", 5000, 1000),
						lg("1,000 agents, rule change", "policy", "policy apply returns", 1000, 0),
						lg("1,000 agents, no peers to full mesh", "mesh", "policy apply returns", 1000, 0),
					},
				},
			},
		},
		{
			title: "Issue 7: dataplane and agent",
			intro: issue7Intro,
			rows: []row{
				{
					figure: "full apply, 1,000 peers, keepalive 25 s",
					target: "≤ 200 ms",
					parts: []part{
						{label: "keepalive 25 s", bench: "Apply1000Peers/keepalive=25", unit: "sec/op", max: 0.2},
						{label: "without keepalive", bench: "Apply1000Peers/keepalive=0", unit: "sec/op"},
					},
				},
				{
					figure: "one membership change at 1,000 peers",
					target: "≤ 10 ms",
					parts:  []part{{bench: "MembershipChange1000Peers", unit: "sec/op", max: 0.01}},
				},
				{
					figure: "re-apply / read-back, 1,000 peers",
					target: "≤ 5 ms",
					parts: []part{
						{label: "re-apply", bench: "Reapply1000Peers", unit: "sec/op", max: 0.005},
						{label: "read-back", bench: "Read1000Peers", unit: "sec/op", max: 0.005},
					},
				},
				{
					figure: "200,000 prefixes, dataplane only",
					target: "≤ 2 s",
					parts: []part{
						{label: "grow", bench: "ExternalPrefixes200k/grow", unit: "sec/op", max: 2},
						{label: "shrink", bench: "ExternalPrefixes200k/shrink", unit: "sec/op", max: 2},
						{label: "removed prefix gone", bench: "ExternalPrefixes200k/shrink", unit: "gone-s", max: 2},
					},
				},
				{
					figure: "200,000 prefixes, end to end (`hack/prefixes`)",
					target: "≤ 2 s from apply until the kernel set changed",
					parts: []part{
						{label: "grow (kernel)", driver: "prefixes", scenario: "grow", figure: "kernel set changed", max: 2},
						{label: "shrink (kernel, access removed)", driver: "prefixes", scenario: "shrink", figure: "kernel set changed", max: 2},
						{label: "grow (CLI returned)", driver: "prefixes", scenario: "grow", figure: "apply (CLI)"},
					},
				},
				{
					figure: "agent RSS, 60 s of iperf3 at line rate",
					target: "≤ 64 MB during and after",
					parts: []part{
						{label: "peak during", driver: "agentmem", scenario: "load", figure: "highest agent peak RSS during", max: 64e6},
						{label: "after", driver: "agentmem", scenario: "load", figure: "highest agent RSS after", max: 64e6},
						{label: "throughput", driver: "agentmem", scenario: "load", figure: "received"},
					},
				},
				{
					figure: "agent RSS idle, 100 peers, 2 min",
					target: "≤ 40 MB",
					parts:  []part{{label: "peak", driver: "agentmem", scenario: "idle", figure: "highest agent peak RSS", max: 40e6}},
				},
				{
					figure: "drift restored: nftables rule / route / WireGuard peer",
					target: "≤ 1 s each",
					parts: []part{
						{label: "nftables rule", bench: "DriftRestore/nftables-rule", unit: "sec/op", max: 1},
						{label: "route", bench: "DriftRestore/route", unit: "sec/op", max: 1},
						{label: "WireGuard peer", bench: "DriftRestore/wireguard-peer", unit: "sec/op", max: 1},
					},
				},
				{
					figure: "TCP throughput overlay / bare wireguard-go",
					target: "≥ 0.95",
					parts: []part{
						{label: "no set elements", driver: "throughput", scenario: "no prefixes", figure: "ratio", min: 0.95},
						{label: "with set elements", driver: "throughput", scenario: "with prefixes", figure: "ratio", min: 0.95},
					},
				},
			},
		},
	}
}
