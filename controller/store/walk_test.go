package store

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// TestWalkReadOnly: Walk on a store opened read-only yields every record of
// every bucket exactly as stored, an unknown bucket too, and stops at fn's error.
func TestWalkReadOnly(t *testing.T) {
	s, path := openTemp(t)
	addr := netip.MustParseAddr("100.64.0.7")
	err := s.Update(func(tx Tx) error {
		if err := tx.PutNode(Node{Name: "web-1", PublicKey: []byte("k1"), Addresses: []netip.Addr{addr}}); err != nil {
			return err
		}
		if err := tx.ClaimAddress(addr, "web-1"); err != nil {
			return err
		}
		if err := tx.PutPolicy(Policy{Revision: 1, Content: []byte("segments: {}")}); err != nil {
			return err
		}
		return tx.AppendAudit(AuditEntry{Time: time.Unix(1, 0), Actor: "a", Action: "x"})
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucket([]byte("future"))
		if err != nil {
			return err
		}
		return b.Put([]byte("k"), []byte("v"))
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	ro, err := OpenWith(path, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	got := map[string]string{}
	if err := ro.Walk(func(bucket string, k, v []byte) error {
		got[fmt.Sprintf("%s/%x", bucket, k)] = string(v)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{
		"nodes/" + fmt.Sprintf("%x", "web-1"), "pubkeys/" + fmt.Sprintf("%x", "k1"),
		fmt.Sprintf("ipam/%x", addr.AsSlice()), fmt.Sprintf("policies/%x", revKey(1)),
		fmt.Sprintf("audit/%x", revKey(1)), "meta/" + fmt.Sprintf("%x", metaAuditHead), "future/6b",
	} {
		if _, ok := got[key]; !ok {
			t.Errorf("Walk did not yield %s; got %v", key, got)
		}
	}
	if got["future/6b"] != "v" || got["pubkeys/"+fmt.Sprintf("%x", "k1")] != "web-1" {
		t.Errorf("Walk values differ from what was stored: %v", got)
	}
	stop := errors.New("stop")
	n := 0
	if err := ro.Walk(func(string, []byte, []byte) error { n++; return stop }); !errors.Is(err, stop) || n != 1 {
		t.Errorf("Walk with fn failing = %v after %d calls, want stop after 1", err, n)
	}
}
