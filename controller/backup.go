package controller

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/controller/pki"
	"segmesh/controller/store"
)

// Online backup of the store: the operator API side (OperatorService.Backup) and
// the client side used by "segmesh-controller backup" (Backup).

// backupChunkSize is the size of the BackupChunk messages a backup is sent in.
const backupChunkSize = 256 << 10

// backupStore is a store that can write a consistent copy of itself
// (*store.Bolt).
type backupStore interface {
	Backup(w io.Writer) (int64, error)
}

// Backup implements OperatorService.Backup (admin only, see withOperatorAuth):
// it streams a consistent copy of the bbolt store in chunks of at most
// backupChunkSize bytes. The copy is first spooled to an unlinked temporary file
// in the data directory, so the store's read transaction lasts as long as a local
// write and not as long as a slow client takes to read. Unimplemented when the
// store cannot be copied this way; the backup is recorded in the audit log.
func (s *operatorService) Backup(ctx context.Context, _ *connect.Request[segmeshv1.BackupRequest], stream *connect.ServerStream[segmeshv1.BackupChunk]) error {
	c := s.c
	bs, ok := c.store.(backupStore)
	if !ok {
		return connect.NewError(connect.CodeUnimplemented, errors.New("this controller's store has no online backup; back up its own data instead"))
	}
	spool, err := os.CreateTemp(c.opts.DataDir, ".backup-*.tmp") // mode 0600
	if err != nil {
		return connect.NewError(connect.CodeInternal, fmt.Errorf("creating the backup spool file: %w", err))
	}
	defer spool.Close()
	// Unlinked at once: the copy holds every secret of the store, and nothing
	// should be left behind if the controller dies during the backup.
	if err := os.Remove(spool.Name()); err != nil {
		return connect.NewError(connect.CodeInternal, fmt.Errorf("unlinking the backup spool file: %w", err))
	}
	n, err := bs.Backup(spool)
	if err != nil {
		return connect.NewError(connect.CodeInternal, err)
	}
	if _, err := spool.Seek(0, io.SeekStart); err != nil {
		return connect.NewError(connect.CodeInternal, fmt.Errorf("rewinding the backup spool file: %w", err))
	}
	now := c.now()
	err = c.store.Update(func(tx store.Tx) error {
		return tx.AppendAudit(store.AuditEntry{Time: now, Actor: actorOf(ctx), Action: "store.backup", Object: "store", Result: "ok", Detail: fmt.Sprintf("%d bytes", n)})
	})
	if err != nil {
		return connect.NewError(connect.CodeInternal, fmt.Errorf("recording the backup in the audit log: %w", err))
	}
	buf := make([]byte, backupChunkSize)
	for sent := int64(0); sent < n; {
		k, err := io.ReadFull(spool, buf[:min(int64(len(buf)), n-sent)])
		if err != nil {
			return connect.NewError(connect.CodeInternal, fmt.Errorf("reading the backup spool file at byte %d of %d: %w", sent, n, err))
		}
		if err := stream.Send(&segmeshv1.BackupChunk{Data: buf[:k]}); err != nil {
			return err
		}
		sent += int64(k)
	}
	c.log.Info("store backup sent", "bytes", n, "operator", actorOf(ctx))
	return nil
}

// BackupOptions configures Backup.
type BackupOptions struct {
	// DataDir is the controller's data directory; Backup reads controller.db,
	// ca.crt and operator.json in it. Required.
	DataDir string
	// File is where the copy is written: atomically replaced, mode 0600. It must
	// not be the store itself. Required.
	File string
	// LockWait is how long to wait for the store's file lock before concluding
	// that a controller runs on DataDir; default 200 ms.
	LockWait time.Duration
}

// BackupResult describes a backup that Backup wrote and verified.
type BackupResult struct {
	File  string
	Bytes int64
	// Online is true when the copy came from the running controller over its
	// operator API, false when it was read from the store file directly.
	Online  bool
	Summary store.Summary
}

