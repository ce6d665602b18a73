// Package store keeps the controller's durable state: nodes, join tokens, policy
// revisions, metadata (gossip key, IPAM cursors), the overlay address index and
// the audit log.
//
// Callers work through the Store and Tx interfaces so that the embedded bbolt
// implementation (Open) can later be replaced by one backed by etcd. Every
// multi-step change runs inside one Update call and is atomic: either all of it is
// committed or none of it.
package store

import (
	"errors"
	"net/netip"
	"time"
)

// ErrAddressInUse is returned (wrapped) by Tx.ClaimAddress when the address already
// belongs to another node.
var ErrAddressInUse = errors.New("overlay address already in use")

// ErrRevision is returned (wrapped) by Tx.PutPolicy when the revision is not exactly
// one more than the latest stored revision.
var ErrRevision = errors.New("policy revision out of order")

// Node is one enrolled host.
type Node struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
	// Addresses are the node's overlay addresses, one per overlay prefix.
	Addresses []netip.Addr `json:"addresses"`
	// PublicKey is the node's 32-byte WireGuard public key.
	PublicKey []byte `json:"public_key"`
	// IdentityKey is the PKIX DER of the node's ECDSA P-256 TLS client public key
	// (from its enrollment CSR), which signs its gossip endpoint claims; nil in
	// records written before it was kept, or for a key of another type.
	IdentityKey []byte `json:"identity_key,omitempty"`
	// PrevIdentityKey is the identity key before the last certificate renewal,
	// kept until the node first authenticates with the new one: a certificate for
	// it may only renew again (an agent that crashed before it stored the renewed
	// certificate).
	PrevIdentityKey []byte `json:"prev_identity_key,omitempty"`
	// PrevIdentityUntil ends the grace of PrevIdentityKey.
	PrevIdentityUntil time.Time `json:"prev_identity_until,omitzero"`
	// Endpoint is the underlay "ip:port" of the node's WireGuard; empty when unknown.
	Endpoint string `json:"endpoint,omitempty"`
	// Candidates are the node's endpoint candidates, best first: the local
	// addresses its agent advertised, the one the controller observed, then its
	// STUN mappings (see Candidate); nil when none is known.
	Candidates []Candidate `json:"candidates,omitempty"`
	Hostname   string      `json:"hostname,omitempty"`
	EnrolledAt time.Time   `json:"enrolled_at"`
	// TokenID is the hex ID of the join token the node last enrolled with.
	TokenID string `json:"token_id"`
	// RevokedAt is when an operator revoked the node (zero: active); RevokedBy
	// names the operator credential.
	RevokedAt time.Time `json:"revoked_at,omitzero"`
	RevokedBy string    `json:"revoked_by,omitempty"`
	// CertNotAfter is the expiry of the node's current client certificate.
	CertNotAfter time.Time `json:"cert_not_after,omitzero"`
	// KeyRotation is the generation of the last WireGuard key rotation an
	// operator requested; KeyRotationDone the last one the agent completed.
	KeyRotation     uint64 `json:"key_rotation,omitempty"`
	KeyRotationDone uint64 `json:"key_rotation_done,omitempty"`
}

// Candidate is one endpoint candidate of a node.
type Candidate struct {
	// Endpoint is an underlay "ip:port".
	Endpoint string `json:"endpoint"`
	// Kind is "local", "observed" or "stun" (segmeshv1.Candidate.kind).
	Kind string `json:"kind"`
}

// Revoked reports whether an operator revoked the node.
func (n Node) Revoked() bool { return !n.RevokedAt.IsZero() }

// Token is a join token as stored: never the secret, only its SHA-256.
type Token struct {
	ID         string            `json:"id"`
	SecretHash []byte            `json:"secret_hash"`
	Labels     map[string]string `json:"labels,omitempty"`
	CreatedAt  time.Time         `json:"created_at"`
	ExpiresAt  time.Time         `json:"expires_at"`
	Reusable   bool              `json:"reusable"`
	// UsedBy and UsedAt record the first node that enrolled with the token.
	UsedBy string    `json:"used_by,omitempty"`
	UsedAt time.Time `json:"used_at,omitzero"`
	// Uses counts successful enrollments with the token.
	Uses int `json:"uses,omitempty"`
	// Creator names the operator credential that created the token.
	Creator string `json:"creator,omitempty"`
	// Name, when set, is the only node name the token enrolls.
	Name string `json:"name,omitempty"`
	// RevokedAt is when an operator revoked the token (zero: not revoked).
	RevokedAt time.Time `json:"revoked_at,omitzero"`
}

// Operator roles.
const (
	RoleAdmin  = "admin"
	RoleViewer = "viewer"
)

