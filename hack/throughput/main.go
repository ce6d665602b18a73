// Command throughput compares TCP throughput over the segmesh overlay with bare
// wireguard-go between the same two network namespaces (issue 7).
//
// Usage (as root, from the repository root; `make bench` builds everything):
//
//	go build -o bin/ ./cmd/... ./hack/probe && go build -o bin/wireguard-go golang.zx2c4.com/wireguard
//	go run ./hack/throughput [-bin bin] [-runs 3] [-time 10s] [-elements 10000] [-goal 0.95] [-json FILE]
//
// It starts a controller and two agents a and b (package segmesh/test/lab) with a
// policy that allows a -> b on tcp/5201, and, in the same two namespaces, a second,
// bare tunnel: the wireguard-go binary of the module's own version on interfaces
// configured with wg(8), no nftables, 10.99.0.1 <-> 10.99.0.2. Then it runs one
// iperf3 TCP stream a -> b for -time, alternately over the overlay (A) and over the
// bare tunnel (B), -runs times each (A B A B ...), and prints each run, the mean of
// each side and the ratio A/B. With -elements > 0 it repeats the comparison after
// applying a policy whose external segment holds that many prefixes (one rule
// towards b, so b's table holds them in a set; see benchlab.PartnersPolicy). Exit status 1 when a ratio is below
// -goal or a run fails, 2 on a usage error. Figures from a shared machine vary by
// 10-20 % between runs; interleaving spreads that over both sides. With -json the
// figures (scenarios "no prefixes" and "with prefixes"; overlay and bare mean in
// Mbit/s, ratio) are also written as JSON (package hack/internal/benchfig).
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

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/hack/internal/benchfig"
	"segmesh/hack/internal/benchlab"
	"segmesh/test/lab"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

type options struct {
	bin      string
	runs     int
	dur      time.Duration
	elements int
	goal     float64
	verbose  bool
	keep     bool
	jsonPath string
	rec      *benchfig.Recorder
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("throughput", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.bin, "bin", "bin", "directory with segmesh-controller, segmesh-agent, segmesh, probe and wireguard-go")
	fs.IntVar(&o.runs, "runs", 3, "iperf3 runs per side and configuration")
	fs.DurationVar(&o.dur, "time", 10*time.Second, "length of one iperf3 run (whole seconds)")
	fs.IntVar(&o.elements, "elements", 10000, "external prefixes in the second configuration's policy (0: skip it)")
	fs.Float64Var(&o.goal, "goal", 0.95, "lowest acceptable overlay/bare ratio")
	fs.BoolVar(&o.verbose, "v", false, "log lab operations")
	fs.BoolVar(&o.keep, "keep", false, "keep the lab directory (logs)")
	fs.StringVar(&o.jsonPath, "json", "", "also write the figures to this file as JSON")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() != 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.runs < 1 || o.dur < time.Second || o.elements < 0 || o.elements > 60000 {
		return o, errors.New("want -runs >= 1, -time >= 1s, 0 <= -elements <= 60000")
	}
	o.rec = benchfig.NewRecorder("throughput", args, fmt.Sprintf("%s; one iperf3 TCP stream a -> b, %d interleaved runs of %s per tunnel; \"with prefixes\": b's table holds %d external prefixes", benchfig.LabConditions(), o.runs, o.dur, o.elements))
	return o, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var o options
	return benchlab.Main("throughput", stderr, func() (bool, error) {
		var err error
		if o, err = parseFlags(args, stderr); err != nil {
			return false, err
		}
		for _, b := range []string{lab.AgentBin, "wireguard-go"} {
			if _, err := os.Stat(filepath.Join(o.bin, b)); err != nil {
				return false, fmt.Errorf("%w (build with `make bench-build`)", err)
			}
		}
		return o.verbose, nil
	}, func(logger *slog.Logger) error {
		return errors.Join(measure(ctx, o, logger, stdout), o.rec.WriteFile(o.jsonPath))
	})
}

