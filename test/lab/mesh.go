package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Binary names Mesh expects in its BinDir.
const (
	ControllerBin = "segmesh-controller"
	AgentBin      = "segmesh-agent"
	CLIBin        = "segmesh"
	ProbeBin      = "probe"
)

// ControllerPort is the port the lab's controller listens on.
const ControllerPort = 7443

// CLITimeout bounds one CLI call.
const CLITimeout = 20 * time.Second

// Probe server ports every node serves (see hack/probe).
var (
	ProbeTCPPorts = []int{22, 5432, 8080}
	ProbeUDPPorts = []int{514}
)

// NodeSpec is a node to create: its name, the labels its join token binds and,
// optionally, the NAT it sits behind.
type NodeSpec struct {
	Name   string
	Labels map[string]string
	// NAT names one of MeshOptions.NATs to put the node's host behind (several
	// nodes may share one); empty means the public underlay.
	NAT string
}

// ExampleNodes are the five hosts the demo and the end-to-end tests run with
// examples/policy.yaml: web-1 and web-2 {role: web}, api-1 {role: api},
// db-1 {role: db}, ops-1 {role: ops}.
func ExampleNodes() []NodeSpec {
	return []NodeSpec{
		{Name: "web-1", Labels: map[string]string{"role": "web"}},
		{Name: "web-2", Labels: map[string]string{"role": "web"}},
		{Name: "api-1", Labels: map[string]string{"role": "api"}},
		{Name: "db-1", Labels: map[string]string{"role": "db"}},
		{Name: "ops-1", Labels: map[string]string{"role": "ops"}},
	}
}

// ExampleNATs is the NAT scenario of `make demo-nat` (hack/lab -nat): the
// ExampleNodes with web-1 and web-2 behind two different port-preserving NATs
// (home-a, home-b), api-1 behind a symmetric NAT (corp), db-1 behind a 1:1 NAT
// (cloud) and ops-1 on the public underlay.
func ExampleNATs() ([]NATSpec, []NodeSpec) {
	nats := []NATSpec{
		{Name: "home-a", Kind: NATPortPreserving},
		{Name: "home-b", Kind: NATPortPreserving},
		{Name: "corp", Kind: NATSymmetric},
		{Name: "cloud", Kind: NATOneToOne},
	}
	nodes := ExampleNodes()
	for i, nat := range []string{"home-a", "home-b", "corp", "cloud"} {
		nodes[i].NAT = nat
	}
	return nats, nodes
}

// MeshOptions configure NewMesh.
type MeshOptions struct {
	Options
	// BinDir holds segmesh-controller, segmesh-agent, segmesh and probe (see Build).
	BinDir string
	// NATs are the NAT routers to create before the nodes (see NAT); nodes
	// join them with NodeSpec.NAT.
	NATs []NATSpec
	// Nodes to create hosts for, in order; each gets a probe server at once.
	Nodes []NodeSpec
	// AgentArgs are appended to every agent command line (e.g. "--log-level", "debug").
	AgentArgs []string
	// ControllerArgs are appended to the controller command line (of every
	// replica with HA).
	ControllerArgs []string
	// HA is the number of controller replicas: 0 or 1 is one controller host
	// ("controller", ControllerAddr) with its bbolt store; 2 to MaxHA (3 for a
	// real quorum) are hosts "controller-1".."controller-N" at 192.0.2.1 up, each
	// running an etcd member and a segmesh-controller with --store etcd sharing
	// the cluster (see ha.go); agents and the CLI then get every replica's URL.
	HA int
}

