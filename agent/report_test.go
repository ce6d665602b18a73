package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/fake"
	"segmesh/agent/netmap"
	"segmesh/api/segmeshv1"
)

// differences joins wire differences as "part: detail; ...".
func differences(ds []*segmeshv1.DriftDifference) string {
	var parts []string
	for _, d := range ds {
		parts = append(parts, d.GetPart()+": "+d.GetDetail())
	}
	return strings.Join(parts, "; ")
}

// TestDriftRepairIsReported: the report carries the drift repairs and the in-sync
// flag; a failed repair shows as an error with the unrepaired drift until a later
// apply succeeds, and then the error is gone from the report.
func TestDriftRepairIsReported(t *testing.T) {
	c := newController(t)
	pb := wireNetmap(3, 0)
	c.setNetmap(pb)
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: filepath.Join(t.TempDir(), "state"), Name: "web-1", Interface: "smt0"})
	eventually(t, "report of revision 3 in sync", func() bool {
		rep := c.lastReport()
		return rep.GetAppliedHash() == pb.GetHash() && rep.GetInSync() && rep.GetError() == ""
	})
	if d := c.lastReport().GetDrift(); d.GetRepairs() != 0 || d.GetLastRepairUnix() != 0 || len(d.GetLastRepaired())+len(d.GetUnrepaired()) != 0 {
		t.Fatalf("drift before any repair: %v", d)
	}

	r.dp.Mutate(func(s *dataplane.State) { s.Routes = nil })
	eventually(t, "the route repair reported", func() bool {
		d := c.lastReport().GetDrift()
		return d.GetRepairs() == 1 && c.lastReport().GetInSync()
	})
	rep := c.lastReport()
	d := rep.GetDrift()
	if got := differences(d.GetLastRepaired()); !strings.Contains(got, "route: missing [100.64.0.0/10 fd5e:6d65:7368::/48]") || d.GetLastRepairedMore() != 0 {
		t.Errorf("last repaired %q (+%d more), want the missing routes", got, d.GetLastRepairedMore())
	}
	if d.GetLastRepairUnix() == 0 || len(d.GetUnrepaired()) != 0 || rep.GetError() != "" {
		t.Errorf("report after the repair: %v", rep)
	}

	boom := errors.New("nftables: boom")
	r.dp.FailApply(boom)
	r.dp.Mutate(func(s *dataplane.State) { s.Peers = nil })
	eventually(t, "the failed repair reported", func() bool {
		rep := c.lastReport()
		return strings.Contains(rep.GetError(), "boom") && !rep.GetInSync()
	})
	if got := differences(c.lastReport().GetDrift().GetUnrepaired()); !strings.Contains(got, "peer: ") {
		t.Errorf("unrepaired drift %q, want the missing peers", got)
	}
	r.dp.FailApply(nil)
	eventually(t, "the error gone from the report", func() bool {
		rep := c.lastReport()
		return rep.GetError() == "" && rep.GetInSync() && rep.GetDrift().GetRepairs() == 2
	})
	if got := differences(c.lastReport().GetDrift().GetLastRepaired()); !strings.Contains(got, "peer: ") {
		t.Errorf("last repaired %q, want the missing peers", got)
	}
}

