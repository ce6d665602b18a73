package e2e

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"segmesh/agent/firewall"
	"segmesh/test/lab"
)

// revokeTrials is how many times TestRevokeNode revokes, deletes and re-enrolls
// api-1; SEGMESH_E2E_REVOKE_TRIALS overrides it (the closing note's figures use 10).
func revokeTrials(t *testing.T) int {
	if s := os.Getenv("SEGMESH_E2E_REVOKE_TRIALS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("SEGMESH_E2E_REVOKE_TRIALS=%q: want a positive number", s)
		}
		return n
	}
	return 2
}

// revokeTimes is when each effect of one revocation was first observed, from
// the start of `segmesh nodes revoke`.
type revokeTimes struct {
	command, peers, sets, flows, defaultDeny time.Duration
}

func (r revokeTimes) all() time.Duration {
	return max(r.command, r.peers, r.sets, r.flows, r.defaultDeny)
}

// TestRevokeNode revokes api-1 in the example mesh while TCP flows to and from
// it are open, and measures the time until no other node has it as a WireGuard
// peer, no set of any node holds its addresses (IPv4 and IPv6), the open flows
// are cut, and api-1 itself has no peer left (default deny). Each trial then
// deletes the node, wipes its state directory and enrolls it again with a new
// token, which checks that delete lets the name come back.
func TestRevokeNode(t *testing.T) {
	m, st, _ := upExample(t)
	ctx := context.Background()
	api := m.Node("api-1")
	var trials []revokeTimes
	for trial := range revokeTrials(t) {
		if trial > 0 {
			st = reenroll(t, m, api, map[string]string{"role": "api"})
		}
		ns := st.Node("api-1")
		a4, _ := ns.Addr(4)
		a6, _ := ns.Addr(6)
		key, err := m.WireGuardPublicKey(ctx, api)
		if err != nil {
			t.Fatal(err)
		}
		conns := []*heldConn{
			hold(t, m, st, "web-1", "api-1", 4, 8080),
			hold(t, m, st, "ops-1", "api-1", 6, 22),
			hold(t, m, st, "api-1", "db-1", 4, 5432),
		}
		others := slices.DeleteFunc(m.Nodes(), func(n *lab.Node) bool { return n == api })

		start := time.Now()
		var times revokeTimes
		var wg sync.WaitGroup
		var mu sync.Mutex
		observe := func(what string, d *time.Duration, cond func() (bool, error)) {
			wg.Go(func() {
				err := lab.WaitFor(ctx, 20*time.Second, func(context.Context) (bool, error) { return cond() })
				mu.Lock()
				defer mu.Unlock()
				*d = time.Since(start)
				if err != nil {
					t.Errorf("trial %d: %s: %v", trial, what, err)
				}
			})
		}
		observe("peers dropped", &times.peers, func() (bool, error) {
			for _, n := range others {
				peers, err := m.WireGuardPeers(ctx, n)
				if err != nil {
					return false, err
				}
				if slices.Contains(peers, key) {
					return false, fmt.Errorf("%s still has api-1 (%s) as a WireGuard peer", n.Name, key)
				}
			}
			return true, nil
		})
		observe("sets emptied", &times.sets, func() (bool, error) {
			for _, n := range others {
				out, err := n.Host.Exec(ctx, "nft", "list", "table", "inet", "segmesh")
				if err != nil {
					return false, err
				}
				out = firewall.ZeroKernelState(out) // the denied-flow log may name the node
				for _, a := range []string{a4.String(), a6.String()} {
					if strings.Contains(out, a) {
						return false, fmt.Errorf("the nftables table of %s still holds %s", n.Name, a)
					}
				}
			}
			return true, nil
		})
		flowCut := make([]time.Duration, len(conns))
		for i, h := range conns {
			observe("flow cut", &flowCut[i], func() (bool, error) {
				if h.roundTrip(100*time.Millisecond) == nil {
					return false, fmt.Errorf("%s still carries data", h.name)
				}
				return true, nil
			})
		}
		observe("revoked node at default deny", &times.defaultDeny, func() (bool, error) {
			peers, err := m.WireGuardPeers(ctx, api)
			if err != nil {
				return false, err
			}
			if len(peers) > 0 {
				return false, fmt.Errorf("api-1 still has %d WireGuard peers", len(peers))
			}
			return true, nil
		})
		out, err := m.CLI(ctx, "nodes", "revoke", "api-1")
		times.command = time.Since(start)
		if err != nil {
			t.Fatalf("segmesh nodes revoke api-1: %v", err)
		}
		api.Revoked = true
		wg.Wait()
		times.flows = slices.Max(flowCut)
		t.Logf("trial %d: %s; command %v, peers %v, sets %v, flows %v, revoked node at default deny %v",
			trial, strings.TrimSpace(out), times.command.Round(time.Millisecond), times.peers.Round(time.Millisecond),
			times.sets.Round(time.Millisecond), times.flows.Round(time.Millisecond), times.defaultDeny.Round(time.Millisecond))
		trials = append(trials, times)
		if t.Failed() {
			return
		}
		// The revoked agent keeps its default-deny table and says why.
		if !strings.Contains(api.Agent.Log(), "revoked") {
			t.Errorf("api-1's agent log does not mention the revocation:\n%s", api.Agent.Log())
		}
		// The remaining nodes still enforce the policy among themselves.
		st2, err := m.WaitConverged(ctx, 0, convergeTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if trial == 0 {
			pol, _ := lab.LoadPolicy(examplePolicy())
			requireMatrix(t, m, pol, st2, lab.MatrixOptions{Involving: []string{"web-1", "db-1"}})
		}
	}
	var totals []time.Duration
	for _, r := range trials {
		totals = append(totals, r.all())
	}
	sort.Slice(totals, func(i, j int) bool { return totals[i] < totals[j] })
	t.Logf("revocation complete (every effect observed) over %d trials: median %v, max %v",
		len(totals), totals[len(totals)/2].Round(time.Millisecond), totals[len(totals)-1].Round(time.Millisecond))

	// The audit log records every revocation and deletion, by the admin, and
	// its chain verifies.
	out, err := m.CLI(ctx, "audit", "--node", "api-1")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("segmesh audit --node api-1:\n%s", out)
	if n := strings.Count(out, "node.revoke"); n != len(trials) {
		t.Errorf("audit lists %d revocations of api-1, want %d", n, len(trials))
	}
	out, err = m.CLI(ctx, "audit", "verify")
	if err != nil || !strings.Contains(out, "chain intact") {
		t.Errorf("segmesh audit verify: %q %v", out, err)
	}
	t.Logf("segmesh audit verify: %s", strings.TrimSpace(out))
}

// reenroll deletes node n on the controller, stops its agent, removes its
// dataplane and state directory, and starts it again with a new token carrying
// labels; it returns the status once every node converged.
func reenroll(t *testing.T, m *lab.Mesh, n *lab.Node, labels map[string]string) *lab.Status {
	t.Helper()
	ctx := context.Background()
	if _, err := m.CLI(ctx, "nodes", "delete", n.Name); err != nil {
		t.Fatalf("segmesh nodes delete %s: %v", n.Name, err)
	}
	if err := n.Agent.Stop(10 * time.Second); err != nil {
		t.Fatalf("stopping the agent of %s: %v", n.Name, err)
	}
	if err := m.AgentDown(ctx, n); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(n.StateDir); err != nil {
		t.Fatal(err)
	}
	tok, err := m.CreateToken(ctx, labels, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.WriteToken(tok); err != nil {
		t.Fatal(err)
	}
	if err := n.Agent.Restart(); err != nil {
		t.Fatal(err)
	}
	n.Revoked = false
	st, err := m.WaitConverged(ctx, 0, convergeTimeout)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestRelabelMovesNode moves web-2 into the api segment with `segmesh nodes
// label` and checks the whole connectivity matrix before and after; a relabel
// that would make a policy test fail is refused, names the test and changes
// nothing.
func TestRelabelMovesNode(t *testing.T) {
	m, st, pol := upExample(t)
	ctx := context.Background()
	requireMatrix(t, m, pol, st, lab.MatrixOptions{Involving: []string{"web-2"}})

	out, err := m.CLI(ctx, "nodes", "label", "web-2", "role=api")
	if err != nil {
		t.Fatalf("segmesh nodes label web-2 role=api: %v", err)
	}
	t.Logf("segmesh nodes label web-2 role=api: %s", strings.TrimSpace(out))
	m.Node("web-2").Labels = map[string]string{"role": "api"}
	st, err = m.WaitConverged(ctx, 0, convergeTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.Node("web-2").Labels["role"]; got != "api" {
		t.Fatalf("web-2's labels in status: %v", st.Node("web-2").Labels)
	}
	// web-1 now reaches web-2 on tcp/8080 and web-2 reaches db-1 on tcp/5432.
	cells := requireMatrix(t, m, pol, st, lab.MatrixOptions{Involving: []string{"web-2"}})
	allowed := 0
	for _, c := range cells {
		if c.Want && (c.Src == "web-1" && c.Dst == "web-2" && c.Check == lab.TCP8080 || c.Src == "web-2" && c.Dst == "db-1" && c.Check == lab.TCP5432) {
			allowed++
		}
	}
	if allowed != 4 { // two checks over two families
		t.Errorf("%d of the new flows are in the matrix as allowed, want 4", allowed)
	}

	// db-1 into web would leave test api-reaches-db with no database to check.
	before, err := m.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_, err = m.CLI(ctx, "nodes", "label", "db-1", "role=web")
	var xe *lab.ExecError
	if !errors.As(err, &xe) || xe.ExitCode != 1 || !strings.Contains(xe.Stderr, "api-reaches-db") {
		t.Fatalf("relabel that breaks a test: %v; want exit 1 naming test api-reaches-db", err)
	}
	t.Logf("refused as expected: %s", strings.TrimSpace(xe.Stderr))
	after, err := m.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if b, a := before.Node("db-1"), after.Node("db-1"); fmt.Sprint(a.Labels) != fmt.Sprint(b.Labels) || a.DesiredHash != b.DesiredHash {
		t.Errorf("refused relabel changed db-1: %+v -> %+v", b, a)
	}
}

// TestKeyRotationKeepsTCP rotates api-1's WireGuard key with `segmesh nodes
// rotate-key` while TCP connections to it are open: the agent makes a new key,
// its peers switch to it, and the connections carry data afterwards.
func TestKeyRotationKeepsTCP(t *testing.T) {
	m, st, _ := upExample(t)
	ctx := context.Background()
	api, web := m.Node("api-1"), m.Node("web-1")
	conns := []*heldConn{hold(t, m, st, "web-1", "api-1", 4, 8080), hold(t, m, st, "web-1", "api-1", 6, 8080)}
	oldKey, err := m.WireGuardPublicKey(ctx, api)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := m.CLI(ctx, "nodes", "rotate-key", "api-1"); err != nil {
		t.Fatalf("segmesh nodes rotate-key api-1: %v", err)
	}
	var newKey string
	err = lab.WaitFor(ctx, 30*time.Second, func(ctx context.Context) (bool, error) {
		k, err := m.WireGuardPublicKey(ctx, api)
		if err != nil || k == oldKey {
			return false, fmt.Errorf("api-1's key is still %s (%v)", oldKey, err)
		}
		peers, err := m.WireGuardPeers(ctx, web)
		if err != nil || !slices.Contains(peers, k) || slices.Contains(peers, oldKey) {
			return false, fmt.Errorf("web-1's peers %v: want %s, not %s (%v)", peers, k, oldKey, err)
		}
		newKey = k
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("key rotated in %v: %s -> %s", time.Since(start).Round(time.Millisecond), oldKey, newKey)
	for _, h := range conns {
		if err := h.roundTrip(15 * time.Second); err != nil {
			t.Errorf("%s after the key rotation: %v", h.name, err)
		}
	}
	if st, err := m.WaitConverged(ctx, 0, convergeTimeout); err != nil {
		t.Error(err)
	} else if st.Node("api-1").PublicKey == "" || st.Node("api-1").PublicKey != newKey {
		t.Errorf("status has api-1's key %q, want %q", st.Node("api-1").PublicKey, newKey)
	}
}

// certNotAfter reads the expiry of the node certificate in n's state directory.
func certNotAfter(n *lab.Node) (time.Time, error) {
	raw, err := os.ReadFile(filepath.Join(n.StateDir, "node.crt"))
	if err != nil {
		return time.Time{}, err
	}
	blk, _ := pem.Decode(raw)
	if blk == nil {
		return time.Time{}, errors.New("node.crt holds no PEM block")
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return time.Time{}, err
	}
	return c.NotAfter, nil
}

// TestCertificateRenewal runs a mesh whose node certificates live 15 seconds:
// every agent renews its certificate over its stream (twice in the test) with a
// new key, stays online and in sync, and an open TCP connection carries data
// throughout.
func TestCertificateRenewal(t *testing.T) {
	nodes := lab.ExampleNodes()[1:3] // web-2, api-1
	m := newMeshWith(t, nodes, []string{"--node-cert-ttl", "15s"})
	ctx := context.Background()
	st, err := m.Up(ctx, examplePolicy(), convergeTimeout)
	if err != nil {
		t.Fatal(err)
	}
	conn := hold(t, m, st, "web-2", "api-1", 4, 8080)
	first := map[string]time.Time{}
	for _, n := range m.Nodes() {
		if first[n.Name], err = certNotAfter(n); err != nil {
			t.Fatal(err)
		}
	}
	renewals := func() (map[string]int, error) {
		out, err := m.CLI(ctx, "audit", "-o", "json")
		if err != nil {
			return nil, err
		}
		var recs []struct {
			Action string `json:"action"`
			Object string `json:"object"`
		}
		if err := json.Unmarshal([]byte(out), &recs); err != nil {
			return nil, fmt.Errorf("decoding audit %q: %w", out, err)
		}
		got := map[string]int{}
		for _, r := range recs {
			if r.Action == "node.cert.renew" {
				got[strings.TrimPrefix(r.Object, "node:")]++
			}
		}
		return got, nil
	}
	err = lab.WaitFor(ctx, 60*time.Second, func(ctx context.Context) (bool, error) {
		if err := conn.roundTrip(5 * time.Second); err != nil {
			return false, lab.Abort(fmt.Errorf("%s during renewals: %w", conn.name, err))
		}
		got, err := renewals()
		if err != nil {
			return false, err
		}
		for _, n := range m.Nodes() {
			if got[n.Name] < 2 {
				return false, fmt.Errorf("renewals so far: %v", got)
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range m.Nodes() {
		na, err := certNotAfter(n)
		if err != nil {
			t.Fatal(err)
		}
		if !na.After(first[n.Name]) {
			t.Errorf("%s: certificate expires %v, not after the first one (%v)", n.Name, na, first[n.Name])
		}
	}
	if _, err := m.WaitConverged(ctx, 0, convergeTimeout); err != nil {
		t.Fatal(err)
	}
}
