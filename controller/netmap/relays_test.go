package netmap

import (
	"slices"
	"testing"
	"time"

	"segmesh/controller/store"
	"segmesh/policy"
)

// TestEngineRelays: Relays, RelaysFor and Peer follow the policy in force
// and the nodes' records (relabel, revocation, default deny).
func TestEngineRelays(t *testing.T) {
	src := webToDB + "relays:\n  - {node: relay-1, for: [web, db]}\n  - {node: db-2, for: [all]}\n"
	prog, err := policy.Prepare(mustParse(t, src))
	if err != nil {
		t.Fatal(err)
	}
	nodes := []store.Node{node("web-1", "web", 2), node("db-1", "db", 3), node("db-2", "db", 4), node("ops-1", "ops", 5), node("relay-1", "relay", 6)}
	e := NewEngine(cfg, 1, prog, nodes)
	if got := e.Relays(); !slices.Equal(got, []string{"relay-1", "db-2"}) {
		t.Errorf("Relays = %v, want [relay-1 db-2]", got)
	}
	tests := []struct {
		a, b   string
		relays []string
		peer   bool
	}{
		{"web-1", "db-1", []string{"relay-1", "db-2"}, true},
		{"db-1", "web-1", []string{"relay-1", "db-2"}, true},
		{"web-1", "db-2", []string{"relay-1"}, true}, // db-2 never relays for itself
		{"web-1", "ops-1", []string{"db-2"}, false},  // relay-1's for leaves ops out; not peers either
		{"db-1", "db-2", []string{"relay-1"}, false}, // db-2 is an end
		{"web-1", "nobody", nil, false},
		{"web-1", "web-1", []string{"relay-1", "db-2"}, false},
	}
	for _, tt := range tests {
		if got := e.RelaysFor(tt.a, tt.b); !slices.Equal(got, tt.relays) {
			t.Errorf("RelaysFor(%s, %s) = %v, want %v", tt.a, tt.b, got, tt.relays)
		}
		if got := isPeer(e, tt.a, tt.b); got != tt.peer {
			t.Errorf("Peer(%s, %s) = %v, want %v", tt.a, tt.b, got, tt.peer)
		}
	}

	// Relabeled out of relay-1's for; then revoked.
	db := nodes[1]
	db.Labels = map[string]string{"role": "ops"}
	if _, err := e.Upsert(db); err != nil {
		t.Fatal(err)
	}
	if got := e.RelaysFor("web-1", "db-1"); !slices.Equal(got, []string{"db-2"}) || isPeer(e, "web-1", "db-1") {
		t.Errorf("after relabel: RelaysFor = %v, Peer %v; want [db-2], false", got, isPeer(e, "web-1", "db-1"))
	}
	db.RevokedAt = time.Unix(1, 0)
	if _, err := e.Upsert(db); err != nil {
		t.Fatal(err)
	}
	if got := e.RelaysFor("web-1", "db-1"); got != nil {
		t.Errorf("revoked: RelaysFor = %v, want nil", got)
	}

	e.SetPolicy(2, nil)
	if e.Relays() != nil || e.RelaysFor("web-1", "db-2") != nil || isPeer(e, "web-1", "db-2") {
		t.Errorf("default deny: Relays %v, RelaysFor %v, Peer %v", e.Relays(), e.RelaysFor("web-1", "db-2"), isPeer(e, "web-1", "db-2"))
	}
}

func isPeer(e *Engine, a, b string) bool {
	_, ok := e.Peer(a, b)
	return ok
}
