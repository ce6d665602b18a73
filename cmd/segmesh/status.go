package main

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"connectrpc.com/connect"
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
	// Segments are the segments of the policy in force the node belongs to (those
	// a rule references), sorted.
	Segments []string `json:"segments"`
	// Version and Interface are the agent version and overlay interface its
	// stream named.
	Version   string `json:"version,omitempty"`
	Interface string `json:"interface,omitempty"`
	// LastApplyAt is when the agent's latest apply that changed the kernel
	// finished (RFC 3339 with milliseconds, by the agent's clock, never later
	// than the controller's); LastApplyDurationUs how long it took, µs.
	LastApplyAt         string `json:"last_apply_at,omitempty"`
	LastApplyDurationUs int64  `json:"last_apply_duration_us,omitempty"`
	// LastReportAt is when the controller received the agent's latest report.
	LastReportAt string `json:"last_report_at,omitempty"`
	// Controller is the controller replica the node's agent streams from (its
	// advertised host:port); omitted when offline or from a controller that
	// predates it.
	Controller string `json:"controller,omitempty"`
	// Peers are the WireGuard peers as the node's kernel holds them, as its
	// agent last reported (nodes list and nodes show; status leaves them out):
	// at most 64, those without a handshake in 3 minutes first; PeersMore
	// counts those left out.
	Peers     []wgPeerJSON `json:"peers,omitempty"`
	PeersMore uint32       `json:"peers_more,omitempty"`
}

// wgPeerJSON is one WireGuard peer as a node's kernel holds it.
type wgPeerJSON struct {
	// Name is the peer's node name; empty for a key the node's netmap does not
	// name.
	Name      string `json:"name"`
	PublicKey string `json:"public_key"` // base64
	Endpoint  string `json:"endpoint,omitempty"`
	// LastHandshakeAt is the latest handshake (RFC 3339); omitted when none.
	LastHandshakeAt string `json:"last_handshake_at,omitempty"`
	RxBytes         uint64 `json:"rx_bytes"`
	TxBytes         uint64 `json:"tx_bytes"`
	// Path is "direct" or "relay" (through node Relay); omitted when unknown.
	Path  string `json:"path,omitempty"`
	Relay string `json:"relay,omitempty"`
}

// pathText is the PATH column of a WireGuard peer: "direct", "relay via R"
// ("relay" when the relay is unknown), or "-" when the agent did not say.
func (p wgPeerJSON) pathText() string {
	switch {
	case p.Path == "relay" && p.Relay != "":
		return "relay via " + p.Relay
	case p.Path == "":
		return "-"
	}
	return p.Path
}

func toWGPeersJSON(ps []*segmeshv1.PeerStatus) []wgPeerJSON {
	if len(ps) == 0 {
		return nil
	}
	out := make([]wgPeerJSON, 0, len(ps))
	for _, p := range ps {
		out = append(out, wgPeerJSON{Name: p.GetName(), PublicKey: p.GetPublicKey(), Endpoint: p.GetEndpoint(),
			LastHandshakeAt: unixTime(p.GetLastHandshakeUnix()), RxBytes: p.GetRxBytes(), TxBytes: p.GetTxBytes(), Path: p.GetPath(), Relay: p.GetRelay()})
	}
	return out
}

