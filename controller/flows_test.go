package controller

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"segmesh/api/segmeshv1"
	"segmesh/controller/flowlog"
	"segmesh/controller/store"
	"segmesh/policy/policytest"
)

const flowsPolicy = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: db
    selectors: [{role: db}]
rules:
  - name: web-to-db
    from: [web]
    to: [db]
    ports: [tcp/5432]
`

// flowsLab is a controller with web-1 (role web) and db-1 (role db) enrolled
// and flowsPolicy in force.
type flowsLab struct {
	tc          *testController
	web, db     *enrolledAgent
	webA, dbA   string // IPv4 overlay addresses
	webA6, dbA6 string
}

func newFlowsLab(t *testing.T) *flowsLab {
	tc := startController(t, t.TempDir())
	l := &flowsLab{tc: tc}
	l.web = tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	l.db = tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	addr := func(a *enrolledAgent, i int) string {
		return netip.MustParsePrefix(a.resp.Addresses[i]).Addr().String()
	}
	l.webA, l.webA6 = addr(l.web, 0), addr(l.web, 1)
	l.dbA, l.dbA6 = addr(l.db, 0), addr(l.db, 1)
	apply(t, tc, flowsPolicy)
	return l
}

// report sends a's agent report with flows over the controller's TLS API.
func (l *flowsLab) report(t *testing.T, a *enrolledAgent, more uint64, flows ...*segmeshv1.DeniedFlow) {
	t.Helper()
	_, err := l.tc.agent(a).Report(context.Background(), connect.NewRequest(&segmeshv1.ReportRequest{DeniedFlows: flows, DeniedFlowsMore: more}))
	if err != nil {
		t.Fatalf("Report: %v", err)
	}
}

func (l *flowsLab) list(t *testing.T, req *segmeshv1.ListDeniedFlowsRequest) *segmeshv1.ListDeniedFlowsResponse {
	t.Helper()
	resp, err := l.tc.op().ListDeniedFlows(context.Background(), connect.NewRequest(req))
	if err != nil {
		t.Fatalf("ListDeniedFlows: %v", err)
	}
	return resp.Msg
}

// describeRecord writes a record on one line for comparisons.
func describeRecord(r *segmeshv1.DeniedFlowRecord) string {
	f := r.GetFlow()
	s := fmt.Sprintf("%s %s %s(%s %v) -> %s(%s %v) %s/%d x%d rev%d", r.GetNode(), f.GetDirection(), f.GetSource(), r.GetSourceNode(), r.GetSourceSegments(),
		f.GetDestination(), r.GetDestinationNode(), r.GetDestinationSegments(), f.GetProtocol(), f.GetPort(), f.GetPackets(), r.GetRevision())
	for _, c := range r.GetClosest() {
		s += fmt.Sprintf(" | %s@%s %v %v", c.GetRule(), c.GetPosition(), c.GetMatches(), c.GetMismatches())
	}
	return s
}

func TestDeniedFlowsListed(t *testing.T) {
	l := newFlowsLab(t)
	now := l.tc.clock.Now().Unix()
	l.report(t, l.db, 3,
		&segmeshv1.DeniedFlow{Direction: "in", Source: l.webA, Destination: l.dbA, Protocol: "tcp", Port: 22, Packets: 4, Bytes: 240, FirstSeenUnix: now - 20, LastSeenUnix: now - 10},
		&segmeshv1.DeniedFlow{Direction: "in", Source: "192.0.2.7", Destination: l.dbA, Protocol: "17", Port: 53, Packets: 1, LastSeenUnix: now - 5},
		// Invalid: the destination of an "in" flow is not db-1's.
		&segmeshv1.DeniedFlow{Direction: "in", Source: l.dbA, Destination: l.webA, Protocol: "tcp", Port: 22, Packets: 1},
	)
	l.report(t, l.web, 0,
		&segmeshv1.DeniedFlow{Direction: "out", Source: l.webA6, Destination: l.dbA6, Protocol: "icmpv6", Port: 9, Packets: 2, FirstSeenUnix: now + 3600, LastSeenUnix: now + 3600},
		&segmeshv1.DeniedFlow{Direction: "out", Source: l.webA, Destination: l.dbA, Protocol: "132", Port: 5432, Packets: 1, LastSeenUnix: now - 7200},
	)
	closestSSH := "web-to-db@policy.yaml:8:5 [from to] [packet: tcp/22 is not in tcp/5432]"
	tests := []struct {
		name string
		req  *segmeshv1.ListDeniedFlowsRequest
		want []string
	}{
		{"all, most recent first", &segmeshv1.ListDeniedFlowsRequest{}, []string{
			// The future time is clamped to now.
			fmt.Sprintf("web-1 out %s(web-1 [web]) -> %s(db-1 [db]) icmpv6/0 x2 rev1 | web-to-db@policy.yaml:8:5 [from to] [packet: icmp is not in tcp/5432]", l.webA6, l.dbA6),
			fmt.Sprintf("db-1 in 192.0.2.7( []) -> %s(db-1 [db]) udp/53 x1 rev1 | web-to-db@policy.yaml:8:5 [to] [from: 192.0.2.7 is not in web packet: udp/53 is not in tcp/5432]", l.dbA),
			fmt.Sprintf("db-1 in %s(web-1 [web]) -> %s(db-1 [db]) tcp/22 x4 rev1 | %s", l.webA, l.dbA, closestSSH),
			// Two hours ago is clamped to one hour ago; sctp is "other", which only "any" rules allow.
			fmt.Sprintf("web-1 out %s(web-1 [web]) -> %s(db-1 [db]) sctp/5432 x1 rev1 | web-to-db@policy.yaml:8:5 [from to] [packet: other is not in tcp/5432]", l.webA, l.dbA),
		}},
		{"one node", &segmeshv1.ListDeniedFlowsRequest{Node: "db-1", Limit: 1}, []string{
			fmt.Sprintf("db-1 in 192.0.2.7( []) -> %s(db-1 [db]) udp/53 x1 rev1 | web-to-db@policy.yaml:8:5 [to] [from: 192.0.2.7 is not in web packet: udp/53 is not in tcp/5432]", l.dbA),
		}},
		{"since", &segmeshv1.ListDeniedFlowsRequest{SinceUnix: now - 8}, []string{
			fmt.Sprintf("web-1 out %s(web-1 [web]) -> %s(db-1 [db]) icmpv6/0 x2 rev1 | web-to-db@policy.yaml:8:5 [from to] [packet: icmp is not in tcp/5432]", l.webA6, l.dbA6),
			fmt.Sprintf("db-1 in 192.0.2.7( []) -> %s(db-1 [db]) udp/53 x1 rev1 | web-to-db@policy.yaml:8:5 [to] [from: 192.0.2.7 is not in web packet: udp/53 is not in tcp/5432]", l.dbA),
		}},
		{"unknown node", &segmeshv1.ListDeniedFlowsRequest{Node: "nobody"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := l.list(t, tt.req)
			var got []string
			for _, r := range resp.GetFlows() {
				got = append(got, describeRecord(r))
			}
			if strings.Join(got, "\n") != strings.Join(tt.want, "\n") {
				t.Errorf("records:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
			// 3 omitted by db-1, 1 invalid.
			if resp.GetDropped() != 4 {
				t.Errorf("dropped %d, want 4", resp.GetDropped())
			}
		})
	}
	all := l.list(t, &segmeshv1.ListDeniedFlowsRequest{})
	if f := all.Flows[0].Flow; f.LastSeenUnix != now || f.FirstSeenUnix != now {
		t.Errorf("future times: first %d last %d, want both clamped to now %d", f.FirstSeenUnix, f.LastSeenUnix, now)
	}
	if f := all.Flows[3].Flow; f.LastSeenUnix != now-3600 {
		t.Errorf("old last seen %d, want clamped to %d", f.LastSeenUnix, now-3600)
	}
	m := l.tc.c.metrics
	if got := testutil.ToFloat64(m.flows); got != 5 {
		t.Errorf("segmesh_controller_denied_flows_total = %v, want 5", got)
	}
	for reason, want := range map[string]float64{flowDropNodeOmitted: 3, flowDropInvalid: 1, flowDropEvicted: 0, flowDropRateLimited: 0} {
		if got := testutil.ToFloat64(m.flowsDrop.WithLabelValues(reason)); got != want {
			t.Errorf("segmesh_controller_denied_flows_dropped_total{reason=%q} = %v, want %v", reason, got, want)
		}
	}

	// A new policy revision explains the same records anew.
	apply(t, l.tc, flowsPolicy+`  - name: web-ssh
    from: [web]
    to: [db]
    ports: [tcp/2222]
