// Command segmesh-agent runs the segmesh host agent: it enrolls the host with the
// controller, builds the WireGuard overlay and enforces the node's nftables filter.
//
//	segmesh-agent --controller https://192.0.2.1:7443 --token TOKEN --state-dir /var/lib/segmesh
//	segmesh-agent down --state-dir /var/lib/segmesh
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"segmesh/agent"
	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "segmesh-agent:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	var (
		opts      agent.Options
		userspace bool
		logLevel  string
	)
	root := &cobra.Command{
		Use:   "segmesh-agent --controller URL --token TOKEN --state-dir DIR",
		Short: "segmesh host agent: WireGuard overlay and nftables segmentation",
		Long: `segmesh-agent enrolls this host with the segmesh controller (once, with a join
token), then keeps its WireGuard overlay and nftables filter equal to the netmap the
controller sends. Later starts reuse the identity in --state-dir and need no token.
On SIGINT or SIGTERM it stops; the last applied filter stays in force.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			logger, err := newLogger(logLevel)
			if err != nil {
				return err
			}
			if opts.Token == "" {
				opts.Token = os.Getenv("SEGMESH_TOKEN")
			}
			opts.Logger = logger
			opts.NewDataplane = newDataplane(userspace, logger)
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return agent.Run(ctx, opts)
		},
	}
	f := root.Flags()
	f.StringVar(&opts.Controller, "controller", "", "controller URL, e.g. https://192.0.2.1:7443 (first start; later defaults to the enrolled one)")
	f.StringVar(&opts.Token, "token", "", "join token for the first start (default $SEGMESH_TOKEN)")
	f.StringVar(&opts.StateDir, "state-dir", "", "directory for keys, certificates, identity and the last netmap (required)")
	f.StringVar(&opts.Interface, "interface", "", "overlay interface name (default the enrolled one, else "+agent.DefaultInterface+")")
	f.StringVar(&opts.Name, "name", "", "node name to enroll with (default: the controller derives it from the host name)")
	f.IntVar(&opts.ListenPort, "listen-port", 0, fmt.Sprintf("WireGuard UDP port (default the enrolled one, else %d)", agent.DefaultListenPort))
	f.StringVar(&opts.Endpoint, "endpoint", "", "underlay HOST:PORT to advertise (default: local address towards the controller, with the listen port)")
	f.IntVar(&opts.GossipPort, "gossip-port", 0, "memberlist port to bind and to join peers on (default: the controller's, 7946)")
	f.DurationVar(&opts.Resync, "resync", agent.DefaultResync, "period of dataplane read-back, status reports and gossip re-joins")
	f.BoolVar(&userspace, "userspace", false, "use embedded wireguard-go even when the kernel has WireGuard")
	root.PersistentFlags().StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	_ = root.MarkFlagRequired("state-dir")

	root.CompletionOptions.DisableDefaultCmd = true
	root.AddCommand(newDownCmd(&logLevel))
	return root
}

func newDownCmd(logLevel *string) *cobra.Command {
	var stateDir string
	cmd := &cobra.Command{
		Use:   "down --state-dir DIR",
		Short: "remove the overlay interface and the nftables table of an enrolled agent",
		Long: `down removes the overlay interface (named in the agent's state directory) and the
nftables table "inet segmesh". Stop the agent first. The state directory is kept, so
the next start needs no token.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			logger, err := newLogger(*logLevel)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			return agent.Down(ctx, stateDir, newDataplane(false, logger))
		},
	}
	cmd.Flags().StringVar(&stateDir, "state-dir", "", "the agent's state directory (required)")
	_ = cmd.MarkFlagRequired("state-dir")
	return cmd
}

func newDataplane(userspace bool, logger *slog.Logger) func(string) (dataplane.Dataplane, error) {
	return func(iface string) (dataplane.Dataplane, error) {
		return linux.New(linux.Options{Interface: iface, ForceUserspace: userspace, Logger: logger.With("component", "dataplane")})
	}
}

func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}
