package agent

import (
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"segmesh/agent/dataplane"
	"segmesh/agent/flowlog"
	"segmesh/agent/netmap"
	"segmesh/agent/path"
	"segmesh/agent/reconcile"
	"segmesh/agent/relay"
)

// Metrics (see docs/metrics.md). The agent registers them with Options.Metrics;
// without a registerer they are kept but never exported.

// driftParts are the dataplane parts segmesh_agent_drift_repairs_total counts,
// exported at 0 before any repair.
var driftParts = []string{
	dataplane.PartInterface, dataplane.PartWireGuard, dataplane.PartPeer,
	dataplane.PartAddress, dataplane.PartRoute, dataplane.PartNftables,
}

// agentMetrics holds the agent's collectors; it is the reconciler's Observer.
type agentMetrics struct {
	revision     prometheus.GaugeFunc
	applySeconds prometheus.Histogram
	repairs      *prometheus.CounterVec
	peers        *peersCollector
	drops        *dropsCollector
}

// newAgentMetrics returns the collectors of an agent whose enforced revision
// revision returns, whose netmap (for peer names) netmapOf returns and whose
// denied-flow totals flows returns; the peers of each read-back go into peers,
// which the peer metrics read.
func newAgentMetrics(revision func() uint64, netmapOf func() *netmap.Netmap, peers *peerTable, flows func() flowlog.Stats, now func() time.Time) *agentMetrics {
	m := &agentMetrics{
		revision: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "segmesh_agent_policy_revision",
			Help: "Policy revision of the netmap the dataplane enforces (0: default deny).",
		}, func() float64 { return float64(revision()) }),
		applySeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "segmesh_agent_apply_seconds",
			Help:    "Duration of successful dataplane applies (WireGuard, addresses, routes, nftables), in seconds.",
			Buckets: prometheus.ExponentialBuckets(0.001, 3, 10), // 1 ms to about 20 s
		}),
		repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "segmesh_agent_drift_repairs_total",
			Help: "Drift repairs by the dataplane part they restored (interface, wireguard, peer, address, route, nftables); a repair of several parts counts once for each.",
		}, []string{"part"}),
		peers: &peersCollector{
			table:  peers,
			netmap: netmapOf,
			now:    now,
			peers:  prometheus.NewDesc("segmesh_agent_peers", "WireGuard peers on the overlay interface, as of the latest read-back.", nil, nil),
			byPath: prometheus.NewDesc("segmesh_agent_peers_by_path", "WireGuard peers by the path in use: direct, relay, or unknown (no path proven yet, or the device's endpoint is not the chosen one), as of the latest read-back.", []string{"path"}, nil),
			handshake: prometheus.NewDesc("segmesh_agent_peer_last_handshake_seconds",
				"Seconds since the latest WireGuard handshake with each peer (by node name), as of the latest read-back; peers without a handshake yet are left out.", []string{"peer"}, nil),
		},
		drops: &dropsCollector{
			stats: flows,
			packets: prometheus.NewDesc("segmesh_agent_dropped_packets_total",
				"Packets the policy dropped on the overlay interface, by direction (in: to this node, out: from it), as of the latest read of the kernel's drop counters.", []string{"direction"}, nil),
			bytes: prometheus.NewDesc("segmesh_agent_dropped_bytes_total",
				"Bytes (IP header and payload) the policy dropped on the overlay interface, by direction, as of the latest read of the kernel's drop counters.", []string{"direction"}, nil),
			records: prometheus.NewDesc("segmesh_agent_denied_flow_records_total",
				"Denied-flow records: a flow counts once for every read of the kernel that found more of its packets dropped.", nil, nil),
		},
	}
	for _, p := range driftParts {
		m.repairs.WithLabelValues(p)
	}
	return m
}

