package controller

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"segmesh/controller/fanout"
	"segmesh/controller/netmap"
	"segmesh/controller/store"
	"segmesh/policy"
)

// nodesChanged asks the recompute loop to bring the netmaps up to date with the
// stored records of names, without blocking: changes made while one computation
// runs coalesce into the next.
func (c *Controller) nodesChanged(names ...string) {
	c.dirtyMu.Lock()
	for _, n := range names {
		c.dirty[n] = struct{}{}
	}
	c.dirtyMu.Unlock()
	select {
	case c.recomputeKick <- struct{}{}:
	default:
	}
}

// recomputeLoop applies the changes nodesChanged recorded until ctx is done.
func (c *Controller) recomputeLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.recomputeKick:
			c.dirtyMu.Lock()
			names := slices.Sorted(maps.Keys(c.dirty))
			clear(c.dirty)
			c.dirtyMu.Unlock()
			c.computeMu.Lock()
			c.syncNodesLocked(names...)
			c.computeMu.Unlock()
		}
	}
}

// syncNodes is syncNodesLocked for a caller that does not hold computeMu.
func (c *Controller) syncNodes(names ...string) {
	c.computeMu.Lock()
	defer c.computeMu.Unlock()
	c.syncNodesLocked(names...)
}

// syncNodesLocked reads the records of names from the store and hands each to the
// netmap engine (a missing record removes the node), then publishes the netmaps
// that changed; the caller holds computeMu. Only the netmaps a change affects are
// recomputed.
func (c *Controller) syncNodesLocked(names ...string) {
	start := time.Now()
	c.flows.inventoryChanged()
	recs := make([]store.Node, len(names))
	found := make([]bool, len(names))
	err := c.store.View(func(tx store.Tx) error {
		for i, name := range names {
			var err error
			if recs[i], found[i], err = tx.Node(name); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		c.log.Error("computing netmaps: reading nodes; the next change of them retries", "nodes", names, "err", err)
		c.setComputeErr(fmt.Sprintf("reading the inventory: %v", err))
		return
	}
	changed := 0
	for i, name := range names {
		var updates []netmap.Update
		if found[i] {
			if updates, err = c.engine.Upsert(recs[i]); err != nil {
				c.log.Error("computing netmaps: a node's record conflicts with the inventory; the previous netmaps stay published", "node", name, "err", err)
				c.nodeErrs[name] = fmt.Sprintf("node %s cannot enter the netmaps; the previous netmaps stay published: %v", name, err)
				continue
			}
		} else {
			updates = c.engine.Remove(name)
		}
		delete(c.nodeErrs, name)
		changed += c.publishLocked(updates)
	}
	var errs []string
	for _, name := range slices.Sorted(maps.Keys(c.nodeErrs)) {
		errs = append(errs, c.nodeErrs[name])
	}
	c.setComputeErr(strings.Join(errs, "\n"))
	c.relaysNodesChanged(names)
	c.metrics.computeSeconds.Observe(time.Since(start).Seconds())
	c.log.Debug("netmaps computed", "nodes", names, "changed", changed, "took", time.Since(start))
}

// rebuildLocked computes every netmap from the store and the policy in force: the
// engine and hub start afresh (at start-up). The caller holds computeMu.
func (c *Controller) rebuildLocked() error {
	rev, pol := c.policyInForce()
	var nodes []store.Node
	err := c.store.View(func(tx store.Tx) error {
		var err error
		nodes, err = tx.Nodes()
		return err
	})
	if err != nil {
		return fmt.Errorf("computing netmaps: reading the inventory: %w", err)
	}
	var prog *policy.Program
	if pol != nil {
		if prog, err = policy.Prepare(pol); err != nil {
			return fmt.Errorf("computing netmaps for policy revision %d: %w", rev, err)
		}
	}
	c.engine = netmap.NewEngine(c.netmapCfg, rev, prog, nodes)
	latest := map[string]fanout.Latest{}
	for _, name := range c.engine.Nodes() {
		h, r, _, _ := c.engine.Hash(name)
		latest[name] = fanout.Latest{Hash: h, Revision: r}
	}
	c.hub = fanout.New(c.engine, latest)
	return nil
}

// setPolicyLocked makes pol (revision rev) the policy of the netmaps and
// publishes those that changed; the caller holds computeMu. It returns how many
// changed.
func (c *Controller) setPolicyLocked(rev uint64, pol *policy.Policy) (int, error) {
	start := time.Now()
	defer func() { c.metrics.computeSeconds.Observe(time.Since(start).Seconds()) }()
	prog, err := policy.Prepare(pol)
	if err != nil {
		return 0, err
	}
	changed := c.publishLocked(c.engine.SetPolicy(rev, prog))
	c.relaysPolicyChanged()
	return changed, nil
}

// setGossipKeyLocked puts key in every netmap that holds the gossip key and
// publishes them; the caller holds computeMu.
func (c *Controller) setGossipKeyLocked(key []byte) {
	c.netmapCfg.GossipKey = key
	c.publishLocked(c.engine.SetGossipKey(key))
}

// publishLocked publishes updates; the caller holds computeMu. When a node that
// held the gossip key loses it (it no longer has a peer: relabeled or isolated by
// the policy), the key is rotated first, so that it can read no further gossip:
// the other nodes get the change and the new key in one update. It returns the
// number of netmaps that changed.
func (c *Controller) publishLocked(updates []netmap.Update) int {
	var lost []string
	for _, u := range updates {
		if u.LostGossip {
			lost = append(lost, u.Node)
		}
	}
	// With several replicas each computes the same updates: the leader rotates,
	// the others get its key from etcd (syncGossipKey).
	if len(lost) > 0 && c.leaderOnly() {
		if key := c.rotateGossipKeyLocked(lost); key != nil {
			c.netmapCfg.GossipKey = key
			updates = netmap.MergeUpdates(updates, c.engine.SetGossipKey(key))
		}
	}
	c.hub.Publish(updates)
	return len(updates)
}

// rotateGossipKeyLocked stores a new gossip key because nodes lost theirs, with
// an audit record, and returns it; nil when storing failed (logged).
func (c *Controller) rotateGossipKeyLocked(lost []string) []byte {
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
		return nil
	}
	c.log.Info("gossip key rotated: nodes lost their peers", "nodes", lost)
	return key
}
