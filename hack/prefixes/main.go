// Command prefixes times a policy with a large external segment end to end (issue 7):
// from `segmesh policy apply` until the nodes enforce it, for a policy that grows to
// -prefixes external prefixes and for the next, narrower one, and how long the
// access the narrower revision removes stays open.
//
// Usage (as root, from the repository root; `make bench-build` builds the binaries):
//
//	go run ./hack/prefixes [-bin bin] [-prefixes 200000] [-small 100] [-profile DIR] [-goal 2s] [-json FILE]
//
// A controller and two agents a and b run in network namespaces (package
// segmesh/test/lab). Step "grow" applies a policy whose external segment holds
// -prefixes IPv4 /32s that may reach b on tcp/9000 (benchlab.PartnersPolicy), step
// "shrink" one that keeps only the first -small of them. For each step it prints:
// how long the CLI's apply took (the controller parsed, tested and stored the
// revision), when b's kernel set first held (grow) or no longer held (shrink) the
// last prefix, probed every 250 ms (lab.PollInterval) with one netlink request for that
// element (lab.HasElement; `nft get element` lists the whole set first, 9 s for
// 200,000 prefixes), and when `segmesh
// status` showed every node on the new revision. With -profile the agents serve
// pprof (--debug-listen) and the driver saves a CPU profile of b's agent over each
// step (b-grow.cpu, b-shrink.cpu) plus the agents' logs. With -json the figures
// (scenarios grow and shrink; apply (CLI), kernel set changed, every node on the
// revision, in seconds) are also written as JSON (package hack/internal/benchfig). Exit status 1 when a step
// takes longer than -goal until the kernel changed, or fails; 2 on a usage error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"segmesh/hack/internal/benchfig"
	"segmesh/hack/internal/benchlab"
	"segmesh/test/lab"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == benchlab.HasElementCommand {
		os.Exit(benchlab.RunHasElement(os.Args[2:]))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

type options struct {
	bin      string
	prefixes int
	small    int
	profile  string
	goal     time.Duration
	timeout  time.Duration
	verbose  bool
	keep     bool
	jsonPath string
	rec      *benchfig.Recorder
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("prefixes", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.bin, "bin", "bin", "directory with segmesh-controller, segmesh-agent, segmesh and probe")
	fs.IntVar(&o.prefixes, "prefixes", 200000, "external prefixes of the large policy")
	fs.IntVar(&o.small, "small", 100, "external prefixes of the narrower policy")
	fs.StringVar(&o.profile, "profile", "", "directory for CPU profiles of agent b and the agents' logs")
	fs.DurationVar(&o.goal, "goal", 2*time.Second, "target: from apply until the kernel set changed")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Minute, "give up on a step after this long")
	fs.BoolVar(&o.verbose, "v", false, "log lab operations")
	fs.BoolVar(&o.keep, "keep", false, "keep the lab directory (logs)")
	fs.StringVar(&o.jsonPath, "json", "", "also write the figures to this file as JSON")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() != 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.small < 1 || o.prefixes <= o.small || o.prefixes > 1<<22 {
		return o, errors.New("want 1 <= -small < -prefixes <= 4194304")
	}
	o.rec = benchfig.NewRecorder("prefixes", args, fmt.Sprintf("%s; external segment %d -> %d -> %d prefixes, apply with the CLI", benchfig.LabConditions(), o.small, o.prefixes, o.small))
	return o, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var o options
	return benchlab.Main("prefixes", stderr, func() (bool, error) {
		var err error
		o, err = parseFlags(args, stderr)
		return o.verbose, err
	}, func(logger *slog.Logger) error {
		return errors.Join(measure(ctx, o, logger, stdout), o.rec.WriteFile(o.jsonPath))
	})
}

const debugAddr = "127.0.0.1:6060"

