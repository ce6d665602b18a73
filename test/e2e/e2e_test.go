package e2e

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"segmesh/agent/firewall"
	"segmesh/api/jointoken"
	"segmesh/test/lab"
)

// TestExamplePolicy brings up the demo's five hosts with examples/policy.yaml and
// checks, on one lab: status, the full matrix, that WireGuard peers exist only
// where a rule connects two nodes, and finally a policy change applied without
// restarting the agents.
func TestExamplePolicy(t *testing.T) {
	m, st, pol := upExample(t)
	ctx := context.Background()

	t.Run("Status", func(t *testing.T) {
		if st.PolicyRevision == 0 {
			t.Errorf("policy_revision 0 after apply")
		}
		for _, n := range m.Nodes() {
			ns := st.Node(n.Name)
			if ns == nil {
				t.Fatalf("node %s missing from status", n.Name)
			}
			if ns.Dataplane != "kernel" && ns.Dataplane != "userspace" {
				t.Errorf("%s: dataplane %q, want kernel or userspace", n.Name, ns.Dataplane)
			}
			if ns.DesiredRevision != st.PolicyRevision || ns.AppliedRevision != st.PolicyRevision {
				t.Errorf("%s: desired %d applied %d, want both %d", n.Name, ns.DesiredRevision, ns.AppliedRevision, st.PolicyRevision)
			}
			for k, v := range n.Labels {
				if ns.Labels[k] != v {
					t.Errorf("%s: labels %v, want the token's %v", n.Name, ns.Labels, n.Labels)
				}
			}
		}
	})

	t.Run("Matrix", func(t *testing.T) {
		cells := requireMatrix(t, m, pol, st, lab.MatrixOptions{})
		allowed := 0
		for _, c := range cells {
			if c.Want {
				allowed++
			}
		}
		// 5 nodes: 20 ordered pairs x 5 checks x 2 address families.
		if len(cells) != 200 || allowed == 0 || allowed == len(cells) {
			t.Errorf("matrix has %d cells, %d allowed: want 200 cells mixing allowed and denied", len(cells), allowed)
		}
	})

	// `segmesh policy render --node` shows exactly the ruleset each node's kernel
	// holds (nft list) and exactly its WireGuard peers (wg show).
	t.Run("RenderMatchesKernel", func(t *testing.T) {
		for _, n := range m.Nodes() {
			out, err := m.CLI(ctx, "policy", "render", "--node", n.Name, "-o", "json")
			if err != nil {
				t.Fatalf("render %s: %v", n.Name, err)
			}
			var r struct {
				Interface string `json:"interface"`
				Ruleset   string `json:"ruleset"`
				Peers     []struct {
					PublicKey string `json:"public_key"`
				} `json:"peers"`
			}
			if err := json.Unmarshal([]byte(out), &r); err != nil {
				t.Fatalf("render %s -o json: %v\n%s", n.Name, err, out)
			}
			kernel, err := n.Host.Exec(ctx, "nft", "list", "table", "inet", "segmesh")
			if err != nil {
				t.Fatalf("nft list in %s: %v", n.Name, err)
			}
			// Counter values and the denied flows of the matrix are kernel state, and
			// sets added by an update in place are listed after the older ones.
			kernel = firewall.NormalizeListing(kernel)
			if r.Interface != n.Interface || r.Ruleset != kernel {
				t.Errorf("%s: render (interface %q) differs from the kernel's table (interface %q):\n--- render\n%s\n--- kernel\n%s",
					n.Name, r.Interface, n.Interface, r.Ruleset, kernel)
			}
			var rendered []string
			for _, p := range r.Peers {
				rendered = append(rendered, p.PublicKey)
			}
			peers, err := m.WireGuardPeers(ctx, n)
			if err != nil {
				t.Fatal(err)
			}
			slices.Sort(rendered)
			slices.Sort(peers)
			if !slices.Equal(rendered, peers) {
				t.Errorf("%s: render lists peers %v, wg show lists %v", n.Name, rendered, peers)
			}
		}
	})

	t.Run("PeersOnlyWhereRulesAllow", func(t *testing.T) {
		keys := publicKeys(t, m, st)
		requirePeers(t, m, pol, keys)
		// The brief's example, spelled out: web-1 talks to api-1 and ops-1 only.
		peers, err := m.WireGuardPeers(ctx, m.Node("web-1"))
		if err != nil {
			t.Fatal(err)
		}
		for name, want := range map[string]bool{"api-1": true, "ops-1": true, "web-2": false, "db-1": false} {
			if got := slices.Contains(peers, keys[name]); got != want {
				t.Errorf("web-1 has %s (%s) as a WireGuard peer: %v, want %v (peers %v)", name, keys[name], got, want, peers)
			}
		}
	})

	t.Run("PolicyChangeWithoutRestart", func(t *testing.T) {
		path := filepath.Join(moduleRoot, "test", "e2e", "testdata", "policy-changed.yaml")
		changed, err := lab.LoadPolicy(path)
		if err != nil {
			t.Fatal(err)
		}
		web, api, db := m.Node("web-1").Info(), m.Node("api-1").Info(), m.Node("db-1").Info()
		if !pol.Allows(web, api, lab.TCP8080) || changed.Allows(web, api, lab.TCP8080) ||
			pol.Allows(web, db, lab.TCP5432) || !changed.Allows(web, db, lab.TCP5432) {
			t.Fatal("testdata/policy-changed.yaml must drop web -> api tcp/8080 and add web -> db tcp/5432 relative to examples/policy.yaml")
		}
		pids := map[string]int{}
		for _, n := range m.Nodes() {
			pids[n.Name] = n.Agent.PID()
		}
		rev, err := m.ApplyPolicy(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		if rev <= st.PolicyRevision {
			t.Fatalf("new revision %d, want > %d", rev, st.PolicyRevision)
		}
		st2, err := m.WaitConverged(ctx, rev, convergeTimeout)
		if err != nil {
			t.Fatal(err)
		}
		requireMatrix(t, m, changed, st2, lab.MatrixOptions{})
		requirePeers(t, m, changed, publicKeys(t, m, st2))
		for _, n := range m.Nodes() {
			if !n.Agent.Running() || n.Agent.PID() != pids[n.Name] {
				t.Errorf("agent on %s: pid %d running %v, want the same process %d", n.Name, n.Agent.PID(), n.Agent.Running(), pids[n.Name])
			}
		}
	})
}

// publicKeys maps node names to the public keys their WireGuard interfaces hold,
// and checks them against the keys in status.
func publicKeys(t *testing.T, m *lab.Mesh, st *lab.Status) map[string]string {
	t.Helper()
	keys := map[string]string{}
	for _, n := range m.Nodes() {
		k, err := m.WireGuardPublicKey(context.Background(), n)
		if err != nil {
			t.Fatal(err)
		}
		if ns := st.Node(n.Name); ns != nil && ns.PublicKey != "" && ns.PublicKey != k {
			t.Errorf("%s: status public_key %s, interface holds %s", n.Name, ns.PublicKey, k)
		}
		keys[n.Name] = k
	}
	return keys
}

// requirePeers waits until every node's WireGuard peers are exactly the nodes a
// rule of pol connects it with (in either direction).
func requirePeers(t *testing.T, m *lab.Mesh, pol *lab.Policy, keys map[string]string) {
	t.Helper()
	byKey := map[string]string{}
	for name, k := range keys {
		byKey[k] = name
	}
	err := lab.WaitFor(context.Background(), convergeTimeout, func(ctx context.Context) (bool, error) {
		var problems []string
		for _, n := range m.Nodes() {
			peers, err := m.WireGuardPeers(ctx, n)
			if err != nil {
				return false, err
			}
			var got, want []string
			for _, k := range peers {
				name := byKey[k]
				if name == "" {
					name = "unknown key " + k
				}
				got = append(got, name)
			}
			for _, o := range m.Nodes() {
				if o != n && pol.Related(n.Info(), o.Info()) {
					want = append(want, o.Name)
				}
			}
			slices.Sort(got)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				problems = append(problems, fmt.Sprintf("%s has peers %v, want %v", n.Name, got, want))
			}
		}
		if len(problems) > 0 {
			return false, errors.New(strings.Join(problems, "; "))
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("WireGuard peers: %v", err)
	}
}

// TestAgentRestartWithoutController stops the controller, kills api-1's agent with
// SIGKILL and restarts it: from its state directory alone it must enforce the last
// policy again (allowed flows to and from api-1 work, denied ones stay denied, the
// nftables table is there), and once the controller is back every node reports in.
func TestAgentRestartWithoutController(t *testing.T) {
	m, st, pol := upExample(t)
	ctx := context.Background()
	n := m.Node("api-1")
	opts := lab.MatrixOptions{Involving: []string{n.Name}}
	requireMatrix(t, m, pol, st, opts)

	if err := m.ControllerProc.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	oldPID := n.Agent.PID()
	if err := n.Agent.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := n.Agent.Restart(); err != nil {
		t.Fatal(err)
	}
	if n.Agent.PID() == oldPID {
		t.Fatalf("restarted agent has the old pid %d", oldPID)
	}
	var table string
	err := lab.WaitFor(ctx, convergeTimeout, func(ctx context.Context) (bool, error) {
		if !n.Agent.Running() {
			return false, lab.Abort(fmt.Errorf("restarted agent exited (%v):\n%s", n.Agent.Err(), n.Agent.Log()))
		}
		if _, err := n.Host.Exec(ctx, "ip", "link", "show", "dev", n.Interface); err != nil {
			return false, err
		}
		out, err := n.Host.Exec(ctx, "nft", "list", "table", "inet", "segmesh")
		table = out
		return err == nil, err
	})
	if err != nil {
		t.Fatalf("restarted agent without a controller: %v", err)
	}
	if !strings.Contains(table, n.Interface) {
		t.Errorf("nftables table inet segmesh does not mention the overlay interface %s:\n%s", n.Interface, table)
	}
	if m.ControllerProc.Running() {
		t.Fatal("controller is running; the test needs it stopped")
	}
	requireMatrix(t, m, pol, st, opts)
	if m.ControllerProc.Running() {
		t.Fatal("controller came back during the matrix")
	}

	// With the controller back, every node (the restarted one included) reports again.
	if err := m.ControllerProc.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := m.WaitControllerReady(ctx, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := m.WaitConverged(ctx, st.PolicyRevision, convergeTimeout); err != nil {
		t.Fatal(err)
	}
}

// TestEnrollmentRefused checks that bad and reused single-use tokens are refused
// with a clear message, and, as a control, that single-use and reusable tokens
// work when they should.
func TestEnrollmentRefused(t *testing.T) {
	labels := map[string]string{"role": "test"}
	m := newMesh(t, []lab.NodeSpec{
		{Name: "first", Labels: labels},
		{Name: "second", Labels: labels},
		{Name: "third", Labels: labels},
		{Name: "fourth", Labels: labels},
	})
	ctx := context.Background()
	if err := m.StartController(ctx); err != nil {
		t.Fatal(err)
	}
	single, err := m.CreateToken(ctx, labels, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.StartAgent(m.Node("first"), single); err != nil {
		t.Fatal(err)
	}
	waitEnrolled(t, m, "first")

	decoded, err := jointoken.Decode(single)
	if err != nil {
		t.Fatalf("CLI printed a token that does not decode: %v", err)
	}
	forged := decoded // a well-formed token the controller never issued
	rand.Read(forged.ID[:])
	rand.Read(forged.Secret[:])
	otherCA := decoded // the real token, pinning some other controller's CA
	rand.Read(otherCA.CAFingerprint[:])

	refused := []struct {
		name, token string
		want        []string // the agent's output must hold one of these
	}{
		{"reused single-use token", single, []string{"already used"}},
		{"malformed token", "smjt1_not-a-token", []string{"malformed"}},
		{"unknown token", forged.String(), []string{"not valid", "invalid"}},
		{"token pinning another CA", otherCA.String(), []string{"does not match the join token"}},
	}
	for _, tt := range refused {
		t.Run(tt.name, func(t *testing.T) {
			n := m.Node("second")
			runCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
			defer cancel()
			if err := n.WriteToken(tt.token); err != nil {
				t.Fatal(err)
			}
			out, err := n.Host.Exec(runCtx, m.AgentCommand(n)...)
			var xe *lab.ExecError
			if !errors.As(err, &xe) || xe.ExitCode <= 0 {
				t.Fatalf("agent with a %s: %v (output %q); want it to exit non-zero on its own", tt.name, err, out)
			}
			msg := strings.ToLower(xe.Stdout + xe.Stderr)
			if !slices.ContainsFunc(tt.want, func(w string) bool { return strings.Contains(msg, w) }) {
				t.Errorf("agent with a %s exited %d with %q; want a message holding one of %q", tt.name, xe.ExitCode, msg, tt.want)
			}
			t.Logf("refused as expected (exit %d): %s", xe.ExitCode, strings.TrimSpace(xe.Stderr))
			st, err := m.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.Node(n.Name) != nil {
				t.Errorf("refused node %s is in status", n.Name)
			}
		})
	}

	// A stranger with a valid token and the public name of an enrolled node cannot
	// take it over (issue 6, defect 1): refused, and the node is unchanged.
	t.Run("takeover of an enrolled name", func(t *testing.T) {
		before, err := m.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		fresh, err := m.CreateToken(ctx, map[string]string{"role": "attacker"}, false)
		if err != nil {
			t.Fatal(err)
		}
		n := m.Node("second")
		if err := n.WriteToken(fresh); err != nil {
			t.Fatal(err)
		}
		args := m.AgentCommand(n)
		args[slices.Index(args, "--name")+1] = "first"
		runCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		_, err = n.Host.Exec(runCtx, args...)
		var xe *lab.ExecError
		if !errors.As(err, &xe) || xe.ExitCode <= 0 || !strings.Contains(xe.Stderr, "already enrolled") {
			t.Fatalf("agent taking over node first: %v; want a refusal saying it is already enrolled", err)
		}
		after, err := m.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		b, a := before.Node("first"), after.Node("first")
		if a == nil || fmt.Sprint(a.Labels, a.Addresses, a.Endpoint, a.PublicKey) != fmt.Sprint(b.Labels, b.Addresses, b.Endpoint, b.PublicKey) {
			t.Errorf("node first changed by the refused takeover:\nbefore %+v\nafter  %+v", b, a)
		}
	})

	t.Run("reusable token enrolls two nodes", func(t *testing.T) {
		reusable, err := m.CreateToken(ctx, labels, true)
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{"third", "fourth"} {
			if err := m.StartAgent(m.Node(name), reusable); err != nil {
				t.Fatal(err)
			}
		}
		waitEnrolled(t, m, "third", "fourth")
	})
}

// waitEnrolled waits until the named nodes are online in status with their labels.
func waitEnrolled(t *testing.T, m *lab.Mesh, names ...string) {
	t.Helper()
	err := lab.WaitFor(context.Background(), convergeTimeout, func(ctx context.Context) (bool, error) {
		for _, name := range names {
			if p := m.Node(name).Agent; !p.Running() {
				return false, lab.Abort(fmt.Errorf("agent on %s exited (%v):\n%s", name, p.Err(), p.Log()))
			}
		}
		st, err := m.Status(ctx)
		if err != nil {
			return false, err
		}
		for _, name := range names {
			ns := st.Node(name)
			if ns == nil || !ns.Online {
				return false, fmt.Errorf("%s not online in status", name)
			}
			if ns.Labels["role"] != "test" {
				return false, lab.Abort(fmt.Errorf("%s has labels %v, want the token's role=test", name, ns.Labels))
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
