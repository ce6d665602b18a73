package store

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

var (
	bucketNodes    = []byte("nodes")
	bucketTokens   = []byte("tokens")
	bucketPolicies = []byte("policies")
	bucketMeta     = []byte("meta")
	bucketIPAM     = []byte("ipam")
	bucketAudit    = []byte("audit")
	bucketPubkeys  = []byte("pubkeys") // WireGuard public key -> node name
	allBuckets     = [][]byte{bucketNodes, bucketTokens, bucketPolicies, bucketMeta, bucketIPAM, bucketAudit, bucketPubkeys}
)

// Bolt is the embedded Store: one bbolt file, fsynced on every commit.
type Bolt struct{ db *bolt.DB }

var _ Store = (*Bolt)(nil)

// ErrLocked is returned (wrapped) by Open when another process holds the store file.
var ErrLocked = errors.New("store locked")

// Open opens (creating when absent) the bbolt store file at path with mode 0600.
// It fails with ErrLocked after one second when another process holds the file.
func Open(path string) (*Bolt, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("opening store %s: %w: the file is locked, most likely by another segmesh-controller using the same --data-dir; stop it first", path, ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("opening store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return fmt.Errorf("creating bucket %s: %w", b, err)
			}
		}
		return nil
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("initialising store %s: %w", path, err)
	}
	return &Bolt{db: db}, nil
}

// View implements Store.
func (s *Bolt) View(fn func(Tx) error) error {
	return s.db.View(func(tx *bolt.Tx) error { return fn(boltTx{tx}) })
}

// Update implements Store.
func (s *Bolt) Update(fn func(Tx) error) error {
	return s.db.Update(func(tx *bolt.Tx) error { return fn(boltTx{tx}) })
}

// Close implements Store.
func (s *Bolt) Close() error { return s.db.Close() }

type boltTx struct{ tx *bolt.Tx }

func getJSON(tx *bolt.Tx, bucket, key []byte, v any) (bool, error) {
	raw := tx.Bucket(bucket).Get(key)
	if raw == nil {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return false, fmt.Errorf("decoding %s %x: %w", bucket, key, err)
	}
	return true, nil
}

func putJSON(b *bolt.Bucket, key []byte, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding %s: %w", key, err)
	}
	return b.Put(key, raw)
}

func (t boltTx) Node(name string) (Node, bool, error) {
	var n Node
	ok, err := getJSON(t.tx, bucketNodes, []byte(name), &n)
	return n, ok, err
}

func (t boltTx) Nodes() ([]Node, error) {
	var out []Node
	err := t.tx.Bucket(bucketNodes).ForEach(func(k, v []byte) error {
		var n Node
		if err := json.Unmarshal(v, &n); err != nil {
			return fmt.Errorf("decoding node %s: %w", k, err)
		}
		out = append(out, n)
		return nil
	})
	return out, err // bbolt iterates in byte order, i.e. sorted by name
}

func (t boltTx) NodeByPublicKey(key []byte) (string, bool, error) {
	if len(key) == 0 {
		return "", false, nil
	}
	v := t.tx.Bucket(bucketPubkeys).Get(key)
	return string(v), v != nil, nil
}

func (t boltTx) PutNode(n Node) error {
	if n.Name == "" {
		return errors.New("storing node: empty name")
	}
	old, ok, err := t.Node(n.Name)
	if err != nil {
		return err
	}
	keys := t.tx.Bucket(bucketPubkeys)
	if ok && len(old.PublicKey) > 0 && string(old.PublicKey) != string(n.PublicKey) {
		if err := keys.Delete(old.PublicKey); err != nil {
			return fmt.Errorf("storing node %s: %w", n.Name, err)
		}
	}
	if len(n.PublicKey) > 0 {
		if owner := keys.Get(n.PublicKey); owner != nil && string(owner) != n.Name {
			return fmt.Errorf("storing node %s: public key already belongs to node %s", n.Name, owner)
		}
		if err := keys.Put(n.PublicKey, []byte(n.Name)); err != nil {
			return fmt.Errorf("storing node %s: %w", n.Name, err)
		}
	}
	if err := putJSON(t.tx.Bucket(bucketNodes), []byte(n.Name), n); err != nil {
		return fmt.Errorf("storing node %s: %w", n.Name, err)
	}
	return nil
}

