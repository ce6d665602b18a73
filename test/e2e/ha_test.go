package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"segmesh/agent/enroll"
	"segmesh/api/jointoken"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/test/lab"
)

// haReplicas is the number of controllers (and etcd members) of the HA tests.
const haReplicas = 3

// failoverBound is how long agents of a killed controller may take to stream
// from another replica (issue 11).
const failoverBound = 5 * time.Second

// newHAMesh is newMesh with three controller replicas on a three-member etcd
// cluster.
// On failure it logs what each replica and etcd member says of itself (before
// the process logs and the lab's removal).
func newHAMesh(t *testing.T, nodes []lab.NodeSpec) *lab.Mesh {
	t.Helper()
	m := newMeshOpts(t, lab.MeshOptions{Nodes: nodes, HA: haReplicas})
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for _, r := range m.Controllers {
			var sb strings.Builder
			if r.Proc == nil || !r.Proc.Running() {
				sb.WriteString("controller not running")
			} else if st, err := m.ReplicaStatus(ctx, r.Index); err != nil {
				fmt.Fprintf(&sb, "status: %v", err)
			} else {
				fmt.Fprintf(&sb, "status: revision %d, %d/%d nodes online, replicas %v", st.PolicyRevision, st.NodesOnline, st.NodesActive, st.Controllers)
			}
			if r.Etcd != nil {
				if err := m.EtcdHealthy(ctx, r.Index); err != nil {
					fmt.Fprintf(&sb, "; %v", err)
				} else {
					fmt.Fprintf(&sb, "; %s healthy", r.EtcdName)
				}
			}
			t.Logf("%s at failure: %s", r.Host.Name, sb.String())
		}
	})
	return m
}

// upHA brings up the example hosts on an HA mesh with the example policy and
// checks the matrix once (every WireGuard session is up before a test kills
// anything).
func upHA(t *testing.T) (*lab.Mesh, *lab.Status, *lab.Policy) {
	t.Helper()
	m := newHAMesh(t, lab.ExampleNodes())
	pol, err := lab.LoadPolicy(examplePolicy())
	if err != nil {
		t.Fatal(err)
	}
	st, err := m.Up(context.Background(), examplePolicy(), convergeTimeout)
	if err != nil {
		t.Fatal(err)
	}
	requireMatrix(t, m, pol, st, lab.MatrixOptions{})
	return m, st, pol
}

// requireStreams returns which replica every agent streams from, failing the
// test unless each holds exactly one controller connection.
func requireStreams(t *testing.T, m *lab.Mesh) map[string]int {
	t.Helper()
	var s map[string]int
	err := lab.WaitFor(context.Background(), 15*time.Second, func(ctx context.Context) (bool, error) {
		var err error
		s, err = m.Streams(ctx)
		return err == nil, err
	})
	if err != nil {
		t.Fatalf("which controller each agent streams from: %v", err)
	}
	return s
}

// waitControllerView waits until the controllers record (NodeStatus.controller,
// asked of replica ask) the replica each agent's connection goes to.
func waitControllerView(t *testing.T, m *lab.Mesh, ask int, want map[string]int) {
	t.Helper()
	err := lab.WaitFor(context.Background(), 10*time.Second, func(ctx context.Context) (bool, error) {
		view, err := m.ControllerView(ctx, ask)
		if err != nil {
			return false, err
		}
		var wrong []string
		for name, i := range want {
			if got := m.ReplicaByName(view[name]); got != i {
				wrong = append(wrong, fmt.Sprintf("%s: controllers record %q, its connection goes to controller-%d", name, view[name], i))
			}
		}
		if len(wrong) > 0 {
			sort.Strings(wrong)
			return false, errors.New(strings.Join(wrong, "; "))
		}
		return true, nil
	})
	if err != nil {
		t.Errorf("NodeStatus.controller: %v", err)
	}
}

// prober probes cells over and over until stop, counting rounds and keeping
// every cell that did not observe what the policy says.
type prober struct {
	m      *lab.Mesh
	cells  []lab.Cell
	stop   chan struct{}
	done   chan struct{}
	mu     sync.Mutex
	rounds int
	bad    []lab.Cell
}

