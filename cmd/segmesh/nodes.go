package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"connectrpc.com/connect"
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
		Short: "Show one node in depth: labels, segments, revisions, latest apply, drift repairs, WireGuard peers and their handshakes",
		Long: `Show prints one node: labels, segments, addresses, endpoint, dataplane and
interface, agent version, state, liveness, the revision it enforces against the
one it should (current: it enforces exactly the netmap the controller holds for
it), its latest apply (when, how long), its latest error, whether its latest
read-back found the kernel in sync, its drift repairs, and the WireGuard peers
its kernel holds as its agent last reported them, with their path (direct,
relay via a relay node, or - when not reported; at most 64, those without a
handshake in 3 minutes first; refreshed every resync interval of the agent),
followed by the peers its netmap lists that the kernel does not hold.`,
		Args: oneArg("NAME"),
	}, func(args []string) (any, func(io.Writer) error, error) {
		n, err := getNode(g, args[0])
		if err != nil {
			return nil, nil, err
		}
		now := time.Now()
		return n, func(w io.Writer) error { return n.writeDetail(w, now) }, nil
	})
}

// nodeDetailJSON is the JSON (and YAML) shape of `nodes show`: the node as
// `nodes list` has it, and the peers its netmap lists.
type nodeDetailJSON struct {
	nodeJSON
	// Current says whether the node enforces exactly the netmap the controller
	// holds for it (the hashes are equal).
	Current bool `json:"current"`
	// DesiredPeers are the peers the node's netmap lists; null from a
	// controller that predates GetNode.
	DesiredPeers []string `json:"desired_peers"`
	// MissingPeers are the desired peers the node's kernel does not hold, as its
	// agent last reported; null when that is not known (no report yet, or the
	// report left peers out).
	MissingPeers []string `json:"missing_peers"`
}

// getNode returns node name in depth (GetNode); from a controller that predates
// GetNode, what ListNodes has (without the desired peers).
func getNode(g *globalFlags, name string) (nodeDetailJSON, error) {
	cs, err := dialControllers(g)
	if err != nil {
		return nodeDetailJSON{}, err
	}
	var resp *connect.Response[segmeshv1.GetNodeResponse]
	err = cs.call(context.Background(), func(ctx context.Context, c segmeshv1connect.OperatorServiceClient) error {
		var err error
		resp, err = c.GetNode(ctx, connect.NewRequest(&segmeshv1.GetNodeRequest{Name: name}))
		return err
	})
	if connect.CodeOf(err) == connect.CodeUnimplemented {
		nodes, lerr := listNodes(g)
		if lerr != nil {
			return nodeDetailJSON{}, lerr
		}
		i := slices.IndexFunc(nodes, func(n *segmeshv1.NodeStatus) bool { return n.GetName() == name })
		if i < 0 {
			return nodeDetailJSON{}, &exitError{code: 1, msg: fmt.Sprintf("segmesh: node %q is not enrolled (see `segmesh nodes list`)", name)}
		}
		return toNodeDetailJSON(nodes[i], nil, false), nil
	}
	if err != nil {
		return nodeDetailJSON{}, callError("reading node "+name, err)
	}
	return toNodeDetailJSON(resp.Msg.GetNode(), resp.Msg.GetDesiredPeers(), true), nil
}

// toNodeDetailJSON returns n with its desired peers (known says whether the
// controller said them).
func toNodeDetailJSON(n *segmeshv1.NodeStatus, desired []string, known bool) nodeDetailJSON {
	d := nodeDetailJSON{nodeJSON: toNodeJSON(n)}
	d.Current = d.AppliedHash != "" && d.AppliedHash == d.DesiredHash
	if !known {
		return d
	}
	d.DesiredPeers = append([]string{}, desired...)
	if d.LastReportAt != "" && d.PeersMore == 0 {
		held := map[string]bool{}
		for _, p := range d.Peers {
			held[p.Name] = true
		}
		d.MissingPeers = []string{}
		for _, p := range desired {
			if !held[p] {
				d.MissingPeers = append(d.MissingPeers, p)
			}
		}
	}
	return d
}