func (t boltTx) Token(id string) (Token, bool, error) {
	var tok Token
	ok, err := getJSON(t.tx, bucketTokens, []byte(id), &tok)
	return tok, ok, err
}

func (t boltTx) PutToken(tok Token) error {
	if tok.ID == "" {
		return errors.New("storing token: empty id")
	}
	if err := putJSON(t.tx.Bucket(bucketTokens), []byte(tok.ID), tok); err != nil {
		return fmt.Errorf("storing token %s: %w", tok.ID, err)
	}
	return nil
}

func revKey(rev uint64) []byte { return binary.BigEndian.AppendUint64(nil, rev) }

func (t boltTx) Policy(rev uint64) (Policy, bool, error) {
	var p Policy
	ok, err := getJSON(t.tx, bucketPolicies, revKey(rev), &p)
	return p, ok, err
}

func (t boltTx) LatestPolicy() (Policy, bool, error) {
	var p Policy
	k, v := t.tx.Bucket(bucketPolicies).Cursor().Last()
	if k == nil {
		return p, false, nil
	}
	if err := json.Unmarshal(v, &p); err != nil {
		return p, false, fmt.Errorf("decoding policy revision %d: %w", binary.BigEndian.Uint64(k), err)
	}
	return p, true, nil
}

func (t boltTx) PolicyRevisions() ([]uint64, error) {
	var out []uint64
	err := t.tx.Bucket(bucketPolicies).ForEach(func(k, _ []byte) error {
		if len(k) != 8 {
			return fmt.Errorf("policy key %x is not a revision number", k)
		}
		out = append(out, binary.BigEndian.Uint64(k))
		return nil
	})
	return out, err
}

func (t boltTx) PutPolicy(p Policy) error {
	want := uint64(1)
	if k, _ := t.tx.Bucket(bucketPolicies).Cursor().Last(); k != nil {
		if len(k) != 8 {
			return fmt.Errorf("storing policy revision %d: latest key %x is not a revision number", p.Revision, k)
		}
		want = binary.BigEndian.Uint64(k) + 1
	}
	if p.Revision != want {
		return fmt.Errorf("storing policy revision %d (want %d): %w", p.Revision, want, ErrRevision)
	}
	if err := putJSON(t.tx.Bucket(bucketPolicies), revKey(p.Revision), p); err != nil {
		return fmt.Errorf("storing policy revision %d: %w", p.Revision, err)
	}
	return nil
}

func (t boltTx) AddressOwner(a netip.Addr) (string, bool, error) {
	v := t.tx.Bucket(bucketIPAM).Get(a.AsSlice())
	if v == nil {
		return "", false, nil
	}
	return string(v), true, nil
}

func (t boltTx) ClaimAddress(a netip.Addr, node string) error {
	owner, ok, err := t.AddressOwner(a)
	if err != nil {
		return err
	}
	if ok && owner != node {
		return fmt.Errorf("claiming %s for node %s: held by node %s: %w", a, node, owner, ErrAddressInUse)
	}
	return t.tx.Bucket(bucketIPAM).Put(a.AsSlice(), []byte(node))
}

func (t boltTx) Meta(key string) ([]byte, error) {
	v := t.tx.Bucket(bucketMeta).Get([]byte(key))
	if v == nil {
		return nil, nil
	}
	return append([]byte(nil), v...), nil // bbolt memory is only valid inside the transaction
}

func (t boltTx) PutMeta(key string, value []byte) error {
	return t.tx.Bucket(bucketMeta).Put([]byte(key), value)
}

func (t boltTx) AppendAudit(e AuditEntry) error {
	b := t.tx.Bucket(bucketAudit)
	seq, err := b.NextSequence()
	if err != nil {
		return fmt.Errorf("appending audit entry: %w", err)
	}
	return putJSON(b, revKey(seq), e)
}

func (t boltTx) Audit() ([]AuditEntry, error) {
	var out []AuditEntry
	err := t.tx.Bucket(bucketAudit).ForEach(func(k, v []byte) error {
		var e AuditEntry
		if err := json.Unmarshal(v, &e); err != nil {
			return fmt.Errorf("decoding audit entry %d: %w", binary.BigEndian.Uint64(k), err)
		}
		out = append(out, e)
		return nil
	})
	return out, err
}
