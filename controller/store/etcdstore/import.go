package etcdstore

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"segmesh/controller/store"
)

// MigratingKey is the meta key (PREFIX meta/migrating) Import creates before it
// writes any record and FinishImport deletes: while it exists the prefix holds a
// copy that is incomplete or not yet finished, and controllers refuse to start
// on it (see Store.Migrating).
const MigratingKey = "migrating"

// maxImportTxnBytes bounds the keys and values of one Import Txn: 1 MiB, below
// etcd's default --max-request-bytes (1.5 MiB) with room for the request's
// framing.
const maxImportTxnBytes = 1 << 20

// bboltOwnerKey is the bbolt store's owner record (store.Owner), which ties a
// bbolt file to its data directory's CA; it has no meaning in etcd.
const bboltOwnerKey = "owner"

// ImportStats says what Import copied.
type ImportStats struct {
	// Records counts the records written per table ("nodes", "tokens",
	// "operators", "operator-tokens", "pubkeys", "policies", "ipam",
	// "quarantine", "meta", "audit"); version keys are not counted.
	Records map[string]int
	// Skipped counts the source records deliberately not copied: bbolt's owner
	// meta record.
	Skipped int
	// Txns is the number of etcd transactions that wrote records and version
	// keys.
	Txns int
}

// Total returns the number of records written.
func (st ImportStats) Total() int {
	n := 0
	for _, c := range st.Records {
		n += c
	}
	return n
}

// Import copies the records walk yields into this store's prefix, raw, so that
// every record, audit hash, revision and index is byte-identical to the source
// (a bbolt store: pass (*store.Bolt).Walk). walk must call yield once per
// record with the bbolt bucket name as table and the raw key and value, and
// return yield's error; Import calls walk twice (first to check every record,
// then to write), so it must yield the same records each time (a store opened
// read-only, which no controller can write meanwhile).
//
// Keys are encoded as the store writes them: nodes, tokens, operators and meta
// keys as strings; pubkeys, ipam, quarantine and operator-tokens as the hex of
// the raw key; policies and audit keys (8-byte big-endian numbers) as %016x.
// Values are copied unchanged, except meta values, which are sealed like
// Tx.PutMeta seals them (Config.SecretKey), but for the audit head, copied raw
// as AppendAudit writes it; bbolt's "owner" record is not copied (counted in
// ImportStats.Skipped). A table this store does not know, a policy or audit key
// that is not 8 bytes, or a meta key the etcd store reserves ("secret-check",
// "migrating") is an error before anything is written.
//
// Import refuses (before writing anything) unless the prefix holds no record:
// nothing but the secret check value Open writes. It then creates the
// MigratingKey marker, guarded so that no key appeared under the prefix since
// it was found empty, and writes the records in Txns of at most
// Config.MaxTxnOps-1 puts and 1 MiB, each guarded by the marker (a prefix
// cleared meanwhile stops the import), then the version key of every table
// written. It then verifies the copy: a View lists the nodes, tokens,
// operators, policy revisions and audit log and compares their numbers with
// what was walked, the raw number of keys of every table too, and the audit
// chain must pass store.VerifyAudit.
//
// The marker stays after a successful Import: the caller adds what else belongs
// with the copy (the controller's CA) and then calls FinishImport. When Import
// fails after writing, the error says how many records were written and how to
// clear the prefix (etcdctl del --prefix PREFIX) before running it again.
func (s *Store) Import(walk func(yield func(table string, key, value []byte) error) error) (ImportStats, error) {
	stats := ImportStats{Records: map[string]int{}}
	// First pass: check every record, write nothing.
	if err := walk(func(table string, key, value []byte) error {
		_, _, _, err := s.importRecord(table, key, value)
		return err
	}); err != nil {
		return stats, fmt.Errorf("importing into %s: %w; nothing was written", s, err)
	}
	rev, err := s.checkEmpty()
	if err != nil {
		return stats, err
	}
	marker, err := s.createMarker(rev)
	if err != nil {
		return stats, err
	}
	markerKey := s.cfg.Prefix + tMeta + "/" + MigratingKey
	incomplete := func(err error) error {
		return fmt.Errorf("importing into %s: %w; %d records were written before the failure, so the prefix holds an incomplete copy marked %s "+
			"(controllers refuse to start on it): clear it with \"etcdctl del --prefix %s\" and run migrate again",
			s, err, stats.Total(), markerKey, s.cfg.Prefix)
	}

	var ops []clientv3.Op
	var opTables []string
	txnBytes := 0
	touched := map[string]bool{tMeta: true}
	flush := func() error {
		if len(ops) == 0 {
			return nil
		}
		if err := s.importTxn(markerKey, marker, ops); err != nil {
			return err
		}
		for _, t := range opTables {
			if t != "" { // "": a version key
				stats.Records[t]++
			}
		}
		stats.Txns++
		ops, opTables, txnBytes = ops[:0], opTables[:0], 0
		return nil
	}
	maxOps := s.cfg.MaxTxnOps - 1
	// add queues a put of val under full for table ("" for a version key),
	// committing the queue first when full would not fit into it.
	add := func(table, full string, val []byte) error {
		size := len(full) + len(val)
		if len(ops) >= maxOps || (len(ops) > 0 && txnBytes+size > maxImportTxnBytes) {
			if err := flush(); err != nil {
				return err
			}
		}
		ops = append(ops, clientv3.OpPut(full, string(val)))
		opTables = append(opTables, table)
		txnBytes += size
		return nil
	}
	err = walk(func(table string, key, value []byte) error {
		name, val, skip, err := s.importRecord(table, key, value)
		if err != nil {
			return err
		}
		if skip {
			stats.Skipped++
			return nil
		}
		touched[table] = true
		return add(table, s.cfg.Prefix+table+"/"+name, val)
	})
	for _, table := range sortedKeys(touched) {
		if err == nil {
			err = add("", s.cfg.Prefix+tVersion+"/"+table, nil)
		}
	}
	if err == nil {
		err = flush()
	}
	if err != nil {
		return stats, incomplete(err)
	}
	if err := s.verifyImport(stats); err != nil {
		return stats, incomplete(fmt.Errorf("verifying the copy: %w", err))
	}
	return stats, nil
}

