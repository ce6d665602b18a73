// Package storetest is the conformance suite of store.Store implementations: every
// implementation (bbolt, etcd) runs Run against itself so that they keep the same
// semantics.
package storetest

import (
	"bytes"
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"segmesh/controller/store"
)

// Opener opens a new, empty store for one test. reopen closes s and opens the
// same data again (a restart). The test closes what it gets at cleanup.
type Opener func(t *testing.T) (s store.Store, reopen func() store.Store)

// Run runs every conformance case as a subtest of t.
func Run(t *testing.T, open Opener) {
	cases := []struct {
		name string
		fn   func(*testing.T, Opener)
	}{
		{"RoundTripAndPersistence", roundTripAndPersistence},
		{"PolicyRevisionsIncrease", policyRevisionsIncrease},
		{"ClaimAddressConflict", claimAddressConflict},
		{"UpdateRollsBackOnError", updateRollsBackOnError},
		{"NodesSorted", nodesSorted},
		{"WriteInViewFails", writeInViewFails},
		{"PublicKeyIndex", publicKeyIndex},
		{"DeleteNodeQuarantinesAddresses", deleteNodeQuarantinesAddresses},
		{"OperatorsIndexedByTokenHash", operatorsIndexedByTokenHash},
		{"ReadsSeeOwnWrites", readsSeeOwnWrites},
		{"AuditChain", auditChain},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { c.fn(t, open) })
	}
}

func do(fns ...func() error) error {
	for _, f := range fns {
		if err := f(); err != nil {
			return err
		}
	}
	return nil
}