// Backup writes a consistent copy of the controller store of opts.DataDir to
// opts.File. When a controller runs on the directory (it holds the store's file
// lock), the copy comes from it through OperatorService.Backup, authenticated with
// the admin credential DataDir/operator.json; otherwise it is read from the store
// file, opened read-only. The copy is written to a temporary file next to
// opts.File, checked like a store at controller start (bbolt consistency check,
// owner = the data directory's CA), and only then renamed over opts.File; on any
// error opts.File is left as it was.
func Backup(ctx context.Context, opts BackupOptions) (BackupResult, error) {
	if opts.DataDir == "" || opts.File == "" {
		return BackupResult{}, errors.New("backup: the data directory and the backup file are required")
	}
	if opts.LockWait <= 0 {
		opts.LockWait = 200 * time.Millisecond
	}
	src := filepath.Join(opts.DataDir, StoreFile)
	caPath := filepath.Join(opts.DataDir, pki.CACertFile)
	if err := notTheStore(src, opts.File); err != nil {
		return BackupResult{}, err
	}
	if _, err := os.Stat(src); err != nil {
		return BackupResult{}, fmt.Errorf("backup: no store in %s (%w); is it the controller's --data-dir?", opts.DataDir, err)
	}

	tmp, err := os.CreateTemp(filepath.Dir(opts.File), "."+filepath.Base(opts.File)+".tmp*")
	if err != nil {
		return BackupResult{}, fmt.Errorf("backup: creating a temporary file next to %s: %w", opts.File, err)
	}
	tmpName := tmp.Name()
	defer os.Remove(tmpName) // fails harmlessly after the rename
	defer tmp.Close()
	if err := tmp.Chmod(0o600); err != nil {
		return BackupResult{}, fmt.Errorf("backup: %w", err)
	}

	res := BackupResult{File: opts.File}
	st, err := store.OpenWith(src, store.OpenOptions{CACertPath: caPath, ReadOnly: true, LockTimeout: opts.LockWait})
	switch {
	case err == nil:
		res.Bytes, err = st.Backup(tmp)
		if cerr := st.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("closing store %s: %w", src, cerr)
		}
	case errors.Is(err, store.ErrLocked):
		res.Online = true
		res.Bytes, err = backupOnline(ctx, filepath.Join(opts.DataDir, OperatorFile), tmp)
	default:
		return BackupResult{}, fmt.Errorf("backup: %w", err)
	}
	if err != nil {
		return BackupResult{}, fmt.Errorf("backup: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return BackupResult{}, fmt.Errorf("backup: writing %s: %w", tmpName, err)
	}
	if err := tmp.Close(); err != nil {
		return BackupResult{}, fmt.Errorf("backup: writing %s: %w", tmpName, err)
	}

	copied, err := store.OpenWith(tmpName, store.OpenOptions{CACertPath: caPath, ReadOnly: true})
	if err != nil {
		return BackupResult{}, fmt.Errorf("backup: the copy failed its check, %s was not written: %w", opts.File, err)
	}
	res.Summary, err = copied.Summary()
	if cerr := copied.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return BackupResult{}, fmt.Errorf("backup: reading the copy: %w", err)
	}
	if err := os.Rename(tmpName, opts.File); err != nil {
		return BackupResult{}, fmt.Errorf("backup: %w", err)
	}
	if d, err := os.Open(filepath.Dir(opts.File)); err == nil {
		_ = d.Sync() // make the rename durable
		_ = d.Close()
	}
	return res, nil
}

// notTheStore refuses a backup file that is the store itself: renaming the copy
// over the live store would pull the file from under a running controller.
func notTheStore(src, file string) error {
	absSrc, err1 := filepath.Abs(src)
	absFile, err2 := filepath.Abs(file)
	same := err1 == nil && err2 == nil && absSrc == absFile
	if a, err := os.Stat(src); err == nil {
		if b, err := os.Stat(file); err == nil && os.SameFile(a, b) {
			same = true
		}
	}
	if same {
		return fmt.Errorf("backup: %s is the store itself; write the backup to another file, ideally on another disk", file)
	}
	return nil
}

// backupOnline receives a backup from the controller named in the operator
// credential file credPath and writes it to w; it returns the bytes written.
func backupOnline(ctx context.Context, credPath string, w io.Writer) (int64, error) {
	raw, err := os.ReadFile(credPath)
	if err != nil {
		return 0, fmt.Errorf("the store is locked, so a controller runs on this data directory, but its operator credential cannot be read: %w", err)
	}
	var cred OperatorCredential
	if err := json.Unmarshal(raw, &cred); err != nil {
		return 0, fmt.Errorf("parsing operator credential %s: %w", credPath, err)
	}
	if cred.Controller == "" || cred.Token == "" {
		return 0, fmt.Errorf("operator credential %s lacks the controller URL or the token", credPath)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(cred.CAPEM)) {
		return 0, fmt.Errorf("operator credential %s: ca_pem holds no certificate", credPath)
	}
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool, ServerName: pki.ServerName, MinVersion: tls.VersionTLS12},
		ForceAttemptHTTP2: true,
	}
	defer tr.CloseIdleConnections()
	client := segmeshv1connect.NewOperatorServiceClient(&http.Client{Transport: tr}, cred.Controller)
	req := connect.NewRequest(&segmeshv1.BackupRequest{})
	req.Header().Set("Authorization", "Bearer "+cred.Token)
	stream, err := client.Backup(ctx, req)
	if err != nil {
		return 0, fmt.Errorf("asking the controller at %s for a backup: %w", cred.Controller, err)
	}
	defer stream.Close()
	var n int64
	for stream.Receive() {
		k, err := w.Write(stream.Msg().GetData())
		n += int64(k)
		if err != nil {
			return n, fmt.Errorf("writing the backup: %w", err)
		}
	}
	if err := stream.Err(); err != nil {
		return n, fmt.Errorf("receiving the backup from the controller at %s (with the credential in %s): %w", cred.Controller, credPath, err)
	}
	if n == 0 {
		return 0, fmt.Errorf("the controller at %s sent an empty backup", cred.Controller)
	}
	return n, nil
}
