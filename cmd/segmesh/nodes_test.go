package main

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"segmesh/api/segmeshv1"
)

// TestNodeDetail: the derived lines of `nodes show` (current or not, peers,
// missing peers) for the cases that change them.
func TestNodeDetail(t *testing.T) {
	now := time.Date(2026, 12, 2, 5, 0, 0, 0, time.UTC)
	recent, old := now.Add(-10*time.Second).Unix(), now.Add(-5*time.Minute).Unix()
	node := func(edit func(n *segmeshv1.NodeStatus)) *segmeshv1.NodeStatus {
		n := &segmeshv1.NodeStatus{Name: "web-1", State: "active", Online: true, DesiredRevision: 4, AppliedRevision: 4, DesiredHash: "h4", AppliedHash: "h4",
			LastReportUnix: now.Unix(), Peers: []*segmeshv1.PeerStatus{{Name: "db-1", LastHandshakeUnix: old}, {Name: "api-1", LastHandshakeUnix: recent}}}
		if edit != nil {
			edit(n)
		}
		return n
	}
	many := func(n *segmeshv1.NodeStatus, stale bool) {
		n.Peers = nil
		for i := range 64 {
			hs := recent
			if stale {
				hs = old
			}
			n.Peers = append(n.Peers, &segmeshv1.PeerStatus{Name: fmt.Sprintf("n-%d", i), LastHandshakeUnix: hs})
		}
		n.PeersMore = 6
	}
	tests := []struct {
		name        string
		node        *segmeshv1.NodeStatus
		desired     []string
		known       bool
		wantApplied string
		wantPeers   string
		wantMissing string
	}{
		{name: "current, all held", node: node(nil), desired: []string{"api-1", "db-1"}, known: true,
			wantApplied: "4 (current)", wantPeers: "2 in the kernel, 1 with a handshake in the last 3 minutes", wantMissing: "none"},
		{name: "a desired peer missing", node: node(nil), desired: []string{"api-1", "db-1", "ops-1"}, known: true,
			wantApplied: "4 (current)", wantPeers: "2 in the kernel, 1 with a handshake in the last 3 minutes", wantMissing: "ops-1"},
		{name: "older revision", node: node(func(n *segmeshv1.NodeStatus) { n.AppliedRevision, n.AppliedHash = 3, "h3" }), known: true,
			wantApplied: "3 (not current: desired 4)", wantPeers: "2 in the kernel, 1 with a handshake in the last 3 minutes", wantMissing: "none"},
		{name: "same revision, newer netmap", node: node(func(n *segmeshv1.NodeStatus) { n.AppliedHash = "h4-before" }), known: true,
			wantApplied: "4 (not current: its netmap changed since)", wantPeers: "2 in the kernel, 1 with a handshake in the last 3 minutes", wantMissing: "none"},
		{name: "never reported", node: node(func(n *segmeshv1.NodeStatus) {
			n.AppliedRevision, n.AppliedHash, n.LastReportUnix, n.Peers = 0, "", 0, nil
		}),
			desired: []string{"db-1"}, known: true, wantApplied: "0 (not current: the agent has reported no netmap)", wantPeers: "", wantMissing: ""},
		{name: "peers left out after recent ones", node: node(func(n *segmeshv1.NodeStatus) { many(n, false) }), desired: []string{"ops-1"}, known: true,
			wantApplied: "4 (current)", wantPeers: "70 in the kernel (6 not listed), 70 with a handshake in the last 3 minutes", wantMissing: "unknown: the agent's report left peers out"},
		{name: "peers left out, all listed stale", node: node(func(n *segmeshv1.NodeStatus) { many(n, true) }), known: true,
			wantApplied: "4 (current)", wantPeers: "70 in the kernel (6 not listed), none of the 64 listed with a handshake in the last 3 minutes", wantMissing: "unknown: the agent's report left peers out"},
		{name: "older controller", node: node(nil), known: false,
			wantApplied: "4 (current)", wantPeers: "2 in the kernel, 1 with a handshake in the last 3 minutes", wantMissing: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := toNodeDetailJSON(tt.node, tt.desired, tt.known)
			if got := d.appliedRevision(); got != tt.wantApplied {
				t.Errorf("applied revision %q, want %q", got, tt.wantApplied)
			}
			if got := d.peersSummary(now); got != tt.wantPeers {
				t.Errorf("peers %q, want %q", got, tt.wantPeers)
			}
			if got := d.missingPeers(); got != tt.wantMissing {
				t.Errorf("missing peers %q, want %q", got, tt.wantMissing)
			}
			if tt.known && !slices.Equal(d.DesiredPeers, append([]string{}, tt.desired...)) {
				t.Errorf("desired peers %q, want %q", d.DesiredPeers, tt.desired)
			}
		})
	}
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB", 3 << 20: "3.0 MiB",
		5 << 30: "5.0 GiB", 1 << 40: "1.0 TiB", 1<<64 - 1: "16.0 EiB"} {
		if got := formatBytes(n); got != want {
			t.Errorf("formatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestPeerPathText(t *testing.T) {
	tests := []struct{ path, relay, want string }{
		{"direct", "", "direct"},
		{"relay", "relay-1", "relay via relay-1"},
		{"relay", "", "relay"},
		{"", "", "-"},
		{"", "relay-1", "-"},
	}
	for _, tt := range tests {
		if got := (wgPeerJSON{Path: tt.path, Relay: tt.relay}).pathText(); got != tt.want {
			t.Errorf("path %q relay %q: %q, want %q", tt.path, tt.relay, got, tt.want)
		}
	}
}
