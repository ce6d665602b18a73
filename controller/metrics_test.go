package controller

import (
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"segmesh/api/segmeshv1"
)

type dtoMetric = dto.Metric

// TestMetrics drives a controller through enrollments, a policy apply, a stream,
// a report and a revocation, and checks each collector's value.
func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	tc := startControllerWith(t, t.TempDir(), func(o *Options) { o.Metrics = reg })

	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	tc.enroll(tc.createToken(map[string]string{"role": "ops"}, false), "ops-1")
	if _, err := tc.tryEnroll("not a token", "x-1", newIdentity(t), ""); err == nil {
		t.Fatal("enrolling with a malformed token succeeded")
	}

	rev := apply(t, tc, policyWebDB).Revision
	s := tc.sync(web, &segmeshv1.SyncRequest{})
	nm := s.next(t)
	if nm.GetPolicyRevision() != rev {
		t.Fatalf("netmap revision %d, want %d", nm.GetPolicyRevision(), rev)
	}
	tc.clock.Advance(3 * time.Second)
	report := func() {
		t.Helper()
		if _, err := tc.agent(web).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{AppliedRevision: rev, AppliedHash: nm.GetHash(), InSync: true})); err != nil {
			t.Fatal(err)
		}
	}
	report()
	report() // the same revision again is not a second observation
	if _, err := tc.op().RevokeNode(bg, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: "ops-1"})); err != nil {
		t.Fatal(err)
	}

	want := `
# HELP segmesh_enrollments_total Enrollment requests by result: ok, rate_limited, or the refusal's code (permission_denied, unauthenticated, invalid_argument, already_exists, resource_exhausted, internal, ...).
# TYPE segmesh_enrollments_total counter
segmesh_enrollments_total{result="ok"} 3
segmesh_enrollments_total{result="unauthenticated"} 1
# HELP segmesh_nodes Enrolled nodes by state: online (a netmap stream is open), offline, revoked.
# TYPE segmesh_nodes gauge
segmesh_nodes{state="offline"} 1
segmesh_nodes{state="online"} 1
segmesh_nodes{state="revoked"} 1
# HELP segmesh_policy_revision Policy revision in force (0: default deny).
# TYPE segmesh_policy_revision gauge
segmesh_policy_revision 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "segmesh_enrollments_total", "segmesh_nodes", "segmesh_policy_revision"); err != nil {
		t.Error(err)
	}
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		switch f.GetName() {
		case "segmesh_policy_apply_to_enforce_seconds":
			h := f.GetMetric()[0].GetHistogram()
			if h.GetSampleCount() != 1 || h.GetSampleSum() != 3 {
				t.Errorf("apply to enforce: %d samples, sum %gs; want 1 sample of 3s (the fake clock's advance)", h.GetSampleCount(), h.GetSampleSum())
			}
		case "segmesh_netmap_compute_seconds":
			// Enrollments, the apply and the revocation each computed netmaps.
			if h := f.GetMetric()[0].GetHistogram(); h.GetSampleCount() < 3 {
				t.Errorf("netmap computations observed: %d, want at least 3", h.GetSampleCount())
			}
		}
	}
	// web-1 got its first netmap whole, then the gossip key the revocation of
	// ops-1 rotated as a delta.
	s.next(t)
	// The counter moves just after the send returns: poll.
	for kind, want := range map[string]float64{"full": 1, "delta": 1} {
		eventually(t, kind+" netmaps sent", func() bool {
			return testutil.ToFloat64(tc.c.metrics.updatesSent.WithLabelValues(kind)) == want
		})
	}
}

// TestMetricsRegistries checks that a controller without Options.Metrics
// runs (the collectors are kept but unexported), and that two controllers with
// their own registries coexist in one process.
func TestMetricsRegistries(t *testing.T) {
	for range 2 {
		reg := prometheus.NewRegistry()
		tc := startControllerWith(t, t.TempDir(), func(o *Options) { o.Metrics = reg })
		tc.enroll(tc.createToken(nil, false), "n-1")
		if got := testutil.ToFloat64(tc.c.metrics.enrollments.WithLabelValues(enrollOK)); got != 1 {
			t.Errorf("ok enrollments = %g, want 1", got)
		}
	}
	tc := startController(t, t.TempDir())
	tc.enroll(tc.createToken(nil, false), "n-1")
}

func TestEnrollmentResult(t *testing.T) {
	m := newMetrics(&Controller{})
	m.enrolled(nil, false)
	m.enrolled(connect.NewError(connect.CodePermissionDenied, nil), false)
	m.enrolled(connect.NewError(connect.CodeResourceExhausted, nil), true)
	for result, want := range map[string]float64{"ok": 1, "permission_denied": 1, "rate_limited": 1, "resource_exhausted": 0} {
		if got := testutil.ToFloat64(m.enrollments.WithLabelValues(result)); got != want {
			t.Errorf("result %s = %g, want %g", result, got, want)
		}
	}
}

func TestPolicyAppliedBounded(t *testing.T) {
	m := newMetrics(&Controller{})
	t0 := time.Unix(1000, 0)
	for rev := uint64(1); rev <= appliedRevisions+4; rev++ {
		m.policyApplied(rev, t0.Add(time.Duration(rev)*time.Second))
	}
	if len(m.appliedAt) != appliedRevisions || len(m.appliedOrder) != appliedRevisions {
		t.Fatalf("kept %d/%d revisions, want %d", len(m.appliedAt), len(m.appliedOrder), appliedRevisions)
	}
	m.reported(0, 1, t0.Add(time.Hour)) // forgotten: not observed
	m.reported(0, appliedRevisions+4, t0.Add(time.Minute))
	m.reported(appliedRevisions+4, appliedRevisions+4, t0.Add(time.Hour)) // repeated: not observed
	if n := testutil.CollectAndCount(m.applyToEnforce); n != 1 {
		t.Fatalf("series = %d", n)
	}
	var sum float64
	ch := make(chan prometheus.Metric, 1)
	m.applyToEnforce.Collect(ch)
	var pb = new(dtoMetric)
	if err := (<-ch).Write(pb); err != nil {
		t.Fatal(err)
	}
	sum = pb.GetHistogram().GetSampleSum()
	if want := float64(60 - (appliedRevisions + 4)); pb.GetHistogram().GetSampleCount() != 1 || sum != want {
		t.Errorf("observed %d samples summing %g, want 1 of %g", pb.GetHistogram().GetSampleCount(), sum, want)
	}
}
