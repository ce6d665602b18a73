package controller

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"segmesh/controller/pki"
	"segmesh/controller/store"
	"segmesh/controller/store/etcdstore"
)

// MigrateOptions configures Migrate.
type MigrateOptions struct {
	// DataDir is the data directory of a stopped controller on the bbolt store:
	// it holds controller.db, ca.crt, ca.key and (usually) operator.json.
	DataDir string
	// Etcd is the etcd store to fill: its prefix must hold no record yet. Give
	// it the SecretKey every replica will use.
	Etcd etcdstore.Config
	// Logger receives progress; default slog.Default().
	Logger *slog.Logger
}

// MigrateResult says what Migrate copied.
type MigrateResult struct {
	// Store describes the etcd store ("etcd URL,... (prefix /segmesh/)").
	Store string
	// Prefix is the etcd key prefix filled.
	Prefix string
	// Stats counts the records copied per table.
	Stats etcdstore.ImportStats
	// CAFingerprint is the lower-case hex SHA-256 of the CA certificate's DER
	// (the value join tokens pin), now the fleet's CA.
	CAFingerprint string
	// AdminOperator names the operator whose token (DATA_DIR/operator.json)
	// became the fleet's admin token, which replicas write to their own
	// operator.json; "" when operator.json is missing or its token is no live
	// operator of the store.
	AdminOperator string
}

// Migrate moves the state of a bbolt controller into etcd, so that replicas
// started with --store etcd serve it: every record of DATA_DIR/controller.db
// (nodes, join tokens, operators, policy revisions, IPAM, quarantine, meta
// values such as the gossip key, and the audit log) is copied raw
// (etcdstore.Store.Import, which verifies the copy), then the secrets a replica
// needs are stored sealed: the CA (DATA_DIR/ca.crt, ca.key) and, when the token
// of DATA_DIR/operator.json is a live operator of the store, that token as the
// fleet's admin token. The bbolt store is opened read-only and left unchanged.
//
// Errors: the store file is locked (a controller runs on DATA_DIR: stop it
// first), the data directory holds no CA or one that is not the store's, the
// etcd prefix is not empty, or etcd fails. Nothing is half-applied unnoticed:
// the prefix is marked (etcdstore.MigratingKey) from before the first record
// is written until the last secret is, controllers refuse to start on a marked
// prefix, and an error after the first write says how to clear the prefix
// (etcdctl del --prefix PREFIX) before running Migrate again. ctx bounds the
// connection to etcd and cancels the copy.
func Migrate(ctx context.Context, opts MigrateOptions) (MigrateResult, error) {
	var res MigrateResult
	if opts.DataDir == "" {
		return res, errors.New("migrate: no data directory given")
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	dir := opts.DataDir
	certPath, keyPath := filepath.Join(dir, pki.CACertFile), filepath.Join(dir, pki.CAKeyFile)
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return res, fmt.Errorf("migrate: reading the controller CA: %w (is %s the data directory of a controller?)", err, dir)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return res, fmt.Errorf("migrate: reading the controller CA key: %w", err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return res, fmt.Errorf("migrate: %s and %s are not a certificate and its key: %w", certPath, keyPath, err)
	}
	res.CAFingerprint = store.CAFingerprint(pair.Certificate[0])

	dbPath := filepath.Join(dir, StoreFile)
	src, err := store.OpenWith(dbPath, store.OpenOptions{ReadOnly: true, CACertPath: certPath})
	if errors.Is(err, store.ErrLocked) {
		return res, fmt.Errorf("migrate reads %s directly and a running controller holds it: stop the controller on %s first: %w", dbPath, dir, err)
	}
	if err != nil {
		return res, fmt.Errorf("migrate: %w", err)
	}
	defer src.Close()

	adminToken, err := migrateAdminToken(src, filepath.Join(dir, OperatorFile), &res, log)
	if err != nil {
		return res, err
	}

	cfg := opts.Etcd
	if cfg.Logger == nil {
		cfg.Logger = log
	}
	dst, err := etcdstore.Open(ctx, cfg)
	if err != nil {
		return res, fmt.Errorf("migrate: %w", err)
	}
	var closeOnce sync.Once
	closeDst := func() { closeOnce.Do(func() { _ = dst.Close() }) }
	defer closeDst()
	defer context.AfterFunc(ctx, closeDst)()
	res.Store, res.Prefix = dst.String(), dst.Prefix()

	log.Info("migrate: copying the store", "from", dbPath, "to", res.Store)
	if res.Stats, err = dst.Import(src.Walk); err != nil {
		return res, fmt.Errorf("migrate: %w", err)
	}
	incomplete := func(what string, err error) error {
		return fmt.Errorf("migrate: every record was copied into %s but %s failed: %w; the prefix stays marked incomplete "+
			"(controllers refuse to start on it): clear it with \"etcdctl del --prefix %s\" and run migrate again",
			res.Store, what, err, res.Prefix)
	}
	err = dst.Update(func(tx store.Tx) error {
		for _, k := range []string{metaCACert, metaCAKey, metaAdminToken} {
			have, err := tx.Meta(k)
			if err != nil {
				return err
			}
			if have != nil {
				return fmt.Errorf("meta %s is already set (another controller wrote to the prefix meanwhile?)", k)
			}
		}
		if err := tx.PutMeta(metaCACert, certPEM); err != nil {
			return err
		}
		if err := tx.PutMeta(metaCAKey, keyPEM); err != nil {
			return err
		}
		if adminToken != "" {
			return tx.PutMeta(metaAdminToken, []byte(adminToken))
		}
		return nil
	})
	if err != nil {
		return res, incomplete("storing the CA and the admin token", err)
	}
	if err := dst.FinishImport(); err != nil {
		return res, incomplete("removing the migrating marker", err)
	}
	log.Info("migrate: done", "records", res.Stats.Total(), "ca_sha256", res.CAFingerprint)
	return res, nil
}

// migrateAdminToken returns the token of the operator credential file path when
// it is a live operator of src (and sets res.AdminOperator), else "".
func migrateAdminToken(src store.Store, path string, res *MigrateResult, log *slog.Logger) (string, error) {
	raw, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		log.Warn("migrate: no operator credential file; replicas will create a new admin credential", "file", path)
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("migrate: reading the operator credential: %w", err)
	}
	var cred OperatorCredential
	if err := json.Unmarshal(raw, &cred); err != nil {
		return "", fmt.Errorf("migrate: parsing the operator credential %s: %w", path, err)
	}
	if cred.Token == "" {
		return "", fmt.Errorf("migrate: the operator credential %s has no token", path)
	}
	var op store.Operator
	var ok bool
	if err := src.View(func(tx store.Tx) error {
		op, ok, err = tx.OperatorByTokenHash(tokenHash(cred.Token))
		return err
	}); err != nil {
		return "", fmt.Errorf("migrate: looking up the operator of %s: %w", path, err)
	}
	if !ok || !op.RevokedAt.IsZero() {
		log.Warn("migrate: the token of the operator credential file is no live operator of the store; it is not shared with the replicas", "file", path)
		return "", nil
	}
	res.AdminOperator = op.Name
	return cred.Token, nil
}