// unixMilliTime formats Unix milliseconds as RFC 3339 in UTC with milliseconds;
// 0 is "".
func unixMilliTime(ms int64) string {
	if ms == 0 {
		return ""
	}
	return time.UnixMilli(ms).UTC().Format("2006-01-02T15:04:05.000Z07:00")
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
	NodesActive  uint32 `json:"nodes_active"`
	NodesOnline  uint32 `json:"nodes_online"`
	NodesCurrent uint32 `json:"nodes_current"`
	// Store is the store the controller keeps its state in, as it names it:
	// "bbolt /var/lib/segmesh/controller.db" or "etcd
	// https://10.0.0.1:2379,... (prefix /segmesh/)"; empty from a controller that
	// predates it.
	Store string `json:"store"`
	// Controller is the name of the replica that answered (its advertise URL's
	// host:port unless set); Controllers the URLs of the replicas sharing the
	// store, that one first (only its own URL with bbolt). Empty from a
	// controller that predates them.
	Controller  string     `json:"controller"`
	Controllers []string   `json:"controllers"`
	Nodes       []nodeJSON `json:"nodes"`
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
		Segments: n.GetSegments(), Version: n.GetVersion(), Interface: n.GetInterface(),
		LastApplyAt: unixMilliTime(n.GetLastApplyUnixMs()), LastApplyDurationUs: n.GetLastApplyDurationUs(),
		LastReportAt: unixTime(n.GetLastReportUnix()), Controller: n.GetController(), Peers: toWGPeersJSON(n.GetPeers()), PeersMore: n.GetPeersMore(),
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
	if out.Segments == nil {
		out.Segments = []string{}
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

// driftRepairs is "N" or "N, the last at TIME (2m ago)" for `nodes show`.
func (n nodeJSON) driftRepairs(now time.Time) string {
	if n.Drift.LastRepairAt == "" {
		return fmt.Sprint(n.Drift.Repairs)
	}
	return fmt.Sprintf("%d, the last at %s", n.Drift.Repairs, withAgo(n.Drift.LastRepairAt, now))
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

// Defaults and limits of status --watch.
const (
	defaultWatchInterval = 2 * time.Second
	minWatchInterval     = 500 * time.Millisecond
)

func newStatusCmd(g *globalFlags) *cobra.Command {
	var watch bool
	var interval time.Duration
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the policy revision and, per node, state, desired vs applied revision, sync, drift repairs, liveness and dataplane",
		Long: `Status prints the policy revision in force, how many active nodes enforce it,
and one line per node (see ` + "`segmesh nodes show NAME`" + ` for one node in depth).

--watch prints the status again every --interval until interrupted (Ctrl-C or
SIGTERM, exit 0). On a terminal it redraws in place; otherwise (a pipe, a file)
it prints each refresh after a blank line (-o yaml: after a "---" line). A
refresh the controller does not answer (unreachable, busy) shows the error and
the next one tries again; a refused one (an unknown or revoked credential, a
role that may not read) ends the command.`,
		Args: cobra.NoArgs,
	}
	output := addOutputFlag(cmd, "")
	cmd.Flags().BoolVarP(&watch, "watch", "w", false, "print the status again every --interval until interrupted, in place on a terminal")
	cmd.Flags().DurationVar(&interval, "interval", defaultWatchInterval, "how often --watch refreshes (at least "+minWatchInterval.String()+")")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if !watch {
			if cmd.Flags().Changed("interval") {
				return &exitError{code: 2, msg: "segmesh: --interval only applies with --watch"}
			}
			cs, err := dialControllers(g)
			if err != nil {
				return err
			}
			st, err := fetchStatus(cmd.Context(), cs)
			if err != nil {
				return callError("reading status", err)
			}
			now := time.Now()
			return output.write(cmd.OutOrStdout(), st, func(w io.Writer) error { return st.writeTable(w, now) })
		}
		if interval < minWatchInterval {
			return &exitError{code: 2, msg: fmt.Sprintf("segmesh: --interval %v: want at least %v, e.g. 2s", interval, minWatchInterval)}
		}
		cs, err := dialControllers(g)
		if err != nil {
			return err
		}
		ctx, stop := watchContext(cmd.Context())
		defer stop()
		out := cmd.OutOrStdout()
		v := statusWatch{out: out, errOut: cmd.ErrOrStderr(), tty: isTerminal(out), interval: interval, format: *output, now: time.Now,
			fetch: func(ctx context.Context) (statusJSON, error) { return fetchStatus(ctx, cs) }}
		return v.run(ctx)
	}
	return cmd
}

// fetchStatus calls Status on the controllers in turn (controllerSet.call, each
// try under requestTimeout) and returns it in its JSON shape.
func fetchStatus(ctx context.Context, cs *controllerSet) (statusJSON, error) {
	var resp *connect.Response[segmeshv1.StatusResponse]
	err := cs.call(ctx, func(ctx context.Context, c segmeshv1connect.OperatorServiceClient) error {
		var err error
		resp, err = c.Status(ctx, connect.NewRequest(&segmeshv1.StatusRequest{}))
		return err
	})
	if err != nil {
		return statusJSON{}, err
	}
	return toStatusJSON(resp.Msg), nil
}

// toStatusJSON is m in its JSON shape (empty lists as [], not null).
func toStatusJSON(m *segmeshv1.StatusResponse) statusJSON {
	st := statusJSON{PolicyRevision: m.GetPolicyRevision(), ServingRevision: m.GetServingRevision(),
		PolicyError: m.GetPolicyError(), NodesActive: m.GetNodesActive(), NodesOnline: m.GetNodesOnline(),
		NodesCurrent: m.GetNodesCurrent(), Store: m.GetStore(), Controller: m.GetController(),
		Controllers: m.GetControllers(), Nodes: toNodesJSON(m.GetNodes())}
	if st.Controllers == nil {
		st.Controllers = []string{}
	}
	return st
}

// watchContext returns a context that ends at Ctrl-C (SIGINT) or SIGTERM, and
// the function that stops listening for them.
func watchContext(parent context.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(parent, os.Interrupt, syscall.SIGTERM)
}

// statusWatch is status --watch: fetch, print, wait interval, until the context
// ends.
type statusWatch struct {
	out, errOut io.Writer
	// tty redraws in place: cursor home, each line cleared to its end, the rest
	// of the screen cleared (no flicker, unlike clearing the whole screen first).
	tty      bool
	interval time.Duration
	format   outFormat
	now      func() time.Time
	fetch    func(ctx context.Context) (statusJSON, error)
}

// run refreshes until ctx ends, then returns nil. A call that may succeed later
// (retryable) shows its error in place of the status; any other error ends the
// watch with callError's exit code.
func (v statusWatch) run(ctx context.Context) error {
	t := time.NewTicker(v.interval)
	defer t.Stop()
	for n := 0; ; n++ {
		st, err := v.fetch(ctx)
		if ctx.Err() != nil {
			return nil
		}
		var frame bytes.Buffer
		switch {
		case err != nil && !retryable(err):
			return callError("reading status", err)
		case err != nil:
			msg := callError("reading status", err).Error() + fmt.Sprintf(" (retrying every %v)", v.interval)
			if v.tty {
				fmt.Fprintln(&frame, msg)
			} else {
				fmt.Fprintln(v.errOut, msg)
			}
		default:
			now := v.now()
			if err := v.format.write(&frame, st, func(w io.Writer) error { return st.writeTable(w, now) }); err != nil {
				return err
			}
		}
		if err := v.draw(frame.Bytes(), n == 0); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// draw writes one refresh: on a terminal in place under a header line ("Every 2s:
// segmesh status" and the time, as watch(1) has it); elsewhere after a separator
// from the previous one.
func (v statusWatch) draw(frame []byte, first bool) error {
	var b bytes.Buffer
	if v.tty {
		if first {
			b.WriteString("\x1b[H\x1b[2J")
		}
		b.WriteString("\x1b[H")
		fmt.Fprintf(&b, "Every %v: segmesh status    %s\x1b[K\n\x1b[K\n", v.interval, v.now().UTC().Format(time.RFC3339))
		b.Write(bytes.ReplaceAll(frame, []byte("\n"), []byte("\x1b[K\n")))
		b.WriteString("\x1b[J")
	} else {
		switch {
		case first || len(frame) == 0:
		case v.format == formatYAML:
			b.WriteString("---\n")
		default:
			b.WriteString("\n")
		}
		b.Write(frame)
	}
	_, err := v.out.Write(b.Bytes())
	return err
}

// progress is the status line on distribution: "revision 7: 998/1000 active
// nodes enforce it (999 online)".
func (st statusJSON) progress() string {
	return fmt.Sprintf("revision %d: %d/%d active nodes enforce it (%d online)", st.ServingRevision, st.NodesCurrent, st.NodesActive, st.NodesOnline)
}

// controllersLine is the "controller:" line of the table: the replica that
// answered and, when there are several, every replica's URL ("10.0.0.1:7443 (3
// replicas: https://10.0.0.1:7443, https://10.0.0.2:7443,
// https://10.0.0.3:7443)"); "" when the controller names neither.
func (st statusJSON) controllersLine() string {
	all := strings.Join(st.Controllers, ", ")
	switch {
	case st.Controller == "":
		return all
	case len(st.Controllers) > 1:
		return fmt.Sprintf("%s (%d replicas: %s)", st.Controller, len(st.Controllers), all)
	}
	return st.Controller
}

func (st statusJSON) writeTable(w io.Writer, now time.Time) error {
	fmt.Fprintf(w, "policy revision: %d", st.PolicyRevision)
	if st.ServingRevision != st.PolicyRevision {
		fmt.Fprintf(w, " (NOT IN FORCE: serving revision %d)", st.ServingRevision)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, st.progress())
	if st.Store != "" {
		fmt.Fprintf(w, "store: %s\n", st.Store)
	}
	if c := st.controllersLine(); c != "" {
		fmt.Fprintf(w, "controller: %s\n", c)
	}
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
