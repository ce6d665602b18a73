package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// EtcdBin is the etcd server binary (hack/etcd) a mesh with MeshOptions.HA > 1
// expects in its BinDir.
const EtcdBin = "etcd"

// Ports of the lab's etcd members (etcd's IANA ports), on each controller host's
// underlay address.
const (
	EtcdClientPort = 2379
	EtcdPeerPort   = 2380
)

// MaxHA is the largest MeshOptions.HA: controller hosts take 192.0.2.1 up to
// 192.0.2.9, below the node hosts (FirstNodeAddr).
const MaxHA = 9

// PartitionTable is the nftables table (family inet) Partition loads into a
// controller host's namespace.
const PartitionTable = "smlab_partition"

// The lab's etcd timing (milliseconds): faster than etcd's defaults (100 and
// 1000 are the defaults too for the heartbeat; the election timeout is etcd's
// default) so that a lost leader is replaced within about a second.
const (
	etcdHeartbeatMS = 100
	etcdElectionMS  = 1000
)

// ControllerReplica is one controller of a mesh: with MeshOptions.HA > 1 one of
// the hosts "controller-1".."controller-N" (192.0.2.1 up), each running an etcd
// member and a segmesh-controller with --store etcd; with HA 0 or 1 the single
// controller host (Etcd then stays nil).
type ControllerReplica struct {
	// Index numbers replicas from 1 (controller-1 is Mesh.Controllers[0]).
	Index int
	Host  *Host
	// Proc is the segmesh-controller process once started; Etcd the etcd member
	// once StartEtcd ran (nil without HA).
	Proc *Process
	Etcd *Process
	// URL is the replica's advertised URL, https://192.0.2.I:7443.
	URL string
	// DataDir is the replica's own --data-dir; Credentials its operator.json.
	DataDir     string
	Credentials string
	// EtcdName ("etcd-I"), EtcdDataDir (in the host directory), EtcdClientURL
	// (http://192.0.2.I:2379) and EtcdPeerURL (http://192.0.2.I:2380) describe
	// the replica's etcd member.
	EtcdName      string
	EtcdDataDir   string
	EtcdClientURL string
	EtcdPeerURL   string

	// Guarded by Mesh.haMu: the controller or the etcd member was stopped on
	// purpose (KillController, StopEtcdMember), so checkRunning ignores it.
	controllerDown bool
	etcdDown       bool
}

// Name is the replica's name as the controller reports it in
// StatusResponse.controller when none is set: its advertise URL's host:port.
func (r *ControllerReplica) Name() string { return strings.TrimPrefix(r.URL, "https://") }

// HA reports the number of controller replicas sharing an etcd cluster (0 or 1:
// one controller with its bbolt store).
func (m *Mesh) HA() int {
	if m.opts.HA > 1 {
		return m.opts.HA
	}
	return 0
}

// ControllerURLs returns every replica's URL in replica order, as the mesh passes
// them (comma-separated) to agents and to the CLI.
func (m *Mesh) ControllerURLs() []string {
	urls := make([]string, len(m.Controllers))
	for i, r := range m.Controllers {
		urls[i] = r.URL
	}
	return urls
}

// Replica returns controller replica i (from 1), or nil.
func (m *Mesh) Replica(i int) *ControllerReplica {
	if i < 1 || i > len(m.Controllers) {
		return nil
	}
	return m.Controllers[i-1]
}

// replicaAddr is the underlay address of controller replica i: 192.0.2.i.
func replicaAddr(i int) netip.Addr {
	a := ControllerAddr
	for range i - 1 {
		a = a.Next()
	}
	return a
}