func measure(ctx context.Context, o options, logger *slog.Logger, out io.Writer) error {
	m, err := benchlab.Start(ctx, benchlab.Options{
		BinDir: o.bin, Policy: benchlab.PartnersPolicy(0), Logger: logger, Keep: o.keep,
		Nodes: []lab.NodeSpec{{Name: "a", Labels: map[string]string{"role": "a"}}, {Name: "b", Labels: map[string]string{"role": "b"}}},
	})
	if err != nil {
		return err
	}
	defer m.Close()
	a, b := m.Node("a"), m.Node("b")
	overlayB, err := benchlab.OverlayAddr(ctx, m, "b")
	if err != nil {
		return err
	}
	bareB, err := bareTunnel(ctx, m, filepath.Join(o.bin, "wireguard-go"))
	if err != nil {
		return fmt.Errorf("bare wireguard-go tunnel: %w", err)
	}
	var srvs []*lab.Process
	defer func() {
		for _, p := range srvs {
			_ = p.Stop(2 * time.Second)
		}
	}()
	for _, addr := range []netip.Addr{overlayB, bareB} {
		p, err := benchlab.StartIperfServer(ctx, b.Host, addr.String())
		if err != nil {
			return err
		}
		srvs = append(srvs, p)
	}
	configs := []int{0}
	if o.elements > 0 {
		configs = append(configs, o.elements)
	}
	var low []string
	for _, n := range configs {
		if n > 0 {
			if err := benchlab.ApplyPolicy(ctx, m, "policy-elements.yaml", benchlab.PartnersPolicy(n)); err != nil {
				return err
			}
		}
		fmt.Fprintf(out, "\nTCP a -> b, one iperf3 stream, %s per run; b's table holds %d external prefixes\n", o.dur, n)
		var sum [2]float64
		for i := range o.runs {
			for side, dst := range []netip.Addr{overlayB, bareB} {
				res, err := benchlab.RunIperf(ctx, a.Host, dst.String(), o.dur)
				if err != nil {
					return err
				}
				sum[side] += res.ReceivedBPS
				fmt.Fprintf(out, "  run %d %-18s %8.0f Mbit/s  (%d retransmits)\n", i+1, []string{"segmesh overlay", "bare wireguard-go"}[side], res.ReceivedBPS/1e6, res.Retransmits)
			}
		}
		ratio := sum[0] / sum[1]
		scenario := "no prefixes"
		if n > 0 {
			scenario = "with prefixes"
		}
		o.rec.Add(scenario, "overlay mean", sum[0]/float64(o.runs)/1e6, "Mbit/s")
		o.rec.Add(scenario, "bare wireguard-go mean", sum[1]/float64(o.runs)/1e6, "Mbit/s")
		o.rec.Add(scenario, "ratio", ratio, "ratio")
		fmt.Fprintf(out, "  mean: overlay %.0f Mbit/s, bare %.0f Mbit/s, ratio %.2f (target >= %.2f)\n",
			sum[0]/float64(o.runs)/1e6, sum[1]/float64(o.runs)/1e6, ratio, o.goal)
		if ratio < o.goal {
			low = append(low, fmt.Sprintf("%.2f with %d prefixes", ratio, n))
		}
	}
	if len(low) > 0 {
		return fmt.Errorf("overlay/bare ratio below %.2f: %s", o.goal, strings.Join(low, ", "))
	}
	return nil
}

// bareTunnel runs wireguard-go on a new interface in a's and b's namespaces,
// configures keys, peers and addresses with wg(8) and ip(8), and returns b's
// tunnel address. The lab stops the processes and removes the namespaces.
func bareTunnel(ctx context.Context, m *lab.Mesh, wgBin string) (netip.Addr, error) {
	hosts := []*lab.Node{m.Node("a"), m.Node("b")}
	addrs := []netip.Addr{netip.MustParseAddr("10.99.0.1"), netip.MustParseAddr("10.99.0.2")}
	const port = 51999
	var keys [2]wgtypes.Key
	var ifaces [2]string
	for i, n := range hosts {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			return netip.Addr{}, err
		}
		keys[i] = k
		// "sm<id>b<n>": unique machine-wide like the lab's own names (the UAPI
		// socket path is global).
		ifaces[i] = fmt.Sprintf("sm%sb%d", m.Lab.ID, n.Host.Index)
		m.Lab.ReserveInterface(ifaces[i])
		p, err := n.Host.Start("wireguard-go", wgBin, "-f", ifaces[i])
		if err != nil {
			return netip.Addr{}, err
		}
		err = lab.WaitFor(ctx, 10*time.Second, func(ctx context.Context) (bool, error) {
			if !p.Running() {
				return false, lab.Abort(fmt.Errorf("wireguard-go exited: %s", p.Log()))
			}
			_, err := n.Host.Exec(ctx, "wg", "show", ifaces[i])
			return err == nil, err
		})
		if err != nil {
			return netip.Addr{}, err
		}
	}
	for i, n := range hosts {
		peer := 1 - i
		keyFile := filepath.Join(n.Host.Dir, "bare-wg.key")
		if err := os.WriteFile(keyFile, []byte(keys[i].String()), 0o600); err != nil {
			return netip.Addr{}, err
		}
		steps := [][]string{
			{"wg", "set", ifaces[i], "listen-port", fmt.Sprint(port), "private-key", keyFile,
				"peer", keys[peer].PublicKey().String(),
				"endpoint", netip.AddrPortFrom(hosts[peer].Host.Addr, port).String(),
				"allowed-ips", netip.PrefixFrom(addrs[peer], 32).String()},
			{"ip", "addr", "add", netip.PrefixFrom(addrs[i], 24).String(), "dev", ifaces[i]},
			{"ip", "link", "set", ifaces[i], "mtu", "1420", "up"},
		}
		for _, s := range steps {
			if _, err := n.Host.Exec(ctx, s...); err != nil {
				return netip.Addr{}, err
			}
		}
	}
	if _, err := hosts[0].Host.Exec(ctx, "ping", "-c", "1", "-W", "5", addrs[1].String()); err != nil {
		return netip.Addr{}, fmt.Errorf("bare tunnel does not pass a ping: %w", err)
	}
	return addrs[1], nil
}
