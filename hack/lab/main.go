// Command lab is the segmesh demo driver (run by hack/demo.sh): in network
// namespaces made by package segmesh/test/lab it starts a controller and one agent
// per example host, applies a policy, waits until every node enforces it, prints
// `segmesh status` and a connectivity matrix observed with real TCP, UDP and ICMP
// probes, and removes everything it made, also on Ctrl-C, SIGTERM or SIGHUP.
//
// Usage (as root, binaries built into BIN by demo.sh):
//
//	lab -bin BIN [-policy examples/policy.yaml] [-nat] [-ha] [-keep] [-v]
//
// With -nat (`make demo-nat`) the hosts sit behind the NAT routers of
// lab.ExampleNATs: web-1 and web-2 behind two port-preserving NATs, api-1 behind
// a symmetric NAT, db-1 behind a 1:1 NAT, ops-1 on the public underlay. The
// controller answers STUN (--stun-listen :3478) and the agents offer relay
// ports (only ops-1 relays: the example policy's relays section names it); the
// demo then prints the path every peer of api-1 takes (direct or relay via
// ops-1) with `segmesh nodes show api-1`.
//
// With -ha (`make demo-ha`) three controller hosts (controller-1..3, 192.0.2.1-3)
// each run a member of one real etcd cluster (hack/etcd) and a segmesh-controller
// with --store etcd; agents and the CLI get all three URLs. After the matrix the
// demo prints which replica each agent streams from, kills controller-1 with
// SIGKILL, waits until every agent streams from another replica, probes the
// whole matrix again, and restarts controller-1.
//
// Exit status: 0 when every matrix cell matches the policy, 1 on any mismatch or
// error, 130 when interrupted.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"segmesh/test/lab"
)

func main() {
	os.Exit(run())
}

func run() int {
	binDir := flag.String("bin", "", "directory holding segmesh-controller, segmesh-agent, segmesh and probe (required)")
	policyPath := flag.String("policy", "examples/policy.yaml", "policy file to apply")
	keep := flag.Bool("keep", false, "keep the lab directory (logs, state) after the run")
	verbose := flag.Bool("v", false, "log lab operations and run agents with --log-level debug")
	ha := flag.Bool("ha", false, "run three controller replicas on a three-member etcd cluster, then kill -9 controller-1 and show the agents move and the matrix hold")
	behindNAT := flag.Bool("nat", false, "put web-1, web-2 behind two port-preserving NATs, api-1 behind a symmetric NAT and db-1 behind a 1:1 NAT (ops-1 stays public)")
	convergeTimeout := flag.Duration("converge-timeout", 60*time.Second, "how long to wait for every node to enforce the policy")
	matrixTimeout := flag.Duration("matrix-timeout", 20*time.Second, "how long mismatching cells are re-probed before they count")
	flag.Parse()
	matrixSet := false
	flag.Visit(func(f *flag.Flag) { matrixSet = matrixSet || f.Name == "matrix-timeout" })
	if *behindNAT && !matrixSet {
		// Relayed pairs need a few seconds after convergence: direct checks
		// for 5 s, then a relay session and WireGuard's handshake through it.
		*matrixTimeout = 45 * time.Second
	}
	if *binDir == "" || flag.NArg() != 0 {
		flag.Usage()
		return 2
	}
	d := &demo{out: os.Stdout, start: time.Now()}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mesh *lab.Mesh
	meshReady := make(chan struct{})
	// A closed stdout (`hack/demo.sh | head`) must not kill the driver before it
	// removes the lab: writes then fail with EPIPE instead.
	signal.Ignore(syscall.SIGPIPE)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		sig := <-sigs
		fmt.Fprintf(os.Stderr, "\nlab: %s: removing the lab\n", sig)
		cancel()
		select {
		case <-meshReady:
			if mesh != nil {
				if err := mesh.Close(); err != nil {
					fmt.Fprintf(os.Stderr, "lab: cleanup: %v\n", err)
				}
			}
		case <-time.After(30 * time.Second):
		}
		os.Exit(130)
	}()

	abs, err := filepath.Abs(*binDir)
	if err != nil {
		return d.fail(err)
	}
	pol, err := lab.LoadPolicy(*policyPath)
	if err != nil {
		return d.fail(err)
	}
	opts := lab.MeshOptions{
		Options:   lab.Options{Logger: logger, KeepDir: *keep},
		BinDir:    abs,
		Nodes:     lab.ExampleNodes(),
		AgentArgs: []string{"--metrics-listen", ":" + strconv.Itoa(lab.MetricsPort)},
	}
	if *verbose {
		opts.AgentArgs = append(opts.AgentArgs, "--log-level", "debug")
	}
	if *ha {
		opts.HA = 3
	}
	if *behindNAT {
		opts.NATs, opts.Nodes = lab.ExampleNATs()
		opts.ControllerArgs = append(opts.ControllerArgs, "--stun-listen", ":3478")
		opts.AgentArgs = append(opts.AgentArgs, "--relay-ports", "40000-40099")
		d.step("creating the lab: an underlay bridge, %s, %d NAT routers and %d node hosts", controllerHosts(opts.HA), len(opts.NATs), len(opts.Nodes))
	} else {
		d.step("creating the lab: an underlay bridge, %s and %d node hosts", controllerHosts(opts.HA), len(opts.Nodes))
	}
	mesh, err = lab.NewMesh(ctx, opts)
	close(meshReady)
	if err != nil {
		return d.fail(err)
	}
	defer func() {
		d.step("removing the lab (namespaces smlab-%s-*, processes, interfaces)", mesh.Lab.ID)
		if err := mesh.Close(); err != nil {
			fmt.Fprintf(os.Stderr, "lab: cleanup: %v\n", err)
		} else {
			fmt.Fprintln(d.out, "lab removed: no namespace, interface or process of it is left")
		}
		if *keep {
			fmt.Fprintf(d.out, "lab directory kept: %s\n", mesh.Lab.Dir)
		}
	}()
	code := d.run(ctx, mesh, pol, *policyPath, *convergeTimeout, *matrixTimeout)
	if ctx.Err() != nil {
		code = 130 // interrupted; the signal handler removes the lab too
	}
	// Process logs help with a failed run, not with an interrupted one or a closed stdout.
	if code != 0 && ctx.Err() == nil && !errors.Is(d.err, syscall.EPIPE) {
		mesh.Lab.DumpLogs(os.Stderr, 40)
	}
	return code
}

