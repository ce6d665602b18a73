package controller

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"regexp"
	"slices"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/controller/store"
)

// Operator credentials and join tokens as objects an admin manages.

// operatorNameRE is the syntax of operator credential names.
var operatorNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$`)

// newOperatorToken returns a random bearer token: 32 bytes, base64url.
func newOperatorToken() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generating an operator token: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// bootstrapAdmin records the token of operator.json as the admin credential
// AdminOperator when the store holds no operator credential yet (first start, or
// a store from before roles existed). Once any credential exists the store is
// the authority: operator.json is not consulted again, so revoking "admin" holds.
func (c *Controller) bootstrapAdmin(token string) error {
	now := c.now()
	err := c.store.Update(func(tx store.Tx) error {
		ops, err := tx.Operators()
		if err != nil || len(ops) > 0 {
			return err
		}
		if err := tx.PutOperator(store.Operator{Name: AdminOperator, Role: store.RoleAdmin, TokenHash: tokenHash(token), CreatedAt: now, CreatedBy: "controller"}); err != nil {
			return err
		}
		return tx.AppendAudit(store.AuditEntry{Time: now, Actor: "controller", Action: "operator.create", Object: "operator:" + AdminOperator, Result: "ok", Detail: "role admin, credential " + OperatorFile})
	})
	if err != nil {
		return fmt.Errorf("recording the admin credential: %w", err)
	}
	return nil
}

func operatorInfo(o store.Operator) *segmeshv1.OperatorInfo {
	info := &segmeshv1.OperatorInfo{Name: o.Name, Role: o.Role, CreatedUnix: o.CreatedAt.Unix(), CreatedBy: o.CreatedBy}
	if !o.RevokedAt.IsZero() {
		info.RevokedUnix = o.RevokedAt.Unix()
	}
	return info
}

// internalOr returns err when it is a connect error, else wraps it as Internal
// with context what.
func internalOr(what string, err error) error {
	if ce := new(connect.Error); errors.As(err, &ce) {
		return ce
	}
	return connect.NewError(connect.CodeInternal, fmt.Errorf("%s: %w", what, err))
}

// CreateOperator implements OperatorService.CreateOperator. AlreadyExists for a
// name in use (also a revoked one: names are not reused), InvalidArgument for a bad
// name or role.
func (s *operatorService) CreateOperator(ctx context.Context, req *connect.Request[segmeshv1.CreateOperatorRequest]) (*connect.Response[segmeshv1.CreateOperatorResponse], error) {
	c := s.c
	name, role := req.Msg.GetName(), req.Msg.GetRole()
	if !operatorNameRE.MatchString(name) {
		return nil, invalidArg("operator name %q is not valid (1-63 lower-case letters, digits, '.', '_', '-'; starting and ending with a letter or digit)", name)
	}
	if role != store.RoleAdmin && role != store.RoleViewer {
		return nil, invalidArg("role %q: want %s or %s", role, store.RoleAdmin, store.RoleViewer)
	}
	token, err := newOperatorToken()
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, err)
	}
	now := c.now()
	o := store.Operator{Name: name, Role: role, TokenHash: tokenHash(token), CreatedAt: now, CreatedBy: actorOf(ctx)}
	err = c.store.Update(func(tx store.Tx) error {
		if _, exists, err := tx.Operator(name); err != nil {
			return err
		} else if exists {
			return connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("operator %q exists already (names are not reused, also after a revocation)", name))
		}
		if err := tx.PutOperator(o); err != nil {
			return err
		}
		return tx.AppendAudit(store.AuditEntry{Time: now, Actor: actorOf(ctx), Action: "operator.create", Object: "operator:" + name, Result: "ok", Detail: "role " + role})
	})
	if err != nil {
		return nil, internalOr("creating operator "+name, err)
	}
	c.log.Info("operator credential created", "name", name, "role", role, "by", actorOf(ctx))
	return connect.NewResponse(&segmeshv1.CreateOperatorResponse{Operator: operatorInfo(o), Token: token}), nil
}

// ListOperators implements OperatorService.ListOperators (never a token).
func (s *operatorService) ListOperators(ctx context.Context, _ *connect.Request[segmeshv1.ListOperatorsRequest]) (*connect.Response[segmeshv1.ListOperatorsResponse], error) {
	out := &segmeshv1.ListOperatorsResponse{}
	err := s.c.store.View(func(tx store.Tx) error {
		ops, err := tx.Operators()
		for _, o := range ops {
			out.Operators = append(out.Operators, operatorInfo(o))
		}
		return err
	})
	if err != nil {
		return nil, internalOr("listing operators", err)
	}
	return connect.NewResponse(out), nil
}

// RevokeOperator implements OperatorService.RevokeOperator: the credential is
// refused from the next call on. NotFound for an unknown name,
// FailedPrecondition when revoked already or when it is the last active admin
// (which would lock every admin out).
func (s *operatorService) RevokeOperator(ctx context.Context, req *connect.Request[segmeshv1.RevokeOperatorRequest]) (*connect.Response[segmeshv1.RevokeOperatorResponse], error) {
	c := s.c
	name := req.Msg.GetName()
	now := c.now()
	err := c.store.Update(func(tx store.Tx) error {
		ops, err := tx.Operators()
		if err != nil {
			return err
		}
		var target *store.Operator
		admins := 0
		for i, o := range ops {
			if o.Name == name {
				target = &ops[i]
			}
			if o.Role == store.RoleAdmin && o.RevokedAt.IsZero() {
				admins++
			}
		}
		switch {
		case target == nil:
			return connect.NewError(connect.CodeNotFound, fmt.Errorf("no operator %q (see `segmesh operators list`)", name))
		case !target.RevokedAt.IsZero():
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("operator %q was already revoked at %s", name, target.RevokedAt.UTC().Format(timeFormat)))
		case target.Role == store.RoleAdmin && admins == 1:
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("operator %q is the last active admin; create another admin first (`segmesh operators create NAME --role admin`)", name))
		}
		target.RevokedAt = now
		if err := tx.PutOperator(*target); err != nil {
			return err
		}
		return tx.AppendAudit(store.AuditEntry{Time: now, Actor: actorOf(ctx), Action: "operator.revoke", Object: "operator:" + name, Result: "ok", Detail: "role " + target.Role})
	})
	if err != nil {
		return nil, internalOr("revoking operator "+name, err)
	}
	c.log.Info("operator credential revoked", "name", name, "by", actorOf(ctx))
	return connect.NewResponse(&segmeshv1.RevokeOperatorResponse{}), nil
}

func tokenInfo(t store.Token) *segmeshv1.TokenInfo {
	info := &segmeshv1.TokenInfo{
		Id: t.ID, Labels: t.Labels, CreatedUnix: t.CreatedAt.Unix(), ExpiresUnix: t.ExpiresAt.Unix(),
		Reusable: t.Reusable, Uses: int64(t.Uses), UsedBy: t.UsedBy, Creator: t.Creator, Name: t.Name,
	}
	if !t.RevokedAt.IsZero() {
		info.RevokedUnix = t.RevokedAt.Unix()
	}
	return info
}

// ListTokens implements OperatorService.ListTokens: every join token with its
// labels, expiry and uses, oldest first; never a secret (the store has only its
// hash).
func (s *operatorService) ListTokens(ctx context.Context, _ *connect.Request[segmeshv1.ListTokensRequest]) (*connect.Response[segmeshv1.ListTokensResponse], error) {
	out := &segmeshv1.ListTokensResponse{}
	err := s.c.store.View(func(tx store.Tx) error {
		toks, err := tx.Tokens()
		slices.SortStableFunc(toks, func(a, b store.Token) int { return a.CreatedAt.Compare(b.CreatedAt) })
		for _, t := range toks {
			out.Tokens = append(out.Tokens, tokenInfo(t))
		}
		return err
	})
	if err != nil {
		return nil, internalOr("listing tokens", err)
	}
	return connect.NewResponse(out), nil
}

// RevokeToken implements OperatorService.RevokeToken: no enrollment succeeds with
// the token afterwards; nodes it enrolled stay. NotFound for an unknown ID,
// FailedPrecondition when revoked already.
func (s *operatorService) RevokeToken(ctx context.Context, req *connect.Request[segmeshv1.RevokeTokenRequest]) (*connect.Response[segmeshv1.RevokeTokenResponse], error) {
	c := s.c
	id := req.Msg.GetId()
	now := c.now()
	err := c.store.Update(func(tx store.Tx) error {
		t, ok, err := tx.Token(id)
		switch {
		case err != nil:
			return err
		case !ok:
			return connect.NewError(connect.CodeNotFound, fmt.Errorf("no join token with ID %q (see `segmesh token list`)", id))
		case !t.RevokedAt.IsZero():
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("join token %s was already revoked at %s", id, t.RevokedAt.UTC().Format(timeFormat)))
		}
		t.RevokedAt = now
		if err := tx.PutToken(t); err != nil {
			return err
		}
		return tx.AppendAudit(store.AuditEntry{Time: now, Actor: actorOf(ctx), Action: "token.revoke", Object: "token:" + id, Result: "ok", Detail: fmt.Sprintf("labels %s, %d uses", formatLabelMap(t.Labels), t.Uses)})
	})
	if err != nil {
		return nil, internalOr("revoking token "+id, err)
	}
	c.log.Info("join token revoked", "id", id, "by", actorOf(ctx))
	return connect.NewResponse(&segmeshv1.RevokeTokenResponse{}), nil
}
