package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"segmesh/controller"
)

// newBackupCommand is "segmesh-controller backup --data-dir DIR FILE".
func newBackupCommand() *cobra.Command {
	var opts controller.BackupOptions
	cmd := &cobra.Command{
		Use:   "backup --data-dir DIR FILE",
		Short: "Write a consistent copy of the controller's store to FILE, also while the controller runs",
		Long: `backup writes a consistent copy of DIR/controller.db (nodes, join tokens,
policy revisions, operator credentials, audit log) to FILE, mode 0600.

While a controller runs on DIR it holds the store's lock, so the copy is taken
by the controller itself through its operator API, with the admin credential
DIR/operator.json; otherwise the store file is read directly. The copy is
checked like a store at controller start before it replaces FILE, and the
command prints its size and what it holds. The copy contains secrets (the
gossip key, token hashes): keep it like the data directory.

Restore (see docs/operations.md): stop the controller, copy FILE to
DIR/controller.db with mode 0600, and start the controller again. A backup only
restores into the data directory whose CA (ca.crt, ca.key) it was taken with.`,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) != 1 {
				return fmt.Errorf("backup takes exactly one argument, the backup FILE (got %d): segmesh-controller backup --data-dir DIR FILE", len(args))
			}
			return nil
		},
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.File = args[0]
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			res, err := controller.Backup(ctx, opts)
			if err != nil {
				return err
			}
			how := "read from the store file (no controller running)"
			if res.Online {
				how = "taken by the running controller"
			}
			s := res.Summary
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s: %d bytes, %s, checked\n  nodes %d, policy revisions %d, audit records %d\n",
				res.File, res.Bytes, how, s.Nodes, s.PolicyRevisions, s.AuditRecords)
			if s.Owner.CAFingerprint != "" {
				fmt.Fprintf(cmd.OutOrStdout(), "  owner: controller CA sha256 %s\n", s.Owner.CAFingerprint)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&opts.DataDir, "data-dir", "", "the controller's data directory (holds controller.db, ca.crt and operator.json)")
	_ = cmd.MarkFlagRequired("data-dir")
	return cmd
}