type demo struct {
	out   io.Writer
	start time.Time
	err   error // the error that ended the run
}

func (d *demo) step(format string, args ...any) {
	fmt.Fprintf(d.out, "\n==> [%5.1fs] %s\n", time.Since(d.start).Seconds(), fmt.Sprintf(format, args...))
}

func (d *demo) fail(err error) int {
	d.err = err
	fmt.Fprintf(os.Stderr, "lab: %v\n", err)
	return 1
}

func (d *demo) run(ctx context.Context, m *lab.Mesh, pol *lab.Policy, policyPath string, convergeTimeout, matrixTimeout time.Duration) int {
	fmt.Fprintf(d.out, "lab id %s, directory %s\n", m.Lab.ID, m.Lab.Dir)
	for _, nat := range m.Lab.NATs() {
		fmt.Fprintf(d.out, "  NAT %-8s %-15s netns %-24s public %-12s private %s\n",
			nat.Name, nat.Kind, nat.Namespace, nat.PublicAddr, nat.Prefix)
	}
	for _, n := range m.Nodes() {
		u := n.Host.Underlay()
		where := ""
		if u.NAT != nil {
			where = fmt.Sprintf(" behind %s (%s, seen as %s)", u.NAT.Name, u.NAT.Kind, u.Public)
		}
		fmt.Fprintf(d.out, "  %-8s netns %-24s underlay %-12s overlay interface %s labels %v%s\n",
			n.Name, n.Host.Namespace, u.Addr, n.Interface, n.Labels, where)
	}

	d.step("checking %s offline: segmesh policy check", policyPath)
	absPolicy, err := filepath.Abs(policyPath)
	if err != nil {
		return d.fail(err)
	}
	out, err := m.CLI(ctx, "policy", "check", absPolicy)
	fmt.Fprint(d.out, out)
	if err != nil {
		return d.fail(err)
	}

	if m.HA() > 0 {
		d.step("starting a %d-member etcd cluster and %d segmesh-controller replicas (--store etcd)", m.HA(), m.HA())
		for _, r := range m.Controllers {
			fmt.Fprintf(d.out, "  %-12s netns %-24s etcd %-8s %s  controller %s\n", r.Host.Name, r.Host.Namespace, r.EtcdName, r.EtcdClientURL, r.URL)
		}
	} else {
		d.step("starting segmesh-controller on %s (%s)", m.Controller.Namespace, m.URL)
	}
	if err := m.StartController(ctx); err != nil {
		return d.fail(err)
	}
	d.step("creating one single-use join token per host and starting the agents")
	for _, n := range m.Nodes() {
		tok, err := m.CreateToken(ctx, n.Labels, false)
		if err != nil {
			return d.fail(err)
		}
		if err := m.StartAgent(n, tok); err != nil {
			return d.fail(err)
		}
		fmt.Fprintf(d.out, "  %-8s token %s...  agent pid %d\n", n.Name, tok[:min(len(tok), 14)], n.Agent.PID())
	}
	d.step("applying %s: segmesh policy apply", policyPath)
	rev, err := m.ApplyPolicy(ctx, absPolicy)
	if err != nil {
		return d.fail(err)
	}
	fmt.Fprintf(d.out, "policy revision %d\n", rev)

	d.step("waiting until every node is online and enforces revision %d", rev)
	st, err := m.WaitConverged(ctx, rev, convergeTimeout)
	if err != nil {
		return d.fail(err)
	}
	d.step("segmesh status")
	out, err = m.CLI(ctx, "status")
	fmt.Fprint(d.out, out)
	if err != nil {
		return d.fail(err)
	}

	d.step("connectivity matrix: real TCP, UDP and ICMP probes over the overlay vs the policy")
	cells, rounds, err := m.WaitMatrix(ctx, pol, st, matrixTimeout, lab.MatrixOptions{})
	if cells != nil && ctx.Err() == nil {
		if werr := lab.WriteMatrix(d.out, cells); werr != nil {
			return d.fail(werr)
		}
	}
	if err != nil && ctx.Err() != nil {
		return d.fail(fmt.Errorf("interrupted while probing: %w", err))
	}
	if err != nil {
		if bad := lab.Mismatches(cells); len(bad) > 0 {
			fmt.Fprintln(d.out, "\nMISMATCHES:")
			for _, c := range bad {
				fmt.Fprintf(d.out, "  %s -> %s %s (%s): policy %s, observed %s %s\n", c.Src, c.Dst, c.Check, c.Addr,
					verdict(c.Want), observed(c), c.Output)
			}
		}
		return d.fail(err)
	}
	note := ""
	if rounds > 1 {
		note = fmt.Sprintf(" (mismatching cells re-probed %d times while the overlay settled)", rounds-1)
	}
	fmt.Fprintf(d.out, "\nall %d cells match the policy%s\n", len(cells), note)
	if len(m.Lab.NATs()) > 0 {
		if err := d.paths(ctx, m, pathsNode); err != nil {
			return d.fail(err)
		}
	}
	if err := d.observe(ctx, m, showNode); err != nil {
		return d.fail(err)
	}
	if m.HA() > 0 {
		if err := d.failover(ctx, m, pol, matrixTimeout); err != nil {
			return d.fail(err)
		}
	}
	return 0
}