// TestDeniedFlowsAreReported: a read of the kernel that finds new denied flows
// sends a report at once (the periodic report is an hour away here) carrying them;
// a refused report keeps them for the next one, and a report that reached the
// controller clears them.
func TestDeniedFlowsAreReported(t *testing.T) {
	c := newController(t)
	pb := wireNetmap(3, 0)
	c.setNetmap(pb)
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: filepath.Join(t.TempDir(), "state"), Name: "web-1", Interface: "smt0",
		Resync: time.Hour, FlowInterval: 10 * time.Millisecond})
	eventually(t, "report of revision 3", func() bool { return c.lastReport().GetAppliedHash() == pb.GetHash() })

	ssh := dataplane.DeniedFlow{Direction: dataplane.DirectionIn, Src: netip.MustParseAddr("100.64.0.7"), Dst: netip.MustParseAddr("100.64.0.1"),
		Protocol: 6, Port: 22, Packets: 3, Bytes: 180}
	refusals := func() int {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.presented["Report"]) - len(c.reports)
	}
	c.mu.Lock()
	c.reportErr = connect.NewError(connect.CodeUnavailable, errors.New("controller busy"))
	c.mu.Unlock()
	r.dp.SetDenied(dataplane.Denied{Flows: []dataplane.DeniedFlow{ssh}, In: dataplane.DropCounter{Packets: 3, Bytes: 180, Epoch: 1}})
	eventually(t, "a refused report", func() bool { return refusals() > 0 })

	c.mu.Lock()
	c.reportErr = nil
	c.mu.Unlock()
	ssh.Packets, ssh.Bytes = 5, 300 // two more packets: a new read finds growth and reports
	r.dp.SetDenied(dataplane.Denied{Flows: []dataplane.DeniedFlow{ssh}, In: dataplane.DropCounter{Packets: 5, Bytes: 300, Epoch: 1}})
	eventually(t, "a report with the denied flow", func() bool { return len(c.lastReport().GetDeniedFlows()) > 0 })
	got := c.lastReport().GetDeniedFlows()[0]
	if len(c.lastReport().GetDeniedFlows()) != 1 || got.GetDirection() != "in" || got.GetSource() != "100.64.0.7" || got.GetDestination() != "100.64.0.1" ||
		got.GetProtocol() != "tcp" || got.GetPort() != 22 || got.GetPackets() != 5 || got.GetBytes() != 300 || got.GetFirstSeenUnix() == 0 ||
		got.GetLastSeenUnix() < got.GetFirstSeenUnix() {
		t.Fatalf("denied flows %v, want the one ssh flow with all 5 packets (the refused report's 3 too)", c.lastReport().GetDeniedFlows())
	}

	ping := dataplane.DeniedFlow{Direction: dataplane.DirectionOut, Src: netip.MustParseAddr("100.64.0.1"), Dst: netip.MustParseAddr("100.64.0.9"),
		Protocol: 1, Packets: 1, Bytes: 84}
	r.dp.SetDenied(dataplane.Denied{Flows: []dataplane.DeniedFlow{ssh, ping}, In: dataplane.DropCounter{Packets: 5, Bytes: 300, Epoch: 1},
		Out: dataplane.DropCounter{Packets: 1, Bytes: 84, Epoch: 2}})
	eventually(t, "a report with the ping", func() bool {
		fs := c.lastReport().GetDeniedFlows()
		return len(fs) > 0 && fs[0].GetProtocol() == "icmp"
	})
	if fs := c.lastReport().GetDeniedFlows(); len(fs) != 1 || fs[0].GetPort() != 0 || fs[0].GetDirection() != "out" || fs[0].GetPackets() != 1 {
		t.Fatalf("denied flows %v, want only the new ping: the ssh flow was reported already", fs)
	}
}