`)
	resp := l.list(t, &segmeshv1.ListDeniedFlowsRequest{Node: "db-1"})
	got := describeRecord(resp.Flows[1])
	if !strings.Contains(got, "rev2") || !strings.Contains(got, "| web-ssh@policy.yaml:12:5 [from to] [packet: tcp/22 is not in tcp/2222]") {
		t.Errorf("after revision 2: %s; want revision 2 and rule web-ssh among the closest", got)
	}
}

// TestDeniedFlowsNewNode checks that the explanations follow the inventory: a
// node enrolled after a listing is named in the next ones.
func TestDeniedFlowsNewNode(t *testing.T) {
	l := newFlowsLab(t)
	l.list(t, &segmeshv1.ListDeniedFlowsRequest{}) // builds and caches a view
	web2 := l.tc.enroll(l.tc.createToken(map[string]string{"role": "web"}, false), "web-2")
	src := netip.MustParsePrefix(web2.resp.Addresses[0]).Addr().String()
	l.report(t, l.db, 0, &segmeshv1.DeniedFlow{Direction: "in", Source: src, Destination: l.dbA, Protocol: "udp", Port: 9, Packets: 1})
	eventually(t, "the record to name web-2", func() bool {
		r := l.list(t, &segmeshv1.ListDeniedFlowsRequest{}).Flows[0]
		return r.SourceNode == "web-2" && strings.Join(r.SourceSegments, ",") == "web"
	})
}

func TestListDeniedFlowsArguments(t *testing.T) {
	l := newFlowsLab(t)
	for _, req := range []*segmeshv1.ListDeniedFlowsRequest{
		{Limit: maxFlowLimit + 1},
		{Node: "Bad Name!"},
		{SinceUnix: -1},
	} {
		_, err := l.tc.op().ListDeniedFlows(context.Background(), connect.NewRequest(req))
		wantCode(t, err, connect.CodeInvalidArgument)
	}
	_, err := l.tc.operator("wrong").ListDeniedFlows(context.Background(), connect.NewRequest(&segmeshv1.ListDeniedFlowsRequest{}))
	wantCode(t, err, connect.CodeUnauthenticated)
}

// TestDeniedFlowsBounded checks the per-report bound and the per-node budget:
// a node reporting in a loop keeps at most its burst.
func TestDeniedFlowsBounded(t *testing.T) {
	l := newFlowsLab(t)
	now := l.tc.clock.Now().Unix()
	flows := func(n, base int) []*segmeshv1.DeniedFlow {
		var out []*segmeshv1.DeniedFlow
		for i := range n {
			out = append(out, &segmeshv1.DeniedFlow{Direction: "in", Source: l.webA, Destination: l.dbA, Protocol: "tcp", Port: uint32(base + i), Packets: 1, LastSeenUnix: now})
		}
		return out
	}
	l.report(t, l.db, 0, flows(300, 0)...)    // 256 kept, 44 over the limit
	l.report(t, l.db, 0, flows(256, 1000)...) // the rest of the burst
	l.report(t, l.db, 0, flows(10, 2000)...)  // none left
	l.tc.clock.Advance(time.Second)
	l.report(t, l.db, 0, flows(100, 3000)...) // flowRate per second again
	m := l.tc.c.metrics
	perSecond := flowRate
	refilled := int(perSecond) // whole flows the budget regained in 1 s
	for reason, want := range map[string]float64{flowDropOverLimit: 44, flowDropRateLimited: float64(10 + 100 - refilled)} {
		if got := testutil.ToFloat64(m.flowsDrop.WithLabelValues(reason)); got != want {
			t.Errorf("dropped{reason=%q} = %v, want %v", reason, got, want)
		}
	}
	if got, want := l.tc.c.flows.log.Len(), flowBurst+refilled; got != want {
		t.Errorf("log holds %d records, want %d", got, want)
	}
	// web-1 has its own budget.
	l.report(t, l.web, 0, &segmeshv1.DeniedFlow{Direction: "out", Source: l.webA, Destination: l.dbA, Protocol: "tcp", Port: 1, Packets: 1})
	if got := len(l.list(t, &segmeshv1.ListDeniedFlowsRequest{Node: "web-1"}).Flows); got != 1 {
		t.Errorf("web-1 has %d records, want 1", got)
	}
}

func TestReportedFlow(t *testing.T) {
	node := store.Node{Name: "db-1", Addresses: []netip.Addr{netip.MustParseAddr("100.64.0.4"), netip.MustParseAddr("fd5e::4")}}
	now := time.Unix(1_800_000_000, 0)
	ok := func(f *segmeshv1.DeniedFlow) *segmeshv1.DeniedFlow {
		out := &segmeshv1.DeniedFlow{Direction: "in", Source: "100.64.0.1", Destination: "100.64.0.4", Protocol: "tcp", Port: 22, Packets: 1}
		if f.Direction != "" {
			out.Direction = f.Direction
		}
		if f.Source != "" {
			out.Source = f.Source
		}
		if f.Destination != "" {
			out.Destination = f.Destination
		}
		if f.Protocol != "" {
			out.Protocol = f.Protocol
		}
		if f.Port != 0 {
			out.Port = f.Port
		}
		out.FirstSeenUnix, out.LastSeenUnix = f.FirstSeenUnix, f.LastSeenUnix
		return out
	}
	tests := []struct {
		name string
		f    *segmeshv1.DeniedFlow
		want string // "proto/port first last" relative to now, or "error"
	}{
		{"tcp", ok(&segmeshv1.DeniedFlow{}), "tcp/22 0 0"},
		{"out", ok(&segmeshv1.DeniedFlow{Direction: "out", Source: "100.64.0.4", Destination: "192.0.2.1"}), "tcp/22 0 0"},
		{"mapped v4", ok(&segmeshv1.DeniedFlow{Destination: "::ffff:100.64.0.4"}), "tcp/22 0 0"},
		{"number named", ok(&segmeshv1.DeniedFlow{Protocol: "6"}), "tcp/22 0 0"},
		{"other number", ok(&segmeshv1.DeniedFlow{Protocol: "47"}), "47/0 0 0"},
		{"icmp drops port", ok(&segmeshv1.DeniedFlow{Protocol: "icmp", Port: 8}), "icmp/0 0 0"},
		{"times", ok(&segmeshv1.DeniedFlow{FirstSeenUnix: now.Unix() - 30, LastSeenUnix: now.Unix() - 10}), "tcp/22 -30 -10"},
		{"first after last", ok(&segmeshv1.DeniedFlow{FirstSeenUnix: now.Unix() - 5, LastSeenUnix: now.Unix() - 10}), "tcp/22 -10 -10"},
		{"future", ok(&segmeshv1.DeniedFlow{FirstSeenUnix: now.Unix() + 99, LastSeenUnix: now.Unix() + 99}), "tcp/22 0 0"},
		{"ancient", ok(&segmeshv1.DeniedFlow{FirstSeenUnix: -5, LastSeenUnix: 1}), "tcp/22 -3600 -3600"},
		{"direction", ok(&segmeshv1.DeniedFlow{Direction: "IN"}), "error"},
		{"not own address in", ok(&segmeshv1.DeniedFlow{Destination: "100.64.0.5"}), "error"},
		{"not own address out", ok(&segmeshv1.DeniedFlow{Direction: "out"}), "error"},
		{"bad address", ok(&segmeshv1.DeniedFlow{Source: "100.64.0.1.7"}), "error"},
		{"zone", ok(&segmeshv1.DeniedFlow{Source: "fe80::1%eth0", Destination: "fd5e::4"}), "error"},
		{"families", ok(&segmeshv1.DeniedFlow{Destination: "fd5e::4"}), "error"},
		{"long", ok(&segmeshv1.DeniedFlow{Source: strings.Repeat("1", 100)}), "error"},
		{"protocol", ok(&segmeshv1.DeniedFlow{Protocol: "gre"}), "error"},
		{"protocol 256", ok(&segmeshv1.DeniedFlow{Protocol: "256"}), "error"},
		{"protocol leading zero", ok(&segmeshv1.DeniedFlow{Protocol: "06"}), "error"},
		{"port", ok(&segmeshv1.DeniedFlow{Port: 65536}), "error"},
		{"no packet", &segmeshv1.DeniedFlow{Direction: "in", Source: "100.64.0.1", Destination: "100.64.0.4", Protocol: "tcp"}, "error"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.name == "no packet" {
				tt.f.Packets = 0
			}
			r, err := reportedFlow(node, tt.f, now)
			got := "error"
			if err == nil {
				got = fmt.Sprintf("%s/%d %d %d", r.Protocol, r.Port, r.First.Unix()-now.Unix(), r.Last.Unix()-now.Unix())
			}
			if got != tt.want {
				t.Errorf("got %s (err %v), want %s", got, err, tt.want)
			}
		})
	}
}

// BenchmarkListDeniedFlows10k measures ListDeniedFlows at 10,000 nodes (the
// benchmark policy) with 1,000 records in the log: "cold" after an inventory
// change of labels or addresses (the view is rebuilt), "node-changed" after
// another change of a node (the inventory is read again, the view kept),
// "warm" when nothing changed.
func BenchmarkListDeniedFlows10k(b *testing.B) {
	c, err := New(Options{DataDir: b.TempDir(), Listen: "127.0.0.1:0"})
	if err != nil {
		b.Fatal(err)
	}
	defer c.ln.Close()
	defer c.store.Close()
	p, inv := policytest.BenchPolicy(10_000)
	err = c.store.Update(func(tx store.Tx) error {
		for i, n := range inv {
			key := make([]byte, 32)
			binary.BigEndian.PutUint64(key, uint64(i))
			if err := tx.PutNode(store.Node{Name: n.Name, Labels: n.Labels, Addresses: n.Addresses, PublicKey: key}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	c.pol = policyState{serving: 1, parsed: p, latest: 1}
	now := time.Now()
	for i := range 1000 {
		src, dst := inv[i*7%len(inv)], inv[(i*7919+13)%len(inv)]
		c.flows.log.Add(flowlog.Record{
			Key:     flowlog.Key{Node: dst.Name, Direction: "in", Source: src.Addresses[i%2], Dest: dst.Addresses[i%2], Protocol: "tcp", Port: uint16(5000 + i%50)},
			Packets: 1, First: now, Last: now.Add(time.Duration(i) * time.Millisecond),
		})
	}
	s := &operatorService{c: c}
	req := connect.NewRequest(&segmeshv1.ListDeniedFlowsRequest{Limit: 1000})
	list := func(b *testing.B) {
		resp, err := s.ListDeniedFlows(context.Background(), req)
		if err != nil {
			b.Fatal(err)
		}
		if len(resp.Msg.Flows) != 1000 || len(resp.Msg.Flows[0].Closest) == 0 {
			b.Fatalf("%d records, first with %d closest rules; want 1000 with closest rules", len(resp.Msg.Flows), len(resp.Msg.Flows[0].Closest))
		}
	}
	b.Run("warm", func(b *testing.B) {
		list(b)
		for b.Loop() {
			list(b)
		}
	})
	b.Run("node-changed", func(b *testing.B) { // an endpoint change: the inventory is read again
		for b.Loop() {
			c.flows.inventoryChanged()
			list(b)
		}
	})
	b.Run("cold", func(b *testing.B) {
		for b.Loop() {
			c.flows.view = nil
			list(b)
		}
	})
}
