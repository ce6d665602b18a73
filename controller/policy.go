package controller

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"connectrpc.com/connect"

	"segmesh/controller/netmap"
	"segmesh/controller/store"
	"segmesh/policy"
)

// Policy lifecycle.
//
// The controller serves one policy revision: the netmaps it publishes are
// compiled from it. Normally that is the latest stored revision. A revision is
// stored only after it parses, compiles against the inventory and passes its
// tests; but a stored revision can become unreadable or invalid later (the store
// edited by hand, an inventory it no longer compiles against). At start the
// controller then serves the newest revision that still validates, or default
// deny (revision 0) when none does, and reports why in Status; it never serves an
// invalid revision and never allows everything.

// policyState is the policy in force, guarded by Controller.polMu.
type policyState struct {
	// serving is the revision in force (0: default deny) and parsed its policy
	// (nil for default deny).
	serving uint64
	parsed  *policy.Policy
	// latest is the highest stored revision.
	latest uint64
	// loadErr says why latest is not served; set at start, cleared when a
	// revision is stored.
	loadErr string
	// computeErr is the error of the last failed netmap computation for the
	// current inventory; cleared by the next successful one.
	computeErr string
}

// policyInForce returns the revision in force and its policy (nil: default deny).
func (c *Controller) policyInForce() (uint64, *policy.Policy) {
	c.polMu.RLock()
	defer c.polMu.RUnlock()
	return c.pol.serving, c.pol.parsed
}

// policyStatus returns the latest stored revision, the revision in force and the
// reasons, one per line, why the controller does not serve the latest revision or
// cannot compute netmaps for the current inventory ("" when healthy).
func (c *Controller) policyStatus() (latest, serving uint64, problem string) {
	c.polMu.RLock()
	defer c.polMu.RUnlock()
	var problems []string
	for _, p := range []string{c.pol.loadErr, c.pol.computeErr} {
		if p != "" {
			problems = append(problems, p)
		}
	}
	return c.pol.latest, c.pol.serving, strings.Join(problems, "\n")
}

func (c *Controller) setComputeErr(msg string) {
	c.polMu.Lock()
	defer c.polMu.Unlock()
	c.pol.computeErr = msg
}

// checkPolicy parses content, compiles it against inv and runs its tests (see
// policy.RunTests) on the prototype inventory and on inv. It returns the parse
// error (a policy.ErrorList), the compile error, or an error listing every failing
// test, one "file:line:col: test NAME: message" line each. A test that fails on
// inv only because an endpoint matches no node of inv yet (NoMatch) does not
// fail the check: it is returned as a warning line, so that a policy can be
// applied before the nodes it names enroll. External CIDRs may not overlap the
// overlay prefixes (policy.CheckExternal). Segments and rules that select no node
// of inv are warnings too (policy.Warnings). Every warning is a
// "file:line:col: warning: message" line.
func checkPolicy(filename string, content []byte, inv []policy.Node, overlay []netip.Prefix) (*policy.Policy, *policy.Compiled, []string, error) {
	pol, err := policy.Parse(filename, content)
	if err != nil {
		return nil, nil, nil, err
	}
	if errs := policy.CheckExternal(pol, overlay); len(errs) > 0 {
		return nil, nil, nil, errs
	}
	compiled, err := policy.Compile(pol, inv)
	if err != nil {
		return nil, nil, nil, err
	}
	if inv == nil {
		inv = []policy.Node{} // nil would skip the run on the inventory
	}
	failures, err := policy.RunTests(pol, inv)
	if err != nil {
		return nil, nil, nil, err
	}
	var fails, warnings []string
	for _, f := range failures {
		if f.Inventory == policy.InventoryRun && f.NoMatch {
			warnings = append(warnings, fmt.Sprintf("%s: warning: test %q: %s (vacuous on the current inventory)", f.Pos, f.Test, f.Msg))
			continue
		}
		fails = append(fails, f.Error())
	}
	if len(fails) > 0 {
		return nil, nil, nil, errors.New(strings.Join(fails, "\n"))
	}
	for _, w := range policy.Warnings(pol, inv) {
		warnings = append(warnings, w.String())
	}
	return pol, compiled, warnings, nil
}

