package controller

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/subtle"
	"crypto/x509"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/jointoken"
	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
	"segmesh/controller/ipam"
	"segmesh/controller/netmap"
	"segmesh/controller/pki"
	"segmesh/controller/store"
	"segmesh/policy"
)

// Messages of refused enrollments; agents print them as they are.
const msgInvalidToken = "join token is not valid (unknown token or wrong secret)"

type enrollService struct {
	c *Controller
}

func ipamCursorKey(p netip.Prefix) string { return "ipam/cursor/" + p.String() }

// Enroll implements EnrollService.Enroll: it checks the join token, allocates
// the node's overlay addresses and records node and token use in one
// transaction, then signs the node's client certificate (valid for
// Options.NodeCertTTL).
//
// A name that is already enrolled can enroll again only with proof of possession
// of that node's current identity: the CSR must be for the node's current TLS key
// (a CSR is signed with its key) and the WireGuard key must be unchanged. A join
// token plus public data (name, WireGuard public key) is never enough; an operator
// who wants to hand the name to a new host runs `segmesh nodes delete` first.
//
// Errors: Unauthenticated for an unknown token or a wrong secret,
// PermissionDenied for an expired, used, revoked or foreign token, for a revoked
// node, and for a re-enrollment without proof of possession, InvalidArgument for
// a bad name, key, endpoint or CSR, AlreadyExists when the WireGuard key belongs
// to another node, ResourceExhausted when the overlay is full or when the caller's
// address or the token ID had too many refusals (see refusalLimiter).
func (s *enrollService) Enroll(ctx context.Context, req *connect.Request[segmeshv1.EnrollRequest]) (*connect.Response[segmeshv1.EnrollResponse], error) {
	c := s.c
	m := req.Msg
	now := c.now()
	source := sourceAddr(req.Peer().Addr)
	tok, err := jointoken.Decode(m.GetToken())
	tokenID := ""
	if err == nil {
		tokenID = tok.IDString()
	}
	name, secretOK, resp, err := s.enroll(ctx, now, m, tok, err)
	if err != nil && !secretOK && c.enrollLimits.sourceBlocked(now, source) {
		// Without the right secret, a source past its budget learns nothing more.
		c.refuseEnrollment(now, source, tokenID, name, "rate limited")
		c.metrics.enrolled(err, true)
		return nil, connect.NewError(connect.CodeResourceExhausted, errors.New("too many refused enrollments from this address; wait a minute before retrying"))
	}
	if err != nil {
		if ce := new(connect.Error); errors.As(err, &ce) && ce.Code() != connect.CodeInternal && ce.Code() != connect.CodeResourceExhausted {
			// Every refusal counts against the source; only a wrong secret counts
			// against the token ID.
			charged := ""
			if ce.Code() == connect.CodeUnauthenticated {
				charged = tokenID
			}
			c.enrollLimits.refused(now, source, charged)
			c.refuseEnrollment(now, source, tokenID, name, ce.Message())
		}
		c.metrics.enrolled(err, false)
		return nil, err
	}
	c.metrics.enrolled(nil, false)
	return resp, nil
}

// refuseEnrollment logs and audits one refused enrollment, within the refusal log
// budget.
func (c *Controller) refuseEnrollment(now time.Time, source netip.Addr, tokenID, name, reason string) {
	ok, suppressed := c.enrollLimits.logAllowed(now)
	if !ok {
		return
	}
	// The name comes from an unauthenticated client: record it quoted and
	// bounded, so that it can neither forge lines nor grow the log.
	if !policy.ValidNodeName(name) {
		name = boundedQuote(name, 64)
	}
	c.log.Info("enrollment refused", "name", name, "token_id", tokenID, "source", source, "reason", reason, "suppressed_since_last", suppressed)
	actor := "token:" + tokenID
	if tokenID == "" {
		actor = "unknown"
	}
	detail := fmt.Sprintf("from %s", source)
	if suppressed > 0 {
		detail += fmt.Sprintf("; %d more refusals since the previous record were not recorded", suppressed)
	}
	if err := c.store.Update(func(tx store.Tx) error {
		return tx.AppendAudit(store.AuditEntry{Time: now, Actor: actor, Action: "node.enroll", Object: "node:" + name, Result: "refused: " + reason, Detail: detail})
	}); err != nil {
		c.log.Error("recording a refused enrollment in the audit log", "err", err)
	}
}

