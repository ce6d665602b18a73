// Package etcdstore implements store.Store on an etcd cluster, so that several
// controllers can share one state.
//
// Every invariant of the store (policy revisions without a gap, one owner per
// overlay address and public key, a gapless audit chain) is kept by etcd
// transactions, not by in-process locks: Update runs its function against a
// transaction that reads at one etcd revision and buffers its writes, then commits
// them with one etcd Txn guarded by compares on everything it read. When another
// writer got there first the compares fail and the function runs again (see
// Store.Update).
//
// Keys live under Config.Prefix, one key per record, with the same JSON encodings
// as the bbolt store:
//
//	PREFIX nodes/NAME               store.Node
//	PREFIX tokens/ID                store.Token
//	PREFIX operators/NAME           store.Operator
//	PREFIX operator-tokens/HEX      operator name (index by token hash)
//	PREFIX pubkeys/HEX              node name (index by WireGuard public key)
//	PREFIX policies/%016x           store.Policy (revision, zero-padded hex)
//	PREFIX ipam/HEX                 node name holding the overlay address
//	PREFIX quarantine/HEX           RFC 3339 time the address is free again
//	PREFIX meta/KEY                 raw bytes (audit-head is "SEQ HASH")
//	PREFIX audit/%016x              store.AuditEntry (sequence number)
//	PREFIX version/TABLE            bumped by every write to TABLE
//
// HEX is the lower-case hex of the raw bytes (netip.Addr.AsSlice for addresses).
package etcdstore

import (
	"context"
	"crypto/cipher"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"

	"segmesh/controller/store"
)

// Defaults of Config.
const (
	DefaultPrefix         = "/segmesh/"
	DefaultDialTimeout    = 5 * time.Second
	DefaultRequestTimeout = 10 * time.Second
	// DefaultMaxTxnOps is etcd's default --max-txn-ops.
	DefaultMaxTxnOps = 128
	// DefaultMaxAttempts bounds how often Update runs its function.
	DefaultMaxAttempts = 32
)

// ErrConflict is returned (wrapped) by Update when every attempt lost a race
// against another writer.
var ErrConflict = errors.New("etcd transaction kept conflicting with other writers")

// ErrUnavailable is wrapped by the errors of View and Update when etcd did not
// answer a request: no endpoint reachable, the member reached has no leader (it
// is cut off from the quorum), or the request timed out. Whether a commit that
// failed so took effect is unknown. Another controller replica may succeed.
var ErrUnavailable = errors.New("etcd unavailable")

// ErrTooLarge is returned (wrapped) by Update when the transaction needs more
// compares or more writes than one etcd Txn may hold (Config.MaxTxnOps). Nothing is
// written.
var ErrTooLarge = errors.New("transaction too large for one etcd Txn")

// Config configures Open.
type Config struct {
	// Endpoints are the etcd client URLs, e.g. "https://10.0.0.1:2379"; at least one.
	Endpoints []string
	// TLS configures client TLS (nil: plain connections).
	TLS *tls.Config
	// Prefix is prepended to every key; default DefaultPrefix. It should end in "/".
	Prefix string
	// DialTimeout bounds connecting and the first status check; default DefaultDialTimeout.
	DialTimeout time.Duration
	// RequestTimeout bounds each etcd request; default DefaultRequestTimeout.
	RequestTimeout time.Duration
	// MaxTxnOps is the cluster's --max-txn-ops; default DefaultMaxTxnOps.
	MaxTxnOps int
	// MaxAttempts bounds how often Update runs its function; default DefaultMaxAttempts.
	MaxAttempts int
	// Logger receives retries and errors; default slog.Default().
	Logger *slog.Logger
	// SecretKey, when set (32 bytes), seals every meta value (Tx.Meta and
	// Tx.PutMeta: the gossip key, the CA key, ...) with AES-256-GCM, the full etcd
	// key as additional data, so that a reader of etcd (a backup, a member's data
	// directory) learns none of them and cannot move one to another key. Every
	// controller sharing the cluster must be given the same key: Open refuses a
	// key that does not open the cluster's check value (ErrSecretKey), and a
	// missing key when the cluster has sealed values.
	SecretKey []byte
}