func measure(ctx context.Context, o options, logger *slog.Logger, out io.Writer) error {
	var agentArgs []string
	if o.profile != "" {
		if err := os.MkdirAll(o.profile, 0o755); err != nil {
			return err
		}
		agentArgs = []string{"--debug-listen", debugAddr}
	}
	m, err := benchlab.Start(ctx, benchlab.Options{
		BinDir: o.bin, Policy: benchlab.PartnersPolicy(o.small), AgentArgs: agentArgs, Logger: logger, Keep: o.keep,
		Nodes: []lab.NodeSpec{{Name: "a", Labels: map[string]string{"role": "a"}}, {Name: "b", Labels: map[string]string{"role": "b"}}},
	})
	if err != nil {
		return err
	}
	defer m.Close()
	if o.profile != "" {
		defer func() {
			for _, n := range m.Nodes() {
				_ = os.WriteFile(filepath.Join(o.profile, n.Name+"-agent.log"), []byte(n.Agent.Log()), 0o644)
			}
			_ = os.WriteFile(filepath.Join(o.profile, "controller.log"), []byte(m.ControllerProc.Log()), 0o644)
		}()
	}
	b := m.Node("b")
	last := benchlab.PartnerPrefix(o.prefixes - 1).Addr()
	fmt.Fprintf(out, "\npolicy with a large external segment: %d -> %d -> %d prefixes; probe %s in b's set\n", o.small, o.prefixes, o.small, last)
	var slow []string
	for _, st := range []struct {
		name string
		n    int
		want bool // whether b's set must hold last afterwards
	}{{"grow", o.prefixes, true}, {"shrink", o.small, false}} {
		r, err := step(ctx, o, m, b, st.name, st.n, last, st.want)
		if err != nil {
			return fmt.Errorf("%s: %w", st.name, err)
		}
		verb := "held"
		if !st.want {
			verb = "no longer held (access removed)"
		}
		fmt.Fprintf(out, "  %-6s apply (CLI) %6.2f s; b's set %s the prefix after %6.2f s; every node on the revision after %6.2f s\n",
			st.name, r.cli.Seconds(), verb, r.kernel.Seconds(), r.converged.Seconds())
		o.rec.Add(st.name, "apply (CLI)", r.cli.Seconds(), "s")
		o.rec.Add(st.name, "kernel set changed", r.kernel.Seconds(), "s")
		o.rec.Add(st.name, "every node on the revision", r.converged.Seconds(), "s")
		if r.kernel > o.goal {
			slow = append(slow, fmt.Sprintf("%s %.1f s", st.name, r.kernel.Seconds()))
		}
	}
	fmt.Fprintf(out, "  target: the kernel changed <= %s after apply: %s\n", o.goal, map[bool]string{true: "met", false: "MISSED (" + strings.Join(slow, ", ") + ")"}[len(slow) == 0])
	if len(slow) > 0 {
		return fmt.Errorf("slower than %s: %s", o.goal, strings.Join(slow, ", "))
	}
	return nil
}

type stepResult struct{ cli, kernel, converged time.Duration }

// step applies the policy with n prefixes and times it (see the command doc).
func step(ctx context.Context, o options, m *lab.Mesh, b *lab.Node, name string, n int, probe netip.Addr, want bool) (stepResult, error) {
	var r stepResult
	self, err := os.Executable()
	if err != nil {
		return r, err
	}
	path := filepath.Join(m.Lab.Dir, name+".yaml")
	if err := os.WriteFile(path, []byte(benchlab.PartnersPolicy(n)), 0o644); err != nil {
		return r, err
	}
	profDone := make(chan struct{})
	if o.profile != "" {
		file, _ := filepath.Abs(filepath.Join(o.profile, "b-"+name+".cpu"))
		go func() {
			defer close(profDone)
			pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			defer cancel()
			if _, err := b.Host.Exec(pctx, "curl", "-sSf", "-o", file, "http://"+debugAddr+"/debug/pprof/profile?seconds=60"); err != nil {
				fmt.Fprintf(os.Stderr, "prefixes: CPU profile of b: %v\n", err)
			}
		}()
		time.Sleep(200 * time.Millisecond) // let the profile start before the apply
	} else {
		close(profDone)
	}
	start := time.Now()
	cliCtx, cancel := context.WithTimeout(ctx, o.timeout)
	out, err := m.Controller.Exec(cliCtx, m.Bin(lab.CLIBin), "--controller", m.URL, "--credentials", m.Credentials, "policy", "apply", path)
	cancel()
	if err != nil {
		return r, fmt.Errorf("policy apply: %w", err)
	}
	r.cli = time.Since(start)
	var rev uint64
	if f := strings.FieldsFunc(out, func(c rune) bool { return c < '0' || c > '9' }); len(f) > 0 {
		fmt.Sscan(f[len(f)-1], &rev)
	}
	err = lab.WaitFor(ctx, o.timeout, func(ctx context.Context) (bool, error) {
		holds, err := setHolds(ctx, b, self, "partners_v4", probe)
		if err != nil {
			return false, err
		}
		return holds == want, nil
	})
	if err != nil {
		return r, fmt.Errorf("waiting for b's set: %w", err)
	}
	r.kernel = time.Since(start)
	if _, err := m.WaitConverged(ctx, rev, o.timeout); err != nil {
		return r, err
	}
	r.converged = time.Since(start)
	<-profDone
	return r, nil
}

// setHolds reports whether b's set holds addr, running `self has-element` in b's
// namespace; a missing set holds nothing.
func setHolds(ctx context.Context, b *lab.Node, self, set string, addr netip.Addr) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, err := b.Host.Exec(ctx, self, benchlab.HasElementCommand, "segmesh", set, addr.String())
	if err == nil {
		return true, nil
	}
	var xe *lab.ExecError
	if errors.As(err, &xe) && xe.ExitCode == 1 {
		return false, nil
	}
	return false, err
}
