package store

import (
	"fmt"
	"io"

	bolt "go.etcd.io/bbolt"
)

// Backup writes a consistent copy of the whole store to w: the bbolt file as of
// one read transaction (bbolt's Tx.WriteTo), taken while other transactions go
// on. It returns the number of bytes written. The copy is itself a store file,
// with the same owner record, that OpenWith accepts in the same data directory.
// The read transaction stays open until w has taken everything, and while it is
// open the file cannot be remapped to grow, so writers that need more space wait:
// give it a fast w (a local file), not a network peer.
func (s *Bolt) Backup(w io.Writer) (int64, error) {
	var n int64
	err := protect(func() error {
		return s.db.View(func(tx *bolt.Tx) error {
			var err error
			n, err = tx.WriteTo(w)
			return err
		})
	})
	if err := transactionError(s.path, err); err != nil {
		return n, fmt.Errorf("backing up store %s: %w", s.path, err)
	}
	return n, nil
}

// Summary counts a store's main records, for a backup report.
type Summary struct {
	Nodes           int
	PolicyRevisions int
	AuditRecords    int
	// Owner is the owner record; zero when the store has none.
	Owner Owner
}

// Summary returns the record counts and the owner record of the store. It works
// on a store opened read-only, and on one whose buckets are missing (counted as 0).
func (s *Bolt) Summary() (Summary, error) {
	var sum Summary
	err := protect(func() error {
		return s.db.View(func(tx *bolt.Tx) error {
			count := func(name []byte) int {
				if b := tx.Bucket(name); b != nil {
					return b.Stats().KeyN
				}
				return 0
			}
			sum.Nodes, sum.PolicyRevisions, sum.AuditRecords = count(bucketNodes), count(bucketPolicies), count(bucketAudit)
			return nil
		})
	})
	if err := transactionError(s.path, err); err != nil {
		return Summary{}, fmt.Errorf("summarising store %s: %w", s.path, err)
	}
	o, _, err := s.Owner()
	if err != nil {
		return Summary{}, err
	}
	sum.Owner = o
	return sum, nil
}
