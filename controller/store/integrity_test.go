package store

import (
	"bytes"
	"encoding/pem"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// dataDir is a controller data directory for the store tests: the store path
// and a CA certificate (unique bytes in a PEM CERTIFICATE block: the store only
// fingerprints it), written by writeCA.
type dataDir struct {
	dir, ca, db string
	caDER       []byte
}

func newDataDir(t *testing.T) dataDir {
	t.Helper()
	d := dataDir{dir: t.TempDir()}
	d.ca, d.db = filepath.Join(d.dir, "ca.crt"), filepath.Join(d.dir, "controller.db")
	return d
}

func (d *dataDir) writeCA(t *testing.T) {
	t.Helper()
	d.caDER = []byte(fmt.Sprintf("not really DER, but unique: %s %d", d.dir, time.Now().UnixNano()))
	if err := os.WriteFile(d.ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: d.caDER}), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (d dataDir) opts() OpenOptions { return OpenOptions{CACertPath: d.ca} }

// populate does what a controller's first start does (create the store, then the
// CA, then bind the store to it), adds enough records for branch pages, and
// closes the store.
func (d *dataDir) populate(t *testing.T) {
	t.Helper()
	s, err := OpenWith(d.db, d.opts())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	d.writeCA(t)
	if err := s.Bind(d.caDER); err != nil {
		t.Fatal(err)
	}
	fillStore(t, s, 300)
}

// fillStore adds n nodes and tokens, n/10 policy revisions and n audit records.
func fillStore(t *testing.T, s Store, n int) {
	t.Helper()
	err := s.Update(func(tx Tx) error {
		for i := range n {
			name := fmt.Sprintf("node-%04d", i)
			if err := tx.PutNode(Node{Name: name, Labels: map[string]string{"role": "web", "rack": strings.Repeat("r", 100)}, PublicKey: []byte(fmt.Sprintf("%032d", i))}); err != nil {
				return err
			}
			if err := tx.PutToken(Token{ID: fmt.Sprintf("%08x", i), SecretHash: []byte("h")}); err != nil {
				return err
			}
			if err := tx.AppendAudit(AuditEntry{Actor: "admin", Action: "node.enroll", Object: "node:" + name}); err != nil {
				return err
			}
		}
		for rev := uint64(1); rev <= uint64(n/10); rev++ {
			if err := tx.PutPolicy(Policy{Revision: rev, Content: bytes.Repeat([]byte("x"), 500)}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// pagesOfType returns the IDs of the store's pages of type typ ("leaf",
// "branch", "freelist"), read with bbolt directly.
func pagesOfType(t *testing.T, path, typ string) []int {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, PreLoadFreelist: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var ids []int
	_ = db.View(func(tx *bolt.Tx) error {
		for id := 2; ; id++ {
			p, err := tx.Page(id)
			if err != nil {
				t.Fatal(err)
			}
			if p == nil {
				return nil
			}
			if p.Type == typ {
				ids = append(ids, id)
			}
		}
	})
	if len(ids) == 0 {
		t.Fatalf("store has no %s page", typ)
	}
	return ids
}

// highWaterMark returns the length in bytes of the pages in use: bbolt grows the
// file ahead of use, so a cut beyond it loses nothing.
func highWaterMark(t *testing.T, path string) int64 {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int64
	_ = db.View(func(tx *bolt.Tx) error { n = tx.Size(); return nil })
	return n
}

// overwrite writes n seeded random bytes at off into the file at path.
func overwrite(t *testing.T, path string, off int64, n int, seed uint64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed)})
	_, _ = r.Read(buf)
	if _, err := f.WriteAt(buf, off); err != nil {
		t.Fatal(err)
	}
}

// snapshot is a file's content and modification time (nil content: missing).
type snapshot struct {
	content []byte
	mtime   time.Time
}

func snap(t *testing.T, path string) snapshot {
	t.Helper()
	raw, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return snapshot{}
	}
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return snapshot{content: raw, mtime: fi.ModTime()}
}

func TestOpenRefusesLostDamagedOrForeignStores(t *testing.T) {
	page := int64(os.Getpagesize())
	middle := func(ids []int) int64 { return int64(ids[len(ids)/2]) * page }
	tests := []struct {
		name string
		// setup prepares d (a new, empty directory).
		setup    func(t *testing.T, d *dataDir)
		readOnly bool
		want     error
		wantMsg  []string
	}{
		{
			name:    "missing store, CA present",
			setup:   func(t *testing.T, d *dataDir) { d.writeCA(t) },
			want:    ErrLost,
			wantMsg: []string{"missing or empty", "ca.crt", "docs/operations.md", "empty --data-dir"},
		},
		{
			name: "zero-length store, CA present",
			setup: func(t *testing.T, d *dataDir) {
				d.populate(t)
				if err := os.Truncate(d.db, 0); err != nil {
					t.Fatal(err)
				}
			},
			want:    ErrLost,
			wantMsg: []string{"missing or empty", "policy revisions", "restore controller.db from a backup"},
		},
		{
			name: "zero-length store read-only, CA present",
			setup: func(t *testing.T, d *dataDir) {
				d.populate(t)
				if err := os.Truncate(d.db, 0); err != nil {
					t.Fatal(err)
				}
			},
			readOnly: true,
			want:     ErrLost,
		},
		{
			name: "not a bbolt file",
			setup: func(t *testing.T, d *dataDir) {
				d.writeCA(t)
				if err := os.WriteFile(d.db, bytes.Repeat([]byte("SQLite format 3\x00"), 1000), 0o600); err != nil {
					t.Fatal(err)
				}
			},
			want:    ErrDamaged,
			wantMsg: []string{"not a bbolt store", "no bbolt magic number", "docs/operations.md"},
		},
		{
			name: "both meta pages overwritten",
			setup: func(t *testing.T, d *dataDir) {
				d.populate(t)
				overwrite(t, d.db, 0, int(2*page), 1)
			},
			want:    ErrDamaged,
			wantMsg: []string{"not a bbolt store"},
		},
		{
			name: "truncated to half",
			setup: func(t *testing.T, d *dataDir) {
				d.populate(t)
				if err := os.Truncate(d.db, highWaterMark(t, d.db)/2/page*page); err != nil {
					t.Fatal(err)
				}
			},
			want:    ErrDamaged,
			wantMsg: []string{"truncated"},
		},
		{
			name: "truncated mid-page",
			setup: func(t *testing.T, d *dataDir) {
				d.populate(t)
				if err := os.Truncate(d.db, highWaterMark(t, d.db)-100); err != nil {
					t.Fatal(err)
				}
			},
			readOnly: true,
			want:     ErrDamaged,
			wantMsg:  []string{"truncated"},
		},
		{
			name: "random bytes over a leaf page in the middle",
			setup: func(t *testing.T, d *dataDir) {
				d.populate(t)
				overwrite(t, d.db, middle(pagesOfType(t, d.db, "leaf")), int(page), 2)
			},
			want: ErrDamaged,
		},
		{
			name: "random bytes over a leaf page's element headers",
			setup: func(t *testing.T, d *dataDir) {
				d.populate(t)
				overwrite(t, d.db, middle(pagesOfType(t, d.db, "leaf"))+16, 200, 3)
			},
			want: ErrDamaged,
		},
		{
			name: "random bytes over a branch page",
			setup: func(t *testing.T, d *dataDir) {
				d.populate(t)
				overwrite(t, d.db, middle(pagesOfType(t, d.db, "branch")), int(page), 4)
			},
			want: ErrDamaged,
		},
		{
			name: "random bytes over a branch page's child pointers",
			setup: func(t *testing.T, d *dataDir) {
				d.populate(t)
				overwrite(t, d.db, middle(pagesOfType(t, d.db, "branch"))+16, 64, 5)
			},
			readOnly: true,
			want:     ErrDamaged,
		},
		{
			name: "random bytes over the freelist",
			setup: func(t *testing.T, d *dataDir) {
				d.populate(t)
				overwrite(t, d.db, middle(pagesOfType(t, d.db, "freelist")), 64, 6)
			},
			want: ErrDamaged,
		},
		{
			name: "store copied from another data directory",
			setup: func(t *testing.T, d *dataDir) {
				d.populate(t)
				other := newDataDir(t)
				other.populate(t)
				raw, err := os.ReadFile(other.db)
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(d.db, raw, 0o600); err != nil {
					t.Fatal(err)
				}
			},
			want:    ErrNotOwner,
			wantMsg: []string{"created on", "CA (", "has SHA-256", "copy its whole data directory"},
		},
		{
			name: "CA lost, store kept",
			setup: func(t *testing.T, d *dataDir) {
				d.populate(t)
				if err := os.Remove(d.ca); err != nil {
					t.Fatal(err)
				}
			},
			want:    ErrNotOwner,
			wantMsg: []string{"has no CA certificate", "put back ca.crt and ca.key"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := newDataDir(t)
			tt.setup(t, &d)
			before := snap(t, d.db)
			opts := d.opts()
			opts.ReadOnly = tt.readOnly
			s, err := OpenWith(d.db, opts)
			if err == nil {
				_ = s.Close()
				t.Fatal("OpenWith succeeded")
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			for _, m := range append(tt.wantMsg, d.db) {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("message %q lacks %q", err, m)
				}
			}
			if strings.Contains(err.Error(), "goroutine ") {
				t.Errorf("message holds a stack dump: %q", err)
			}
			after := snap(t, d.db)
			if !bytes.Equal(before.content, after.content) || !before.mtime.Equal(after.mtime) || (before.content == nil) != (after.content == nil) {
				t.Errorf("the refused store was written: %d bytes at %v, now %d bytes at %v", len(before.content), before.mtime, len(after.content), after.mtime)
			}
			// The refusal released the file: a fresh read-only open gets past the lock.
			if _, err := OpenWith(d.db, OpenOptions{ReadOnly: true, LockTimeout: 200 * time.Millisecond}); errors.Is(err, ErrLocked) {
				t.Errorf("the refused store is still locked: %v", err)
			}
		})
	}
}

func TestOpenAccepts(t *testing.T) {
	tests := []struct {
		name string
		// setup prepares d (a new, empty directory); the test writes the CA
		// after opening the store when setup did not, as a first start does.
		setup func(t *testing.T, d *dataDir)
		// wantReadErr: reading the nodes and latest policy fails, with a
		// decoding error rather than ErrDamaged.
		wantReadErr bool
	}{
		{name: "new data directory", setup: func(*testing.T, *dataDir) {}},
		{name: "empty file, no CA yet (first start interrupted)", setup: func(t *testing.T, d *dataDir) {
			if err := os.WriteFile(d.db, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "own store", setup: func(t *testing.T, d *dataDir) { d.populate(t) }},
		{name: "store without owner record (older version)", setup: func(t *testing.T, d *dataDir) {
			s, err := Open(d.db)
			if err != nil {
				t.Fatal(err)
			}
			fillStore(t, s, 10)
			_ = s.Close()
			d.writeCA(t)
		}},
		{name: "damage inside a value", wantReadErr: true, setup: func(t *testing.T, d *dataDir) {
			d.populate(t)
			s, err := Open(d.db)
			if err != nil {
				t.Fatal(err)
			}
			err = s.Update(func(tx Tx) error {
				return tx.PutPolicy(Policy{Revision: 31, Content: bytes.Repeat([]byte("a"), 3000)})
			})
			_ = s.Close()
			if err != nil {
				t.Fatal(err)
			}
			raw, err := os.ReadFile(d.db)
			if err != nil {
				t.Fatal(err)
			}
			i := bytes.Index(raw, bytes.Repeat([]byte("YWFh"), 100)) // base64 of "aaa"
			if i < 0 {
				t.Fatal("policy content not found in the file")
			}
			overwrite(t, d.db, int64(i), 64, 7)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := newDataDir(t)
			tt.setup(t, &d)
			s, err := OpenWith(d.db, d.opts())
			if err != nil {
				t.Fatalf("OpenWith: %v", err)
			}
			defer s.Close()
			if d.caDER == nil {
				d.writeCA(t)
			}
			if err := s.Bind(d.caDER); err != nil {
				t.Fatalf("Bind: %v", err)
			}
			o, ok, err := s.Owner()
			if err != nil || !ok || o.CAFingerprint != CAFingerprint(d.caDER) || o.CreatedAt.IsZero() {
				t.Errorf("Owner = %+v, %v, %v; want fingerprint %s", o, ok, err, CAFingerprint(d.caDER))
			}
			err = s.View(func(tx Tx) error {
				if _, err := tx.Nodes(); err != nil {
					return err
				}
				_, _, err := tx.LatestPolicy()
				return err
			})
			if tt.wantReadErr {
				if err == nil || errors.Is(err, ErrDamaged) {
					t.Errorf("reading the damaged record: err = %v, want a decoding error", err)
				}
			} else if err != nil {
				t.Error(err)
			}
		})
	}
}

func TestBind(t *testing.T) {
	d := newDataDir(t)
	s, err := OpenWith(d.db, d.opts())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	d.writeCA(t)
	if _, ok, err := s.Owner(); ok || err != nil {
		t.Fatalf("new store: Owner ok = %v, err = %v; want none", ok, err)
	}
	if err := s.Bind(d.caDER); err != nil {
		t.Fatal(err)
	}
	first, _, _ := s.Owner()
	before := snap(t, d.db)
	if err := s.Bind(d.caDER); err != nil {
		t.Fatalf("Bind again to the same CA: %v", err)
	}
	if after := snap(t, d.db); !bytes.Equal(before.content, after.content) {
		t.Error("binding again to the same CA wrote to the store")
	}
	err = s.Bind([]byte("another CA"))
	if !errors.Is(err, ErrNotOwner) || !strings.Contains(err.Error(), CAFingerprint(d.caDER)) || !strings.Contains(err.Error(), CAFingerprint([]byte("another CA"))) {
		t.Errorf("Bind to another CA: err = %v, want ErrNotOwner naming both fingerprints", err)
	}
	if now, _, _ := s.Owner(); now != first {
		t.Errorf("owner changed from %+v to %+v", first, now)
	}
}

func TestTransactionPanicBecomesError(t *testing.T) {
	s, _ := openTemp(t)
	tests := []struct {
		name string
		run  func(fn func(Tx) error) error
	}{
		{"View", s.View},
		{"Update", s.Update},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.run(func(tx Tx) error {
				if tt.name == "Update" {
					if err := tx.PutMeta("half-done", []byte("x")); err != nil {
						return err
					}
				}
				panic("a bug in the transaction function")
			})
			if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), "a bug in the transaction function") || !strings.Contains(err.Error(), "integrity_test.go:") {
				t.Fatalf("err = %v, want ErrDamaged naming the panic and its site", err)
			}
			// The transaction was rolled back and the store still works.
			err = s.Update(func(tx Tx) error {
				if v, err := tx.Meta("half-done"); err != nil || v != nil {
					return fmt.Errorf("half-done = %q, %v; want nothing", v, err)
				}
				return tx.PutMeta("after", []byte("ok"))
			})
			if err != nil {
				t.Fatalf("store after the panic: %v", err)
			}
		})
	}
}

// TestDamageWhileOpen: a file truncated under a running store makes reads
// fault (SIGBUS through the memory map); the transaction fails with an error.
func TestDamageWhileOpen(t *testing.T) {
	d := newDataDir(t)
	d.populate(t)
	s, err := OpenWith(d.db, d.opts())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := os.Truncate(d.db, int64(2*os.Getpagesize())); err != nil {
		t.Fatal(err)
	}
	err = s.View(func(tx Tx) error {
		_, err := tx.Nodes()
		return err
	})
	if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), "docs/operations.md") {
		t.Fatalf("err = %v, want ErrDamaged", err)
	}
}
