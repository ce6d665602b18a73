package agent

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

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
