package controller

import (
	"context"
	"time"

	"segmesh/api/segmeshv1"
	"segmesh/controller/netmap"
	"segmesh/controller/store"
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
// When compilation fails the previous netmaps stay published and the error is
// logged.
func (c *Controller) recomputeNow() {
	c.computeMu.Lock()
	defer c.computeMu.Unlock()
	start := time.Now()
	c.polMu.RLock()
	rev, pol := c.polRev, c.polParsed
	c.polMu.RUnlock()
	if rev > 0 && pol == nil {
		return // stored policy does not parse; see loadPolicy
	}
	var nodes []store.Node
	err := c.store.View(func(tx store.Tx) error {
		var err error
		nodes, err = tx.Nodes()
		return err
	})
	if err != nil {
		c.log.Error("computing netmaps: reading inventory", "err", err)
		return
	}
	nms, err := netmap.Compute(c.netmapCfg, rev, pol, nodes, c.previousNetmap)
	if err != nil {
		c.log.Error("computing netmaps; previous netmaps stay in force", "err", err)
		return
	}
	changed := c.hub.Publish(nms)
	c.log.Debug("netmaps computed", "revision", rev, "nodes", len(nodes), "changed", len(changed), "took", time.Since(start))
}

// previousNetmap returns the published netmap of node, or nil.
func (c *Controller) previousNetmap(node string) *segmeshv1.Netmap {
	nm, _ := c.hub.Latest(node)
	return nm
}
