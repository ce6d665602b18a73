// Command segmesh is the operator CLI: offline policy tools and queries against the
// controller's operator API.
//
// Connection flags: --controller URL and --credentials FILE (environment variables
// SEGMESH_CONTROLLER and SEGMESH_CREDENTIALS). The credential file is the
// operator.json the controller writes into its data directory on first start.
//
// Exit codes: 0 success, 1 the input was rejected (policy errors, refused request),
// 2 usage or connection problems.
package main

import (
	"errors"
	"fmt"
	"os"

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
		Short:         "Operate a segmesh overlay: check and apply policy, create join tokens, query status",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&g.controller, "controller", os.Getenv("SEGMESH_CONTROLLER"),
		"controller URL, e.g. https://192.0.2.1:7443 (default: from the credential file; env SEGMESH_CONTROLLER)")
	root.PersistentFlags().StringVar(&g.credentials, "credentials", os.Getenv("SEGMESH_CREDENTIALS"),
		"operator credential file written by the controller (DATA_DIR/operator.json; env SEGMESH_CREDENTIALS)")
	root.AddCommand(newPolicyCmd(g), newTokenCmd(g), newNodesCmd(g), newStatusCmd(g))
	return root
}
