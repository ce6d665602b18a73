package controller

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/controller/netmap"
	"segmesh/controller/store"
	"segmesh/policy"
)

// Node life cycle: revoke, delete, relabel, key rotation.
//
// Revoking or deleting a node takes it out of the inventory the policy is
// compiled against (netmap.Inventory), so no netmap lists it as a peer or in a
// set, and its agent's stream is sent a revoked netmap and closed (Sync). The
// gossip key is rotated in the same transaction, so the node can neither read
// nor join the gossip of the remaining nodes. Netmaps are recomputed before the
// call returns.

// Node states as shown in NodeStatus.state.
const (
	stateActive  = "active"
	stateRevoked = "revoked"
)

func nodeState(n store.Node) string {
	if n.Revoked() {
		return stateRevoked
	}
	return stateActive
}

func notEnrolled(name string) error {
	return connect.NewError(connect.CodeNotFound, fmt.Errorf("node %q is not enrolled (see `segmesh nodes list`)", name))
}

// newGossipKey returns a fresh 32-byte memberlist key and stores it in tx.
func newGossipKey(tx store.Tx) ([]byte, error) {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return nil, fmt.Errorf("generating a gossip key: %w", err)
	}
	return k, tx.PutMeta(metaGossipKey, k)
}

// cutOff runs change on node name inside one transaction together with a new
// gossip key and the audit record, then publishes the netmaps without the node.
// change may return a connect error to refuse.
func (c *Controller) cutOff(ctx context.Context, name, action string, change func(tx store.Tx, n store.Node) (detail string, err error)) error {
	c.computeMu.Lock()
	defer c.computeMu.Unlock()
	now := c.now()
	var key []byte
	err := c.store.Update(func(tx store.Tx) error {
		n, ok, err := tx.Node(name)
		if err != nil {
			return err
		}
		if !ok {
			return notEnrolled(name)
		}
		wasActive := !n.Revoked()
		detail, err := change(tx, n)
		if err != nil {
			return err
		}
		if wasActive {
			if key, err = newGossipKey(tx); err != nil {
				return err
			}
			detail += "; gossip key rotated"
		}
		return tx.AppendAudit(store.AuditEntry{Time: now, Actor: actorOf(ctx), Action: action, Object: "node:" + name, Result: "ok", Detail: detail})
	})
	if err != nil {
		return internalOr(action+" "+name, err)
	}
	c.syncNodesLocked(name)
	if key != nil {
		// Publishing the cut may have rotated the key again (a node lost its
		// last peer, publishLocked): the newest stored key is the one to publish.
		if err := c.store.View(func(tx store.Tx) error {
			k, err := tx.Meta(metaGossipKey)
			if err == nil && len(k) > 0 {
				key = k
			}
			return err
		}); err != nil {
			c.log.Error("reading the gossip key after a cut; publishing the one the cut stored", "node", name, "err", err)
		}
		c.setGossipKeyLocked(key)
	}
	c.log.Info("node cut off", "action", action, "node", name, "by", actorOf(ctx), "gossip_key_rotated", key != nil)
	return nil
}

// RevokeNode implements OperatorService.RevokeNode. The record stays (name, key
// and addresses remain taken) until DeleteNode. FailedPrecondition when the node
// is revoked already.
func (s *operatorService) RevokeNode(ctx context.Context, req *connect.Request[segmeshv1.RevokeNodeRequest]) (*connect.Response[segmeshv1.RevokeNodeResponse], error) {
	c := s.c
	err := c.cutOff(ctx, req.Msg.GetName(), "node.revoke", func(tx store.Tx, n store.Node) (string, error) {
		if n.Revoked() {
			return "", connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("node %q was already revoked at %s by %s", n.Name, n.RevokedAt.UTC().Format(timeFormat), orUnknown(n.RevokedBy)))
		}
		n.RevokedAt, n.RevokedBy = c.now(), actorOf(ctx)
		return fmt.Sprintf("addresses %v", n.Addresses), tx.PutNode(n)
	})
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&segmeshv1.RevokeNodeResponse{}), nil
}

