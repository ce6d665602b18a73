package store

import (
	"path/filepath"
	"slices"
	"testing"

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
