package controller

import (
	"slices"
	"testing"

	"segmesh/api/segmeshv1"
)

// TestPushToStream: an out-of-band update reaches the SyncUpdates stream of an
// agent that listed its feature, after the netmap; an agent without the feature
// gets nothing, and the live tracker knows each stream's features.
func TestPushToStream(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	db := tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	apply(t, tc, policyWebDB)
	dbCh := tc.rawStream(db, &segmeshv1.SyncRequest{Features: []string{"relay", "nonsense", featurePunch}})
	webStream := tc.sync(web, &segmeshv1.SyncRequest{})
	if u := recvUpdate(t, dbCh); u.GetFull() == nil {
		t.Fatalf("first update %v, want a whole netmap", u)
	}
	webStream.next(t)
	if on, fs := tc.c.live.online("db-1"); !on || !slices.Equal(fs, []string{featurePunch, featureRelay}) {
		t.Errorf("live db-1: online %v features %v, want online with [punch relay]", on, fs)
	}
	if on, fs := tc.c.live.online("web-1"); !on || fs != nil {
		t.Errorf("live web-1: online %v features %v, want online without features", on, fs)
	}
	punch := &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Punch{Punch: &segmeshv1.Punch{Peer: "web-1"}}}
	if !tc.c.push("db-1", featurePunch, punch) {
		t.Fatal("push to db-1, which listed punch: not queued")
	}
	if u := recvUpdate(t, dbCh); u.GetPunch().GetPeer() != "web-1" {
		t.Fatalf("db-1 got %v, want the punch", u)
	}
	if tc.c.push("web-1", featurePunch, punch) {
		t.Error("push to web-1, which listed no feature: queued")
	}
	if tc.c.push("ops-1", featurePunch, punch) {
		t.Error("push to a node without a stream: queued")
	}
	webStream.none(t)
}
