package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"segmesh/test/lab"
)

// nodeShow is the part of `segmesh nodes show NAME -o json` this test reads.
type nodeShow struct {
	Name            string     `json:"name"`
	AppliedRevision uint64     `json:"applied_revision"`
	DesiredRevision uint64     `json:"desired_revision"`
	Current         bool       `json:"current"`
	Segments        []string   `json:"segments"`
	Interface       string     `json:"interface"`
	Version         string     `json:"version"`
	LastApplyAt     string     `json:"last_apply_at"`
	LastReportAt    string     `json:"last_report_at"`
	DesiredPeers    []string   `json:"desired_peers"`
	MissingPeers    []string   `json:"missing_peers"`
	Peers           []peerShow `json:"peers"`
}

// peerShow is one peer of nodeShow.
type peerShow struct {
	Name            string `json:"name"`
	Endpoint        string `json:"endpoint"`
	LastHandshakeAt string `json:"last_handshake_at"`
	RxBytes         uint64 `json:"rx_bytes"`
	TxBytes         uint64 `json:"tx_bytes"`
}

// TestNodesShow: once the mesh is up and web-1 has talked to api-1, `segmesh
// nodes show web-1` lists api-1 as a WireGuard peer with an endpoint, a recent
// handshake and traffic both ways, the revision web-1 enforces (current), its
// segments, and its latest apply.
func TestNodesShow(t *testing.T) {
	var nodes []lab.NodeSpec
	for _, n := range lab.ExampleNodes() {
		if n.Name == "web-1" || n.Name == "api-1" || n.Name == "db-1" {
			nodes = append(nodes, n)
		}
	}
	m := newMesh(t, nodes)
	ctx := context.Background()
	start := time.Now()
	st, err := m.Up(ctx, examplePolicy(), convergeTimeout)
	if err != nil {
		t.Fatal(err)
	}
	apiAddr, ok := st.Node("api-1").Addr(4)
	if !ok {
		t.Fatal("api-1 has no IPv4 overlay address")
	}
	conn, err := m.Node("web-1").Host.DialTCP(ctx, netip.AddrPortFrom(apiAddr, 8080))
	if err != nil {
		t.Fatalf("web-1 -> api-1 tcp/8080 (allowed by the example policy): %v", err)
	}
	conn.Close()

	// The handshake reaches the controller with the agent's next periodic
	// report after its next read of the device: poll.
	var n nodeShow
	var out string
	err = lab.WaitFor(ctx, 90*time.Second, func(ctx context.Context) (bool, error) {
		if out, err = m.CLI(ctx, "nodes", "show", "web-1", "-o", "json"); err != nil {
			return false, err
		}
		n = nodeShow{}
		if err := json.Unmarshal([]byte(out), &n); err != nil {
			return false, lab.Abort(fmt.Errorf("decoding nodes show: %w\n%s", err, out))
		}
		i := slices.IndexFunc(n.Peers, func(p peerShow) bool { return p.Name == "api-1" })
		if i < 0 || n.Peers[i].LastHandshakeAt == "" {
			return false, fmt.Errorf("no handshake with api-1 reported yet: %s", out)
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	p := n.Peers[0]
	hs, err := time.Parse(time.RFC3339, p.LastHandshakeAt)
	if len(n.Peers) != 1 || p.Name != "api-1" || err != nil || hs.Before(start.Add(-time.Second)) {
		t.Errorf("peers %+v, want api-1 alone with a handshake since the test started", n.Peers)
	}
	if ep, err := netip.ParseAddrPort(p.Endpoint); err != nil || ep.Addr() != m.Node("api-1").Host.Addr {
		t.Errorf("api-1's endpoint %q, want api-1's underlay address %v", p.Endpoint, m.Node("api-1").Host.Addr)
	}
	if p.RxBytes == 0 || p.TxBytes == 0 {
		t.Errorf("api-1: %d bytes received, %d sent; want traffic both ways", p.RxBytes, p.TxBytes)
	}
	if n.AppliedRevision != st.PolicyRevision || n.DesiredRevision != st.PolicyRevision || !n.Current {
		t.Errorf("web-1 enforces revision %d (current %v), want %d", n.AppliedRevision, n.Current, st.PolicyRevision)
	}
	if !slices.Equal(n.Segments, []string{"web"}) || n.Interface != m.Node("web-1").Interface || n.Version == "" {
		t.Errorf("web-1: segments %q, interface %q, version %q; want [web], %q and a version", n.Segments, n.Interface, n.Version, m.Node("web-1").Interface)
	}
	if at, err := time.Parse(time.RFC3339, n.LastApplyAt); err != nil || at.Before(start.Add(-time.Second)) || at.After(time.Now()) {
		t.Errorf("web-1's last apply %q, want a time since the test started", n.LastApplyAt)
	}
	if !slices.Equal(n.DesiredPeers, []string{"api-1"}) || n.MissingPeers == nil || len(n.MissingPeers) != 0 {
		t.Errorf("desired peers %q, missing %q; want [api-1] and none missing", n.DesiredPeers, n.MissingPeers)
	}
	table, err := m.CLI(ctx, "nodes", "show", "web-1")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("segmesh nodes show web-1:\n%s", table)
}