// ErrSecretKey is returned (wrapped) by Open when Config.SecretKey is not the
// key the cluster's secrets are sealed with, or is missing while they are sealed.
var ErrSecretKey = errors.New("secret key does not match the cluster's")

// Store is a store.Store on etcd. It is safe for concurrent use.
type Store struct {
	cli  *clientv3.Client
	cfg  Config
	aead cipher.AEAD // nil without Config.SecretKey
	// writeMu lets one Update of this Store run at a time (see Update); it
	// guards lockSession and locked, the update lock's session and the lock
	// while the current Update holds it.
	writeMu     sync.Mutex
	lockSession *concurrency.Session
	locked      *concurrency.Mutex
	log         *slog.Logger
	ctx         context.Context
	cancel      context.CancelFunc
}

var _ store.Store = (*Store)(nil)

// Open connects to the etcd cluster at cfg.Endpoints and checks that one endpoint
// answers within cfg.DialTimeout. Errors name the endpoints ("etcd at URL: ...").
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("opening etcd store: no endpoints")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.MaxTxnOps <= 0 {
		cfg.MaxTxnOps = DefaultMaxTxnOps
	}
	if cfg.MaxAttempts <= 0 {
		cfg.MaxAttempts = DefaultMaxAttempts
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	where := "etcd at " + strings.Join(cfg.Endpoints, ",")
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		TLS:         cfg.TLS,
		DialTimeout: cfg.DialTimeout,
		// gRPC pings find a member that stopped answering (a partition drops its
		// packets) in about 2 s, so that requests move to another endpoint
		// instead of waiting for their timeout.
		DialKeepAliveTime:    time.Second,
		DialKeepAliveTimeout: time.Second,
		Logger:               zap.NewNop(), // its errors come back to the caller; its retry chatter stays out of the logs
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", where, err)
	}
	var lastErr error
	for _, ep := range cfg.Endpoints {
		sctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
		_, lastErr = cli.Status(sctx, ep)
		cancel()
		if lastErr == nil {
			break
		}
		lastErr = fmt.Errorf("etcd at %s: %w", ep, lastErr)
	}
	if lastErr != nil {
		_ = cli.Close()
		return nil, fmt.Errorf("opening etcd store: no endpoint answered: %w", lastErr)
	}
	sctx, cancel := context.WithCancel(context.Background())
	s := &Store{cli: cli, cfg: cfg, log: cfg.Logger, ctx: sctx, cancel: cancel}
	if err := s.initSecret(); err != nil {
		_ = s.Close()
		return nil, fmt.Errorf("opening etcd store: %w", err)
	}
	return s, nil
}

// Client returns the store's etcd client, for the controller's leases, watches
// and elections on the same cluster. The store owns it: Close closes it.
func (s *Store) Client() *clientv3.Client { return s.cli }

// Prefix returns Config.Prefix (with its default applied).
func (s *Store) Prefix() string { return s.cfg.Prefix }

// String describes the store for operators: "etcd URL,URL (prefix /segmesh/)".
func (s *Store) String() string {
	return fmt.Sprintf("etcd %s (prefix %s)", strings.Join(s.cfg.Endpoints, ","), s.cfg.Prefix)
}

// escalateAfter is how many lost races make Update take the update lock.
const escalateAfter = 4

// lock takes the cluster-wide update lock for the current Update (under
// writeMu); on failure (logged) Update goes on without it.
func (s *Store) lock() {
	if s.lockSession == nil {
		sess, err := concurrency.NewSession(s.cli, concurrency.WithTTL(10), concurrency.WithContext(s.ctx))
		if err != nil {
			s.log.Warn("etcd store: no session for the update lock; retrying without it", "err", err)
			return
		}
		s.lockSession = sess
	}
	select {
	case <-s.lockSession.Done():
		s.lockSession = nil
		s.lock()
		return
	default:
	}
	m := concurrency.NewMutex(s.lockSession, s.cfg.Prefix+"locks/update")
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.RequestTimeout)
	defer cancel()
	if err := m.Lock(ctx); err != nil {
		s.log.Warn("etcd store: taking the update lock; retrying without it", "err", err)
		return
	}
	s.locked = m
}

