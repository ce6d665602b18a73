// Package netmap turns a wire netmap (segmesh.v1.Netmap) into a validated Go value.
// Parse checks the hash the controller put in the message and every field an agent
// programs into the kernel, so the reconcile logic only sees well-formed data.
package netmap

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"fmt"
	"net/netip"
	"slices"

	"segmesh/agent/dataplane"
	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
)

// Netmap is a validated netmap.
type Netmap struct {
	Revision uint64
	// Hash is the hex hash the controller computed, in the version the message's
	// hash_version names (wire.HashOf: wire.NetmapHash or wire.NetmapHashV2).
	Hash string
	Self Node
	// Peers are sorted as the controller sent them; keys are unique.
	Peers  []Peer
	Filter dataplane.Filter
	// Gossip is the memberlist configuration; Gossip.Enabled() is false when the
	// controller sent no key.
	Gossip          Gossip
	OverlayPrefixes []netip.Prefix
	// Revoked is true when an operator revoked this node; Peers, Filter and Gossip
	// are then always empty (default deny), whatever the message held.
	Revoked bool
	// KeyRotation is the WireGuard key rotation generation the operator requested;
	// 0 for none.
	KeyRotation uint64
}

// Node is this node as the controller sees it.
type Node struct {
	Name      string
	Labels    map[string]string
	Addresses []netip.Prefix
	PublicKey dataplane.Key
	// Endpoint is the underlay address the controller knows; zero when unknown.
	Endpoint netip.AddrPort
}

// Peer is one authorised WireGuard peer.
type Peer struct {
	Name      string
	PublicKey dataplane.Key
	// Endpoint is the underlay address; zero when the controller does not know it.
	Endpoint   netip.AddrPort
	AllowedIPs []netip.Prefix
	// IdentityKey is the ECDSA P-256 key that signs the peer's gossip endpoint
	// claims; nil when the controller does not know it (gossip then never sets the
	// peer's endpoint).
	IdentityKey *ecdsa.PublicKey
	// Candidates are the endpoints the peer may be reached at, best first, as the
	// controller sent them (see Candidate); invalid ones are left out.
	Candidates []Candidate
}

// Candidate kinds (segmesh.v1.Candidate.kind).
const (
	CandidateLocal    = "local"    // an address of the peer's host
	CandidateObserved = "observed" // the source address the controller sees, with the WireGuard port
	CandidateSTUN     = "stun"     // the mapping a STUN server saw for the peer's WireGuard socket
	CandidateRelay    = "relay"    // a port on a relay node that forwards to the peer
)

// Candidate is one possible endpoint of a peer.
type Candidate struct {
	Endpoint netip.AddrPort
	// Kind is one of the Candidate* constants.
	Kind string
	// Relay is the relay node's name for kind CandidateRelay.
	Relay string
}

// MaxCandidates is the most candidates kept per peer; the controller sends at
// most 8 direct ones plus relays.
const MaxCandidates = 16

// ParseCandidates returns the valid candidates of cs, in order, at most
// MaxCandidates: an endpoint "ip:port" with a non-zero port, a known kind, a
// relay name for (only) kind relay, and no endpoint twice. Candidates are
// advice (the peer is still only what the netmap authorises), so an invalid one
// is dropped rather than failing the netmap.
func ParseCandidates(cs []*segmeshv1.Candidate) []Candidate {
	var out []Candidate
	for _, c := range cs {
		ep, err := netip.ParseAddrPort(c.GetEndpoint())
		if err != nil || ep.Port() == 0 || ep.Addr().IsUnspecified() || ep.Addr().IsMulticast() {
			continue
		}
		ep = netip.AddrPortFrom(ep.Addr().Unmap(), ep.Port())
		switch k := c.GetKind(); {
		case k == CandidateRelay && c.GetRelay() != "":
		case (k == CandidateLocal || k == CandidateObserved || k == CandidateSTUN) && c.GetRelay() == "":
		default:
			continue
		}
		if slices.ContainsFunc(out, func(o Candidate) bool { return o.Endpoint == ep }) {
			continue
		}
		out = append(out, Candidate{Endpoint: ep, Kind: c.GetKind(), Relay: c.GetRelay()})
		if len(out) == MaxCandidates {
			break
		}
	}
	return out
}

// Gossip configures memberlist.
type Gossip struct {
	// Key is the 32-byte AES-256 key; nil disables gossip.
	Key  []byte
	Port int
}

// Enabled reports whether the controller configured gossip.
func (g Gossip) Enabled() bool { return len(g.Key) > 0 && g.Port > 0 }

// Peer returns the peer with public key k.
func (n *Netmap) Peer(k dataplane.Key) (Peer, bool) {
	for _, p := range n.Peers {
		if p.PublicKey == k {
			return p, true
		}
	}
	return Peer{}, false
}

