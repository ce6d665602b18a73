package dataplane

import (
	"context"
	"errors"
	"net/netip"
)

// ErrNoSTUN is returned by STUN.Binding when the WireGuard socket cannot carry
// STUN: kernel WireGuard owns its UDP socket in the kernel, so nothing else can
// send from it or see what arrives on it; also before the device exists.
var ErrNoSTUN = errors.New("the WireGuard socket cannot carry STUN (kernel WireGuard, or no device yet)")

// STUN is implemented by dataplanes whose WireGuard UDP socket can also send and
// receive STUN (RFC 8489) messages: embedded wireguard-go (see
// agent/dataplane/stunbind). The agent uses it to learn the NAT mapping of its
// WireGuard port from a STUN server, and to check that a peer's endpoint
// candidate answers from the peer's own WireGuard socket (a connectivity check,
// as in ICE, RFC 8445), which also opens this host's NAT towards it.
type STUN interface {
	// Binding sends a Binding request to dst from the WireGuard socket,
	// retransmitting until an answer arrives or ctx ends, and returns the
	// address dst saw the request come from. It returns ErrNoSTUN (wrapped)
	// when the socket cannot carry STUN.
	Binding(ctx context.Context, dst netip.AddrPort) (netip.AddrPort, error)
}

// PeerState is where a WireGuard device sends to one peer now and what it counts.
type PeerState struct {
	// Endpoint is the configured endpoint, or the source of the peer's latest
	// authenticated packet (WireGuard roaming); zero when none.
	Endpoint netip.AddrPort
	PeerStats
}

// PeerReader is implemented by dataplanes that read the WireGuard peers alone,
// fresh from the device (Read may serve a cached read of the device, which
// does not see roaming or handshakes): the path selection asks it before it
// falls back to a relay.
type PeerReader interface {
	// ReadPeers returns the state of every peer of the device; an empty map
	// when the device does not exist.
	ReadPeers(ctx context.Context) (map[Key]PeerState, error)
}
