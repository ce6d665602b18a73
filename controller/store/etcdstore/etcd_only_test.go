package etcdstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"segmesh/controller/store"
	"segmesh/controller/store/storetest"
)

func TestOpenErrors(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no endpoints", Config{}, "no endpoints"},
		{"nothing listening", Config{Endpoints: []string{"http://127.0.0.1:1"}, DialTimeout: 300 * time.Millisecond}, "etcd at http://127.0.0.1:1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Open(context.Background(), tt.cfg)
			if err == nil {
				_ = s.Close()
				t.Fatal("Open succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

// TestKeyLayout: records sit under the prefix with the documented keys and the
// bbolt store's JSON encodings.
func TestKeyLayout(t *testing.T) {
	prefix := newPrefix(t)
	s := openAt(t, prefix, nil)
	n := store.Node{Name: "db-1", PublicKey: []byte{0xab, 31: 1}}
	if err := s.Update(func(tx store.Tx) error {
		if err := tx.PutNode(n); err != nil {
			return err
		}
		return tx.PutPolicy(store.Policy{Revision: 1})
	}); err != nil {
		t.Fatal(err)
	}
	want, _ := json.Marshal(n)
	for key, val := range map[string]string{
		"nodes/db-1": string(want),
		"pubkeys/ab" + strings.Repeat("00", 30) + "01": "db-1",
		"policies/0000000000000001":                    `{"revision":1,"filename":"","content":null,"applied_at":"0001-01-01T00:00:00Z","applied_by":""}`,
		"version/nodes":                                "",
	} {
		resp, err := s.cli.Get(context.Background(), prefix+key)
		if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != val {
			t.Errorf("%s%s = %v %v, want %q", prefix, key, resp, err, val)
		}
	}
}

// TestViewIsSnapshot: a View reads at the revision of its first read, so a
// write committed meanwhile is not seen.
func TestViewIsSnapshot(t *testing.T) {
	prefix := newPrefix(t)
	s, other := openAt(t, prefix, nil), openAt(t, prefix, nil)
	put := func(name string) {
		t.Helper()
		if err := other.Update(func(tx store.Tx) error { return tx.PutNode(store.Node{Name: name}) }); err != nil {
			t.Fatal(err)
		}
	}
	put("a")
	err := s.View(func(tx store.Tx) error {
		if _, ok, err := tx.Node("a"); err != nil || !ok {
			t.Fatalf("Node(a) = %v %v", ok, err)
		}
		put("b")
		ns, err := tx.Nodes()
		if err != nil || len(ns) != 1 || ns[0].Name != "a" {
			t.Errorf("Nodes after a concurrent write = %+v %v, want only a", ns, err)
		}
		if _, ok, _ := tx.Node("b"); ok {
			t.Error("View saw a node written after its snapshot")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestUpdateRetriesAndGivesUp: when every attempt loses against another writer,
// fn runs MaxAttempts times and Update fails with ErrConflict, writing nothing.
func TestUpdateRetriesAndGivesUp(t *testing.T) {
	prefix := newPrefix(t)
	s := openAt(t, prefix, func(c *Config) { c.MaxAttempts = 3 })
	other := openAt(t, prefix, nil)
	tests := []struct {
		name string
		read func(store.Tx) error
	}{
		{"key read", func(tx store.Tx) error { _, err := tx.Meta("k"); return err }},
		{"absent key read", func(tx store.Tx) error { _, _, err := tx.Token("never"); return err }},
		{"table read", func(tx store.Tx) error { _, err := tx.Tokens(); return err }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			runs := 0
			err := s.Update(func(tx store.Tx) error {
				runs++
				if err := tt.read(tx); err != nil {
					return err
				}
				// Another controller changes what was read before this commits.
				if err := other.Update(func(tx store.Tx) error {
					return errors.Join(tx.PutMeta("k", fmt.Append(nil, runs)), tx.PutToken(store.Token{ID: "never"}))
				}); err != nil {
					return err
				}
				return tx.PutMeta("mine", []byte("x"))
			})
			if !errors.Is(err, ErrConflict) || runs != 3 {
				t.Errorf("err = %v after %d runs, want ErrConflict after 3", err, runs)
			}
			_ = s.View(func(tx store.Tx) error {
				if v, _ := tx.Meta("mine"); v != nil {
					t.Error("a conflicting transaction was committed")
				}
				return nil
			})
		})
	}
}

// TestTxnLimit: a transaction beyond etcd's --max-txn-ops (128) is refused
// before it reaches etcd, with ErrTooLarge and nothing written; one just at the
// limit commits.
func TestTxnLimit(t *testing.T) {
	tests := []struct {
		name      string
		fn        func(store.Tx) error
		wantErr   bool
		wantNodes int
	}{
		{"127 records and their table version", func(tx store.Tx) error { return putNodes(tx, 127) }, false, 127},
		{"128 records and their table version", func(tx store.Tx) error { return putNodes(tx, 128) }, true, 0},
		{"200 lookups", func(tx store.Tx) error { return errors.Join(lookups(tx, 200), tx.PutMeta("k", nil)) }, true, 0},
		{"200 lookups in a table also listed", func(tx store.Tx) error {
			_, err := tx.Nodes()
			return errors.Join(err, lookups(tx, 200), tx.PutMeta("k", nil))
		}, false, 0},
		{"refused by etcd when MaxTxnOps is set too high", func(tx store.Tx) error { return putNodes(tx, 200) }, true, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openAt(t, newPrefix(t), func(c *Config) {
				if strings.Contains(tt.name, "too high") {
					c.MaxTxnOps = 1000
				}
			})
			err := s.Update(tt.fn)
			if tt.wantErr != (err != nil) || (err != nil && !errors.Is(err, ErrTooLarge)) {
				t.Fatalf("err = %v, wantErr %v (ErrTooLarge)", err, tt.wantErr)
			}
			var count int
			_ = s.View(func(tx store.Tx) error {
				ns, err := tx.Nodes()
				count = len(ns)
				return err
			})
			if count != tt.wantNodes {
				t.Errorf("%d nodes stored, want %d", count, tt.wantNodes)
			}
		})
	}
}

func putNodes(tx store.Tx, n int) error {
	for i := range n {
		if err := tx.PutNode(store.Node{Name: fmt.Sprintf("n%03d", i)}); err != nil {
			return err
		}
	}
	return nil
}

func lookups(tx store.Tx, n int) error {
	for i := range n {
		if _, _, err := tx.Node(fmt.Sprintf("n%03d", i)); err != nil {
			return err
		}
	}
	return nil
}

func TestUndecodableRevision(t *testing.T) {
	prefix := newPrefix(t)
	s := openAt(t, prefix, nil)
	storetest.UndecodableRevision(t, s, func(rev uint64, raw []byte) error {
		_, err := s.cli.Put(context.Background(), prefix+"policies/"+seqKey(rev), string(raw))
		return err
	})
}

// TestAuditTampering: editing or removing records directly in etcd is detected
// by store.VerifyAudit.
func TestAuditTampering(t *testing.T) {
	tests := []struct {
		name    string
		tamper  func(ctx context.Context, s *Store, key string) error
		wantSeq uint64
	}{
		{"edited", func(ctx context.Context, s *Store, key string) error {
			resp, err := s.cli.Get(ctx, key)
			if err != nil || len(resp.Kvs) != 1 {
				return fmt.Errorf("%v %v", resp, err)
			}
			edited := strings.Replace(string(resp.Kvs[0].Value), `"actor":"admin"`, `"actor":"eve"`, 1)
			_, err = s.cli.Put(ctx, key, edited)
			return err
		}, 3},
		{"removed", func(ctx context.Context, s *Store, key string) error { _, err := s.cli.Delete(ctx, key); return err }, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := newPrefix(t)
			s := openAt(t, prefix, nil)
			for i := range 4 {
				if err := s.Update(func(tx store.Tx) error {
					return tx.AppendAudit(store.AuditEntry{Time: time.Unix(int64(i), 0), Actor: "admin", Action: "x"})
				}); err != nil {
					t.Fatal(err)
				}
			}
			if err := tt.tamper(context.Background(), s, prefix+"audit/"+seqKey(3)); err != nil {
				t.Fatal(err)
			}
			_ = s.View(func(tx store.Tx) error {
				es, err := tx.Audit()
				seq, h, err2 := tx.AuditHead()
				if err != nil || err2 != nil {
					t.Fatal(err, err2)
				}
				if p := store.VerifyAudit(es, seq, h); p == nil || p.Seq != tt.wantSeq {
					t.Errorf("VerifyAudit = %v, want a problem at record %d", p, tt.wantSeq)
				}
				return nil
			})
		})
	}
}

// TestUpdateRetriesAfterCompaction: when etcd compacts the revision a
// transaction reads at, fn runs again on a fresh snapshot.
func TestUpdateRetriesAfterCompaction(t *testing.T) {
	prefix := newPrefix(t)
	s := openAt(t, prefix, nil)
	runs := 0
	err := s.Update(func(tx store.Tx) error {
		runs++
		if _, err := tx.Meta("a"); err != nil {
			return err
		}
		if runs == 1 {
			resp, err := s.cli.Put(context.Background(), prefix+"unrelated", "x")
			if err != nil {
				return err
			}
			if _, err := s.cli.Compact(context.Background(), resp.Header.Revision); err != nil {
				return err
			}
		}
		if _, err := tx.Meta("b"); err != nil {
			return err
		}
		return tx.PutMeta("done", []byte("yes"))
	})
	if err != nil || runs != 2 {
		t.Fatalf("err = %v after %d runs, want nil after 2", err, runs)
	}
	_ = s.View(func(tx store.Tx) error {
		if v, err := tx.Meta("done"); err != nil || string(v) != "yes" {
			t.Errorf("Meta(done) = %q %v", v, err)
		}
		return nil
	})
}

// TestLatestAfterDeletingTheLast: the last record of a table, deleted in the
// same transaction, is not the latest any more (no store.Tx method deletes
// policies today; the scan must still be right when one does).
func TestLatestAfterDeletingTheLast(t *testing.T) {
	s := openAt(t, newPrefix(t), nil)
	for rev := uint64(1); rev <= 3; rev++ {
		if err := s.Update(func(tx store.Tx) error { return tx.PutPolicy(store.Policy{Revision: rev}) }); err != nil {
			t.Fatal(err)
		}
	}
	err := s.Update(func(x store.Tx) error {
		if err := x.(*tx).del(tPolicies, seqKey(3)); err != nil {
			return err
		}
		p, ok, err := x.LatestPolicy()
		if err != nil || !ok || p.Revision != 2 {
			t.Errorf("LatestPolicy = %d %v %v, want 2", p.Revision, ok, err)
		}
		return errors.New("roll back")
	})
	if err == nil {
		t.Fatal("rolled-back Update returned nil")
	}
}
