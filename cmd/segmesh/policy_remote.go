package main

import (
	"cmp"
	"encoding/base64"
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/spf13/cobra"

	"segmesh/agent/firewall"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/api/wire"
	"segmesh/policy"
)

// Policy commands against the controller: history, rollback, render, and explain
// without a file or an inventory.

// revisionJSON is one revision in `policy history -o json`.
type revisionJSON struct {
	Revision     uint64 `json:"revision"`
	Applied      string `json:"applied,omitempty"` // RFC 3339, UTC
	AppliedBy    string `json:"applied_by,omitempty"`
	Filename     string `json:"filename,omitempty"`
	SHA256       string `json:"sha256,omitempty"` // of the policy file content, hex
	RestoredFrom uint64 `json:"restored_from,omitempty"`
	InForce      bool   `json:"in_force"`
	Error        string `json:"error,omitempty"`
}

// historyJSON is the shape of `policy history -o json`.
type historyJSON struct {
	ServingRevision uint64         `json:"serving_revision"`
	Revisions       []revisionJSON `json:"revisions"`
}

// shortHashLen is how many hex digits of a content hash the history table shows.
const shortHashLen = 12

func newPolicyHistoryCmd(g *globalFlags) *cobra.Command {
	return readCmd(&cobra.Command{
		Use:   "history",
		Short: "List the stored policy revisions: when, by whom, from which file, content hash",
		Long: `History lists every policy revision the controller stored, oldest first: when
it was applied and by whom, the file name, the first 12 hex digits of the SHA-256
of its content (equal hashes: equal files), and notes: the revision in force, the
revision a rollback restored, or why a stored record cannot be read.`,
		Args: cobra.NoArgs,
	}, func([]string) (any, func(io.Writer) error, error) {
		resp, err := invoke(g, "listing policy revisions", segmeshv1connect.OperatorServiceClient.ListPolicyRevisions,
			&segmeshv1.ListPolicyRevisionsRequest{})
		if err != nil {
			return nil, nil, err
		}
		h := historyJSON{ServingRevision: resp.GetServingRevision(), Revisions: []revisionJSON{}}
		for _, r := range resp.GetRevisions() {
			h.Revisions = append(h.Revisions, revisionJSON{
				Revision: r.GetRevision(), Applied: unixTime(r.GetAppliedUnix()), AppliedBy: r.GetAppliedBy(), Filename: r.GetFilename(),
				SHA256: r.GetSha256(), RestoredFrom: r.GetRestoredFrom(), InForce: r.GetRevision() == h.ServingRevision, Error: r.GetError(),
			})
		}
		return h, h.writeTable, nil
	})
}

func (h historyJSON) writeTable(w io.Writer) error {
	if len(h.Revisions) == 0 {
		_, err := fmt.Fprintln(w, "no policy has been applied yet (default deny)")
		return err
	}
	rows := make([][]string, 0, len(h.Revisions))
	for _, r := range h.Revisions {
		var notes []string
		if r.InForce {
			notes = append(notes, "in force")
		}
		if r.RestoredFrom != 0 {
			notes = append(notes, fmt.Sprintf("rollback to %d", r.RestoredFrom))
		}
		if r.Error != "" {
			notes = append(notes, "unreadable: "+r.Error)
		}
		rows = append(rows, []string{fmt.Sprint(r.Revision), r.Applied, r.AppliedBy, r.Filename,
			r.SHA256[:min(len(r.SHA256), shortHashLen)], strings.Join(notes, "; ")})
	}
	return writeTable(w, []string{"REVISION", "APPLIED", "BY", "FILE", "SHA256", "NOTE"}, rows)
}

