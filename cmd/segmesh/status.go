package main

import (
	"cmp"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

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
		Name: n.GetName(), State: cmp.Or(n.GetState(), nodeStateActive), Labels: n.GetLabels(), Addresses: n.GetAddresses(),
		Online: n.GetOnline(), DesiredRevision: n.GetDesiredRevision(), AppliedRevision: n.GetAppliedRevision(),
		DesiredHash: n.GetDesiredHash(), AppliedHash: n.GetAppliedHash(),
		Dataplane: n.GetDataplane(), Endpoint: n.GetEndpoint(), PublicKey: n.GetPublicKey(),
		LastSeen: unixTime(n.GetLastSeenUnix()), EnrolledAt: unixTime(n.GetEnrolledUnix()), CertExpiresAt: unixTime(n.GetCertExpiresUnix()),
		RevokedAt: unixTime(n.GetRevokedUnix()), RevokedBy: n.GetRevokedBy(),
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
	return out
}

func toNodesJSON(nodes []*segmeshv1.NodeStatus) []nodeJSON {
	out := make([]nodeJSON, 0, len(nodes))
	for _, n := range nodes {
		out = append(out, toNodeJSON(n))
	}
	return out
}

// syncState says whether the node enforces the netmap the controller holds for it.
func (n nodeJSON) syncState() string {
	switch {
	case n.State == nodeStateRevoked:
		return ""
	case !n.Online:
		return "offline"
	case n.AppliedRevision != n.DesiredRevision:
		return "pending"
	}
	return "in sync"
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
		Short: "Show the policy revision and, per node, state, desired vs applied revision, liveness and dataplane",
		Args:  cobra.NoArgs,
	}, func([]string) (any, func(io.Writer) error, error) {
		resp, err := invoke(g, "reading status", segmeshv1connect.OperatorServiceClient.Status, &segmeshv1.StatusRequest{})
		if err != nil {
			return nil, nil, err
		}
		st := statusJSON{PolicyRevision: resp.GetPolicyRevision(), ServingRevision: resp.GetServingRevision(),
			PolicyError: resp.GetPolicyError(), Nodes: toNodesJSON(resp.GetNodes())}
		return st, st.writeTable, nil
	})
}

func (st statusJSON) writeTable(w io.Writer) error {
	fmt.Fprintf(w, "policy revision: %d", st.PolicyRevision)
	if st.ServingRevision != st.PolicyRevision {
		fmt.Fprintf(w, " (NOT IN FORCE: serving revision %d)", st.ServingRevision)
	}
	fmt.Fprintln(w)
	if st.PolicyError != "" {
		fmt.Fprintf(w, "policy error:\n  %s\n", strings.ReplaceAll(st.PolicyError, "\n", "\n  "))
	}
	rows := make([][]string, 0, len(st.Nodes))
	for _, n := range st.Nodes {
		rows = append(rows, []string{n.Name, n.State, fmt.Sprint(n.Online), fmt.Sprint(n.DesiredRevision), fmt.Sprint(n.AppliedRevision),
			n.syncState(), n.Dataplane, strings.Join(n.Addresses, ","), n.Endpoint, fmt.Sprint(len(n.AlivePeers)), n.Error})
	}
	return writeTable(w, []string{"NODE", "STATE", "ONLINE", "DESIRED", "APPLIED", "SYNC", "DATAPLANE", "ADDRESSES", "ENDPOINT", "ALIVE_PEERS", "ERROR"}, rows)
}
