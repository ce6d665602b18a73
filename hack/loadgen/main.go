// Command loadgen measures the segmesh controller under many agents (issue 8): it
// starts a real segmesh-controller on loopback with a temporary data directory,
// enrolls -agents simulated agents for real (a join token from the operator API,
// a WireGuard key, a TLS key and its CSR each) and opens one mutual-TLS
// AgentService.SyncUpdates stream per agent (Sync when the controller does not
// serve it). Every simulated agent counts the bytes and netmap updates it
// receives, records when an update satisfying the scenario's change arrives, and
// answers every update with a Report (applied revision and the hash of the
// resulting netmap, in sync), so that the controller's status sees it converge.
// The first -verify agents apply every delta in full with wire.ApplyDelta, which
// checks the result's hash, as the agent does; the others only check that each
// delta applies to the hash they hold, and keep no peer list.
//
// Usage (from the repository root):
//
//	make build
//	go run ./hack/loadgen [-agents 1000] [-scenario mesh,policy,nopeers,join,endpoint,relabel,revoke]
//	    [-bin bin/segmesh-controller] [-timeout 5m] [-verify 100] [-json FILE] [-verbose]
//
// Scenarios, run in the order given against the same controller and agents
// (which start under a policy giving them no peers):
//
//   - mesh: from the policy that gives the agents no peers (applied first, not
//     measured, unless it is in force) to a full-mesh policy (every agent may
//     reach every other on a port that changes each time): every agent gains
//     every other as a peer, the largest change there is. Figures as for policy.
//   - policy: under the full-mesh policy (applied first, not measured), apply it
//     again with another port: every agent's rules change, its peers stay;
//     figures: how long ApplyPolicy took to return,
//     delivery latency p50/p99/max from the start of the apply until each agent
//     received a netmap of the new revision, bytes each agent received p50/p99
//     (SyncUpdates or Sync response body bytes: connect envelopes, gzip-compressed as the
//     controller sends them to a connect client that accepts gzip, as the agent
//     does), and the uncompressed protobuf size of the agents' netmaps afterwards
//     (of the agents that know it: the verifying ones, and those whose last
//     update was a full netmap).
//   - nopeers: the same with a policy that gives the agents no peers (a rule
//     towards an external CIDR segment).
//   - join: under the full-mesh policy (applied first, not measured), one more
//     node enrolls and opens its stream; the latency is until each existing agent
//     lists it as a peer.
//   - endpoint: agent 0 reopens its stream announcing a new endpoint
//     (SyncRequest.endpoint); the latency is until every other agent has the new
//     endpoint for it. Under the full-mesh policy.
//   - relabel: under the full-mesh policy, one extra node enrolls (not measured:
//     the load generator waits until every agent lists it), then the operator
//     API's LabelNode moves it out of the mesh (role=sim-out); the latency is
//     until no existing agent lists it any more. The extra node is not one of
//     the -agents, so later scenarios see the same fleet.
//   - revoke: the same with the operator API's RevokeNode instead of LabelNode.
//
// For every scenario: controller CPU time (utime+stime of /proc/PID/stat from
// the start of the change until the last agent received it) and the load
// generator's own over the same span (both share the machine's cores), controller
// RSS before the change, its peak (VmHWM, reset to the current RSS before the
// change, read after the status converged, so it includes heap the Go runtime
// kept from earlier scenarios) and its RSS then (every agent connected and
// converged), and the
// time until the controller's Status shows every node's applied hash equal to its
// desired hash. Figures are printed as a table and, with -json, written as a JSON
// array of {scenario, figure, value, unit, agents, conditions, command, date}
// (package segmesh/hack/internal/benchfig; hack/benchreport renders them).
//
// The exit status is 1 when a scenario could not run or some agent never got the
// change within -timeout, 2 on a usage error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"segmesh/hack/internal/benchfig"
	"segmesh/hack/internal/benchlab"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// allScenarios are the scenario names, in their default order.
var allScenarios = []string{"mesh", "policy", "nopeers", "join", "endpoint", "relabel", "revoke"}