// register registers the collectors with r; nil r registers nothing.
func (m *agentMetrics) register(r prometheus.Registerer) error {
	if r == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{m.revision, m.applySeconds, m.repairs, m.peers, m.drops} {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// Applied implements reconcile.Observer.
func (m *agentMetrics) Applied(took time.Duration, repaired reconcile.Differences) {
	m.applySeconds.Observe(took.Seconds())
	seen := map[string]bool{}
	for _, d := range repaired.Items {
		if !seen[d.Part] && slices.Contains(driftParts, d.Part) {
			seen[d.Part] = true
			m.repairs.WithLabelValues(d.Part).Inc()
		}
	}
}

// Observed implements reconcile.Observer: it records the read-back's peers in
// the peer table (which the reports read too).
func (m *agentMetrics) Observed(o dataplane.Observed) { m.peers.table.set(o) }

// pathUnknown is the path label of peers without a proven path.
const pathUnknown = "unknown"

// peersCollector exports the peers of the latest read-back.
type peersCollector struct {
	table     *peerTable
	netmap    func() *netmap.Netmap
	now       func() time.Time
	peers     *prometheus.Desc
	byPath    *prometheus.Desc
	handshake *prometheus.Desc
}

func (p *peersCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- p.peers
	ch <- p.byPath
	ch <- p.handshake
}

func (p *peersCollector) Collect(ch chan<- prometheus.Metric) {
	now := p.now()
	var handshakes []prometheus.Metric
	n := 0
	var paths map[dataplane.Key]path.Path
	if p.table.paths != nil {
		paths = p.table.paths()
	}
	byPath := map[string]int{path.Direct: 0, path.Relay: 0, pathUnknown: 0}
	read := p.table.visit(p.netmap(), func(peer *observedPeer) {
		n++
		if pa, ok := paths[peer.key]; ok && pa.Kind != "" && pa.Endpoint == peer.endpoint {
			byPath[pa.Kind]++
		} else {
			byPath[pathUnknown]++
		}
		hs := peer.stats.LastHandshake
		if hs.IsZero() {
			return
		}
		name := peer.name
		if name == "" {
			name = dataplane.KeyString(peer.key)
		}
		handshakes = append(handshakes, prometheus.MustNewConstMetric(p.handshake, prometheus.GaugeValue, max(0, now.Sub(hs).Seconds()), name))
	})
	if !read {
		return
	}
	ch <- prometheus.MustNewConstMetric(p.peers, prometheus.GaugeValue, float64(n))
	for k, v := range byPath {
		ch <- prometheus.MustNewConstMetric(p.byPath, prometheus.GaugeValue, float64(v), k)
	}
	for _, m := range handshakes {
		ch <- m
	}
}

// dropsCollector exports the drop totals of the agent's flow log. The kernel's
// counters restart with every new table or rule set; the log adds up their
// growth, so these are true counters for the life of the process.
type dropsCollector struct {
	stats                   func() flowlog.Stats
	packets, bytes, records *prometheus.Desc
}

func (d *dropsCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- d.packets
	ch <- d.bytes
	ch <- d.records
}

func (d *dropsCollector) Collect(ch chan<- prometheus.Metric) {
	st := d.stats()
	for _, dir := range []struct {
		name string
		t    flowlog.Totals
	}{{dataplane.DirectionIn, st.In}, {dataplane.DirectionOut, st.Out}} {
		ch <- prometheus.MustNewConstMetric(d.packets, prometheus.CounterValue, float64(dir.t.Packets), dir.name)
		ch <- prometheus.MustNewConstMetric(d.bytes, prometheus.CounterValue, float64(dir.t.Bytes), dir.name)
	}
	ch <- prometheus.MustNewConstMetric(d.records, prometheus.CounterValue, float64(st.Records))
}

// relayCollector exports the relay forwarder's counters (relay nodes only).
type relayCollector struct {
	stats                             func() relay.Stats
	sessions, packets, bytes, dropped *prometheus.Desc
}

func newRelayCollector(stats func() relay.Stats) *relayCollector {
	return &relayCollector{
		stats:    stats,
		sessions: prometheus.NewDesc("segmesh_agent_relay_sessions", "Relay sessions (authorised pairs of nodes) this node forwards for now.", nil, nil),
		packets:  prometheus.NewDesc("segmesh_agent_relay_packets_total", "WireGuard packets this node relayed.", nil, nil),
		bytes:    prometheus.NewDesc("segmesh_agent_relay_bytes_total", "Bytes (UDP payload) this node relayed.", nil, nil),
		dropped: prometheus.NewDesc("segmesh_agent_relay_dropped_packets_total",
			"Packets the relay refused, by reason (unauthorised: no session's keys, or not from a latched end; replay; rate; malformed; ...).", []string{"reason"}, nil),
	}
}

func (c *relayCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.sessions
	ch <- c.packets
	ch <- c.bytes
	ch <- c.dropped
}

func (c *relayCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.stats()
	ch <- prometheus.MustNewConstMetric(c.sessions, prometheus.GaugeValue, float64(st.Sessions))
	ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(st.Packets))
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(st.Bytes))
	for reason, n := range st.Dropped {
		ch <- prometheus.MustNewConstMetric(c.dropped, prometheus.CounterValue, float64(n), reason)
	}
}

// controllerCollector exports which controller the agent uses and how often it
// moved to another one.
type controllerCollector struct {
	ctl                   *controllers
	switches, info, known *prometheus.Desc
}

func newControllerCollector(ctl *controllers) *controllerCollector {
	return &controllerCollector{
		ctl: ctl,
		switches: prometheus.NewDesc("segmesh_agent_controller_switches_total",
			"Moves of the agent to another controller URL (failover after its stream was lost, or re-enrollment at another replica).", nil, nil),
		info: prometheus.NewDesc("segmesh_agent_controller_info",
			"The controller URL the agent uses for its stream and every call: always 1, with the URL as label.", []string{"url"}, nil),
		known: prometheus.NewDesc("segmesh_agent_controllers", "Controller URLs the agent knows (from --controller and from the controllers).", nil, nil),
	}
}

func (c *controllerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.switches
	ch <- c.info
	ch <- c.known
}

func (c *controllerCollector) Collect(ch chan<- prometheus.Metric) {
	urls, cur := c.ctl.snapshot()
	ch <- prometheus.MustNewConstMetric(c.switches, prometheus.CounterValue, float64(c.ctl.switchCount()))
	ch <- prometheus.MustNewConstMetric(c.info, prometheus.GaugeValue, 1, cur)
	ch <- prometheus.MustNewConstMetric(c.known, prometheus.GaugeValue, float64(len(urls)))
}
