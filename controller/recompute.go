package controller

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"time"

	"segmesh/api/segmeshv1"
	"segmesh/controller/netmap"
	"segmesh/controller/store"
	"segmesh/policy"
)

// requestRecompute asks the recompute loop for a computation without blocking;
// any number of requests made while one runs lead to exactly one more.
func (c *Controller) requestRecompute() {
	select {
	case c.recomputeKick <- struct{}{}:
	default:
	}
}

// recomputeLoop recomputes netmaps after each (coalesced) request until ctx is done.
func (c *Controller) recomputeLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.recomputeKick:
			c.recomputeNow()
		}
	}
}

// recomputeNow compiles the policy in force against the current inventory and
// publishes every node's netmap; the hub wakes only streams whose netmap changed.
// When compilation fails the previous netmaps stay published, and the error is
// logged and shown in Status until a computation succeeds.
func (c *Controller) recomputeNow() {
	c.computeMu.Lock()
	defer c.computeMu.Unlock()
	c.recomputeLocked()
}

// recomputeLocked is recomputeNow for a caller that holds computeMu.
func (c *Controller) recomputeLocked() {
	start := time.Now()
	rev, pol := c.policyInForce()
	var nodes []store.Node
	err := c.store.View(func(tx store.Tx) error {
		var err error
		nodes, err = tx.Nodes()
		return err
	})
	if err != nil {
		c.log.Error("computing netmaps: reading inventory", "err", err)
		c.setComputeErr(fmt.Sprintf("reading the inventory: %v", err))
		return
	}
	var compiled *policy.Compiled
	if pol != nil {
		if compiled, err = policy.Compile(pol, netmap.Inventory(nodes)); err != nil {
			c.log.Error("computing netmaps; previous netmaps stay in force", "revision", rev, "err", err)
			c.setComputeErr(fmt.Sprintf("policy revision %d does not compile against the current inventory; the previous netmaps stay published:\n%v", rev, err))
			return
		}
	}
	changed := c.publishLocked(rev, compiled, nodes)
	c.setComputeErr("")
	c.log.Debug("netmaps computed", "revision", rev, "nodes", len(nodes), "changed", len(changed), "took", time.Since(start))
}

// previousNetmap returns the published netmap of node, or nil.
func (c *Controller) previousNetmap(node string) *segmeshv1.Netmap {
	nm, _ := c.hub.Latest(node)
	return nm
}

// publishLocked computes every node's netmap from compiled (revision rev) and
// publishes them; the caller holds computeMu. When a node that held the gossip
// key loses it (it no longer has a peer: relabeled or isolated by the policy), the
// key is rotated first, so that it can read no further gossip: the netmaps are
// computed again with the new key. It returns the nodes whose netmap changed.
func (c *Controller) publishLocked(rev uint64, compiled *policy.Compiled, nodes []store.Node) []string {
	nms := netmap.FromCompiled(c.netmapCfg, rev, compiled, nodes, c.previousNetmap)
	var lost []string
	for name, nm := range nms {
		if old := c.previousNetmap(name); nm.GetGossip() == nil && !nm.GetRevoked() && bytes.Equal(old.GetGossip().GetKey(), c.netmapCfg.GossipKey) {
			lost = append(lost, name)
		}
	}
	if len(lost) > 0 {
		slices.Sort(lost)
		now := c.now()
		var key []byte
		err := c.store.Update(func(tx store.Tx) error {
			var err error
			if key, err = newGossipKey(tx); err != nil {
				return err
			}
			return tx.AppendAudit(store.AuditEntry{Time: now, Actor: "controller", Action: "gossip.rotate", Result: "ok",
				Detail: fmt.Sprintf("nodes %v no longer have peers", lost)})
		})
		if err != nil {
			c.log.Error("rotating the gossip key for nodes that lost their peers; they keep it until the next change", "nodes", lost, "err", err)
		} else {
			c.netmapCfg.GossipKey = key
			c.log.Info("gossip key rotated: nodes lost their peers", "nodes", lost)
			nms = netmap.FromCompiled(c.netmapCfg, rev, compiled, nodes, c.previousNetmap)
		}
	}
	return c.hub.Publish(nms)
}
