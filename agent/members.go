package agent

import (
	"context"
	"crypto/ecdsa"
	"log/slog"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"segmesh/agent/dataplane"
	"segmesh/agent/gossip"
	"segmesh/agent/netmap"
)

// acceptedClaim is the last gossip endpoint claim accepted from a peer, with the
// peer's netmap endpoint when it was accepted.
type acceptedClaim struct {
	gossip.Claim
	// netmapEndpoint is the netmap's endpoint for the peer when the claim was
	// accepted; once the netmap says something else, the controller's endpoint
	// is newer than the claim.
	netmapEndpoint netip.AddrPort
}

// gossipView relates gossip members to the netmap's peers. A member counts only when
// its claim's public key belongs to a peer of nm and both its member name and its
// claim's name are that peer's name; members that are not peers are ignored, so
// gossip can never add a peer. Such a member is alive when the peer has no identity
// key in nm, or when its claim's signature verifies with that key.
//
// A claim is accepted only when the peer has an identity key, the signature
// verifies with it, and the claim is newer than the last one accepted from that
// peer (accepted, keyed by peer name, which gossipView updates) or is that very
// claim again. Anything else (no identity key, a forged or tampered claim, a
// replayed older one) is ignored and logged at debug level.
//
// The endpoint of the last accepted claim, when reachable (see reachable) and
// different from the netmap's, is an endpoint override until the netmap's endpoint for that peer
// changes (the controller's is then newer): also while the member is not alive
// (failed, left), so that a peer that roamed and then failed keeps its newest
// endpoint rather than falling back to the controller's older one. Claims of
// names that are no longer peers are forgotten. alive is sorted.
func gossipView(nm *netmap.Netmap, members []gossip.Member, accepted map[string]acceptedClaim, log *slog.Logger) (endpoints map[dataplane.Key]netip.AddrPort, alive []string) {
	if nm == nil {
		return nil, nil
	}
	for _, m := range members {
		c := m.Claim
		p, ok := nm.Peer(c.PublicKey)
		if !ok || (p.Name != "" && p.Name != m.Name) || c.Name != m.Name {
			continue
		}
		if p.IdentityKey == nil {
			alive = append(alive, p.Name)
			if c.Endpoint.IsValid() && c.Endpoint != p.Endpoint {
				log.Debug("ignoring gossip endpoint: the netmap has no identity key for this peer", "peer", p.Name, "endpoint", c.Endpoint)
			}
			continue
		}
		if !c.Verify(p.IdentityKey) {
			log.Debug("ignoring gossip endpoint claim: signature does not verify with the peer's identity key", "peer", p.Name, "endpoint", c.Endpoint)
			continue
		}
		alive = append(alive, p.Name)
		last, seen := accepted[p.Name]
		if seen && (c.Timestamp < last.Timestamp || c.Timestamp == last.Timestamp && (c.Name != last.Name || c.Meta != last.Meta)) {
			log.Debug("ignoring gossip endpoint claim: not newer than the last accepted one", "peer", p.Name, "endpoint", c.Endpoint,
				"signed", time.Unix(0, c.Timestamp).UTC(), "last_signed", time.Unix(0, last.Timestamp).UTC())
			continue
		}
		if !seen || c.Timestamp != last.Timestamp {
			accepted[p.Name] = acceptedClaim{Claim: c, netmapEndpoint: p.Endpoint}
		}
	}
	peers := make(map[string]bool, len(nm.Peers))
	for _, p := range nm.Peers {
		peers[p.Name] = true
		c, ok := accepted[p.Name]
		if !ok || p.IdentityKey == nil || c.PublicKey != p.PublicKey || c.netmapEndpoint != p.Endpoint {
			continue
		}
		if ep := c.Endpoint; reachable(ep, nm.OverlayPrefixes) && ep != p.Endpoint {
			if endpoints == nil {
				endpoints = map[dataplane.Key]netip.AddrPort{}
			}
			endpoints[p.PublicKey] = ep
		}
	}
	for name := range accepted {
		if !peers[name] {
			delete(accepted, name)
		}
	}
	slices.Sort(alive)
	return endpoints, alive
}

// reachable reports whether ep is an endpoint a peer on another host may have,
// by the rules the controller applies to advertised endpoints and candidates: a
// specific address and a non-zero port, not loopback, link-local, multicast,
// broadcast, zoned or inside one of the overlay prefixes. A peer signs its own
// gossip claims, so without this it could make this host send WireGuard
// packets and connectivity checks to its own services or the overlay.
func reachable(ep netip.AddrPort, overlay []netip.Prefix) bool {
	a := ep.Addr().Unmap()
	if !ep.IsValid() || ep.Port() == 0 || a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() ||
		a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) || a.Zone() != "" {
		return false
	}
	return !slices.ContainsFunc(overlay, func(p netip.Prefix) bool { return p.Contains(a) })
}

