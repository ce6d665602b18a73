package etcdstore

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"

	"segmesh/controller/store"
)

// Sealed meta values are sealedVersion, a 12-byte nonce and the AES-256-GCM
// ciphertext with its 16-byte tag (NIST SP 800-38D); the additional data is the
// value's full etcd key.
const sealedVersion = 0x01

// secretCheckKey is the meta key whose sealed value proves the key: it holds
// secretCheckValue sealed with the cluster's key.
const (
	secretCheckKey   = "secret-check"
	secretCheckValue = "segmesh etcd secret check v1"
)

// initSecret sets up sealing from Config.SecretKey and checks it against the
// cluster's check value, storing one when the cluster has none.
func (s *Store) initSecret() error {
	key := s.cfg.SecretKey
	if key != nil {
		if len(key) != 32 {
			return fmt.Errorf("secret key: %d bytes, want 32", len(key))
		}
		block, err := aes.NewCipher(key)
		if err != nil {
			return err
		}
		if s.aead, err = cipher.NewGCM(block); err != nil {
			return err
		}
	}
	var present bool
	err := s.Update(func(stx store.Tx) error {
		t := stx.(*tx)
		v, ok, err := t.value(tMeta, secretCheckKey)
		if err != nil {
			return err
		}
		present = ok
		switch {
		case ok && s.aead == nil:
			return fmt.Errorf("the cluster's secrets are sealed and no secret key was given (--secret-key-file): %w", ErrSecretKey)
		case ok:
			got, err := s.open(t.full(tMeta, secretCheckKey), v)
			if err != nil || string(got) != secretCheckValue {
				return fmt.Errorf("the secret key cannot open the cluster's check value; give every controller the same --secret-key-file: %w", ErrSecretKey)
			}
			return nil
		case s.aead == nil:
			return nil
		}
		sealed, err := s.seal(t.full(tMeta, secretCheckKey), []byte(secretCheckValue))
		if err != nil {
			return err
		}
		return t.put(tMeta, secretCheckKey, sealed)
	})
	if err != nil {
		return err
	}
	if !present && s.aead != nil {
		s.log.Info("etcd store: sealing secrets with the given key for the first time")
	}
	return nil
}

// seal returns value sealed for etcd key full, or value itself without a key.
func (s *Store) seal(full string, value []byte) ([]byte, error) {
	if s.aead == nil {
		return bytes.Clone(value), nil
	}
	out := make([]byte, 1+s.aead.NonceSize(), 1+s.aead.NonceSize()+len(value)+s.aead.Overhead())
	out[0] = sealedVersion
	if _, err := rand.Read(out[1:]); err != nil {
		return nil, err
	}
	return s.aead.Seal(out, out[1:], value, []byte(full)), nil
}

// open reverses seal; an error says the value is not sealed with this key for full.
func (s *Store) open(full string, v []byte) ([]byte, error) {
	if s.aead == nil {
		return bytes.Clone(v), nil
	}
	n := s.aead.NonceSize()
	if len(v) < 1+n || v[0] != sealedVersion {
		return nil, fmt.Errorf("meta value %s is not sealed (version %#x): %w", full, v[:min(len(v), 1)], errNotSealed)
	}
	out, err := s.aead.Open(nil, v[1:1+n], v[1+n:], []byte(full))
	if err != nil {
		return nil, fmt.Errorf("meta value %s does not open with the secret key: %w", full, err)
	}
	return out, nil
}

var errNotSealed = errors.New("not sealed")