// policyError turns a checkPolicy error into CodeInvalidArgument with the same
// message: one problem per line.
func policyError(err error) error {
	var el policy.ErrorList
	if errors.As(err, &el) {
		return connect.NewError(connect.CodeInvalidArgument, errors.New(el.Error()))
	}
	return connect.NewError(connect.CodeInvalidArgument, err)
}

// loadPolicy puts in force the newest stored revision that can be read, parses,
// compiles against the inventory and passes its tests (none: default deny), and
// records why newer revisions were skipped. It fails only when the store cannot
// be read at all.
func (c *Controller) loadPolicy() error {
	var revs []uint64
	var nodes []store.Node
	err := c.store.View(func(tx store.Tx) error {
		var err error
		if revs, err = tx.PolicyRevisions(); err != nil {
			return err
		}
		nodes, err = tx.Nodes()
		return err
	})
	if err != nil {
		return fmt.Errorf("loading policy: %w", err)
	}
	if len(revs) == 0 {
		return nil
	}
	inv := netmap.Inventory(nodes)
	st := policyState{latest: revs[len(revs)-1]}
	var problems []string
	for i := len(revs) - 1; i >= 0 && st.parsed == nil; i-- {
		rev := revs[i]
		var p store.Policy
		err := c.store.View(func(tx store.Tx) error {
			var err error
			p, _, err = tx.Policy(rev)
			return err
		})
		if err != nil {
			problems = append(problems, fmt.Sprintf("stored policy revision %d is unreadable: %v", rev, err))
			continue
		}
		pol, _, _, err := checkPolicy(p.Filename, p.Content, inv, c.opts.OverlayPrefixes)
		if err != nil {
			problems = append(problems, fmt.Sprintf("stored policy revision %d is invalid:\n%v", rev, err))
			continue
		}
		st.serving, st.parsed = rev, pol
	}
	if len(problems) > 0 {
		serving := fmt.Sprintf("serving revision %d, the newest valid one", st.serving)
		if st.parsed == nil {
			serving = "no stored revision is valid; serving default deny (revision 0)"
		}
		st.loadErr = strings.Join(problems, "\n") + "\n" + serving + "; apply or roll back to a valid policy to clear this"
		c.log.Error("stored policy is not valid; not serving it", "latest_revision", st.latest, "serving_revision", st.serving, "problems", st.loadErr)
	}
	c.polMu.Lock()
	c.pol = st
	c.polMu.Unlock()
	return nil
}

// storeResult is the outcome of storePolicy.
type storeResult struct {
	revision  uint64
	unchanged bool
	warnings  []string // see checkPolicy
}

// storePolicy, on behalf of actor (an operator credential name), validates content (parse, compile against the inventory, tests),
// stores it as the next revision with an audit entry (action, and RestoredFrom
// for a rollback) and publishes the new netmaps, all under computeMu. When the
// revision in force is the latest and holds content already, nothing is stored.
// A policy that fails is answered with CodeInvalidArgument, one problem per
// line, and changes nothing: the previous revision stays in force.
//
// Another controller replica may store a revision between the validation and
// the commit: the commit then finds a newer latest revision and the whole
// store starts again (up to policyStoreAttempts times), validating against the
// newer state.
func (c *Controller) storePolicy(actor, filename string, content []byte, action string, restoredFrom uint64) (storeResult, error) {
	c.computeMu.Lock()
	defer c.computeMu.Unlock()
	for attempt := 1; ; attempt++ {
		res, err := c.storePolicyLocked(actor, filename, content, action, restoredFrom)
		if !errors.Is(err, errPolicyRaced) {
			return res, err
		}
		if attempt == policyStoreAttempts {
			return storeResult{}, connect.NewError(connect.CodeAborted, fmt.Errorf("other controller replicas kept storing policy revisions; try again: %w", err))
		}
		c.log.Info("another replica stored a policy revision meanwhile; validating again", "attempt", attempt)
	}
}

