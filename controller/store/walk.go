package store

import (
	"fmt"
	"slices"

	bolt "go.etcd.io/bbolt"
)

// Walk calls fn with every record of the store, in one read-only transaction
// (a consistent snapshot): first the buckets the store knows (nodes, tokens,
// policies, meta, ipam, audit, pubkeys, quarantine, operators,
// operator-tokens, in that order; one missing from an old read-only file is
// skipped), then any other top-level bucket the file holds, so that a caller
// copying the store sees everything and can refuse what it does not know.
// Within a bucket the records come in key byte order. bucket is the bucket's
// name; key and value are the raw bytes as stored (policies and audit keys are
// 8-byte big-endian numbers, pubkeys/operator-tokens keys raw hashes or keys,
// ipam/quarantine keys netip.Addr.AsSlice) and are valid only during the call:
// copy them to keep them. A nested bucket (never written by this package) is an
// error. Walk works on a store opened with OpenOptions.ReadOnly. It returns the
// first error fn returns, unchanged; a damaged page is an error wrapping
// ErrDamaged.
func (s *Bolt) Walk(fn func(bucket string, key, value []byte) error) error {
	return transactionError(s.path, protect(func() error {
		return s.db.View(func(tx *bolt.Tx) error {
			walkBucket := func(name []byte, b *bolt.Bucket) error {
				return b.ForEach(func(k, v []byte) error {
					if v == nil {
						return fmt.Errorf("store %s: bucket %s holds a nested bucket %q, which this version never writes", s.path, name, k)
					}
					return fn(string(name), k, v)
				})
			}
			for _, name := range allBuckets {
				if b := tx.Bucket(name); b != nil {
					if err := walkBucket(name, b); err != nil {
						return err
					}
				}
			}
			return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
				if slices.ContainsFunc(allBuckets, func(k []byte) bool { return string(k) == string(name) }) {
					return nil
				}
				return walkBucket(name, b)
			})
		})
	}))
}
