package main

import (
	"strings"
	"testing"
	"time"

	"segmesh/api/segmeshv1"
)

// TestSyncAndDriftColumns: SYNC says "in sync" only when the node enforces its
// latest netmap and its agent's latest read-back found exactly that; DRIFT counts
// repairs and says how long ago the latest was.
func TestSyncAndDriftColumns(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	at := func(d time.Duration) int64 { return now.Add(-d).Unix() }
	inSync := func(edit func(n *segmeshv1.NodeStatus)) *segmeshv1.NodeStatus {
		n := &segmeshv1.NodeStatus{Name: "web-1", State: "active", Online: true, DesiredRevision: 4, AppliedRevision: 4,
			DesiredHash: "h4", AppliedHash: "h4", InSync: true}
		if edit != nil {
			edit(n)
		}
		return n
	}
	tests := []struct {
		name      string
		node      *segmeshv1.NodeStatus
		wantSync  string
		wantDrift string
	}{
		{name: "in sync, never repaired", node: inSync(nil), wantSync: "in sync", wantDrift: "0"},
		{name: "in sync after repairs", node: inSync(func(n *segmeshv1.NodeStatus) {
			n.Drift = &segmeshv1.Drift{Repairs: 3, LastRepairUnix: at(2*time.Minute + 5*time.Second)}
		}), wantSync: "in sync", wantDrift: "3 (2m ago)"},
		{name: "seconds", node: inSync(func(n *segmeshv1.NodeStatus) {
			n.Drift = &segmeshv1.Drift{Repairs: 1, LastRepairUnix: at(7 * time.Second)}
		}), wantSync: "in sync", wantDrift: "1 (7s ago)"},
		{name: "hours", node: inSync(func(n *segmeshv1.NodeStatus) {
			n.Drift = &segmeshv1.Drift{Repairs: 12, LastRepairUnix: at(5 * time.Hour)}
		}),
			wantSync: "in sync", wantDrift: "12 (5h ago)"},
		{name: "days", node: inSync(func(n *segmeshv1.NodeStatus) {
			n.Drift = &segmeshv1.Drift{Repairs: 2, LastRepairUnix: at(75 * time.Hour)}
		}),
			wantSync: "in sync", wantDrift: "2 (3d ago)"},
		{name: "the agent's clock is ahead", node: inSync(func(n *segmeshv1.NodeStatus) {
			n.Drift = &segmeshv1.Drift{Repairs: 1, LastRepairUnix: now.Add(time.Minute).Unix()}
		}), wantSync: "in sync", wantDrift: "1 (0s ago)"},
		{name: "drift not repaired yet", node: inSync(func(n *segmeshv1.NodeStatus) {
			n.InSync = false
			n.Drift = &segmeshv1.Drift{Repairs: 1, LastRepairUnix: at(time.Hour), Unrepaired: []*segmeshv1.DriftDifference{{Part: "route", Detail: "missing [100.64.0.0/10]"}}, UnrepairedMore: 2}
		}), wantSync: "drift", wantDrift: "1 (1h ago) +3 unrepaired"},
		{name: "an agent that does not say it read back", node: inSync(func(n *segmeshv1.NodeStatus) { n.InSync = false }), wantSync: "drift", wantDrift: "0"},
		{name: "error", node: inSync(func(n *segmeshv1.NodeStatus) { n.InSync, n.Error = false, "nftables: boom" }), wantSync: "error", wantDrift: "0"},
		{name: "older revision", node: inSync(func(n *segmeshv1.NodeStatus) { n.AppliedRevision, n.AppliedHash = 3, "h3" }), wantSync: "pending", wantDrift: "0"},
		{name: "same revision, newer netmap", node: inSync(func(n *segmeshv1.NodeStatus) { n.AppliedHash = "h4-before-enroll" }), wantSync: "pending", wantDrift: "0"},
		{name: "offline", node: inSync(func(n *segmeshv1.NodeStatus) { n.Online = false }), wantSync: "offline", wantDrift: "0"},
		{name: "revoked", node: inSync(func(n *segmeshv1.NodeStatus) { n.State, n.Online = "revoked", false }), wantSync: "", wantDrift: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := toNodeJSON(tt.node)
			if n.Sync != tt.wantSync {
				t.Errorf("SYNC %q, want %q", n.Sync, tt.wantSync)
			}
			if got := n.driftCell(now); got != tt.wantDrift {
				t.Errorf("DRIFT %q, want %q", got, tt.wantDrift)
			}
			var out strings.Builder
			if err := (statusJSON{Nodes: []nodeJSON{n}}).writeTable(&out, now); err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimSpace(out.String()), "\n")
			header, row := lines[len(lines)-2], lines[len(lines)-1]
			col := strings.Index(header, "DRIFT")
			if want := orDash(tt.wantDrift); !strings.HasPrefix(row[col:], want+"  ") {
				t.Errorf("DRIFT column of %q is not %q:\n%s", row, want, out.String())
			}
		})
	}
}