// Mesh is a Lab running segmesh: a controller host ("controller", 192.0.2.1), or
// with MeshOptions.HA the replica hosts "controller-1".. (192.0.2.1, .2, ...),
// and one host per node, each with a probe server: on the public underlay
// (192.0.2.11, .12, ... in order) or behind a NAT router (its next free private
// address).
type Mesh struct {
	Lab    *Lab
	BinDir string
	// Controller is the controller's host (controller-1's with HA);
	// ControllerProc its process once started.
	Controller     *Host
	ControllerProc *Process
	// DataDir is the controller's data directory; Credentials its operator.json
	// (controller-1's with HA: every replica's holds the same CA and token).
	DataDir     string
	Credentials string
	// URL is the controller's URL (controller-1's with HA).
	URL string
	// Controllers are the controller replicas in order: one without HA (the
	// fields above), MeshOptions.HA with it.
	Controllers []*ControllerReplica
	// SecretKeyFile is the controllers' shared --secret-key-file with HA (64 hex
	// digits, mode 0600, in the lab directory); empty without HA.
	SecretKeyFile string

	opts        MeshOptions
	nodes       []*Node
	etcdCluster string     // etcd's --initial-cluster with HA
	haMu        sync.Mutex // guards ControllerReplica's down flags
}

// Node is one segmesh node of a Mesh.
type Node struct {
	Name   string
	Labels map[string]string
	Host   *Host
	// NAT is the name of the NAT the node was created behind ("": public); see
	// Host.Underlay for where it sits now.
	NAT string
	// Interface is the node's overlay interface name (unique machine-wide).
	Interface string
	StateDir  string
	// Agent is the agent process once StartAgent ran; Probe the probe server.
	Agent *Process
	Probe *Process
	// Revoked is set by a test that revoked or deleted the node: Cells and
	// WaitConverged leave it out.
	Revoked bool
}

// Info returns the node as the policy evaluator sees it (the labels the lab bound).
func (n *Node) Info() NodeInfo { return NodeInfo{Name: n.Name, Labels: n.Labels} }

// NewMesh creates a lab with a controller host and one host per node, and starts a
// probe server on every node host. Nothing of segmesh runs yet. On error the lab
// is closed.
func NewMesh(ctx context.Context, opts MeshOptions) (*Mesh, error) {
	if opts.HA < 0 || opts.HA > MaxHA {
		return nil, fmt.Errorf("creating mesh: HA %d: want 0 or 1 (one controller) up to %d replicas", opts.HA, MaxHA)
	}
	bins := []string{ControllerBin, AgentBin, CLIBin, ProbeBin}
	if opts.HA > 1 {
		bins = append(bins, EtcdBin)
	}
	for _, b := range bins {
		if _, err := os.Stat(filepath.Join(opts.BinDir, b)); err != nil {
			return nil, fmt.Errorf("creating mesh: binary %s: %w (build with lab.Build)", b, err)
		}
	}
	nats := map[string]bool{}
	for _, n := range opts.NATs {
		nats[n.Name] = true
	}
	for _, spec := range opts.Nodes {
		if spec.NAT != "" && !nats[spec.NAT] {
			return nil, fmt.Errorf("creating mesh: node %s is behind NAT %q, which MeshOptions.NATs does not define", spec.Name, spec.NAT)
		}
	}
	l, err := New(ctx, opts.Options)
	if err != nil {
		return nil, err
	}
	m := &Mesh{Lab: l, BinDir: opts.BinDir, opts: opts}
	if err := m.init(ctx); err != nil {
		l.Close()
		return nil, err
	}
	return m, nil
}

