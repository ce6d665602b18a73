package store

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// TestBackupIsConsistentUnderWrites: a backup taken while another goroutine
// commits transactions that each add one node and one audit record is a store
// that passes the open checks, keeps the owner, and holds whole transactions
// only (as many nodes as audit records beyond the initial ones).
func TestBackupIsConsistentUnderWrites(t *testing.T) {
	d := newDataDir(t)
	d.populate(t) // 300 nodes, 300 audit records, 30 policy revisions
	s, err := OpenWith(d.db, d.opts())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	stop, done := make(chan struct{}), make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			err := s.Update(func(tx Tx) error {
				name := fmt.Sprintf("later-%05d", i)
				if err := tx.PutNode(Node{Name: name, PublicKey: []byte(name)}); err != nil {
					return err
				}
				return tx.AppendAudit(AuditEntry{Actor: "admin", Action: "node.enroll", Object: "node:" + name})
			})
			if err != nil {
				done <- err
				return
			}
		}
	}()
	var copies [][]byte
	for range 3 {
		var buf bytes.Buffer
		n, err := s.Backup(&buf)
		if err != nil {
			t.Fatal(err)
		}
		if n != int64(buf.Len()) {
			t.Errorf("Backup returned %d, wrote %d bytes", n, buf.Len())
		}
		copies = append(copies, buf.Bytes())
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	for i, raw := range copies {
		path := filepath.Join(d.dir, fmt.Sprintf("backup-%d.db", i))
		if err := os.WriteFile(path, raw, 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := OpenWith(path, OpenOptions{CACertPath: d.ca, ReadOnly: true})
		if err != nil {
			t.Fatalf("copy %d: %v", i, err)
		}
		sum, err := c.Summary()
		_ = c.Close()
		if err != nil {
			t.Fatal(err)
		}
		if sum.Nodes < 300 || sum.Nodes-300 != sum.AuditRecords-300 || sum.PolicyRevisions != 30 {
			t.Errorf("copy %d: %+v, want 300+k nodes, 300+k audit records, 30 revisions", i, sum)
		}
		if sum.Owner.CAFingerprint != CAFingerprint(d.caDER) {
			t.Errorf("copy %d: owner %+v, want %s", i, sum.Owner, CAFingerprint(d.caDER))
		}
	}
}

func TestBackupWriterError(t *testing.T) {
	s, _ := openTemp(t)
	want := errors.New("disk full")
	// bbolt formats the writer's error into its own (%s), so match the text.
	if _, err := s.Backup(failingWriter{want}); err == nil || !strings.Contains(err.Error(), want.Error()) {
		t.Errorf("err = %v, want one saying %q", err, want)
	}
	if err := s.Update(func(tx Tx) error { return tx.PutMeta("k", []byte("v")) }); err != nil {
		t.Errorf("store after a failed backup: %v", err)
	}
}

type failingWriter struct{ err error }

func (w failingWriter) Write([]byte) (int, error) { return 0, w.err }

// TestSummaryOfOldStoreReadOnly: a store without the newer buckets, opened
// read-only, is summarised with zero counts instead of failing.
func TestSummaryOfOldStoreReadOnly(t *testing.T) {
	path := filepath.Join(t.TempDir(), "old.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	fillStore(t, s, 3)
	err = s.db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketAudit, bucketMeta} {
			if err := tx.DeleteBucket(b); err != nil {
				return err
			}
		}
		return nil
	})
	_ = s.Close()
	if err != nil {
		t.Fatal(err)
	}
	ro, err := OpenWith(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	sum, err := ro.Summary()
	if err != nil || sum != (Summary{Nodes: 3}) {
		t.Errorf("Summary = %+v, %v; want 3 nodes only", sum, err)
	}
	if err := ro.Update(func(tx Tx) error { return nil }); err == nil {
		t.Error("Update on a read-only store succeeded")
	}
}