// unlock releases the update lock if the current Update took it.
func (s *Store) unlock() {
	if s.locked == nil {
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.RequestTimeout)
	defer cancel()
	if err := s.locked.Unlock(ctx); err != nil {
		s.log.Warn("etcd store: releasing the update lock (its lease ends it)", "err", err)
	}
	s.locked = nil
}

// Close implements store.Store: it cancels requests in flight and closes the client.
func (s *Store) Close() error {
	s.cancel()
	s.writeMu.Lock()
	if s.lockSession != nil {
		s.lockSession.Orphan()
	}
	s.writeMu.Unlock()
	return s.cli.Close()
}

// View implements store.Store: fn reads at one etcd revision (a snapshot; the
// first read is linearizable and fixes it). Write methods fail. fn runs once; a
// read fails (rpctypes.ErrCompacted) when etcd compacts that revision away while
// fn runs.
func (s *Store) View(fn func(store.Tx) error) error {
	return fn(s.newTx(false))
}

// Update implements store.Store. fn runs against a transaction that reads at one
// etcd revision and buffers its writes (reads see the transaction's own writes).
// When fn returns nil, the writes are committed with one etcd Txn that holds only
// if nothing fn read has changed since: every key read must have the same
// ModRevision (absent keys: still absent) and every table fn listed (Nodes,
// Tokens, Operators, PolicyRevisions, LatestPolicy, Audit...) must have the same
// version. When that fails, or when etcd compacted the snapshot's revision away
// while fn read, fn RUNS AGAIN from scratch on a fresh snapshot, after
// a short jittered backoff, up to Config.MaxAttempts times; then Update returns an
// error wrapping ErrConflict. So fn may run several times and must have no effect
// outside the transaction it cannot repeat. When fn returns an error nothing is
// written and that error is returned (not retried).
//
// Limits: one etcd Txn holds at most Config.MaxTxnOps (128) compares and as many
// writes. Writes count one per record written plus one per table written (its
// version key), so 127 records of one table fit. Compares count one per table
// listed plus one per key read in a table that was not listed (listing a table
// covers every key of it). A transaction beyond that fails with ErrTooLarge
// before anything is sent, nothing is written, and it is not retried; so does one
// etcd refuses as too many operations or larger than its --max-request-bytes
// (1.5 MiB by default). Callers that need more must split the work into several
// Updates.
//
// Updates of one Store run one at a time, like bbolt's: every write
// transaction appends to the audit chain, so concurrent ones of one process
// would only conflict with each other; optimistic retries are left for the
// races between controller replicas.
//
// A writer that lost escalateAfter races in a row takes an etcd lock
// (concurrency.Mutex on PREFIX locks/update) for its further attempts, so
// that a slow replica is not starved by faster ones: the other replicas'
// escalated writers queue on it, and only their first attempts still race.
func (s *Store) Update(fn func(store.Tx) error) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	backoff := time.Millisecond
	defer s.unlock()
	for attempt := 1; ; attempt++ {
		if attempt == escalateAfter+1 {
			s.lock()
		}
		t := s.newTx(true)
		if err := fn(t); err != nil && !t.compacted {
			return err
		}
		if !t.compacted {
			ok, err := t.commit()
			if err != nil {
				return err
			}
			if ok {
				return nil
			}
		}
		if attempt >= s.cfg.MaxAttempts {
			return fmt.Errorf("etcd store: %d attempts: %w", attempt, ErrConflict)
		}
		s.log.Debug("etcd store: transaction conflicted, retrying", "attempt", attempt)
		wait := backoff/2 + rand.N(backoff)
		select {
		case <-time.After(wait):
		case <-s.ctx.Done():
			return fmt.Errorf("etcd store: %w", s.ctx.Err())
		}
		backoff = min(2*backoff, 100*time.Millisecond)
	}
}