func (m *Mesh) init(ctx context.Context) error {
	if err := m.initControllers(ctx); err != nil {
		return err
	}
	for _, spec := range m.opts.NATs {
		if _, err := m.Lab.AddNAT(ctx, spec); err != nil {
			return err
		}
	}
	addr := FirstNodeAddr
	for _, spec := range m.opts.Nodes {
		var h *Host
		var err error
		if spec.NAT != "" {
			h, err = m.Lab.AddHostBehind(ctx, spec.Name, m.Lab.NAT(spec.NAT), netip.Addr{})
		} else {
			h, err = m.Lab.AddHost(ctx, spec.Name, addr)
			addr = addr.Next()
		}
		if err != nil {
			return err
		}
		n := &Node{
			Name:      spec.Name,
			Labels:    maps.Clone(spec.Labels),
			Host:      h,
			NAT:       spec.NAT,
			Interface: m.Lab.InterfaceName(h.Index),
			StateDir:  filepath.Join(h.Dir, "state"),
		}
		m.Lab.ReserveInterface(n.Interface)
		n.Probe, err = h.Start("probe", m.Bin(ProbeBin), "serve",
			"--tcp", joinInts(ProbeTCPPorts), "--udp", joinInts(ProbeUDPPorts))
		if err != nil {
			return err
		}
		m.nodes = append(m.nodes, n)
	}
	return nil
}

func joinInts(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ",")
}

// Close closes the lab; see Lab.Close.
func (m *Mesh) Close() error { return m.Lab.Close() }

// Bin returns the path of a binary in BinDir.
func (m *Mesh) Bin(name string) string { return filepath.Join(m.BinDir, name) }

// Nodes returns the mesh's nodes in creation order.
func (m *Mesh) Nodes() []*Node { return slices.Clone(m.nodes) }

// Node returns the node called name, or nil.
func (m *Mesh) Node(name string) *Node {
	for _, n := range m.nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// StartController starts segmesh-controller on the controller host and waits
// until it has written its operator credentials and answers `segmesh status`.
// With HA it starts the etcd cluster and then every replica (see startReplicas).
func (m *Mesh) StartController(ctx context.Context) error {
	if m.HA() > 0 {
		return m.startReplicas(ctx)
	}
	args := append([]string{m.Bin(ControllerBin),
		"--data-dir", m.DataDir,
		"--listen", netip.AddrPortFrom(ControllerAddr, ControllerPort).String(),
	}, m.opts.ControllerArgs...)
	p, err := m.Controller.Start("controller", args...)
	if err != nil {
		return err
	}
	m.ControllerProc = p
	m.Controllers[0].Proc = p
	return m.WaitControllerReady(ctx, 30*time.Second)
}

// WaitControllerReady waits until the controller answers `segmesh status`; it
// fails at once if the controller process has exited. With HA it waits for every
// replica not killed with KillController.
func (m *Mesh) WaitControllerReady(ctx context.Context, timeout time.Duration) error {
	if m.HA() > 0 {
		for _, r := range m.Controllers {
			m.haMu.Lock()
			down := r.controllerDown
			m.haMu.Unlock()
			if down {
				continue
			}
			if err := m.WaitReplicaReady(ctx, r.Index, timeout); err != nil {
				return err
			}
		}
		return nil
	}
	err := WaitFor(ctx, timeout, func(ctx context.Context) (bool, error) {
		if !m.ControllerProc.Running() {
			return false, Abort(fmt.Errorf("controller exited (%v); log %s:\n%s", m.ControllerProc.Err(), m.ControllerProc.LogPath, tail(m.ControllerProc.Log(), 20)))
		}
		if _, err := os.Stat(m.Credentials); err != nil {
			return false, err
		}
		_, err := m.Status(ctx)
		return err == nil, err
	})
	if err != nil {
		return fmt.Errorf("waiting for the controller: %w", err)
	}
	return nil
}

// CLI runs the segmesh CLI in the controller's namespace (controller-1's with
// HA) with the mesh's --controller (every replica's URL, comma-separated, with
// HA) and --credentials and returns its standard output.
func (m *Mesh) CLI(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, CLITimeout)
	defer cancel()
	full := append([]string{m.Bin(CLIBin), "--controller", strings.Join(m.ControllerURLs(), ","), "--credentials", m.Credentials}, args...)
	return m.Controller.Exec(ctx, full...)
}

