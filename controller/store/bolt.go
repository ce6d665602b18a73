package store

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
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
	bucketPubkeys  = []byte("pubkeys")    // WireGuard public key -> node name
	bucketQuar     = []byte("quarantine") // released overlay address -> RFC 3339 time it is free again
	bucketOps      = []byte("operators")
	bucketOpTokens = []byte("operator-tokens") // SHA-256 of a bearer token -> operator name
	allBuckets     = [][]byte{bucketNodes, bucketTokens, bucketPolicies, bucketMeta, bucketIPAM, bucketAudit, bucketPubkeys, bucketQuar, bucketOps, bucketOpTokens}

	metaAuditHead = []byte("audit-head") // "SEQ HASH" of the last appended audit record
)

// Bolt is the embedded Store: one bbolt file, fsynced on every commit.
type Bolt struct {
	db   *bolt.DB
	path string
}

var _ Store = (*Bolt)(nil)

// ErrLocked is returned (wrapped) by Open when another process holds the store file.
var ErrLocked = errors.New("store locked")

// OpenOptions configures OpenWith.
type OpenOptions struct {
	// CACertPath is the controller CA certificate (PEM) of the data directory the
	// store belongs to, DATA_DIR/ca.crt. When that file exists, a missing or empty
	// store is refused (ErrLost: the store was lost, and a new one would be an empty
	// controller) and so is a store whose owner record names another CA
	// (ErrNotOwner). When it does not exist, a store that has an owner record is
	// refused (ErrNotOwner: the CA was lost). A store without an owner record (new,
	// or written before owner records) passes; Bind records its owner. Empty: no
	// owner checks.
	CACertPath string
	// ReadOnly opens the file with a shared lock, never creates nor writes it
	// (Update fails), and fails when the file is missing or empty.
	ReadOnly bool
	// LockTimeout is how long to wait for the file lock; default 1 s.
	LockTimeout time.Duration
}

// Open opens (creating when absent) the bbolt store file at path with mode 0600,
// with the integrity checks of OpenWith but no owner checks.
func Open(path string) (*Bolt, error) { return OpenWith(path, OpenOptions{}) }

// OpenWith opens the bbolt store file at path, creating it with mode 0600 when it
// is missing or empty (unless opts refuse that), and checks it before it writes
// anything: a file that is not a bbolt store, is truncated, or fails the
// consistency check (bbolt's Tx.Check plus a read of every page, key and value) is refused with
// an error wrapping ErrDamaged; see OpenOptions for the owner checks (ErrLost,
// ErrNotOwner). Every refusal says what to do and leaves the file unchanged. It
// fails with ErrLocked when another process holds the file for opts.LockTimeout.
// The check reads the whole file: about a second per few hundred MB.
func OpenWith(path string, opts OpenOptions) (*Bolt, error) {
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = time.Second
	}
	state, err := preflight(path)
	if err != nil {
		return nil, err
	}
	if opts.CACertPath != "" && state != fileBolt {
		if _, err := os.Stat(opts.CACertPath); err == nil {
			return nil, lostError(path)
		} else if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("opening store %s: checking for the controller CA: %w", path, err)
		}
	}
	if opts.ReadOnly && state != fileBolt {
		return nil, fmt.Errorf("opening store %s read-only: the file is missing or empty", path)
	}

	var file capturedFile
	var db *bolt.DB
	err = protect(func() error {
		var err error
		db, err = bolt.Open(path, 0o600, &bolt.Options{
			Timeout:         opts.LockTimeout,
			ReadOnly:        opts.ReadOnly,
			PreLoadFreelist: true, // read the freelist here, where a damaged one is caught
			OpenFile:        file.open,
		})
		return err
	})
	var p *panicError
	switch {
	case errors.As(err, &p):
		file.release()
		return nil, damagedError(path, fmt.Errorf("reading its freelist failed: %w", p))
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("opening store %s: %w: the file is locked, most likely by another segmesh-controller using the same --data-dir; stop it first", path, ErrLocked)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrChecksum), errors.Is(err, bolterrors.ErrVersionMismatch):
		return nil, damagedError(path, err)
	case err != nil:
		return nil, fmt.Errorf("opening store %s: %w", path, err)
	}
	s := &Bolt{db: db, path: path}
	if err := s.initialise(opts); err != nil {
		_ = db.Close()
		return nil, err
	}
	return s, nil
}