// controllerHosts describes the controller hosts of a mesh with ha replicas.
func controllerHosts(ha int) string {
	if ha > 1 {
		return fmt.Sprintf("%d controller hosts", ha)
	}
	return "a controller host"
}

// failoverReplica is the replica the HA demo kills.
const failoverReplica = 1

// failover is the HA part of the demo: which replica each agent streams from,
// kill -9 controller-1, the agents on it move to the others, the matrix still
// holds, controller-1 comes back.
func (d *demo) failover(ctx context.Context, m *lab.Mesh, pol *lab.Policy, matrixTimeout time.Duration) error {
	d.step("which controller replica each agent streams from")
	if err := d.streams(ctx, m, failoverReplica+1); err != nil {
		return err
	}
	victim := m.Replica(failoverReplica)
	d.step("kill -9 %s (pid %d): the agents on it move to the other replicas", victim.Host.Name, victim.Proc.PID())
	killed := time.Now()
	if err := m.KillController(failoverReplica); err != nil {
		return err
	}
	if _, err := m.WaitStreamsOff(ctx, failoverReplica, 30*time.Second); err != nil {
		return err
	}
	fmt.Fprintf(d.out, "every agent streams from another replica %.1fs after the kill\n", time.Since(killed).Seconds())
	if err := d.streams(ctx, m, failoverReplica+1); err != nil {
		return err
	}
	d.step("segmesh status (the CLI skips the dead %s)", victim.URL)
	out, err := m.CLI(ctx, "status")
	fmt.Fprint(d.out, out)
	if err != nil {
		return err
	}
	st, err := m.WaitConverged(ctx, 0, 30*time.Second)
	if err != nil {
		return err
	}
	d.step("connectivity matrix with %s dead (the same probes; mismatches only)", victim.Host.Name)
	cells, rounds, err := m.WaitMatrix(ctx, pol, st, matrixTimeout, lab.MatrixOptions{})
	for _, c := range lab.Mismatches(cells) {
		fmt.Fprintf(d.out, "  MISMATCH %s -> %s %s (%s): policy %s, observed %s %s\n", c.Src, c.Dst, c.Check, c.Addr, verdict(c.Want), observed(c), c.Output)
	}
	if err != nil {
		return fmt.Errorf("matrix with %s dead: %w", victim.Host.Name, err)
	}
	fmt.Fprintf(d.out, "all %d cells still match the policy (%d probing round(s))\n", len(cells), rounds)
	d.step("restarting %s: segmesh status on it", victim.Host.Name)
	if err := m.RestartController(ctx, failoverReplica); err != nil {
		return err
	}
	out, err = m.ReplicaCLI(ctx, failoverReplica, "status")
	fmt.Fprint(d.out, out)
	if err != nil {
		return err
	}
	d.step("which controller replica each agent streams from now")
	return d.streams(ctx, m, failoverReplica)
}