// CreateToken runs `segmesh token create` with labels (and --reusable) and
// returns the token.
func (m *Mesh) CreateToken(ctx context.Context, labels map[string]string, reusable bool) (string, error) {
	args := []string{"token", "create"}
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		args = append(args, "--label", k+"="+labels[k])
	}
	if reusable {
		args = append(args, "--reusable")
	}
	out, err := m.CLI(ctx, args...)
	if err != nil {
		return "", fmt.Errorf("creating token: %w", err)
	}
	tok := strings.TrimSpace(out)
	if tok == "" || strings.ContainsAny(tok, " \n") {
		return "", fmt.Errorf("creating token: want only the token on stdout, got %q", out)
	}
	return tok, nil
}

// TokenFile is where StartAgent keeps the node's join token (mode 0600), so that
// the token never appears on a command line.
func (n *Node) TokenFile() string { return filepath.Join(n.Host.Dir, "join-token") }

// WriteToken stores token in TokenFile with mode 0600.
func (n *Node) WriteToken(token string) error {
	if err := os.WriteFile(n.TokenFile(), []byte(token+"\n"), 0o600); err != nil {
		return fmt.Errorf("writing the join token of %s: %w", n.Name, err)
	}
	return nil
}

// AgentCommand is the command line that runs the agent of n with its join token
// in TokenFile (--controller lists every replica's URL, comma-separated, with HA).
func (m *Mesh) AgentCommand(n *Node) []string {
	return append([]string{m.Bin(AgentBin),
		"--controller", strings.Join(m.ControllerURLs(), ","),
		"--token-file", n.TokenFile(),
		"--state-dir", n.StateDir,
		"--interface", n.Interface,
		"--name", n.Name,
	}, m.opts.AgentArgs...)
}

// StartAgent starts the agent of n with token. Close will stop it and then call
// AgentDown.
func (m *Mesh) StartAgent(n *Node, token string) error {
	if n.Agent != nil {
		return fmt.Errorf("starting agent on %s: already started; use n.Agent.Restart", n.Name)
	}
	if err := n.WriteToken(token); err != nil {
		return err
	}
	p, err := n.Host.Start("agent", m.AgentCommand(n)...)
	if err != nil {
		return err
	}
	n.Agent = p
	m.Lab.OnClose(func(ctx context.Context) error { return m.AgentDown(ctx, n) })
	return nil
}

// AgentDown runs `segmesh-agent down --state-dir DIR` in the node's namespace (the
// agent should be stopped) and then checks that neither the overlay interface nor
// the nftables table inet segmesh is left. A failing `down` with nothing left
// behind (an agent that never enrolled) is not an error.
func (m *Mesh) AgentDown(ctx context.Context, n *Node) error {
	_, downErr := n.Host.Exec(ctx, m.Bin(AgentBin), "down", "--state-dir", n.StateDir)
	var left []string
	if _, err := n.Host.Exec(ctx, "ip", "link", "show", "dev", n.Interface); err == nil {
		left = append(left, "interface "+n.Interface)
	}
	if _, err := n.Host.Exec(ctx, "nft", "list", "table", "inet", "segmesh"); err == nil {
		left = append(left, "nftables table inet segmesh")
	}
	if len(left) > 0 {
		return fmt.Errorf("segmesh-agent down on %s left %s behind (down: %v)", n.Name, strings.Join(left, " and "), downErr)
	}
	return nil
}

// EnrollAll creates one single-use token per node with the node's labels and
// starts every node's agent.
func (m *Mesh) EnrollAll(ctx context.Context) error {
	for _, n := range m.nodes {
		tok, err := m.CreateToken(ctx, n.Labels, false)
		if err != nil {
			return err
		}
		if err := m.StartAgent(n, tok); err != nil {
			return err
		}
	}
	return nil
}

// ApplyPolicy runs `segmesh policy apply path` and returns the revision it printed.
func (m *Mesh) ApplyPolicy(ctx context.Context, path string) (uint64, error) {
	out, err := m.CLI(ctx, "policy", "apply", path)
	if err != nil {
		return 0, fmt.Errorf("applying policy %s: %w", path, err)
	}
	rev, err := parseRevision(out)
	if err != nil {
		return 0, fmt.Errorf("applying policy %s: %w", path, err)
	}
	return rev, nil
}

