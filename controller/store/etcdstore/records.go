package etcdstore

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"segmesh/controller/store"
)

var _ store.Tx = (*tx)(nil)

func (t *tx) Node(name string) (store.Node, bool, error) {
	var n store.Node
	ok, err := t.getJSON(tNodes, name, &n)
	return n, ok, err
}

func (t *tx) Nodes() ([]store.Node, error) { return scanJSON[store.Node](t, tNodes) }

func (t *tx) NodeByPublicKey(key []byte) (string, bool, error) {
	if len(key) == 0 {
		return "", false, nil
	}
	v, ok, err := t.value(tPubkeys, hexKey(key))
	return string(v), ok, err
}

func (t *tx) PutNode(n store.Node) error {
	if n.Name == "" {
		return errors.New("storing node: empty name")
	}
	old, ok, err := t.Node(n.Name)
	if err != nil {
		return err
	}
	if ok && len(old.PublicKey) > 0 && string(old.PublicKey) != string(n.PublicKey) {
		if err := t.del(tPubkeys, hexKey(old.PublicKey)); err != nil {
			return fmt.Errorf("storing node %s: %w", n.Name, err)
		}
	}
	if len(n.PublicKey) > 0 {
		owner, held, err := t.NodeByPublicKey(n.PublicKey)
		if err != nil {
			return fmt.Errorf("storing node %s: %w", n.Name, err)
		}
		if held && owner != n.Name {
			return fmt.Errorf("storing node %s: public key already belongs to node %s", n.Name, owner)
		}
		if err := t.put(tPubkeys, hexKey(n.PublicKey), []byte(n.Name)); err != nil {
			return fmt.Errorf("storing node %s: %w", n.Name, err)
		}
	}
	if err := t.putJSON(tNodes, n.Name, n); err != nil {
		return fmt.Errorf("storing node %s: %w", n.Name, err)
	}
	return nil
}

func (t *tx) DeleteNode(name string, quarantineUntil time.Time) error {
	n, ok, err := t.Node(name)
	if err != nil || !ok {
		return err
	}
	if len(n.PublicKey) > 0 {
		if owner, _, err := t.NodeByPublicKey(n.PublicKey); err != nil {
			return fmt.Errorf("deleting node %s: %w", name, err)
		} else if owner == name {
			if err := t.del(tPubkeys, hexKey(n.PublicKey)); err != nil {
				return fmt.Errorf("deleting node %s: %w", name, err)
			}
		}
	}
	until, _ := quarantineUntil.UTC().MarshalText()
	for _, a := range n.Addresses {
		owner, _, err := t.AddressOwner(a)
		if err != nil {
			return fmt.Errorf("deleting node %s: releasing %s: %w", name, a, err)
		}
		if owner == name {
			if err := t.del(tIPAM, hexKey(a.AsSlice())); err != nil {
				return fmt.Errorf("deleting node %s: releasing %s: %w", name, a, err)
			}
		}
		if err := t.put(tQuar, hexKey(a.AsSlice()), until); err != nil {
			return fmt.Errorf("deleting node %s: quarantining %s: %w", name, a, err)
		}
	}
	if err := t.del(tNodes, name); err != nil {
		return fmt.Errorf("deleting node %s: %w", name, err)
	}
	return nil
}

func (t *tx) AddressQuarantine(a netip.Addr) (time.Time, bool, error) {
	v, ok, err := t.value(tQuar, hexKey(a.AsSlice()))
	if err != nil || !ok {
		return time.Time{}, false, err
	}
	var until time.Time
	if err := until.UnmarshalText(v); err != nil {
		return time.Time{}, false, fmt.Errorf("decoding quarantine of %s: %w", a, err)
	}
	return until, true, nil
}

func (t *tx) Token(id string) (store.Token, bool, error) {
	var tok store.Token
	ok, err := t.getJSON(tTokens, id, &tok)
	return tok, ok, err
}

func (t *tx) PutToken(tok store.Token) error {
	if tok.ID == "" {
		return errors.New("storing token: empty id")
	}
	if err := t.putJSON(tTokens, tok.ID, tok); err != nil {
		return fmt.Errorf("storing token %s: %w", tok.ID, err)
	}
	return nil
}

func (t *tx) Tokens() ([]store.Token, error) { return scanJSON[store.Token](t, tTokens) }

func (t *tx) Operator(name string) (store.Operator, bool, error) {
	var o store.Operator
	ok, err := t.getJSON(tOps, name, &o)
	return o, ok, err
}

func (t *tx) Operators() ([]store.Operator, error) { return scanJSON[store.Operator](t, tOps) }

func (t *tx) OperatorByTokenHash(hash []byte) (store.Operator, bool, error) {
	if len(hash) == 0 {
		return store.Operator{}, false, nil
	}
	name, ok, err := t.value(tOpTokens, hexKey(hash))
	if err != nil || !ok {
		return store.Operator{}, false, err
	}
	return t.Operator(string(name))
}