// policyStoreAttempts bounds how often storePolicy starts again after losing a
// race against another replica.
const policyStoreAttempts = 8

// errPolicyRaced says another replica stored a policy revision after
// storePolicyLocked read the latest one.
var errPolicyRaced = errors.New("a newer policy revision was stored meanwhile")

// storePolicyLocked is one attempt of storePolicy; the caller holds computeMu.
func (c *Controller) storePolicyLocked(actor, filename string, content []byte, action string, restoredFrom uint64) (storeResult, error) {
	serving, _ := c.policyInForce()
	var latest uint64
	var current store.Policy
	var nodes []store.Node
	err := c.store.View(func(tx store.Tx) error {
		revs, err := tx.PolicyRevisions()
		if err != nil {
			return err
		}
		if len(revs) > 0 {
			latest = revs[len(revs)-1]
		}
		if serving != 0 && serving == latest {
			if current, _, err = tx.Policy(serving); err != nil {
				return err
			}
		}
		nodes, err = tx.Nodes()
		return err
	})
	if err != nil {
		return storeResult{}, connect.NewError(connect.CodeInternal, fmt.Errorf("reading state: %w", err))
	}
	if serving != 0 && serving == latest && bytes.Equal(current.Content, content) {
		return storeResult{revision: serving, unchanged: true}, nil
	}
	rev := latest + 1
	pol, _, warnings, err := checkPolicy(filename, content, netmap.Inventory(nodes), c.opts.OverlayPrefixes)
	if err != nil {
		return storeResult{}, policyError(err)
	}
	now := c.now()
	detail := fmt.Sprintf("revision %d from %s (%d bytes, %d segments, %d rules, %d tests)", rev, filename, len(content), len(pol.Segments), len(pol.Rules), len(pol.Tests))
	if restoredFrom != 0 {
		detail = fmt.Sprintf("revision %d restores revision %d (%s, %d bytes)", rev, restoredFrom, filename, len(content))
	}
	err = c.store.Update(func(tx store.Tx) error {
		revs, err := tx.PolicyRevisions()
		if err != nil {
			return err
		}
		if len(revs) > 0 && revs[len(revs)-1] != latest {
			return errPolicyRaced
		}
		if err := tx.PutPolicy(store.Policy{Revision: rev, Filename: filename, Content: content, AppliedAt: now, AppliedBy: actor, RestoredFrom: restoredFrom}); err != nil {
			return err
		}
		return tx.AppendAudit(store.AuditEntry{Time: now, Actor: actor, Action: action, Object: fmt.Sprintf("policy:%d", rev), Result: "ok", Detail: detail})
	})
	if errors.Is(err, errPolicyRaced) {
		return storeResult{}, err
	}
	if err != nil {
		return storeResult{}, connect.NewError(connect.CodeInternal, fmt.Errorf("storing policy revision %d: %w", rev, err))
	}
	// Publish before switching the revision in force, so that a concurrent status
	// never pairs the new revision with the old netmap hashes.
	changed, err := c.setPolicyLocked(rev, pol)
	if err != nil {
		return storeResult{}, connect.NewError(connect.CodeInternal, fmt.Errorf("computing the netmaps of policy revision %d: %w", rev, err))
	}
	c.polMu.Lock()
	c.pol = policyState{serving: rev, parsed: pol, latest: rev}
	c.polMu.Unlock()
	c.metrics.policyApplied(rev, now)
	c.log.Info("policy stored", "action", action, "revision", rev, "file", filename, "restored_from", restoredFrom, "nodes", len(nodes), "netmaps_changed", changed)
	return storeResult{revision: rev, warnings: warnings}, nil
}