// parseRevision finds the revision number in `policy apply` output: the output
// itself or its last number ("applied revision 3").
func parseRevision(out string) (uint64, error) {
	fields := strings.FieldsFunc(out, func(r rune) bool { return r < '0' || r > '9' })
	if len(fields) == 0 {
		return 0, fmt.Errorf("no revision in output %q", out)
	}
	return strconv.ParseUint(fields[len(fields)-1], 10, 64)
}

// Status is the JSON printed by `segmesh status -o json`.
type Status struct {
	PolicyRevision uint64 `json:"policy_revision"`
	// NodesActive, NodesOnline and NodesCurrent are the controller's counts of
	// the active nodes, those online, and those enforcing their desired netmap.
	NodesActive  uint32       `json:"nodes_active"`
	NodesOnline  uint32       `json:"nodes_online"`
	NodesCurrent uint32       `json:"nodes_current"`
	Nodes        []NodeStatus `json:"nodes"`
	// Store, Controllers and Controller are the store the answering controller
	// uses, the URLs of the replicas sharing it and its own name, when the CLI
	// prints them.
	Store       string   `json:"store"`
	Controllers []string `json:"controllers"`
	Controller  string   `json:"controller"`
}

// NodeStatus is one node of Status.
type NodeStatus struct {
	Name            string            `json:"name"`
	Labels          map[string]string `json:"labels"`
	Addresses       []string          `json:"addresses"`
	Online          bool              `json:"online"`
	DesiredRevision uint64            `json:"desired_revision"`
	AppliedRevision uint64            `json:"applied_revision"`
	Dataplane       string            `json:"dataplane"`
	Endpoint        string            `json:"endpoint"`
	PublicKey       string            `json:"public_key"`
	Error           string            `json:"error"`
	// DesiredHash and AppliedHash are the netmap hashes, when the CLI prints them.
	DesiredHash string `json:"desired_hash"`
	AppliedHash string `json:"applied_hash"`
	// Controller is the replica the node's agent streams from (its Name), when
	// the CLI prints it.
	Controller string `json:"controller"`
}

// Node returns the status of the node called name, or nil.
func (s *Status) Node(name string) *NodeStatus {
	for i := range s.Nodes {
		if s.Nodes[i].Name == name {
			return &s.Nodes[i]
		}
	}
	return nil
}

