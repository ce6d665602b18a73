package store

// Store integrity: a store that was lost, is damaged, or belongs to another data
// directory is refused at open with a message saying what is wrong and what to do,
// and a damaged page met later fails its transaction with an error instead of
// crashing the process.
//
// Checks at open, cheapest first, all before anything is written (bbolt has no
// checksums on data pages, so damage inside a value is found only when the record
// is decoded, as an error of that operation):
//  1. the file itself (preflight): missing or empty while the data directory has a
//     CA means the store was lost; otherwise the two bbolt meta pages are read with
//     plain reads (not through the memory map) and the file must be at least as long
//     as the valid meta says, because a page past the end of the file would fault
//     (SIGBUS) when bbolt touches it through its memory map;
//  2. a walk over every bucket, key and value, with memory faults turned into
//     panics (debug.SetPanicOnFault) and panics into errors;
//  3. bbolt's own consistency check (Tx.Check: page types, ordering, reachability,
//     double frees);
//  4. the owner record: the store records the SHA-256 fingerprint of the CA of the
//     data directory it was created in (see Bind).

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Errors wrapped by OpenWith and Bind (test with errors.Is); their messages say
// what to do.
var (
	// ErrLost: the store file is missing or empty although the data directory
	// already holds a controller CA, so the store was lost.
	ErrLost = errors.New("store lost")
	// ErrDamaged: the file is not a bbolt store, is truncated, or fails the
	// consistency check; also wrapped by View and Update when a transaction hits
	// a damaged page (or panics for another reason).
	ErrDamaged = errors.New("store damaged")
	// ErrNotOwner: the store was created for another controller CA than the one
	// in its data directory (it was copied from elsewhere, or the CA was lost).
	ErrNotOwner = errors.New("store belongs to another data directory")
)

// metaOwner is the meta key of the owner record (JSON Owner).
var metaOwner = []byte("owner")

// Owner is the store's owner record: which data directory's controller CA the
// store was created for.
type Owner struct {
	// CAFingerprint is the lower-case hex SHA-256 of the CA certificate's DER.
	CAFingerprint string    `json:"ca_sha256"`
	CreatedAt     time.Time `json:"created_at"`
}

// CAFingerprint returns the owner fingerprint of a CA certificate: the lower-case
// hex SHA-256 of its DER encoding (the same value a join token pins).
func CAFingerprint(caCertDER []byte) string {
	sum := sha256.Sum256(caCertDER)
	return hex.EncodeToString(sum[:])
}

// remedy is the advice appended to every refusal.
const remedy = "restore controller.db from a backup (see docs/operations.md, \"Backup and restore\"), " +
	"or start with an empty --data-dir to create a new controller (its agents must then enroll again)"

func lostError(path string) error {
	return fmt.Errorf("opening store %s: %w: the file is missing or empty, but the data directory already holds a controller CA (ca.crt), "+
		"so the store with its nodes, join tokens, policy revisions and audit log was lost; refusing to start an empty controller in its place. To recover, %s",
		path, ErrLost, remedy)
}

func damagedError(path string, detail error) error {
	return fmt.Errorf("opening store %s: %w: %w; refusing to use it. To recover, %s", path, ErrDamaged, detail, remedy)
}

// Owner returns the store's owner record; ok is false for a store that has none
// yet (new, or written by a version that did not record one).
func (s *Bolt) Owner() (o Owner, ok bool, err error) {
	err = protect(func() error {
		return s.db.View(func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketMeta)
			if b == nil {
				return nil // a read-only store written before the meta bucket
			}
			raw := b.Get(metaOwner)
			if raw == nil {
				return nil
			}
			if err := json.Unmarshal(raw, &o); err != nil {
				return fmt.Errorf("store %s: %w: its owner record does not decode (%w)", s.path, ErrDamaged, err)
			}
			ok = true
			return nil
		})
	})
	return o, ok, transactionError(s.path, err)
}

