package controller

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/controller/store"
)

// Candidate kinds (segmeshv1.Candidate.kind). Agents advertise local and stun;
// the controller adds observed; relay candidates exist only per pair.
const (
	candidateLocal    = "local"
	candidateObserved = "observed"
	candidateSTUN     = "stun"
)

// maxCandidates is how many candidates of an agent the controller accepts per
// message (the first valid ones); the observed one comes on top.
const maxCandidates = 8

// nodeCandidates returns the candidates to store for a node: the valid ones of
// advertised (at most maxCandidates, kinds local and stun only, each endpoint
// passing validateEndpoint against overlay) and observed (when valid), deduped
// by endpoint, the first kind winning, in the order local..., observed,
// stun.... Endpoints are normalised (netip.AddrPort.String of the unmapped
// address). dropped counts the advertised candidates left out; reason says why
// the first was ("" when none was).
func nodeCandidates(advertised []*segmeshv1.Candidate, observed netip.AddrPort, overlay []netip.Prefix) (out []store.Candidate, dropped int, reason string) {
	drop := func(why string) {
		if dropped == 0 {
			reason = why
		}
		dropped++
	}
	var locals, stuns []store.Candidate
	seen := map[string]bool{}
	for _, c := range advertised {
		if len(locals)+len(stuns) == maxCandidates {
			drop(fmt.Sprintf("more than %d candidates", maxCandidates))
			continue
		}
		kind := c.GetKind()
		if kind != candidateLocal && kind != candidateSTUN {
			drop(fmt.Sprintf("candidate %q: kind %q is not one an agent advertises (local, stun)", c.GetEndpoint(), kind))
			continue
		}
		ep, err := normalEndpoint(c.GetEndpoint(), overlay)
		if err != nil {
			drop(err.Error())
			continue
		}
		if seen[ep] {
			continue
		}
		seen[ep] = true
		if kind == candidateLocal {
			locals = append(locals, store.Candidate{Endpoint: ep, Kind: kind})
		} else {
			stuns = append(stuns, store.Candidate{Endpoint: ep, Kind: kind})
		}
	}
	out = locals
	if observed.IsValid() {
		if ep, err := normalEndpoint(observed.String(), overlay); err == nil && !slices.ContainsFunc(locals, func(c store.Candidate) bool { return c.Endpoint == ep }) {
			out = append(out, store.Candidate{Endpoint: ep, Kind: candidateObserved})
			stuns = slices.DeleteFunc(stuns, func(c store.Candidate) bool { return c.Endpoint == ep })
		}
	}
	return append(out, stuns...), dropped, reason
}

// normalEndpoint checks ep (validateEndpoint) and returns it normalised.
func normalEndpoint(ep string, overlay []netip.Prefix) (string, error) {
	if err := validateEndpoint(ep, overlay); err != nil {
		return "", err
	}
	ap := netip.MustParseAddrPort(ep) // validateEndpoint parsed it
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String(), nil
}

// observedEndpoint returns the endpoint the controller observes for a node: the
// IP of source, the "ip:port" TCP source address of the node's call, with the
// port of wg, the node's WireGuard endpoint "ip:port". It is invalid when either
// does not parse.
func observedEndpoint(source, wg string) netip.AddrPort {
	src, err := netip.ParseAddrPort(source)
	if err != nil {
		return netip.AddrPort{}
	}
	ep, err := netip.ParseAddrPort(wg)
	if err != nil {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(src.Addr().Unmap(), ep.Port())
}

// updateCandidates records the candidates node's agent advertises (a SyncRequest
// or a ReportRequest) together with the one the controller observes
// (observedEndpoint of source and the node's WireGuard endpoint: ep, or the
// stored one when ep is ""); see nodeCandidates. Invalid candidates are dropped
// and logged at debug level, never refused. A change is persisted and recomputes
// the netmaps of the node's peers; changes are rate limited per node like
// endpoint changes (CodeResourceExhausted, the stored candidates stay). A node
// revoked meanwhile is refused with CodePermissionDenied.
func (c *Controller) updateCandidates(node store.Node, source, ep string, advertised []*segmeshv1.Candidate) error {
	if ep == "" {
		ep = node.Endpoint
	}
	cands, dropped, reason := nodeCandidates(advertised, observedEndpoint(source, ep), c.opts.OverlayPrefixes)
	if dropped > 0 {
		c.log.Debug("endpoint candidates dropped", "node", node.Name, "dropped", dropped, "first_reason", reason)
	}
	if slices.Equal(cands, node.Candidates) {
		return nil
	}
	if !c.candidateChanges.allow(node.Name, c.now()) {
		return connect.NewError(connect.CodeResourceExhausted, errors.New("endpoint candidates change too often; retry in a few seconds"))
	}
	changed, err := c.editNode(node.Name, func(n *store.Node) bool {
		if slices.Equal(n.Candidates, cands) {
			return false
		}
		n.Candidates = cands
		return true
	})
	if err != nil {
		return internalOr("storing the endpoint candidates of node "+node.Name, err)
	}
	if changed {
		c.log.Info("node endpoint candidates changed", "node", node.Name, "candidates", cands)
		c.nodesChanged(node.Name)
	}
	return nil
}

// editNode applies edit to the stored record of node name and stores it when
// edit reports a change; it returns whether it did. A missing node changes
// nothing; a revoked one is refused with CodePermissionDenied.
func (c *Controller) editNode(name string, edit func(*store.Node) bool) (bool, error) {
	changed := false
	err := c.store.Update(func(tx store.Tx) error {
		n, ok, err := tx.Node(name)
		if err != nil || !ok {
			return err
		}
		if n.Revoked() {
			return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("node %q was revoked", name))
		}
		if changed = edit(&n); !changed {
			return nil
		}
		return tx.PutNode(n)
	})
	return changed, err
}