// gossipLoop keeps memberlist configured from the current netmap, feeds learned
// endpoints to the reconciler and liveness to the reports, and re-joins peers that
// are not alive every resync interval.
func (a *agent) gossipLoop(ctx context.Context) {
	t := time.NewTicker(a.opts.Resync)
	defer t.Stop()
	var joining atomic.Bool
	for {
		join := false
		select {
		case <-ctx.Done():
			return
		case <-a.gossipC:
			join = true
		case <-t.C:
			join = true
		}
		nm := a.rec.Netmap()
		addrs := a.gossipStep(nm)
		if join && len(addrs) > 0 && joining.CompareAndSwap(false, true) {
			// Join blocks up to memberlist's TCP timeout per address; keep it off this
			// loop. Shutdown waits for it a bounded time (waitJoins).
			a.joins.Go(func() {
				defer joining.Store(false)
				if n, err := a.gossip.Join(addrs); err != nil {
					a.log.Debug("joining gossip peers", "addrs", addrs, "err", err)
				} else if n > 0 {
					a.log.Info("joined gossip peers", "reached", n)
				}
			})
		}
	}
}

// gossipStep (re)configures memberlist for nm and publishes what members say. It
// returns the gossip addresses of netmap peers that are not alive, to join.
//
// Memberlist runs only while nm configures gossip and lists at least one peer: a node
// without peers has nobody to gossip with, so it opens no gossip port (least
// privilege), even when the controller sent it the key. A revoked node's netmap has
// neither, so its gossip stops. A new WireGuard key (rotation) is advertised in a
// new claim; a new TLS key (renewal) restarts memberlist with the new signing key.
func (a *agent) gossipStep(nm *netmap.Netmap) []netip.AddrPort {
	if nm == nil || !nm.Gossip.Enabled() || len(nm.Peers) == 0 {
		if err := a.gossip.Configure(gossip.Config{}); err != nil {
			a.log.Warn("stopping gossip", "err", err)
		}
		a.updateSelf()
		a.path.SetPeers(pathPeers(nm, nil))
		a.setAlive(nil)
		return nil
	}
	ep, err := a.currentEndpoint()
	if err != nil {
		a.log.Warn("gossip waits for the local endpoint", "err", err)
		return nil
	}
	port := nm.Gossip.Port
	if a.opts.GossipPort != 0 {
		port = a.opts.GossipPort
	}
	wgKey, tlsKey := a.keys()
	err = a.gossip.Configure(gossip.Config{
		NodeName:    a.id.NodeName,
		BindAddr:    ep.Addr(),
		Port:        port,
		Key:         nm.Gossip.Key,
		Meta:        gossip.Meta{PublicKey: publicKey(wgKey), Endpoint: ep},
		IdentityKey: tlsKey,
	})
	if err != nil {
		a.log.Warn("gossip unavailable; retrying every resync", "err", err)
		return nil
	}
	endpoints, alive := gossipView(nm, a.gossip.Members(), a.claims, a.log)
	a.updateSelf()
	a.path.SetPeers(pathPeers(nm, endpoints))
	a.setAlive(alive)
	var join []netip.AddrPort
	for _, p := range nm.Peers {
		ep := p.Endpoint
		if o, ok := endpoints[p.PublicKey]; ok {
			ep = o
		}
		if ep.IsValid() && !slices.Contains(alive, p.Name) {
			join = append(join, netip.AddrPortFrom(ep.Addr(), uint16(port)))
		}
	}
	return join
}

// waitJoins waits up to d for gossip joins in flight. A join dialling an
// unreachable address can block for memberlist's TCP timeout (10 s) per address;
// shutdown does not wait that long, the join then ends on its own against the
// stopped memberlist.
func (a *agent) waitJoins(d time.Duration) {
	done := make(chan struct{})
	go func() {
		a.joins.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(d):
		a.log.Debug("a gossip join is still dialling; not waiting for it", "waited", d)
	}
}

func (a *agent) setAlive(alive []string) {
	a.mu.Lock()
	changed := !slices.Equal(a.alive, alive)
	a.alive = alive
	a.mu.Unlock()
	if changed {
		signal(a.reportC)
	}
}

// keys returns the current WireGuard private key and TLS key (the gossip claim
// signing key); rotation and renewal change them.
func (a *agent) keys() (dataplane.Key, *ecdsa.PrivateKey) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.wgKey, a.tlsKey
}

func (a *agent) alivePeers() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.alive
}

// currentEndpoint returns the endpoint to advertise, rediscovering it (the route to
// the controller in use may change, and so may the controller after a failover);
// it falls back to the last known one on failure.
func (a *agent) currentEndpoint() (netip.AddrPort, error) {
	ep, err := discover(a.opts.Endpoint, a.ctl.current(), a.id.ListenPort)
	a.mu.Lock()
	defer a.mu.Unlock()
	if err != nil {
		if a.endpoint.IsValid() {
			return a.endpoint, nil
		}
		return ep, err
	}
	if a.endpoint.IsValid() && a.endpoint != ep {
		a.log.Info("local endpoint changed", "old", a.endpoint, "new", ep)
		defer a.endpointMoved()
	}
	a.endpoint = ep
	return ep, nil
}

// publicKey derives the WireGuard public key of a private key.
func publicKey(priv dataplane.Key) dataplane.Key {
	return dataplane.Key(wgKey(priv).PublicKey())
}
