// Command agentmem measures the resident memory of segmesh agents (issue 7): under
// TCP load at line rate through the overlay, after it, and idle with many peers.
//
// Usage (as root, from the repository root, binaries built with `make build` plus
// hack/probe; `make bench` does both):
//
//	go run ./hack/agentmem [-bin bin] [-scenarios load,idle] [-load 60s] [-after 90s]
//	    [-idle-peers 100] [-idle 2m] [-sample 1s] [-agent-arg ARG]... [-keep] [-json FILE]
//
// Scenario "load": a controller and two agents (a, b) in network namespaces
// (package segmesh/test/lab); the policy allows a -> b on tcp/5201. iperf3 sends
// from a to b's overlay address for -load (one TCP stream, as fast as it goes),
// then the agents idle for -after. VmRSS (and RssAnon) of both agents is read from
// /proc/PID/status every -sample: before the load, its peak during the load
// (VmHWM after a reset, so a spike between samples counts), at the end of the
// load, and at the end of -after. Targets: <= 64 MB during and after.
//
// Scenario "idle": two real agents plus -idle-peers - 1 fake nodes enrolled with the
// controller (fresh WireGuard keys, endpoints where nothing listens), all in one
// segment that may reach itself on tcp/22, so each agent holds -idle-peers
// WireGuard peers with a 25 s keepalive and as many gossip members. Running 100
// real agents on two cores would measure the machine, not the agent. RSS is
// sampled for -idle; the table gives it at the start, the peak and at the end.
// Target: <= 40 MB.
//
// Memory is in MB (10^6 bytes). With -json the figures are also written as JSON
// (package hack/internal/benchfig): scenario load, "peak RSS during" and "RSS
// after" of each agent and of the highest ("highest agent"); scenario idle, "peak
// RSS" and "RSS at end" likewise; in bytes. Exit status 1 when a figure misses its target or a
// scenario fails, 2 on a usage error.
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
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"segmesh/hack/internal/benchfig"
	"segmesh/hack/internal/benchlab"
	"segmesh/hack/internal/procmem"
	"segmesh/test/lab"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if len(os.Args) > 1 && os.Args[1] == benchlab.FakeEnrollCommand {
		if err := benchlab.RunFakeEnroll(ctx, os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "agentmem:", err)
			os.Exit(1)
		}
		return
	}
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

