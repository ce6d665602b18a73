package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"segmesh/api/segmeshv1"
	"segmesh/policy"
)

func newPolicyCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Check, apply and show segmentation policy"}
	cmd.AddCommand(newPolicyCheckCmd(), newPolicyApplyCmd(g), newPolicyShowCmd(g))
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
			return nil, nil, &exitError{code: 1, msg: fmt.Sprintf("%s\n%s: %d error(s); nothing was applied", list.Error(), path, len(list))}
		}
		return nil, nil, &exitError{code: 1, msg: err.Error()}
	}
	return p, data, nil
}

func newPolicyCheckCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "check FILE...",
		Short: "Validate policy files offline; prints file:line:col: message per error and exits 1 on any",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var msgs []string
			for _, path := range args {
				p, _, err := parsePolicyFile(path)
				if err != nil {
					var ee *exitError
					if errors.As(err, &ee) && ee.code == 1 {
						msgs = append(msgs, ee.msg)
						continue
					}
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s: ok (%d segments, %d rules)\n", path, len(p.Segments), len(p.Rules))
			}
			if len(msgs) > 0 {
				return &exitError{code: 1, msg: strings.Join(msgs, "\n")}
			}
			return nil
		},
	}
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
				return err
			}
			client, err := operatorClient(g)
			if err != nil {
				return err
			}
			ctx, cancel := callContext()
			defer cancel()
			resp, err := client.ApplyPolicy(ctx, connect.NewRequest(&segmeshv1.ApplyPolicyRequest{Filename: args[0], Content: data}))
			if err != nil {
				return callError("applying policy", err)
			}
			if resp.Msg.GetUnchanged() {
				fmt.Fprintf(cmd.OutOrStdout(), "unchanged: revision %d already holds this policy\n", resp.Msg.GetRevision())
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "applied revision %d\n", resp.Msg.GetRevision())
			return nil
		},
	}
}

func newPolicyShowCmd(g *globalFlags) *cobra.Command {
	var revision uint64
	cmd := &cobra.Command{
		Use:   "show",
		Short: "Print the policy file of the current (or a given) revision",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			client, err := operatorClient(g)
			if err != nil {
				return err
			}
			ctx, cancel := callContext()
			defer cancel()
			resp, err := client.GetPolicy(ctx, connect.NewRequest(&segmeshv1.GetPolicyRequest{Revision: revision}))
			if err != nil {
				return callError("reading policy", err)
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "# revision %d (%s)\n", resp.Msg.GetRevision(), resp.Msg.GetFilename())
			_, err = cmd.OutOrStdout().Write(resp.Msg.GetContent())
			return err
		},
	}
	cmd.Flags().Uint64Var(&revision, "revision", 0, "revision to show (default: current)")
	return cmd
}