// Addr returns the node's overlay address of family 4 or 6.
func (n *NodeStatus) Addr(family int) (netip.Addr, bool) {
	for _, s := range n.Addresses {
		a, err := netip.ParseAddr(s)
		if err != nil {
			p, perr := netip.ParsePrefix(s)
			if perr != nil {
				continue
			}
			a = p.Addr()
		}
		if a.Is4() == (family == 4) {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// Status runs `segmesh status -o json`.
func (m *Mesh) Status(ctx context.Context) (*Status, error) {
	out, err := m.CLI(ctx, "status", "-o", "json")
	if err != nil {
		return nil, err
	}
	var st Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return nil, fmt.Errorf("decoding status %q: %w", out, err)
	}
	return &st, nil
}

// WaitConverged waits until every node whose agent was started is in status,
// online, has both overlay addresses and applied_revision == policy_revision
// (and, when minRevision > 0, policy_revision >= minRevision), and, when status
// carries netmap hashes, applied_hash == desired_hash. It fails at once
// if an agent or the controller exited.
func (m *Mesh) WaitConverged(ctx context.Context, minRevision uint64, timeout time.Duration) (*Status, error) {
	var last *Status
	err := WaitFor(ctx, timeout, func(ctx context.Context) (bool, error) {
		if err := m.checkRunning(); err != nil {
			return false, Abort(err)
		}
		st, err := m.Status(ctx)
		if err != nil {
			return false, err
		}
		last = st
		if st.PolicyRevision < minRevision {
			return false, fmt.Errorf("policy revision %d, want >= %d", st.PolicyRevision, minRevision)
		}
		var pending []string
		for _, n := range m.nodes {
			if n.Agent == nil || n.Revoked {
				continue
			}
			ns := st.Node(n.Name)
			_, has4 := ns.addrOK(4)
			_, has6 := ns.addrOK(6)
			switch {
			case ns == nil:
				pending = append(pending, n.Name+": not enrolled")
			case !ns.Online:
				pending = append(pending, n.Name+": offline")
			case ns.AppliedRevision != st.PolicyRevision:
				pending = append(pending, fmt.Sprintf("%s: applied revision %d (error %q)", n.Name, ns.AppliedRevision, ns.Error))
			case ns.DesiredHash != "" && ns.AppliedHash != ns.DesiredHash:
				// Same revision, newer netmap (e.g. a peer enrolled after the apply).
				pending = append(pending, fmt.Sprintf("%s: applied netmap %.12s, desired %.12s", n.Name, ns.AppliedHash, ns.DesiredHash))
			case !has4 || !has6:
				pending = append(pending, fmt.Sprintf("%s: addresses %v", n.Name, ns.Addresses))
			}
		}
		if len(pending) > 0 {
			return false, fmt.Errorf("policy revision %d; not converged: %s", st.PolicyRevision, strings.Join(pending, "; "))
		}
		return true, nil
	})
	if err != nil {
		return last, fmt.Errorf("waiting for every node to apply the policy: %w", err)
	}
	return last, nil
}

// addrOK is Addr that tolerates a nil receiver.
func (n *NodeStatus) addrOK(family int) (netip.Addr, bool) {
	if n == nil {
		return netip.Addr{}, false
	}
	return n.Addr(family)
}

// checkRunning returns an error naming the first started segmesh process that exited.
func (m *Mesh) checkRunning() error {
	procs := m.runningProcs()
	for _, n := range m.nodes {
		procs = append(procs, n.Agent)
	}
	for _, p := range procs {
		if p != nil && !p.Running() {
			return fmt.Errorf("%s on %s exited (%v); log %s:\n%s", p.Name, p.Host.Name, p.Err(), p.LogPath, tail(p.Log(), 20))
		}
	}
	return nil
}

// Up runs the whole demo sequence: start the controller, enroll every node with
// its own token, apply the policy at path and wait (up to timeout) until every
// node is online and enforces the policy's revision.
func (m *Mesh) Up(ctx context.Context, policyPath string, timeout time.Duration) (*Status, error) {
	if err := m.StartController(ctx); err != nil {
		return nil, err
	}
	if err := m.EnrollAll(ctx); err != nil {
		return nil, err
	}
	rev, err := m.ApplyPolicy(ctx, policyPath)
	if err != nil {
		return nil, err
	}
	return m.WaitConverged(ctx, rev, timeout)
}

// WireGuardPeers returns the public keys (base64) of the peers configured on the
// node's overlay interface, read with `wg show IFACE peers`.
func (m *Mesh) WireGuardPeers(ctx context.Context, n *Node) ([]string, error) {
	out, err := n.Host.Exec(ctx, "wg", "show", n.Interface, "peers")
	if err != nil {
		return nil, err
	}
	return strings.Fields(out), nil
}

// WireGuardPublicKey returns the node's own public key (base64) from `wg show IFACE public-key`.
func (m *Mesh) WireGuardPublicKey(ctx context.Context, n *Node) (string, error) {
	out, err := n.Host.Exec(ctx, "wg", "show", n.Interface, "public-key")
	if err != nil {
		return "", err
	}
	k := strings.TrimSpace(out)
	if k == "" {
		return "", errors.New("empty public key")
	}
	return k, nil
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