type options struct {
	bin       string
	scenarios map[string]bool
	load      time.Duration
	after     time.Duration
	idle      time.Duration
	idlePeers int
	sample    time.Duration
	agentArgs []string
	keep      bool
	verbose   bool
	profile   string
	goalLoad  int64
	goalIdle  int64
	jsonPath  string
	rec       *benchfig.Recorder
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, " ") }
func (m *multiFlag) Set(s string) error { *m = append(*m, s); return nil }

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	var scen string
	var agentArgs multiFlag
	var goalLoad, goalIdle float64
	fs := flag.NewFlagSet("agentmem", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.bin, "bin", "bin", "directory with segmesh-controller, segmesh-agent, segmesh and probe")
	fs.StringVar(&scen, "scenarios", "load,idle", "comma-separated scenarios: load, idle")
	fs.DurationVar(&o.load, "load", 60*time.Second, "how long iperf3 sends")
	fs.DurationVar(&o.after, "after", 90*time.Second, "how long to watch the agents after the load")
	fs.DurationVar(&o.idle, "idle", 2*time.Minute, "how long to watch the idle agents")
	fs.IntVar(&o.idlePeers, "idle-peers", 100, "WireGuard peers of each idle agent (the other real agent + fake nodes), 1..150")
	fs.DurationVar(&o.sample, "sample", time.Second, "RSS sampling interval")
	fs.Var(&agentArgs, "agent-arg", "extra agent argument (repeatable), e.g. -agent-arg=--memory-limit=off")
	fs.BoolVar(&o.keep, "keep", false, "keep the lab directory (agent logs)")
	fs.StringVar(&o.profile, "profile", "", "write heap profiles and runtime metrics of the agents (served with --debug-listen) into this directory at the end of the load and after it")
	fs.BoolVar(&o.verbose, "v", false, "log lab operations")
	fs.Float64Var(&goalLoad, "goal-load", 64, "target RSS in MB during and after the load")
	fs.Float64Var(&goalIdle, "goal-idle", 40, "target idle RSS in MB")
	fs.StringVar(&o.jsonPath, "json", "", "also write the figures to this file as JSON")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() != 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	o.scenarios = map[string]bool{}
	for _, s := range strings.Split(scen, ",") {
		if s != "load" && s != "idle" {
			return o, fmt.Errorf("-scenarios: unknown scenario %q (want load, idle)", s)
		}
		o.scenarios[s] = true
	}
	if o.idlePeers < 1 || o.idlePeers > 150 {
		return o, fmt.Errorf("-idle-peers %d: want 1..150", o.idlePeers)
	}
	if o.sample <= 0 || o.load <= 0 {
		return o, errors.New("-sample and -load must be positive")
	}
	o.agentArgs = agentArgs
	if o.profile != "" {
		o.agentArgs = append(o.agentArgs, "--debug-listen", debugAddr)
	}
	o.goalLoad, o.goalIdle = int64(goalLoad*1e6), int64(goalIdle*1e6)
	o.rec = benchfig.NewRecorder("agentmem", args, fmt.Sprintf("%s; load: one iperf3 stream a -> b for %s, then %s idle; idle: %d WireGuard peers each (1 real), %s; agent args %q",
		benchfig.LabConditions(), o.load, o.after, o.idlePeers, o.idle, o.agentArgs))
	return o, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var o options
	return benchlab.Main("agentmem", stderr, func() (bool, error) {
		var err error
		if o, err = parseFlags(args, stderr); err != nil {
			return false, err
		}
		if _, err := os.Stat(filepath.Join(o.bin, lab.AgentBin)); err != nil {
			return false, fmt.Errorf("%w (build with `make build` and `go build -o bin/ ./hack/probe`)", err)
		}
		return o.verbose, nil
	}, func(logger *slog.Logger) error {
		var errs []error
		if o.scenarios["load"] {
			if err := loadScenario(ctx, o, logger, stdout); err != nil {
				errs = append(errs, fmt.Errorf("load: %w", err))
			}
		}
		if o.scenarios["idle"] {
			if err := idleScenario(ctx, o, logger, stdout); err != nil {
				errs = append(errs, fmt.Errorf("idle: %w", err))
			}
		}
		return errors.Join(append(errs, o.rec.WriteFile(o.jsonPath))...)
	})
}

const loadPolicy = `version: 1
segments:
  - name: a
    selectors: [{role: a}]
  - name: b
    selectors: [{role: b}]
rules:
  - name: iperf
    from: [a]
    to: [b]
    ports: [tcp/5201]
`

