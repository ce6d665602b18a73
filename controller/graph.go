package controller

import (
	"context"
	"fmt"
	"strings"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/controller/netmap"
	"segmesh/controller/store"
	"segmesh/policy"
)

// Segment kinds of GetSegmentGraphResponse.
const (
	segmentKindNodes    = "nodes"
	segmentKindExternal = "external"
)

// GetSegmentGraph implements OperatorService.GetSegmentGraph: the segments of
// the policy in force with their member counts on the current inventory (revoked
// nodes left out), and one edge per (from, to) pair some rule allows
// (policy.Graph). Default deny (revision 0) has no segment and no edge.
func (s *operatorService) GetSegmentGraph(ctx context.Context, _ *connect.Request[segmeshv1.GetSegmentGraphRequest]) (*connect.Response[segmeshv1.GetSegmentGraphResponse], error) {
	rev, pol := s.c.policyInForce()
	resp := &segmeshv1.GetSegmentGraphResponse{Revision: rev}
	if pol == nil {
		return connect.NewResponse(resp), nil
	}
	var nodes []store.Node
	err := s.c.store.View(func(tx store.Tx) error {
		var err error
		nodes, err = tx.Nodes()
		return err
	})
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("reading nodes: %w", err))
	}
	g, err := policy.Graph(pol, netmap.Inventory(nodes))
	if err != nil {
		// The policy in force compiled when it was put in force.
		return nil, connect.NewError(connect.CodeInternal, err)
	}
	for _, seg := range g.Segments {
		kind := segmentKindNodes
		if seg.External {
			kind = segmentKindExternal
		}
		resp.Segments = append(resp.Segments, &segmeshv1.SegmentGraphNode{Segment: seg.Name, Kind: kind, Members: uint32(seg.Members)})
	}
	for _, e := range g.Edges {
		resp.Edges = append(resp.Edges, &segmeshv1.SegmentGraphEdge{From: e.From, To: e.To, Ports: strings.Fields(e.Ports.String()), Rules: e.Rules})
	}
	return connect.NewResponse(resp), nil
}
