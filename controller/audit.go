package controller

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/controller/store"
)

func auditRecord(e store.AuditEntry) *segmeshv1.AuditRecord {
	return &segmeshv1.AuditRecord{
		Seq: e.Seq, TimeUnixNano: e.Time.UnixNano(), Actor: e.Actor, Action: e.Action, Object: e.Object,
		Result: e.Result, Detail: e.Detail, PrevHash: e.PrevHash, Hash: e.Hash,
	}
}

// ListAudit implements OperatorService.ListAudit: the audit log, oldest first,
// optionally only records at or after since_unix and only those whose object or
// actor is the node ("node:NAME").
func (s *operatorService) ListAudit(ctx context.Context, req *connect.Request[segmeshv1.ListAuditRequest]) (*connect.Response[segmeshv1.ListAuditResponse], error) {
	var since time.Time
	if u := req.Msg.GetSinceUnix(); u > 0 {
		since = time.Unix(u, 0)
	}
	node := req.Msg.GetNode()
	out := &segmeshv1.ListAuditResponse{}
	err := s.c.store.View(func(tx store.Tx) error {
		es, err := tx.Audit()
		for _, e := range es {
			if e.Time.Before(since) {
				continue
			}
			if node != "" && e.Object != "node:"+node && e.Actor != "node:"+node && !strings.Contains(e.Detail, "node "+node+" ") {
				continue
			}
			out.Records = append(out.Records, auditRecord(e))
		}
		return err
	})
	if err != nil {
		return nil, internalOr("reading the audit log", err)
	}
	return connect.NewResponse(out), nil
}

// VerifyAudit implements OperatorService.VerifyAudit: it checks the stored log
// against its hash chain (store.VerifyAudit) and reports the first record that
// was edited or removed, and the head. With expect_head ("SEQ:HASH" from an
// earlier answer, kept outside the controller) record SEQ must still have HASH:
// that catches a log rewritten with recomputed hashes, which the chain alone
// cannot. InvalidArgument for a malformed expect_head.
func (s *operatorService) VerifyAudit(ctx context.Context, req *connect.Request[segmeshv1.VerifyAuditRequest]) (*connect.Response[segmeshv1.VerifyAuditResponse], error) {
	var wantSeq uint64
	var wantHash string
	if e := req.Msg.GetExpectHead(); e != "" {
		seq, hash, ok := strings.Cut(e, ":")
		n, err := strconv.ParseUint(seq, 10, 64)
		if !ok || err != nil || n == 0 || len(hash) != 64 {
			return nil, invalidArg("expected head %q: want SEQ:HASH as printed by `segmesh audit verify`", e)
		}
		wantSeq, wantHash = n, hash
	}
	out := &segmeshv1.VerifyAuditResponse{}
	err := s.c.store.View(func(tx store.Tx) error {
		es, err := tx.Audit()
		if err != nil {
			return err
		}
		seq, hash, err := tx.AuditHead()
		if err != nil {
			return err
		}
		out.Records = uint64(len(es))
		out.HeadSeq, out.HeadHash = seq, hash
		if p := store.VerifyAudit(es, seq, hash); p != nil {
			out.FirstBadSeq, out.Problem = p.Seq, p.Reason
			return nil
		}
		if wantSeq != 0 {
			switch {
			case wantSeq > uint64(len(es)):
				out.FirstBadSeq, out.Problem = uint64(len(es))+1, fmt.Sprintf("the log ends at record %d, before the expected head %d: records were removed", len(es), wantSeq)
				return nil
			case es[wantSeq-1].Hash != wantHash:
				out.FirstBadSeq, out.Problem = wantSeq, "the log up to the expected head was rewritten: record "+strconv.FormatUint(wantSeq, 10)+" no longer has the expected hash"
				return nil
			}
		}
		out.Ok = true
		return nil
	})
	if err != nil {
		// A record that no longer decodes was edited too.
		out.Ok, out.Problem = false, err.Error()
		return connect.NewResponse(out), nil
	}
	return connect.NewResponse(out), nil
}
