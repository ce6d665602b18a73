package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	"segmesh/agent/dataplane"
	"segmesh/agent/netmap"
	"segmesh/agent/path"
	"segmesh/agent/relay"
	"segmesh/api/segmeshv1"
)

// NAT traversal in the agent: the endpoint candidates it advertises, the path
// to every peer (agent/path), and, on a relay node, the relay forwarder
// (agent/relay). See docs/nat.md.

const (
	// DefaultSTUNPort is the controller's usual STUN port (its --stun-listen).
	DefaultSTUNPort = 3478
	// stunEvery is how often the agent asks the STUN server for the mapping of
	// its WireGuard port (NAT mappings of idle UDP flows last 30 s or more; the
	// WireGuard keepalives to peers keep them, this keeps the STUN server's).
	stunEvery = 30 * time.Second
	// maxLocalCandidates bounds the host addresses advertised.
	maxLocalCandidates = 4
	// STUNOff disables STUN (Options.STUNServer).
	STUNOff = "off"
)

// Features this agent understands on its netmap stream (SyncRequest.features).
const (
	featurePunch = "punch"
	featureRelay = "relay"
)

// stunServer resolves Options.STUNServer: "" means the controller's host on
// DefaultSTUNPort, "off" means none (invalid AddrPort).
func stunServer(opt, controller string) (netip.AddrPort, error) {
	if opt == STUNOff {
		return netip.AddrPort{}, nil
	}
	hostport := opt
	if hostport == "" {
		u, err := url.Parse(controller)
		if err != nil || u.Hostname() == "" {
			return netip.AddrPort{}, fmt.Errorf("STUN server: no host in controller URL %q", controller)
		}
		hostport = net.JoinHostPort(u.Hostname(), strconv.Itoa(DefaultSTUNPort))
	}
	ua, err := net.ResolveUDPAddr("udp", hostport)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("resolving STUN server %q: %w", hostport, err)
	}
	ap := ua.AddrPort()
	if ap.Port() == 0 || ap.Addr().IsUnspecified() {
		return netip.AddrPort{}, fmt.Errorf("STUN server %q: want a host and a non-zero port", hostport)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

// parseRelayPorts parses Options.RelayPorts, "first-last" (inclusive, both at
// least 1024, at least two ports: a session takes two, and the controller
// refuses fewer), "" for none.
func parseRelayPorts(s string) (first, last uint16, err error) {
	if s == "" {
		return 0, 0, nil
	}
	a, b, ok := strings.Cut(s, "-")
	f, err1 := strconv.ParseUint(a, 10, 16)
	l, err2 := strconv.ParseUint(b, 10, 16)
	if !ok || err1 != nil || err2 != nil || f < 1024 || l <= f {
		return 0, 0, fmt.Errorf("--relay-ports %q: want FIRST-LAST, two UDP ports from 1024 to 65535 with FIRST < LAST (a session takes two; e.g. 40000-40999)", s)
	}
	return uint16(f), uint16(l), nil
}

// stunLoop learns the NAT mapping of the WireGuard port from the STUN server
// every stunEvery and when the local endpoint moved, until ctx ends. It does
// nothing when STUN is off or the dataplane cannot share its socket. Without
// --stun-server the server is on the host of the controller in use, so it
// follows a failover (server is the one setup resolved, kept when resolving the
// current one fails).
func (a *agent) stunLoop(ctx context.Context, server netip.AddrPort) {
	st, ok := a.dp.(dataplane.STUN)
	if !ok || !server.IsValid() {
		return
	}
	t := time.NewTicker(stunEvery)
	defer t.Stop()
	warned := false
	for {
		if a.opts.STUNServer == "" {
			if s, err := stunServer("", a.ctl.current()); err == nil {
				server = s
			}
		}
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		mapped, err := st.Binding(qctx, server)
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case errors.Is(err, dataplane.ErrNoSTUN) && a.dp.Kind() == dataplane.KindKernel:
			a.log.Info("kernel WireGuard: its socket cannot carry STUN, so this node advertises no STUN candidate (see docs/nat.md)")
			return
		case err != nil:
			if !warned {
				a.log.Info("no STUN mapping for the WireGuard port, so no stun candidate (does the controller run --stun-listen? see --stun-server); retrying every 30 s", "server", server, "err", err)
				warned = true
			}
		default:
			warned = false
			a.setMapped(mapped)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.stunC:
		}
	}
}

// setMapped records the STUN mapping and, when it changed, tells the path
// selector and the controller.
func (a *agent) setMapped(m netip.AddrPort) {
	a.mu.Lock()
	changed := a.mapped != m
	a.mapped = m
	a.mu.Unlock()
	if changed {
		a.log.Info("STUN mapping of the WireGuard port", "mapped", m)
		a.updateSelf()
		signal(a.reportC)
	}
}

