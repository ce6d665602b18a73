package controller

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/controller/store"
	"segmesh/policy"
)

// Operator authentication and roles.
//
// Every OperatorService call carries "Authorization: Bearer TOKEN". The controller
// keeps only the SHA-256 of each token (store.Operator). The check runs as HTTP
// middleware in front of the connect handler, before a single byte of the request
// body is read, so an unauthenticated client costs the controller no more than its
// request headers; the body is then capped per procedure (operatorBodyLimit).

// viewerProcedures are the OperatorService procedures a viewer may call: reads
// only. Every other procedure, including ones added later, needs an admin.
var viewerProcedures = map[string]bool{
	segmeshv1connect.OperatorServiceStatusProcedure:              true,
	segmeshv1connect.OperatorServiceListNodesProcedure:           true,
	segmeshv1connect.OperatorServiceGetNodeProcedure:             true,
	segmeshv1connect.OperatorServiceListDeniedFlowsProcedure:     true,
	segmeshv1connect.OperatorServiceGetSegmentGraphProcedure:     true,
	segmeshv1connect.OperatorServiceGetPolicyProcedure:           true,
	segmeshv1connect.OperatorServiceListPolicyRevisionsProcedure: true,
	segmeshv1connect.OperatorServiceGetNetmapProcedure:           true,
	segmeshv1connect.OperatorServiceListTokensProcedure:          true,
	segmeshv1connect.OperatorServiceListOperatorsProcedure:       true,
	segmeshv1connect.OperatorServiceListAuditProcedure:           true,
	segmeshv1connect.OperatorServiceVerifyAuditProcedure:         true,
}

// Request body limits in bytes. Policy files travel in ApplyPolicy and GetNetmap
// (a candidate policy); everything else is a few names and labels.
const (
	policyBodyLimit = 8 << 20
	smallBodyLimit  = 64 << 10
	enrollBodyLimit = 64 << 10
	agentBodyLimit  = 1 << 20
	// operatorReadTimeout and enrollReadTimeout bound how long a call may take to
	// send its body, so that slow bodies cannot hold connections, streams and
	// memory (an enrollment is a few KiB).
	operatorReadTimeout = 30 * time.Second
	enrollReadTimeout   = 10 * time.Second
)

// operatorProcedureSet holds every OperatorService procedure, from the service
// descriptor; other paths under the service are answered 404 without an audit
// record.
var operatorProcedureSet = func() map[string]bool {
	svc := segmeshv1.File_segmesh_v1_segmesh_proto.Services().ByName("OperatorService")
	out := map[string]bool{}
	for i := range svc.Methods().Len() {
		out["/"+string(svc.FullName())+"/"+string(svc.Methods().Get(i).Name())] = true
	}
	return out
}()

var errorWriter = connect.NewErrorWriter()

// limitBody refuses a request whose declared body exceeds limit with
// ResourceExhausted, caps what the handler can read to limit, and, when
// deadline is not zero, gives the client that long to send it (over HTTP/2 the
// deadline is the stream's).
func limitBody(w http.ResponseWriter, r *http.Request, limit int64, deadline time.Duration) bool {
	if r.ContentLength > limit {
		writeRefusal(w, r, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("request body of %d bytes exceeds the limit of %d bytes for %s", r.ContentLength, limit, procedureName(r.URL.Path))))
		return false
	}
	if deadline > 0 {
		_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(deadline))
	}
	r.Body = http.MaxBytesReader(w, r.Body, limit)
	return true
}

// writeRefusal answers r with err in r's protocol without reading its body.
func writeRefusal(w http.ResponseWriter, r *http.Request, err *connect.Error) {
	if r.ProtoMajor == 1 {
		// Close rather than drain an unread HTTP/1 body. (HTTP/2 resets the
		// stream by itself; a Connection header there would start a graceful
		// shutdown that waits for the body.)
		w.Header().Set("Connection", "close")
	}
	_ = errorWriter.Write(w, r, unavailableError(err))
}

