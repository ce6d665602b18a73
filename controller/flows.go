package controller

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"maps"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/controller/flowlog"
	"segmesh/controller/netmap"
	"segmesh/controller/store"
	"segmesh/policy"
)

// Denied flows: agents report the flows their policy dropped (ReportRequest
// denied_flows); the controller checks them, keeps them in a bounded in-memory
// log (controller/flowlog, lost on restart) and lists them, explained against
// the policy in force, with OperatorService.ListDeniedFlows.
//
// What a node reports is untrusted. A report's flows are checked one by one and
// a flow that fails a check is dropped (counted, reason "invalid"):
//   - direction "in" or "out"; for "in" the destination, for "out" the source
//     must be an overlay address of the reporting node (a node reports only what
//     its own filter dropped);
//   - source and destination parse as IP addresses of one family, without zone;
//   - protocol "tcp", "udp", "icmp", "icmpv6", "sctp" or a decimal number 0-255
//     (numbers of those five are written as their names);
//   - port at most 65535, and 0 for protocols without ports;
//   - at least one packet.
//
// Times are clamped to the controller's clock: never later than now, never
// earlier than flowMaxAge ago (a last packet of 0 means now), first packet not
// after the last. A report lists at most maxReportedFlows flows; the controller
// keeps the first maxReportedFlows (the agent sends the most packets first) and
// counts the rest ("over_limit"). Each node has a budget of flowBurst flows
// at once and flowRate per second; flows past it are counted ("rate_limited"),
// so that a node reporting in a loop costs bounded CPU and cannot evict the
// records of other nodes faster than that (each node also holds at most
// flowlog.DefaultPerNode records).
const (
	maxReportedFlows = 256
	flowMaxAge       = time.Hour
	flowBurst        = 2 * maxReportedFlows
	flowRate         = maxReportedFlows / 10.0 // a full report per 10 s resync
	// maxOmittedPerReport bounds how much one report's denied_flows_more adds to
	// the dropped count.
	maxOmittedPerReport = 1 << 20
)

// ListDeniedFlows limits.
const (
	defaultFlowLimit = 100
	maxFlowLimit     = 1000
)

// Reasons of segmesh_controller_denied_flows_dropped_total.
const (
	flowDropEvicted     = "evicted"
	flowDropNodeOmitted = "node_omitted"
	flowDropInvalid     = "invalid"
	flowDropOverLimit   = "over_limit"
	flowDropRateLimited = "rate_limited"
)

// flowDropReasons lists the reasons, for metrics.
var flowDropReasons = []string{flowDropEvicted, flowDropNodeOmitted, flowDropInvalid, flowDropOverLimit, flowDropRateLimited}

// deniedFlows is the controller's state for denied flows.
type deniedFlows struct {
	log    *flowlog.Log
	budget *actorLimiter

	// invGen counts the inventory changes the netmap computation took up (see
	// inventoryChanged).
	invGen atomic.Uint64

	mu      sync.Mutex
	dropped uint64 // every reason but evictions, which the log counts
	view    *flowView
	// building serialises the construction of views, so that concurrent calls
	// after a change build one.
	building sync.Mutex
}

func newDeniedFlows() *deniedFlows {
	return &deniedFlows{log: flowlog.New(flowlog.Limits{}), budget: newActorLimiterWith(flowRate, flowBurst)}
}

// dropFlows counts n flows dropped for reason.
func (c *Controller) dropFlows(reason string, n uint64) {
	if n == 0 {
		return
	}
	c.flows.mu.Lock()
	c.flows.dropped = satAdd(c.flows.dropped, n)
	c.flows.mu.Unlock()
	c.metrics.flowsDropped(reason, n)
}

// droppedFlows returns how many flows the controller dropped since it started,
// for every reason.
func (c *Controller) droppedFlows() uint64 {
	c.flows.mu.Lock()
	defer c.flows.mu.Unlock()
	return satAdd(c.flows.dropped, c.flows.log.Dropped())
}

