package store

import (
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	bolt "go.etcd.io/bbolt"
)

func openTemp(t *testing.T) (*Bolt, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "controller.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s, path
}

func TestRoundTripAndPersistence(t *testing.T) {
	s, path := openTemp(t)
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	node := Node{
		Name: "db-1", Labels: map[string]string{"role": "db"},
		Addresses: []netip.Addr{netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("fd5e::2")},
		PublicKey: make([]byte, 32), IdentityKey: []byte{0x30, 0x59, 1}, Endpoint: "192.0.2.1:51820", EnrolledAt: now, TokenID: "00aa",
		Candidates: []Candidate{{Endpoint: "10.0.0.1:51820", Kind: "local"}, {Endpoint: "192.0.2.1:51820", Kind: "observed"}},
	}
	tok := Token{ID: "00aa", SecretHash: []byte{1, 2}, Labels: map[string]string{"role": "db"}, CreatedAt: now, ExpiresAt: now.Add(time.Hour), UsedBy: "db-1", UsedAt: now, Uses: 1}
	pol := Policy{Revision: 1, Filename: "p.yaml", Content: []byte("segments: {}\n"), AppliedAt: now, AppliedBy: "operator"}
	audit := AuditEntry{Time: now, Actor: "operator", Action: "policy.apply", Detail: "revision 1"}
	err := s.Update(func(tx Tx) error {
		for _, f := range []func() error{
			func() error { return tx.PutNode(node) },
			func() error { return tx.PutToken(tok) },
			func() error { return tx.PutPolicy(pol) },
			func() error { return tx.AppendAudit(audit) },
			func() error { return tx.ClaimAddress(node.Addresses[0], node.Name) },
			func() error { return tx.PutMeta("gossip-key", []byte("k")) },
		} {
			if err := f(); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	err = s2.View(func(tx Tx) error {
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
		audit.Seq, audit.Hash = 1, AuditHash(AuditEntry{Seq: 1, Time: audit.Time, Actor: audit.Actor, Action: audit.Action, Detail: audit.Detail})
		if d := cmp.Diff([]AuditEntry{audit}, gotAudit); d != "" {
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
		if _, ok, _ := tx.Node("nope"); ok {
			t.Errorf("missing node reported present")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestPolicyRevisionsIncrease(t *testing.T) {
	s, _ := openTemp(t)
	tests := []struct {
		rev     uint64
		wantErr bool
	}{
		{2, true}, {0, true}, {1, false}, {1, true}, {3, true}, {2, false},
	}
	for _, tt := range tests {
		err := s.Update(func(tx Tx) error { return tx.PutPolicy(Policy{Revision: tt.rev}) })
		if tt.wantErr != (err != nil) {
			t.Errorf("PutPolicy(%d): err = %v, wantErr %v", tt.rev, err, tt.wantErr)
		}
		if err != nil && !errors.Is(err, ErrRevision) {
			t.Errorf("PutPolicy(%d): err = %v, want ErrRevision", tt.rev, err)
		}
	}
	_ = s.View(func(tx Tx) error {
		p, ok, err := tx.LatestPolicy()
		if err != nil || !ok || p.Revision != 2 {
			t.Errorf("LatestPolicy = %d %v %v, want 2", p.Revision, ok, err)
		}
		return nil
	})
}

func TestClaimAddressConflict(t *testing.T) {
	s, _ := openTemp(t)
	a := netip.MustParseAddr("100.64.0.2")
	if err := s.Update(func(tx Tx) error { return tx.ClaimAddress(a, "a") }); err != nil {
		t.Fatal(err)
	}
	if err := s.Update(func(tx Tx) error { return tx.ClaimAddress(a, "a") }); err != nil {
		t.Errorf("re-claim by owner: %v", err)
	}
	if err := s.Update(func(tx Tx) error { return tx.ClaimAddress(a, "b") }); !errors.Is(err, ErrAddressInUse) {
		t.Errorf("claim by other node: err = %v, want ErrAddressInUse", err)
	}
}

func TestUpdateRollsBackOnError(t *testing.T) {
	s, _ := openTemp(t)
	boom := errors.New("boom")
	err := s.Update(func(tx Tx) error {
		if err := tx.PutNode(Node{Name: "x"}); err != nil {
			return err
		}
		if err := tx.PutToken(Token{ID: "t"}); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v, want boom", err)
	}
	_ = s.View(func(tx Tx) error {
		if _, ok, _ := tx.Node("x"); ok {
			t.Error("node survived a rolled-back transaction")
		}
		if _, ok, _ := tx.Token("t"); ok {
			t.Error("token survived a rolled-back transaction")
		}
		return nil
	})
}

func TestNodesSorted(t *testing.T) {
	s, _ := openTemp(t)
	_ = s.Update(func(tx Tx) error {
		for _, n := range []string{"web-2", "db-1", "web-10", "app"} {
			if err := tx.PutNode(Node{Name: n}); err != nil {
				return err
			}
		}
		return nil
	})
	var names []string
	_ = s.View(func(tx Tx) error {
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

func TestWriteInViewFails(t *testing.T) {
	s, _ := openTemp(t)
	if err := s.View(func(tx Tx) error { return tx.PutNode(Node{Name: "x"}) }); err == nil {
		t.Error("PutNode in a View transaction succeeded")
	}
}

func TestPublicKeyIndex(t *testing.T) {
	s, _ := openTemp(t)
	k1, k2 := []byte{1, 31: 1}, []byte{2, 31: 2}
	steps := []struct {
		name    string
		put     Node
		wantErr bool
		lookups map[string]string // key byte -> owner ("" = none)
	}{
		{"create a", Node{Name: "a", PublicKey: k1}, false, map[string]string{"1": "a", "2": ""}},
		{"b takes a's key", Node{Name: "b", PublicKey: k1}, true, map[string]string{"1": "a"}},
		{"a rotates its key", Node{Name: "a", PublicKey: k2}, false, map[string]string{"1": "", "2": "a"}},
		{"b takes the freed key", Node{Name: "b", PublicKey: k1}, false, map[string]string{"1": "b", "2": "a"}},
	}
	keyOf := map[string][]byte{"1": k1, "2": k2}
	for _, st := range steps {
		err := s.Update(func(tx Tx) error { return tx.PutNode(st.put) })
		if (err != nil) != st.wantErr {
			t.Fatalf("%s: err = %v, wantErr %v", st.name, err, st.wantErr)
		}
		_ = s.View(func(tx Tx) error {
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

// TestUndecodableRevision: a revision record that no longer decodes (edited by
// hand) is still listed and counted, so the next revision can be stored, while
// reading it reports the decode error.
func TestUndecodableRevision(t *testing.T) {
	s, _ := openTemp(t)
	for rev := uint64(1); rev <= 2; rev++ {
		if err := s.Update(func(tx Tx) error { return tx.PutPolicy(Policy{Revision: rev, Content: []byte("x")}) }); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketPolicies).Put(revKey(2), []byte("{not json")) }); err != nil {
		t.Fatal(err)
	}
	_ = s.View(func(tx Tx) error {
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
		err := s.Update(func(tx Tx) error { return tx.PutPolicy(Policy{Revision: tt.rev}) })
		if (err != nil) != tt.wantErr {
			t.Errorf("PutPolicy(%d) after a corrupt latest: err = %v, wantErr %v", tt.rev, err, tt.wantErr)
		}
	}
}

// TestNodeWithoutIdentityKey: a node record written before identity keys were kept
// decodes with no identity key.
func TestNodeWithoutIdentityKey(t *testing.T) {
	s, _ := openTemp(t)
	old := `{"name":"db-1","addresses":["100.64.0.2"],"public_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","enrolled_at":"2026-01-02T03:04:05Z","token_id":"00aa"}`
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketNodes).Put([]byte("db-1"), []byte(old)) }); err != nil {
		t.Fatal(err)
	}
	_ = s.View(func(tx Tx) error {
		n, ok, err := tx.Node("db-1")
		if err != nil || !ok || n.Name != "db-1" || len(n.PublicKey) != 32 || n.IdentityKey != nil {
			t.Errorf("Node(db-1) = %+v, %v, %v; want the node without an identity key", n, ok, err)
		}
		return nil
	})
}