// Bind ties the store to the data directory whose controller CA certificate is
// caCertDER (DER): a store without an owner record gets one (fingerprint and the
// current time); a store that records another CA is refused with an error
// wrapping ErrNotOwner and is left unchanged. The controller calls Bind once its
// CA is loaded or created; binding again to the same CA writes nothing.
func (s *Bolt) Bind(caCertDER []byte) error {
	want := CAFingerprint(caCertDER)
	check := func(o Owner) error {
		if o.CAFingerprint != want {
			return notOwnerError(s.path, o, "the data directory's CA (ca.crt) has SHA-256 "+want)
		}
		return nil
	}
	o, ok, err := s.Owner()
	if err != nil {
		return err
	}
	if ok {
		return check(o)
	}
	return s.Update(func(tx Tx) error {
		raw, err := tx.Meta(string(metaOwner))
		if err != nil {
			return err
		}
		if raw != nil { // bound meanwhile
			if err := json.Unmarshal(raw, &o); err != nil {
				return fmt.Errorf("store %s: %w: its owner record does not decode (%w)", s.path, ErrDamaged, err)
			}
			return check(o)
		}
		rec, err := json.Marshal(Owner{CAFingerprint: want, CreatedAt: time.Now().UTC()})
		if err != nil {
			return fmt.Errorf("encoding the store's owner record: %w", err)
		}
		return tx.PutMeta(string(metaOwner), rec)
	})
}

func notOwnerError(path string, o Owner, mismatch string) error {
	return fmt.Errorf("store %s: %w: it was created on %s for the controller CA with SHA-256 %s, but %s. "+
		"A store only works with the CA it was created with (nodes hold certificates from that CA). "+
		"Put back this data directory's own controller.db (restore it from a backup of this controller, see docs/operations.md), "+
		"or, to move a controller, copy its whole data directory (ca.crt, ca.key, server.crt, server.key, operator.json, controller.db)",
		path, ErrNotOwner, o.CreatedAt.Format(time.RFC3339), o.CAFingerprint, mismatch)
}

// readCAFingerprint returns the CAFingerprint of the first CERTIFICATE block of the
// PEM file at path; ok is false when the file does not exist.
func readCAFingerprint(path string) (fp string, ok bool, err error) {
	raw, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("reading the controller CA certificate: %w", err)
	}
	for rest := raw; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return "", false, fmt.Errorf("reading the controller CA certificate %s: no PEM CERTIFICATE block", path)
		}
		if block.Type == "CERTIFICATE" {
			return CAFingerprint(block.Bytes), true, nil
		}
	}
}

// checkOwnerAtOpen applies the owner rules of OpenOptions.CACertPath to an open,
// checked db without writing to it.
func checkOwnerAtOpen(db *bolt.DB, path, caPath string) error {
	want, haveCA, err := readCAFingerprint(caPath)
	if err != nil {
		return fmt.Errorf("opening store %s: %w", path, err)
	}
	var o Owner
	var found bool
	err = protect(func() error {
		return db.View(func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketMeta)
			if b == nil {
				return nil
			}
			raw := b.Get(metaOwner)
			if raw == nil {
				return nil
			}
			found = true
			if err := json.Unmarshal(raw, &o); err != nil {
				return fmt.Errorf("its owner record does not decode: %w", err)
			}
			return nil
		})
	})
	switch {
	case err != nil:
		return damagedError(path, err)
	case !found:
		return nil // a new store, or one written before owner records: Bind records it
	case !haveCA:
		return notOwnerError(path, o, "the data directory has no CA certificate ("+caPath+"): the CA was lost; put back ca.crt and ca.key of this controller")
	case o.CAFingerprint != want:
		return notOwnerError(path, o, "the data directory's CA ("+caPath+") has SHA-256 "+want)
	}
	return nil
}

// bbolt file format constants (go.etcd.io/bbolt internal/common: Page, Meta).
const (
	boltMagic      = 0xED0CDAED
	boltVersion    = 2
	pageHeaderSize = 16 // id u64, flags u16, count u16, overflow u32
	metaChecksumAt = pageHeaderSize + 56
	metaEnd        = metaChecksumAt + 8
	minPageSize    = 512
	maxPageSize    = 1 << 16
)

// boltMeta is the part of a bbolt meta page the preflight needs.
type boltMeta struct {
	pageSize uint32
	pgid     uint64 // high-water mark: pages [0, pgid) lie inside the file
	txid     uint64
}

