package controller

import (
	"slices"
	"testing"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
)

// TestStatusDistributionProgress: Status counts the active nodes, the online ones
// and those whose agent reported the hash of the netmap the controller holds for
// them; revoked nodes count nowhere, and a node that disconnects after reporting
// still enforces what it reported.
func TestStatusDistributionProgress(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	db := tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	tc.enroll(tc.createToken(map[string]string{"role": "ops"}, false), "ops-1")
	if _, err := tc.op().RevokeNode(bg, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: "ops-1"})); err != nil {
		t.Fatal(err)
	}
	apply(t, tc, policyWebDB)

	type counts struct{ active, online, current uint32 }
	got := func() counts {
		st := tc.status()
		return counts{st.NodesActive, st.NodesOnline, st.NodesCurrent}
	}
	want := func(step string, w counts) {
		t.Helper()
		eventually(t, step, func() bool { return got() == w })
	}
	want("no agent connected: 2 active (ops-1 is revoked), none online", counts{2, 0, 0})

	webStream := tc.sync(web, &segmeshv1.SyncRequest{})
	nm := webStream.next(t)
	if _, err := tc.agent(web).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{AppliedRevision: nm.PolicyRevision, AppliedHash: nm.Hash})); err != nil {
		t.Fatal(err)
	}
	want("web-1 online and enforcing its netmap", counts{2, 1, 1})

	dbStream := tc.sync(db, &segmeshv1.SyncRequest{})
	dbStream.next(t)
	want("db-1 online without a report", counts{2, 2, 1})
	if _, err := tc.agent(db).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{AppliedRevision: 1, AppliedHash: "not-the-netmap-hash"})); err != nil {
		t.Fatal(err)
	}
	want("db-1 reports another netmap", counts{2, 2, 1})
	// unconverged_only lists db-1 (online, another netmap) alone: not web-1,
	// which enforces its netmap, nor the revoked ops-1; the counts stay.
	resp, err := tc.op().Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{UnconvergedOnly: true}))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, n := range resp.Msg.GetNodes() {
		names = append(names, n.GetName())
	}
	if !slices.Equal(names, []string{"db-1"}) || resp.Msg.GetNodesActive() != 2 || resp.Msg.GetNodesOnline() != 2 {
		t.Errorf("unconverged_only: nodes %v, active %d, online %d; want [db-1], 2, 2", names, resp.Msg.GetNodesActive(), resp.Msg.GetNodesOnline())
	}

	webStream.cancel()
	want("web-1 offline after its report", counts{2, 1, 1})

	// Revision 2 changes web-1's netmap (db-1 may now reach it on tcp/22): what
	// web-1 reported is no longer what it should enforce.
	apply(t, tc, policyWebDB+"  - name: db-to-web\n    from: [db]\n    to: [web]\n    ports: [tcp/22]\n")
	want("revision 2 changed web-1's netmap", counts{2, 1, 0})
}