// TestPeerTableReport: a report lists at most maxReportedPeers peers, those
// without a recent handshake first, then by name (unnamed keys first, then by
// key); it counts the peers left out.
func TestPeerTableReport(t *testing.T) {
	now := time.Date(2026, 12, 2, 5, 0, 0, 0, time.UTC)
	nm := &netmap.Netmap{Peers: []netmap.Peer{{Name: "b", PublicKey: dkey(2)}, {Name: "c", PublicKey: dkey(3)}, {Name: "d", PublicKey: dkey(4)}}}
	ep := netip.MustParseAddrPort("192.0.2.3:51820")
	tests := []struct {
		name     string
		observed dataplane.Observed
		want     []string // name or key, endpoint, handshake (Unix), rx, tx
		wantMore uint32
	}{
		{name: "no read-back", want: nil},
		{name: "stale first, then by name", observed: dataplane.Observed{
			State: dataplane.State{Peers: []dataplane.Peer{{PublicKey: dkey(2)}, {PublicKey: dkey(3), Endpoint: ep}, {PublicKey: dkey(4)}, {PublicKey: dkey(9)}}},
			PeerStats: map[dataplane.Key]dataplane.PeerStats{
				dkey(2): {LastHandshake: now.Add(-10 * time.Second), RxBytes: 100, TxBytes: 200},
				dkey(3): {LastHandshake: now.Add(-4 * time.Minute), RxBytes: 1},
				dkey(9): {LastHandshake: now.Add(-time.Second)},
			},
		}, want: []string{
			"c 192.0.2.3:51820 " + fmt.Sprint(now.Add(-4*time.Minute).Unix()) + " 1 0", // handshake too old
			"d  0 0 0", // never
			dataplane.KeyString(dkey(9)) + "  " + fmt.Sprint(now.Add(-time.Second).Unix()) + " 0 0", // not in the netmap: no name
			"b  " + fmt.Sprint(now.Add(-10*time.Second).Unix()) + " 100 200",
		}},
	}
	many := dataplane.Observed{}
	for i := range maxReportedPeers + 6 {
		var k dataplane.Key
		k[0], k[1] = 0xee, byte(i)
		many.State.Peers = append(many.State.Peers, dataplane.Peer{PublicKey: k})
	}
	tests = append(tests, struct {
		name     string
		observed dataplane.Observed
		want     []string
		wantMore uint32
	}{name: "bounded", observed: many, wantMore: 6})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var pt peerTable
			if tt.observed.State.Peers != nil {
				pt.set(tt.observed)
			}
			got, more := pt.report(nm, now)
			if more != tt.wantMore {
				t.Errorf("peers_more %d, want %d", more, tt.wantMore)
			}
			if tt.name == "bounded" {
				if len(got) != maxReportedPeers {
					t.Errorf("%d peers, want %d", len(got), maxReportedPeers)
				}
				return
			}
			var lines []string
			for _, p := range got {
				id := nameOrKey(p.GetName(), p.GetPublicKey())
				lines = append(lines, fmt.Sprintf("%s %s %d %d %d", id, p.GetEndpoint(), p.GetLastHandshakeUnix(), p.GetRxBytes(), p.GetTxBytes()))
				if p.GetPublicKey() == "" {
					t.Errorf("peer %s without a public key", id)
				}
			}
			if d := cmp.Diff(tt.want, lines); d != "" {
				t.Errorf("peers (-want +got):\n%s", d)
			}
		})
	}
}

// nameOrKey returns name, or key when name is empty.
func nameOrKey(name, key string) string {
	if name != "" {
		return name
	}
	return key
}

// TestReportPeersAndApply: reports carry the time and duration of the latest
// apply and the peers the kernel holds; new peer counters alone send no report,
// and the periodic report brings them to the controller.
func TestReportPeersAndApply(t *testing.T) {
	c := newController(t)
	pb := wireNetmap(3, 0)
	c.setNetmap(pb)
	dp := fake.New(dataplane.KindUserspace)
	before := time.Now()
	hs := time.Now().Add(-20 * time.Second).Truncate(time.Second)
	dp.SetPeerStats(map[dataplane.Key]dataplane.PeerStats{dkey(2): {LastHandshake: hs, RxBytes: 10, TxBytes: 20}})
	r := startWith(t, dp, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: filepath.Join(t.TempDir(), "state"), Name: "web-1", Interface: "smt0", Resync: time.Hour})
	eventually(t, "report of revision 3 in sync", func() bool {
		rep := c.lastReport()
		return rep.GetAppliedHash() == pb.GetHash() && rep.GetInSync()
	})
	rep := c.lastReport()
	if at := time.UnixMilli(rep.GetLastApplyUnixMs()); at.Before(before.Truncate(time.Millisecond)) || at.After(time.Now()) || rep.GetLastApplyDurationUs() < 0 {
		t.Errorf("last apply at %v took %dµs, want between the start and now", at, rep.GetLastApplyDurationUs())
	}
	peers := map[string]*segmeshv1.PeerStatus{}
	for _, p := range rep.GetPeers() {
		peers[p.GetName()] = p
	}
	if b := peers["b"]; len(peers) != 2 || b.GetLastHandshakeUnix() != hs.Unix() || b.GetRxBytes() != 10 || b.GetTxBytes() != 20 ||
		peers["c"].GetEndpoint() != "192.0.2.3:51820" || peers["c"].GetLastHandshakeUnix() != 0 || rep.GetPeersMore() != 0 {
		t.Fatalf("peers %v (+%d), want b with its handshake and counters, c with its endpoint", rep.GetPeers(), rep.GetPeersMore())
	}
	if got := rep.GetPeers()[0].GetName(); got != "c" {
		t.Errorf("first peer %q, want c (no handshake)", got)
	}

	// New counters, read back: no report of their own; the next report (a
	// repair) carries them.
	reports := c.reportCount()
	dp.SetPeerStats(map[dataplane.Key]dataplane.PeerStats{dkey(2): {LastHandshake: hs, RxBytes: 11, TxBytes: 22}})
	reads := dp.Stats().Reads
	dp.Notify()
	eventually(t, "read back", func() bool { return dp.Stats().Reads > reads })
	r.dp.Mutate(func(s *dataplane.State) { s.Routes = nil })
	dp.Notify()
	eventually(t, "the repair reported", func() bool { return c.lastReport().GetDrift().GetRepairs() == 1 })
	// Other applies may still be reported (the agent's start is not over), but
	// no report may differ from the one before it in its peers alone.
	c.mu.Lock()
	sent := make([]*segmeshv1.ReportRequest, 0, len(c.reports)-reports+1)
	for _, r := range c.reports[reports-1:] {
		r = proto.Clone(r).(*segmeshv1.ReportRequest)
		r.Peers, r.PeersMore = nil, 0
		sent = append(sent, r)
	}
	c.mu.Unlock()
	for i := 1; i < len(sent); i++ {
		if proto.Equal(sent[i-1], sent[i]) {
			t.Errorf("report %d after new peer counters differs from the one before only in its peers (counters alone are no change): %v", i, sent[i])
		}
	}
	for _, p := range c.lastReport().GetPeers() {
		if p.GetName() == "b" && p.GetRxBytes() != 11 {
			t.Errorf("peer b: %d bytes received, want the fresh 11", p.GetRxBytes())
		}
	}
}

