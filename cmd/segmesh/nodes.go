package main

import (
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/policy"
)

func newNodesCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "nodes", Short: "Inspect enrolled nodes; revoke, delete, relabel them, rotate their keys"}
	cmd.AddCommand(newNodesListCmd(g), newNodesShowCmd(g), newNodesRevokeCmd(g), newNodesDeleteCmd(g),
		newNodesLabelCmd(g), newNodesRotateKeyCmd(g))
	return cmd
}

func listNodes(g *globalFlags) ([]*segmeshv1.NodeStatus, error) {
	resp, err := invoke(g, "listing nodes", segmeshv1connect.OperatorServiceClient.ListNodes, &segmeshv1.ListNodesRequest{})
	if err != nil {
		return nil, err
	}
	return resp.GetNodes(), nil
}

func newNodesListCmd(g *globalFlags) *cobra.Command {
	var output *outFormat
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List enrolled nodes with state, labels and overlay addresses",
		Long: `List prints the enrolled nodes, revoked ones included (STATE revoked).

-o yaml does not print the JSON document as YAML, unlike the other read commands:
it prints the inventory format (NODES.yaml) that the offline policy tools read
with --inventory, without the revoked nodes (they are in no netmap).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			nodes, err := listNodes(g)
			if err != nil {
				return err
			}
			if *output == formatYAML {
				inv, err := inventoryFromStatus(nodes)
				if err != nil {
					return &exitError{code: 2, msg: "segmesh: " + err.Error()}
				}
				_, err = cmd.OutOrStdout().Write(policy.MarshalInventory(inv))
				return err
			}
			list := toNodesJSON(nodes)
			return output.write(cmd.OutOrStdout(), list, func(w io.Writer) error {
				rows := make([][]string, 0, len(list))
				for _, n := range list {
					rows = append(rows, []string{n.Name, n.State, formatLabels(n.Labels), strings.Join(n.Addresses, ","), n.Endpoint, fmt.Sprint(n.Online)})
				}
				return writeTable(w, []string{"NODE", "STATE", "LABELS", "ADDRESSES", "ENDPOINT", "ONLINE"}, rows)
			})
		},
	}
	output = addOutputFlag(cmd, "yaml: the inventory file of the offline policy tools")
	return cmd
}

func newNodesShowCmd(g *globalFlags) *cobra.Command {
	return readCmd(&cobra.Command{
		Use:   "show NAME",
		Short: "Show one node: labels, state, addresses, endpoint, dataplane, revisions, certificate expiry, revocation",
		Args:  oneArg("NAME"),
	}, func(args []string) (any, func(io.Writer) error, error) {
		nodes, err := listNodes(g)
		if err != nil {
			return nil, nil, err
		}
		i := slices.IndexFunc(nodes, func(n *segmeshv1.NodeStatus) bool { return n.GetName() == args[0] })
		if i < 0 {
			return nil, nil, &exitError{code: 1, msg: fmt.Sprintf("segmesh: node %q is not enrolled (see `segmesh nodes list`)", args[0])}
		}
		n := toNodeJSON(nodes[i])
		return n, n.writeFields, nil
	})
}

func (n nodeJSON) writeFields(w io.Writer) error {
	return writeFields(w,
		"name", n.Name,
		"state", n.State,
		"labels", formatLabels(n.Labels),
		"addresses", strings.Join(n.Addresses, ", "),
		"endpoint", n.Endpoint,
		"public key", n.PublicKey,
		"dataplane", n.Dataplane,
		"online", fmt.Sprint(n.Online),
		"last seen", n.LastSeen,
		"desired revision", fmt.Sprint(n.DesiredRevision),
		"applied revision", fmt.Sprint(n.AppliedRevision),
		"sync", n.Sync,
		"drift repairs", n.driftRepairs(),
		"last repaired", joinDifferences(n.Drift.LastRepaired, n.Drift.LastRepairedMore),
		"unrepaired drift", joinDifferences(n.Drift.Unrepaired, n.Drift.UnrepairedMore),
		"enrolled", n.EnrolledAt,
		"cert expires", n.CertExpiresAt,
		"revoked at", n.RevokedAt,
		"revoked by", n.RevokedBy,
		"alive peers", strings.Join(n.AlivePeers, ", "),
		"error", n.Error,
	)
}

func newNodesRevokeCmd(g *globalFlags) *cobra.Command {
	return argCmd("revoke NAME", "Cut a node off: out of every netmap, its certificate refused, a new gossip key",
		`Revoke removes the node from every other node's WireGuard peers and sets, cuts
its established flows, refuses its certificate on every call and rotates the
gossip key. Its agent drops every peer and keeps a default-deny table. The node
stays listed with state revoked; its name and WireGuard key cannot enroll again
until `+"`segmesh nodes delete NAME`"+`.`,
		func(w io.Writer, name string) error {
			if _, err := invoke(g, "revoking node "+name, segmeshv1connect.OperatorServiceClient.RevokeNode,
				&segmeshv1.RevokeNodeRequest{Name: name}); err != nil {
				return err
			}
			_, err := fmt.Fprintf(w, "node %s revoked: removed from every netmap; its name and key cannot enroll again until `segmesh nodes delete %s`\n", name, name)
			return err
		})
}

func newNodesDeleteCmd(g *globalFlags) *cobra.Command {
	return argCmd("delete NAME", "Cut a decommissioned node off like revoke, then remove its record",
		`Delete cuts the node off like revoke and removes its record, so that its name
can enroll again (with a new join token). Its overlay addresses stay quarantined,
not given to another node, for the controller's --address-quarantine; the
command prints them and until when.`,
		func(w io.Writer, name string) error {
			resp, err := invoke(g, "deleting node "+name, segmeshv1connect.OperatorServiceClient.DeleteNode,
				&segmeshv1.DeleteNodeRequest{Name: name})
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "node %s deleted: removed from every netmap and from the inventory\n", name)
			if len(resp.GetAddresses()) == 0 {
				_, err = fmt.Fprintln(w, "no overlay addresses to quarantine")
				return err
			}
			_, err = fmt.Fprintf(w, "addresses %s quarantined until %s (not given to another node before then)\n",
				strings.Join(resp.GetAddresses(), ", "), orDash(unixTime(resp.GetQuarantinedUntilUnix())))
			return err
		})
}

func newNodesRotateKeyCmd(g *globalFlags) *cobra.Command {
	return argCmd("rotate-key NAME", "Make a node's agent generate a new WireGuard key; peers switch over without dropping connections",
		`Rotate-key asks the node's agent, through its netmap, to generate a new
WireGuard key pair on the host and report the public key; the controller then
hands the new key to the node's peers. Established connections survive.`,
		func(w io.Writer, name string) error {
			resp, err := invoke(g, "rotating the key of node "+name, segmeshv1connect.OperatorServiceClient.RotateNodeKey,
				&segmeshv1.RotateNodeKeyRequest{Name: name})
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(w, "node %s: key rotation %d requested; its agent generates a new WireGuard key and its peers switch over when it reports it (see `segmesh nodes show %s`)\n",
				name, resp.GetGeneration(), name)
			return err
		})
}

func newNodesLabelCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "label NAME KEY=VALUE... KEY-...",
		Short: "Set (k=v) and remove (k-) labels of a node, after the policy's tests pass on the result",
		Long: `Label changes a node's labels with kubectl's syntax: KEY=VALUE sets a label,
KEY- removes one (a label key never ends with '-'). The controller first runs the
policy's tests against the changed inventory; when one would fail, the change is
refused (exit 1) with the controller's message naming the test, and nothing
changes. Memberships then update as set elements only. Prints the node's labels
after the change.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 {
				return &exitError{code: 2, msg: "segmesh: nodes label takes a node NAME and at least one KEY=VALUE or KEY-, e.g. `segmesh nodes label web-1 role=db env-`"}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			set, remove, err := parseLabelChanges(args[1:])
			if err != nil {
				return err
			}
			resp, err := invoke(g, "labelling node "+name, segmeshv1connect.OperatorServiceClient.LabelNode,
				&segmeshv1.LabelNodeRequest{Name: name, Set: set, Remove: remove})
			if err != nil {
				return refusedNothingChanged(err, "relabel refused; the labels of "+name+" are unchanged")
			}
			labels := orDash(formatLabels(resp.GetLabels()))
			if resp.GetUnchanged() {
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "node %s labels unchanged: %s\n", name, labels)
			} else {
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "node %s labels: %s\n", name, labels)
			}
			return err
		},
	}
}

// parseLabelChanges parses kubectl-style label arguments: "k=v" sets k to v, "k-"
// removes k. A key given twice, or an argument of neither form, is a usage error
// (exit 2); the controller checks the label syntax.
func parseLabelChanges(args []string) (map[string]string, []string, error) {
	set := map[string]string{}
	var remove []string
	seen := map[string]bool{}
	for _, a := range args {
		k, v, isSet := strings.Cut(a, "=")
		if !isSet {
			var isRemove bool
			if k, isRemove = strings.CutSuffix(a, "-"); !isRemove {
				return nil, nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: label %q: want KEY=VALUE to set a label or KEY- to remove one, e.g. role=db env-", a)}
			}
		}
		if k == "" {
			return nil, nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: label %q: the key is empty; want KEY=VALUE or KEY-", a)}
		}
		if seen[k] {
			return nil, nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: label %q: key %q given twice", a, k)}
		}
		seen[k] = true
		if isSet {
			set[k] = v
		} else {
			remove = append(remove, k)
		}
	}
	return set, remove, nil
}