// recordDeniedFlows checks the denied flows of a report of node at now (see the
// top of this file) and adds those that pass to the log.
func (c *Controller) recordDeniedFlows(node store.Node, r *segmeshv1.ReportRequest, now time.Time) {
	flows := r.GetDeniedFlows()
	c.metrics.flowsReceived(len(flows))
	c.dropFlows(flowDropNodeOmitted, min(r.GetDeniedFlowsMore(), maxOmittedPerReport))
	if len(flows) == 0 {
		return
	}
	if len(flows) > maxReportedFlows {
		c.dropFlows(flowDropOverLimit, uint64(len(flows)-maxReportedFlows))
		flows = flows[:maxReportedFlows]
	}
	var recs []flowlog.Record
	var firstErr error
	invalid := 0
	for _, f := range flows {
		rec, err := reportedFlow(node, f, now)
		if err != nil {
			if invalid++; firstErr == nil {
				firstErr = err
			}
			continue
		}
		recs = append(recs, rec)
	}
	c.dropFlows(flowDropInvalid, uint64(invalid))
	if invalid > 0 {
		c.log.Debug("denied flows refused", "node", node.Name, "refused", invalid, "first", firstErr)
	}
	allowed := c.flows.budget.allowUpTo(node.Name, now, len(recs))
	c.dropFlows(flowDropRateLimited, uint64(len(recs)-allowed))
	evicted := 0
	for _, rec := range recs[:allowed] {
		evicted += c.flows.log.Add(rec)
	}
	c.metrics.flowsDropped(flowDropEvicted, uint64(evicted))
}

// allowUpTo takes up to n events from actor's budget at now and returns how many
// it took.
func (l *actorLimiter) allowUpTo(actor string, now time.Time, n int) int {
	if n <= 0 {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	lim := l.limiter(actor)
	k := min(n, int(math.Max(0, math.Floor(lim.TokensAt(now)))))
	if k > 0 && !lim.AllowN(now, k) {
		return 0
	}
	return k
}

// flowProtocols maps the protocol numbers with a name to it.
var flowProtocols = map[uint64]string{1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}

// reportedProtocol returns p in canonical form (a name, or a decimal number of
// a protocol without one), or false when it is neither.
func reportedProtocol(p string) (string, bool) {
	switch p {
	case "tcp", "udp", "icmp", "icmpv6", "sctp":
		return p, true
	}
	n, err := strconv.ParseUint(p, 10, 8)
	if err != nil || strconv.FormatUint(n, 10) != p {
		return "", false
	}
	if name, ok := flowProtocols[n]; ok {
		return name, true
	}
	return p, true
}

// hasPorts reports whether flows of protocol p (canonical) have a destination port.
func hasPorts(p string) bool { return p == "tcp" || p == "udp" || p == "sctp" }

// reportedFlow checks one flow node reported at now and returns it as a record.
func reportedFlow(node store.Node, f *segmeshv1.DeniedFlow, now time.Time) (flowlog.Record, error) {
	dir := f.GetDirection()
	if dir != "in" && dir != "out" {
		return flowlog.Record{}, fmt.Errorf("direction %.16q is neither in nor out", dir)
	}
	src, err := reportedAddr(f.GetSource())
	if err != nil {
		return flowlog.Record{}, fmt.Errorf("source: %w", err)
	}
	dst, err := reportedAddr(f.GetDestination())
	if err != nil {
		return flowlog.Record{}, fmt.Errorf("destination: %w", err)
	}
	if src.Is4() != dst.Is4() {
		return flowlog.Record{}, fmt.Errorf("source %s and destination %s are of different families", src, dst)
	}
	own := dst
	if dir == "out" {
		own = src
	}
	if !slices.Contains(node.Addresses, own) {
		return flowlog.Record{}, fmt.Errorf("%s flow: %s is not an overlay address of node %s", dir, own, node.Name)
	}
	proto, ok := reportedProtocol(f.GetProtocol())
	if !ok {
		return flowlog.Record{}, fmt.Errorf("protocol %.16q is not a known name nor a number 0-255", f.GetProtocol())
	}
	port := f.GetPort()
	if port > math.MaxUint16 {
		return flowlog.Record{}, fmt.Errorf("port %d exceeds 65535", port)
	}
	if !hasPorts(proto) {
		port = 0
	}
	if f.GetPackets() == 0 {
		return flowlog.Record{}, fmt.Errorf("no packet")
	}
	oldest := now.Add(-flowMaxAge).Unix()
	clamp := func(t int64) time.Time { return time.Unix(min(max(t, oldest), now.Unix()), 0) }
	last := now
	if f.GetLastSeenUnix() != 0 {
		last = clamp(f.GetLastSeenUnix())
	}
	first := clamp(f.GetFirstSeenUnix())
	if f.GetFirstSeenUnix() == 0 || first.After(last) {
		first = last
	}
	return flowlog.Record{
		Key:     flowlog.Key{Node: node.Name, Direction: dir, Source: src, Dest: dst, Protocol: proto, Port: uint16(port)},
		Packets: f.GetPackets(), Bytes: f.GetBytes(), First: first, Last: last,
	}, nil
}

// reportedAddr parses an address of a report: IPv4 or IPv6 without zone
// (IPv4-mapped IPv6 addresses are read as IPv4), at most 64 bytes.
func reportedAddr(s string) (netip.Addr, error) {
	if len(s) > 64 {
		return netip.Addr{}, fmt.Errorf("address of %d bytes is too long", len(s))
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%.64q is not an IP address", s)
	}
	if a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("%s has a zone", a)
	}
	return a.Unmap(), nil
}