// TestPeriodicReportRefreshesPeers: the periodic report brings new peer counters.
func TestPeriodicReportRefreshesPeers(t *testing.T) {
	c := newController(t)
	pb := wireNetmap(3, 0)
	c.setNetmap(pb)
	dp := fake.New(dataplane.KindUserspace)
	startWith(t, dp, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: filepath.Join(t.TempDir(), "state"), Name: "web-1", Interface: "smt0"})
	eventually(t, "report of revision 3", func() bool { return c.lastReport().GetAppliedHash() == pb.GetHash() })
	hs := time.Now().Truncate(time.Second)
	dp.SetPeerStats(map[dataplane.Key]dataplane.PeerStats{dkey(3): {LastHandshake: hs, RxBytes: 7}})
	eventually(t, "the handshake with c reported", func() bool {
		for _, p := range c.lastReport().GetPeers() {
			if p.GetName() == "c" && p.GetLastHandshakeUnix() == hs.Unix() && p.GetRxBytes() == 7 {
				return true
			}
		}
		return false
	})
}

// TestEndpointChangeIsReportedAtOnce (issue 10, roaming defect 3): a new local
// endpoint reaches the controller within seconds, in a report
// (ReportRequest.endpoint) and on a new netmap stream opened from the new
// address, without waiting for the old stream to time out or for a resync.
func TestEndpointChangeIsReportedAtOnce(t *testing.T) {
	var current atomic.Value
	current.Store(netip.MustParseAddrPort("192.0.2.10:51820"))
	prev := discover
	discover = func(string, string, int) (netip.AddrPort, error) { return current.Load().(netip.AddrPort), nil }
	t.Cleanup(func() { discover = prev })

	c := newController(t)
	pb := wireNetmap(3, 0)
	c.setNetmap(pb)
	// A resync far beyond the test: only the endpoint change can send the report.
	r := start(t, Options{Controllers: []string{c.url}, Token: c.token(), StateDir: filepath.Join(t.TempDir(), "state"), Name: "web-1", Interface: "smt0", Resync: time.Hour})
	eventually(t, "the first report", func() bool { return c.lastReport().GetAppliedHash() == pb.GetHash() })
	_, streams := c.counts()

	moved := netip.MustParseAddrPort("198.51.100.10:51820")
	current.Store(moved)
	deadline := time.Now().Add(3 * endpointPoll)
	eventually(t, "a report of the new endpoint", func() bool { return c.lastReport().GetEndpoint() == moved.String() })
	eventually(t, "a new stream from the new endpoint", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.syncs) > streams && c.syncs[len(c.syncs)-1].GetEndpoint() == moved.String()
	})
	if time.Now().After(deadline) {
		t.Errorf("the new endpoint took longer than %v to reach the controller", 3*endpointPoll)
	}
	if !strings.Contains(r.logs.String(), "local endpoint changed") {
		t.Errorf("no log of the change:\n%s", r.logs)
	}
}
