// Command segmesh-agent runs the segmesh host agent: it enrolls the host with the
// controller, builds the WireGuard overlay and enforces the node's nftables filter.
//
//	segmesh-agent --controller https://192.0.2.1:7443 --token-file /etc/segmesh/token --state-dir /var/lib/segmesh-agent
//	segmesh-agent down --state-dir /var/lib/segmesh-agent
//	segmesh-agent --config /etc/segmesh/agent.yaml
//	segmesh-agent check-config --config /etc/segmesh/agent.yaml
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"segmesh/agent"
	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux"
	"segmesh/cmd/internal/daemonconfig"
	"segmesh/cmd/internal/debugserve"
	"segmesh/cmd/internal/metricsserve"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr, linuxDataplane))
}

// run executes the command line args and returns the exit code: 0 on success, 1
// after printing "segmesh-agent: <error>" to stderr. stdin is read only for
// --token-file -.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer, newDP dataplaneFactory) int {
	root := newRootCmd(newDP)
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	if err := root.Execute(); err != nil {
		fmt.Fprintln(stderr, "segmesh-agent:", err)
		return 1
	}
	return 0
}

// dataplaneFactory returns the constructor agent.Run and agent.Down use to open the
// dataplane of an interface; tests replace linuxDataplane with a fake.
type dataplaneFactory func(userspace bool, logger *slog.Logger) func(iface string) (dataplane.Dataplane, error)