// Operator is an operator credential as stored: never the bearer token, only its
// SHA-256.
type Operator struct {
	Name      string    `json:"name"`
	Role      string    `json:"role"`
	TokenHash []byte    `json:"token_hash"`
	CreatedAt time.Time `json:"created_at"`
	CreatedBy string    `json:"created_by,omitempty"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
}

// Policy is one stored policy revision.
type Policy struct {
	Revision  uint64    `json:"revision"`
	Filename  string    `json:"filename"`
	Content   []byte    `json:"content"`
	AppliedAt time.Time `json:"applied_at"`
	AppliedBy string    `json:"applied_by"`
	// RestoredFrom is, for a rollback, the revision whose content this one restored.
	RestoredFrom uint64 `json:"restored_from,omitempty"`
}

// AuditEntry records who changed what. Seq, PrevHash and Hash are set by
// Tx.AppendAudit: Seq counts from 1, PrevHash is the Hash of record Seq-1 ("" for
// the first) and Hash the hex SHA-256 of the record's canonical encoding (see
// AuditHash), so that editing or removing a record breaks the chain.
type AuditEntry struct {
	Seq    uint64    `json:"seq"`
	Time   time.Time `json:"time"`
	Actor  string    `json:"actor"`
	Action string    `json:"action"`
	// Object is what the action concerns, e.g. "node:web-1", "token:ab12".
	Object string `json:"object,omitempty"`
	// Result is "ok" or "refused: REASON".
	Result   string `json:"result,omitempty"`
	Detail   string `json:"detail"`
	PrevHash string `json:"prev_hash"`
	Hash     string `json:"hash"`
}

// Store is a transactional state store. Close releases it; a Store must not be used
// after Close.
type Store interface {
	// View runs fn in a read-only transaction.
	View(fn func(Tx) error) error
	// Update runs fn in a read-write transaction and commits it when fn returns nil;
	// when fn returns an error nothing fn wrote is kept and the error is returned.
	Update(fn func(Tx) error) error
	Close() error
}

// Tx is one transaction. Write methods fail in a View transaction. Lookups report a
// missing record with ok == false, not with an error.
type Tx interface {
	Node(name string) (n Node, ok bool, err error)
	// Nodes returns every node sorted by name.
	Nodes() ([]Node, error)
	// NodeByPublicKey returns the name of the node whose WireGuard public key is key.
	NodeByPublicKey(key []byte) (name string, ok bool, err error)
	// PutNode creates or replaces the node named n.Name.
	PutNode(n Node) error
	// DeleteNode removes the node, its public key index entry and its address
	// claims; each of its addresses stays quarantined (see AddressQuarantine) until
	// quarantineUntil. Deleting a missing node is a no-op.
	DeleteNode(name string, quarantineUntil time.Time) error

	Token(id string) (t Token, ok bool, err error)
	PutToken(t Token) error
	// Tokens returns every token sorted by ID.
	Tokens() ([]Token, error)

	Operator(name string) (o Operator, ok bool, err error)
	// Operators returns every operator credential sorted by name.
	Operators() ([]Operator, error)
	// OperatorByTokenHash returns the operator whose TokenHash is hash.
	OperatorByTokenHash(hash []byte) (o Operator, ok bool, err error)
	// PutOperator creates or replaces the operator named o.Name.
	PutOperator(o Operator) error

	// Policy returns revision rev (rev >= 1).
	Policy(rev uint64) (p Policy, ok bool, err error)
	// LatestPolicy returns the highest stored revision.
	LatestPolicy() (p Policy, ok bool, err error)
	// PolicyRevisions returns the numbers of every stored revision, ascending,
	// without decoding them (a revision whose record does not decode is listed).
	PolicyRevisions() ([]uint64, error)
	// PutPolicy stores p; p.Revision must be the latest revision plus one (1 for
	// the first), else it returns an error wrapping ErrRevision. A latest record
	// that does not decode still counts as stored.
	PutPolicy(p Policy) error

	// AddressOwner returns the node that holds overlay address a.
	AddressOwner(a netip.Addr) (node string, ok bool, err error)
	// ClaimAddress records a as held by node; it returns an error wrapping
	// ErrAddressInUse when another node holds it (claiming again for the same node
	// is a no-op).
	ClaimAddress(a netip.Addr, node string) error
	// AddressQuarantine returns until when a released address stays reserved.
	AddressQuarantine(a netip.Addr) (until time.Time, ok bool, err error)

	// Meta returns the value stored under key, nil when absent.
	Meta(key string) ([]byte, error)
	PutMeta(key string, value []byte) error

	// AppendAudit sets e.Seq, e.PrevHash and e.Hash and appends e.
	AppendAudit(e AuditEntry) error
	// Audit returns the audit log, oldest first.
	Audit() ([]AuditEntry, error)
	// AuditHead returns the sequence number and hash of the last appended record
	// as recorded at append time (0, "" for an empty log).
	AuditHead() (seq uint64, hash string, err error)
}