// withEnrollLimits guards EnrollService, which is unauthenticated by design,
// before connect reads a byte of the body (connect decodes the whole request
// before the handler runs): a call needs a free enrollment slot (slotLimiter:
// bounded in total and per source), and its body is capped at enrollBodyLimit
// and must arrive within enrollReadTimeout.
func (c *Controller) withEnrollLimits(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		release, ok := c.enrollSlots.acquire(sourceAddr(r.RemoteAddr))
		if !ok {
			writeRefusal(w, r, connect.NewError(connect.CodeResourceExhausted, errors.New("too many enrollments in progress; retry in a few seconds")))
			return
		}
		defer release()
		if limitBody(w, r, enrollBodyLimit, enrollReadTimeout) {
			h.ServeHTTP(w, r)
		}
	})
}

// operatorBodyLimit returns the largest request body procedure accepts.
func operatorBodyLimit(procedure string) int64 {
	switch procedure {
	case segmeshv1connect.OperatorServiceApplyPolicyProcedure, segmeshv1connect.OperatorServiceGetNetmapProcedure:
		return policyBodyLimit
	}
	return smallBodyLimit
}

type operatorKey struct{}

// operatorOf returns the operator credential that authenticated the call (see
// withOperatorAuth); a zero Operator outside an authenticated call.
func operatorOf(ctx context.Context) store.Operator {
	o, _ := ctx.Value(operatorKey{}).(store.Operator)
	return o
}

// actorOf names the caller in the audit log: the operator credential's name.
func actorOf(ctx context.Context) string {
	if o := operatorOf(ctx); o.Name != "" {
		return o.Name
	}
	return "controller"
}

// tokenHash is the SHA-256 under which an operator bearer token is stored.
func tokenHash(token string) []byte {
	sum := sha256.Sum256([]byte(token))
	return sum[:]
}

// withOperatorAuth authenticates and authorises every call to h (the
// OperatorService handler) from its headers alone: Unauthenticated for a missing,
// unknown or revoked credential, PermissionDenied when the credential's role may
// not call the procedure, ResourceExhausted when the declared body is larger than
// the procedure accepts. Only then is the body, capped, handed to h.
func (c *Controller) withOperatorAuth(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		op, err := c.authenticateOperator(r.Header.Get("Authorization"))
		if err != nil {
			writeRefusal(w, r, err)
			return
		}
		procedure := r.URL.Path
		if !operatorProcedureSet[procedure] {
			http.NotFound(w, r)
			return
		}
		if op.Role != store.RoleAdmin && !viewerProcedures[procedure] {
			err := connect.NewError(connect.CodePermissionDenied, fmt.Errorf("operator %q has role %s, which may only read; %s needs an admin credential", op.Name, op.Role, procedureName(procedure)))
			c.auditRefusal(op.Name, procedure, "", err)
			writeRefusal(w, r, err)
			return
		}
		if limitBody(w, r, operatorBodyLimit(procedure), operatorReadTimeout) {
			h.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), operatorKey{}, op)))
		}
	})
}

// procedureName turns "/segmesh.v1.OperatorService/ApplyPolicy" into "ApplyPolicy".
func procedureName(procedure string) string {
	return procedure[strings.LastIndexByte(procedure, '/')+1:]
}

// authenticateOperator resolves an Authorization header value to an active
// operator credential.
func (c *Controller) authenticateOperator(header string) (store.Operator, *connect.Error) {
	token, ok := strings.CutPrefix(header, "Bearer ")
	if !ok || token == "" {
		return store.Operator{}, connect.NewError(connect.CodeUnauthenticated, errors.New("operator credential missing (send \"Authorization: Bearer <token>\" from an operator credential file such as operator.json)"))
	}
	var op store.Operator
	var found bool
	err := c.store.View(func(tx store.Tx) error {
		var err error
		op, found, err = tx.OperatorByTokenHash(tokenHash(token))
		return err
	})
	if err != nil {
		return store.Operator{}, connect.NewError(connect.CodeInternal, fmt.Errorf("looking up the operator credential: %w", err))
	}
	if !found {
		return store.Operator{}, connect.NewError(connect.CodeUnauthenticated, errors.New("operator credential is not valid (unknown token)"))
	}
	if !op.RevokedAt.IsZero() {
		return store.Operator{}, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("operator credential %q was revoked at %s", op.Name, op.RevokedAt.UTC().Format(timeFormat)))
	}
	return op, nil
}

