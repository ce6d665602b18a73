package agent

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"segmesh/agent/dataplane"
	"segmesh/agent/flowlog"
	"segmesh/agent/netmap"
	"segmesh/agent/reconcile"
)

func TestAgentMetrics(t *testing.T) {
	key := func(b byte) dataplane.Key {
		var k dataplane.Key
		k[0] = b
		return k
	}
	now := time.Date(2026, 12, 2, 4, 0, 0, 0, time.UTC)
	nm := &netmap.Netmap{Revision: 4, Peers: []netmap.Peer{{Name: "db-1", PublicKey: key(1)}, {Name: "web-2", PublicKey: key(2)}}}
	flows := flowlog.New()
	m := newAgentMetrics(func() uint64 { return 4 }, func() *netmap.Netmap { return nm }, &peerTable{}, flows.Stats, func() time.Time { return now })
	reg := prometheus.NewRegistry()
	if err := m.register(reg); err != nil {
		t.Fatal(err)
	}

	// Before any read-back there is no peer count.
	if n, err := testutil.GatherAndCount(reg, "segmesh_agent_peers"); err != nil || n != 0 {
		t.Fatalf("peers before a read-back: %d series (%v), want none", n, err)
	}
	m.Applied(20*time.Millisecond, reconcile.Differences{})
	m.Applied(30*time.Millisecond, reconcile.Differences{Items: []dataplane.Difference{
		{Part: dataplane.PartPeer, Detail: "a"}, {Part: dataplane.PartPeer, Detail: "b"}, {Part: dataplane.PartRoute, Detail: "c"},
	}})
	m.Observed(dataplane.Observed{
		State: dataplane.State{Peers: []dataplane.Peer{{PublicKey: key(1)}, {PublicKey: key(2)}, {PublicKey: key(3)}}},
		PeerStats: map[dataplane.Key]dataplane.PeerStats{
			key(1): {LastHandshake: now.Add(-42 * time.Second)},
			key(3): {LastHandshake: now.Add(-5 * time.Second)}, // not in the netmap: named by its key
			// key(2): no handshake yet
		},
	})

	// Two reads of the kernel, the rules recreated in between (a new epoch restarts
	// the ingress counter from 0): the counters keep growing.
	flow := dataplane.DeniedFlow{Direction: dataplane.DirectionIn, Src: netip.MustParseAddr("100.64.0.2"), Dst: netip.MustParseAddr("100.64.0.1"),
		Protocol: 6, Port: 22, Packets: 3, Bytes: 180}
	flows.Observe(now, dataplane.Denied{Flows: []dataplane.DeniedFlow{flow},
		In: dataplane.DropCounter{Packets: 3, Bytes: 180, Epoch: 1}, Out: dataplane.DropCounter{Packets: 1, Bytes: 40, Epoch: 2}})
	flow.Packets, flow.Bytes = 5, 300
	flows.Observe(now.Add(10*time.Second), dataplane.Denied{Flows: []dataplane.DeniedFlow{flow},
		In: dataplane.DropCounter{Packets: 2, Bytes: 120, Epoch: 9}, Out: dataplane.DropCounter{Packets: 1, Bytes: 40, Epoch: 2}})

	want := `
# HELP segmesh_agent_denied_flow_records_total Denied-flow records: a flow counts once for every read of the kernel that found more of its packets dropped.
# TYPE segmesh_agent_denied_flow_records_total counter
segmesh_agent_denied_flow_records_total 2
# HELP segmesh_agent_dropped_bytes_total Bytes (IP header and payload) the policy dropped on the overlay interface, by direction, as of the latest read of the kernel's drop counters.
# TYPE segmesh_agent_dropped_bytes_total counter
segmesh_agent_dropped_bytes_total{direction="in"} 300
segmesh_agent_dropped_bytes_total{direction="out"} 40
# HELP segmesh_agent_dropped_packets_total Packets the policy dropped on the overlay interface, by direction (in: to this node, out: from it), as of the latest read of the kernel's drop counters.
# TYPE segmesh_agent_dropped_packets_total counter
segmesh_agent_dropped_packets_total{direction="in"} 5
segmesh_agent_dropped_packets_total{direction="out"} 1
# HELP segmesh_agent_drift_repairs_total Drift repairs by the dataplane part they restored (interface, wireguard, peer, address, route, nftables); a repair of several parts counts once for each.
# TYPE segmesh_agent_drift_repairs_total counter
segmesh_agent_drift_repairs_total{part="address"} 0
segmesh_agent_drift_repairs_total{part="interface"} 0
segmesh_agent_drift_repairs_total{part="nftables"} 0
segmesh_agent_drift_repairs_total{part="peer"} 1
segmesh_agent_drift_repairs_total{part="route"} 1
segmesh_agent_drift_repairs_total{part="wireguard"} 0
# HELP segmesh_agent_peer_last_handshake_seconds Seconds since the latest WireGuard handshake with each peer (by node name), as of the latest read-back; peers without a handshake yet are left out.
# TYPE segmesh_agent_peer_last_handshake_seconds gauge
segmesh_agent_peer_last_handshake_seconds{peer="AwAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="} 5
segmesh_agent_peer_last_handshake_seconds{peer="db-1"} 42
# HELP segmesh_agent_peers WireGuard peers on the overlay interface, as of the latest read-back.
# TYPE segmesh_agent_peers gauge
segmesh_agent_peers 3
# HELP segmesh_agent_policy_revision Policy revision of the netmap the dataplane enforces (0: default deny).
# TYPE segmesh_agent_policy_revision gauge
segmesh_agent_policy_revision 4
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"segmesh_agent_drift_repairs_total", "segmesh_agent_peer_last_handshake_seconds", "segmesh_agent_peers", "segmesh_agent_policy_revision",
		"segmesh_agent_dropped_packets_total", "segmesh_agent_dropped_bytes_total", "segmesh_agent_denied_flow_records_total"); err != nil {
		t.Error(err)
	}
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == "segmesh_agent_apply_seconds" {
			h := f.GetMetric()[0].GetHistogram()
			if h.GetSampleCount() != 2 || h.GetSampleSum() < 0.0499 || h.GetSampleSum() > 0.0501 {
				t.Errorf("apply seconds: %d samples summing %g, want 2 summing 0.05", h.GetSampleCount(), h.GetSampleSum())
			}
		}
	}
}
