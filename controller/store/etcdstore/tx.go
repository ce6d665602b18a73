package etcdstore

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Tables (the first path element under the prefix).
const (
	tNodes    = "nodes"
	tTokens   = "tokens"
	tOps      = "operators"
	tOpTokens = "operator-tokens"
	tPubkeys  = "pubkeys"
	tPolicies = "policies"
	tIPAM     = "ipam"
	tQuar     = "quarantine"
	tMeta     = "meta"
	tAudit    = "audit"
	tVersion  = "version"

	metaAuditHead = "audit-head"
)

// kv is one record as a transaction sees it.
type kv struct {
	key string // without the prefix: "TABLE/NAME"
	val []byte
}

// write is one buffered change; del means delete.
type change struct {
	val []byte
	del bool
}

// tx is a store.Tx that reads at one etcd revision and buffers writes (see
// Store.Update).
type tx struct {
	s     *Store
	write bool
	// rev is the etcd revision every read uses; 0 until the first read fixes it.
	rev int64
	// reads holds the ModRevision of every key read (0: absent), by full key.
	reads map[string]int64
	// tables holds the ModRevision of the version key of every table read as a range.
	tables map[string]int64
	writes map[string]change // by full key
	// touched are the tables written to.
	touched map[string]bool
	// compacted is set when a read failed because etcd compacted rev away.
	compacted bool
}

func (s *Store) newTx(writable bool) *tx {
	return &tx{s: s, write: writable, reads: map[string]int64{}, tables: map[string]int64{}, writes: map[string]change{}, touched: map[string]bool{}}
}

func (t *tx) full(table, name string) string { return t.s.cfg.Prefix + table + "/" + name }

// tableOf returns the table of a full key.
func (t *tx) tableOf(full string) string {
	rest := strings.TrimPrefix(full, t.s.cfg.Prefix)
	table, _, _ := strings.Cut(rest, "/")
	return table
}

// get runs one etcd Get at the transaction's revision, fixing it on the first read.
func (t *tx) get(key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	if t.rev != 0 {
		opts = append(opts, clientv3.WithRev(t.rev))
	}
	ctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(t.s.ctx), t.s.cfg.RequestTimeout)
	defer cancel()
	resp, err := t.s.cli.Get(ctx, key, opts...)
	if err != nil {
		if errors.Is(err, rpctypes.ErrCompacted) {
			t.compacted = true
			return nil, fmt.Errorf("etcd at %s: reading %s: %w", strings.Join(t.s.cfg.Endpoints, ","), key, err)
		}
		return nil, fmt.Errorf("etcd at %s: reading %s: %w: %w", strings.Join(t.s.cfg.Endpoints, ","), key, ErrUnavailable, err)
	}
	if t.rev == 0 {
		t.rev = resp.Header.Revision
	}
	return resp, nil
}

// value returns the record table/name as this transaction sees it (nil, false
// when absent) and records what it read.
func (t *tx) value(table, name string) ([]byte, bool, error) {
	key := t.full(table, name)
	if w, ok := t.writes[key]; ok {
		return w.val, !w.del, nil
	}
	resp, err := t.get(key)
	if err != nil {
		return nil, false, err
	}
	if len(resp.Kvs) == 0 {
		t.reads[key] = 0
		return nil, false, nil
	}
	t.reads[key] = resp.Kvs[0].ModRevision
	return resp.Kvs[0].Value, true, nil
}

// guard records the version of table so that commit fails when any record of it
// changed since this transaction's revision.
func (t *tx) guard(table string) error {
	if _, ok := t.tables[table]; ok {
		return nil
	}
	resp, err := t.get(t.full(tVersion, table))
	if err != nil {
		return err
	}
	var mod int64
	if len(resp.Kvs) > 0 {
		mod = resp.Kvs[0].ModRevision
	}
	t.tables[table] = mod
	return nil
}

