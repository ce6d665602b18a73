// Command segmesh-controller runs the segmesh controller: it turns flags into
// controller.Options and serves until SIGINT or SIGTERM, then shuts down
// gracefully.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"segmesh/cmd/internal/debugserve"
	"segmesh/cmd/internal/metricsserve"
	"segmesh/controller"
)

// DefaultGCPercent is the controller's garbage collection target (runtime/debug.
// SetGCPercent) unless $GOGC sets one: the heap may grow 50 % over the live heap
// between collections instead of Go's default 100 %. Most of the controller's
// memory is per agent connection (TLS and HTTP/2 state, three goroutines), live
// as long as the agent is connected, so the default doubled it.
const DefaultGCPercent = 50

func main() {
	if err := newCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "segmesh-controller:", err)
		os.Exit(1)
	}
}

func newCommand() *cobra.Command {
	var (
		opts        controller.Options
		prefixes    []string
		logLevel    string
		debugAddr   string
		metricsAddr string
	)
	cmd := &cobra.Command{
		Use:   "segmesh-controller --data-dir DIR [--listen ADDR:PORT]",
		Short: "Serve the segmesh controller (enrollment, policy, netmaps, operator API)",
		Long: `segmesh-controller holds the segmentation policy and the inventory of nodes.
On first start it creates in --data-dir a CA, a TLS server certificate, the
operator credential file operator.json (read by "segmesh --credentials") and
its store; later starts reuse them.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level %q: want debug, info, warn or error", logLevel)
			}
			opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			if os.Getenv("GOGC") == "" {
				debug.SetGCPercent(DefaultGCPercent)
			}
			for _, s := range prefixes {
				p, err := netip.ParsePrefix(s)
				if err != nil {
					return fmt.Errorf("--overlay-prefix %q is not a prefix (want ADDRESS/BITS, e.g. 100.64.0.0/10 or fd5e:6d65:7368::/48): %w", s, err)
				}
				opts.OverlayPrefixes = append(opts.OverlayPrefixes, p)
			}
			reg := prometheus.NewRegistry()
			if metricsAddr != "" {
				opts.Metrics = reg
			}
			c, err := controller.New(opts)
			if err != nil {
				return err
			}
			if metricsAddr != "" {
				if _, err := metricsserve.Serve(metricsAddr, reg, opts.Logger); err != nil {
					return err
				}
			}
			if debugAddr != "" {
				if err := debugserve.Serve(debugAddr, opts.Logger); err != nil {
					return err
				}
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return c.Run(ctx)
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.DataDir, "data-dir", "", "directory for the CA, certificates, operator credential and store (created 0700)")
	f.StringVar(&opts.Listen, "listen", controller.DefaultListen, "address to serve on (host:port)")
	f.StringVar(&opts.AdvertiseURL, "advertise-url", "", "controller URL written to operator.json (default https://<listen host or 127.0.0.1>:<port>)")
	f.StringArrayVar(&prefixes, "overlay-prefix", []string{"100.64.0.0/10", "fd5e:6d65:7368::/48"}, "overlay prefix to allocate node addresses from, at most one per address family (repeatable; giving any replaces both defaults)")
	f.StringArrayVar(&opts.SANs, "san", nil, "extra host name or IP address for the server certificate (repeatable)")
	f.DurationVar(&opts.TokenTTL, "token-ttl", controller.DefaultTokenTTL, "default lifetime of join tokens")
	f.IntVar(&opts.GossipPort, "gossip-port", controller.DefaultGossipPort, "memberlist gossip port agents use")
	f.DurationVar(&opts.NodeCertTTL, "node-cert-ttl", controller.DefaultNodeCertTTL, "lifetime of node client certificates; agents renew them when a third is left")
	f.DurationVar(&opts.AddressQuarantine, "address-quarantine", controller.DefaultAddressQuarantine, "how long a deleted node's overlay addresses stay reserved")
	f.IntVar(&opts.MaxConnections, "max-connections", controller.DefaultMaxConnections, "maximum concurrent TCP connections (agents, operators, enrolling hosts)")
	f.IntVar(&opts.MaxConnectionsPerSource, "max-connections-per-source", controller.DefaultMaxConnectionsPerSource, "maximum concurrent TCP connections from one address (IPv6: one /64); loopback is exempt")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	f.StringVar(&debugAddr, "debug-listen", "", "serve Go profiles (net/http/pprof) on this address, e.g. 127.0.0.1:6061; keep it on loopback")
	f.StringVar(&metricsAddr, "metrics-listen", "", metricsserve.FlagUsage)
	_ = cmd.MarkFlagRequired("data-dir")
	cmd.AddCommand(newBackupCommand())
	cmd.CompletionOptions.DisableDefaultCmd = true
	return cmd
}