// DeleteNode implements OperatorService.DeleteNode: the cut of RevokeNode, then
// the record is removed; the node's addresses stay quarantined for
// Options.AddressQuarantine, its name and WireGuard key may enroll again.
func (s *operatorService) DeleteNode(ctx context.Context, req *connect.Request[segmeshv1.DeleteNodeRequest]) (*connect.Response[segmeshv1.DeleteNodeResponse], error) {
	c := s.c
	until := c.now().Add(c.opts.AddressQuarantine)
	resp := &segmeshv1.DeleteNodeResponse{QuarantinedUntilUnix: until.Unix()}
	err := c.cutOff(ctx, req.Msg.GetName(), "node.delete", func(tx store.Tx, n store.Node) (string, error) {
		resp.Addresses = netmap.HostPrefixes(n.Addresses)
		return fmt.Sprintf("addresses %v quarantined until %s", n.Addresses, until.UTC().Format(timeFormat)), tx.DeleteNode(n.Name, until)
	})
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

// LabelNode implements OperatorService.LabelNode. The policy in force is compiled
// against the changed inventory and its tests are run first; a failure refuses
// the change with FailedPrecondition naming the tests, and nothing changes.
// Memberships then change as set elements only (the rules stay). InvalidArgument
// for a bad label; FailedPrecondition for a revoked node.
func (s *operatorService) LabelNode(ctx context.Context, req *connect.Request[segmeshv1.LabelNodeRequest]) (*connect.Response[segmeshv1.LabelNodeResponse], error) {
	c := s.c
	name := req.Msg.GetName()
	if err := validateLabels(req.Msg.GetSet()); err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	for _, k := range req.Msg.GetRemove() {
		if _, both := req.Msg.GetSet()[k]; both {
			return nil, invalidArg("label %q is both set and removed", k)
		}
	}
	c.computeMu.Lock()
	defer c.computeMu.Unlock()
	var nodes []store.Node
	if err := c.store.View(func(tx store.Tx) error {
		var err error
		nodes, err = tx.Nodes()
		return err
	}); err != nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("reading nodes: %w", err))
	}
	i := slices.IndexFunc(nodes, func(n store.Node) bool { return n.Name == name })
	if i < 0 {
		return nil, notEnrolled(name)
	}
	old := nodes[i]
	if old.Revoked() {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("node %q is revoked; its labels no longer matter (delete it with `segmesh nodes delete %s`)", name, name))
	}
	labels := maps.Clone(old.Labels)
	if labels == nil {
		labels = map[string]string{}
	}
	maps.Copy(labels, req.Msg.GetSet())
	for _, k := range req.Msg.GetRemove() {
		delete(labels, k)
	}
	if maps.Equal(labels, old.Labels) || len(labels) == 0 && len(old.Labels) == 0 {
		return connect.NewResponse(&segmeshv1.LabelNodeResponse{Labels: old.Labels, Unchanged: true}), nil
	}
	oldInv := netmap.Inventory(nodes)
	nodes[i].Labels = labels
	if _, pol := c.policyInForce(); pol != nil {
		if err := checkInventory(pol, oldInv, netmap.Inventory(nodes)); err != nil {
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("relabeling node %s to %s would break the policy in force; nothing was changed:\n%w", name, formatLabelMap(labels), err))
		}
	}
	now := c.now()
	err := c.store.Update(func(tx store.Tx) error {
		n, ok, err := tx.Node(name)
		if err != nil {
			return err
		}
		if !ok || !maps.Equal(n.Labels, old.Labels) {
			return connect.NewError(connect.CodeAborted, fmt.Errorf("node %s changed meanwhile; retry", name))
		}
		n.Labels = labels
		if err := tx.PutNode(n); err != nil {
			return err
		}
		return tx.AppendAudit(store.AuditEntry{Time: now, Actor: actorOf(ctx), Action: "node.label", Object: "node:" + name, Result: "ok",
			Detail: fmt.Sprintf("labels %s -> %s", formatLabelMap(old.Labels), formatLabelMap(labels))})
	})
	if err != nil {
		return nil, internalOr("relabeling "+name, err)
	}
	c.syncNodesLocked(name)
	c.log.Info("node relabeled", "node", name, "labels", labels, "by", actorOf(ctx))
	return connect.NewResponse(&segmeshv1.LabelNodeResponse{Labels: labels}), nil
}