// candidates returns this node's own candidates as sent to the controller: the
// advertised endpoint, the host's other global addresses (with the WireGuard
// port), then the STUN mapping.
func (a *agent) candidates() []*segmeshv1.Candidate {
	a.mu.Lock()
	ep, mapped := a.endpoint, a.mapped
	a.mu.Unlock()
	var out []*segmeshv1.Candidate
	add := func(ap netip.AddrPort, kind string) {
		if !ap.IsValid() || slices.ContainsFunc(out, func(c *segmeshv1.Candidate) bool { return c.Endpoint == ap.String() }) {
			return
		}
		out = append(out, &segmeshv1.Candidate{Endpoint: ap.String(), Kind: kind})
	}
	add(ep, netmap.CandidateLocal)
	if ep.IsValid() {
		for _, addr := range hostAddrs(a.id.Interface) {
			if len(out) >= maxLocalCandidates {
				break
			}
			add(netip.AddrPortFrom(addr, ep.Port()), netmap.CandidateLocal)
		}
	}
	add(mapped, netmap.CandidateSTUN)
	return out
}

// hostAddrs returns the global unicast addresses of the host's interfaces that
// are up, except the overlay interface's, IPv4 first.
var hostAddrs = func(overlay string) []netip.Addr {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil
	}
	var v4, v6 []netip.Addr
	for _, ifc := range ifs {
		if ifc.Name == overlay || ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, ad := range addrs {
			pfx, err := netip.ParsePrefix(ad.String())
			if err != nil || !pfx.Addr().IsGlobalUnicast() {
				continue
			}
			if a := pfx.Addr().Unmap(); a.Is4() {
				v4 = append(v4, a)
			} else {
				v6 = append(v6, a)
			}
		}
	}
	return append(v4, v6...)
}

// updateSelf tells the path selector this host's own endpoints and public address.
func (a *agent) updateSelf() {
	a.mu.Lock()
	ep, mapped := a.endpoint, a.mapped
	a.mu.Unlock()
	own := []netip.AddrPort{}
	if ep.IsValid() {
		own = append(own, ep)
		for _, addr := range hostAddrs(a.id.Interface) {
			own = append(own, netip.AddrPortFrom(addr, ep.Port()))
		}
	}
	if mapped.IsValid() {
		own = append(own, mapped)
	}
	a.path.SetSelf(own, mapped.Addr())
}

// pathPeers builds the selector's peers from nm and the endpoints of verified
// gossip claims: the claim's endpoint first (the peer's own, newest word), then
// the netmap's candidates, then its endpoint.
func pathPeers(nm *netmap.Netmap, claimed map[dataplane.Key]netip.AddrPort) []path.Peer {
	if nm == nil || nm.Revoked {
		return nil
	}
	out := make([]path.Peer, 0, len(nm.Peers))
	for _, p := range nm.Peers {
		var cs []netmap.Candidate
		if ep, ok := claimed[p.PublicKey]; ok && ep.IsValid() {
			cs = append(cs, netmap.Candidate{Endpoint: ep, Kind: netmap.CandidateLocal})
		}
		cs = append(cs, p.Candidates...)
		if p.Endpoint.IsValid() && !slices.ContainsFunc(cs, func(c netmap.Candidate) bool { return c.Endpoint == p.Endpoint }) {
			cs = append(cs, netmap.Candidate{Endpoint: p.Endpoint, Kind: netmap.CandidateLocal})
		}
		out = append(out, path.Peer{Key: p.PublicKey, Name: p.Name, Candidates: cs})
	}
	return out
}

// pathLoop runs the path selector and hands its endpoints to the reconciler
// whenever a path changes, until ctx ends.
func (a *agent) pathLoop(ctx context.Context) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.path.Run(ctx)
	}()
	defer func() { <-done }()
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.path.Changed():
		}
		if _, changed := a.rec.SetEndpoints(a.path.Endpoints()); changed {
			signal(a.reportC)
		}
	}
}

// device returns the endpoint and latest handshake of every peer: fresh from
// the device when the dataplane can read its peers alone, else as of the
// latest read-back.
func (a *agent) device() map[dataplane.Key]path.Device {
	out := map[dataplane.Key]path.Device{}
	if r, ok := a.dp.(dataplane.PeerReader); ok {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if ps, err := r.ReadPeers(ctx); err == nil {
			for k, p := range ps {
				out[k] = path.Device{Endpoint: p.Endpoint, LastHandshake: p.LastHandshake}
			}
			return out
		} else {
			a.log.Debug("reading the WireGuard peers for path selection; using the latest read-back", "err", err)
		}
	}
	a.peers.visit(a.rec.Netmap(), func(p *observedPeer) {
		out[p.key] = path.Device{Endpoint: p.endpoint, LastHandshake: p.stats.LastHandshake}
	})
	return out
}

