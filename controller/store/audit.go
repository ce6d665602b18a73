package store

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"
)

// auditCanonical is the encoding AuditHash digests: every field but Hash, the time
// in UTC with nanoseconds, in this fixed order (encoding/json keeps struct order).
type auditCanonical struct {
	Seq      uint64 `json:"seq"`
	Time     string `json:"time"`
	Actor    string `json:"actor"`
	Action   string `json:"action"`
	Object   string `json:"object"`
	Result   string `json:"result"`
	Detail   string `json:"detail"`
	PrevHash string `json:"prev_hash"`
}

// AuditHash returns the hex SHA-256 of e's canonical JSON encoding (every field
// but Hash; see auditCanonical).
func AuditHash(e AuditEntry) string {
	b, _ := json.Marshal(auditCanonical{
		Seq: e.Seq, Time: e.Time.UTC().Format(time.RFC3339Nano), Actor: e.Actor, Action: e.Action,
		Object: e.Object, Result: e.Result, Detail: e.Detail, PrevHash: e.PrevHash,
	})
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// AuditProblem describes the first break in an audit chain.
type AuditProblem struct {
	// Seq is the sequence number of the first record that was edited, or that
	// follows removed records; for records removed from the end, the number the
	// first missing record had.
	Seq    uint64
	Reason string
}

func (p *AuditProblem) Error() string { return fmt.Sprintf("record %d: %s", p.Seq, p.Reason) }

// VerifyAudit checks a log as returned by Tx.Audit against its hash chain and
// the head recorded at append time (Tx.AuditHead). It returns nil when every
// record's hash matches its content, every PrevHash matches the record before,
// the sequence numbers run 1, 2, 3, … without a gap, and the last record is the
// recorded head; otherwise the first problem.
func VerifyAudit(entries []AuditEntry, headSeq uint64, headHash string) *AuditProblem {
	prev := ""
	for i, e := range entries {
		want := uint64(i + 1)
		switch {
		case e.Seq != want:
			return &AuditProblem{Seq: e.Seq, Reason: fmt.Sprintf("sequence number %d where %d was expected: record(s) before it were removed", e.Seq, want)}
		case e.PrevHash != prev:
			return &AuditProblem{Seq: e.Seq, Reason: "its link to the previous record does not match: the previous record was edited or removed"}
		case AuditHash(e) != e.Hash:
			return &AuditProblem{Seq: e.Seq, Reason: "its content does not match its hash: the record was edited"}
		}
		prev = e.Hash
	}
	n := uint64(len(entries))
	if headSeq != n || headHash != prev {
		if headSeq > n {
			return &AuditProblem{Seq: n + 1, Reason: fmt.Sprintf("the log ends at record %d but %d records were appended: the last %d were removed", n, headSeq, headSeq-n)}
		}
		return &AuditProblem{Seq: n, Reason: "the last record is not the one recorded when it was appended"}
	}
	return nil
}
