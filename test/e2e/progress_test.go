package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"segmesh/test/lab"
)

// applyWaitJSON is the part of `segmesh policy apply --wait -o json` the test reads.
type applyWaitJSON struct {
	Revision  uint64 `json:"revision"`
	Unchanged bool   `json:"unchanged"`
	Wait      *struct {
		Enforced        bool   `json:"enforced"`
		ServingRevision uint64 `json:"serving_revision"`
		NodesActive     int    `json:"nodes_active"`
		NodesOnline     int    `json:"nodes_online"`
		NodesEnforcing  int    `json:"nodes_enforcing"`
		Pending         []struct {
			Name string `json:"name"`
		} `json:"pending"`
		Skipped []struct {
			Name string `json:"name"`
		} `json:"skipped"`
	} `json:"wait"`
}

// applyWait runs `segmesh policy apply --wait -o json FILE` and fails the test
// unless it exits 0 with every online node enforcing the revision.
func applyWait(t *testing.T, m *lab.Mesh, file string) applyWaitJSON {
	t.Helper()
	start := time.Now()
	out, err := m.CLI(context.Background(), "policy", "apply", "--wait", "--timeout", (lab.CLITimeout - 5*time.Second).String(), "-o", "json", file)
	if err != nil {
		t.Fatalf("policy apply --wait: %v\nstdout:\n%s", err, out)
	}
	var doc applyWaitJSON
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("policy apply --wait -o json: %v\n%s", err, out)
	}
	if w := doc.Wait; w == nil || !w.Enforced || w.NodesEnforcing != w.NodesOnline || len(w.Pending) != 0 || w.ServingRevision < doc.Revision {
		t.Fatalf("policy apply --wait exited 0 without every online node enforcing revision %d:\n%s", doc.Revision, out)
	}
	t.Logf("policy apply --wait %s: revision %d enforced by %d online nodes after %v", filepath.Base(file), doc.Revision, doc.Wait.NodesOnline, time.Since(start).Round(time.Millisecond))
	return doc
}

// requireEnforcedNow reads status once (no waiting) and fails the test unless the
// controller's counts are active, online, current, unless they match its node
// list, and unless every node online enforces revision rev.
func requireEnforcedNow(t *testing.T, m *lab.Mesh, rev uint64, active, online, current uint32) {
	t.Helper()
	st, err := m.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var listed [3]uint32
	var behind []string
	for _, n := range st.Nodes {
		listed[0]++
		if n.Online {
			listed[1]++
			if n.AppliedRevision != rev || n.AppliedHash == "" || n.AppliedHash != n.DesiredHash {
				behind = append(behind, fmt.Sprintf("%s: applied revision %d hash %.12s, desired %d hash %.12s", n.Name, n.AppliedRevision, n.AppliedHash, n.DesiredRevision, n.DesiredHash))
			}
		}
		if n.AppliedHash != "" && n.AppliedHash == n.DesiredHash {
			listed[2]++
		}
	}
	if len(behind) > 0 {
		t.Errorf("right after apply --wait returned, online nodes do not enforce revision %d: %s", rev, strings.Join(behind, "; "))
	}
	got := [3]uint32{st.NodesActive, st.NodesOnline, st.NodesCurrent}
	if want := [3]uint32{active, online, current}; got != want || got != listed {
		t.Errorf("status counts active/online/current %v, want %v (the node list says %v)", got, want, listed)
	}
}

// TestPolicyApplyWait: `policy apply --wait` returns 0 only once every online
// agent enforces the new revision, which status then shows at once, counts
// included; an offline node is skipped, not waited for, and waited for again
// once it is back.
func TestPolicyApplyWait(t *testing.T) {
	m := newMesh(t, lab.ExampleNodes())
	ctx := context.Background()
	if err := m.StartController(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.EnrollAll(ctx); err != nil {
		t.Fatal(err)
	}
	// Every agent online and enforcing default deny: the apply below has to
	// reach five running agents.
	if _, err := m.WaitConverged(ctx, 0, convergeTimeout); err != nil {
		t.Fatal(err)
	}

	doc := applyWait(t, m, examplePolicy())
	if w := doc.Wait; doc.Revision != 1 || w.NodesActive != 5 || w.NodesOnline != 5 || len(w.Skipped) != 0 {
		t.Errorf("first apply: revision %d, %d active, %d online, %d skipped; want revision 1, 5, 5, 0", doc.Revision, w.NodesActive, w.NodesOnline, len(w.Skipped))
	}
	requireEnforcedNow(t, m, 1, 5, 5, 5)

	// ops-1 goes offline; revision 2 changes every netmap (the rule comments
	// carry the policy's file name, which differs), ops-1's included.
	ops := m.Node("ops-1")
	if err := ops.Agent.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	err := lab.WaitFor(ctx, convergeTimeout, func(ctx context.Context) (bool, error) {
		st, err := m.Status(ctx)
		if err != nil {
			return false, err
		}
		if n := st.Node("ops-1"); n == nil || n.Online {
			return false, fmt.Errorf("ops-1 still online")
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	example, err := os.ReadFile(examplePolicy())
	if err != nil {
		t.Fatal(err)
	}
	changed := strings.Replace(string(example), "ports: [tcp/5432]", "ports: [tcp/5432, tcp/6432]", 1)
	if changed == string(example) {
		t.Fatal("examples/policy.yaml has no api-to-db rule on tcp/5432 to change")
	}
	file := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(file, []byte(changed), 0o644); err != nil {
		t.Fatal(err)
	}
	doc = applyWait(t, m, file)
	skipped := []string{}
	for _, n := range doc.Wait.Skipped {
		skipped = append(skipped, n.Name)
	}
	if doc.Revision != 2 || doc.Wait.NodesOnline != 4 || !slices.Equal(skipped, []string{"ops-1"}) {
		t.Errorf("apply with ops-1 offline: revision %d, %d online, skipped %v; want revision 2, 4 online, ops-1 skipped", doc.Revision, doc.Wait.NodesOnline, skipped)
	}
	// ops-1 was skipped: it enforces revision 1, so it is not current.
	requireEnforcedNow(t, m, 2, 5, 4, 4)

	// Back online, ops-1 is waited for again: the same file again stores nothing
	// and waits for all five.
	if err := ops.Agent.Restart(); err != nil {
		t.Fatal(err)
	}
	err = lab.WaitFor(ctx, convergeTimeout, func(ctx context.Context) (bool, error) {
		st, err := m.Status(ctx)
		if err != nil {
			return false, err
		}
		if n := st.Node("ops-1"); n == nil || !n.Online {
			return false, fmt.Errorf("ops-1 not online yet")
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	doc = applyWait(t, m, file)
	if !doc.Unchanged || doc.Revision != 2 || doc.Wait.NodesOnline != 5 || len(doc.Wait.Skipped) != 0 {
		t.Errorf("apply again with ops-1 back: unchanged %v revision %d, %d online, %d skipped; want unchanged revision 2, 5 online, none skipped",
			doc.Unchanged, doc.Revision, doc.Wait.NodesOnline, len(doc.Wait.Skipped))
	}
	requireEnforcedNow(t, m, 2, 5, 5, 5)
}