// boundedQuote returns s as a Go string literal of at most max bytes of s.
func boundedQuote(s string, max int) string {
	if len(s) > max {
		return strconv.Quote(s[:max]) + "…"
	}
	return strconv.Quote(s)
}

// enroll does the work of Enroll; tokErr is the error of decoding tok. It returns
// the node name it worked on (for the refusal record).
// secretOK reports whether the request carried a token's right secret: Enroll
// throttles a source that used up its refusal budget only for requests without
// one, so that hosts behind one NAT address cannot lock each other out (the
// secret check is cheap).
func (s *enrollService) enroll(ctx context.Context, now time.Time, m *segmeshv1.EnrollRequest, tok jointoken.Token, tokErr error) (name string, secretOK bool, _ *connect.Response[segmeshv1.EnrollResponse], _ error) {
	c := s.c
	name = m.GetName()
	if tokErr != nil {
		return name, false, nil, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("join token is not valid: %w", tokErr))
	}
	if !tok.MatchesCA(c.ca.CACertDER()) {
		return name, secretOK, nil, connect.NewError(connect.CodePermissionDenied, errors.New("join token was issued by a different controller (its CA fingerprint does not match this controller's CA)"))
	}
	if len(m.GetPublicKey()) != 32 {
		return name, secretOK, nil, invalidArg("WireGuard public key must be 32 bytes, got %d", len(m.GetPublicKey()))
	}
	if bytes.Equal(m.GetPublicKey(), make([]byte, 32)) {
		return name, secretOK, nil, invalidArg("WireGuard public key is all zeros")
	}
	if ep := m.GetEndpoint(); ep != "" {
		if err := validateEndpoint(ep, c.opts.OverlayPrefixes); err != nil {
			return name, secretOK, nil, connect.NewError(connect.CodeInvalidArgument, err)
		}
	}
	if name != "" {
		if err := checkNodeName(name, ""); err != nil {
			return name, secretOK, nil, err
		}
	}
	_, pol := c.policyInForce()
	named := policyNamedNodes(pol)

	secretHash := tok.SecretHash()
	notAfter := now.Add(c.opts.NodeCertTTL)
	var node store.Node
	var labels map[string]string
	var created bool
	var csr *x509.CertificateRequest
	err := c.store.Update(func(tx store.Tx) error {
		t, ok, err := tx.Token(tok.IDString())
		if err != nil {
			return err
		}
		// Compare against a dummy hash when the ID is unknown so both refusals
		// take the same time.
		want := t.SecretHash
		if !ok || len(want) != len(secretHash) {
			want = make([]byte, len(secretHash))
		}
		if subtle.ConstantTimeCompare(want, secretHash[:]) != 1 || !ok {
			if c.enrollLimits.tokenBlocked(now, tok.IDString()) {
				return connect.NewError(connect.CodeResourceExhausted, errors.New("too many wrong secrets for this join token; wait a minute before retrying"))
			}
			return connect.NewError(connect.CodeUnauthenticated, errors.New(msgInvalidToken))
		}
		secretOK = true
		// The name: the one asked for, else the token's, else the host name's.
		switch {
		case name == "" && t.Name != "":
			name = t.Name
		case name == "":
			name = strings.ToLower(m.GetHostname())
			if err := checkNodeName(name, " derived from the host name"); err != nil {
				return err
			}
		}
		if t.Name != "" && name != t.Name {
			return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("join token is bound to node name %q, not %q", t.Name, name))
		}
		// Only a token holder gets the certificate request parsed and checked.
		if csr, err = pki.ParseCSR(m.GetCsrDer()); err != nil {
			return connect.NewError(connect.CodeInvalidArgument, err)
		}
		idKey := identityKey(csr)
		if idKey == nil {
			return invalidArg("the certificate request's key must be ECDSA P-256")
		}
		if !t.RevokedAt.IsZero() {
			return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("join token was revoked at %s; create a new one with `segmesh token create`", t.RevokedAt.UTC().Format(timeFormat)))
		}
		if !now.Before(t.ExpiresAt) {
			return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("join token expired at %s; create a new one with `segmesh token create` (--ttl sets its lifetime)", t.ExpiresAt.UTC().Format(timeFormat)))
		}
		existing, exists, err := tx.Node(name)
		if err != nil {
			return err
		}
		if exists {
			if err := checkReenrollment(existing, m.GetPublicKey(), idKey); err != nil {
				return err
			}
		} else if seg, trusted := named[name]; trusted && t.Name != name {
			return connect.NewError(connect.CodePermissionDenied, fmt.Errorf(
				"node name %q is named in segment %q of the policy in force, so it enrolls only with a join token bound to that name: `segmesh token create --name %s ...`", name, seg, name))
		}
		// A single-use token may be presented again only by the node it enrolled,
		// with proof of possession (checked above): an agent retrying after losing
		// the response, or re-enrolling after its certificate expired.
		if !t.Reusable && t.UsedBy != "" && !(exists && t.UsedBy == name) {
			return connect.NewError(connect.CodePermissionDenied, fmt.Errorf(
				"join token was already used by node %q at %s (it is single-use; create a new one with `segmesh token create`)",
				t.UsedBy, t.UsedAt.UTC().Format(timeFormat)))
		}
		if !exists {
			owner, taken, err := tx.NodeByPublicKey(m.GetPublicKey())
			if err != nil {
				return err
			}
			if taken {
				return connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("WireGuard public key already belongs to node %q", owner))
			}
			node = store.Node{Name: name, EnrolledAt: now, PublicKey: m.GetPublicKey()}
			if node.Addresses, err = allocate(tx, c.opts.OverlayPrefixes, name, now); err != nil {
				return err
			}
			created = true
		} else {
			node = existing
		}
		node.IdentityKey = idKey
		node.PrevIdentityKey, node.PrevIdentityUntil = nil, time.Time{}
		node.CertNotAfter = notAfter
		node.Hostname = m.GetHostname()
		if created {
			// The token binds the labels of a new node. An enrolled node keeps
			// the labels it has (an operator may have changed them, and
			// relabeling goes through the policy's tests).
			node.Labels = t.Labels
			node.TokenID = t.ID
		}
		if m.GetEndpoint() != "" {
			node.Endpoint = m.GetEndpoint()
		}
		if err := tx.PutNode(node); err != nil {
			return err
		}
		// A node presenting the token that enrolled it again (a retry) does not
		// use it up again.
		if created || t.UsedBy != name {
			t.Uses++
			if t.UsedBy == "" {
				t.UsedBy, t.UsedAt = name, now
			}
			if err := tx.PutToken(t); err != nil {
				return err
			}
		}
		labels = node.Labels
		action := "node.enroll"
		if !created {
			action = "node.reenroll"
		}
		return tx.AppendAudit(store.AuditEntry{
			Time: now, Actor: "token:" + t.ID, Action: action, Object: "node:" + name, Result: "ok",
			Detail: fmt.Sprintf("addresses %v labels %s hostname %s", node.Addresses, formatLabelMap(node.Labels), boundedQuote(m.GetHostname(), 64)),
		})
	})
	if err != nil {
		if ce := new(connect.Error); errors.As(err, &ce) {
			return name, secretOK, nil, ce
		}
		if errors.Is(err, ipam.ErrExhausted) {
			return name, secretOK, nil, connect.NewError(connect.CodeResourceExhausted, err)
		}
		return name, secretOK, nil, connect.NewError(connect.CodeInternal, fmt.Errorf("enrolling node %s: %w", name, err))
	}
	certDER, err := c.ca.SignClient(csr, name, notAfter)
	if err != nil {
		return name, secretOK, nil, connect.NewError(connect.CodeInternal, err)
	}
	c.log.Info("node enrolled", "name", name, "new", created, "addresses", node.Addresses, "labels", labels, "token_id", tok.IDString(), "cert_not_after", notAfter)
	c.nodesChanged(name)
	return name, secretOK, connect.NewResponse(&segmeshv1.EnrollResponse{
		NodeName:        name,
		Addresses:       netmap.HostPrefixes(node.Addresses),
		CertificateDer:  certDER,
		CaDer:           c.ca.CACertDER(),
		Labels:          labels,
		OverlayPrefixes: wire.PrefixStrings(c.opts.OverlayPrefixes),
	}), nil
}