// streams prints, for every node, the replica its agent holds its controller
// connection to (the kernel's view in the node's namespace) and the replica the
// controllers record for it (NodeStatus.controller, asked of replica ask).
func (d *demo) streams(ctx context.Context, m *lab.Mesh, ask int) error {
	kernel, err := m.Streams(ctx)
	if err != nil {
		return err
	}
	view, verr := m.ControllerView(ctx, ask)
	if verr != nil {
		fmt.Fprintf(d.out, "  (controller view unavailable: %v)\n", verr)
	}
	for _, n := range m.Nodes() {
		r := m.Replica(kernel[n.Name])
		said := view[n.Name]
		if said == "" {
			said = "-"
		}
		fmt.Fprintf(d.out, "  %-8s streams from %-12s (connection to %s; controllers record %s)\n", n.Name, r.Host.Name, r.Name(), said)
	}
	return nil
}

// showNode is the node whose status in depth, denied flows and agent metrics the
// demo prints after the matrix: the matrix's denied probes reach it from every
// other node.
const showNode = "db-1"

// pathsNode is the node whose peers' paths the NAT demo prints: behind the
// symmetric NAT, it reaches the front ends through the relay.
const pathsNode = "api-1"

// paths waits until node reports a path and a handshake for every peer
// (agents report every 10 s), then prints `segmesh nodes show NODE`, whose PATH column says direct
// or relay via R per peer.
func (d *demo) paths(ctx context.Context, m *lab.Mesh, node string) error {
	d.step("paths through the NATs: segmesh nodes show %s (PATH: direct, or relay via ops-1)", node)
	err := lab.WaitFor(ctx, 40*time.Second, func(ctx context.Context) (bool, error) {
		out, err := m.CLI(ctx, "nodes", "show", node, "-o", "json")
		if err != nil {
			return false, err
		}
		var got struct {
			Peers []struct {
				Path          string `json:"path"`
				LastHandshake string `json:"last_handshake_at"`
			} `json:"peers"`
		}
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			return false, fmt.Errorf("segmesh nodes show -o json: %w", err)
		}
		for _, p := range got.Peers {
			if p.Path == "" || p.LastHandshake == "" {
				return false, nil
			}
		}
		return len(got.Peers) > 0, nil
	})
	if err != nil {
		return fmt.Errorf("waiting for %s to report the path of every peer: %w", node, err)
	}
	out, err := m.CLI(ctx, "nodes", "show", node)
	fmt.Fprint(d.out, out)
	return err
}

// observe prints what an operator sees after the matrix: `segmesh nodes show`, the
// denied flows the agents reported (each agent reads its kernel's denied-flow sets
// every 10 s, so it waits up to 30 s for the first), and one agent's metrics.
func (d *demo) observe(ctx context.Context, m *lab.Mesh, node string) error {
	d.step("segmesh nodes show %s", node)
	out, err := m.CLI(ctx, "nodes", "show", node)
	fmt.Fprint(d.out, out)
	if err != nil {
		return err
	}

	d.step("segmesh flows --denied --node %s: the matrix's denied probes, with the closest rule", node)
	err = lab.WaitFor(ctx, 30*time.Second, func(ctx context.Context) (bool, error) {
		out, err := m.CLI(ctx, "flows", "--denied", "--node", node, "-o", "json")
		if err != nil {
			return false, err
		}
		var got struct{ Flows []json.RawMessage }
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			return false, fmt.Errorf("segmesh flows -o json: %w", err)
		}
		return len(got.Flows) > 0, nil
	})
	if err != nil {
		return fmt.Errorf("waiting for %s to report denied flows: %w", node, err)
	}
	out, err = m.CLI(ctx, "flows", "--denied", "--node", node, "--limit", "12")
	fmt.Fprint(d.out, out)
	if err != nil {
		return err
	}

	n := m.Node(node)
	d.step("metrics of %s's agent (http://%s:%d/metrics; histogram buckets left out)", node, n.Host.Addr, lab.MetricsPort)
	text, err := n.Host.Scrape(ctx, netip.AddrPortFrom(n.Host.Addr, lab.MetricsPort))
	if err != nil {
		return err
	}
	for line := range strings.Lines(text) {
		if strings.HasPrefix(line, "segmesh_agent_") && !strings.Contains(line, "_bucket{") {
			fmt.Fprint(d.out, line)
		}
	}
	return nil
}

func verdict(allowed bool) string {
	if allowed {
		return "allow"
	}
	return "deny"
}

func observed(c lab.Cell) string {
	switch {
	case c.Err != nil:
		return "error: " + c.Err.Error()
	case c.Got:
		return "reached"
	}
	return "blocked"
}