func satAdd(a, b uint64) uint64 {
	if s := a + b; s >= a {
		return s
	}
	return math.MaxUint64
}

// inventoryChanged tells the cache of views that some node records changed:
// syncNodesLocked calls it before it reads them, after they were stored, so a
// view built after a generation was read holds the records of that generation
// or newer.
func (f *deniedFlows) inventoryChanged() { f.invGen.Add(1) }

// flowView explains denied flows against one policy revision and inventory.
type flowView struct {
	revision uint64
	gen      uint64            // deniedFlows.invGen when the inventory was read
	inv      [sha256.Size]byte // fingerprint of the inventory (inventoryFingerprint)
	e        *policy.Explainer // nil when the policy does not resolve against the inventory
}

// inventoryFingerprint hashes what the explanation of a flow depends on in an
// inventory: every node's name, labels and overlay addresses, in order.
func inventoryFingerprint(inv []policy.Node) [sha256.Size]byte {
	h := sha256.New()
	var n [8]byte
	str := func(s string) {
		binary.BigEndian.PutUint64(n[:], uint64(len(s)))
		h.Write(n[:])
		h.Write([]byte(s))
	}
	for _, nd := range inv {
		str(nd.Name)
		for _, k := range slices.Sorted(maps.Keys(nd.Labels)) {
			str(k)
			str(nd.Labels[k])
		}
		str("")
		for _, a := range nd.Addresses {
			b, _ := a.MarshalBinary()
			str(string(b))
		}
		str("")
	}
	var out [sha256.Size]byte
	h.Sum(out[:0])
	return out
}

// currentFlowView returns the view for the policy in force and the current
// inventory, built once per (revision, inventory) and cached: building resolves
// the policy against every node (about 45 ms at 10,000 nodes), a query then
// costs tens of microseconds. While no node record changed (invGen) the cached
// view is used as it is; after a change the inventory is read again (about 60 ms
// at 10,000 nodes) and the view rebuilt only when what explanations depend on
// (names, labels, addresses; not endpoints) differs.
func (c *Controller) currentFlowView() (*flowView, error) {
	f := c.flows
	f.building.Lock()
	defer f.building.Unlock()
	gen := f.invGen.Load()
	rev, pol := c.policyInForce()
	f.mu.Lock()
	v := f.view
	f.mu.Unlock()
	if v != nil && v.revision == rev && v.gen == gen {
		return v, nil
	}
	var nodes []store.Node
	err := c.store.View(func(tx store.Tx) error {
		var err error
		nodes, err = tx.Nodes()
		return err
	})
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("reading nodes: %w", err))
	}
	inv := netmap.Inventory(nodes)
	fp := inventoryFingerprint(inv)
	switch {
	case v != nil && v.revision == rev && v.inv == fp:
		v = &flowView{revision: rev, gen: gen, inv: fp, e: v.e}
	default:
		if pol == nil {
			pol = &policy.Policy{} // default deny: no segment, no rule
		}
		v = &flowView{revision: rev, gen: gen, inv: fp}
		if v.e, err = policy.NewExplainer(pol, inv); err != nil {
			c.log.Warn("denied flows are listed without segments and closest rules: the policy in force does not resolve against the inventory", "revision", rev, "err", err)
		}
	}
	f.mu.Lock()
	f.view = v
	f.mu.Unlock()
	return v, nil
}

