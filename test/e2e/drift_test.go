package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"segmesh/test/lab"
)

// driftPolicy lets web reach api on tcp/8080; enough for both nodes to hold a
// peer, a set and a rule.
const driftPolicy = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: api
    selectors: [{role: api}]
rules:
  - name: web-to-api
    from: [web]
    to: [api]
    ports: [tcp/8080]
`

// driftNode is the part of one node of `segmesh status -o json` this test reads.
type driftNode struct {
	Name  string `json:"name"`
	Sync  string `json:"sync"`
	Error string `json:"error"`
	Drift struct {
		Repairs      uint64 `json:"repairs"`
		LastRepairAt string `json:"last_repair_at"`
		LastRepaired []struct {
			Part   string `json:"part"`
			Detail string `json:"detail"`
		} `json:"last_repaired"`
	} `json:"drift"`
}

// lastRepaired joins what the node's last repair restored as "part: detail; ...".
func (n driftNode) lastRepaired() string {
	var parts []string
	for _, d := range n.Drift.LastRepaired {
		parts = append(parts, d.Part+": "+d.Detail)
	}
	return strings.Join(parts, "; ")
}

// driftStatus returns node name from `segmesh status -o json`.
func driftStatus(ctx context.Context, m *lab.Mesh, name string) (driftNode, error) {
	out, err := m.CLI(ctx, "status", "-o", "json")
	if err != nil {
		return driftNode{}, err
	}
	var st struct {
		Nodes []driftNode `json:"nodes"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return driftNode{}, fmt.Errorf("decoding status %q: %w", out, err)
	}
	for _, n := range st.Nodes {
		if n.Name == name {
			return n, nil
		}
	}
	return driftNode{}, fmt.Errorf("node %s not in status:\n%s", name, out)
}

// overlayRoute returns the first IPv4 route on n's overlay interface.
func overlayRoute(ctx context.Context, n *lab.Node) (netip.Prefix, error) {
	out, err := n.Host.Exec(ctx, "ip", "-4", "route", "show", "dev", n.Interface)
	if err != nil {
		return netip.Prefix{}, err
	}
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			if p, err := netip.ParsePrefix(f[0]); err == nil {
				return p, nil
			}
		}
	}
	return netip.Prefix{}, fmt.Errorf("no IPv4 route on %s: %q", n.Interface, out)
}

// TestDriftRepairShowsInStatus removes the overlay route of one node behind its
// agent's back: the agent restores it, and `segmesh status` shows the repair
// (count, what it restored, when) with SYNC back at "in sync".
func TestDriftRepairShowsInStatus(t *testing.T) {
	m := newMesh(t, []lab.NodeSpec{
		{Name: "web-1", Labels: map[string]string{"role": "web"}},
		{Name: "api-1", Labels: map[string]string{"role": "api"}},
	})
	ctx := context.Background()
	policy := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(policy, []byte(driftPolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(ctx, policy, convergeTimeout); err != nil {
		t.Fatal(err)
	}
	n := m.Node("web-1")
	var before driftNode
	if err := lab.WaitFor(ctx, convergeTimeout, func(ctx context.Context) (bool, error) {
		st, err := driftStatus(ctx, m, n.Name)
		before = st
		if err == nil && st.Sync != "in sync" {
			err = fmt.Errorf("SYNC %q (error %q)", st.Sync, st.Error)
		}
		return err == nil, err
	}); err != nil {
		t.Fatalf("web-1 in sync before the drift: %v", err)
	}

	route, err := overlayRoute(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	removed := time.Now()
	if _, err := n.Host.Exec(ctx, "ip", "route", "del", route.String(), "dev", n.Interface); err != nil {
		t.Fatalf("removing route %s: %v", route, err)
	}
	var after driftNode
	err = lab.WaitFor(ctx, convergeTimeout, func(ctx context.Context) (bool, error) {
		if got, err := overlayRoute(ctx, n); err != nil || got != route {
			return false, fmt.Errorf("route %s not restored yet (%v, %v)", route, got, err)
		}
		st, err := driftStatus(ctx, m, n.Name)
		if err != nil {
			return false, err
		}
		after = st
		switch {
		case st.Drift.Repairs < before.Drift.Repairs+1:
			return false, fmt.Errorf("%d drift repairs, want more than %d", st.Drift.Repairs, before.Drift.Repairs)
		case !strings.Contains(st.lastRepaired(), "route: missing ["+route.String()):
			return false, fmt.Errorf("the last repair restored %q, want it to name route %s", st.lastRepaired(), route)
		case st.Sync != "in sync":
			return false, fmt.Errorf("SYNC %q (error %q)", st.Sync, st.Error)
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("after removing route %s on web-1: %v", route, err)
	}
	t.Logf("status showed the repair %v after the route was removed: %d repairs, the last at %s: %s",
		time.Since(removed).Round(time.Millisecond), after.Drift.Repairs, after.Drift.LastRepairAt, after.lastRepaired())
	if at, err := time.Parse(time.RFC3339, after.Drift.LastRepairAt); err != nil || at.Before(removed.Truncate(time.Second)) {
		t.Errorf("last repair at %q (%v), want a time after the route was removed (%s)", after.Drift.LastRepairAt, err, removed.UTC().Format(time.RFC3339))
	}

	// The table shows the same: web-1 in sync, DRIFT "N (…s ago)".
	out, err := m.CLI(ctx, "status")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"in", "sync", fmt.Sprint(after.Drift.Repairs)}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 10 || f[0] != n.Name {
			continue
		}
		// NODE STATE ONLINE DESIRED APPLIED, then SYNC and DRIFT
		if got := f[5:8]; !slices.Equal(got, want) || !strings.HasPrefix(f[8], "(") {
			t.Errorf("status table row %q: SYNC and DRIFT %q, want %q and \"(… ago)\":\n%s", line, f[5:9], want, out)
		}
	}
}