// writeDetail prints n as "key: value" lines, then its peers as a table; times
// are also given relative to now.
func (n nodeDetailJSON) writeDetail(w io.Writer, now time.Time) error {
	err := writeFields(w,
		"name", n.Name,
		"state", n.State,
		"labels", formatLabels(n.Labels),
		"segments", strings.Join(n.Segments, ", "),
		"addresses", strings.Join(n.Addresses, ", "),
		"endpoint", n.Endpoint,
		"public key", n.PublicKey,
		"dataplane", n.Dataplane,
		"interface", n.Interface,
		"agent version", n.Version,
		"online", fmt.Sprint(n.Online),
		"controller", n.Controller,
		"last seen", withAgo(n.LastSeen, now),
		"last report", withAgo(n.LastReportAt, now),
		"desired revision", fmt.Sprint(n.DesiredRevision),
		"applied revision", n.appliedRevision(),
		"sync", n.Sync,
		"last apply", n.lastApply(now),
		"last error", n.Error,
		"drift repairs", n.driftRepairs(now),
		"last repaired", joinDifferences(n.Drift.LastRepaired, n.Drift.LastRepairedMore),
		"unrepaired drift", joinDifferences(n.Drift.Unrepaired, n.Drift.UnrepairedMore),
		"enrolled", n.EnrolledAt,
		"cert expires", n.CertExpiresAt,
		"revoked at", n.RevokedAt,
		"revoked by", n.RevokedBy,
		"alive peers", strings.Join(n.AlivePeers, ", "),
		"desired peers", n.desiredPeers(),
		"peers", n.peersSummary(now),
		"missing peers", n.missingPeers(),
	)
	if err != nil || len(n.Peers) == 0 {
		return err
	}
	fmt.Fprintln(w)
	rows := make([][]string, 0, len(n.Peers))
	for _, p := range n.Peers {
		name := p.Name
		if name == "" {
			name = "(key " + p.PublicKey + ")"
		}
		hs := "never"
		if t, err := time.Parse(time.RFC3339, p.LastHandshakeAt); err == nil {
			hs = ago(now.Sub(t))
		}
		rows = append(rows, []string{name, p.Endpoint, p.pathText(), hs, formatBytes(p.RxBytes), formatBytes(p.TxBytes)})
	}
	return writeTable(w, []string{"NAME", "ENDPOINT", "PATH", "LAST HANDSHAKE", "RX", "TX"}, rows)
}

// withAgo is "TIME (12s ago)"; "" when t is "".
func withAgo(t string, now time.Time) string {
	at, err := time.Parse(time.RFC3339, t)
	if err != nil {
		return t
	}
	return t + " (" + ago(now.Sub(at)) + ")"
}

// appliedRevision is the applied revision and whether the node enforces the
// netmap the controller holds for it: "3 (current)", "2 (not current: desired
// 3)", "3 (not current: its netmap changed since)".
func (n nodeDetailJSON) appliedRevision() string {
	switch {
	case n.State == nodeStateRevoked:
		return fmt.Sprint(n.AppliedRevision)
	case n.Current:
		return fmt.Sprintf("%d (current)", n.AppliedRevision)
	case n.AppliedHash == "":
		return fmt.Sprintf("%d (not current: the agent has reported no netmap)", n.AppliedRevision)
	case n.AppliedRevision != n.DesiredRevision:
		return fmt.Sprintf("%d (not current: desired %d)", n.AppliedRevision, n.DesiredRevision)
	}
	return fmt.Sprintf("%d (not current: its netmap changed since)", n.AppliedRevision)
}

// lastApply is "TIME (12s ago), took 4.2ms"; "" before the first apply.
func (n nodeDetailJSON) lastApply(now time.Time) string {
	at, err := time.Parse(time.RFC3339, n.LastApplyAt)
	if err != nil {
		return ""
	}
	return fmt.Sprintf("%s (%s), took %v", n.LastApplyAt, ago(now.Sub(at)), time.Duration(n.LastApplyDurationUs)*time.Microsecond)
}

func (n nodeDetailJSON) desiredPeers() string {
	if n.DesiredPeers == nil {
		return ""
	}
	if len(n.DesiredPeers) == 0 {
		return "none"
	}
	return strings.Join(n.DesiredPeers, ", ")
}

// peersSummary is "2 in the kernel, 1 with a handshake in the last 3 minutes"
// ("70 in the kernel (6 not listed), ..." when the report left some out); ""
// before a report.
func (n nodeDetailJSON) peersSummary(now time.Time) string {
	if n.LastReportAt == "" {
		return ""
	}
	recent := 0
	for _, p := range n.Peers {
		if t, err := time.Parse(time.RFC3339, p.LastHandshakeAt); err == nil && now.Sub(t) < 3*time.Minute {
			recent++
		}
	}
	s := fmt.Sprintf("%d in the kernel", len(n.Peers)+int(n.PeersMore))
	switch {
	case n.PeersMore == 0:
	case recent > 0:
		// The agent lists the peers without a recent handshake first: those it
		// left out after a recent one all have one.
		s += fmt.Sprintf(" (%d not listed)", n.PeersMore)
		recent += int(n.PeersMore)
	default:
		return s + fmt.Sprintf(" (%d not listed), none of the %d listed with a handshake in the last 3 minutes", n.PeersMore, len(n.Peers))
	}
	return s + fmt.Sprintf(", %d with a handshake in the last 3 minutes", recent)
}

// missingPeers lists the desired peers the kernel does not hold, "none", or
// says why that is not known.
func (n nodeDetailJSON) missingPeers() string {
	switch {
	case n.MissingPeers == nil && n.DesiredPeers != nil && n.PeersMore > 0:
		return "unknown: the agent's report left peers out"
	case n.MissingPeers == nil:
		return ""
	case len(n.MissingPeers) == 0:
		return "none"
	}
	return strings.Join(n.MissingPeers, ", ")
}

// formatBytes prints n bytes as "512 B", "1.5 KiB", "3.2 MiB", "7.0 GiB"...
func formatBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
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
