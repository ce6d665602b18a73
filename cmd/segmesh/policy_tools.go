package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"segmesh/policy"
)

// Offline policy tools: the tests of `policy check`, `policy explain` and
// `policy diff`. They read policy files and an inventory file (NODES.yaml, the
// format `segmesh nodes list -o yaml` prints) and never contact the controller.

// readInventory reads and parses an inventory file. Its errors are printed one per
// line as "file:line:col: message" and returned with exit code code.
func readInventory(path string, code int) ([]policy.Node, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: %v", err)}
	}
	nodes, err := policy.ParseInventory(path, data)
	if err != nil {
		var list policy.ErrorList
		if errors.As(err, &list) {
			return nil, &exitError{code: code, msg: fmt.Sprintf("%s\n%s: %d error(s)", list.Error(), path, len(list))}
		}
		return nil, &exitError{code: code, msg: err.Error()}
	}
	return nodes, nil
}

// checkPolicyTests runs the tests of p (from path) against the prototype
// inventory and, when nodes is not nil, against nodes. It returns the summary
// printed for a passing file (counting warnings, the number of warnings
// printed for it), or the failures one per line.
func checkPolicyTests(path string, p *policy.Policy, nodes []policy.Node, warnings int) (string, []string, error) {
	failures, err := policy.RunTests(p, nodes)
	if err != nil {
		return "", nil, &exitError{code: 1, msg: fmt.Sprintf("%s: %v", path, err)}
	}
	if len(failures) > 0 {
		lines := make([]string, 0, len(failures)+1)
		failed := map[string]bool{}
		for _, f := range failures {
			lines = append(lines, f.Error())
			failed[f.Test] = true
		}
		lines = append(lines, fmt.Sprintf("%s: %d of %d tests failed", path, len(failed), len(p.Tests)))
		return "", lines, nil
	}
	on := "the prototype inventory"
	if nodes != nil {
		on += fmt.Sprintf(" and %d nodes", len(nodes))
	}
	switch warnings {
	case 0:
	case 1:
		on += "; 1 warning"
	default:
		on += fmt.Sprintf("; %d warnings", warnings)
	}
	return fmt.Sprintf("%s: ok (%d segments, %d rules, %d tests passed on %s)", path, len(p.Segments), len(p.Rules), len(p.Tests), on), nil, nil
}

// printPolicyWarnings prints to w what in p selects no node of the inventory
// nodes (policy.Warnings), one "file:line:col: warning: message" line each, and
// returns how many it printed. Without an inventory (nodes nil) it prints nothing.
func printPolicyWarnings(w io.Writer, p *policy.Policy, nodes []policy.Node) int {
	if nodes == nil {
		return 0
	}
	ws := policy.Warnings(p, nodes)
	for _, warning := range ws {
		fmt.Fprintln(w, warning.String())
	}
	return len(ws)
}