// initControllers creates the controller host(s) and fills m.Controllers (and
// the single-controller fields, which point at controller-1).
func (m *Mesh) initControllers(ctx context.Context) error {
	n := m.HA()
	if n == 0 {
		ctl, err := m.Lab.AddHost(ctx, "controller", ControllerAddr)
		if err != nil {
			return err
		}
		dataDir := filepath.Join(ctl.Dir, "data")
		m.Controllers = []*ControllerReplica{{
			Index: 1, Host: ctl, DataDir: dataDir, Credentials: filepath.Join(dataDir, "operator.json"),
			URL: "https://" + netip.AddrPortFrom(ControllerAddr, ControllerPort).String(),
		}}
	} else {
		var cluster []string
		for i := 1; i <= n; i++ {
			addr := replicaAddr(i)
			h, err := m.Lab.AddHost(ctx, "controller-"+strconv.Itoa(i), addr)
			if err != nil {
				return err
			}
			dataDir := filepath.Join(h.Dir, "data")
			r := &ControllerReplica{
				Index: i, Host: h, DataDir: dataDir, Credentials: filepath.Join(dataDir, "operator.json"),
				URL:           "https://" + netip.AddrPortFrom(addr, ControllerPort).String(),
				EtcdName:      "etcd-" + strconv.Itoa(i),
				EtcdDataDir:   filepath.Join(h.Dir, "etcd"),
				EtcdClientURL: "http://" + netip.AddrPortFrom(addr, EtcdClientPort).String(),
				EtcdPeerURL:   "http://" + netip.AddrPortFrom(addr, EtcdPeerPort).String(),
			}
			cluster = append(cluster, r.EtcdName+"="+r.EtcdPeerURL)
			m.Controllers = append(m.Controllers, r)
		}
		m.etcdCluster = strings.Join(cluster, ",")
		m.SecretKeyFile = filepath.Join(m.Lab.Dir, "controller-secret.key")
		var key [32]byte
		if _, err := rand.Read(key[:]); err != nil {
			return fmt.Errorf("generating the controllers' secret key: %w", err)
		}
		if err := os.WriteFile(m.SecretKeyFile, []byte(hex.EncodeToString(key[:])+"\n"), 0o600); err != nil {
			return fmt.Errorf("writing the controllers' secret key: %w", err)
		}
	}
	c1 := m.Controllers[0]
	m.Controller, m.DataDir, m.Credentials, m.URL = c1.Host, c1.DataDir, c1.Credentials, c1.URL
	return nil
}

// EtcdEndpoints returns every etcd member's client URL, comma-separated, as the
// controllers' --etcd-endpoints.
func (m *Mesh) EtcdEndpoints() string {
	var eps []string
	for _, r := range m.Controllers {
		eps = append(eps, r.EtcdClientURL)
	}
	return strings.Join(eps, ",")
}

// etcdArgs is the command line of replica r's etcd member; state is "new" for
// the first start of the cluster and "existing" for a restart.
func (m *Mesh) etcdArgs(r *ControllerReplica, state string) []string {
	return []string{m.Bin(EtcdBin),
		"--name", r.EtcdName,
		"--data-dir", r.EtcdDataDir,
		"--listen-client-urls", r.EtcdClientURL,
		"--advertise-client-urls", r.EtcdClientURL,
		"--listen-peer-urls", r.EtcdPeerURL,
		"--initial-advertise-peer-urls", r.EtcdPeerURL,
		"--initial-cluster", m.etcdCluster,
		"--initial-cluster-state", state,
		"--initial-cluster-token", "smlab-" + m.Lab.ID,
		"--heartbeat-interval", strconv.Itoa(etcdHeartbeatMS),
		"--election-timeout", strconv.Itoa(etcdElectionMS),
		"--log-level", "warn",
	}
}

// StartEtcd starts every replica's etcd member (a new cluster of HA members)
// and waits up to 30 s until each reports itself healthy. It fails without HA.
func (m *Mesh) StartEtcd(ctx context.Context) error {
	if m.HA() == 0 {
		return errors.New("starting etcd: the mesh has a single controller (set MeshOptions.HA to 3)")
	}
	for _, r := range m.Controllers {
		if r.Etcd != nil {
			return fmt.Errorf("starting etcd: %s already started; use StartEtcdMember", r.EtcdName)
		}
		p, err := r.Host.Start("etcd", m.etcdArgs(r, "new")...)
		if err != nil {
			return err
		}
		r.Etcd = p
	}
	return m.WaitEtcdHealthy(ctx, 30*time.Second)
}