// importRecord returns the etcd key name (under PREFIX table/) and value of one
// source record, or skip for a record that is not copied.
func (s *Store) importRecord(table string, key, value []byte) (name string, val []byte, skip bool, err error) {
	switch table {
	case tNodes, tTokens, tOps:
		return string(key), value, false, nil
	case tPubkeys, tIPAM, tQuar, tOpTokens:
		return hexKey(key), value, false, nil
	case tPolicies, tAudit:
		if len(key) != 8 {
			return "", nil, false, fmt.Errorf("%s key %x is not an 8-byte number", table, key)
		}
		return seqKey(binary.BigEndian.Uint64(key)), value, false, nil
	case tMeta:
		switch k := string(key); k {
		case bboltOwnerKey:
			return "", nil, true, nil
		case metaAuditHead:
			return k, value, false, nil
		case secretCheckKey, MigratingKey:
			return "", nil, false, fmt.Errorf("meta key %q is reserved by the etcd store and cannot be copied", k)
		default:
			sealed, err := s.seal(s.cfg.Prefix+tMeta+"/"+k, value)
			if err != nil {
				return "", nil, false, fmt.Errorf("sealing meta %s: %w", k, err)
			}
			return k, sealed, false, nil
		}
	}
	return "", nil, false, fmt.Errorf("table %q is not one this version of the etcd store knows (nothing of it could be copied); run migrate with the segmesh-controller version that wrote the store", table)
}

// checkEmpty returns the etcd revision at which the prefix held no record, or
// an error naming what it holds.
func (s *Store) checkEmpty() (int64, error) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.RequestTimeout)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.cfg.Prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(8))
	if err != nil {
		return 0, fmt.Errorf("importing into %s: listing the prefix: %w", s, err)
	}
	allowed := []string{s.cfg.Prefix + tMeta + "/" + secretCheckKey, s.cfg.Prefix + tVersion + "/" + tMeta}
	var others []string
	for _, kv := range resp.Kvs {
		if k := string(kv.Key); !slices.Contains(allowed, k) {
			others = append(others, strings.TrimPrefix(k, s.cfg.Prefix))
		}
	}
	marked, err := s.Migrating()
	if err != nil {
		return 0, fmt.Errorf("importing into %s: %w", s, err)
	}
	if marked {
		return 0, fmt.Errorf("importing into %s: an earlier migrate into this prefix is running or was interrupted (%s%s/%s exists): "+
			"if none is running, clear the prefix with \"etcdctl del --prefix %s\" and run migrate again; nothing was written",
			s, s.cfg.Prefix, tMeta, MigratingKey, s.cfg.Prefix)
	}
	if len(others) > 0 || resp.Count > int64(len(allowed)) {
		return 0, fmt.Errorf("importing into %s: the prefix already holds %d keys (%s...): migrate only fills an empty prefix; "+
			"give another --etcd-prefix, or clear this one with \"etcdctl del --prefix %s\" if it holds nothing you need; nothing was written",
			s, resp.Count, strings.Join(others, ", "), s.cfg.Prefix)
	}
	return resp.Header.Revision, nil
}