func newRootCmd(newDP dataplaneFactory) *cobra.Command {
	var (
		opts        agent.Options
		userspace   bool
		logLevel    string
		tokenFile   string
		memLimit    memoryLimitFlag
		debugAddr   string
		metricsAddr string
		config      string
	)
	// prepare applies the config file and the environment to the flags not given
	// on the command line, checks them and fills opts (with the join token, read
	// from standard input for --token-file - only when readStdin). It returns the
	// effective configuration and the logger.
	prepare := func(cmd *cobra.Command, configFile string, readStdin bool) (*daemonconfig.Effective, *slog.Logger, error) {
		if err := seal(cmd.Flags()); err != nil {
			return nil, nil, err
		}
		eff, err := binder.Apply(cmd.Flags(), configFile)
		if err != nil {
			return nil, nil, err
		}
		logger, err := newLogger(logLevel, cmd.ErrOrStderr())
		if err != nil {
			return nil, nil, eff.Errorf("log-level", "%q: want debug, info, warn or error", logLevel)
		}
		src := tokenSources{
			Flag:     opts.Token,
			FlagSet:  cmd.Flags().Changed("token"),
			FlagWhat: "--token",
			File:     tokenFile,
			Env:      os.Getenv(tokenEnv),
		}
		if s := eff.Source("token"); s.Kind == daemonconfig.FromFile {
			src.FlagWhat = "token in " + s.Pos.String()
			if err := checkSecretFile(configFile); err != nil {
				return nil, nil, err
			}
		}
		if src.File == "-" && !readStdin {
			src.File = ""
		}
		tok, err := resolveToken(src, cmd.InOrStdin())
		if err != nil {
			return nil, nil, err
		}
		opts.Token = tok
		return eff, logger, nil
	}
	root := &cobra.Command{
		Use:   "segmesh-agent --controller URL[,URL...] --token-file FILE --state-dir DIR",
		Short: "segmesh host agent: WireGuard overlay and nftables segmentation",
		Long: `segmesh-agent enrolls this host with the segmesh controller (once, with a join
token), then keeps its WireGuard overlay and nftables filter equal to the netmap the
controller sends. Later starts reuse the identity in --state-dir and need no token.
--controller must be an https:// URL; the join token never travels in cleartext.

With several controller replicas (sharing one etcd store), give every URL to
--controller (comma-separated, or the flag repeated). The agent enrolls with the
first that answers (a refusal, such as a used join token, is final), learns the
replicas' URLs from the controller it streams from and keeps them in --state-dir.
When its stream is lost (the controller is gone, or its connection stops
answering HTTP/2 pings for 4 s), it connects to the next URL at once, keeping the
dataplane as it is meanwhile; it waits (1 s doubling to 30 s) only after every URL
failed in turn. URLs given on a later start are tried first, before the stored ones.

The join token comes from exactly one of: --token-file FILE (mode 0600 or stricter;
"-" reads standard input), $SEGMESH_TOKEN, or --token. Prefer the first two: a
--token stays visible to every local user in the process list for the agent's whole
life.

Every file in --state-dir is mode 0600 (the directory 0700); a looser file is
tightened when read. The agent renews its node certificate with a fresh TLS key when
a third of its lifetime remains. If the certificate expired anyway, the agent keeps
enforcing its last netmap (fail static) and needs a new join token: started with one,
it re-enrolls under the same name with its current keys. When an operator asks for a
key rotation (segmesh nodes rotate-key), the agent generates a new WireGuard key on
the host and switches to it. When an operator revokes the node, the agent drops every
peer, keeps a default-deny filter (also after a restart) and stops gossip; it comes
back only after "segmesh nodes delete NAME" and a new join token.

On SIGINT or SIGTERM it stops. The nftables table stays, so nothing is open; a
kernel WireGuard interface stays with its peers, a userspace (wireguard-go) one
goes away with the process.

Every flag is also a key of the YAML file named by --config ("state-dir:
/var/lib/segmesh-agent") and an environment variable SEGMESH_<FLAG>
(SEGMESH_STATE_DIR), except that $SEGMESH_TOKEN keeps the rule above. A flag on
the command line wins over the environment, which wins over the file, which wins
over the default. Without --config no file is read. A file holding "token:" must
be mode 0600 or stricter. "segmesh-agent check-config" checks a configuration
without starting.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, logger, err := prepare(cmd, config, true)
			if err != nil {
				return err
			}
			opts.Logger = logger
			limit, from := applyMemoryLimit(memLimit)
			logger.Debug("Go memory settings", "memory_limit_bytes", limit, "memory_limit_from", from, "gc_percent", applyGCPercent())
			if debugAddr != "" {
				if err := debugserve.Serve(debugAddr, logger); err != nil {
					return err
				}
			}
			if metricsAddr != "" {
				// The agent registers its collectors when it starts; a scrape
				// before that gets an empty page.
				reg := prometheus.NewRegistry()
				opts.Metrics = reg
				if _, err := metricsserve.Serve(metricsAddr, reg, logger); err != nil {
					return err
				}
			}
			opts.NewDataplane = newDP(userspace, logger)
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			go returnMemory(ctx, ReturnMemoryEvery)
			return agent.Run(ctx, opts)
		},
	}
	f := root.Flags()
	f.StringVar(&config, daemonconfig.FlagName, "", "read settings from this YAML file (keys are the flags' names); flags and $SEGMESH_* variables override it")
	f.Var(&controllerURLs{urls: &opts.Controllers}, "controller", fmt.Sprintf("controller URLs, https only, one per controller replica, comma-separated or by repeating the flag, at most %d, e.g. https://10.0.0.1:7443,https://10.0.0.2:7443 (first start: enrolls with the first that answers; later starts use the stored ones, those given go first)", agent.MaxControllers))
	f.StringVar(&opts.Token, "token", "", "join token; visible to every local user in the process list (/proc/PID/cmdline) for the agent's whole life: prefer --token-file or $"+tokenEnv)
	f.StringVar(&tokenFile, "token-file", "", "read the join token (first start, or re-enrollment after the certificate expired or the node was deleted) from FILE, mode 0600 or stricter; \"-\" reads standard input")
	f.StringVar(&opts.StateDir, "state-dir", "", "directory for keys, certificates, identity and the last netmap (required)")
	f.StringVar(&opts.Interface, "interface", "", "overlay interface name (default the enrolled one, else "+agent.DefaultInterface+")")
	f.StringVar(&opts.Name, "name", "", "node name to enroll with (default: the controller derives it from the host name)")
	f.IntVar(&opts.ListenPort, "listen-port", 0, fmt.Sprintf("WireGuard UDP port (default the enrolled one, else %d)", agent.DefaultListenPort))
	f.StringVar(&opts.Endpoint, "endpoint", "", "underlay HOST:PORT to advertise (default: local address towards the controller, with the listen port)")
	f.IntVar(&opts.GossipPort, "gossip-port", 0, "memberlist port to bind and to join peers on (default: the controller's, 7946)")
	f.StringVar(&opts.STUNServer, "stun-server", "", fmt.Sprintf("STUN server HOST:PORT that tells this node the NAT mapping of its WireGuard port, or %q (default: the host of the controller in use, port %d; needs embedded wireguard-go)", agent.STUNOff, agent.DefaultSTUNPort))
	f.StringVar(&opts.RelayPorts, "relay-ports", "", "FIRST-LAST UDP ports on which this node relays WireGuard ciphertext for pairs the controller authorises (the policy must name it in relays:), e.g. 40000-40999; default: relay for nobody")
	f.DurationVar(&opts.Resync, "resync", agent.DefaultResync, "period of dataplane read-back, status reports, gossip re-joins and certificate expiry checks")
	f.BoolVar(&userspace, "userspace", false, "use embedded wireguard-go even when the kernel has WireGuard")
	f.Var(&memLimit, "memory-limit", "Go memory limit (runtime/debug.SetMemoryLimit): the runtime collects garbage and returns memory to the kernel to stay below it, at a cost in throughput under heavy traffic; a size such as 128MiB, or off (default $GOMEMLIMIT if set, else off)")
	f.StringVar(&debugAddr, "debug-listen", "", "serve Go profiles (net/http/pprof) on this address, e.g. 127.0.0.1:6060; keep it on loopback")
	f.StringVar(&metricsAddr, "metrics-listen", "", metricsserve.FlagUsage)
	root.PersistentFlags().StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")

	root.CompletionOptions.DisableDefaultCmd = true
	root.AddCommand(newDownCmd(&logLevel, newDP), newCheckConfigCmd(root, prepare))
	return root
}

// DefaultConfigFile is the configuration file check-config reads when --config
// is not given. The agent itself reads a file only when --config names one.
const DefaultConfigFile = "/etc/segmesh/agent.yaml"

// binder binds the agent's flags to its --config file and to $SEGMESH_*; the
// join token's variable keeps its own rule (resolveToken).
var binder = daemonconfig.Binder{
	EnvPrefix: "SEGMESH_",
	NoEnv:     []string{"token"},
	Secret:    []string{"token"},
	Required:  []string{"state-dir"},
}

// newCheckConfigCmd is "segmesh-agent check-config [--config FILE] [FLAGS]": it
// takes every flag of the agent (root), checks the configuration with prepare
// (reading a --token-file, but not standard input) and prints the effective one
// with the source of each value.
func newCheckConfigCmd(root *cobra.Command, prepare func(*cobra.Command, string, bool) (*daemonconfig.Effective, *slog.Logger, error)) *cobra.Command {
	var configFile string
	cmd := &cobra.Command{
		Use:   "check-config [--config FILE] [FLAGS]",
		Short: "check the configuration (file, environment, flags) without starting, and print it",
		Long: `check-config reads the configuration the agent would start with (the --config
file, default ` + DefaultConfigFile + `; the SEGMESH_* environment; the flags given
here, which are the agent's) and checks every value, including the join token's
sources and --token-file's mode, without touching the state directory or the
network. It prints one key a line with its value (the token redacted) and where
the value came from (default, file FILE:LINE:COL, env VAR or flag), and exits 1
with every problem found, each at its file:line:col. --config "" checks the
environment and flags alone.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			eff, _, err := prepare(cmd, configFile, false)
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

func newDownCmd(logLevel *string, newDP dataplaneFactory) *cobra.Command {
	var stateDir, configFile string
	cmd := &cobra.Command{
		Use:   "down --state-dir DIR | --config FILE",
		Short: "remove the overlay interface and the nftables table of an enrolled agent",
		Long: `down removes the overlay interface (named in the agent's state directory) and the
nftables table "inet segmesh" and prints what it removed. Stop the agent first. The
state directory is kept, so the next start needs no token. The state directory is
--state-dir, else $SEGMESH_STATE_DIR, else state-dir in the agent's --config file.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			logger, err := newLogger(*logLevel, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			dir, err := downStateDir(cmd.Flags().Lookup("state-dir"), configFile, newDP)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			res, err := agent.Down(ctx, dir, newDP(false, logger))
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), res)
			return nil
		},
	}
	cmd.Flags().StringVar(&stateDir, "state-dir", "", "the agent's state directory (required unless $SEGMESH_STATE_DIR or the --config file gives it)")
	cmd.Flags().StringVar(&configFile, daemonconfig.FlagName, "", "the agent's YAML configuration file, to take state-dir from")
	return cmd
}

// downStateDir returns the state directory "down" acts on: stateDir (down's
// --state-dir) when given, else what the agent itself would use from the
// environment and configFile, which is checked whole, as the agent checks it.
func downStateDir(stateDir *pflag.Flag, configFile string, newDP dataplaneFactory) (string, error) {
	root := newRootCmd(newDP)
	fs := pflag.NewFlagSet("segmesh-agent", pflag.ContinueOnError)
	fs.AddFlagSet(root.Flags())
	fs.AddFlagSet(root.PersistentFlags())
	if stateDir.Changed {
		if err := fs.Set("state-dir", stateDir.Value.String()); err != nil {
			return "", err
		}
	}
	if err := seal(fs); err != nil {
		return "", err
	}
	if _, err := binder.Apply(fs, configFile); err != nil {
		return "", err
	}
	return fs.Lookup("state-dir").Value.String(), nil
}

// linuxDataplane opens the Linux dataplane (kernel WireGuard or wireguard-go).
func linuxDataplane(userspace bool, logger *slog.Logger) func(string) (dataplane.Dataplane, error) {
	return func(iface string) (dataplane.Dataplane, error) {
		return linux.New(linux.Options{Interface: iface, ForceUserspace: userspace, Logger: logger.With("component", "dataplane")})
	}
}

// newLogger returns a text logger to w at level ("debug", "info", "warn" or "error").
func newLogger(level string, w io.Writer) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
}