func (t *tx) PutOperator(o store.Operator) error {
	if o.Name == "" || len(o.TokenHash) == 0 {
		return errors.New("storing operator: empty name or token hash")
	}
	old, ok, err := t.Operator(o.Name)
	if err != nil {
		return err
	}
	if ok && string(old.TokenHash) != string(o.TokenHash) {
		if err := t.del(tOpTokens, hexKey(old.TokenHash)); err != nil {
			return fmt.Errorf("storing operator %s: %w", o.Name, err)
		}
	}
	owner, held, err := t.value(tOpTokens, hexKey(o.TokenHash))
	if err != nil {
		return fmt.Errorf("storing operator %s: %w", o.Name, err)
	}
	if held && string(owner) != o.Name {
		return fmt.Errorf("storing operator %s: token already belongs to operator %s", o.Name, owner)
	}
	if err := t.put(tOpTokens, hexKey(o.TokenHash), []byte(o.Name)); err != nil {
		return fmt.Errorf("storing operator %s: %w", o.Name, err)
	}
	if err := t.putJSON(tOps, o.Name, o); err != nil {
		return fmt.Errorf("storing operator %s: %w", o.Name, err)
	}
	return nil
}

func (t *tx) Policy(rev uint64) (store.Policy, bool, error) {
	var p store.Policy
	ok, err := t.getJSON(tPolicies, seqKey(rev), &p)
	return p, ok, err
}

func (t *tx) LatestPolicy() (store.Policy, bool, error) {
	var p store.Policy
	last, err := t.scan(tPolicies, true)
	if err != nil || len(last) == 0 {
		return p, false, err
	}
	if err := json.Unmarshal(last[0].val, &p); err != nil {
		return p, false, fmt.Errorf("decoding policy revision %s: %w", last[0].key, err)
	}
	return p, true, nil
}

func (t *tx) PolicyRevisions() ([]uint64, error) {
	kvs, err := t.scan(tPolicies, false)
	if err != nil {
		return nil, err
	}
	var out []uint64
	for _, e := range kvs {
		rev, err := parseSeqKey(tPolicies, e.key)
		if err != nil {
			return nil, err
		}
		out = append(out, rev)
	}
	return out, nil
}

func (t *tx) PutPolicy(p store.Policy) error {
	last, err := t.scan(tPolicies, true)
	if err != nil {
		return fmt.Errorf("storing policy revision %d: %w", p.Revision, err)
	}
	want := uint64(1)
	if len(last) > 0 {
		rev, err := parseSeqKey(tPolicies, last[0].key)
		if err != nil {
			return fmt.Errorf("storing policy revision %d: latest: %w", p.Revision, err)
		}
		want = rev + 1
	}
	if p.Revision != want {
		return fmt.Errorf("storing policy revision %d (want %d): %w", p.Revision, want, store.ErrRevision)
	}
	if err := t.putJSON(tPolicies, seqKey(p.Revision), p); err != nil {
		return fmt.Errorf("storing policy revision %d: %w", p.Revision, err)
	}
	return nil
}

func (t *tx) AddressOwner(a netip.Addr) (string, bool, error) {
	v, ok, err := t.value(tIPAM, hexKey(a.AsSlice()))
	return string(v), ok, err
}

func (t *tx) ClaimAddress(a netip.Addr, node string) error {
	owner, ok, err := t.AddressOwner(a)
	if err != nil {
		return err
	}
	if ok && owner != node {
		return fmt.Errorf("claiming %s for node %s: held by node %s: %w", a, node, owner, store.ErrAddressInUse)
	}
	return t.put(tIPAM, hexKey(a.AsSlice()), []byte(node))
}

func (t *tx) Meta(key string) ([]byte, error) {
	v, ok, err := t.value(tMeta, key)
	if err != nil || !ok || len(v) == 0 {
		return nil, err
	}
	return t.s.open(t.full(tMeta, key), v)
}

func (t *tx) PutMeta(key string, value []byte) error {
	sealed, err := t.s.seal(t.full(tMeta, key), value)
	if err != nil {
		return err
	}
	return t.put(tMeta, key, sealed)
}

func (t *tx) AppendAudit(e store.AuditEntry) error {
	seq, prev, err := t.AuditHead()
	if err != nil {
		return err
	}
	e.Seq, e.PrevHash = seq+1, prev
	e.Hash = store.AuditHash(e)
	if err := t.putJSON(tAudit, seqKey(e.Seq), e); err != nil {
		return fmt.Errorf("appending audit entry: %w", err)
	}
	return t.put(tMeta, metaAuditHead, fmt.Appendf(nil, "%d %s", e.Seq, e.Hash))
}

func (t *tx) AuditHead() (uint64, string, error) {
	v, ok, err := t.value(tMeta, metaAuditHead)
	if err != nil || !ok {
		return 0, "", err
	}
	var seq uint64
	var hash string
	if _, err := fmt.Sscanf(string(v), "%d %s", &seq, &hash); err != nil {
		return 0, "", fmt.Errorf("decoding the audit head %q: %w", v, err)
	}
	return seq, hash, nil
}

func (t *tx) Audit() ([]store.AuditEntry, error) { return scanJSON[store.AuditEntry](t, tAudit) }