func roundTripAndPersistence(t *testing.T, open Opener) {
	s, reopen := open(t)
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	node := store.Node{
		Name: "db-1", Labels: map[string]string{"role": "db"},
		Addresses: []netip.Addr{netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("fd5e::2")},
		PublicKey: make([]byte, 32), IdentityKey: []byte{0x30, 0x59, 1}, Endpoint: "192.0.2.1:51820", EnrolledAt: now, TokenID: "00aa",
		Candidates: []store.Candidate{{Endpoint: "10.0.0.1:51820", Kind: "local"}, {Endpoint: "192.0.2.1:51820", Kind: "observed"}},
	}
	tok := store.Token{ID: "00aa", SecretHash: []byte{1, 2}, Labels: map[string]string{"role": "db"}, CreatedAt: now, ExpiresAt: now.Add(time.Hour), UsedBy: "db-1", UsedAt: now, Uses: 1}
	pol := store.Policy{Revision: 1, Filename: "p.yaml", Content: []byte("segments: {}\n"), AppliedAt: now, AppliedBy: "operator"}
	audit := store.AuditEntry{Time: now, Actor: "operator", Action: "policy.apply", Detail: "revision 1"}
	err := s.Update(func(tx store.Tx) error {
		return do(
			func() error { return tx.PutNode(node) },
			func() error { return tx.PutToken(tok) },
			func() error { return tx.PutPolicy(pol) },
			func() error { return tx.AppendAudit(audit) },
			func() error { return tx.ClaimAddress(node.Addresses[0], node.Name) },
			func() error { return tx.PutMeta("gossip-key", []byte("k")) },
		)
	})
	if err != nil {
		t.Fatal(err)
	}
	s2 := reopen()
	err = s2.View(func(tx store.Tx) error {
		gotNode, ok, err := tx.Node("db-1")
		if err != nil || !ok {
			t.Fatalf("Node: %v %v", ok, err)
		}
		if d := cmp.Diff(node, gotNode, cmpopts.EquateComparable(netip.Addr{})); d != "" {
			t.Errorf("node (-want +got):\n%s", d)
		}
		gotTok, ok, err := tx.Token("00aa")
		if err != nil || !ok {
			t.Fatalf("Token: %v %v", ok, err)
		}
		if d := cmp.Diff(tok, gotTok); d != "" {
			t.Errorf("token (-want +got):\n%s", d)
		}
		gotPol, ok, err := tx.LatestPolicy()
		if err != nil || !ok {
			t.Fatalf("LatestPolicy: %v %v", ok, err)
		}
		if d := cmp.Diff(pol, gotPol); d != "" {
			t.Errorf("policy (-want +got):\n%s", d)
		}
		gotAudit, err := tx.Audit()
		if err != nil {
			t.Fatal(err)
		}
		audit.Seq, audit.Hash = 1, store.AuditHash(store.AuditEntry{Seq: 1, Time: audit.Time, Actor: audit.Actor, Action: audit.Action, Detail: audit.Detail})
		if d := cmp.Diff([]store.AuditEntry{audit}, gotAudit); d != "" {
			t.Errorf("audit (-want +got):\n%s", d)
		}
		owner, ok, err := tx.AddressOwner(node.Addresses[0])
		if err != nil || !ok || owner != "db-1" {
			t.Errorf("AddressOwner = %q %v %v", owner, ok, err)
		}
		if _, ok, _ := tx.AddressOwner(node.Addresses[1]); ok {
			t.Errorf("unclaimed address reported as owned")
		}
		m, err := tx.Meta("gossip-key")
		if err != nil || string(m) != "k" {
			t.Errorf("Meta = %q %v", m, err)
		}
		if m, err := tx.Meta("absent"); err != nil || m != nil {
			t.Errorf("Meta(absent) = %q %v, want nil", m, err)
		}
		if _, ok, _ := tx.Node("nope"); ok {
			t.Errorf("missing node reported present")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func policyRevisionsIncrease(t *testing.T, open Opener) {
	s, _ := open(t)
	tests := []struct {
		rev     uint64
		wantErr bool
	}{
		{2, true}, {0, true}, {1, false}, {1, true}, {3, true}, {2, false},
	}
	for _, tt := range tests {
		err := s.Update(func(tx store.Tx) error { return tx.PutPolicy(store.Policy{Revision: tt.rev}) })
		if tt.wantErr != (err != nil) {
			t.Errorf("PutPolicy(%d): err = %v, wantErr %v", tt.rev, err, tt.wantErr)
		}
		if err != nil && !errors.Is(err, store.ErrRevision) {
			t.Errorf("PutPolicy(%d): err = %v, want ErrRevision", tt.rev, err)
		}
	}
	_ = s.View(func(tx store.Tx) error {
		p, ok, err := tx.LatestPolicy()
		if err != nil || !ok || p.Revision != 2 {
			t.Errorf("LatestPolicy = %d %v %v, want 2", p.Revision, ok, err)
		}
		revs, err := tx.PolicyRevisions()
		if err != nil || !slices.Equal(revs, []uint64{1, 2}) {
			t.Errorf("PolicyRevisions = %v %v, want [1 2]", revs, err)
		}
		if p, ok, err := tx.Policy(1); err != nil || !ok || p.Revision != 1 {
			t.Errorf("Policy(1) = %d %v %v", p.Revision, ok, err)
		}
		if _, ok, err := tx.Policy(3); err != nil || ok {
			t.Errorf("Policy(3) = %v %v, want absent", ok, err)
		}
		return nil
	})
}

func claimAddressConflict(t *testing.T, open Opener) {
	s, _ := open(t)
	a := netip.MustParseAddr("100.64.0.2")
	if err := s.Update(func(tx store.Tx) error { return tx.ClaimAddress(a, "a") }); err != nil {
		t.Fatal(err)
	}
	if err := s.Update(func(tx store.Tx) error { return tx.ClaimAddress(a, "a") }); err != nil {
		t.Errorf("re-claim by owner: %v", err)
	}
	if err := s.Update(func(tx store.Tx) error { return tx.ClaimAddress(a, "b") }); !errors.Is(err, store.ErrAddressInUse) {
		t.Errorf("claim by other node: err = %v, want ErrAddressInUse", err)
	}
}

func updateRollsBackOnError(t *testing.T, open Opener) {
	s, _ := open(t)
	boom := errors.New("boom")
	err := s.Update(func(tx store.Tx) error {
		if err := tx.PutNode(store.Node{Name: "x"}); err != nil {
			return err
		}
		if err := tx.PutToken(store.Token{ID: "t"}); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v, want boom", err)
	}
	_ = s.View(func(tx store.Tx) error {
		if _, ok, _ := tx.Node("x"); ok {
			t.Error("node survived a rolled-back transaction")
		}
		if _, ok, _ := tx.Token("t"); ok {
			t.Error("token survived a rolled-back transaction")
		}
		return nil
	})
}

func nodesSorted(t *testing.T, open Opener) {
	s, _ := open(t)
	_ = s.Update(func(tx store.Tx) error {
		for _, n := range []string{"web-2", "db-1", "web-10", "app"} {
			if err := tx.PutNode(store.Node{Name: n}); err != nil {
				return err
			}
		}
		return nil
	})
	var names []string
	_ = s.View(func(tx store.Tx) error {
		ns, err := tx.Nodes()
		for _, n := range ns {
			names = append(names, n.Name)
		}
		return err
	})
	if d := cmp.Diff([]string{"app", "db-1", "web-10", "web-2"}, names); d != "" {
		t.Errorf("Nodes order (-want +got):\n%s", d)
	}
}

func writeInViewFails(t *testing.T, open Opener) {
	s, _ := open(t)
	writes := map[string]func(store.Tx) error{
		"PutNode":      func(tx store.Tx) error { return tx.PutNode(store.Node{Name: "x"}) },
		"PutToken":     func(tx store.Tx) error { return tx.PutToken(store.Token{ID: "x"}) },
		"PutPolicy":    func(tx store.Tx) error { return tx.PutPolicy(store.Policy{Revision: 1}) },
		"ClaimAddress": func(tx store.Tx) error { return tx.ClaimAddress(netip.MustParseAddr("100.64.0.9"), "x") },
		"PutMeta":      func(tx store.Tx) error { return tx.PutMeta("k", []byte("v")) },
		"AppendAudit":  func(tx store.Tx) error { return tx.AppendAudit(store.AuditEntry{Actor: "a"}) },
	}
	for name, w := range writes {
		if err := s.View(w); err == nil {
			t.Errorf("%s in a View transaction succeeded", name)
		}
	}
}

func publicKeyIndex(t *testing.T, open Opener) {
	s, _ := open(t)
	k1, k2 := []byte{1, 31: 1}, []byte{2, 31: 2}
	steps := []struct {
		name    string
		put     store.Node
		wantErr bool
		lookups map[string]string // key byte -> owner ("" = none)
	}{
		{"create a", store.Node{Name: "a", PublicKey: k1}, false, map[string]string{"1": "a", "2": ""}},
		{"b takes a's key", store.Node{Name: "b", PublicKey: k1}, true, map[string]string{"1": "a"}},
		{"a rotates its key", store.Node{Name: "a", PublicKey: k2}, false, map[string]string{"1": "", "2": "a"}},
		{"b takes the freed key", store.Node{Name: "b", PublicKey: k1}, false, map[string]string{"1": "b", "2": "a"}},
	}
	keyOf := map[string][]byte{"1": k1, "2": k2}
	for _, st := range steps {
		err := s.Update(func(tx store.Tx) error { return tx.PutNode(st.put) })
		if (err != nil) != st.wantErr {
			t.Fatalf("%s: err = %v, wantErr %v", st.name, err, st.wantErr)
		}
		_ = s.View(func(tx store.Tx) error {
			for k, want := range st.lookups {
				got, ok, err := tx.NodeByPublicKey(keyOf[k])
				if err != nil || got != want || ok != (want != "") {
					t.Errorf("%s: key %s owner = %q %v %v, want %q", st.name, k, got, ok, err, want)
				}
			}
			return nil
		})
	}
}

func deleteNodeQuarantinesAddresses(t *testing.T, open Opener) {
	s, _ := open(t)
	a4, a6 := netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("fd5e::2")
	key := bytes.Repeat([]byte{7}, 32)
	until := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	err := s.Update(func(tx store.Tx) error {
		return do(
			func() error { return tx.ClaimAddress(a4, "web-1") },
			func() error { return tx.ClaimAddress(a6, "web-1") },
			func() error {
				return tx.PutNode(store.Node{Name: "web-1", PublicKey: key, Addresses: []netip.Addr{a4, a6}})
			},
			func() error { return tx.DeleteNode("web-1", until) },
			func() error { return tx.DeleteNode("never-was", until) },
		)
	})
	if err != nil {
		t.Fatal(err)
	}
	err = s.View(func(tx store.Tx) error {
		if _, ok, _ := tx.Node("web-1"); ok {
			t.Error("node still stored after DeleteNode")
		}
		if _, ok, _ := tx.NodeByPublicKey(key); ok {
			t.Error("public key still indexed after DeleteNode")
		}
		for _, a := range []netip.Addr{a4, a6} {
			if _, ok, _ := tx.AddressOwner(a); ok {
				t.Errorf("%s still claimed", a)
			}
			got, ok, err := tx.AddressQuarantine(a)
			if err != nil || !ok || !got.Equal(until) {
				t.Errorf("AddressQuarantine(%s) = %v %v %v, want %v", a, got, ok, err, until)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func operatorsIndexedByTokenHash(t *testing.T, open Opener) {
	s, _ := open(t)
	h1, h2 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	err := s.Update(func(tx store.Tx) error {
		if err := tx.PutOperator(store.Operator{Name: "admin", Role: store.RoleAdmin, TokenHash: h1}); err != nil {
			return err
		}
		if err := tx.PutOperator(store.Operator{Name: "eve", Role: store.RoleViewer, TokenHash: h1}); err == nil {
			t.Error("two operators with one token hash were accepted")
		}
		// Replacing the token of an operator drops the old hash from the index.
		return tx.PutOperator(store.Operator{Name: "admin", Role: store.RoleAdmin, TokenHash: h2})
	})
	if err != nil {
		t.Fatal(err)
	}
	_ = s.View(func(tx store.Tx) error {
		if _, ok, _ := tx.OperatorByTokenHash(h1); ok {
			t.Error("old token hash still finds the operator")
		}
		if o, ok, _ := tx.OperatorByTokenHash(h2); !ok || o.Name != "admin" {
			t.Errorf("OperatorByTokenHash = %+v %v", o, ok)
		}
		ops, err := tx.Operators()
		if err != nil || len(ops) != 1 || ops[0].Name != "admin" {
			t.Errorf("Operators = %+v %v, want [admin]", ops, err)
		}
		return nil
	})
}

// readsSeeOwnWrites: inside one Update, lookups and lists see what the
// transaction wrote before them, including deletions.
func readsSeeOwnWrites(t *testing.T, open Opener) {
	s, _ := open(t)
	if err := s.Update(func(tx store.Tx) error {
		return do(
			func() error { return tx.PutNode(store.Node{Name: "b"}) },
			func() error { return tx.PutToken(store.Token{ID: "t1"}) },
			func() error { return tx.PutPolicy(store.Policy{Revision: 1}) },
		)
	}); err != nil {
		t.Fatal(err)
	}
	err := s.Update(func(tx store.Tx) error {
		if err := do(
			func() error { return tx.PutNode(store.Node{Name: "a"}) },
			func() error { return tx.PutNode(store.Node{Name: "c"}) },
			func() error { return tx.DeleteNode("b", time.Time{}) },
			func() error { return tx.PutToken(store.Token{ID: "t0"}) },
			func() error { return tx.PutPolicy(store.Policy{Revision: 2}) },
			func() error { return tx.PutPolicy(store.Policy{Revision: 3}) },
		); err != nil {
			return err
		}
		var names []string
		ns, err := tx.Nodes()
		for _, n := range ns {
			names = append(names, n.Name)
		}
		if err != nil || !slices.Equal(names, []string{"a", "c"}) {
			t.Errorf("Nodes = %v %v, want [a c]", names, err)
		}
		toks, err := tx.Tokens()
		if err != nil || len(toks) != 2 || toks[0].ID != "t0" || toks[1].ID != "t1" {
			t.Errorf("Tokens = %+v %v, want [t0 t1]", toks, err)
		}
		if p, ok, err := tx.LatestPolicy(); err != nil || !ok || p.Revision != 3 {
			t.Errorf("LatestPolicy = %d %v %v, want 3", p.Revision, ok, err)
		}
		if revs, err := tx.PolicyRevisions(); err != nil || !slices.Equal(revs, []uint64{1, 2, 3}) {
			t.Errorf("PolicyRevisions = %v %v, want [1 2 3]", revs, err)
		}
		if _, ok, _ := tx.Node("b"); ok {
			t.Error("node deleted in this transaction still found")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// auditChain appends records one per Update and checks that they chain and
// verify.
func auditChain(t *testing.T, open Opener) {
	s, _ := open(t)
	for i := range 5 {
		err := s.Update(func(tx store.Tx) error {
			return tx.AppendAudit(store.AuditEntry{Time: time.Unix(int64(1000+i), 5).UTC(), Actor: "admin", Action: "token.create", Object: "token:" + string(rune('a'+i)), Result: "ok"})
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	err := s.View(func(tx store.Tx) error {
		es, err := tx.Audit()
		if err != nil {
			return err
		}
		seq, h, err := tx.AuditHead()
		if err != nil {
			return err
		}
		if seq != 5 || len(es) != 5 {
			t.Errorf("head %d with %d records, want 5", seq, len(es))
		}
		if p := store.VerifyAudit(es, seq, h); p != nil {
			t.Errorf("VerifyAudit = %v", p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// UndecodableRevision checks that a revision record that does not decode
// (edited by hand; corrupt overwrites revision rev with raw, outside the Store)
// is still listed and counted, so the next revision can be stored, while reading
// it reports the decode error. s must be empty.
func UndecodableRevision(t *testing.T, s store.Store, corrupt func(rev uint64, raw []byte) error) {
	t.Helper()
	for rev := uint64(1); rev <= 2; rev++ {
		if err := s.Update(func(tx store.Tx) error { return tx.PutPolicy(store.Policy{Revision: rev, Content: []byte("x")}) }); err != nil {
			t.Fatal(err)
		}
	}
	if err := corrupt(2, []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	_ = s.View(func(tx store.Tx) error {
		revs, err := tx.PolicyRevisions()
		if err != nil || !slices.Equal(revs, []uint64{1, 2}) {
			t.Errorf("PolicyRevisions = %v, %v; want [1 2]", revs, err)
		}
		if _, _, err := tx.Policy(2); err == nil {
			t.Error("Policy(2) decoded a corrupt record")
		}
		if _, _, err := tx.LatestPolicy(); err == nil {
			t.Error("LatestPolicy decoded a corrupt record")
		}
		if p, ok, err := tx.Policy(1); err != nil || !ok || p.Revision != 1 {
			t.Errorf("Policy(1) = %v %v %v", p.Revision, ok, err)
		}
		return nil
	})
	tests := []struct {
		rev     uint64
		wantErr bool
	}{{2, true}, {4, true}, {3, false}}
	for _, tt := range tests {
		err := s.Update(func(tx store.Tx) error { return tx.PutPolicy(store.Policy{Revision: tt.rev}) })
		if (err != nil) != tt.wantErr {
			t.Errorf("PutPolicy(%d) after a corrupt latest: err = %v, wantErr %v", tt.rev, err, tt.wantErr)
		}
	}
}