// checkNodeName refuses a node name that is not valid or is reserved; what says
// where the name came from, for the message.
func checkNodeName(name, what string) error {
	if !policy.ValidNodeName(name) {
		return invalidArg("node name %q%s is not valid (want %s); choose a name with --name", name, what, policy.NodeNameSyntax)
	}
	if name == policy.AllSegment {
		return invalidArg("node name %q is reserved: policies use it for the built-in segment of every node; choose another --name", name)
	}
	return nil
}

// policyNamedNodes returns the node names that segments of pol list explicitly
// (nodes:), each with the first segment that lists it.
func policyNamedNodes(pol *policy.Policy) map[string]string {
	out := map[string]string{}
	if pol == nil {
		return out
	}
	for _, seg := range pol.Segments {
		for _, n := range seg.Nodes {
			if _, ok := out[n]; !ok {
				out[n] = seg.Name
			}
		}
	}
	return out
}

// checkReenrollment allows enrolling an existing node again only when the
// request proves possession of its current identity: a CSR for its current TLS
// key (idKey, PKIX DER) and the same WireGuard key. Everything else is refused
// with PermissionDenied, naming what the operator can do.
func checkReenrollment(n store.Node, wgKey, idKey []byte) error {
	if n.Revoked() {
		return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("node %q was revoked at %s; it cannot enroll again until an operator runs `segmesh nodes delete %s`", n.Name, n.RevokedAt.UTC().Format(timeFormat), n.Name))
	}
	if len(n.IdentityKey) == 0 || !bytes.Equal(n.IdentityKey, idKey) {
		return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("node %q is already enrolled; enrolling it again needs its current identity (the TLS key in its agent's state directory), or an operator must run `segmesh nodes delete %s` first; choose another name for a new host", n.Name, n.Name))
	}
	if !bytes.Equal(n.PublicKey, wgKey) {
		return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("node %q is enrolled with a different WireGuard public key; rotate keys with `segmesh nodes rotate-key %s`", n.Name, n.Name))
	}
	return nil
}