func newPolicyCheckCmd() *cobra.Command {
	var inventory string
	cmd := &cobra.Command{
		Use:   "check FILE... [--inventory NODES.yaml]",
		Short: "Validate policy files offline and run their tests; prints file:line:col: message per problem and exits 1 on any",
		Long: `Check parses and validates each policy file and runs the assertions of its
tests section: on a prototype inventory derived from the policy (one pair of
nodes per selector, one node per explicit node name, one unlabeled node) and,
with --inventory, on the nodes of NODES.yaml too. Every problem and every failed
test is printed as file:line:col: message; with an invalid inventory, the
problems of the inventory and of each policy file are printed, and tests are
not run.

With --inventory, what selects no node of NODES.yaml is printed on standard
error as file:line:col: warning: message, and does not fail the check: a
segment that holds no node, a node name of a segment that is not in the
inventory, and a rule whose from or to holds no node (external cidrs segments
never count as empty). The controller reports the same warnings on apply.

Exit status: 0 when every file is valid and its tests pass (warnings or not), 1
otherwise, 2 on usage errors and when a file cannot be read.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var nodes []policy.Node
			var msgs []string
			badInventory := false
			if inventory != "" {
				var err error
				nodes, err = readInventory(inventory, 1)
				var ee *exitError
				if errors.As(err, &ee) && ee.code == 1 {
					msgs = append(msgs, ee.msg)
					badInventory = true
				} else if err != nil {
					return err
				}
			}
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
				if badInventory {
					msgs = append(msgs, fmt.Sprintf("%s: valid; tests not run: the inventory %s has errors", path, inventory))
					continue
				}
				warnings := printPolicyWarnings(cmd.ErrOrStderr(), p, nodes)
				ok, failures, err := checkPolicyTests(path, p, nodes, warnings)
				if err != nil {
					return err
				}
				if len(failures) > 0 {
					msgs = append(msgs, strings.Join(failures, "\n"))
					continue
				}
				fmt.Fprintln(cmd.OutOrStdout(), ok)
			}
			if len(msgs) > 0 {
				return &exitError{code: 1, msg: strings.Join(msgs, "\n")}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&inventory, "inventory", "", "also run the tests against the nodes of this inventory file, and warn about what selects none of them")
	return cmd
}

// asToolError turns a policy-file error (exit 1) into exit code 2, the error code
// of the tools whose exit code 1 carries a result.
func asToolError(err error) error {
	var ee *exitError
	if errors.As(err, &ee) && ee.code == 1 {
		return &exitError{code: 2, msg: ee.msg}
	}
	return err
}

func newPolicyExplainCmd() *cobra.Command {
	var inventory, from, to, port string
	cmd := &cobra.Command{
		Use:   "explain FILE --inventory NODES.yaml --from A --to B --port tcp/5432",
		Short: "Say whether the policy in FILE allows a packet, by which rules, or which rules came closest",
		Long: `Explain evaluates one packet from A to B against the policy in FILE and the
nodes of NODES.yaml. A and B are segment names, node names or addresses (an
IPv6 address with a port in brackets: [fd5e:6d65:7368::4]:5432); B may carry the
destination port, in which case --port gives only the protocol (tcp or udp).

It prints the verdict (allowed, denied or partly allowed, when A or B hold several
nodes or addresses) and, per group of flows with the same outcome, the rules that
allow them with their positions, or why they are denied and the rules that came
closest, with the part (from, to, packet) that does not match.

Exit status: 0 when the explanation is printed (whatever the verdict), 2 on errors.`,
		Args: cobra.ExactArgs(1),
	}
	output := addOutputFlag(cmd, "")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		p, _, err := parsePolicyFile(args[0])
		if err != nil {
			return asToolError(err)
		}
		nodes, err := readInventory(inventory, 2)
		if err != nil {
			return err
		}
		x, err := policy.Explain(p, nodes, policy.Query{From: from, To: to, Packet: port})
		if err != nil {
			return &exitError{code: 2, msg: fmt.Sprintf("segmesh: explain: %v", err)}
		}
		return output.write(cmd.OutOrStdout(), x, func(w io.Writer) error {
			_, err := io.WriteString(w, x.Text())
			return err
		})
	}
	cmd.Flags().StringVar(&inventory, "inventory", "", "inventory file NODES.yaml (nodes with names, labels, addresses)")
	cmd.Flags().StringVar(&from, "from", "", "source: a segment, node or address")
	cmd.Flags().StringVar(&to, "to", "", "destination: a segment, node or address, optionally with :PORT ([IPV6]:PORT)")
	cmd.Flags().StringVar(&port, "port", "", "packet: tcp/PORT, udp/PORT or icmp (tcp or udp when --to has the port)")
	for _, f := range []string{"inventory", "from", "to"} {
		_ = cmd.MarkFlagRequired(f)
	}
	return cmd
}

// diffJSON is the shape of `policy diff -o json`.
type diffJSON struct {
	Old       string `json:"old"`
	New       string `json:"new"`
	Inventory string `json:"inventory"`
	Identical bool   `json:"identical"`
	*policy.DiffResult
}

func newPolicyDiffCmd() *cobra.Command {
	var inventory string
	cmd := &cobra.Command{
		Use:   "diff OLD NEW [--inventory NODES.yaml]",
		Short: "Show the flows and peers a policy change adds and removes; exit 1 when they differ",
		Long: `Diff compares what the policies OLD and NEW allow on the nodes of NODES.yaml
(without --inventory: on the prototype inventory derived from both policies, one
pair of nodes per selector, one node per explicit node name). It prints the flows
added and removed, grouped by the segment pair of the rules that allow them and
by packets, and the WireGuard peers each node gains and loses. Policies that
differ only in order, comments or layout are identical.

Exit status: 0 when identical, 1 when different, 2 on errors (so it can gate a
merge in CI).`,
		Args: cobra.ExactArgs(2),
	}
	output := addOutputFlag(cmd, "")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		var pols [2]*policy.Policy
		var msgs []string
		for i, path := range args {
			p, _, err := parsePolicyFile(path)
			var ee *exitError
			if errors.As(err, &ee) && ee.code == 1 {
				msgs = append(msgs, ee.msg)
				continue
			} else if err != nil {
				return err
			}
			pols[i] = p
		}
		if len(msgs) > 0 {
			return &exitError{code: 2, msg: strings.Join(msgs, "\n")}
		}
		var nodes []policy.Node
		on := "prototype inventory"
		if inventory != "" {
			var err error
			if nodes, err = readInventory(inventory, 2); err != nil {
				return err
			}
			on = inventory
		}
		d, err := policy.Diff(pols[0], pols[1], nodes)
		if err != nil {
			return &exitError{code: 2, msg: fmt.Sprintf("segmesh: diff: %v", err)}
		}
		err = output.write(cmd.OutOrStdout(), diffJSON{Old: args[0], New: args[1], Inventory: on, Identical: d.Identical(), DiffResult: d}, func(w io.Writer) error {
			_, err := fmt.Fprintf(w, "%s -> %s on %s:\n%s", args[0], args[1], on, d.Text())
			return err
		})
		if err != nil {
			return err
		}
		if !d.Identical() {
			return &exitError{code: 1}
		}
		return nil
	}
	cmd.Flags().StringVar(&inventory, "inventory", "", "inventory file NODES.yaml (default: the prototype inventory of both policies)")
	return cmd
}