// flowPacket returns the policy packet of a denied flow: tcp and udp with the
// port, icmp for ICMP and ICMPv6, and "other" (which only "any" rules allow)
// for every other protocol.
func flowPacket(k flowlog.Key) policy.Packet {
	switch k.Protocol {
	case "tcp":
		return policy.Packet{Protocol: policy.ProtoTCP, Port: k.Port}
	case "udp":
		return policy.Packet{Protocol: policy.ProtoUDP, Port: k.Port}
	case "icmp", "icmpv6":
		return policy.Packet{Protocol: policy.ProtoICMP}
	}
	return policy.Packet{Protocol: policy.ProtoAny}
}

// record explains one logged flow with v.
func (v *flowView) record(r flowlog.Record) *segmeshv1.DeniedFlowRecord {
	out := &segmeshv1.DeniedFlowRecord{
		Node: r.Node,
		Flow: &segmeshv1.DeniedFlow{
			Direction: r.Direction, Source: r.Source.String(), Destination: r.Dest.String(),
			Protocol: r.Protocol, Port: uint32(r.Port), Packets: r.Packets, Bytes: r.Bytes,
			FirstSeenUnix: r.First.Unix(), LastSeenUnix: r.Last.Unix(),
		},
		Revision: v.revision,
	}
	if v.e == nil {
		return out
	}
	out.SourceNode, _ = v.e.Node(r.Source)
	out.DestinationNode, _ = v.e.Node(r.Dest)
	out.SourceSegments = v.e.Segments(r.Source)
	out.DestinationSegments = v.e.Segments(r.Dest)
	x, err := v.e.ExplainFlow(r.Source, r.Dest, flowPacket(r.Key))
	if err != nil {
		return out // no flow between them in the policy's terms (e.g. the node itself)
	}
	for _, cs := range x.Cases {
		if cs.Allowed {
			continue
		}
		for _, cr := range cs.Closest {
			out.Closest = append(out.Closest, &segmeshv1.ClosestRule{
				Rule: cr.Rule.Name, Position: cr.Rule.Pos.String(),
				Matches: cr.Matches, Mismatches: cr.Mismatches,
			})
		}
		break
	}
	return out
}

// ListDeniedFlows implements OperatorService.ListDeniedFlows: the most recent
// records of the log (see deniedFlows), explained against the policy in force
// and the current inventory.
func (s *operatorService) ListDeniedFlows(ctx context.Context, req *connect.Request[segmeshv1.ListDeniedFlowsRequest]) (*connect.Response[segmeshv1.ListDeniedFlowsResponse], error) {
	m := req.Msg
	if n := m.GetNode(); n != "" && !policy.ValidNodeName(n) {
		return nil, invalidArg("node %.64q is not a valid node name", n)
	}
	if m.GetSinceUnix() < 0 {
		return nil, invalidArg("since %d is before 1970; give a Unix time in seconds, or 0 for every record", m.GetSinceUnix())
	}
	limit := int(m.GetLimit())
	switch {
	case limit == 0:
		limit = defaultFlowLimit
	case limit > maxFlowLimit:
		return nil, invalidArg("limit %d exceeds %d; give a smaller --limit", limit, maxFlowLimit)
	}
	var since time.Time
	if m.GetSinceUnix() > 0 {
		since = time.Unix(m.GetSinceUnix(), 0)
	}
	v, err := s.c.currentFlowView()
	if err != nil {
		return nil, err
	}
	recs := s.c.flows.log.Query(m.GetNode(), since, limit)
	resp := &segmeshv1.ListDeniedFlowsResponse{Flows: make([]*segmeshv1.DeniedFlowRecord, len(recs)), Dropped: s.c.droppedFlows()}
	for i, r := range recs {
		resp.Flows[i] = v.record(r)
	}
	return connect.NewResponse(resp), nil
}
