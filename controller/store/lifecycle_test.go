package store

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

func appendN(t *testing.T, s Store, n int) {
	t.Helper()
	for i := range n {
		err := s.Update(func(tx Tx) error {
			return tx.AppendAudit(AuditEntry{Time: time.Unix(int64(1000+i), 5).UTC(), Actor: "admin", Action: "token.create", Object: "token:" + string(rune('a'+i)), Result: "ok"})
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

func verify(t *testing.T, s Store) *AuditProblem {
	t.Helper()
	var p *AuditProblem
	err := s.View(func(tx Tx) error {
		es, err := tx.Audit()
		if err != nil {
			return err
		}
		seq, h, err := tx.AuditHead()
		if err != nil {
			return err
		}
		p = VerifyAudit(es, seq, h)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestAuditChainDetectsTampering edits, removes and truncates records directly in
// the bbolt file, as an attacker with access to the store would, and checks that
// VerifyAudit names the first affected record.
func TestAuditChainDetectsTampering(t *testing.T) {
	cases := []struct {
		name    string
		tamper  func(b *bolt.Bucket) error
		wantSeq uint64
		reason  string
	}{
		{"intact", func(*bolt.Bucket) error { return nil }, 0, ""},
		{"edited detail", func(b *bolt.Bucket) error {
			var e AuditEntry
			_ = json.Unmarshal(b.Get(revKey(3)), &e)
			e.Actor = "someone-else"
			raw, _ := json.Marshal(e)
			return b.Put(revKey(3), raw)
		}, 3, "edited"},
		{"edited and rehashed", func(b *bolt.Bucket) error {
			var e AuditEntry
			_ = json.Unmarshal(b.Get(revKey(2)), &e)
			e.Result = "ok"
			e.Detail = "nothing to see"
			e.Hash = AuditHash(e)
			raw, _ := json.Marshal(e)
			return b.Put(revKey(2), raw)
		}, 3, "previous record"},
		{"removed in the middle", func(b *bolt.Bucket) error { return b.Delete(revKey(2)) }, 3, "removed"},
		{"removed at the end", func(b *bolt.Bucket) error { return b.Delete(revKey(5)) }, 5, "removed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openTemp(t)
			appendN(t, s, 5)
			if err := s.db.Update(func(tx *bolt.Tx) error { return tc.tamper(tx.Bucket(bucketAudit)) }); err != nil {
				t.Fatal(err)
			}
			p := verify(t, s)
			if tc.wantSeq == 0 {
				if p != nil {
					t.Fatalf("intact log reported as %v", p)
				}
				return
			}
			if p == nil || p.Seq != tc.wantSeq || !strings.Contains(p.Reason, tc.reason) {
				t.Fatalf("VerifyAudit = %v, want record %d (%q)", p, tc.wantSeq, tc.reason)
			}
		})
	}
}