// scan returns the records of table sorted by key, or only the last one when
// last is set, as this transaction sees them, and guards the table.
func (t *tx) scan(table string, last bool) ([]kv, error) {
	if err := t.guard(table); err != nil {
		return nil, err
	}
	prefix := t.full(table, "")
	opts := []clientv3.OpOption{clientv3.WithPrefix()}
	if last {
		opts = append(opts, clientv3.WithLastKey()...)
	}
	resp, err := t.get(prefix, opts...)
	if err != nil {
		return nil, err
	}
	merged := map[string][]byte{}
	for _, e := range resp.Kvs {
		merged[string(e.Key)] = e.Value
	}
	deleted := false
	for k, w := range t.writes {
		if !strings.HasPrefix(k, prefix) {
			continue
		}
		if w.del {
			_, had := merged[k]
			deleted = deleted || had
			delete(merged, k)
		} else {
			merged[k] = w.val
		}
	}
	if last && deleted { // the last stored record was deleted here: look at all of them
		all, err := t.scan(table, false)
		if len(all) > 1 {
			all = all[len(all)-1:]
		}
		return all, err
	}
	keys := make([]string, 0, len(merged))
	for k := range merged {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if last && len(keys) > 1 {
		keys = keys[len(keys)-1:]
	}
	out := make([]kv, len(keys))
	for i, k := range keys {
		out[i] = kv{key: strings.TrimPrefix(k, prefix), val: merged[k]}
	}
	return out, nil
}

func (t *tx) put(table, name string, val []byte) error {
	if !t.write {
		return fmt.Errorf("etcd store: writing %s/%s in a read-only transaction", table, name)
	}
	t.writes[t.full(table, name)] = change{val: val}
	t.touched[table] = true
	return nil
}

func (t *tx) del(table, name string) error {
	if !t.write {
		return fmt.Errorf("etcd store: deleting %s/%s in a read-only transaction", table, name)
	}
	t.writes[t.full(table, name)] = change{del: true}
	t.touched[table] = true
	return nil
}

func (t *tx) getJSON(table, name string, v any) (bool, error) {
	raw, ok, err := t.value(table, name)
	if err != nil || !ok {
		return false, err
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return false, fmt.Errorf("decoding %s %s: %w", table, name, err)
	}
	return true, nil
}

func (t *tx) putJSON(table, name string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding %s %s: %w", table, name, err)
	}
	return t.put(table, name, raw)
}

// scanJSON decodes every record of table with decode.
func scanJSON[T any](t *tx, table string) ([]T, error) {
	kvs, err := t.scan(table, false)
	if err != nil {
		return nil, err
	}
	out := make([]T, 0, len(kvs))
	for _, e := range kvs {
		var v T
		if err := json.Unmarshal(e.val, &v); err != nil {
			return nil, fmt.Errorf("decoding %s %s: %w", table, e.key, err)
		}
		out = append(out, v)
	}
	if len(out) == 0 {
		return nil, nil // like bbolt: no records, nil slice
	}
	return out, nil
}

// commit writes the buffered changes with one etcd Txn guarded by what the
// transaction read. It reports false when a guard failed (another writer changed
// something this transaction read).
func (t *tx) commit() (bool, error) {
	if len(t.writes) == 0 {
		return true, nil
	}
	var cmps []clientv3.Cmp
	for _, table := range sortedKeys(t.tables) {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(t.full(tVersion, table)), "=", t.tables[table]))
	}
	for _, key := range sortedKeys(t.reads) {
		if _, guarded := t.tables[t.tableOf(key)]; guarded {
			continue // any change to it bumps the table version compared above
		}
		if mod := t.reads[key]; mod == 0 {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
		} else {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", mod))
		}
	}
	var ops []clientv3.Op
	for _, key := range sortedKeys(t.writes) {
		if w := t.writes[key]; w.del {
			ops = append(ops, clientv3.OpDelete(key))
		} else {
			ops = append(ops, clientv3.OpPut(key, string(w.val)))
		}
	}
	for _, table := range sortedKeys(t.touched) {
		ops = append(ops, clientv3.OpPut(t.full(tVersion, table), ""))
	}
	if max := t.s.cfg.MaxTxnOps; len(cmps) > max || len(ops) > max {
		return false, fmt.Errorf("etcd store: committing %d compares and %d writes (each table written adds one): etcd allows %d of each per Txn (--max-txn-ops): %w",
			len(cmps), len(ops), max, ErrTooLarge)
	}
	ctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(t.s.ctx), t.s.cfg.RequestTimeout)
	defer cancel()
	resp, err := t.s.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if errors.Is(err, rpctypes.ErrTooManyOps) || errors.Is(err, rpctypes.ErrRequestTooLarge) {
		return false, fmt.Errorf("etcd at %s: committing %d compares and %d writes: %w: %w (is Config.MaxTxnOps above the cluster's --max-txn-ops?)",
			strings.Join(t.s.cfg.Endpoints, ","), len(cmps), len(ops), ErrTooLarge, err)
	}
	if err != nil {
		return false, fmt.Errorf("etcd at %s: committing %d writes: %w: %w", strings.Join(t.s.cfg.Endpoints, ","), len(ops), ErrUnavailable, err)
	}
	return resp.Succeeded, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func hexKey(b []byte) string { return hex.EncodeToString(b) }

func seqKey(n uint64) string { return fmt.Sprintf("%016x", n) }

func parseSeqKey(table, k string) (uint64, error) {
	if len(k) != 16 {
		return 0, fmt.Errorf("%s key %q is not a 16-digit hex number", table, k)
	}
	n, err := strconv.ParseUint(k, 16, 64)
	if err != nil {
		return 0, fmt.Errorf("%s key %q: %w", table, k, errors.Unwrap(err))
	}
	return n, nil
}
