package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"segmesh/cmd/internal/daemonconfig"
	"segmesh/controller"
)

// migrateBinder reads the migrate command's flags from $SEGMESH_* too (the
// daemon's variables: SEGMESH_DATA_DIR, SEGMESH_ETCD_ENDPOINTS, ...).
var migrateBinder = daemonconfig.Binder{EnvPrefix: "SEGMESH_", Required: []string{"data-dir"}}

// newMigrateCommand is "segmesh-controller migrate --data-dir DIR
// --etcd-endpoints URLS --secret-key-file FILE [--etcd-ca/--etcd-cert/--etcd-key]
// [--etcd-prefix P]".
func newMigrateCommand() *cobra.Command {
	var (
		dataDir    string
		storeFlags etcdFlags
	)
	cmd := &cobra.Command{
		Use:   "migrate --data-dir DIR --etcd-endpoints URL,... --secret-key-file FILE [--etcd-prefix PREFIX]",
		Short: "Move a stopped controller's bbolt store (DIR/controller.db) and CA into etcd, for several controllers",
		Long: `migrate copies the state of a controller that ran on the bbolt store into an
empty etcd prefix, so that controllers started with --store etcd serve it:
nodes, join tokens, operator credentials, policy revisions, overlay addresses
and their quarantine, the gossip key and the audit log, byte for byte (the audit
chain, revisions and indexes are unchanged), then the controller CA (DIR/ca.crt,
ca.key) and the admin token of DIR/operator.json, sealed with --secret-key-file.
The copy is verified (record counts, audit chain) before migrate reports success.

Stop the controller first: migrate reads DIR/controller.db directly and leaves
it unchanged. The etcd prefix must be empty. Until migrate finishes, the prefix
is marked incomplete and controllers refuse to start on it; if migrate fails
after it began writing, clear the prefix (etcdctl del --prefix PREFIX) and run
it again.

Every flag can also come from the environment (SEGMESH_DATA_DIR,
SEGMESH_ETCD_ENDPOINTS, ...), like the daemon's.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			eff, err := migrateBinder.Apply(cmd.Flags(), "")
			if err != nil {
				return err
			}
			cfg, err := storeFlags.config(eff)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			logger := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelWarn}))
			res, err := controller.Migrate(ctx, controller.MigrateOptions{DataDir: dataDir, Etcd: cfg, Logger: logger})
			if err != nil {
				return err
			}
			printMigrateResult(cmd.OutOrStdout(), dataDir, storeFlags, res)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dataDir, "data-dir", "", "the stopped controller's data directory (holds controller.db, ca.crt, ca.key, operator.json)")
	storeFlags.register(f, false)
	return cmd
}

// printMigrateResult prints what was copied and the next steps.
func printMigrateResult(w io.Writer, dataDir string, flags etcdFlags, res controller.MigrateResult) {
	r := res.Stats.Records
	fmt.Fprintf(w, "migrated %s into %s, verified:\n", filepath.Join(dataDir, controller.StoreFile), res.Store)
	fmt.Fprintf(w, "  nodes %d, join tokens %d, operators %d, policy revisions %d, audit records %d\n",
		r["nodes"], r["tokens"], r["operators"], r["policies"], r["audit"])
	fmt.Fprintf(w, "  indexes: public keys %d, operator tokens %d, addresses %d, quarantined addresses %d; meta values %d (the bbolt owner record is not copied)\n",
		r["pubkeys"], r["operator-tokens"], r["ipam"], r["quarantine"], r["meta"])
	fmt.Fprintf(w, "  %d records in %d etcd transactions\n", res.Stats.Total(), res.Stats.Txns)
	fmt.Fprintf(w, "  controller CA sha256 %s, now the fleet's CA\n", res.CAFingerprint)
	if res.AdminOperator != "" {
		fmt.Fprintf(w, "  admin token of %s (operator %q) shared with the replicas\n", filepath.Join(dataDir, controller.OperatorFile), res.AdminOperator)
	} else {
		fmt.Fprintf(w, "  no admin token shared (%s is missing or names no live operator): each replica writes a new operator.json that the store does not know; use another operator credential\n",
			filepath.Join(dataDir, controller.OperatorFile))
	}
	prefix := ""
	if flags.prefix != "" {
		prefix = " --etcd-prefix " + flags.prefix
	}
	fmt.Fprintf(w, `next steps:
  1. start each replica with its own new, empty --data-dir (it takes the CA from etcd):
       segmesh-controller --data-dir DIR --listen ADDR:PORT --advertise-url https://HOST:PORT \
         --store etcd --etcd-endpoints %s%s --secret-key-file %s
     (a copy of that secret key file on every replica; add --etcd-ca/--etcd-cert/--etcd-key as here)
  2. the token of %s works on every replica (each replica's own operator.json holds it too);
     give the operator CLI every replica: segmesh --controller URL1,URL2,...
  3. agents keep their identity (same CA): give one replica the old controller's address, or
     restart agents with --controller URL1,URL2,...; connected agents learn every replica's URL
  4. keep %s as a backup and do not start the bbolt controller on it again: its state would diverge
`, strings.Join(flags.endpoints, ","), prefix, flags.secretKeyFile, filepath.Join(dataDir, controller.OperatorFile), dataDir)
}