// checkInventory compiles pol against the changed inventory inv and runs its
// tests there: it returns the compile error or the tests that the change makes
// fail, one line each. A test whose endpoint the change leaves without any node
// (TestFailure.EmptyEndpoint) fails too: an inventory change must not quietly
// empty what a test guards. Tests that already failed on the inventory before
// the change, oldInv (an enrollment may have broken one), do not count: they are
// not this change's doing, and refusing every relabel because of them would lock
// the operator out of the fix.
func checkInventory(pol *policy.Policy, oldInv, inv []policy.Node) error {
	if _, err := policy.Compile(pol, inv); err != nil {
		return err
	}
	failedBefore := map[string]bool{}
	before, err := policy.RunTests(pol, append([]policy.Node{}, oldInv...))
	if err != nil {
		return err
	}
	for _, f := range before {
		if f.Inventory == policy.InventoryRun {
			failedBefore[f.Test] = true
		}
	}
	failures, err := policy.RunTests(pol, append([]policy.Node{}, inv...))
	if err != nil {
		return err
	}
	var fails []string
	for _, f := range failures {
		switch {
		case f.Inventory != policy.InventoryRun || failedBefore[f.Test]:
		case !f.NoMatch:
			fails = append(fails, f.Error())
		case f.EmptyEndpoint:
			fails = append(fails, f.Error()+" (the change leaves it no node to check)")
		}
	}
	if len(fails) > 0 {
		return errors.New(strings.Join(fails, "\n"))
	}
	return nil
}

func formatLabelMap(m map[string]string) string {
	if len(m) == 0 {
		return "{}"
	}
	parts := make([]string, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, k+"="+m[k])
	}
	return "{" + strings.Join(parts, ",") + "}"
}

// RotateNodeKey implements OperatorService.RotateNodeKey: it asks the node's agent
// (through its netmap, Netmap.key_rotation) to generate a new WireGuard key pair on
// the host and report the public key (AgentService.RotateKey). A rotation that is
// still pending is returned as it is. FailedPrecondition for a revoked node.
func (s *operatorService) RotateNodeKey(ctx context.Context, req *connect.Request[segmeshv1.RotateNodeKeyRequest]) (*connect.Response[segmeshv1.RotateNodeKeyResponse], error) {
	c := s.c
	name := req.Msg.GetName()
	var gen uint64
	now := c.now()
	err := c.store.Update(func(tx store.Tx) error {
		n, ok, err := tx.Node(name)
		if err != nil {
			return err
		}
		if !ok {
			return notEnrolled(name)
		}
		if n.Revoked() {
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("node %q is revoked", name))
		}
		if n.KeyRotation > n.KeyRotationDone {
			gen = n.KeyRotation
			return nil
		}
		n.KeyRotation = n.KeyRotationDone + 1
		gen = n.KeyRotation
		if err := tx.PutNode(n); err != nil {
			return err
		}
		return tx.AppendAudit(store.AuditEntry{Time: now, Actor: actorOf(ctx), Action: "node.key.rotate-request", Object: "node:" + name, Result: "ok", Detail: fmt.Sprintf("generation %d", gen)})
	})
	if err != nil {
		return nil, internalOr("requesting a key rotation of "+name, err)
	}
	c.syncNodes(name)
	return connect.NewResponse(&segmeshv1.RotateNodeKeyResponse{Generation: gen}), nil
}
