package controller

import (
	"strconv"
	"testing"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
)

// TestReportUpdatesEndpoint (issue 10, roaming defect 3): a report naming a new
// endpoint updates the node's endpoint at once, as a new stream's SyncRequest
// would: its peers' open streams get a netmap with the new endpoint; an endpoint
// that fails validation is refused, and so is churn beyond the rate limit, with
// the report's status still recorded.
func TestReportUpdatesEndpoint(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	db := tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	apply(t, tc, policyWebDB)
	dbStream := tc.sync(db, &segmeshv1.SyncRequest{Endpoint: "192.0.2.12:51820"})
	tc.sync(web, &segmeshv1.SyncRequest{Endpoint: "192.0.2.11:51820"})
	peerEndpoint := func(nm *segmeshv1.Netmap) string {
		for _, p := range nm.GetPeers() {
			if p.GetName() == "web-1" {
				return p.GetEndpoint()
			}
		}
		return ""
	}
	for nm := dbStream.next(t); peerEndpoint(nm) != "192.0.2.11:51820"; nm = dbStream.next(t) {
	}

	report := func(ep string) error {
		_, err := tc.agent(web).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{AppliedRevision: 1, Endpoint: ep}))
		return err
	}
	if err := report("198.51.100.11:51820"); err != nil {
		t.Fatalf("report with a new endpoint: %v", err)
	}
	if nm := dbStream.next(t); peerEndpoint(nm) != "198.51.100.11:51820" {
		t.Fatalf("db-1's netmap after web-1 reported a new endpoint: web-1 at %q, want 198.51.100.11:51820", peerEndpoint(nm))
	}
	if err := report("198.51.100.11:51820"); err != nil {
		t.Fatalf("report with the same endpoint: %v", err)
	}
	dbStream.none(t) // no change, no netmap
	if err := report("127.0.0.1:53"); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("report with a loopback endpoint: %v, want invalid_argument", err)
	}
	var last error
	for i := range endpointChangeBurst + 1 {
		last = report("198.51.100.11:" + strconv.Itoa(40000+i))
	}
	if connect.CodeOf(last) != connect.CodeResourceExhausted {
		t.Errorf("report with endpoint change %d: %v, want resource_exhausted", endpointChangeBurst+2, last)
	}
}
