package etcdstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"segmesh/controller/store"
)

// fillBolt writes a small controller state into a new bbolt store through
// store.Tx: nodes (one deleted, so its address is quarantined), tokens,
// operators, policy revisions, meta values, an owner record and an audit log.
func fillBolt(t *testing.T) *store.Bolt {
	t.Helper()
	path := filepath.Join(t.TempDir(), "controller.db")
	b, err := store.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 11, 3, 4, 5, 6, 789, time.UTC)
	for i := range 12 {
		err := b.Update(func(tx store.Tx) error {
			a := netip.AddrFrom4([4]byte{100, 64, 0, byte(i + 1)})
			n := store.Node{Name: fmt.Sprintf("node-%02d", i), Labels: map[string]string{"i": fmt.Sprint(i)}, Addresses: []netip.Addr{a},
				PublicKey: bytes.Repeat([]byte{byte(i + 1)}, 32), EnrolledAt: at, TokenID: fmt.Sprintf("t%02d", i)}
			if err := tx.ClaimAddress(a, n.Name); err != nil {
				return err
			}
			if err := tx.PutNode(n); err != nil {
				return err
			}
			if err := tx.PutToken(store.Token{ID: n.TokenID, SecretHash: []byte{byte(i)}, CreatedAt: at, ExpiresAt: at.Add(time.Hour), UsedBy: n.Name}); err != nil {
				return err
			}
			if i < 3 {
				if err := tx.PutOperator(store.Operator{Name: fmt.Sprintf("op-%d", i), Role: store.RoleAdmin, TokenHash: []byte{0xee, byte(i)}, CreatedAt: at}); err != nil {
					return err
				}
			}
			if err := tx.PutPolicy(store.Policy{Revision: uint64(i + 1), Filename: "p.yaml", Content: []byte(fmt.Sprintf("# revision %d\n", i+1)), AppliedAt: at, AppliedBy: "op-0"}); err != nil {
				return err
			}
			return tx.AppendAudit(store.AuditEntry{Time: at.Add(time.Duration(i) * time.Second), Actor: "op-0", Action: "node.enroll", Object: "node:" + n.Name, Result: "ok"})
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	err = b.Update(func(tx store.Tx) error {
		if err := tx.DeleteNode("node-03", at.Add(24*time.Hour)); err != nil {
			return err
		}
		if err := tx.PutMeta("gossip-key", bytes.Repeat([]byte{0x42}, 32)); err != nil {
			return err
		}
		return tx.AppendAudit(store.AuditEntry{Time: at, Actor: "op-0", Action: "node.delete", Object: "node:node-03", Result: "ok"})
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Bind([]byte("a CA certificate")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// reads is everything a controller reads from a store, for comparison.
type reads struct {
	Nodes      []store.Node
	Tokens     []store.Token
	Operators  []store.Operator
	Revisions  []uint64
	Policies   []store.Policy
	Latest     store.Policy
	Audit      []store.AuditEntry
	HeadSeq    uint64
	HeadHash   string
	Gossip     []byte
	Owner      []byte
	ByKey      map[string]string
	ByToken    map[string]string
	Owners     map[string]string
	Quarantine map[string]time.Time
}

func readAll(t *testing.T, s store.Store) reads {
	t.Helper()
	r := reads{ByKey: map[string]string{}, ByToken: map[string]string{}, Owners: map[string]string{}, Quarantine: map[string]time.Time{}}
	err := s.View(func(tx store.Tx) error {
		var err error
		if r.Nodes, err = tx.Nodes(); err != nil {
			return err
		}
		if r.Tokens, err = tx.Tokens(); err != nil {
			return err
		}
		if r.Operators, err = tx.Operators(); err != nil {
			return err
		}
		if r.Revisions, err = tx.PolicyRevisions(); err != nil {
			return err
		}
		for _, rev := range r.Revisions {
			p, _, err := tx.Policy(rev)
			if err != nil {
				return err
			}
			r.Policies = append(r.Policies, p)
		}
		if r.Latest, _, err = tx.LatestPolicy(); err != nil {
			return err
		}
		if r.Audit, err = tx.Audit(); err != nil {
			return err
		}
		if r.HeadSeq, r.HeadHash, err = tx.AuditHead(); err != nil {
			return err
		}
		if r.Gossip, err = tx.Meta("gossip-key"); err != nil {
			return err
		}
		if r.Owner, err = tx.Meta("owner"); err != nil {
			return err
		}
		for i := range 12 {
			name, _, err := tx.NodeByPublicKey(bytes.Repeat([]byte{byte(i + 1)}, 32))
			if err != nil {
				return err
			}
			r.ByKey[fmt.Sprint(i)] = name
			a := netip.AddrFrom4([4]byte{100, 64, 0, byte(i + 1)})
			if r.Owners[a.String()], _, err = tx.AddressOwner(a); err != nil {
				return err
			}
			if r.Quarantine[a.String()], _, err = tx.AddressQuarantine(a); err != nil {
				return err
			}
			o, _, err := tx.OperatorByTokenHash([]byte{0xee, byte(i)})
			if err != nil {
				return err
			}
			r.ByToken[fmt.Sprint(i)] = o.Name
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestImport: a bbolt store copied into etcd (in Txns of at most 7 puts) reads
// the same through every Tx method, with its audit chain intact and continued
// by etcd writes; the owner record is not copied, the gossip key is sealed; the
// prefix stays marked until FinishImport, and a prefix with records is refused.
func TestImport(t *testing.T) {
	b := fillBolt(t)
	prefix := newPrefix(t)
	key := bytes.Repeat([]byte{9}, 32)
	s := openAt(t, prefix, func(c *Config) { c.SecretKey = key; c.MaxTxnOps = 8 })
	stats, err := s.Import(b.Walk)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{"nodes": 11, "tokens": 12, "operators": 3, "operator-tokens": 3, "pubkeys": 11, "policies": 12,
		"ipam": 11, "quarantine": 1, "meta": 2, "audit": 13}
	if !reflect.DeepEqual(stats.Records, want) || stats.Skipped != 1 {
		t.Errorf("stats = %+v, want records %v and 1 skipped (owner)", stats, want)
	}
	if min := (stats.Total() + 6) / 7; stats.Txns < min {
		t.Errorf("%d records in %d Txns, want at least %d with MaxTxnOps 8", stats.Total(), stats.Txns, min)
	}
	// Every Txn wrote at most MaxTxnOps-1 keys (one etcd revision each).
	all, err := s.cli.Get(context.Background(), prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	perTxn := map[int64]int{}
	for _, kv := range all.Kvs {
		if perTxn[kv.ModRevision]++; perTxn[kv.ModRevision] > 7 {
			t.Fatalf("etcd revision %d wrote more than 7 keys under the prefix (MaxTxnOps 8)", kv.ModRevision)
		}
	}
	got, wantReads := readAll(t, s), readAll(t, b)
	if wantReads.Owner == nil || got.Owner != nil {
		t.Errorf("owner record: bbolt %q, etcd %q; want it in bbolt only", wantReads.Owner, got.Owner)
	}
	got.Owner, wantReads.Owner = nil, nil
	if !reflect.DeepEqual(got, wantReads) {
		t.Errorf("etcd reads differ from bbolt reads:\netcd  %+v\nbbolt %+v", got, wantReads)
	}
	if p := store.VerifyAudit(got.Audit, got.HeadSeq, got.HeadHash); p != nil || got.HeadSeq != 13 {
		t.Errorf("imported audit: head %d, problem %v", got.HeadSeq, p)
	}
	raw, err := s.cli.Get(context.Background(), prefix+"meta/gossip-key")
	if err != nil || len(raw.Kvs) != 1 || bytes.Contains(raw.Kvs[0].Value, bytes.Repeat([]byte{0x42}, 8)) {
		t.Errorf("meta/gossip-key in etcd = %v, %v; want one sealed value", raw, err)
	}

	// Marked until FinishImport; a second import is refused either way.
	if m, err := s.Migrating(); err != nil || !m {
		t.Errorf("Migrating after Import = %v, %v; want true", m, err)
	}
	if _, err := s.Import(b.Walk); err == nil || !strings.Contains(err.Error(), "interrupted") {
		t.Errorf("Import into a marked prefix = %v, want a refusal naming the interrupted migrate", err)
	}
	if err := s.FinishImport(); err != nil {
		t.Fatal(err)
	}
	if m, err := s.Migrating(); err != nil || m {
		t.Errorf("Migrating after FinishImport = %v, %v; want false", m, err)
	}
	if _, err := s.Import(b.Walk); err == nil || !strings.Contains(err.Error(), "only fills an empty prefix") {
		t.Errorf("Import into a filled prefix = %v, want a refusal", err)
	}
	if got2 := readAll(t, s); !reflect.DeepEqual(got2.Nodes, got.Nodes) || len(got2.Audit) != 13 {
		t.Error("a refused Import changed the store")
	}

	// The etcd store continues the chain and the revisions.
	err = s.Update(func(tx store.Tx) error {
		if err := tx.PutPolicy(store.Policy{Revision: 13}); err != nil {
			return err
		}
		return tx.AppendAudit(store.AuditEntry{Time: time.Now(), Actor: "op-0", Action: "policy.apply", Result: "ok"})
	})
	if err != nil {
		t.Fatal(err)
	}
	after := readAll(t, s)
	if p := store.VerifyAudit(after.Audit, after.HeadSeq, after.HeadHash); p != nil || after.HeadSeq != 14 {
		t.Errorf("audit after a new record: head %d, problem %v", after.HeadSeq, p)
	}
}

// TestImportRefusesBeforeWriting: an unknown table, a reserved meta key or a
// malformed policy key is refused before anything is written.
func TestImportRefusesBeforeWriting(t *testing.T) {
	for name, bad := range map[string][3]string{
		"unknown table":    {"future", "k", "v"},
		"reserved meta":    {"meta", "migrating", "x"},
		"short policy key": {"policies", "\x01", "{}"},
	} {
		t.Run(name, func(t *testing.T) {
			prefix := newPrefix(t)
			s := openAt(t, prefix, nil)
			_, err := s.Import(func(yield func(string, []byte, []byte) error) error {
				if err := yield("nodes", []byte("a"), []byte(`{"name":"a"}`)); err != nil {
					return err
				}
				return yield(bad[0], []byte(bad[1]), []byte(bad[2]))
			})
			if err == nil || !strings.Contains(err.Error(), "nothing was written") {
				t.Errorf("Import = %v, want a refusal saying nothing was written", err)
			}
			resp, err := s.cli.Get(context.Background(), prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
			if err != nil || resp.Count != 0 {
				t.Errorf("the prefix holds %v keys (%v), want none", resp.Count, err)
			}
		})
	}
}

// TestImportInterrupted: a walk that fails after records were written leaves the
// prefix marked, and the error says how to clear it.
func TestImportInterrupted(t *testing.T) {
	b := fillBolt(t)
	prefix := newPrefix(t)
	s := openAt(t, prefix, func(c *Config) { c.MaxTxnOps = 4 })
	broken := errors.New("disk went away")
	calls := 0
	_, err := s.Import(func(yield func(string, []byte, []byte) error) error {
		calls++
		n := 0
		return b.Walk(func(table string, k, v []byte) error {
			if n++; calls == 2 && n == 20 {
				return broken
			}
			return yield(table, k, v)
		})
	})
	if !errors.Is(err, broken) || !strings.Contains(err.Error(), "etcdctl del --prefix "+prefix) || !strings.Contains(err.Error(), "records were written") {
		t.Fatalf("Import = %v, want the walk's error with how to clear the prefix", err)
	}
	if m, err := s.Migrating(); err != nil || !m {
		t.Errorf("Migrating after an interrupted Import = %v, %v; want true", m, err)
	}
}