func newPolicyRollbackCmd(g *globalFlags) *cobra.Command {
	var output *outFormat
	var wait *waitFlags
	cmd := &cobra.Command{
		Use:   "rollback REVISION [--wait [--timeout 2m]] [-o table|json|yaml]",
		Short: "Store the policy of an earlier revision as the next revision and distribute it",
		Long: `Rollback stores the content of REVISION as a new revision, after the same
checks as apply (it must compile against the current inventory and pass its tests
there), and distributes it. The history keeps every revision; the new one notes
the revision it restored. Prints the new revision. --wait waits as with apply
(exit 3 when some online node does not enforce it within --timeout).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var rev uint64
			if _, err := fmt.Sscan(args[0], &rev); err != nil || rev == 0 || fmt.Sprint(rev) != args[0] {
				return &exitError{code: 2, msg: fmt.Sprintf("segmesh: revision %q: want a revision number from `segmesh policy history`", args[0])}
			}
			if err := wait.check(cmd); err != nil {
				return err
			}
			resp, err := invoke(g, "rolling back policy", segmeshv1connect.OperatorServiceClient.RollbackPolicy,
				&segmeshv1.RollbackPolicyRequest{Revision: rev})
			if err != nil {
				return err
			}
			printWarnings(cmd.ErrOrStderr(), resp.GetWarnings())
			out := applyJSON{Revision: resp.GetRevision(), Unchanged: resp.GetUnchanged(), RestoredFrom: rev}
			return out.finish(cmd, g, *output, wait, func(w io.Writer) {
				if out.Unchanged {
					fmt.Fprintf(w, "unchanged: revision %d in force already holds the policy of revision %d\n", out.Revision, rev)
					return
				}
				fmt.Fprintf(w, "applied revision %d (the policy of revision %d)\n", out.Revision, rev)
			})
		},
	}
	output = addOutputFlag(cmd, "")
	wait = addWaitFlags(cmd)
	return cmd
}

// printWarnings prints the controller's warnings about an applied policy, each a
// "file:line:col: warning: message" line, as they are.
func printWarnings(w io.Writer, warnings []string) {
	for _, l := range warnings {
		fmt.Fprintln(w, l)
	}
}

// peerJSON is one WireGuard peer in `policy render -o json`.
type peerJSON struct {
	Name       string   `json:"name"`
	PublicKey  string   `json:"public_key"` // base64, as wg(8) prints it
	Endpoint   string   `json:"endpoint"`
	AllowedIPs []string `json:"allowed_ips"`
}

// renderJSON is the shape of `policy render -o json`.
type renderJSON struct {
	Node string `json:"node"`
	// Revision is the policy revision in force, or with --file the revision the
	// file would be stored as.
	Revision uint64 `json:"revision"`
	// NetmapRevision is the revision at which the node's netmap last changed.
	NetmapRevision uint64 `json:"netmap_revision"`
	Hash           string `json:"hash"`
	// File and Changed are set with --file: whether the file changes the node's netmap.
	File      string     `json:"file,omitempty"`
	Changed   *bool      `json:"changed,omitempty"`
	Addresses []string   `json:"addresses"`
	Peers     []peerJSON `json:"peers"`
	Interface string     `json:"interface"`
	Ruleset   string     `json:"ruleset"`
}

func newPolicyRenderCmd(g *globalFlags) *cobra.Command {
	var node, file, iface string
	cmd := readCmd(&cobra.Command{
		Use:   "render --node NAME [--file NEW.yaml] [-o table|json|yaml]",
		Short: "Show the exact WireGuard peers and nftables ruleset a node receives, before or after apply",
		Long: `Render asks the controller for the netmap of node NAME and prints its WireGuard
peers (name, public key, endpoint, allowed IPs) and the nftables ruleset the
agent programs from it, as ` + "`nft list table inet segmesh`" + ` prints it on the node.

Without --file it shows the netmap the controller distributes now. With --file
it compiles NEW.yaml against the controller's inventory, with the same checks as
apply, and shows what the node would receive (nothing is stored or distributed).
The file name is part of the rule comments: pass the name you apply it with.`,
		Args: cobra.NoArgs,
	}, func([]string) (any, func(io.Writer) error, error) {
		req := &segmeshv1.GetNetmapRequest{Node: node}
		if file != "" {
			_, data, err := parsePolicyFile(file)
			if err != nil {
				return nil, nil, err
			}
			req.Candidate = &segmeshv1.PolicyFile{Filename: file, Content: data}
		}
		resp, err := invoke(g, "reading netmap of node "+node, segmeshv1connect.OperatorServiceClient.GetNetmap, req)
		if err != nil {
			return nil, nil, err
		}
		out, err := toRenderJSON(resp, iface)
		if err != nil {
			return nil, nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: netmap of node %s: %v", node, err)}
		}
		if file != "" {
			out.File = file
			changed := resp.GetChanged()
			out.Changed = &changed
		}
		return out, out.writeText, nil
	})
	cmd.Flags().StringVar(&node, "node", "", "node name")
	cmd.Flags().StringVar(&file, "file", "", "policy file to preview instead of the policy in force")
	cmd.Flags().StringVar(&iface, "interface", "", "the node's overlay interface (default: the one its agent reported, else segmesh0)")
	_ = cmd.MarkFlagRequired("node")
	return cmd
}

// toRenderJSON renders r for interface iface; an empty iface means the interface the
// node's agent reported to the controller, else the agent's default, segmesh0.
func toRenderJSON(r *segmeshv1.GetNetmapResponse, iface string) (renderJSON, error) {
	if iface == "" {
		iface = cmp.Or(r.GetInterface(), "segmesh0")
	}
	nm := r.GetNetmap()
	f, err := wire.FilterFromProto(nm.GetFilter())
	if err != nil {
		return renderJSON{}, fmt.Errorf("invalid filter: %w", err)
	}
	table, err := firewall.Build(iface, f)
	if err != nil {
		return renderJSON{}, fmt.Errorf("rendering the ruleset for interface %q: %w", iface, err)
	}
	out := renderJSON{
		Node: nm.GetSelf().GetName(), Revision: r.GetRevision(), NetmapRevision: nm.GetPolicyRevision(), Hash: nm.GetHash(),
		Addresses: nm.GetSelf().GetAddresses(), Peers: []peerJSON{}, Interface: iface, Ruleset: table.String(),
	}
	if out.Addresses == nil {
		out.Addresses = []string{}
	}
	for _, p := range nm.GetPeers() {
		allowed := p.GetAllowedIps()
		if allowed == nil {
			allowed = []string{}
		}
		out.Peers = append(out.Peers, peerJSON{Name: p.GetName(), PublicKey: base64.StdEncoding.EncodeToString(p.GetPublicKey()),
			Endpoint: p.GetEndpoint(), AllowedIPs: allowed})
	}
	return out, nil
}

// writeText prints r for people: a header line, the addresses, the WireGuard peer
// table and the nftables ruleset.
func (r renderJSON) writeText(w io.Writer) error {
	if r.File == "" {
		fmt.Fprintf(w, "node %s at policy revision %d (its netmap last changed at revision %d; hash %s)\n", r.Node, r.Revision, r.NetmapRevision, r.Hash)
	} else {
		change := "unchanged from"
		if *r.Changed {
			change = "changed from"
		}
		fmt.Fprintf(w, "node %s if %s is applied as revision %d (netmap %s what the node has now; hash %s)\n", r.Node, r.File, r.Revision, change, r.Hash)
	}
	fmt.Fprintf(w, "addresses: %s\n\n", strings.Join(r.Addresses, ", "))
	fmt.Fprintf(w, "WireGuard peers (%d):\n", len(r.Peers))
	if len(r.Peers) > 0 {
		rows := make([][]string, 0, len(r.Peers))
		for _, p := range r.Peers {
			rows = append(rows, []string{p.Name, p.PublicKey, p.Endpoint, strings.Join(p.AllowedIPs, ",")})
		}
		if err := writeTable(w, []string{"NAME", "PUBLIC KEY", "ENDPOINT", "ALLOWED IPS"}, rows); err != nil {
			return err
		}
	}
	fmt.Fprintf(w, "\nnftables ruleset (interface %s):\n", r.Interface)
	_, err := io.WriteString(w, r.Ruleset)
	return err
}

// inventoryFromStatus converts the controller's node list to a policy inventory:
// names, labels and overlay addresses (the controller reports them as /32 and
// /128 prefixes). Revoked nodes are left out: they are in no netmap, so the
// policy selects them nowhere.
func inventoryFromStatus(nodes []*segmeshv1.NodeStatus) ([]policy.Node, error) {
	out := make([]policy.Node, 0, len(nodes))
	for _, n := range nodes {
		if n.GetState() == nodeStateRevoked {
			continue
		}
		pn := policy.Node{Name: n.GetName(), Labels: n.GetLabels()}
		for _, s := range n.GetAddresses() {
			p, err := netip.ParsePrefix(s)
			if err != nil || !p.IsSingleIP() {
				return nil, fmt.Errorf("node %s: address %q is not a single-address prefix", n.GetName(), s)
			}
			pn.Addresses = append(pn.Addresses, p.Addr())
		}
		out = append(out, pn)
	}
	return out, nil
}

// controllerInventory fetches the controller's nodes as a policy inventory.
func controllerInventory(g *globalFlags) ([]policy.Node, error) {
	resp, err := invoke(g, "listing nodes", segmeshv1connect.OperatorServiceClient.ListNodes, &segmeshv1.ListNodesRequest{})
	if err != nil {
		return nil, err
	}
	inv, err := inventoryFromStatus(resp.GetNodes())
	if err != nil {
		return nil, &exitError{code: 2, msg: "segmesh: " + err.Error()}
	}
	return inv, nil
}

// controllerPolicy fetches and parses the policy revision in force.
func controllerPolicy(g *globalFlags) (*policy.Policy, *segmeshv1.GetPolicyResponse, error) {
	resp, err := invoke(g, "reading the policy in force", segmeshv1connect.OperatorServiceClient.GetPolicy, &segmeshv1.GetPolicyRequest{})
	if err != nil {
		return nil, nil, err
	}
	p, err := policy.Parse(resp.GetFilename(), resp.GetContent())
	if err != nil {
		return nil, nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: policy revision %d in force does not parse here (is this segmesh older than the controller?):\n%v", resp.GetRevision(), err)}
	}
	return p, resp, nil
}

// withControllerSources makes the offline `policy explain FILE --inventory
// NODES.yaml` command also work against the controller: without FILE it explains
// the policy in force, without --inventory it uses the controller's nodes. Its
// table (text) and JSON output are the offline command's, and it takes -o yaml
// too; a line on stderr says what was fetched.
func withControllerSources(explain *cobra.Command, g *globalFlags) *cobra.Command {
	offline := explain.RunE
	explain.Use = "explain [FILE] [--inventory NODES.yaml] --from A --to B --port tcp/5432"
	explain.Args = cobra.RangeArgs(0, 1)
	explain.Long += `

Without FILE, explain uses the policy in force on the controller; without
--inventory, the controller's nodes (connection flags --controller and
--credentials). A line on stderr names what it fetched. Against the controller,
-o also takes yaml (the JSON document as YAML).`
	if f := explain.Flags().Lookup("inventory"); f != nil {
		delete(f.Annotations, cobra.BashCompOneRequiredFlag)
	}
	explain.RunE = func(cmd *cobra.Command, args []string) error {
		inventory, err := cmd.Flags().GetString("inventory")
		if err != nil {
			return err
		}
		if len(args) == 1 && inventory != "" {
			return offline(cmd, args)
		}
		output, err := parseOutputFormat(cmd.Flags().Lookup("output").Value.String())
		if err != nil {
			return err
		}
		var p *policy.Policy
		var source []string
		if len(args) == 1 {
			if p, _, err = parsePolicyFile(args[0]); err != nil {
				return asToolError(err)
			}
		} else {
			var got *segmeshv1.GetPolicyResponse
			if p, got, err = controllerPolicy(g); err != nil {
				return err
			}
			source = append(source, fmt.Sprintf("policy revision %d (%s) in force", got.GetRevision(), got.GetFilename()))
		}
		var nodes []policy.Node
		if inventory != "" {
			if nodes, err = readInventory(inventory, 2); err != nil {
				return err
			}
		} else {
			if nodes, err = controllerInventory(g); err != nil {
				return err
			}
			source = append(source, fmt.Sprintf("%d nodes", len(nodes)))
		}
		fmt.Fprintf(cmd.ErrOrStderr(), "# from the controller: %s\n", strings.Join(source, ", "))
		from, _ := cmd.Flags().GetString("from")
		to, _ := cmd.Flags().GetString("to")
		port, _ := cmd.Flags().GetString("port")
		x, err := policy.Explain(p, nodes, policy.Query{From: from, To: to, Packet: port})
		if err != nil {
			return &exitError{code: 2, msg: fmt.Sprintf("segmesh: explain: %v", err)}
		}
		// Printed as the offline command prints it (policy_tools.go).
		return output.write(cmd.OutOrStdout(), x, func(w io.Writer) error {
			_, err := io.WriteString(w, x.Text())
			return err
		})
	}
	return explain
}