// initialise checks an open store (see OpenWith) and, when writable, creates the
// buckets that are missing (all of them in a new file).
func (s *Bolt) initialise(opts OpenOptions) error {
	if err := checkConsistency(s.db, s.path); err != nil {
		return err
	}
	if opts.CACertPath != "" {
		if err := checkOwnerAtOpen(s.db, s.path, opts.CACertPath); err != nil {
			return err
		}
	}
	if opts.ReadOnly {
		return nil
	}
	var missing [][]byte
	_ = s.db.View(func(tx *bolt.Tx) error {
		for _, b := range allBuckets {
			if tx.Bucket(b) == nil {
				missing = append(missing, b)
			}
		}
		return nil
	})
	if len(missing) == 0 {
		return nil // an empty commit would still write a meta page
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		for _, b := range missing {
			if _, err := tx.CreateBucket(b); err != nil {
				return fmt.Errorf("creating bucket %s: %w", b, err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("initialising store %s: %w", s.path, err)
	}
	return nil
}

// View implements Store. A panic inside the transaction (a damaged page, or a
// bug in fn) is returned as an error wrapping ErrDamaged.
func (s *Bolt) View(fn func(Tx) error) error {
	return transactionError(s.path, protect(func() error {
		return s.db.View(func(tx *bolt.Tx) error { return fn(boltTx{tx}) })
	}))
}

// Update implements Store. A panic inside the transaction is returned as an
// error wrapping ErrDamaged, and nothing is committed.
func (s *Bolt) Update(fn func(Tx) error) error {
	return transactionError(s.path, protect(func() error {
		return s.db.Update(func(tx *bolt.Tx) error { return fn(boltTx{tx}) })
	}))
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

func (t boltTx) DeleteNode(name string, quarantineUntil time.Time) error {
	n, ok, err := t.Node(name)
	if err != nil || !ok {
		return err
	}
	if len(n.PublicKey) > 0 {
		if owner := t.tx.Bucket(bucketPubkeys).Get(n.PublicKey); string(owner) == name {
			if err := t.tx.Bucket(bucketPubkeys).Delete(n.PublicKey); err != nil {
				return fmt.Errorf("deleting node %s: %w", name, err)
			}
		}
	}
	ipam, quar := t.tx.Bucket(bucketIPAM), t.tx.Bucket(bucketQuar)
	until, _ := quarantineUntil.UTC().MarshalText()
	for _, a := range n.Addresses {
		if owner := ipam.Get(a.AsSlice()); string(owner) == name {
			if err := ipam.Delete(a.AsSlice()); err != nil {
				return fmt.Errorf("deleting node %s: releasing %s: %w", name, a, err)
			}
		}
		if err := quar.Put(a.AsSlice(), until); err != nil {
			return fmt.Errorf("deleting node %s: quarantining %s: %w", name, a, err)
		}
	}
	if err := t.tx.Bucket(bucketNodes).Delete([]byte(name)); err != nil {
		return fmt.Errorf("deleting node %s: %w", name, err)
	}
	return nil
}

func (t boltTx) AddressQuarantine(a netip.Addr) (time.Time, bool, error) {
	v := t.tx.Bucket(bucketQuar).Get(a.AsSlice())
	if v == nil {
		return time.Time{}, false, nil
	}
	var until time.Time
	if err := until.UnmarshalText(v); err != nil {
		return time.Time{}, false, fmt.Errorf("decoding quarantine of %s: %w", a, err)
	}
	return until, true, nil
}

func (t boltTx) Tokens() ([]Token, error) {
	var out []Token
	err := t.tx.Bucket(bucketTokens).ForEach(func(k, v []byte) error {
		var tok Token
		if err := json.Unmarshal(v, &tok); err != nil {
			return fmt.Errorf("decoding token %s: %w", k, err)
		}
		out = append(out, tok)
		return nil
	})
	return out, err
}

func (t boltTx) Operator(name string) (Operator, bool, error) {
	var o Operator
	ok, err := getJSON(t.tx, bucketOps, []byte(name), &o)
	return o, ok, err
}

func (t boltTx) Operators() ([]Operator, error) {
	var out []Operator
	err := t.tx.Bucket(bucketOps).ForEach(func(k, v []byte) error {
		var o Operator
		if err := json.Unmarshal(v, &o); err != nil {
			return fmt.Errorf("decoding operator %s: %w", k, err)
		}
		out = append(out, o)
		return nil
	})
	return out, err
}

func (t boltTx) OperatorByTokenHash(hash []byte) (Operator, bool, error) {
	if len(hash) == 0 {
		return Operator{}, false, nil
	}
	name := t.tx.Bucket(bucketOpTokens).Get(hash)
	if name == nil {
		return Operator{}, false, nil
	}
	return t.Operator(string(name))
}

func (t boltTx) PutOperator(o Operator) error {
	if o.Name == "" || len(o.TokenHash) == 0 {
		return errors.New("storing operator: empty name or token hash")
	}
	old, ok, err := t.Operator(o.Name)
	if err != nil {
		return err
	}
	idx := t.tx.Bucket(bucketOpTokens)
	if ok && string(old.TokenHash) != string(o.TokenHash) {
		if err := idx.Delete(old.TokenHash); err != nil {
			return fmt.Errorf("storing operator %s: %w", o.Name, err)
		}
	}
	if owner := idx.Get(o.TokenHash); owner != nil && string(owner) != o.Name {
		return fmt.Errorf("storing operator %s: token already belongs to operator %s", o.Name, owner)
	}
	if err := idx.Put(o.TokenHash, []byte(o.Name)); err != nil {
		return fmt.Errorf("storing operator %s: %w", o.Name, err)
	}
	if err := putJSON(t.tx.Bucket(bucketOps), []byte(o.Name), o); err != nil {
		return fmt.Errorf("storing operator %s: %w", o.Name, err)
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
	_, prev, err := t.AuditHead()
	if err != nil {
		return err
	}
	e.Seq, e.PrevHash = seq, prev
	e.Hash = AuditHash(e)
	if err := putJSON(b, revKey(seq), e); err != nil {
		return fmt.Errorf("appending audit entry: %w", err)
	}
	return t.tx.Bucket(bucketMeta).Put(metaAuditHead, fmt.Appendf(nil, "%d %s", seq, e.Hash))
}

func (t boltTx) AuditHead() (uint64, string, error) {
	v := t.tx.Bucket(bucketMeta).Get(metaAuditHead)
	if v == nil {
		return 0, "", nil
	}
	var seq uint64
	var hash string
	if _, err := fmt.Sscanf(string(v), "%d %s", &seq, &hash); err != nil {
		return 0, "", fmt.Errorf("decoding the audit head %q: %w", v, err)
	}
	return seq, hash, nil
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
