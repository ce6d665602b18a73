package main

import (
	"cmp"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// Node states as NodeStatus.state reports them.
const (
	nodeStateActive  = "active"
	nodeStateRevoked = "revoked"
)

// nodeJSON is the JSON (and YAML) shape of one node in `status`, `nodes list` and
// `nodes show`. Times are RFC 3339 in UTC, omitted when unknown.
type nodeJSON struct {
	Name string `json:"name"`
	// State is "active" or "revoked".
	State           string            `json:"state"`
	Labels          map[string]string `json:"labels"`
	Addresses       []string          `json:"addresses"`
	Online          bool              `json:"online"`
	DesiredRevision uint64            `json:"desired_revision"`
	AppliedRevision uint64            `json:"applied_revision"`
	// DesiredHash is the hash of the netmap the controller holds for the node;
	// AppliedHash the one the agent reports it programmed. Equal means converged.
	DesiredHash   string   `json:"desired_hash,omitempty"`
	AppliedHash   string   `json:"applied_hash,omitempty"`
	Dataplane     string   `json:"dataplane"`
	Endpoint      string   `json:"endpoint,omitempty"`
	PublicKey     string   `json:"public_key,omitempty"` // base64
	LastSeen      string   `json:"last_seen,omitempty"`
	EnrolledAt    string   `json:"enrolled_at,omitempty"`
	CertExpiresAt string   `json:"cert_expires_at,omitempty"` // the node's current client certificate
	RevokedAt     string   `json:"revoked_at,omitempty"`
	RevokedBy     string   `json:"revoked_by,omitempty"` // operator credential name
	AlivePeers    []string `json:"alive_peers"`
	Error         string   `json:"error,omitempty"`
	// Sync is the SYNC column (see syncState).
	Sync string `json:"sync"`
	// InSync is what the agent last reported: its latest read-back of the kernel
	// found exactly the desired state.
	InSync bool      `json:"in_sync"`
	Drift  driftJSON `json:"drift"`
}

// driftJSON is the drift an agent found and repaired since it started, as it
// reported it (lists bounded by the controller; *_more counts what was left out).
type driftJSON struct {
	// Repairs counts the applies that restored drift.
	Repairs      uint64           `json:"repairs"`
	LastRepairAt string           `json:"last_repair_at,omitempty"`
	LastRepaired []differenceJSON `json:"last_repaired"`
	// LastRepairedMore counts the differences of the last repair not listed.
	LastRepairedMore uint32 `json:"last_repaired_more,omitempty"`
	// Unrepaired is drift found and not repaired yet (a repair failed, or the
	// kernel changed again right after an apply).
	Unrepaired     []differenceJSON `json:"unrepaired"`
	UnrepairedMore uint32           `json:"unrepaired_more,omitempty"`
}

// differenceJSON is one way a node's kernel differed from its desired dataplane.
type differenceJSON struct {
	// Part is "interface", "wireguard", "peer", "address", "route" or "nftables".
	Part   string `json:"part"`
	Detail string `json:"detail"`
}

func toDifferencesJSON(ds []*segmeshv1.DriftDifference) []differenceJSON {
	out := make([]differenceJSON, 0, len(ds))
	for _, d := range ds {
		out = append(out, differenceJSON{Part: d.GetPart(), Detail: d.GetDetail()})
	}
	return out
}

// joinDifferences prints ds as "part: detail; part: detail; … and N more".
func joinDifferences(ds []differenceJSON, more uint32) string {
	parts := make([]string, 0, len(ds)+1)
	for _, d := range ds {
		parts = append(parts, d.Part+": "+d.Detail)
	}
	if more > 0 {
		parts = append(parts, fmt.Sprintf("… and %d more", more))
	}
	return strings.Join(parts, "; ")
}

// statusJSON is the shape of `status -o json`.
type statusJSON struct {
	// PolicyRevision is the latest stored revision; ServingRevision the one whose
	// netmaps the controller distributes (older when the latest is invalid, see
	// PolicyError).
	PolicyRevision  uint64 `json:"policy_revision"`
	ServingRevision uint64 `json:"serving_revision"`
	PolicyError     string `json:"policy_error"`
	// Distribution of the serving revision, as the controller counts it: active
	// (not revoked) nodes, of them those online, and those whose agent last
	// reported the hash of the netmap the controller holds for them (a node that
	// went offline after such a report still counts).
	NodesActive  uint32     `json:"nodes_active"`
	NodesOnline  uint32     `json:"nodes_online"`
	NodesCurrent uint32     `json:"nodes_current"`
	Nodes        []nodeJSON `json:"nodes"`
}

func toNodeJSON(n *segmeshv1.NodeStatus) nodeJSON {
	out := nodeJSON{
		Name: n.GetName(), State: cmp.Or(n.GetState(), nodeStateActive), Labels: n.GetLabels(), Addresses: n.GetAddresses(),
		Online: n.GetOnline(), DesiredRevision: n.GetDesiredRevision(), AppliedRevision: n.GetAppliedRevision(),
		DesiredHash: n.GetDesiredHash(), AppliedHash: n.GetAppliedHash(),
		Dataplane: n.GetDataplane(), Endpoint: n.GetEndpoint(), PublicKey: n.GetPublicKey(),
		LastSeen: unixTime(n.GetLastSeenUnix()), EnrolledAt: unixTime(n.GetEnrolledUnix()), CertExpiresAt: unixTime(n.GetCertExpiresUnix()),
		RevokedAt: unixTime(n.GetRevokedUnix()), RevokedBy: n.GetRevokedBy(),
		AlivePeers: n.GetAlivePeers(), Error: n.GetError(), InSync: n.GetInSync(),
	}
	d := n.GetDrift()
	out.Drift = driftJSON{Repairs: d.GetRepairs(), LastRepairAt: unixTime(d.GetLastRepairUnix()),
		LastRepaired: toDifferencesJSON(d.GetLastRepaired()), LastRepairedMore: d.GetLastRepairedMore(),
		Unrepaired: toDifferencesJSON(d.GetUnrepaired()), UnrepairedMore: d.GetUnrepairedMore()}
	out.Sync = out.syncState()
	if out.Labels == nil {
		out.Labels = map[string]string{}
	}
	if out.Addresses == nil {
		out.Addresses = []string{}
	}
	if out.AlivePeers == nil {
		out.AlivePeers = []string{}
	}
	return out
}

func toNodesJSON(nodes []*segmeshv1.NodeStatus) []nodeJSON {
	out := make([]nodeJSON, 0, len(nodes))
	for _, n := range nodes {
		out = append(out, toNodeJSON(n))
	}
	return out
}

// syncState says whether the node's kernel holds the netmap the controller holds
// for it, checked in this order: "" for a revoked node, "offline", "error" (the
// agent reports an error: see ERROR), "pending" (the agent has not applied the
// node's latest netmap yet), "drift" (the agent's latest read-back found the kernel
// differing from it, or the agent did not say it read back), and "in sync" only
// when the agent's latest read-back found exactly the desired state.
func (n nodeJSON) syncState() string {
	switch {
	case n.State == nodeStateRevoked:
		return ""
	case !n.Online:
		return "offline"
	case n.Error != "":
		return "error"
	case n.AppliedRevision != n.DesiredRevision, n.DesiredHash != "" && n.AppliedHash != n.DesiredHash:
		return "pending"
	case !n.InSync:
		return "drift"
	}
	return "in sync"
}

// driftCell is the DRIFT column: the number of repairs and how long before now
// the latest one was ("3 (2m ago)"), "0" without repairs, plus "+N unrepaired"
// while drift waits for a repair; "" for a revoked node.
func (n nodeJSON) driftCell(now time.Time) string {
	if n.State == nodeStateRevoked {
		return ""
	}
	d := n.Drift
	cell := fmt.Sprint(d.Repairs)
	if t, err := time.Parse(time.RFC3339, d.LastRepairAt); err == nil && d.Repairs > 0 {
		cell += " (" + ago(now.Sub(t)) + ")"
	}
	if u := len(d.Unrepaired) + int(d.UnrepairedMore); u > 0 {
		cell += fmt.Sprintf(" +%d unrepaired", u)
	}
	return cell
}

// driftRepairs is "N" or "N, the last at TIME" for `nodes show`.
func (n nodeJSON) driftRepairs() string {
	if n.Drift.LastRepairAt == "" {
		return fmt.Sprint(n.Drift.Repairs)
	}
	return fmt.Sprintf("%d, the last at %s", n.Drift.Repairs, n.Drift.LastRepairAt)
}

// ago prints d as "45s ago", "2m ago", "5h ago" or "3d ago" (rounded down; a
// negative d, from clocks apart, is "0s ago").
func ago(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", max(0, int(d/time.Second)))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d/time.Minute))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d/time.Hour))
	}
	return fmt.Sprintf("%dd ago", int(d/(24*time.Hour)))
}