// loadScenario runs iperf3 a -> b through the overlay and prints the agents' memory.
func loadScenario(ctx context.Context, o options, logger *slog.Logger, out io.Writer) error {
	m, err := benchlab.Start(ctx, benchlab.Options{
		BinDir: o.bin, Policy: loadPolicy, AgentArgs: o.agentArgs, Logger: logger, Keep: o.keep,
		Nodes: []lab.NodeSpec{{Name: "a", Labels: map[string]string{"role": "a"}}, {Name: "b", Labels: map[string]string{"role": "b"}}},
	})
	if err != nil {
		return err
	}
	defer m.Close()
	a, b := m.Node("a"), m.Node("b")
	dst, err := benchlab.OverlayAddr(ctx, m, "b")
	if err != nil {
		return err
	}
	srv, err := benchlab.StartIperfServer(ctx, b.Host, dst.String())
	if err != nil {
		return err
	}
	defer srv.Stop(2 * time.Second)

	agents := []agentProc{{"a (sender)", a.Agent.PID()}, {"b (receiver)", b.Agent.PID()}}
	rows := make([]memRow, len(agents))
	for i, ag := range agents {
		mem, err := procmem.Read(ag.pid)
		if err != nil {
			return err
		}
		rows[i] = memRow{name: ag.name, before: mem}
		if err := procmem.ResetHWM(ag.pid); err != nil {
			return err
		}
	}
	stopSample := sampleAll(agents, o.sample)
	res, err := benchlab.RunIperf(ctx, a.Host, dst.String(), o.load)
	peaks := stopSample()
	if err != nil {
		return err
	}
	for i, ag := range agents {
		mem, err := procmem.Read(ag.pid)
		if err != nil {
			return err
		}
		rows[i].peak = max(peaks[i], mem.HWM)
		rows[i].end = mem
	}
	snapshot(ctx, o, m, "load-end")
	select {
	case <-time.After(o.after):
	case <-ctx.Done():
		return ctx.Err()
	}
	snapshot(ctx, o, m, "after")
	var missed []string
	for i, ag := range agents {
		mem, err := procmem.Read(ag.pid)
		if err != nil {
			return err
		}
		rows[i].after = mem
		if rows[i].peak > o.goalLoad || mem.RSS > o.goalLoad {
			missed = append(missed, ag.name)
		}
	}
	var highPeak, highAfter int64
	for _, r := range rows {
		o.rec.Add("load", r.name+" peak RSS during", float64(r.peak), "B")
		o.rec.Add("load", r.name+" RSS after", float64(r.after.RSS), "B")
		highPeak, highAfter = max(highPeak, r.peak), max(highAfter, r.after.RSS)
	}
	o.rec.Add("load", "highest agent peak RSS during", float64(highPeak), "B")
	o.rec.Add("load", "highest agent RSS after", float64(highAfter), "B")
	o.rec.Add("load", "received", res.ReceivedBPS/1e6, "Mbit/s")
	fmt.Fprintf(out, "\nagent memory under load: iperf3 a -> b over the overlay for %s, %.0f Mbit/s received (%d retransmits); agent args %q\n",
		o.load, res.ReceivedBPS/1e6, res.Retransmits, o.agentArgs)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "agent\tRSS before\tpeak RSS during\tRSS at end\tanon at end\tRSS "+o.after.String()+" after\tanon after\t")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", r.name, procmem.MB(r.before.RSS), procmem.MB(r.peak),
			procmem.MB(r.end.RSS), procmem.MB(r.end.RSSAnon), procmem.MB(r.after.RSS), procmem.MB(r.after.RSSAnon))
	}
	tw.Flush()
	fmt.Fprintf(out, "target: <= %s during and after: %s\n", procmem.MB(o.goalLoad), verdict(missed))
	if len(missed) > 0 {
		return fmt.Errorf("RSS above %s: %s", procmem.MB(o.goalLoad), strings.Join(missed, ", "))
	}
	return nil
}

func verdict(missed []string) string {
	if len(missed) == 0 {
		return "met"
	}
	return "MISSED by " + strings.Join(missed, ", ")
}

const idlePolicy = `version: 1
segments:
  - name: mesh
    selectors: [{role: mesh}]
rules:
  - name: ssh
    from: [mesh]
    to: [mesh]
    ports: [tcp/22]
`

