package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/policy"
)

func newPolicyCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Check, apply and show segmentation policy"}
	cmd.AddCommand(newPolicyCheckCmd(), newPolicyApplyCmd(g), newPolicyShowCmd(g), withControllerSources(newPolicyExplainCmd(), g), newPolicyDiffCmd(),
		newPolicyHistoryCmd(g), newPolicyRollbackCmd(g), newPolicyRenderCmd(g))
	return cmd
}

// parsePolicyFile reads and parses one policy file. Policy errors are printed one per
// line as "file:line:col: message" and returned as exit code 1.
func parsePolicyFile(path string) (*policy.Policy, []byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: %v", err)}
	}
	p, err := policy.Parse(path, data)
	if err != nil {
		var list policy.ErrorList
		if errors.As(err, &list) {
			return nil, nil, &exitError{code: 1, msg: fmt.Sprintf("%s\n%s: %d error(s)", list.Error(), path, len(list))}
		}
		return nil, nil, &exitError{code: 1, msg: err.Error()}
	}
	return p, data, nil
}

func newPolicyApplyCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "apply FILE",
		Short: "Validate a policy file and store it on the controller as the next revision",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			// Check locally first so errors carry positions even before any network I/O;
			// the controller validates again and is the authority.
			_, data, err := parsePolicyFile(args[0])
			if err != nil {
				return refusedNothingApplied(err)
			}
			resp, err := invoke(g, "applying policy", segmeshv1connect.OperatorServiceClient.ApplyPolicy,
				&segmeshv1.ApplyPolicyRequest{Filename: args[0], Content: data})
			if err != nil {
				return refusedNothingApplied(err)
			}
			printWarnings(cmd.ErrOrStderr(), resp.GetWarnings())
			if resp.GetUnchanged() {
				fmt.Fprintf(cmd.OutOrStdout(), "unchanged: revision %d already holds this policy\n", resp.GetRevision())
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "applied revision %d\n", resp.GetRevision())
			return nil
		},
	}
}

// refusedNothingApplied adds to a refusal of the policy (exit code 1) the fact that
// the controller kept the revision in force.
func refusedNothingApplied(err error) error {
	return refusedNothingChanged(err, "policy refused; nothing was applied, the revision in force stays")
}

// refusedNothingChanged adds the line "segmesh: NOTE" to a refusal (exit code 1), to
// say what stays as it was; other errors are returned as they are.
func refusedNothingChanged(err error, note string) error {
	var ee *exitError
	if errors.As(err, &ee) && ee.code == 1 {
		return &exitError{code: 1, msg: ee.msg + "\nsegmesh: " + note}
	}
	return err
}

func newPolicyShowCmd(g *globalFlags) *cobra.Command {
	var revision uint64
	cmd := &cobra.Command{
		Use:   "show",
		Short: "Print the policy file of the revision in force (or of a given revision)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			resp, err := invoke(g, "reading policy", segmeshv1connect.OperatorServiceClient.GetPolicy,
				&segmeshv1.GetPolicyRequest{Revision: revision})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "# revision %d (%s)\n", resp.GetRevision(), resp.GetFilename())
			_, err = cmd.OutOrStdout().Write(resp.GetContent())
			return err
		},
	}
	cmd.Flags().Uint64Var(&revision, "revision", 0, "revision to show (default: current)")
	return cmd
}