// requestPunch asks the controller for a punch with peer; ErrOffline (wrapped)
// when the controller says the peer is not connected.
func (a *agent) requestPunch(ctx context.Context, peer string) error {
	if a.syncer == nil {
		return errors.New("not connected to the controller")
	}
	client, ctx, cancel := a.syncer.call(ctx, 0)
	defer cancel()
	_, err := client.RequestPunch(ctx, connect.NewRequest(&segmeshv1.RequestPunchRequest{Peer: peer}))
	if connect.CodeOf(err) == connect.CodeFailedPrecondition && strings.Contains(err.Error(), "offline") {
		return fmt.Errorf("%w: %w", path.ErrOffline, err)
	}
	return err
}

// requestRelay asks the controller for a relay session with peer.
func (a *agent) requestRelay(ctx context.Context, peer string) (netmap.Candidate, time.Time, error) {
	if a.syncer == nil {
		return netmap.Candidate{}, time.Time{}, errors.New("not connected to the controller")
	}
	client, ctx, cancel := a.syncer.call(ctx, 0)
	defer cancel()
	resp, err := client.RequestRelay(ctx, connect.NewRequest(&segmeshv1.RequestRelayRequest{Peer: peer}))
	if err != nil {
		return netmap.Candidate{}, time.Time{}, err
	}
	cs := netmap.ParseCandidates([]*segmeshv1.Candidate{resp.Msg.GetCandidate()})
	if len(cs) != 1 || cs[0].Kind != netmap.CandidateRelay {
		return netmap.Candidate{}, time.Time{}, fmt.Errorf("the controller answered with no usable relay candidate (%v)", resp.Msg.GetCandidate())
	}
	return cs[0], time.Unix(resp.Msg.GetExpiresUnix(), 0), nil
}

// handlePunch passes a Punch from the controller to the path selector, for a
// peer the netmap in force lists.
func (a *agent) handlePunch(p *segmeshv1.Punch) {
	k, err := dataplaneKey(p.GetPublicKey())
	if err != nil {
		a.log.Debug("ignoring a punch with a bad key", "peer", p.GetPeer(), "err", err)
		return
	}
	if nm := a.rec.Netmap(); nm == nil {
		return
	} else if np, ok := nm.Peer(k); !ok || np.Name != p.GetPeer() {
		a.log.Debug("ignoring a punch for a key the netmap does not list", "peer", p.GetPeer())
		return
	}
	a.path.Punch(k, netmap.ParseCandidates(p.GetCandidates()))
}

// handleRelayConfig hands the controller's relay sessions to the forwarder.
func (a *agent) handleRelayConfig(rc *segmeshv1.RelayConfig) {
	if a.relay == nil {
		a.log.Debug("ignoring relay sessions: this node forwards for nobody (no --relay-ports)")
		return
	}
	var ss []relay.Session
	for _, s := range rc.GetSessions() {
		ka, errA := dataplaneKey(s.GetKeyA())
		kb, errB := dataplaneKey(s.GetKeyB())
		if errA != nil || errB != nil || !a.relayPort(s.GetPortA()) || !a.relayPort(s.GetPortB()) || s.GetPortA() == s.GetPortB() {
			a.log.Warn("ignoring an invalid relay session", "id", s.GetId())
			continue
		}
		ss = append(ss, relay.Session{ID: s.GetId(), KeyA: ka, KeyB: kb, PortA: uint16(s.GetPortA()), PortB: uint16(s.GetPortB()), Expires: time.Unix(s.GetExpiresUnix(), 0)})
	}
	if err := a.relay.Set(ss); err != nil {
		a.log.Warn("setting relay sessions", "err", err)
		return
	}
	a.log.Info("relay sessions", "sessions", len(ss))
}

// relayPort reports whether p is in this node's --relay-ports.
func (a *agent) relayPort(p uint32) bool {
	return p >= uint32(a.relayFirst) && p <= uint32(a.relayLast) && a.relayFirst != 0
}

// dataplaneKey converts a 32-byte wire key.
func dataplaneKey(b []byte) (dataplane.Key, error) {
	if len(b) != 32 {
		return dataplane.Key{}, fmt.Errorf("want a 32-byte key, got %d bytes", len(b))
	}
	return dataplane.Key(b), nil
}