func formatLabels(m map[string]string) string {
	parts := make([]string, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, k+"="+m[k])
	}
	return strings.Join(parts, ",")
}

func newStatusCmd(g *globalFlags) *cobra.Command {
	return readCmd(&cobra.Command{
		Use:   "status",
		Short: "Show the policy revision and, per node, state, desired vs applied revision, sync, drift repairs, liveness and dataplane",
		Args:  cobra.NoArgs,
	}, func([]string) (any, func(io.Writer) error, error) {
		resp, err := invoke(g, "reading status", segmeshv1connect.OperatorServiceClient.Status, &segmeshv1.StatusRequest{})
		if err != nil {
			return nil, nil, err
		}
		st := statusJSON{PolicyRevision: resp.GetPolicyRevision(), ServingRevision: resp.GetServingRevision(),
			PolicyError: resp.GetPolicyError(), NodesActive: resp.GetNodesActive(), NodesOnline: resp.GetNodesOnline(),
			NodesCurrent: resp.GetNodesCurrent(), Nodes: toNodesJSON(resp.GetNodes())}
		now := time.Now()
		return st, func(w io.Writer) error { return st.writeTable(w, now) }, nil
	})
}

// progress is the status line on distribution: "revision 7: 998/1000 active
// nodes enforce it (999 online)".
func (st statusJSON) progress() string {
	return fmt.Sprintf("revision %d: %d/%d active nodes enforce it (%d online)", st.ServingRevision, st.NodesCurrent, st.NodesActive, st.NodesOnline)
}

func (st statusJSON) writeTable(w io.Writer, now time.Time) error {
	fmt.Fprintf(w, "policy revision: %d", st.PolicyRevision)
	if st.ServingRevision != st.PolicyRevision {
		fmt.Fprintf(w, " (NOT IN FORCE: serving revision %d)", st.ServingRevision)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, st.progress())
	if st.PolicyError != "" {
		fmt.Fprintf(w, "policy error:\n  %s\n", strings.ReplaceAll(st.PolicyError, "\n", "\n  "))
	}
	rows := make([][]string, 0, len(st.Nodes))
	for _, n := range st.Nodes {
		rows = append(rows, []string{n.Name, n.State, fmt.Sprint(n.Online), fmt.Sprint(n.DesiredRevision), fmt.Sprint(n.AppliedRevision),
			n.Sync, n.driftCell(now), n.Dataplane, strings.Join(n.Addresses, ","), n.Endpoint, fmt.Sprint(len(n.AlivePeers)), n.Error})
	}
	return writeTable(w, []string{"NODE", "STATE", "ONLINE", "DESIRED", "APPLIED", "SYNC", "DRIFT", "DATAPLANE", "ADDRESSES", "ENDPOINT", "ALIVE_PEERS", "ERROR"}, rows)
}
