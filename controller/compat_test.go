package controller

import (
	"slices"
	"testing"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
)

// TestLegacySyncStream checks an agent that predates deltas: Sync sends whole
// netmaps with version 1 hashes, as such an agent checks them, and a report of
// that hash counts as enforcing the desired netmap in status.
func TestLegacySyncStream(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.createToken(map[string]string{"role": "web"}, true)
	a := tc.enroll(web, "web-1")
	tc.enroll(web, "web-2")
	apply(t, tc, policyMesh)
	s := tc.syncLegacy(a, &segmeshv1.SyncRequest{})
	nm := s.nextWhere(t, func(nm *segmeshv1.Netmap) bool { return len(nm.Peers) == 1 })
	if nm.GetHashVersion() != 0 || nm.GetHash() != wire.NetmapHash(nm) {
		t.Fatalf("Sync sent hash version %d hash %.12s; want version 0 and NetmapHash %.12s", nm.GetHashVersion(), nm.GetHash(), wire.NetmapHash(nm))
	}
	if _, err := tc.agent(a).Report(bg, connect.NewRequest(&segmeshv1.ReportRequest{AppliedRevision: nm.GetPolicyRevision(), AppliedHash: nm.GetHash(), InSync: true})); err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(tc.status().Nodes, func(n *segmeshv1.NodeStatus) bool { return n.Name == "web-1" })
	if st := tc.status().Nodes[i]; st.GetAppliedHash() == "" || st.GetAppliedHash() != st.GetDesiredHash() {
		t.Fatalf("status of the legacy agent: applied %.12s desired %.12s, want equal", st.GetAppliedHash(), st.GetDesiredHash())
	}
	tc.enroll(web, "web-3")
	if nm := s.nextWhere(t, func(nm *segmeshv1.Netmap) bool { return len(nm.Peers) == 2 }); nm.GetHash() != wire.NetmapHash(nm) {
		t.Fatal("the netmap after a join does not carry its version 1 hash")
	}
}