func startProber(m *lab.Mesh, cells []lab.Cell) *prober {
	p := &prober{m: m, cells: cells, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for {
			select {
			case <-p.stop:
				return
			default:
			}
			batch := slices.Clone(p.cells)
			_ = m.Probe(context.Background(), batch, lab.MatrixOptions{Timeout: 500 * time.Millisecond, Parallel: len(batch)})
			p.mu.Lock()
			p.rounds++
			for _, c := range batch {
				if !c.OK() {
					p.bad = append(p.bad, c)
				}
			}
			p.mu.Unlock()
		}
	}()
	return p
}

// Stop ends probing and returns the rounds and the failed cells.
func (p *prober) Stop() (int, []lab.Cell) {
	close(p.stop)
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.rounds, p.bad
}

// failoverCells are the cells probed continuously during failovers: allowed
// flows of every rule and denied ones between the same nodes, over IPv4.
func failoverCells(t *testing.T, m *lab.Mesh, pol *lab.Policy, st *lab.Status) []lab.Cell {
	t.Helper()
	all, err := m.Cells(pol, st, lab.MatrixOptions{Checks6: []lab.Check{}})
	if err != nil {
		t.Fatal(err)
	}
	keep := []string{
		"web-1>api-1/v4/tcp/8080", "web-2>api-1/v4/tcp/8080", "api-1>db-1/v4/tcp/5432", "ops-1>db-1/v4/tcp/22",
		"ops-1>web-2/v4/icmp", "db-1>ops-1/v4/udp/514",
		"web-1>db-1/v4/tcp/5432", "web-1>web-2/v4/tcp/22", "api-1>web-1/v4/tcp/8080", "db-1>api-1/v4/tcp/5432",
	}
	var cells []lab.Cell
	for _, c := range all {
		if slices.Contains(keep, c.Key()) {
			cells = append(cells, c)
		}
	}
	if len(cells) != len(keep) {
		t.Fatalf("found %d of the %d failover cells", len(cells), len(keep))
	}
	return cells
}