// auditActions names each changing OperatorService procedure in the audit log
// with the action its success records, and the kind of object its request names.
var auditActions = map[string]struct{ action, object string }{
	segmeshv1connect.OperatorServiceCreateTokenProcedure:    {"token.create", ""},
	segmeshv1connect.OperatorServiceRevokeTokenProcedure:    {"token.revoke", "token"},
	segmeshv1connect.OperatorServiceApplyPolicyProcedure:    {"policy.apply", ""},
	segmeshv1connect.OperatorServiceRollbackPolicyProcedure: {"policy.rollback", "policy"},
	segmeshv1connect.OperatorServiceRevokeNodeProcedure:     {"node.revoke", "node"},
	segmeshv1connect.OperatorServiceDeleteNodeProcedure:     {"node.delete", "node"},
	segmeshv1connect.OperatorServiceLabelNodeProcedure:      {"node.label", "node"},
	segmeshv1connect.OperatorServiceRotateNodeKeyProcedure:  {"node.key.rotate-request", "node"},
	segmeshv1connect.OperatorServiceCreateOperatorProcedure: {"operator.create", "operator"},
	segmeshv1connect.OperatorServiceRevokeOperatorProcedure: {"operator.revoke", "operator"},
	segmeshv1connect.OperatorServiceBackupProcedure:         {"store.backup", ""},
}

// auditObject returns "KIND:VALUE" for the name, id or revision field of msg,
// quoted and bounded when it is not a plain word; "" when kind is empty or msg
// has none.
func auditObject(kind string, msg any) string {
	m, ok := msg.(proto.Message)
	if kind == "" || !ok {
		return ""
	}
	fields := m.ProtoReflect().Descriptor().Fields()
	for _, name := range []protoreflect.Name{"name", "id", "revision"} {
		if f := fields.ByName(name); f != nil {
			v := m.ProtoReflect().Get(f).String()
			if !policy.ValidNodeName(v) && strings.Trim(v, "0123456789abcdef") != "" {
				v = boundedQuote(v, 64)
			}
			return kind + ":" + v
		}
	}
	return ""
}

// auditRefusals records, for every change an authenticated operator asked for
// and the controller refused, who asked for what and why. Reads are not
// recorded.
func (c *Controller) auditRefusals() connect.UnaryInterceptorFunc {
	return func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			resp, err := next(ctx, req)
			procedure := req.Spec().Procedure
			if err != nil && !viewerProcedures[procedure] && connect.CodeOf(err) != connect.CodeInternal {
				c.auditRefusal(actorOf(ctx), procedure, auditObject(auditActions[procedure].object, req.Any()), err)
			}
			return resp, err
		}
	}
}

// auditRefusal appends a refused operator call to the audit log, within the
// actor's budget (refusalAudits): a credential cannot grow the log without bound
// by asking for refused changes.
func (c *Controller) auditRefusal(actor, procedure, object string, refusal error) {
	if !c.refusalAudits.allow(actor, c.now()) {
		return
	}
	msg := refusal.Error()
	if ce := new(connect.Error); errors.As(refusal, &ce) {
		msg = ce.Message()
	}
	if len(msg) > 2000 {
		msg = msg[:2000] + "…"
	}
	err := c.store.Update(func(tx store.Tx) error {
		action := auditActions[procedure].action
		if action == "" {
			action = "operator." + procedureName(procedure)
		}
		return tx.AppendAudit(store.AuditEntry{Time: c.now(), Actor: actor, Action: action, Object: object, Result: "refused: " + msg})
	})
	if err != nil {
		c.log.Error("recording a refused operator call in the audit log", "err", err)
	}
}