// Parse verifies nm's hash (wire.HashOf: hash_version 0 is version 1, 2 is
// version 2) and converts it. It returns an error naming the field (and peer)
// that is invalid: an unknown hash version, a hash mismatch, a malformed key, identity key (not
// PKIX ECDSA P-256), endpoint, prefix or filter, a duplicate peer key, or a gossip
// key that is not 16, 24 or 32 bytes.
//
// A revoked netmap (revoked set) needs only a valid hash, self and overlay
// prefixes: its peers, filter and gossip configuration are dropped unread, so that
// it always means default deny.
func Parse(nm *segmeshv1.Netmap) (*Netmap, error) {
	if nm == nil {
		return nil, fmt.Errorf("netmap: nil message")
	}
	got, err := wire.HashOf(nm)
	if err != nil {
		return nil, fmt.Errorf("netmap revision %d: %w (this agent knows hash versions 0 and %d; upgrade the agent)", nm.GetPolicyRevision(), err, wire.HashVersion2)
	}
	if got != nm.GetHash() {
		return nil, fmt.Errorf("netmap revision %d: hash mismatch (hash version %d): message says %q, content hashes to %q", nm.GetPolicyRevision(), nm.GetHashVersion(), nm.GetHash(), got)
	}
	out := &Netmap{Revision: nm.GetPolicyRevision(), Hash: nm.GetHash(), Revoked: nm.GetRevoked(), KeyRotation: nm.GetKeyRotation()}
	self := nm.GetSelf()
	if self.GetName() == "" {
		return nil, fmt.Errorf("netmap: self: empty name")
	}
	out.Self = Node{Name: self.GetName(), Labels: self.GetLabels()}
	if out.Self.Addresses, err = wire.ParsePrefixes(self.GetAddresses()); err != nil {
		return nil, fmt.Errorf("netmap: self addresses: %w", err)
	}
	if len(self.GetPublicKey()) != 0 {
		if out.Self.PublicKey, err = parseKey(self.GetPublicKey()); err != nil {
			return nil, fmt.Errorf("netmap: self public key: %w", err)
		}
	}
	if out.Self.Endpoint, err = parseEndpoint(self.GetEndpoint()); err != nil {
		return nil, fmt.Errorf("netmap: self endpoint: %w", err)
	}
	if out.OverlayPrefixes, err = wire.ParsePrefixes(nm.GetOverlayPrefixes()); err != nil {
		return nil, fmt.Errorf("netmap: overlay prefixes: %w", err)
	}
	if out.Revoked {
		return out, nil
	}
	seen := map[dataplane.Key]string{}
	for i, p := range nm.GetPeers() {
		name := p.GetName()
		if name == "" {
			name = fmt.Sprintf("#%d", i)
		}
		k, err := parseKey(p.GetPublicKey())
		if err != nil {
			return nil, fmt.Errorf("netmap: peer %s: public key: %w", name, err)
		}
		if other, dup := seen[k]; dup {
			return nil, fmt.Errorf("netmap: peer %s: public key already used by peer %s", name, other)
		}
		seen[k] = name
		ep, err := parseEndpoint(p.GetEndpoint())
		if err != nil {
			return nil, fmt.Errorf("netmap: peer %s: endpoint: %w", name, err)
		}
		ips, err := wire.ParsePrefixes(p.GetAllowedIps())
		if err != nil {
			return nil, fmt.Errorf("netmap: peer %s: allowed IPs: %w", name, err)
		}
		var idKey *ecdsa.PublicKey
		if len(p.GetIdentityKey()) != 0 {
			if idKey, err = parseIdentityKey(p.GetIdentityKey()); err != nil {
				return nil, fmt.Errorf("netmap: peer %s: identity key: %w", name, err)
			}
		}
		out.Peers = append(out.Peers, Peer{Name: p.GetName(), PublicKey: k, Endpoint: ep, AllowedIPs: ips, IdentityKey: idKey, Candidates: ParseCandidates(p.GetCandidates())})
	}
	if out.Filter, err = wire.FilterFromProto(nm.GetFilter()); err != nil {
		return nil, fmt.Errorf("netmap: filter: %w", err)
	}
	if g := nm.GetGossip(); g != nil && len(g.GetKey()) > 0 {
		switch len(g.GetKey()) {
		case 16, 24, 32:
		default:
			return nil, fmt.Errorf("netmap: gossip key: %d bytes, want 16, 24 or 32", len(g.GetKey()))
		}
		if g.GetPort() == 0 || g.GetPort() > 65535 {
			return nil, fmt.Errorf("netmap: gossip port %d out of range", g.GetPort())
		}
		out.Gossip = Gossip{Key: append([]byte(nil), g.GetKey()...), Port: int(g.GetPort())}
	}
	return out, nil
}

func parseKey(b []byte) (dataplane.Key, error) {
	var k dataplane.Key
	if len(b) != len(k) {
		return k, fmt.Errorf("%d bytes, want %d", len(b), len(k))
	}
	copy(k[:], b)
	return k, nil
}

// parseIdentityKey parses the PKIX DER of an ECDSA P-256 public key.
func parseIdentityKey(der []byte) (*ecdsa.PublicKey, error) {
	k, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, err
	}
	ek, ok := k.(*ecdsa.PublicKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, fmt.Errorf("want an ECDSA P-256 key, got %T", k)
	}
	return ek, nil
}

// parseEndpoint parses "ip:port"; the empty string is the zero AddrPort.
func parseEndpoint(s string) (netip.AddrPort, error) {
	if s == "" {
		return netip.AddrPort{}, nil
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("%s: port 0", s)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}
