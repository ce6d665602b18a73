package controller

import (
	"context"
	"encoding/base64"
	"fmt"
	"math"
	"net/netip"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/controller/store"
	"segmesh/policy"
)

// One node in depth (GetNode): its status with the WireGuard peers its agent
// reported, and the peers its netmap lists. What an agent reports about its
// peers and applies is untrusted: it is checked and bounded here before the
// live status keeps it (liveTracker.report), so that at 10,000 nodes it costs
// at most maxReportedWireGuardPeers small records per node.

// Bounds of what an agent reports about its latest apply and its peers.
const (
	// maxReportedWireGuardPeers is the most peers kept per node (the agent
	// sends at most 64, see ReportRequest.peers); the rest are counted.
	maxReportedWireGuardPeers = 64
	// maxApplyDuration caps a reported apply duration.
	maxApplyDuration = time.Hour
	// maxEndpointLen bounds a reported endpoint before it is parsed:
	// "[" + the longest IPv6 text with a zone + "]:65535" is well below it.
	maxEndpointLen = 64
)

// reportedPeer is one WireGuard peer as a node's agent reported it, checked.
type reportedPeer struct {
	name      string // a valid node name, or ""
	key       [32]byte
	endpoint  netip.AddrPort // zero when none or invalid
	handshake int64          // Unix seconds, 0 for none; never after the report arrived
	rx, tx    uint64
	path      string // "direct", "relay" or "" (unknown)
	relay     string // for path "relay": a valid node name, or ""
}

// reportedApply returns the latest apply an agent reported (Unix ms, µs), checked:
// a time before 1970 is none (0, 0), one after now is now (the agent's clock
// may be ahead), a duration is at least 0 and at most maxApplyDuration.
func reportedApply(ms, us int64, now time.Time) (int64, int64) {
	if ms <= 0 {
		return 0, 0
	}
	ms = min(ms, now.UnixMilli())
	us = min(max(us, 0), maxApplyDuration.Microseconds())
	return ms, us
}

// reportedWireGuardPeers appends to dst the valid peers of ps, at most
// maxReportedWireGuardPeers, and returns them with the count of the peers left
// out: more (the agent's own count) plus those dropped here. A peer is dropped
// when its public key is not the base64 of 32 bytes or repeats an earlier one;
// an invalid name becomes "", an invalid endpoint (not ip:port with a port)
// none, a handshake before 1970 none and one after now now.
func reportedWireGuardPeers(dst []reportedPeer, ps []*segmeshv1.PeerStatus, more uint32, now time.Time) ([]reportedPeer, uint32) {
	left := uint64(more)
	for i, p := range ps {
		if len(dst) == maxReportedWireGuardPeers {
			left += uint64(len(ps) - i)
			break
		}
		rp, ok := reportedPeerOf(p, now)
		if ok {
			for _, q := range dst {
				if q.key == rp.key {
					ok = false
					break
				}
			}
		}
		if !ok {
			left++
			continue
		}
		dst = append(dst, rp)
	}
	return dst, uint32(min(left, math.MaxUint32))
}

// reportedPeerOf checks one reported peer (see reportedWireGuardPeers); false
// when it is to be dropped.
func reportedPeerOf(p *segmeshv1.PeerStatus, now time.Time) (reportedPeer, bool) {
	var rp reportedPeer
	k := p.GetPublicKey()
	if len(k) != base64.StdEncoding.EncodedLen(32) {
		return rp, false
	}
	if n, err := base64.StdEncoding.Decode(rp.key[:], []byte(k)); err != nil || n != 32 {
		return rp, false
	}
	if policy.ValidNodeName(p.GetName()) {
		rp.name = p.GetName()
	}
	if ep := p.GetEndpoint(); ep != "" && len(ep) <= maxEndpointLen {
		if ap, err := netip.ParseAddrPort(ep); err == nil && ap.Port() != 0 && ap.Addr().Zone() == "" {
			rp.endpoint = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
	}
	rp.handshake = min(max(p.GetLastHandshakeUnix(), 0), now.Unix())
	rp.rx, rp.tx = p.GetRxBytes(), p.GetTxBytes()
	switch p.GetPath() {
	case "direct":
		rp.path = "direct"
	case "relay":
		rp.path = "relay"
		if policy.ValidNodeName(p.GetRelay()) {
			rp.relay = p.GetRelay()
		}
	}
	return rp, true
}

// peerStatuses returns the wire form of ps.
func peerStatuses(ps []reportedPeer) []*segmeshv1.PeerStatus {
	if len(ps) == 0 {
		return nil
	}
	out := make([]*segmeshv1.PeerStatus, len(ps))
	for i, p := range ps {
		out[i] = &segmeshv1.PeerStatus{Name: p.name, PublicKey: base64.StdEncoding.EncodeToString(p.key[:]),
			LastHandshakeUnix: p.handshake, RxBytes: p.rx, TxBytes: p.tx, Path: p.path, Relay: p.relay}
		if p.endpoint.IsValid() {
			out[i].Endpoint = p.endpoint.String()
		}
	}
	return out
}

// GetNode implements OperatorService.GetNode: the node's status as ListNodes has
// it (WireGuard peers included) and the names of the peers its netmap lists, in
// the netmap's order (by name). NotFound when no node has the name.
func (s *operatorService) GetNode(ctx context.Context, req *connect.Request[segmeshv1.GetNodeRequest]) (*connect.Response[segmeshv1.GetNodeResponse], error) {
	c := s.c
	name := req.Msg.GetName()
	if name == "" {
		return nil, invalidArg("node name is required")
	}
	var n store.Node
	var ok bool
	err := c.store.View(func(tx store.Tx) error {
		var err error
		n, ok, err = tx.Node(name)
		return err
	})
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("looking up node %s: %w", name, err))
	}
	if !ok {
		return nil, notEnrolled(name)
	}
	rev, _ := c.policyInForce()
	resp := &segmeshv1.GetNodeResponse{Node: c.nodeStatus(n, rev, true), DesiredPeers: c.engine.PeerNames(name)}
	return connect.NewResponse(resp), nil
}