// parseMeta decodes and validates the meta page at the start of b (see
// go.etcd.io/bbolt internal/common/meta.go: magic, version, page size, flags,
// root bucket, freelist, pgid, txid, FNV-64a checksum of the fields before it).
func parseMeta(b []byte) (boltMeta, error) {
	if len(b) < metaEnd {
		return boltMeta{}, errors.New("shorter than a meta page")
	}
	ne := binary.NativeEndian // bbolt writes its structs in the machine's byte order
	m := b[pageHeaderSize:]
	if ne.Uint32(m[0:]) != boltMagic {
		return boltMeta{}, errors.New("no bbolt magic number")
	}
	if v := ne.Uint32(m[4:]); v != boltVersion {
		return boltMeta{}, fmt.Errorf("bbolt format version %d, want %d", v, boltVersion)
	}
	h := fnv.New64a()
	_, _ = h.Write(b[pageHeaderSize:metaChecksumAt])
	if ne.Uint64(b[metaChecksumAt:]) != h.Sum64() {
		return boltMeta{}, errors.New("meta page checksum mismatch")
	}
	meta := boltMeta{pageSize: ne.Uint32(m[8:]), pgid: ne.Uint64(m[40:]), txid: ne.Uint64(m[48:])}
	if meta.pageSize < minPageSize || meta.pageSize > maxPageSize || meta.pageSize&(meta.pageSize-1) != 0 {
		return boltMeta{}, fmt.Errorf("page size %d is not a power of two in [%d, %d]", meta.pageSize, minPageSize, maxPageSize)
	}
	if meta.pgid < 2 {
		return boltMeta{}, fmt.Errorf("high-water mark %d is below the two meta pages", meta.pgid)
	}
	return meta, nil
}

// fileState is what preflight found.
type fileState int

const (
	fileMissing fileState = iota
	fileEmpty
	fileBolt
)

// preflight inspects the file at path with plain reads: missing, empty, or a
// bbolt file whose valid meta page fits the file's size. Any other content is an
// error wrapping ErrDamaged.
func preflight(path string) (fileState, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return fileMissing, nil
	}
	if err != nil {
		return 0, fmt.Errorf("opening store %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("opening store %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return 0, damagedError(path, fmt.Errorf("it is not a regular file (%s)", fi.Mode().Type()))
	}
	size := fi.Size()
	if size == 0 {
		return fileEmpty, nil
	}
	readPage := func(off int64) []byte {
		b := make([]byte, metaEnd)
		n, _ := f.ReadAt(b, off)
		return b[:n]
	}
	// Like bbolt: meta 0 gives the page size; when it is invalid, meta 1 is looked
	// for at the OS page size. The valid meta with the highest txid is in force.
	var metas []boltMeta
	var errs []error
	m0, err0 := parseMeta(readPage(0))
	if err0 == nil {
		metas = append(metas, m0)
	} else {
		errs = append(errs, fmt.Errorf("meta page 0: %w", err0))
	}
	off1 := int64(os.Getpagesize())
	if err0 == nil {
		off1 = int64(m0.pageSize)
	}
	if m1, err1 := parseMeta(readPage(off1)); err1 == nil {
		metas = append(metas, m1)
	} else {
		errs = append(errs, fmt.Errorf("meta page 1: %w", err1))
	}
	if len(metas) == 0 {
		return 0, damagedError(path, fmt.Errorf("it is not a bbolt store (%w)", errors.Join(errs...)))
	}
	m := metas[0]
	if len(metas) == 2 && metas[1].txid > m.txid {
		m = metas[1]
	}
	if want := int64(m.pgid) * int64(m.pageSize); size < want {
		return 0, damagedError(path, fmt.Errorf("it is truncated: %d bytes, but its header (transaction %d) says %d pages of %d bytes (%d bytes)",
			size, m.txid, m.pgid, m.pageSize, want))
	}
	return fileBolt, nil
}

// checkConsistency runs checks 2 and 3 of the file comment on db; it returns an error
// wrapping ErrDamaged naming the first problem found.
func checkConsistency(db *bolt.DB, path string) error {
	err := protect(func() error {
		return db.View(func(tx *bolt.Tx) error { return walk(tx) })
	})
	if err != nil {
		return damagedError(path, fmt.Errorf("reading its pages failed: %w", err))
	}
	// tx.Check recovers its own panics (reported as errors on the channel), and
	// after the walk above every page it reads is known to lie inside the file.
	err = protect(func() error {
		return db.View(func(tx *bolt.Tx) error {
			var errs []error
			for err := range tx.Check() {
				if len(errs) < 5 {
					errs = append(errs, err)
				}
			}
			return errors.Join(errs...)
		})
	})
	if err != nil {
		return damagedError(path, fmt.Errorf("consistency check: %w", err))
	}
	return nil
}

