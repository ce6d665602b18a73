// Package jointoken encodes and decodes segmesh join tokens.
//
// A token is "smjt1_" followed by unpadded base64url (RFC 4648 §5) of
// ID (8 bytes) || secret (32 bytes) || SHA-256 fingerprint of the controller CA
// certificate's DER (32 bytes). The controller stores only a hash of the secret; the
// agent uses the fingerprint to pin the controller's CA on first contact, in the
// manner of kubeadm's discovery-token-ca-cert-hash.
package jointoken

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// Prefix starts every token, versioning the format.
const Prefix = "smjt1_"

const (
	idLen     = 8
	secretLen = 32
	fpLen     = sha256.Size
)

// Token is a decoded join token.
type Token struct {
	ID            [idLen]byte
	Secret        [secretLen]byte
	CAFingerprint [fpLen]byte
}

// ErrMalformed is returned (wrapped) by Decode for any string that is not a token.
var ErrMalformed = errors.New("malformed join token")

// New returns a token with a random ID and secret for the CA whose DER is caDER.
func New(caDER []byte) (Token, error) {
	var t Token
	if _, err := rand.Read(t.ID[:]); err != nil {
		return t, fmt.Errorf("generating token id: %w", err)
	}
	if _, err := rand.Read(t.Secret[:]); err != nil {
		return t, fmt.Errorf("generating token secret: %w", err)
	}
	t.CAFingerprint = sha256.Sum256(caDER)
	return t, nil
}

// String encodes the token.
func (t Token) String() string {
	b := make([]byte, 0, idLen+secretLen+fpLen)
	b = append(b, t.ID[:]...)
	b = append(b, t.Secret[:]...)
	b = append(b, t.CAFingerprint[:]...)
	return Prefix + base64.RawURLEncoding.EncodeToString(b)
}

// IDString is the hex token ID, safe to log and store.
func (t Token) IDString() string { return hex.EncodeToString(t.ID[:]) }

// SecretHash is the SHA-256 of the secret; the controller stores only this.
func (t Token) SecretHash() [32]byte { return sha256.Sum256(t.Secret[:]) }

// MatchesCA reports whether caDER is the certificate the token pins.
func (t Token) MatchesCA(caDER []byte) bool {
	fp := sha256.Sum256(caDER)
	return subtle.ConstantTimeCompare(fp[:], t.CAFingerprint[:]) == 1
}

// Decode parses a token string. Surrounding white space is ignored.
func Decode(s string) (Token, error) {
	var t Token
	s = strings.TrimSpace(s)
	if !strings.HasPrefix(s, Prefix) {
		return t, fmt.Errorf("%w: want a string starting with %q (as printed by `segmesh token create`)", ErrMalformed, Prefix)
	}
	b, err := base64.RawURLEncoding.DecodeString(s[len(Prefix):])
	if err != nil {
		return t, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if len(b) != idLen+secretLen+fpLen {
		return t, fmt.Errorf("%w: %d bytes, want %d (token truncated?)", ErrMalformed, len(b), idLen+secretLen+fpLen)
	}
	copy(t.ID[:], b[:idLen])
	copy(t.Secret[:], b[idLen:idLen+secretLen])
	copy(t.CAFingerprint[:], b[idLen+secretLen:])
	return t, nil
}
