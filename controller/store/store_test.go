package store

import (
	"path/filepath"
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
