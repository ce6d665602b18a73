package agent

import (
	"errors"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"segmesh/agent/dataplane"
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
	r := start(t, Options{Controller: c.url, Token: c.token(), StateDir: filepath.Join(t.TempDir(), "state"), Name: "web-1", Interface: "smt0"})
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
	r := start(t, Options{Controller: c.url, Token: c.token(), StateDir: filepath.Join(t.TempDir(), "state"), Name: "web-1", Interface: "smt0",
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
