package controller

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
	"segmesh/controller/netmap"
	"segmesh/controller/store"
)

// ListPolicyRevisions implements OperatorService.ListPolicyRevisions: every stored
// revision, oldest first, with the hash of its content; a record that does not
// decode is listed with its error.
func (s *operatorService) ListPolicyRevisions(ctx context.Context, _ *connect.Request[segmeshv1.ListPolicyRevisionsRequest]) (*connect.Response[segmeshv1.ListPolicyRevisionsResponse], error) {
	out := &segmeshv1.ListPolicyRevisionsResponse{}
	err := s.c.store.View(func(tx store.Tx) error {
		revs, err := tx.PolicyRevisions()
		if err != nil {
			return err
		}
		for _, rev := range revs {
			r := &segmeshv1.PolicyRevision{Revision: rev}
			p, _, err := tx.Policy(rev)
			if err != nil {
				r.Error = err.Error()
			} else {
				sum := sha256.Sum256(p.Content)
				r.AppliedUnix, r.AppliedBy, r.Filename = p.AppliedAt.Unix(), p.AppliedBy, p.Filename
				r.Sha256, r.RestoredFrom = hex.EncodeToString(sum[:]), p.RestoredFrom
			}
			out.Revisions = append(out.Revisions, r)
		}
		return nil
	})
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("listing policy revisions: %w", err))
	}
	out.ServingRevision, _ = s.c.policyInForce()
	return connect.NewResponse(out), nil
}

// RollbackPolicy implements OperatorService.RollbackPolicy: the content of the
// given revision is validated against the current inventory and its tests like
// ApplyPolicy and stored as a new revision (see storePolicy). NotFound when the
// revision does not exist, FailedPrecondition when its record is unreadable.
func (s *operatorService) RollbackPolicy(ctx context.Context, req *connect.Request[segmeshv1.RollbackPolicyRequest]) (*connect.Response[segmeshv1.RollbackPolicyResponse], error) {
	rev := req.Msg.GetRevision()
	if rev == 0 {
		return nil, invalidArg("revision to roll back to is required (see `segmesh policy history`)")
	}
	var p store.Policy
	var ok bool
	err := s.c.store.View(func(tx store.Tx) error {
		var err error
		p, ok, err = tx.Policy(rev)
		return err
	})
	switch {
	case err != nil:
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("policy revision %d cannot be read: %w", rev, err))
	case !ok:
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("policy revision %d does not exist", rev))
	}
	res, err := s.c.storePolicy(actorOf(ctx), p.Filename, p.Content, "policy.rollback", rev)
	if err != nil {
		var ce *connect.Error
		if errors.As(err, &ce) && ce.Code() == connect.CodeInvalidArgument {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("policy revision %d is not valid against the current inventory; nothing was stored:\n%s", rev, ce.Message()))
		}
		return nil, err
	}
	return connect.NewResponse(&segmeshv1.RollbackPolicyResponse{Revision: res.revision, Unchanged: res.unchanged, Warnings: res.warnings}), nil
}

// GetNetmap implements OperatorService.GetNetmap. Without a candidate it returns
// the netmap published for the node; with one, the netmap the candidate policy
// would give the node when stored as the next revision, after the same checks as
// ApplyPolicy (InvalidArgument when they fail); nothing is stored or published.
// The gossip key is removed from the returned netmap. NotFound for a node that is
// not enrolled.
func (s *operatorService) GetNetmap(ctx context.Context, req *connect.Request[segmeshv1.GetNetmapRequest]) (*connect.Response[segmeshv1.GetNetmapResponse], error) {
	c := s.c
	name := req.Msg.GetNode()
	if name == "" {
		return nil, invalidArg("node name is required")
	}
	cand := req.Msg.GetCandidate()
	if cand == nil {
		serving, _ := c.policyInForce()
		nm, _, ok := c.engine.Netmap(name)
		if !ok {
			return nil, c.missingNode(name)
		}
		return connect.NewResponse(&segmeshv1.GetNetmapResponse{Netmap: withoutGossipKey(nm), Revision: serving, Interface: c.live.iface(name)}), nil
	}

	filename := cand.GetFilename()
	if filename == "" {
		filename = "policy.yaml"
	}
	// A candidate is compiled on a snapshot of the inventory, outside computeMu:
	// a read (a viewer may ask) must never hold up a revocation or an apply. At
	// most candidateSlots compile at once.
	select {
	case c.candidateSlots <- struct{}{}:
		defer func() { <-c.candidateSlots }()
	default:
		return nil, connect.NewError(connect.CodeResourceExhausted, errors.New("other candidate policies are being compiled; retry in a moment"))
	}
	c.computeMu.Lock()
	cfg := c.netmapCfg
	c.computeMu.Unlock()
	var nodes []store.Node
	var revs []uint64
	err := c.store.View(func(tx store.Tx) error {
		var err error
		if revs, err = tx.PolicyRevisions(); err != nil {
			return err
		}
		nodes, err = tx.Nodes()
		return err
	})
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("reading state: %w", err))
	}
	rev := uint64(1)
	if len(revs) > 0 {
		rev = revs[len(revs)-1] + 1
	}
	_, compiled, _, err := checkPolicy(filename, cand.GetContent(), netmap.Inventory(nodes), c.opts.OverlayPrefixes)
	if err != nil {
		return nil, policyError(err)
	}
	prev, _, _ := c.engine.Netmap(name)
	nm := netmap.NodeFromCompiled(cfg, rev, compiled, nodes, name, prev)
	if nm == nil {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("node %q is not enrolled", name))
	}
	return connect.NewResponse(&segmeshv1.GetNetmapResponse{
		Netmap: withoutGossipKey(nm), Revision: rev, Changed: prev.GetHash() != nm.GetHash(), Interface: c.live.iface(name),
	}), nil
}

// missingNode explains why no netmap is published for name.
func (c *Controller) missingNode(name string) error {
	var ok bool
	err := c.store.View(func(tx store.Tx) error {
		var err error
		_, ok, err = tx.Node(name)
		return err
	})
	switch {
	case err != nil:
		return connect.NewError(connect.CodeInternal, fmt.Errorf("looking up node %s: %w", name, err))
	case !ok:
		return connect.NewError(connect.CodeNotFound, fmt.Errorf("node %q is not enrolled", name))
	}
	return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("no netmap computed for node %q yet (it enrolled a moment ago); retry", name))
}

// withoutGossipKey returns a copy of nm without the memberlist key, which the
// operator has no use for. The hash still covers the key: it stays the hash of
// what the node receives.
func withoutGossipKey(nm *segmeshv1.Netmap) *segmeshv1.Netmap {
	out := proto.Clone(nm).(*segmeshv1.Netmap)
	if out.Gossip != nil {
		out.Gossip.Key = nil
	}
	return out
}
