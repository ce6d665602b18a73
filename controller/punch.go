package controller

import (
	"context"
	"fmt"
	"slices"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/policy"
)

// Hole punching requests a pair of nodes may make: punchBurst at once, then
// punchRate per second (one per 2 s), counted per unordered pair whichever end
// asks.
const (
	punchBurst = 2
	punchRate  = 0.5
)

// Hole punching requests one node may make over all its peers: punchNodeBurst
// at once, then punchNodeRate per second. Each Punch makes the peer check every
// candidate of the caller, addresses the caller chose, so without this bound a
// node with many peers could make all of them send to an address of its choice
// at a rate that grows with their number.
const (
	punchNodeBurst = 64
	punchNodeRate  = 8.0
)

// Results of segmesh_controller_punch_requests_total.
const (
	punchOK      = "ok"
	punchNotPeer = "not_peer"
	punchOffline = "offline"
	punchLimited = "limited"
)

// RequestPunch implements AgentService.RequestPunch: when the caller N's netmap
// lists the peer P (the policy connects them), it pushes to both ends at once a
// Punch naming the other end with its public key and current candidates
// (Controller.push, feature "punch"), so that each sends to the other and both
// NATs open a mapping. Errors: FailedPrecondition when P is not in N's netmap or
// P has no stream that takes a Punch (offline, or its agent predates punching);
// ResourceExhausted past punchBurst requests per pair at once and punchRate per
// second, and past punchNodeBurst requests of the caller at once and
// punchNodeRate per second; authenticate's errors.
func (s *agentService) RequestPunch(ctx context.Context, req *connect.Request[segmeshv1.RequestPunchRequest]) (*connect.Response[segmeshv1.RequestPunchResponse], error) {
	c := s.c
	node, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	peer := req.Msg.GetPeer()
	if !c.punchNodes.allow(node.Name, c.now()) {
		c.metrics.punched(punchLimited)
		return nil, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("hole punching requested too often; at most %.0f per second over all peers", punchNodeRate))
	}
	var toNode, toPeer *segmeshv1.Peer // the entries of the peer and of the node
	ok := policy.ValidNodeName(peer)
	if ok {
		toNode, ok = c.engine.Peer(node.Name, peer)
	}
	if ok {
		toPeer, ok = c.engine.Peer(peer, node.Name)
	}
	if !ok {
		c.metrics.punched(punchNotPeer)
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("peer %q is not in your netmap", reportedText(peer, maxReportedVersion)))
	}
	if !c.punches.allow(pairKey(node.Name, peer), c.now()) {
		c.metrics.punched(punchLimited)
		return nil, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("hole punching with peer %s is requested too often; at most one per %.0f s", peer, 1/punchRate))
	}
	if !c.push(peer, featurePunch, punchOf(toPeer)) {
		c.metrics.punched(punchOffline)
		if on, _ := c.live.online(peer); on {
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("peer %s is offline for hole punching: its agent does not take punch requests", peer))
		}
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("peer %s is offline", peer))
	}
	if !c.push(node.Name, featurePunch, punchOf(toNode)) {
		c.log.Debug("hole punching: the requesting node's stream takes no punch requests; only the peer sends", "node", node.Name, "peer", peer)
	}
	c.metrics.punched(punchOK)
	c.log.Debug("hole punching", "node", node.Name, "peer", peer)
	return connect.NewResponse(&segmeshv1.RequestPunchResponse{}), nil
}

// punchOf returns the update that asks a node to punch towards p, its netmap's
// entry for a peer.
func punchOf(p *segmeshv1.Peer) *segmeshv1.NetmapUpdate {
	return &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Punch{Punch: &segmeshv1.Punch{
		Peer: p.GetName(), PublicKey: p.GetPublicKey(), Candidates: slices.Clone(p.GetCandidates()),
	}}}
}

// pairKey is the rate-limit key of the unordered pair of nodes a and b.
func pairKey(a, b string) string {
	if b < a {
		a, b = b, a
	}
	return a + "\x00" + b
}
