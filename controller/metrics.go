package controller

import (
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"segmesh/controller/store"
)

// Metrics (see docs/metrics.md). The controller registers them with
// Options.Metrics; without a registerer they are kept but never exported.

// Node states of segmesh_nodes.
const (
	metricOnline  = "online"
	metricOffline = "offline"
	metricRevoked = "revoked"
)

// Enrollment results of segmesh_enrollments_total besides the lowercase connect
// codes of refusals ("permission_denied", "invalid_argument", ...).
const (
	enrollOK          = "ok"
	enrollRateLimited = "rate_limited"
)

// appliedRevisions bounds how many policy revisions' apply times the controller
// keeps for segmesh_policy_apply_to_enforce_seconds: a node that reports a
// revision older than these is not observed.
const appliedRevisions = 16

// metrics holds the controller's collectors and what they need between events.
type metrics struct {
	computeSeconds prometheus.Histogram
	updatesSent    *prometheus.CounterVec
	applyToEnforce prometheus.Histogram
	enrollments    *prometheus.CounterVec
	revision       prometheus.GaugeFunc
	nodes          *nodesCollector
	flows          prometheus.Counter
	flowsDrop      *prometheus.CounterVec
	stunRequests   *prometheus.CounterVec
	relaySessions  prometheus.GaugeFunc
	relayRequests  *prometheus.CounterVec
	pushesDropped  prometheus.Counter
	punchRequests  *prometheus.CounterVec
	replicas       prometheus.Collector // nil with the bbolt store (registerReplicas)
	mu             sync.Mutex
	appliedAt      map[uint64]time.Time // policy revision -> when it was applied
	appliedOrder   []uint64             // keys of appliedAt, oldest first
}

func newMetrics(c *Controller) *metrics {
	m := &metrics{
		computeSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "segmesh_netmap_compute_seconds",
			Help:    "Time spent computing netmaps for one inventory or policy change, in seconds.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10), // 0.5 ms to about 131 s
		}),
		updatesSent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "segmesh_netmap_updates_sent_total",
			Help: "Netmap updates sent to agents on their streams, by kind (full netmap or delta).",
		}, []string{"kind"}),
		applyToEnforce: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "segmesh_policy_apply_to_enforce_seconds",
			Help:    "Time from a policy apply to each node's first report that it enforces a netmap of that revision, in seconds.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2.5, 12), // 10 ms to about 10 min
		}),
		enrollments: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "segmesh_enrollments_total",
			Help: "Enrollment requests by result: ok, rate_limited, or the refusal's code (permission_denied, unauthenticated, invalid_argument, already_exists, resource_exhausted, internal, ...).",
		}, []string{"result"}),
		revision: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "segmesh_policy_revision",
			Help: "Policy revision in force (0: default deny).",
		}, func() float64 {
			rev, _ := c.policyInForce()
			return float64(rev)
		}),
		nodes: &nodesCollector{c: c, desc: prometheus.NewDesc("segmesh_nodes", "Enrolled nodes by state: online (a netmap stream is open), offline, revoked.", []string{"state"}, nil)},
		flows: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "segmesh_controller_denied_flows_total",
			Help: "Denied flows received in agent reports (aggregated per node and reporting interval), before checks and bounds.",
		}),
		flowsDrop: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "segmesh_controller_denied_flows_dropped_total",
			Help: "Denied flows not kept or no longer kept, by reason: evicted (the bounded log was full), node_omitted (left out by the agent), invalid, over_limit (past 256 in a report), rate_limited (past the node's budget).",
		}, []string{"reason"}),
		stunRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "segmesh_controller_stun_requests_total",
			Help: "Datagrams received by the STUN responder (--stun-listen), by result: answered, dropped (over the rate limits or unsendable), invalid (not a STUN Binding request).",
		}, []string{"result"}),
		relaySessions: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "segmesh_controller_relay_sessions",
			Help: "Relay sessions in force (unexpired), on all relays.",
		}, func() float64 { return float64(c.relays.alloc.Total()) }),
		relayRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "segmesh_controller_relay_requests_total",
			Help: "RequestRelay calls of authenticated nodes by result: ok, not_peer (the peer is not in the caller's netmap), offline (the peer is not connected or takes no punches), no_relay (no relay both may use is online), limited (over the caller's rate), exhausted (no relay has room, or an end has too many sessions), error (internal).",
		}, []string{"result"}),
		pushesDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "segmesh_controller_pushes_dropped_total",
			Help: "Out-of-band updates (punch, relay) dropped because a stream's queue held 64 already (its agent reads too slowly); the oldest is dropped, never a relay's newest session set.",
		}),
		punchRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "segmesh_controller_punch_requests_total",
			Help: "Hole punching requests (RequestPunch) by result: ok (a Punch pushed to both ends), not_peer (the peer is not in the caller's netmap), offline (the peer has no stream that takes a Punch), limited (over the pair's or the caller's rate limit).",
		}, []string{"result"}),
		appliedAt: map[uint64]time.Time{},
	}
	for _, r := range relayResults {
		m.relayRequests.WithLabelValues(r)
	}
	for _, r := range []string{punchOK, punchNotPeer, punchOffline, punchLimited} {
		m.punchRequests.WithLabelValues(r)
	}
	for _, r := range []string{stunAnswered, stunDropped, stunInvalid} {
		m.stunRequests.WithLabelValues(r)
	}
	for _, r := range flowDropReasons {
		m.flowsDrop.WithLabelValues(r)
	}
	for _, k := range []string{"full", "delta"} {
		m.updatesSent.WithLabelValues(k)
	}
	m.enrollments.WithLabelValues(enrollOK)
	return m
}

