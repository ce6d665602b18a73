// Command segmesh-controller runs the segmesh controller: it turns flags (and
// the --config file and SEGMESH_* variables, see cmd/internal/daemonconfig) into
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

	"segmesh/cmd/internal/daemonconfig"
	"segmesh/cmd/internal/debugserve"
	"segmesh/cmd/internal/metricsserve"
	"segmesh/controller"
	"segmesh/controller/store/etcdstore"
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

// DefaultConfigFile is the configuration file check-config reads when --config
// is not given. The daemon itself reads a file only when --config names one.
const DefaultConfigFile = "/etc/segmesh/controller.yaml"

// binder binds the controller's flags to its --config file and to $SEGMESH_*.
var binder = daemonconfig.Binder{EnvPrefix: "SEGMESH_", Required: []string{"data-dir"}}

func newCommand() *cobra.Command {
	var (
		opts        controller.Options
		prefixes    []string
		logLevel    string
		debugAddr   string
		metricsAddr string
		configFile  string
		storeFlags  etcdFlags
	)
	// prepare applies the config file and the environment to the flags not given on
	// the command line, checks every value and fills opts; it touches no file but
	// the config file.
	prepare := func(cmd *cobra.Command, configFile string) (*daemonconfig.Effective, error) {
		eff, err := binder.Apply(cmd.Flags(), configFile)
		if err != nil {
			return nil, err
		}
		var level slog.Level
		if err := level.UnmarshalText([]byte(logLevel)); err != nil {
			return nil, eff.Errorf("log-level", "%q: want debug, info, warn or error", logLevel)
		}
		opts.Logger = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: level}))
		opts.OverlayPrefixes = nil
		for _, s := range prefixes {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return nil, eff.Errorf("overlay-prefix", "%q is not a prefix (want ADDRESS/BITS, e.g. 100.64.0.0/10 or fd5e:6d65:7368::/48): %v", s, err)
			}
			opts.OverlayPrefixes = append(opts.OverlayPrefixes, p)
		}
		opts.Store, opts.Etcd = storeFlags.store, etcdstore.Config{}
		switch storeFlags.store {
		case controller.StoreBolt:
		case controller.StoreEtcd:
			if opts.Etcd, err = storeFlags.config(eff); err != nil {
				return nil, err
			}
		default:
			return nil, eff.Errorf("store", "%q: want %s or %s", storeFlags.store, controller.StoreBolt, controller.StoreEtcd)
		}
		if err := opts.Check(); err != nil {
			return nil, err
		}
		return eff, nil
	}
	cmd := &cobra.Command{
		Use:   "segmesh-controller --data-dir DIR [--listen ADDR:PORT] | --config FILE",
		Short: "Serve the segmesh controller (enrollment, policy, netmaps, operator API)",
		Long: `segmesh-controller holds the segmentation policy and the inventory of nodes.
On first start it creates in --data-dir a CA, a TLS server certificate, the
operator credential file operator.json (read by "segmesh --credentials") and
its store; later starts reuse them.

Every flag is also a key of the YAML file named by --config ("data-dir:
/var/lib/segmesh", "san: [ctl.example.com]") and an environment
variable SEGMESH_<FLAG> (SEGMESH_DATA_DIR; lists comma-separated). A flag on the
command line wins over the environment, which wins over the file, which wins
over the default. Without --config no file is read. "segmesh-controller
check-config" checks a configuration without starting.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, err := prepare(cmd, configFile); err != nil {
				return err
			}
			if os.Getenv("GOGC") == "" {
				debug.SetGCPercent(DefaultGCPercent)
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
	f.StringVar(&configFile, daemonconfig.FlagName, "", "read settings from this YAML file (keys are the flags' names); flags and $SEGMESH_* variables override it")
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
	f.StringVar(&opts.STUNListen, "stun-listen", "", `answer STUN Binding requests (RFC 8489) on this UDP address, usually ":3478"; empty: off`)
	storeFlags.register(f, true)
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	f.StringVar(&debugAddr, "debug-listen", "", "serve Go profiles (net/http/pprof) on this address, e.g. 127.0.0.1:6061; keep it on loopback")
	f.StringVar(&metricsAddr, "metrics-listen", "", metricsserve.FlagUsage)
	cmd.AddCommand(newBackupCommand(), newMigrateCommand(), newCheckConfigCommand(cmd, prepare))
	cmd.CompletionOptions.DisableDefaultCmd = true
	return cmd
}

// newCheckConfigCommand is "segmesh-controller check-config [--config FILE]
// [FLAGS]": it takes every flag of the daemon (root), checks the configuration
// with prepare and prints the effective one with the source of each value.
func newCheckConfigCommand(root *cobra.Command, prepare func(*cobra.Command, string) (*daemonconfig.Effective, error)) *cobra.Command {
	var configFile string
	cmd := &cobra.Command{
		Use:   "check-config [--config FILE] [FLAGS]",
		Short: "Check the configuration (file, environment, flags) without starting, and print it",
		Long: `check-config reads the configuration the controller would start with (the
--config file, default ` + DefaultConfigFile + `; the SEGMESH_* environment; the
flags given here, which are the controller's) and checks every value without
touching the data directory. It prints one key a line with its value and where
the value came from (default, file FILE:LINE:COL, env VAR or flag), and exits 1
with every problem found, each at its file:line:col. --config "" checks the
environment and flags alone.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			eff, err := prepare(cmd, configFile)
			if err != nil {
				return err
			}
			return eff.Write(cmd.OutOrStdout())
		},
	}
	cmd.Flags().StringVar(&configFile, daemonconfig.FlagName, DefaultConfigFile, "the YAML configuration file to check")
	cmd.Flags().AddFlagSet(root.Flags())
	return cmd
}
