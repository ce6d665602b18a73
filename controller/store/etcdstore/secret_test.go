package etcdstore

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"segmesh/controller/store"
)

// TestSealedMeta: with a secret key, meta values are stored sealed (etcd holds
// no plaintext), read back in the clear, bound to their key, and a controller
// with another key or none is refused.
func TestSealedMeta(t *testing.T) {
	prefix := newPrefix(t)
	key := bytes.Repeat([]byte{7}, 32)
	s := openAt(t, prefix, func(c *Config) { c.SecretKey = key })
	secret := []byte("the gossip key, 32 bytes long...")
	if err := s.Update(func(tx store.Tx) error { return tx.PutMeta("gossip-key", secret) }); err != nil {
		t.Fatal(err)
	}
	resp, err := s.cli.Get(context.Background(), prefix+"meta/gossip-key")
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("raw get: %v %v", resp, err)
	}
	raw := resp.Kvs[0].Value
	if bytes.Contains(raw, secret[:8]) || raw[0] != sealedVersion {
		t.Errorf("etcd holds %q, want a sealed value", raw)
	}
	var got []byte
	if err := s.View(func(tx store.Tx) error { got, err = tx.Meta("gossip-key"); return err }); err != nil || !bytes.Equal(got, secret) {
		t.Errorf("Meta = %q, %v; want %q", got, err, secret)
	}
	// A sealed value moved to another key does not open.
	if _, err := s.cli.Put(context.Background(), prefix+"meta/other", string(raw)); err != nil {
		t.Fatal(err)
	}
	if err := s.View(func(tx store.Tx) error { _, err := tx.Meta("other"); return err }); err == nil {
		t.Error("a sealed value copied to another key opened")
	}
	for name, k := range map[string][]byte{"other key": bytes.Repeat([]byte{8}, 32), "no key": nil} {
		_, err := Open(context.Background(), Config{Endpoints: []string{endpoint}, Prefix: prefix, DialTimeout: 5 * time.Second,
			Logger: slog.New(slog.DiscardHandler), SecretKey: k})
		if !errors.Is(err, ErrSecretKey) {
			t.Errorf("%s: Open = %v, want ErrSecretKey", name, err)
		}
	}
	if _, err := Open(context.Background(), Config{Endpoints: []string{endpoint}, Prefix: newPrefix(t), SecretKey: []byte("short")}); err == nil {
		t.Error("a 5-byte key was accepted")
	}
	// The same key opens again.
	openAt(t, prefix, func(c *Config) { c.SecretKey = key })
}
