package store

import bolt "go.etcd.io/bbolt"

// PutPolicyRecord overwrites the record of revision rev with raw, as an edit by
// hand would (for the external tests).
func PutPolicyRecord(s *Bolt, rev uint64, raw []byte) error {
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketPolicies).Put(revKey(rev), raw) })
}
