// Command segmesh is the operator CLI: offline policy tools and queries against the
// controller's operator API.
//
// Connection flags: --controller URL[,URL...] and --credentials FILE (environment
// variables SEGMESH_CONTROLLER and SEGMESH_CREDENTIALS). The credential file is the
// operator.json the controller writes into its data directory on first start.
// With several controller URLs (replicas sharing one etcd store) each call goes
// to the next only when the previous one provably did not process it (client.go,
// controllerSet.call).
//
// Read commands take -o table|json|yaml (output.go).
//
// Exit codes: 0 success; 1 the input or request was refused (policy errors, failed
// tests, an unknown node, a change the credential's role does not allow, a
// tampered audit log); 2 usage, credential or connection problems; 3 policy
// apply/rollback --wait stored the revision but some online node did not enforce
// it within --timeout (wait.go).
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
)

// exitError carries an exit code and an optional message for main to print.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func main() {
	root := newRootCmd()
	err := root.Execute()
	if err == nil {
		return
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.msg != "" {
			fmt.Fprintln(os.Stderr, ee.msg)
		}
		os.Exit(ee.code)
	}
	fmt.Fprintln(os.Stderr, "segmesh:", err)
	os.Exit(2)
}

type globalFlags struct {
	controller  string
	credentials string
}

func newRootCmd() *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:           "segmesh",
		Short:         "Operate a segmesh overlay: check and apply policy, manage join tokens, nodes and operators, query status and the audit log",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.controller, "controller", os.Getenv("SEGMESH_CONTROLLER"),
		"controller URL, e.g. https://192.0.2.1:7443, or several replicas' URLs separated by commas, tried in turn while unreachable (default: from the credential file; env SEGMESH_CONTROLLER)")
	root.PersistentFlags().StringVar(&g.credentials, "credentials", os.Getenv("SEGMESH_CREDENTIALS"),
		"operator credential file written by the controller (DATA_DIR/operator.json; env SEGMESH_CREDENTIALS)")
	root.AddCommand(newPolicyCmd(g), newTokenCmd(g), newNodesCmd(g), newStatusCmd(g), newOperatorsCmd(g), newAuditCmd(g), newFlowsCmd(g))
	return root
}

// oneArg accepts exactly one positional argument, named name in the usage error.
func oneArg(name string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != 1 {
			return &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s takes one argument, %s (see --help)", cmd.CommandPath(), name)}
		}
		return nil
	}
}

// argCmd builds a command that takes one argument (use is "VERB ARG") and runs
// run with it, printing to the command's standard output.
func argCmd(use, short, long string, run func(w io.Writer, arg string) error) *cobra.Command {
	_, argName, _ := strings.Cut(use, " ")
	return &cobra.Command{
		Use: use, Short: short, Long: long, Args: oneArg(argName),
		RunE: func(cmd *cobra.Command, args []string) error { return run(cmd.OutOrStdout(), args[0]) },
	}
}
