package controller

import (
	"context"
	"fmt"
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
	changed := c.hub.Publish(netmap.FromCompiled(c.netmapCfg, rev, compiled, nodes, c.previousNetmap))
	c.setComputeErr("")
	c.log.Debug("netmaps computed", "revision", rev, "nodes", len(nodes), "changed", len(changed), "took", time.Since(start))
}

// previousNetmap returns the published netmap of node, or nil.
func (c *Controller) previousNetmap(node string) *segmeshv1.Netmap {
	nm, _ := c.hub.Latest(node)
	return nm
}