// etcdHTTP makes one request to the etcd member of replica r from inside r's
// namespace (so that Partition does not hide it) and returns the body of a 200
// answer. body nil is a GET, otherwise a POST of JSON (etcd's gRPC gateway).
func (m *Mesh) etcdHTTP(ctx context.Context, r *ControllerReplica, path string, body []byte) ([]byte, error) {
	addr := netip.AddrPortFrom(r.Host.Addr, EtcdClientPort)
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return r.Host.DialTCP(ctx, addr) },
	}}
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	method, rd := http.MethodGet, io.Reader(nil)
	if body != nil {
		method, rd = http.MethodPost, bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, r.EtcdClientURL+path, rd)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("asking %s %s: %w", r.EtcdName, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("asking %s %s: %w", r.EtcdName, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return b, fmt.Errorf("asking %s %s: %s: %s", r.EtcdName, path, resp.Status, bytes.TrimSpace(b))
	}
	return b, nil
}

// EtcdHealthy asks etcd member i (from 1) for its /health endpoint, which is
// healthy only when the member has a leader and a linearizable read through it
// succeeds (so a member cut off from the quorum is unhealthy). It returns nil
// when healthy, else why not.
func (m *Mesh) EtcdHealthy(ctx context.Context, i int) error {
	r := m.Replica(i)
	if r == nil || r.Etcd == nil {
		return fmt.Errorf("etcd member %d: not started", i)
	}
	b, err := m.etcdHTTP(ctx, r, "/health", nil)
	if err != nil {
		return err
	}
	var h struct {
		Health string `json:"health"`
		Reason string `json:"reason"`
	}
	if err := json.Unmarshal(b, &h); err != nil {
		return fmt.Errorf("%s /health: %q: %w", r.EtcdName, b, err)
	}
	if h.Health != "true" {
		return fmt.Errorf("%s unhealthy: %s", r.EtcdName, strings.TrimSpace(h.Reason+" "+string(b)))
	}
	return nil
}