// createMarker creates the MigratingKey marker (sealed like any meta value,
// holding a random import ID) unless a key under the prefix was written after
// etcd revision rev, and returns the marker's stored value.
func (s *Store) createMarker(rev int64) (string, error) {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return "", err
	}
	full := s.cfg.Prefix + tMeta + "/" + MigratingKey
	val, err := s.seal(full, []byte("segmesh migrate "+hex.EncodeToString(id)))
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.RequestTimeout)
	defer cancel()
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(s.cfg.Prefix).WithPrefix(), "<", rev+1)).
		Then(clientv3.OpPut(full, string(val)), clientv3.OpPut(s.cfg.Prefix+tVersion+"/"+tMeta, "")).
		Commit()
	if err != nil {
		return "", fmt.Errorf("importing into %s: creating %s: %w; nothing was written", s, full, err)
	}
	if !resp.Succeeded {
		return "", fmt.Errorf("importing into %s: another writer (a controller?) wrote under the prefix while migrate checked it was empty; "+
			"stop every controller on this prefix and look at what it holds; nothing was written", s)
	}
	return string(val), nil
}

// importTxn commits ops if the marker still holds this import's value.
func (s *Store) importTxn(markerKey, marker string, ops []clientv3.Op) error {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.RequestTimeout)
	defer cancel()
	resp, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.Value(markerKey), "=", marker)).Then(ops...).Commit()
	if errors.Is(err, rpctypes.ErrTooManyOps) || errors.Is(err, rpctypes.ErrRequestTooLarge) {
		return fmt.Errorf("etcd at %s: writing %d records: %w: %w (is the cluster's --max-txn-ops below %d, or a record above its --max-request-bytes?)",
			strings.Join(s.cfg.Endpoints, ","), len(ops), ErrTooLarge, err, s.cfg.MaxTxnOps)
	}
	if err != nil {
		return fmt.Errorf("etcd at %s: writing %d records: %w", strings.Join(s.cfg.Endpoints, ","), len(ops), err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("the marker %s was removed or replaced while migrate wrote (another migrate, or the prefix was cleared)", markerKey)
	}
	return nil
}

// verifyImport checks the copy against what Import wrote (see Import).
func (s *Store) verifyImport(stats ImportStats) error {
	err := s.View(func(stx store.Tx) error {
		nodes, err := stx.Nodes()
		if err != nil {
			return err
		}
		tokens, err := stx.Tokens()
		if err != nil {
			return err
		}
		ops, err := stx.Operators()
		if err != nil {
			return err
		}
		revs, err := stx.PolicyRevisions()
		if err != nil {
			return err
		}
		audit, err := stx.Audit()
		if err != nil {
			return err
		}
		for _, c := range []struct {
			table string
			got   int
		}{{tNodes, len(nodes)}, {tTokens, len(tokens)}, {tOps, len(ops)}, {tPolicies, len(revs)}, {tAudit, len(audit)}} {
			if want := stats.Records[c.table]; c.got != want {
				return fmt.Errorf("etcd holds %d %s where %d were copied", c.got, c.table, want)
			}
		}
		seq, hash, err := stx.AuditHead()
		if err != nil {
			return err
		}
		if p := store.VerifyAudit(audit, seq, hash); p != nil {
			return fmt.Errorf("the copied audit log does not verify: %w", p)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, table := range []string{tNodes, tTokens, tOps, tOpTokens, tPubkeys, tPolicies, tIPAM, tQuar, tMeta, tAudit} {
		ctx, cancel := context.WithTimeout(s.ctx, s.cfg.RequestTimeout)
		resp, err := s.cli.Get(ctx, s.cfg.Prefix+table+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		cancel()
		if err != nil {
			return fmt.Errorf("counting %s: %w", table, err)
		}
		want := int64(stats.Records[table])
		if table == tMeta {
			want++ // the marker
			if s.aead != nil {
				want++ // the secret check value
			}
		}
		if resp.Count != want {
			return fmt.Errorf("etcd holds %d keys under %s%s/ where %d were expected", resp.Count, s.cfg.Prefix, table, want)
		}
	}
	return nil
}

// FinishImport deletes the MigratingKey marker Import left, so that controllers
// start on the prefix. It fails when the prefix has no marker.
func (s *Store) FinishImport() error {
	full := s.cfg.Prefix + tMeta + "/" + MigratingKey
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.RequestTimeout)
	defer cancel()
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(full), ">", 0)).
		Then(clientv3.OpDelete(full), clientv3.OpPut(s.cfg.Prefix+tVersion+"/"+tMeta, "")).
		Commit()
	if err != nil {
		return fmt.Errorf("etcd at %s: deleting %s: %w", strings.Join(s.cfg.Endpoints, ","), full, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("finishing the import into %s: %s is gone (was the prefix cleared meanwhile?)", s, full)
	}
	return nil
}

// Migrating reports whether the prefix holds the MigratingKey marker: a migrate
// into it is running or was interrupted, and its state is incomplete.
func (s *Store) Migrating() (bool, error) {
	full := s.cfg.Prefix + tMeta + "/" + MigratingKey
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.RequestTimeout)
	defer cancel()
	resp, err := s.cli.Get(ctx, full, clientv3.WithCountOnly())
	if err != nil {
		return false, fmt.Errorf("etcd at %s: reading %s: %w", strings.Join(s.cfg.Endpoints, ","), full, err)
	}
	return resp.Count > 0, nil
}
