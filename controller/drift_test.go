package controller

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/google/go-cmp/cmp"

	"segmesh/api/segmeshv1"
)

// TestReportedDriftInStatus: the drift facts and the in-sync flag of the latest
// report show in the node's status, bounded and printable; a later report
// replaces them, so an error that no longer holds is gone.
func TestReportedDriftInStatus(t *testing.T) {
	tc := startController(t, t.TempDir())
	a := tc.enroll(tc.createToken(nil, false), "a-1")
	now := tc.c.now()
	report := func(r *segmeshv1.ReportRequest) *segmeshv1.NodeStatus {
		t.Helper()
		if _, err := tc.agent(a).Report(bg, connect.NewRequest(r)); err != nil {
			t.Fatal(err)
		}
		return tc.status().Nodes[0]
	}
	diff := func(part, detail string) *segmeshv1.DriftDifference {
		return &segmeshv1.DriftDifference{Part: part, Detail: detail}
	}
	many := func(n int, detail string) []*segmeshv1.DriftDifference {
		var out []*segmeshv1.DriftDifference
		for i := range n {
			out = append(out, diff("route", fmt.Sprintf("%s%d", detail, i)))
		}
		return out
	}
	repaired := &segmeshv1.Drift{
		Repairs: 3, LastRepairUnix: now.Add(-2 * time.Minute).Unix(),
		LastRepaired: []*segmeshv1.DriftDifference{diff("route", "missing [100.64.0.0/10]"), diff("nftables", "set db missing")}, LastRepairedMore: 2,
	}
	tests := []struct {
		name       string
		report     *segmeshv1.ReportRequest
		wantInSync bool
		wantError  string
		want       *segmeshv1.Drift
	}{
		{name: "repairs, in sync", report: &segmeshv1.ReportRequest{InSync: true, Drift: repaired}, wantInSync: true, want: repaired},
		{
			name: "a failed repair",
			report: &segmeshv1.ReportRequest{Error: "nftables: boom", Drift: &segmeshv1.Drift{
				Repairs: 3, LastRepairUnix: repaired.LastRepairUnix, Unrepaired: []*segmeshv1.DriftDifference{diff("peer", "AgIC= missing")}}},
			wantError: "nftables: boom",
			want:      &segmeshv1.Drift{Repairs: 3, LastRepairUnix: repaired.LastRepairUnix, Unrepaired: []*segmeshv1.DriftDifference{diff("peer", "AgIC= missing")}},
		},
		{name: "the error is gone once repaired", report: &segmeshv1.ReportRequest{InSync: true, Drift: repaired}, wantInSync: true, want: repaired},
		{name: "no drift field (an older agent)", report: &segmeshv1.ReportRequest{}, want: &segmeshv1.Drift{}},
		{
			name: "too many differences",
			report: &segmeshv1.ReportRequest{Drift: &segmeshv1.Drift{Repairs: 1, LastRepairUnix: now.Unix(),
				LastRepaired: many(maxDriftItems+5, "x"), LastRepairedMore: 7, Unrepaired: many(3, strings.Repeat("y", 400))}},
			want: &segmeshv1.Drift{Repairs: 1, LastRepairUnix: now.Unix(),
				LastRepaired: many(maxDriftItems, "x"), LastRepairedMore: 12,
				// each detail is cut to 256 bytes and "…": 5+259 bytes, three fit in 1024
				Unrepaired: []*segmeshv1.DriftDifference{
					diff("route", strings.Repeat("y", maxDriftDetail)+"…"),
					diff("route", strings.Repeat("y", maxDriftDetail)+"…"),
					diff("route", strings.Repeat("y", maxDriftDetail)+"…"),
				}},
		},
		{
			name: "hostile text and times",
			report: &segmeshv1.ReportRequest{Drift: &segmeshv1.Drift{Repairs: 1, LastRepairUnix: now.Add(time.Hour).Unix(),
				LastRepaired: []*segmeshv1.DriftDifference{diff("route\n\x1b[31m", "ok\n\x1b[2Kdb-1 in sync"), diff("", "x"), diff("Route", "y")},
				Unrepaired:   many(2, "z"), UnrepairedMore: 1<<32 - 1}},
			want: &segmeshv1.Drift{Repairs: 1, LastRepairUnix: now.Unix(),
				LastRepaired: []*segmeshv1.DriftDifference{diff("other", "ok  [2Kdb-1 in sync"), diff("other", "x"), diff("other", "y")},
				Unrepaired:   many(2, "z"), UnrepairedMore: 1<<32 - 1},
		},
		{name: "a repair time before 1970", report: &segmeshv1.ReportRequest{Drift: &segmeshv1.Drift{Repairs: 1, LastRepairUnix: -5}},
			want: &segmeshv1.Drift{Repairs: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := report(tt.report)
			if n.InSync != tt.wantInSync || n.Error != tt.wantError {
				t.Errorf("in sync %v, error %q; want %v, %q", n.InSync, n.Error, tt.wantInSync, tt.wantError)
			}
			if d := cmp.Diff(tt.want, n.Drift, protocmp.Transform()); d != "" {
				t.Errorf("drift in status (-want +got):\n%s", d)
			}
		})
	}

}
