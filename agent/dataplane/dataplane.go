// Package dataplane defines the seam between the agent's reconcile logic and the
// kernel: the desired State of one node's overlay (WireGuard device, addresses,
// routes, nftables filter) and the Dataplane interface that programs and reads it.
//
// This package itself touches no kernel API; the Linux implementation lives in
// agent/dataplane/linux and an in-memory one for tests in agent/dataplane/fake.
package dataplane

import (
	"context"
	"net/netip"

	"segmesh/policy"
)

// Kind names how WireGuard is provided on a host.
type Kind string

const (
	// KindKernel is the in-kernel WireGuard module, driven through netlink.
	KindKernel Kind = "kernel"
	// KindUserspace is embedded wireguard-go on a TUN device, driven through its UAPI socket.
	KindUserspace Kind = "userspace"
)

// Key is a Curve25519 WireGuard key (32 bytes).
type Key [32]byte

// Peer is one WireGuard peer as programmed on the device.
type Peer struct {
	PublicKey Key
	// Endpoint is the underlay address; the zero value means "unknown, wait for the peer".
	Endpoint netip.AddrPort
	// AllowedIPs is the set of overlay prefixes routed to and accepted from this peer,
	// sorted by Prefix.String order.
	AllowedIPs []netip.Prefix
	// PersistentKeepalive is in seconds; 0 disables it.
	PersistentKeepalive int
}

// Filter types are shared with the policy compiler, which produces them.
type (
	Protocol   = policy.Protocol
	PortRange  = policy.PortRange
	PortMatch  = policy.PortMatch
	AddressSet = policy.AddressSet
	FilterRule = policy.FilterRule
	Filter     = policy.Filter
)

// Protocols, as in package policy.
const (
	ProtoAny  = policy.ProtoAny
	ProtoTCP  = policy.ProtoTCP
	ProtoUDP  = policy.ProtoUDP
	ProtoICMP = policy.ProtoICMP
)

// State is the complete desired (or observed) dataplane of one node.
type State struct {
	// Interface is the overlay link name, at most 15 bytes (IFNAMSIZ-1).
	Interface  string
	PrivateKey Key
	ListenPort int
	// Addresses are the node's overlay addresses (/32 and /128).
	Addresses []netip.Prefix
	// Routes are prefixes routed into the overlay interface (the overlay prefixes).
	Routes []netip.Prefix
	// MTU of the overlay link in bytes; 0 means the implementation default (1420).
	MTU    int
	Peers  []Peer
	Filter Filter
}

// Dataplane programs and reads the kernel state of one overlay interface.
// Implementations must make Apply idempotent and converge from any prior state
// (including one left by a previous process), and must replace the nftables table
// in a single atomic batch.
type Dataplane interface {
	// Apply makes the kernel hold exactly s. It returns a wrapped error naming the
	// step that failed; the filter is either fully applied or unchanged.
	Apply(ctx context.Context, s State) error
	// Read returns what the kernel holds now, in canonical form (see Canonical), and
	// how it differs from what the last successful Apply made it hold.
	Read(ctx context.Context) (Observed, error)
	// Kind reports how WireGuard is provided; valid after the first Apply.
	Kind() Kind
	// Down removes the interface and the nftables table. It is not an error when
	// they do not exist.
	Down(ctx context.Context) error
	// Close releases process resources (e.g. the userspace WireGuard device) without
	// tearing down kernel state that outlives the process.
	Close() error
}
