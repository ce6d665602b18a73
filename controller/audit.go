package controller

import (
	"context"
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
// was edited or removed.
func (s *operatorService) VerifyAudit(ctx context.Context, _ *connect.Request[segmeshv1.VerifyAuditRequest]) (*connect.Response[segmeshv1.VerifyAuditResponse], error) {
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
		if p := store.VerifyAudit(es, seq, hash); p != nil {
			out.FirstBadSeq, out.Problem = p.Seq, p.Reason
			return nil
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
