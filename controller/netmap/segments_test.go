package netmap

import (
	"slices"
	"testing"
	"time"

	"segmesh/controller/store"
	"segmesh/policy"
)

// TestEngineSegments: a node's segments are those of the policy in force that a
// rule references and that it belongs to, sorted; they follow relabels and
// policy changes; a revoked or unknown node and default deny have none.
// PeerNames lists the peers of the node's netmap, Peer finds each.
func TestEngineSegments(t *testing.T) {
	prog, err := policy.Prepare(mustParse(t, webToDB+`  - name: all-to-ops
    from: [all]
    to: [ops]
    ports: [tcp/22]
`))
	if err != nil {
		t.Fatal(err)
	}
	web, db, ops := node("web-1", "web", 2), node("db-1", "db", 3), node("ops-1", "ops", 4)
	gone := node("gone-1", "web", 5)
	gone.RevokedAt = time.Unix(1, 0)
	e := NewEngine(cfg, 1, prog, []store.Node{web, db, ops, gone})
	for name, want := range map[string][]string{"web-1": {"all", "web"}, "db-1": {"all", "db"}, "ops-1": {"all", "ops"}, "gone-1": nil, "ghost": nil} {
		if got := e.Segments(name); !slices.Equal(got, want) {
			t.Errorf("Segments(%s) = %q, want %q", name, got, want)
		}
	}
	// Everyone reaches ops-1 on tcp/22, web-1 reaches db-1: the peers follow.
	for name, want := range map[string][]string{"web-1": {"db-1", "ops-1"}, "db-1": {"ops-1", "web-1"}, "ops-1": {"db-1", "web-1"}, "gone-1": nil, "ghost": nil} {
		if got := e.PeerNames(name); !slices.Equal(got, want) {
			t.Errorf("PeerNames(%s) = %q, want %q", name, got, want)
		}
		if nm, _, ok := e.Netmap(name); ok && name != "gone-1" {
			var fromNetmap []string
			for _, p := range nm.GetPeers() {
				fromNetmap = append(fromNetmap, p.GetName())
			}
			if !slices.Equal(fromNetmap, want) {
				t.Errorf("%s's netmap lists peers %q, PeerNames %q", name, fromNetmap, want)
			}
		}
		// Peer finds exactly the netmap's peers, with their entries.
		for _, peer := range []string{"web-1", "db-1", "ops-1", "gone-1", "ghost"} {
			p, ok := e.Peer(name, peer)
			if ok != slices.Contains(want, peer) || ok && (p.GetName() != peer || len(p.GetPublicKey()) != 32) {
				t.Errorf("Peer(%s, %s) = %v, %v; want found %v", name, peer, p, ok, slices.Contains(want, peer))
			}
		}
	}
	web.Labels = map[string]string{"role": "db"}
	if _, err := e.Upsert(web); err != nil {
		t.Fatal(err)
	}
	if got := e.Segments("web-1"); !slices.Equal(got, []string{"all", "db"}) {
		t.Errorf("after the relabel to role=db: %q, want [all db]", got)
	}
	// Revision 2 no longer references all or ops: only referenced segments count.
	prog2, err := policy.Prepare(mustParse(t, webToDB))
	if err != nil {
		t.Fatal(err)
	}
	e.SetPolicy(2, prog2)
	if got := e.Segments("ops-1"); got != nil {
		t.Errorf("ops-1 under a policy that references no segment of it: %q, want none", got)
	}
	if got := e.Segments("db-1"); !slices.Equal(got, []string{"db"}) {
		t.Errorf("db-1 under revision 2: %q, want [db]", got)
	}
	e.SetPolicy(3, nil)
	if got := e.Segments("db-1"); got != nil {
		t.Errorf("under default deny: %q, want none", got)
	}
}