// walk reads every page reachable in tx through bbolt's cursors and touches the
// first and last byte of every key and value, so that a damaged page that points
// outside the file faults here, inside protect, rather than in Tx.Check's own
// goroutine. It does not decode records: a record that does not decode is
// reported by the operation that reads it (an error, not a panic).
func walk(tx *bolt.Tx) error {
	var sink byte
	var walkBucket func(path string, b *bolt.Bucket) error
	walkBucket = func(path string, b *bolt.Bucket) error {
		return b.ForEach(func(k, v []byte) error {
			if len(k) == 0 {
				return fmt.Errorf("bucket %s: an entry has an empty key", path)
			}
			sink ^= k[0] ^ k[len(k)-1]
			if v != nil {
				if len(v) > 0 {
					sink ^= v[0] ^ v[len(v)-1]
				}
				return nil
			}
			child := b.Bucket(k) // nested bucket
			if child == nil {
				return fmt.Errorf("bucket %s: entry %q is neither a value nor a bucket", path, printable(k))
			}
			return walkBucket(path+"/"+printable(k), child)
		})
	}
	err := tx.ForEach(func(name []byte, b *bolt.Bucket) error { return walkBucket(printable(name), b) })
	runtime.KeepAlive(sink) // keep the reads from being optimised away
	return err
}

// printable shortens a key for a message.
func printable(k []byte) string {
	if len(k) > 64 {
		k = k[:64]
	}
	return strings.ToValidUTF8(string(k), "?")
}

// panicError is a panic recovered by protect.
type panicError struct {
	value any
	site  string // "function file:line" of the frame that panicked
}

func (e *panicError) Error() string { return fmt.Sprintf("%v (a panic in %s)", e.value, e.site) }

// protect runs fn with memory faults turned into panics (a damaged page can point
// outside the memory-mapped file) and returns a panic as a *panicError. bbolt rolls
// a managed transaction back while the panic unwinds, so the store stays usable.
func protect(fn func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = &panicError{value: r, site: panicSite()}
		}
	}()
	return fn()
}

// panicSite returns "function file:line" of the frame that panicked (the innermost
// one outside the runtime); called from protect's deferred recover, whose own two
// frames it skips.
func panicSite() string {
	pcs := make([]uintptr, 32)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(3, pcs)])
	for {
		fr, more := frames.Next()
		if !strings.HasPrefix(fr.Function, "runtime.") {
			return fmt.Sprintf("%s %s:%d", fr.Function, fr.File, fr.Line)
		}
		if !more {
			return "unknown location"
		}
	}
}

// transactionError turns a panic inside View or Update into an error wrapping
// ErrDamaged that says what to do; other errors pass through.
func transactionError(path string, err error) error {
	var p *panicError
	if !errors.As(err, &p) {
		return err
	}
	return fmt.Errorf("store %s: %w: a transaction was aborted: %w; the file may be damaged: "+
		"stop the controller and start it again, which checks the store, and if the store is refused, restore it from a backup (see docs/operations.md)",
		path, ErrDamaged, p)
}

// capturedFile remembers the file bolt.Open opened (through Options.OpenFile), so
// that OpenWith can release it when bolt.Open panics on a damaged file before it
// returns a handle.
type capturedFile struct{ f *os.File }

func (c *capturedFile) open(name string, flag int, perm os.FileMode) (*os.File, error) {
	f, err := os.OpenFile(name, flag, perm)
	c.f = f
	return f, err
}

// release unlocks and closes the file. The explicit unlock matters: bbolt may
// already have mapped the file, and a mapping keeps the open file description,
// and with it the flock, alive after close. The mapping itself stays until the
// process exits.
func (c *capturedFile) release() {
	if c.f == nil {
		return
	}
	_ = syscall.Flock(int(c.f.Fd()), syscall.LOCK_UN)
	_ = c.f.Close()
}