// TestHAFailover kills (SIGKILL) the controller most agents stream from, ten
// times, restarting it between kills: each time every agent of the killed
// replica streams from another one within failoverBound, and probes sent
// continuously meanwhile find every allowed flow open and every denied one
// blocked (the dataplane does not depend on the controller).
func TestHAFailover(t *testing.T) {
	m, st, pol := upHA(t)
	ctx := context.Background()
	p := startProber(m, failoverCells(t, m, pol, st))
	probing := true
	defer func() {
		if probing {
			p.Stop()
		}
	}()
	const kills = 10
	var took []time.Duration
	for k := range kills {
		streams := requireStreams(t, m)
		counts := map[int]int{}
		for _, i := range streams {
			counts[i]++
		}
		victim := 0
		for _, i := range slices.Sorted(maps.Keys(counts)) {
			if victim == 0 || counts[i] > counts[victim] {
				victim = i
			}
		}
		var affected []string
		for name, i := range streams {
			if i == victim {
				affected = append(affected, name)
			}
		}
		sort.Strings(affected)
		start := time.Now()
		if err := m.KillController(victim); err != nil {
			t.Fatal(err)
		}
		var moved map[string]int
		err := lab.WaitFor(ctx, 3*failoverBound, func(ctx context.Context) (bool, error) {
			moved = map[string]int{}
			var pending []string
			for _, name := range affected {
				i, err := m.StreamingReplica(ctx, m.Node(name))
				if err != nil || i == victim {
					pending = append(pending, fmt.Sprintf("%s (%v)", name, err))
					continue
				}
				moved[name] = i
			}
			if len(pending) > 0 {
				return false, fmt.Errorf("not yet on another replica: %s", strings.Join(pending, ", "))
			}
			return true, nil
		})
		d := time.Since(start)
		if err != nil {
			t.Fatalf("kill %d of controller-%d (agents %v): %v", k+1, victim, affected, err)
		}
		took = append(took, d)
		t.Logf("kill %d: controller-%d (%d agents: %s): all on other replicas after %s: %v", k+1, victim, len(affected), strings.Join(affected, " "), d.Round(time.Millisecond), moved)
		if d > failoverBound {
			t.Errorf("kill %d: agents of controller-%d took %s to move, want <= %s", k+1, victim, d.Round(time.Millisecond), failoverBound)
		}
		ask := victim%haReplicas + 1
		waitControllerView(t, m, ask, moved)
		if err := m.RestartController(ctx, victim); err != nil {
			t.Fatal(err)
		}
	}
	rounds, bad := p.Stop()
	probing = false
	slices.Sort(took)
	t.Logf("failover over %d kills: median %s, max %s; %d probing rounds of %d cells during the kills",
		len(took), took[len(took)/2].Round(time.Millisecond), took[len(took)-1].Round(time.Millisecond), rounds, len(p.cells))
	for _, c := range bad {
		t.Errorf("during failover %s (%s): policy allowed=%v, reached=%v, err=%v, output %q", c.Key(), c.Addr, c.Want, c.Got, c.Err, c.Output)
	}
	if rounds < kills {
		t.Errorf("only %d probing rounds during %d failovers", rounds, kills)
	}
	// The replicas the agents moved to deliver changes: a new revision reaches
	// every agent.
	rev, err := m.ApplyPolicy(ctx, writePolicyVariant(t, "after the failovers"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.WaitConverged(ctx, rev, convergeTimeout); err != nil {
		t.Fatal(err)
	}
}

// TestHAEtcdMemberDown stops one etcd member: a policy apply, an enrollment and a
// revocation, each through a different controller, all work; the member then
// restarts and catches up (its store revision equals the others').
func TestHAEtcdMemberDown(t *testing.T) {
	m := newHAMesh(t, lab.ExampleNodes())
	ctx := context.Background()
	if err := m.StartController(ctx); err != nil {
		t.Fatal(err)
	}
	late := m.Node("ops-1")
	for _, n := range m.Nodes() {
		if n == late {
			continue
		}
		tok, err := m.CreateToken(ctx, n.Labels, false)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.StartAgent(n, tok); err != nil {
			t.Fatal(err)
		}
	}
	rev1, err := m.ApplyPolicy(ctx, examplePolicy())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.WaitConverged(ctx, rev1, convergeTimeout); err != nil {
		t.Fatal(err)
	}

	const down = 2
	if err := m.StopEtcdMember(down); err != nil {
		t.Fatal(err)
	}
	behind, err := m.EtcdRevision(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}

	// A policy change through controller-1.
	changed := writePolicyVariant(t, "etcd member down")
	out, err := m.ReplicaCLI(ctx, 1, "policy", "apply", changed)
	if err != nil {
		t.Fatalf("policy apply through controller-1 with etcd-%d down: %v", down, err)
	}
	rev2, err := lastNumber(out)
	if err != nil || rev2 != rev1+1 {
		t.Fatalf("policy apply through controller-1: %q (%v), want revision %d", out, err, rev1+1)
	}
	// An enrollment with a token of controller-2 (whose own etcd member is down).
	tokOut, err := m.ReplicaCLI(ctx, down, "token", "create", "--label", "role=ops")
	if err != nil {
		t.Fatalf("token create through controller-%d with its etcd member down: %v", down, err)
	}
	if err := m.StartAgent(late, strings.TrimSpace(tokOut)); err != nil {
		t.Fatal(err)
	}
	if _, err := m.WaitConverged(ctx, rev2, convergeTimeout); err != nil {
		t.Fatalf("enrolling %s with etcd-%d down: %v", late.Name, down, err)
	}
	// A revocation through controller-3.
	web2Key, err := m.WireGuardPublicKey(ctx, m.Node("web-2"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.ReplicaCLI(ctx, 3, "nodes", "revoke", "web-2"); err != nil {
		t.Fatalf("nodes revoke through controller-3 with etcd-%d down: %v", down, err)
	}
	m.Node("web-2").Revoked = true
	err = lab.WaitFor(ctx, convergeTimeout, func(ctx context.Context) (bool, error) {
		peers, err := m.WireGuardPeers(ctx, m.Node("ops-1"))
		if err != nil {
			return false, err
		}
		if slices.Contains(peers, web2Key) {
			return false, fmt.Errorf("ops-1 still has revoked web-2 as a WireGuard peer")
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("revoking web-2: %v", err)
	}
	if _, err := m.WaitConverged(ctx, rev2, convergeTimeout); err != nil {
		t.Fatal(err)
	}

	if err := m.StartEtcdMember(ctx, down); err != nil {
		t.Fatal(err)
	}
	var revs []int64
	err = lab.WaitFor(ctx, 30*time.Second, func(ctx context.Context) (bool, error) {
		revs = revs[:0]
		for i := 1; i <= haReplicas; i++ {
			rev, err := m.EtcdRevision(ctx, i)
			if err != nil {
				return false, err
			}
			revs = append(revs, rev)
		}
		if slices.Min(revs) != slices.Max(revs) {
			return false, fmt.Errorf("etcd revisions %v", revs)
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("etcd-%d catching up: %v", down, err)
	}
	if revs[0] <= behind {
		t.Errorf("etcd revision %d after the writes, %d before: the writes did not reach etcd", revs[0], behind)
	}
	t.Logf("etcd revision %d when etcd-%d stopped, %d on every member after it rejoined", behind, down, revs[0])
}

// writePolicyVariant writes the example policy with a comment naming note (a new
// content, so a new revision) into a temporary file and returns its path.
func writePolicyVariant(t *testing.T, note string) string {
	t.Helper()
	b, err := os.ReadFile(examplePolicy())
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(path, append(b, []byte("\n# "+note+"\n")...), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// lastNumber is the last decimal number in s ("applied revision 3").
func lastNumber(s string) (uint64, error) {
	f := strings.FieldsFunc(s, func(r rune) bool { return r < '0' || r > '9' })
	if len(f) == 0 {
		return 0, fmt.Errorf("no number in %q", s)
	}
	var n uint64
	_, err := fmt.Sscan(f[len(f)-1], &n)
	return n, err
}

// enrollClients returns one EnrollService client per replica, each dialling its
// replica from the replica's own host and pinning the CA of tok.
func enrollClients(t *testing.T, m *lab.Mesh, tok jointoken.Token) []segmeshv1connect.EnrollServiceClient {
	t.Helper()
	var out []segmeshv1connect.EnrollServiceClient
	for _, r := range m.Controllers {
		hc := r.Host.HTTP2Client(enroll.PinnedTLSConfig(tok))
		t.Cleanup(hc.CloseIdleConnections)
		out = append(out, segmeshv1connect.NewEnrollServiceClient(hc, r.URL))
	}
	return out
}

// enrollRequest is an enrollment of name with fresh WireGuard-like and TLS keys.
func enrollRequest(t *testing.T, tok, name string) *segmeshv1.EnrollRequest {
	t.Helper()
	pub := make([]byte, 32)
	if _, err := rand.Read(pub); err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: name}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return &segmeshv1.EnrollRequest{Token: tok, Name: name, Hostname: name, PublicKey: pub, CsrDer: csr}
}

// concurrentEnroll sends one enrollment per name at once, spread over the
// replicas round robin, and returns each result by name. Like an agent, each
// retries what enroll.Retryable calls transient (a controller admits only a few
// enrollments per source address at once and answers the rest
// ResourceExhausted), with a backoff from 20 ms doubling up to 500 ms, for up to
// 60 s; retries counts those retries.
func concurrentEnroll(t *testing.T, m *lab.Mesh, token string, names []string) (ok map[string]*segmeshv1.EnrollResponse, failed map[string]error, retries int) {
	t.Helper()
	tok, err := jointoken.Decode(token)
	if err != nil {
		t.Fatal(err)
	}
	clients := enrollClients(t, m, tok)
	reqs := make([]*segmeshv1.EnrollRequest, len(names))
	for i, name := range names {
		reqs[i] = enrollRequest(t, token, name)
	}
	var mu sync.Mutex
	ok, failed = map[string]*segmeshv1.EnrollResponse{}, map[string]error{}
	var wg sync.WaitGroup
	startGun := make(chan struct{})
	for i, req := range reqs {
		wg.Go(func() {
			<-startGun
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			backoff := 20 * time.Millisecond
			var resp *connect.Response[segmeshv1.EnrollResponse]
			var err error
			for {
				resp, err = clients[i%len(clients)].Enroll(ctx, connect.NewRequest(req))
				if !enroll.Retryable(err) || ctx.Err() != nil {
					break
				}
				mu.Lock()
				retries++
				mu.Unlock()
				select {
				case <-time.After(backoff):
				case <-ctx.Done():
				}
				backoff = min(2*backoff, 500*time.Millisecond)
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed[req.GetName()] = err
				return
			}
			ok[req.GetName()] = resp.Msg
		})
	}
	close(startGun)
	wg.Wait()
	return ok, failed, retries
}

// TestHAConcurrentEnroll enrolls concurrently through all three controllers with
// the EnrollService API: 20 enrollments with one single-use token make exactly
// one node; 200 with one reusable token make 200 nodes with distinct addresses.
func TestHAConcurrentEnroll(t *testing.T) {
	m := newHAMesh(t, nil)
	ctx := context.Background()
	if err := m.StartController(ctx); err != nil {
		t.Fatal(err)
	}

	single, err := m.CreateToken(ctx, map[string]string{"role": "web"}, false)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for i := range 20 {
		names = append(names, fmt.Sprintf("single-%02d", i))
	}
	ok, failed, retries := concurrentEnroll(t, m, single, names)
	if len(ok) != 1 {
		t.Errorf("single-use token: %d of 20 concurrent enrollments succeeded (%v), want exactly 1", len(ok), slices.Sorted(maps.Keys(ok)))
	}
	codes := map[connect.Code]int{}
	for name, err := range failed {
		codes[connect.CodeOf(err)]++
		if connect.CodeOf(err) != connect.CodePermissionDenied {
			t.Errorf("single-use token: %s refused with %v, want PermissionDenied (token used)", name, err)
		}
	}
	t.Logf("single-use token: %d enrolled %v, refusals by code %v, %d transient refusals retried", len(ok), slices.Sorted(maps.Keys(ok)), codes, retries)

	reusable, err := m.CreateToken(ctx, map[string]string{"role": "api"}, true)
	if err != nil {
		t.Fatal(err)
	}
	names = names[:0]
	for i := range 200 {
		names = append(names, fmt.Sprintf("many-%03d", i))
	}
	start := time.Now()
	ok, failed, retries = concurrentEnroll(t, m, reusable, names)
	t.Logf("reusable token: %d of 200 enrolled in %s (%d transient refusals retried)", len(ok), time.Since(start).Round(time.Millisecond), retries)
	for _, name := range slices.Sorted(maps.Keys(failed)) {
		t.Errorf("reusable token: %s: %v", name, failed[name])
	}
	owner := map[string]string{}
	for name, resp := range ok {
		if len(resp.GetAddresses()) != 2 {
			t.Errorf("%s: addresses %v, want one per family", name, resp.GetAddresses())
		}
		for _, a := range resp.GetAddresses() {
			if other, dup := owner[a]; dup {
				t.Errorf("address %s given to both %s and %s", a, other, name)
			}
			owner[a] = name
		}
	}
	// Every replica lists the same 201 nodes with the addresses they were given.
	for i := 1; i <= haReplicas; i++ {
		client, closeIdle, err := m.OperatorClient(i)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := client.ListNodes(ctx, connect.NewRequest(&segmeshv1.ListNodesRequest{}))
		closeIdle()
		if err != nil {
			t.Fatalf("listing nodes on controller-%d: %v", i, err)
		}
		if got, want := len(resp.Msg.GetNodes()), 1+len(ok); got != want {
			t.Errorf("controller-%d lists %d nodes, want %d", i, got, want)
		}
		for _, n := range resp.Msg.GetNodes() {
			for _, a := range n.GetAddresses() {
				if o, known := owner[a]; known && o != n.GetName() {
					t.Errorf("controller-%d: %s has address %s, which enrollment gave %s", i, n.GetName(), a, o)
				}
			}
		}
	}
}

// TestHAKillLoop kills (SIGKILL) controllers one after another while policy
// applies (through the CLI with every URL) and token creations (through the API,
// round robin over the replicas) run; every acknowledged write must survive:
// the policy revisions are gapless, every acknowledged revision holds the
// content it acknowledged, every acknowledged token is listed, and the audit
// chain verifies.
func TestHAKillLoop(t *testing.T) {
	m := newHAMesh(t, nil)
	ctx := context.Background()
	if err := m.StartController(ctx); err != nil {
		t.Fatal(err)
	}
	base, err := os.ReadFile(examplePolicy())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()

	var (
		mu         sync.Mutex
		ackedRevs  = map[uint64]string{} // revision -> hex SHA-256 of the content acknowledged
		ackedToks  = map[string]bool{}   // token IDs
		failedRevs int
		failedToks int
	)
	acks := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(ackedRevs) + len(ackedToks)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { // policy applies through the CLI
		for n := 0; ; n++ {
			select {
			case <-stop:
				return
			default:
			}
			content := append(slices.Clone(base), fmt.Appendf(nil, "\n# kill loop write %d\n", n)...)
			path := filepath.Join(dir, fmt.Sprintf("policy-%d.yaml", n))
			if err := os.WriteFile(path, content, 0o644); err != nil {
				t.Error(err)
				return
			}
			rev, err := m.ApplyPolicy(ctx, path)
			sum := sha256.Sum256(content)
			mu.Lock()
			if err != nil {
				failedRevs++
			} else {
				ackedRevs[rev] = hex.EncodeToString(sum[:])
			}
			mu.Unlock()
		}
	})
	wg.Go(func() { // token creations through the API
		for n := 0; ; n++ {
			select {
			case <-stop:
				return
			default:
			}
			i := n%haReplicas + 1
			client, closeIdle, err := m.OperatorClient(i)
			if err != nil {
				t.Error(err)
				return
			}
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			resp, err := client.CreateToken(cctx, connect.NewRequest(&segmeshv1.CreateTokenRequest{Labels: map[string]string{"role": "web"}}))
			cancel()
			closeIdle()
			mu.Lock()
			if err != nil {
				failedToks++
			} else {
				ackedToks[resp.Msg.GetId()] = true
			}
			mu.Unlock()
		}
	})

	const kills = 9
	for k := range kills {
		victim := k%haReplicas + 1
		before := acks()
		if err := m.KillController(victim); err != nil {
			t.Fatal(err)
		}
		// Writes go on while it is dead.
		if err := lab.WaitFor(ctx, 30*time.Second, func(context.Context) (bool, error) {
			if n := acks(); n < before+3 {
				return false, fmt.Errorf("%d writes acknowledged since controller-%d was killed", n-before, victim)
			}
			return true, nil
		}); err != nil {
			t.Fatal(err)
		}
		if err := m.RestartController(ctx, victim); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	t.Logf("%d kills: %d policy revisions and %d tokens acknowledged; %d applies and %d token creations failed",
		kills, len(ackedRevs), len(ackedToks), failedRevs, failedToks)
	if len(ackedRevs) == 0 || len(ackedToks) == 0 {
		t.Fatalf("no write of some kind acknowledged: %d revisions, %d tokens", len(ackedRevs), len(ackedToks))
	}

	for i := 1; i <= haReplicas; i++ {
		client, closeIdle, err := m.OperatorClient(i)
		if err != nil {
			t.Fatal(err)
		}
		revs, err := client.ListPolicyRevisions(ctx, connect.NewRequest(&segmeshv1.ListPolicyRevisionsRequest{}))
		if err != nil {
			closeIdle()
			t.Fatalf("controller-%d: listing revisions: %v", i, err)
		}
		stored := map[uint64]string{}
		for j, r := range revs.Msg.GetRevisions() {
			if r.GetRevision() != uint64(j+1) {
				t.Errorf("controller-%d: revision #%d is %d: revisions are not gapless from 1", i, j+1, r.GetRevision())
				break
			}
			stored[r.GetRevision()] = r.GetSha256()
		}
		for rev, sum := range ackedRevs {
			if got, ok := stored[rev]; !ok {
				t.Errorf("controller-%d: acknowledged revision %d is missing", i, rev)
			} else if got != sum {
				t.Errorf("controller-%d: revision %d holds content %s, the apply acknowledged %s", i, rev, got, sum)
			}
		}
		toks, err := client.ListTokens(ctx, connect.NewRequest(&segmeshv1.ListTokensRequest{}))
		closeIdle()
		if err != nil {
			t.Fatalf("controller-%d: listing tokens: %v", i, err)
		}
		listed := map[string]bool{}
		for _, tk := range toks.Msg.GetTokens() {
			listed[tk.GetId()] = true
		}
		for id := range ackedToks {
			if !listed[id] {
				t.Errorf("controller-%d: acknowledged token %s is missing", i, id)
			}
		}
		t.Logf("controller-%d: %d revisions, %d tokens stored", i, len(stored), len(listed))
	}
	out, err := m.CLI(ctx, "audit", "verify")
	if err != nil {
		t.Fatalf("segmesh audit verify: %v\n%s", err, out)
	}
	t.Logf("segmesh audit verify: %s", strings.TrimSpace(out))
}

// TestHAPartition cuts controller-3 (and etcd-3) off from the other controller
// hosts: it refuses writes saying that etcd lost its quorum, its agents move to
// the majority side, the majority takes writes; after Heal it takes writes again.
func TestHAPartition(t *testing.T) {
	m, st, pol := upHA(t)
	ctx := context.Background()
	const cut = 3
	// Put every agent on controller-3: kill the others until the agents moved.
	for i := 1; i < cut; i++ {
		if err := m.KillController(i); err != nil {
			t.Fatal(err)
		}
	}
	for i := 1; i < cut; i++ {
		if _, err := m.WaitStreamsOff(ctx, i, 3*failoverBound); err != nil {
			t.Fatal(err)
		}
	}
	for i := 1; i < cut; i++ {
		if err := m.RestartController(ctx, i); err != nil {
			t.Fatal(err)
		}
	}
	streams := requireStreams(t, m)
	for name, i := range streams {
		if i != cut {
			t.Fatalf("%s streams from controller-%d after controllers 1 and 2 were killed, want controller-%d", name, i, cut)
		}
	}

	if err := m.Partition(ctx, cut); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	// The agents' move and the refusal are timed independently.
	type moveResult struct {
		streams map[string]int
		after   time.Duration
		err     error
	}
	movedCh := make(chan moveResult, 1)
	go func() {
		s, err := m.WaitStreamsOff(ctx, cut, 30*time.Second)
		movedCh <- moveResult{s, time.Since(start), err}
	}()
	var refusal string
	attempts := 0
	err := lab.WaitFor(ctx, 45*time.Second, func(ctx context.Context) (bool, error) {
		attempts++
		out, err := m.ReplicaCLI(ctx, cut, "token", "create")
		if err == nil {
			return false, lab.Abort(fmt.Errorf("partitioned controller-%d created a token (%q)", cut, strings.TrimSpace(out)))
		}
		refusal = err.Error()
		if !strings.Contains(strings.ToLower(refusal), "quorum") {
			return false, fmt.Errorf("refusal does not say the etcd quorum is lost: %v", err)
		}
		return true, nil
	})
	if err != nil {
		t.Errorf("write to the partitioned controller: %v", err)
	} else {
		t.Logf("controller-%d refuses writes %s after the partition (attempt %d): %s", cut, time.Since(start).Round(time.Millisecond), attempts, refusal)
	}
	moved := <-movedCh
	if moved.err != nil {
		t.Fatal(moved.err)
	}
	t.Logf("agents moved off controller-%d %s after the partition: %v", cut, moved.after.Round(time.Millisecond), moved.streams)
	// The majority side takes every write meanwhile.
	const majorityWrites = 6
	for k := range majorityWrites {
		i := k%(cut-1) + 1
		wstart := time.Now()
		if _, err := m.ReplicaCLI(ctx, i, "token", "create"); err != nil {
			t.Errorf("majority write %d of %d through controller-%d during the partition failed after %s: %v", k+1, majorityWrites, i, time.Since(wstart).Round(time.Millisecond), err)
		}
	}
	requireMatrix(t, m, pol, st, lab.MatrixOptions{Checks6: []lab.Check{}})

	if err := m.Heal(ctx, cut); err != nil {
		t.Fatal(err)
	}
	err = lab.WaitFor(ctx, 45*time.Second, func(ctx context.Context) (bool, error) {
		_, err := m.ReplicaCLI(ctx, cut, "token", "create")
		return err == nil, err
	})
	if err != nil {
		t.Fatalf("controller-%d after Heal: %v", cut, err)
	}
	if err := m.WaitEtcdHealthy(ctx, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := m.WaitConverged(ctx, st.PolicyRevision, convergeTimeout); err != nil {
		t.Fatal(err)
	}
}
