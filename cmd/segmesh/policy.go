package main

import (
	"errors"
	"fmt"
	"io"
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
	var output *outFormat
	var wait *waitFlags
	cmd := &cobra.Command{
		Use:   "apply FILE [--wait [--timeout 2m]] [-o table|json|yaml]",
		Short: "Validate a policy file and store it on the controller as the next revision",
		Long: `Apply checks FILE locally, sends it to the controller, which validates it
again (parse, compile against the inventory, tests) and stores it as the next
revision, and prints that revision. Agents get their new netmaps at once; the
distribution goes on after apply returns (` + "`segmesh status`" + ` shows its progress).

With --wait, apply then waits until every online node enforces the revision (its
agent reports the hash of the netmap the controller holds for it), with a
progress bar on a terminal and a line per change otherwise, both on stderr.
Offline nodes are not waited for; they are listed as skipped. When some online
node does not enforce it within --timeout, apply lists it (desired and applied
revision and netmap hash, error) and exits 3; the revision stays stored.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := wait.check(cmd); err != nil {
				return err
			}
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
			out := applyJSON{Revision: resp.GetRevision(), Unchanged: resp.GetUnchanged()}
			return out.finish(cmd, g, *output, wait, func(w io.Writer) {
				if out.Unchanged {
					fmt.Fprintf(w, "unchanged: revision %d already holds this policy\n", out.Revision)
					return
				}
				fmt.Fprintf(w, "applied revision %d\n", out.Revision)
			})
		},
	}
	output = addOutputFlag(cmd, "")
	wait = addWaitFlags(cmd)
	return cmd
}

// applyJSON is the shape of `policy apply -o json` and `policy rollback -o json`.
type applyJSON struct {
	// Revision is the revision stored, or with Unchanged the revision in force
	// that already holds the policy.
	Revision  uint64 `json:"revision"`
	Unchanged bool   `json:"unchanged"`
	// RestoredFrom is the revision a rollback restored.
	RestoredFrom uint64 `json:"restored_from,omitempty"`
	// Wait is set with --wait.
	Wait *waitJSON `json:"wait,omitempty"`
}

// finish completes apply or rollback once the controller stored the revision:
// with --wait it waits for the revision's distribution, then prints a in format f
// (headline prints the table form's first line) and, when the wait timed out,
// returns exit code 3.
func (a applyJSON) finish(cmd *cobra.Command, g *globalFlags, f outFormat, wait *waitFlags, headline func(io.Writer)) error {
	if wait.wait {
		w, err := waitForRevision(g, a.Revision, wait.timeout, cmd.ErrOrStderr())
		if err != nil {
			return err
		}
		a.Wait = w
	}
	err := f.write(cmd.OutOrStdout(), a, func(out io.Writer) error {
		headline(out)
		if a.Wait != nil {
			return a.Wait.writeTable(out)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if a.Wait != nil && !a.Wait.Enforced {
		return a.Wait.notEnforcedError(wait.timeout)
	}
	return nil
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
