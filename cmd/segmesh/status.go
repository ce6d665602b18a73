package main

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"segmesh/api/segmeshv1"
	"segmesh/policy"
)

// nodeJSON is the JSON shape of one node in `status -o json` and `nodes list -o json`.
type nodeJSON struct {
	Name            string            `json:"name"`
	Labels          map[string]string `json:"labels"`
	Addresses       []string          `json:"addresses"`
	Online          bool              `json:"online"`
	DesiredRevision uint64            `json:"desired_revision"`
	AppliedRevision uint64            `json:"applied_revision"`
	// DesiredHash is the hash of the netmap the controller holds for the node;
	// AppliedHash the one the agent reports it programmed. Equal means converged.
	DesiredHash string   `json:"desired_hash,omitempty"`
	AppliedHash string   `json:"applied_hash,omitempty"`
	Dataplane   string   `json:"dataplane"`
	Endpoint    string   `json:"endpoint,omitempty"`
	PublicKey   string   `json:"public_key,omitempty"`
	LastSeen    string   `json:"last_seen,omitempty"` // RFC 3339
	AlivePeers  []string `json:"alive_peers"`
	Error       string   `json:"error,omitempty"`
}

// statusJSON is the shape of `status -o json`.
type statusJSON struct {
	// PolicyRevision is the latest stored revision; ServingRevision the one whose
	// netmaps the controller distributes (older when the latest is invalid, see
	// PolicyError).
	PolicyRevision  uint64     `json:"policy_revision"`
	ServingRevision uint64     `json:"serving_revision"`
	PolicyError     string     `json:"policy_error"`
	Nodes           []nodeJSON `json:"nodes"`
}

func toNodeJSON(n *segmeshv1.NodeStatus) nodeJSON {
	out := nodeJSON{
		Name: n.GetName(), Labels: n.GetLabels(), Addresses: n.GetAddresses(), Online: n.GetOnline(),
		DesiredRevision: n.GetDesiredRevision(), AppliedRevision: n.GetAppliedRevision(),
		DesiredHash: n.GetDesiredHash(), AppliedHash: n.GetAppliedHash(),
		Dataplane: n.GetDataplane(), Endpoint: n.GetEndpoint(), PublicKey: n.GetPublicKey(),
		AlivePeers: n.GetAlivePeers(), Error: n.GetError(),
	}
	if out.Labels == nil {
		out.Labels = map[string]string{}
	}
	if out.Addresses == nil {
		out.Addresses = []string{}
	}
	if out.AlivePeers == nil {
		out.AlivePeers = []string{}
	}
	if ts := n.GetLastSeenUnix(); ts > 0 {
		out.LastSeen = time.Unix(ts, 0).UTC().Format(time.RFC3339)
	}
	return out
}

func addOutputFlag(cmd *cobra.Command, out *string) {
	cmd.Flags().StringVarP(out, "output", "o", "table", "output format: table or json")
}

func checkOutput(out string) error {
	if out != "table" && out != "json" {
		return &exitError{code: 2, msg: fmt.Sprintf("segmesh: -o %q: want table or json", out)}
	}
	return nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func formatLabels(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, k+"="+m[k])
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ",")
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newStatusCmd(g *globalFlags) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the policy revision and, per node, desired vs applied revision, liveness and dataplane",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			client, err := operatorClient(g)
			if err != nil {
				return err
			}
			ctx, cancel := callContext()
			defer cancel()
			resp, err := client.Status(ctx, connect.NewRequest(&segmeshv1.StatusRequest{}))
			if err != nil {
				return callError("reading status", err)
			}
			st := statusJSON{PolicyRevision: resp.Msg.GetPolicyRevision(), ServingRevision: resp.Msg.GetServingRevision(),
				PolicyError: resp.Msg.GetPolicyError(), Nodes: []nodeJSON{}}
			for _, n := range resp.Msg.GetNodes() {
				st.Nodes = append(st.Nodes, toNodeJSON(n))
			}
			if output == "json" {
				return writeJSON(cmd.OutOrStdout(), st)
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "policy revision: %d", st.PolicyRevision)
			if st.ServingRevision != st.PolicyRevision {
				fmt.Fprintf(w, " (NOT IN FORCE: serving revision %d)", st.ServingRevision)
			}
			fmt.Fprintln(w)
			if st.PolicyError != "" {
				fmt.Fprintf(w, "policy error:\n  %s\n", strings.ReplaceAll(st.PolicyError, "\n", "\n  "))
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NODE\tONLINE\tDESIRED\tAPPLIED\tSYNC\tDATAPLANE\tADDRESSES\tENDPOINT\tALIVE PEERS\tERROR")
			for _, n := range st.Nodes {
				sync := "in sync"
				switch {
				case !n.Online:
					sync = "offline"
				case n.AppliedRevision != n.DesiredRevision:
					sync = "pending"
				}
				fmt.Fprintf(tw, "%s\t%t\t%d\t%d\t%s\t%s\t%s\t%s\t%d\t%s\n", n.Name, n.Online, n.DesiredRevision,
					n.AppliedRevision, sync, orDash(n.Dataplane), strings.Join(n.Addresses, ","), orDash(n.Endpoint),
					len(n.AlivePeers), orDash(n.Error))
			}
			return tw.Flush()
		},
	}
	addOutputFlag(cmd, &output)
	return cmd
}

func newNodesCmd(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "nodes", Short: "Inspect enrolled nodes"}
	var output string
	list := &cobra.Command{
		Use:   "list",
		Short: "List enrolled nodes with labels and overlay addresses",
		Long: `List prints the enrolled nodes. -o yaml prints them in the inventory format
(NODES.yaml) that the offline policy tools read with --inventory.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if output != "yaml" {
				if err := checkOutput(output); err != nil {
					return &exitError{code: 2, msg: fmt.Sprintf("segmesh: -o %q: want table, json or yaml", output)}
				}
			}
			client, err := operatorClient(g)
			if err != nil {
				return err
			}
			ctx, cancel := callContext()
			defer cancel()
			resp, err := client.ListNodes(ctx, connect.NewRequest(&segmeshv1.ListNodesRequest{}))
			if err != nil {
				return callError("listing nodes", err)
			}
			if output == "yaml" {
				inv, err := inventoryFromStatus(resp.Msg.GetNodes())
				if err != nil {
					return &exitError{code: 2, msg: "segmesh: " + err.Error()}
				}
				_, err = cmd.OutOrStdout().Write(policy.MarshalInventory(inv))
				return err
			}
			nodes := []nodeJSON{}
			for _, n := range resp.Msg.GetNodes() {
				nodes = append(nodes, toNodeJSON(n))
			}
			if output == "json" {
				return writeJSON(cmd.OutOrStdout(), nodes)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NODE\tLABELS\tADDRESSES\tENDPOINT\tONLINE")
			for _, n := range nodes {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%t\n", n.Name, formatLabels(n.Labels), strings.Join(n.Addresses, ","), orDash(n.Endpoint), n.Online)
			}
			return tw.Flush()
		},
	}
	list.Flags().StringVarP(&output, "output", "o", "table", "output format: table, json or yaml (inventory file)")
	cmd.AddCommand(list)
	return cmd
}