// idleScenario watches two agents with o.idlePeers WireGuard peers each.
func idleScenario(ctx context.Context, o options, logger *slog.Logger, out io.Writer) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	labels := map[string]string{"role": "mesh"}
	m, err := benchlab.Start(ctx, benchlab.Options{
		BinDir: o.bin, Policy: idlePolicy, AgentArgs: o.agentArgs, Logger: logger, Keep: o.keep,
		Nodes: []lab.NodeSpec{{Name: "a", Labels: labels}, {Name: "b", Labels: labels}},
	})
	if err != nil {
		return err
	}
	defer m.Close()
	if err := benchlab.EnrollFakeNodes(ctx, m, self, o.idlePeers-1, labels); err != nil {
		return err
	}
	want := o.idlePeers
	for _, n := range m.Nodes() {
		err := lab.WaitFor(ctx, 60*time.Second, func(ctx context.Context) (bool, error) {
			peers, err := m.WireGuardPeers(ctx, n)
			if err != nil {
				return false, err
			}
			if len(peers) != want {
				return false, fmt.Errorf("%s has %d WireGuard peers, want %d", n.Name, len(peers), want)
			}
			return true, nil
		})
		if err != nil {
			return err
		}
	}
	agents := []agentProc{{"a", m.Node("a").Agent.PID()}, {"b", m.Node("b").Agent.PID()}}
	rows := make([]memRow, len(agents))
	for i, ag := range agents {
		mem, err := procmem.Read(ag.pid)
		if err != nil {
			return err
		}
		rows[i] = memRow{name: ag.name, before: mem}
		if err := procmem.ResetHWM(ag.pid); err != nil {
			return err
		}
	}
	stopSample := sampleAll(agents, o.sample)
	select {
	case <-time.After(o.idle):
	case <-ctx.Done():
	}
	peaks := stopSample()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	snapshot(ctx, o, m, "idle-end")
	var missed []string
	for i, ag := range agents {
		mem, err := procmem.Read(ag.pid)
		if err != nil {
			return err
		}
		rows[i].peak, rows[i].end = max(peaks[i], mem.HWM), mem
		if rows[i].peak > o.goalIdle {
			missed = append(missed, ag.name)
		}
	}
	var highPeak, highEnd int64
	for _, r := range rows {
		o.rec.Add("idle", r.name+" peak RSS", float64(r.peak), "B")
		o.rec.Add("idle", r.name+" RSS at end", float64(r.end.RSS), "B")
		highPeak, highEnd = max(highPeak, r.peak), max(highEnd, r.end.RSS)
	}
	o.rec.Add("idle", "highest agent peak RSS", float64(highPeak), "B")
	o.rec.Add("idle", "highest agent RSS at end", float64(highEnd), "B")
	fmt.Fprintf(out, "\nidle agent memory: %d WireGuard peers each (1 real, %d fake), watched for %s; agent args %q\n",
		want, want-1, o.idle, o.agentArgs)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "agent\tRSS at start\tpeak RSS\tRSS at end\tanon at end\t")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t\n", r.name, procmem.MB(r.before.RSS), procmem.MB(r.peak), procmem.MB(r.end.RSS), procmem.MB(r.end.RSSAnon))
	}
	tw.Flush()
	fmt.Fprintf(out, "target: <= %s: %s\n", procmem.MB(o.goalIdle), verdict(missed))
	if len(missed) > 0 {
		return fmt.Errorf("idle RSS above %s: %s", procmem.MB(o.goalIdle), strings.Join(missed, ", "))
	}
	return nil
}

type agentProc struct {
	name string
	pid  int
}

type memRow struct {
	name               string
	before, end, after procmem.Mem
	peak               int64
}

// sampleAll reads VmRSS of every agent each interval until the returned function
// is called; that returns the largest sample per agent.
func sampleAll(agents []agentProc, every time.Duration) func() []int64 {
	peaks := make([]int64, len(agents))
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			for i, ag := range agents {
				if mem, err := procmem.Read(ag.pid); err == nil {
					peaks[i] = max(peaks[i], mem.RSS)
				}
			}
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() []int64 {
		close(done)
		<-stopped
		return peaks
	}
}

// debugAddr is where agents serve profiles with -profile (each in its own namespace).
const debugAddr = "127.0.0.1:6060"

// snapshot saves every agent's heap profile and runtime metrics into o.profile as
// NODE-STAGE.heap and NODE-STAGE.runtime, when -profile is set. Failures are
// reported and do not stop the run.
func snapshot(ctx context.Context, o options, m *lab.Mesh, stage string) {
	if o.profile == "" {
		return
	}
	if err := os.MkdirAll(o.profile, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "agentmem: profile:", err)
		return
	}
	for _, n := range m.Nodes() {
		for path, ext := range map[string]string{"/debug/pprof/heap": "heap", "/debug/runtime": "runtime"} {
			file, err := filepath.Abs(filepath.Join(o.profile, n.Name+"-"+stage+"."+ext))
			if err == nil {
				_, err = n.Host.Exec(ctx, "curl", "-sSf", "-o", file, "http://"+debugAddr+path)
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "agentmem: profile of %s: %v\n", n.Name, err)
			}
		}
	}
}
