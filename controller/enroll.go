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
// transaction, then signs the node's client certificate. Errors: Unauthenticated for an unknown token or a wrong secret,
// PermissionDenied for an expired, used or foreign token, InvalidArgument for a
// bad name, key, endpoint or CSR, AlreadyExists when the name or the WireGuard
// key belongs to another node, ResourceExhausted when the overlay is full.
func (s *enrollService) Enroll(ctx context.Context, req *connect.Request[segmeshv1.EnrollRequest]) (*connect.Response[segmeshv1.EnrollResponse], error) {
	c := s.c
	m := req.Msg
	tok, err := jointoken.Decode(m.GetToken())
	if err != nil {
		return nil, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("join token is not valid: %w", err))
	}
	if !tok.MatchesCA(c.ca.CACertDER()) {
		return nil, connect.NewError(connect.CodePermissionDenied, errors.New("join token was issued by a different controller (its CA fingerprint does not match this controller's CA)"))
	}
	if len(m.GetPublicKey()) != 32 {
		return nil, invalidArg("WireGuard public key must be 32 bytes, got %d", len(m.GetPublicKey()))
	}
	if bytes.Equal(m.GetPublicKey(), make([]byte, 32)) {
		return nil, invalidArg("WireGuard public key is all zeros")
	}
	if ep := m.GetEndpoint(); ep != "" {
		if err := validateEndpoint(ep); err != nil {
			return nil, connect.NewError(connect.CodeInvalidArgument, err)
		}
	}
	csr, err := pki.ParseCSR(m.GetCsrDer())
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	name := m.GetName()
	if name == "" {
		name = strings.ToLower(m.GetHostname())
		if !policy.ValidNodeName(name) {
			return nil, invalidArg("node name %q derived from the host name is not valid (want %s); choose a name with --name", name, policy.NodeNameSyntax)
		}
	} else if !policy.ValidNodeName(name) {
		return nil, invalidArg("node name %q is not valid (want %s)", name, policy.NodeNameSyntax)
	}
	if name == policy.AllSegment {
		return nil, invalidArg("node name %q is reserved: policies use it for the built-in segment of every node; choose another --name", name)
	}

	now := c.now()
	secretHash := tok.SecretHash()
	var node store.Node
	var labels map[string]string
	var created bool
	err = c.store.Update(func(tx store.Tx) error {
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
			return connect.NewError(connect.CodeUnauthenticated, errors.New(msgInvalidToken))
		}
		if !now.Before(t.ExpiresAt) {
			return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("join token expired at %s; create a new one with `segmesh token create` (--ttl sets its lifetime)", t.ExpiresAt.UTC().Format(time.RFC3339)))
		}
		existing, exists, err := tx.Node(name)
		if err != nil {
			return err
		}
		if exists && !bytes.Equal(existing.PublicKey, m.GetPublicKey()) {
			return connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("node %q is already enrolled with a different WireGuard public key; enroll under another name", name))
		}
		// A single-use token may be presented again only by the node it enrolled
		// (same name and key): an agent retrying after losing the response.
		if !t.Reusable && t.UsedBy != "" && !(exists && t.UsedBy == name) {
			return connect.NewError(connect.CodePermissionDenied, fmt.Errorf(
				"join token was already used by node %q at %s (it is single-use; create a new one with `segmesh token create`)",
				t.UsedBy, t.UsedAt.UTC().Format(time.RFC3339)))
		}
		if !exists {
			owner, taken, err := tx.NodeByPublicKey(m.GetPublicKey())
			if err != nil {
				return err
			}
			if taken {
				return connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("WireGuard public key already belongs to node %q", owner))
			}
			node = store.Node{Name: name, EnrolledAt: now}
			if node.Addresses, err = allocate(tx, c.opts.OverlayPrefixes, name); err != nil {
				return err
			}
			created = true
		} else {
			node = existing
		}
		node.PublicKey = m.GetPublicKey()
		node.IdentityKey = identityKey(csr)
		node.Labels = t.Labels
		node.TokenID = t.ID
		node.Hostname = m.GetHostname()
		if m.GetEndpoint() != "" {
			node.Endpoint = m.GetEndpoint()
		}
		if err := tx.PutNode(node); err != nil {
			return err
		}
		t.Uses++
		if t.UsedBy == "" {
			t.UsedBy, t.UsedAt = name, now
		}
		if err := tx.PutToken(t); err != nil {
			return err
		}
		labels = t.Labels
		action := "node.enroll"
		if !created {
			action = "node.reenroll"
		}
		return tx.AppendAudit(store.AuditEntry{
			Time: now, Actor: "token:" + t.ID, Action: action,
			Detail: fmt.Sprintf("node %s addresses %v labels %v hostname %q", name, node.Addresses, t.Labels, m.GetHostname()),
		})
	})
	if err != nil {
		if ce := new(connect.Error); errors.As(err, &ce) {
			c.log.Info("enrollment refused", "name", name, "token_id", tok.IDString(), "peer", req.Peer().Addr, "reason", ce.Message())
			return nil, ce
		}
		if errors.Is(err, ipam.ErrExhausted) {
			return nil, connect.NewError(connect.CodeResourceExhausted, err)
		}
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("enrolling node %s: %w", name, err))
	}
	certDER, err := c.ca.SignClient(csr, name)
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, err)
	}
	c.log.Info("node enrolled", "name", name, "new", created, "addresses", node.Addresses, "labels", labels, "token_id", tok.IDString())
	c.requestRecompute()
	return connect.NewResponse(&segmeshv1.EnrollResponse{
		NodeName:        name,
		Addresses:       netmap.HostPrefixes(node.Addresses),
		CertificateDer:  certDER,
		CaDer:           c.ca.CACertDER(),
		Labels:          labels,
		OverlayPrefixes: wire.PrefixStrings(c.opts.OverlayPrefixes),
	}), nil
}

// allocate claims the next free address of every prefix for node, advancing each
// prefix's cursor, inside tx.
func allocate(tx store.Tx, prefixes []netip.Prefix, node string) ([]netip.Addr, error) {
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
			_, used, err := tx.AddressOwner(a)
			return used, err
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

// validateEndpoint checks that ep is "ip:port" with a non-zero port.
func validateEndpoint(ep string) error {
	ap, err := netip.ParseAddrPort(ep)
	if err != nil {
		return fmt.Errorf("endpoint %q is not ip:port: %w", ep, err)
	}
	if ap.Port() == 0 || !ap.Addr().IsValid() || ap.Addr().IsUnspecified() {
		return fmt.Errorf("endpoint %q: want a specific IP address and a non-zero port", ep)
	}
	return nil
}

func invalidArg(format string, args ...any) error {
	return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf(format, args...))
}