// replicaGauges are the collectors of a replica on etcd: whether it holds its
// lease, whether it leads, and how many replicas are live.
type replicaGauges struct{ lease, leader, replicas prometheus.GaugeFunc }

func (g replicaGauges) Describe(ch chan<- *prometheus.Desc) {
	g.lease.Describe(ch)
	g.leader.Describe(ch)
	g.replicas.Describe(ch)
}

func (g replicaGauges) Collect(ch chan<- prometheus.Metric) {
	g.lease.Collect(ch)
	g.leader.Collect(ch)
	g.replicas.Collect(ch)
}

// addReplicas adds the replica gauges of c's cluster (etcd store only; before register).
func (m *metrics) addReplicas(c *Controller) {
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	m.replicas = replicaGauges{
		lease: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "segmesh_controller_etcd_lease",
			Help: "1 while this replica holds its etcd lease (it reaches a quorum of etcd and serves), 0 while it does not (it refuses every call).",
		}, func() float64 { return b(c.cluster.Err() == nil) }),
		leader: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "segmesh_controller_leader",
			Help: "1 while this replica is the elected leader of the replicas, else 0.",
		}, func() float64 { return b(c.cluster.Leader()) }),
		replicas: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "segmesh_controller_replicas",
			Help: "Live controller replicas on the etcd cluster (this one included while it holds its lease).",
		}, func() float64 { return float64(len(c.cluster.Replicas())) }),
	}
}

// register registers the collectors with r; nil r registers nothing.
func (m *metrics) register(r prometheus.Registerer) error {
	if r == nil {
		return nil
	}
	cols := []prometheus.Collector{m.computeSeconds, m.updatesSent, m.applyToEnforce, m.enrollments, m.revision, m.nodes, m.flows, m.flowsDrop, m.stunRequests, m.relaySessions, m.relayRequests, m.pushesDropped, m.punchRequests}
	if m.replicas != nil {
		cols = append(cols, m.replicas)
	}
	for _, col := range cols {
		if err := r.Register(col); err != nil {
			return err
		}
	}
	return nil
}

// sent counts one update sent on a stream; delta tells its kind.
func (m *metrics) sent(delta bool) {
	kind := "full"
	if delta {
		kind = "delta"
	}
	m.updatesSent.WithLabelValues(kind).Inc()
}

// enrolled counts one enrollment outcome: err nil for success, rateLimited for a
// request refused by the refusal budget.
func (m *metrics) enrolled(err error, rateLimited bool) {
	switch {
	case rateLimited:
		m.enrollments.WithLabelValues(enrollRateLimited).Inc()
	case err == nil:
		m.enrollments.WithLabelValues(enrollOK).Inc()
	default:
		m.enrollments.WithLabelValues(connect.CodeOf(err).String()).Inc()
	}
}

// policyApplied records that revision rev was applied at t.
func (m *metrics) policyApplied(rev uint64, t time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.appliedAt[rev]; ok {
		return
	}
	m.appliedAt[rev] = t
	m.appliedOrder = append(m.appliedOrder, rev)
	if len(m.appliedOrder) > appliedRevisions {
		delete(m.appliedAt, m.appliedOrder[0])
		m.appliedOrder = m.appliedOrder[1:]
	}
}

// reported observes the apply-to-enforce delay when a node's report moves from
// revision prev to rev at now; reports that repeat a revision, and revisions
// applied before this controller started, are not observed.
func (m *metrics) reported(prev, rev uint64, now time.Time) {
	if rev == prev || rev == 0 {
		return
	}
	m.mu.Lock()
	at, ok := m.appliedAt[rev]
	m.mu.Unlock()
	if ok {
		m.applyToEnforce.Observe(now.Sub(at).Seconds())
	}
}

// nodesCollector reads the inventory and the live streams at each scrape.
type nodesCollector struct {
	c    *Controller
	desc *prometheus.Desc
}

func (n *nodesCollector) Describe(ch chan<- *prometheus.Desc) { ch <- n.desc }

func (n *nodesCollector) Collect(ch chan<- prometheus.Metric) {
	var nodes []store.Node
	if err := n.c.store.View(func(tx store.Tx) error {
		var err error
		nodes, err = tx.Nodes()
		return err
	}); err != nil {
		ch <- prometheus.NewInvalidMetric(n.desc, err)
		return
	}
	counts := map[string]int{metricOnline: 0, metricOffline: 0, metricRevoked: 0}
	n.c.live.mu.Lock()
	for _, node := range nodes {
		switch {
		case node.Revoked():
			counts[metricRevoked]++
		case n.c.live.nodes[node.Name] != nil && len(n.c.live.nodes[node.Name].conns) > 0:
			counts[metricOnline]++
		default:
			counts[metricOffline]++
		}
	}
	n.c.live.mu.Unlock()
	for state, v := range counts {
		ch <- prometheus.MustNewConstMetric(n.desc, prometheus.GaugeValue, float64(v), state)
	}
}

// flowsReceived counts n denied flows received in a report.
func (m *metrics) flowsReceived(n int) { m.flows.Add(float64(n)) }

// flowsDropped counts n denied flows dropped for reason (see flowDropReasons).
func (m *metrics) flowsDropped(reason string, n uint64) {
	if n > 0 {
		m.flowsDrop.WithLabelValues(reason).Add(float64(n))
	}
}

// stun counts one datagram of the STUN responder by result.
func (m *metrics) stun(result string) { m.stunRequests.WithLabelValues(result).Inc() }

// relayRequest counts one RequestRelay call by result (see relayResults).
func (m *metrics) relayRequest(result string) { m.relayRequests.WithLabelValues(result).Inc() }

// punched counts one hole punching request by result (punchOK, ...).
func (m *metrics) punched(result string) { m.punchRequests.WithLabelValues(result).Inc() }