// WaitEtcdHealthy waits up to timeout until every etcd member not stopped with
// StopEtcdMember is healthy (see EtcdHealthy); it fails at once when a member's
// process exited.
func (m *Mesh) WaitEtcdHealthy(ctx context.Context, timeout time.Duration) error {
	err := WaitFor(ctx, timeout, func(ctx context.Context) (bool, error) {
		for _, r := range m.Controllers {
			if m.isEtcdDown(r) {
				continue
			}
			if r.Etcd != nil && !r.Etcd.Running() {
				return false, Abort(exited(r.Etcd))
			}
			if err := m.EtcdHealthy(ctx, r.Index); err != nil {
				return false, err
			}
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("waiting for the etcd cluster to be healthy: %w", err)
	}
	return nil
}

// EtcdRevision returns the store revision etcd member i (from 1) holds, from its
// own Maintenance.Status (no quorum needed): a member that is behind shows an
// older revision than the others.
func (m *Mesh) EtcdRevision(ctx context.Context, i int) (int64, error) {
	r := m.Replica(i)
	if r == nil || r.Etcd == nil {
		return 0, fmt.Errorf("etcd member %d: not started", i)
	}
	b, err := m.etcdHTTP(ctx, r, "/v3/maintenance/status", []byte("{}"))
	if err != nil {
		return 0, err
	}
	var st struct {
		Header struct {
			Revision json.Number `json:"revision"`
		} `json:"header"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return 0, fmt.Errorf("%s status %q: %w", r.EtcdName, b, err)
	}
	rev, err := strconv.ParseInt(st.Header.Revision.String(), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s status: revision %q: %w", r.EtcdName, st.Header.Revision, err)
	}
	return rev, nil
}

// StopEtcdMember stops etcd member i (SIGTERM, SIGKILL after 5 s); its data dir
// stays for StartEtcdMember.
func (m *Mesh) StopEtcdMember(i int) error {
	r := m.Replica(i)
	if r == nil || r.Etcd == nil {
		return fmt.Errorf("stopping etcd member %d: not started", i)
	}
	m.setDown(func() { r.etcdDown = true })
	return r.Etcd.Stop(5 * time.Second)
}

// StartEtcdMember restarts etcd member i with its data dir and
// --initial-cluster-state existing, and waits up to 30 s until it is healthy
// (it has rejoined the cluster and serves linearizable reads).
func (m *Mesh) StartEtcdMember(ctx context.Context, i int) error {
	r := m.Replica(i)
	if r == nil || r.Etcd == nil {
		return fmt.Errorf("starting etcd member %d: never started (use StartEtcd)", i)
	}
	if r.Etcd.Running() {
		return fmt.Errorf("starting etcd member %d: already running", i)
	}
	r.Etcd.Args = m.etcdArgs(r, "existing")
	if err := r.Etcd.Restart(); err != nil {
		return err
	}
	m.setDown(func() { r.etcdDown = false })
	err := WaitFor(ctx, 30*time.Second, func(ctx context.Context) (bool, error) {
		if !r.Etcd.Running() {
			return false, Abort(exited(r.Etcd))
		}
		err := m.EtcdHealthy(ctx, i)
		return err == nil, err
	})
	if err != nil {
		return fmt.Errorf("waiting for %s to rejoin: %w", r.EtcdName, err)
	}
	return nil
}

// replicaArgs is the command line of replica r's controller.
func (m *Mesh) replicaArgs(r *ControllerReplica) []string {
	args := []string{m.Bin(ControllerBin),
		"--data-dir", r.DataDir,
		"--listen", netip.AddrPortFrom(r.Host.Addr, ControllerPort).String(),
	}
	if m.HA() > 0 {
		args = append(args,
			"--advertise-url", r.URL,
			"--store", "etcd",
			"--etcd-endpoints", m.EtcdEndpoints(),
			"--secret-key-file", m.SecretKeyFile,
		)
	}
	return append(args, m.opts.ControllerArgs...)
}

// startReplicas starts etcd (with HA) and every controller replica: controller-1
// first (it creates the CA and the admin credential in the store), then the
// others; it waits until each answers `segmesh status`.
func (m *Mesh) startReplicas(ctx context.Context) error {
	if m.HA() > 0 {
		if err := m.StartEtcd(ctx); err != nil {
			return err
		}
	}
	for _, r := range m.Controllers {
		p, err := r.Host.Start("controller", m.replicaArgs(r)...)
		if err != nil {
			return err
		}
		r.Proc = p
		if r.Index == 1 {
			m.ControllerProc = p
		}
		if err := m.WaitReplicaReady(ctx, r.Index, 30*time.Second); err != nil {
			return err
		}
	}
	return nil
}

// WaitReplicaReady waits until replica i has written its operator credentials
// and answers `segmesh status` on its own URL; it fails at once if the process
// has exited.
func (m *Mesh) WaitReplicaReady(ctx context.Context, i int, timeout time.Duration) error {
	r := m.Replica(i)
	if r == nil || r.Proc == nil {
		return fmt.Errorf("waiting for controller %d: not started", i)
	}
	err := WaitFor(ctx, timeout, func(ctx context.Context) (bool, error) {
		if !r.Proc.Running() {
			return false, Abort(exited(r.Proc))
		}
		if _, err := os.Stat(r.Credentials); err != nil {
			return false, err
		}
		_, err := m.ReplicaCLI(ctx, i, "status", "-o", "json")
		return err == nil, err
	})
	if err != nil {
		return fmt.Errorf("waiting for controller %s: %w", r.Host.Name, err)
	}
	return nil
}

// ReplicaCLI runs the segmesh CLI in replica i's namespace against that replica
// only (--controller its URL, --credentials its operator.json) and returns its
// standard output.
func (m *Mesh) ReplicaCLI(ctx context.Context, i int, args ...string) (string, error) {
	r := m.Replica(i)
	if r == nil {
		return "", fmt.Errorf("segmesh CLI: no controller replica %d", i)
	}
	ctx, cancel := context.WithTimeout(ctx, CLITimeout)
	defer cancel()
	full := append([]string{m.Bin(CLIBin), "--controller", r.URL, "--credentials", r.Credentials}, args...)
	return r.Host.Exec(ctx, full...)
}

// ReplicaStatus runs `segmesh status -o json` against replica i only.
func (m *Mesh) ReplicaStatus(ctx context.Context, i int) (*Status, error) {
	out, err := m.ReplicaCLI(ctx, i, "status", "-o", "json")
	if err != nil {
		return nil, err
	}
	var st Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return nil, fmt.Errorf("decoding status of controller %d %q: %w", i, out, err)
	}
	return &st, nil
}

// KillController sends SIGKILL to replica i's controller (kill -9) and waits
// until it is reaped; checkRunning (WaitConverged) then ignores it until
// RestartController.
func (m *Mesh) KillController(i int) error {
	r := m.Replica(i)
	if r == nil || r.Proc == nil {
		return fmt.Errorf("killing controller %d: not started", i)
	}
	m.setDown(func() { r.controllerDown = true })
	return r.Proc.Kill()
}

// RestartController starts replica i's controller again with the same command
// line (it must have exited) and waits up to 30 s until it answers.
func (m *Mesh) RestartController(ctx context.Context, i int) error {
	r := m.Replica(i)
	if r == nil || r.Proc == nil {
		return fmt.Errorf("restarting controller %d: never started", i)
	}
	if err := r.Proc.Restart(); err != nil {
		return err
	}
	m.setDown(func() { r.controllerDown = false })
	return m.WaitReplicaReady(ctx, i, 30*time.Second)
}

// Partition cuts replica i's host off from the other controller hosts: an
// nftables table (inet smlab_partition) in its namespace drops every packet to
// or from their addresses (etcd peer and client traffic, controller to
// controller), so controller-i and etcd-i become a minority while agents and the
// CLI can still reach controller-i. Heal removes it; Close does too.
func (m *Mesh) Partition(ctx context.Context, i int) error {
	r := m.Replica(i)
	if r == nil {
		return fmt.Errorf("partitioning controller %d: no such replica", i)
	}
	var others []string
	for _, o := range m.Controllers {
		if o != r {
			others = append(others, o.Host.Addr.String())
		}
	}
	if len(others) == 0 {
		return fmt.Errorf("partitioning controller %d: it is the only controller", i)
	}
	ruleset := fmt.Sprintf(`table inet %[1]s
delete table inet %[1]s
table inet %[1]s {
	set others {
		type ipv4_addr
		elements = { %[2]s }
	}
	chain input {
		type filter hook input priority filter - 10; policy accept;
		ip saddr @others drop
	}
	chain output {
		type filter hook output priority filter - 10; policy accept;
		ip daddr @others drop
	}
}
`, PartitionTable, strings.Join(others, ", "))
	path := filepath.Join(r.Host.Dir, "partition.nft")
	if err := os.WriteFile(path, []byte(ruleset), 0o644); err != nil {
		return fmt.Errorf("partitioning controller %d: %w", i, err)
	}
	res := resource{ns: r.Host.Namespace, kind: resourceTable, name: "inet " + PartitionTable}
	m.Lab.mu.Lock()
	recorded := slices.Contains(m.Lab.resources, res)
	m.Lab.mu.Unlock()
	if !recorded {
		m.Lab.record(res)
	}
	if _, err := r.Host.Exec(ctx, "nft", "-f", path); err != nil {
		return fmt.Errorf("partitioning controller %d (%s): %w", i, path, err)
	}
	return nil
}

// Heal removes Partition's table from replica i's namespace (nothing to remove
// is no error).
func (m *Mesh) Heal(ctx context.Context, i int) error {
	r := m.Replica(i)
	if r == nil {
		return fmt.Errorf("healing controller %d: no such replica", i)
	}
	return m.Lab.deleteResource(ctx, resource{ns: r.Host.Namespace, kind: resourceTable, name: "inet " + PartitionTable})
}

// StreamingReplica returns the replica (from 1) node n's agent holds its
// controller connection to, as the kernel of n's namespace sees it: the one
// established TCP connection to a controller replica's address and port
// (`ss state established`). The agent's stream and its calls share one HTTP/2
// connection; a replica that was killed leaves no established connection. It
// fails when the agent holds none, or connections to several replicas.
func (m *Mesh) StreamingReplica(ctx context.Context, n *Node) (int, error) {
	out, err := n.Host.Exec(ctx, "ss", "-Htn", "state", "established", "( dport = :"+strconv.Itoa(ControllerPort)+" )")
	if err != nil {
		return 0, fmt.Errorf("listing %s's controller connections: %w", n.Name, err)
	}
	addrs := make([]netip.Addr, len(m.Controllers))
	for i, r := range m.Controllers {
		addrs[i] = r.Host.Addr
	}
	got := connectedReplicas(out, addrs)
	switch len(got) {
	case 0:
		return 0, fmt.Errorf("%s holds no connection to a controller", n.Name)
	case 1:
		for i := range got {
			return i, nil
		}
	}
	return 0, fmt.Errorf("%s holds connections to several controllers: %v", n.Name, slices.Sorted(maps.Keys(got)))
}

// connectedReplicas returns the replicas (from 1; replica i at addrs[i-1]) that
// `ss -Htn state established` output lists as the peer of a connection: the
// fourth column (Recv-Q, Send-Q, local, peer), an IPv4 ADDR:PORT on
// ControllerPort.
func connectedReplicas(ssOut string, addrs []netip.Addr) map[int]bool {
	got := map[int]bool{}
	for line := range strings.Lines(ssOut) {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		ap, err := netip.ParseAddrPort(f[3])
		if err != nil || ap.Port() != ControllerPort {
			continue
		}
		if i := slices.Index(addrs, ap.Addr()); i >= 0 {
			got[i+1] = true
		}
	}
	return got
}

// Streams returns, for every node with a started agent that is not revoked, the
// replica it streams from (see StreamingReplica); the error names every node
// without a single one.
func (m *Mesh) Streams(ctx context.Context) (map[string]int, error) {
	out := map[string]int{}
	var errs []error
	for _, n := range m.nodes {
		if n.Agent == nil || n.Revoked {
			continue
		}
		i, err := m.StreamingReplica(ctx, n)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out[n.Name] = i
	}
	return out, errors.Join(errs...)
}

// WaitStreamsOff waits up to timeout until every started agent streams from
// one replica and none from replica i (e.g. after KillController(i)); it returns
// the streams it saw last.
func (m *Mesh) WaitStreamsOff(ctx context.Context, i int, timeout time.Duration) (map[string]int, error) {
	var last map[string]int
	err := WaitFor(ctx, timeout, func(ctx context.Context) (bool, error) {
		s, err := m.Streams(ctx)
		last = s
		if err != nil {
			return false, err
		}
		var on []string
		for name, r := range s {
			if r == i {
				on = append(on, name)
			}
		}
		if len(on) > 0 {
			slices.Sort(on)
			return false, fmt.Errorf("still streaming from controller-%d: %s", i, strings.Join(on, ", "))
		}
		return true, nil
	})
	if err != nil {
		return last, fmt.Errorf("waiting for the agents to leave controller-%d: %w", i, err)
	}
	return last, nil
}

// HTTP2Client returns an HTTP/2 client whose connections are made from inside
// h's namespace, with tlsConf (for Connect clients of the controller API in
// tests); the caller closes its idle connections when done.
func (h *Host) HTTP2Client(tlsConf *tls.Config) *http.Client {
	t := &http.Transport{
		DialContext:       func(ctx context.Context, _, addr string) (net.Conn, error) { return h.dialString(ctx, addr) },
		TLSClientConfig:   tlsConf,
		ForceAttemptHTTP2: true,
	}
	t.Protocols = new(http.Protocols)
	t.Protocols.SetHTTP2(true)
	return &http.Client{Transport: t, Timeout: 30 * time.Second}
}

// dialString is DialTCP for an "ip:port" string.
func (h *Host) dialString(ctx context.Context, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("dialing %q from %s: want IP:PORT: %w", addr, h.Name, err)
	}
	return h.DialTCP(ctx, ap)
}

func (m *Mesh) setDown(fn func()) {
	m.haMu.Lock()
	defer m.haMu.Unlock()
	fn()
}

func (m *Mesh) isEtcdDown(r *ControllerReplica) bool {
	m.haMu.Lock()
	defer m.haMu.Unlock()
	return r.etcdDown
}

// runningProcs lists the started controller and etcd processes that should be
// running (not stopped on purpose), for checkRunning.
func (m *Mesh) runningProcs() []*Process {
	m.haMu.Lock()
	defer m.haMu.Unlock()
	var procs []*Process
	for _, r := range m.Controllers {
		if r.Proc != nil && !r.controllerDown {
			procs = append(procs, r.Proc)
		}
		if r.Etcd != nil && !r.etcdDown {
			procs = append(procs, r.Etcd)
		}
	}
	return procs
}

// exited describes a process that exited, with the tail of its log.
func exited(p *Process) error {
	return fmt.Errorf("%s on %s exited (%v); log %s:\n%s", p.Name, p.Host.Name, p.Err(), p.LogPath, tail(p.Log(), 20))
}

// credentialsFile is the part of an operator.json OperatorClient needs.
type credentialsFile struct {
	CAPEM string `json:"ca_pem"`
	Token string `json:"token"`
}

// OperatorClient returns an OperatorService client of replica i (from 1) that
// dials it from its own host, trusting the CA and sending the bearer token of
// its operator.json, as the CLI does; closeIdle releases its connections.
func (m *Mesh) OperatorClient(i int) (client segmeshv1connect.OperatorServiceClient, closeIdle func(), err error) {
	r := m.Replica(i)
	if r == nil {
		return nil, nil, fmt.Errorf("operator client: no controller replica %d", i)
	}
	b, err := os.ReadFile(r.Credentials)
	if err != nil {
		return nil, nil, fmt.Errorf("operator client of %s: %w", r.Host.Name, err)
	}
	var cred credentialsFile
	if err := json.Unmarshal(b, &cred); err != nil {
		return nil, nil, fmt.Errorf("operator client of %s: %s: %w", r.Host.Name, r.Credentials, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(cred.CAPEM)) {
		return nil, nil, fmt.Errorf("operator client of %s: %s holds no CA certificate in ca_pem", r.Host.Name, r.Credentials)
	}
	hc := r.Host.HTTP2Client(&tls.Config{RootCAs: pool, ServerName: controllerServerName, MinVersion: tls.VersionTLS13})
	auth := connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			req.Header().Set("Authorization", "Bearer "+cred.Token)
			return next(ctx, req)
		}
	})
	return segmeshv1connect.NewOperatorServiceClient(hc, r.URL, connect.WithInterceptors(auth)), hc.CloseIdleConnections, nil
}

// controllerServerName is the DNS name every controller's server certificate
// carries (agent/enroll.ServerName).
const controllerServerName = "segmesh-controller"

// ControllerView returns, from replica i's Status API, the replica each node
// streams from as the controllers record it (NodeStatus.controller, a replica
// Name; absent for offline nodes).
func (m *Mesh) ControllerView(ctx context.Context, i int) (map[string]string, error) {
	client, closeFn, err := m.OperatorClient(i)
	if err != nil {
		return nil, err
	}
	defer closeFn()
	ctx, cancel := context.WithTimeout(ctx, CLITimeout)
	defer cancel()
	resp, err := client.Status(ctx, connect.NewRequest(&segmeshv1.StatusRequest{}))
	if err != nil {
		return nil, fmt.Errorf("status of controller-%d: %w", i, err)
	}
	out := map[string]string{}
	for _, n := range resp.Msg.GetNodes() {
		if c := n.GetController(); c != "" {
			out[n.GetName()] = c
		}
	}
	return out, nil
}

// ReplicaByName returns the index (from 1) of the replica with Name name, or 0.
func (m *Mesh) ReplicaByName(name string) int {
	for _, r := range m.Controllers {
		if r.Name() == name {
			return r.Index
		}
	}
	return 0
}