// allocate claims the next free address of every prefix for node, advancing each
// prefix's cursor, inside tx.
// Addresses of deleted nodes are skipped while quarantined (until after now).
func allocate(tx store.Tx, prefixes []netip.Prefix, node string, now time.Time) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, p := range prefixes {
		var cursor netip.Addr
		raw, err := tx.Meta(ipamCursorKey(p))
		if err != nil {
			return nil, err
		}
		if raw != nil {
			if err := cursor.UnmarshalText(raw); err != nil {
				return nil, fmt.Errorf("decoding IPAM cursor of %s: %w", p, err)
			}
		}
		a, err := ipam.Next(p, cursor, func(a netip.Addr) (bool, error) {
			if _, used, err := tx.AddressOwner(a); used || err != nil {
				return used, err
			}
			until, quarantined, err := tx.AddressQuarantine(a)
			return quarantined && now.Before(until), err
		})
		if err != nil {
			return nil, fmt.Errorf("allocating an overlay address for node %s: %w", node, err)
		}
		if err := tx.ClaimAddress(a, node); err != nil {
			return nil, err
		}
		if err := tx.PutMeta(ipamCursorKey(p), []byte(a.String())); err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	return out, nil
}

// identityKey returns the PKIX DER of csr's public key when it is ECDSA P-256 (the
// key agents sign gossip endpoint claims with), else nil.
func identityKey(csr *x509.CertificateRequest) []byte {
	if k, ok := csr.PublicKey.(*ecdsa.PublicKey); ok && k.Curve == elliptic.P256() {
		return bytes.Clone(csr.RawSubjectPublicKeyInfo)
	}
	return nil
}

// validateEndpoint checks that ep is "ip:port" with a non-zero port and a
// unicast address a peer on another host can send to: not unspecified,
// loopback, multicast, link-local or the IPv4 broadcast address (peers would
// send their WireGuard packets to their own host's services or to a whole
// network), and not inside the overlay prefixes (WireGuard does not run over
// itself).
func validateEndpoint(ep string, overlay []netip.Prefix) error {
	ap, err := netip.ParseAddrPort(ep)
	if err != nil {
		return fmt.Errorf("endpoint %q is not ip:port: %w", ep, err)
	}
	a := ap.Addr().Unmap()
	switch {
	case ap.Port() == 0 || !a.IsValid() || a.IsUnspecified():
		return fmt.Errorf("endpoint %q: want a specific IP address and a non-zero port", ep)
	case a.IsLoopback() || a.IsMulticast() || a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) || a.Zone() != "":
		return fmt.Errorf("endpoint %q: a loopback, link-local, multicast or broadcast address is no endpoint peers on other hosts can reach; advertise the host's underlay address (--endpoint)", ep)
	}
	for _, p := range overlay {
		if p.Contains(a) {
			return fmt.Errorf("endpoint %q lies in the overlay prefix %s; advertise the host's underlay address (--endpoint)", ep, p)
		}
	}
	return nil
}

func invalidArg(format string, args ...any) error {
	return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf(format, args...))
}