// options are the command-line flags.
type options struct {
	agents      int
	scenarios   []string
	bin         string
	timeout     time.Duration
	verify      int
	jsonPath    string
	memProf     string
	debugListen string
	verbose     bool
	command     string // the command line, for the JSON figures
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	var scen string
	fs := flag.NewFlagSet("loadgen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&o.agents, "agents", 1000, "simulated agents (1..20000)")
	fs.StringVar(&scen, "scenario", strings.Join(allScenarios, ","), "comma-separated scenarios: "+strings.Join(allScenarios, ", "))
	fs.StringVar(&o.bin, "bin", "bin/segmesh-controller", "segmesh-controller binary (build it with `make build`)")
	fs.DurationVar(&o.timeout, "timeout", 5*time.Minute, "how long to wait for the agents to get each change (and for the setup)")
	fs.IntVar(&o.verify, "verify", 100, "how many agents (the first ones) apply every delta in full and check its hash, as the agent does; the others check only that each delta applies to the hash they hold")
	fs.StringVar(&o.jsonPath, "json", "", "also write the figures to this file as JSON")
	fs.StringVar(&o.memProf, "memprofile", "", "write the load generator's own heap profile after the setup to this file (to check its per-agent memory)")
	fs.StringVar(&o.debugListen, "controller-debug-listen", "", "start the controller with --debug-listen on this address (e.g. 127.0.0.1:6061) to profile it during the run")
	fs.BoolVar(&o.verbose, "verbose", false, "log progress and the simulated agents' problems to stderr")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.agents < 1 || o.agents > 20000 {
		return o, fmt.Errorf("-agents %d: want 1..20000", o.agents)
	}
	if o.verify < 0 {
		return o, fmt.Errorf("-verify %d: want 0 or more", o.verify)
	}
	if o.timeout <= 0 {
		return o, fmt.Errorf("-timeout %s: want a positive duration", o.timeout)
	}
	var err error
	if o.scenarios, err = parseScenarios(scen); err != nil {
		return o, err
	}
	o.command = strings.Join(append([]string{"go run ./hack/loadgen"}, args...), " ")
	return o, nil
}

// parseScenarios splits a comma list of scenario names; unknown or repeated names
// are errors.
func parseScenarios(s string) ([]string, error) {
	var out []string
	for _, name := range strings.Split(s, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		if !slices.Contains(allScenarios, name) {
			return nil, fmt.Errorf("-scenario: unknown scenario %q (want some of %s)", name, strings.Join(allScenarios, ", "))
		}
		if slices.Contains(out, name) {
			return nil, fmt.Errorf("-scenario: %q given twice", name)
		}
		out = append(out, name)
	}
	if len(out) == 0 {
		return nil, errors.New("-scenario: no scenario given")
	}
	return out, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var o options
	return benchlab.Main("loadgen", stderr, func() (bool, error) {
		var err error
		o, err = parseFlags(args, stderr)
		if err != nil {
			return false, err
		}
		if _, err := os.Stat(o.bin); err != nil {
			return false, fmt.Errorf("controller binary: %w (run `make build` first, or pass -bin)", err)
		}
		return o.verbose, nil
	}, func(log *slog.Logger) error {
		figs, err := measure(ctx, o, log)
		printTable(stdout, figs)
		if o.jsonPath != "" && len(figs) > 0 {
			err = errors.Join(err, benchfig.Write(o.jsonPath, figs))
		}
		return err
	})
}

// conditions describes the machine and load for every figure.
func conditions(o options) string {
	return fmt.Sprintf("%d simulated agents over loopback, one mutual-TLS stream each, controller and load generator on one %d-CPU machine (shared)", o.agents, runtime.NumCPU())
}

func printTable(w io.Writer, figs []benchfig.Figure) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\tfigure\tvalue")
	for _, f := range figs {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Scenario, f.Figure, formatValue(f.Value, f.Unit))
	}
	tw.Flush()
}

// formatValue prints v in unit readably: ms below 10 s, s above; bytes as B, KB,
// MB (10^3, 10^6).
func formatValue(v float64, unit string) string {
	switch unit {
	case "ms":
		if v >= 10000 {
			return fmt.Sprintf("%.1f s", v/1000)
		}
		return fmt.Sprintf("%.0f ms", v)
	case "B":
		switch {
		case v >= 1e6:
			return fmt.Sprintf("%.1f MB", v/1e6)
		case v >= 1e4:
			return fmt.Sprintf("%.1f KB", v/1e3)
		}
		return fmt.Sprintf("%.0f B", v)
	case "s":
		return fmt.Sprintf("%.2f s", v)
	}
	return fmt.Sprintf("%g %s", v, unit)
}
