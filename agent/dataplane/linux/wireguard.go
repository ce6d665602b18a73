package linux

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/dataplane"
)

// validate rejects states the kernel refuses or would silently normalise (so that
// Read could never equal them; see dataplane.State.Validate) and states for another
// interface than this dataplane's.
func (d *Dataplane) validate(s dataplane.State) error {
	if s.Interface != d.opts.Interface {
		return fmt.Errorf("interface %q, but this dataplane manages %q", s.Interface, d.opts.Interface)
	}
	return s.Validate()
}

// configureWireGuard sets the private key and listen port when they differ and diffs
// the peers: removes peers not in s, adds new ones, and for existing ones updates only
// what changed (endpoint, allowed IPs, keepalive, a stray preshared key), so sessions
// of unchanged peers are untouched; all in one configuration call, and none when the
// device already matches. A persistent keepalive that would go from 0 to non-zero is
// left at 0 and recorded in d.pending for the keepalive goroutine. d.mu must be held.
func (d *Dataplane) configureWireGuard(s dataplane.State) error {
	dev, err := d.device()
	if err != nil {
		return fmt.Errorf("reading device: %w", err)
	}
	var cfg wgtypes.Config
	if dev.PrivateKey != wgtypes.Key(s.PrivateKey) {
		k := wgtypes.Key(s.PrivateKey)
		cfg.PrivateKey = &k
	}
	if s.ListenPort != 0 && dev.ListenPort != s.ListenPort {
		cfg.ListenPort = &s.ListenPort
	}
	have := make(map[wgtypes.Key]*wgtypes.Peer, len(dev.Peers))
	for i := range dev.Peers {
		have[dev.Peers[i].PublicKey] = &dev.Peers[i]
	}
	pending := map[wgtypes.Key]int{}
	var added, updated, removed int
	for _, p := range s.Peers {
		key := wgtypes.Key(p.PublicKey)
		keepalive := time.Duration(p.PersistentKeepalive) * time.Second
		cur, ok := have[key]
		delete(have, key)
		if !ok {
			pc := wgtypes.PeerConfig{PublicKey: key, ReplaceAllowedIPs: true, AllowedIPs: ipNets(p.AllowedIPs)}
			if p.Endpoint.IsValid() {
				pc.Endpoint = net.UDPAddrFromAddrPort(p.Endpoint)
			}
			if keepalive > 0 {
				pending[key] = p.PersistentKeepalive
			}
			cfg.Peers = append(cfg.Peers, pc)
			added++
			continue
		}
		pc := wgtypes.PeerConfig{PublicKey: key, UpdateOnly: true}
		changed := false
		if p.Endpoint.IsValid() && udpAddrPort(cur.Endpoint) != p.Endpoint {
			pc.Endpoint, changed = net.UDPAddrFromAddrPort(p.Endpoint), true
		}
		if !slices.Equal(prefixesOf(cur.AllowedIPs), p.AllowedIPs) {
			pc.ReplaceAllowedIPs, pc.AllowedIPs, changed = true, ipNets(p.AllowedIPs), true
		}
		switch {
		case cur.PersistentKeepaliveInterval == 0 && keepalive > 0:
			pending[key] = p.PersistentKeepalive
		case cur.PersistentKeepaliveInterval != keepalive:
			pc.PersistentKeepaliveInterval, changed = &keepalive, true
		}
		if cur.PresharedKey != (wgtypes.Key{}) {
			pc.PresharedKey, changed = &wgtypes.Key{}, true
		}
		if changed {
			cfg.Peers = append(cfg.Peers, pc)
			updated++
		}
	}
	for key := range have {
		cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: key, Remove: true})
		removed++
	}
	if cfg.PrivateKey == nil && cfg.ListenPort == nil && len(cfg.Peers) == 0 {
		d.setPending(pending)
		return nil
	}
	if err := d.configureDevice(cfg); err != nil {
		return fmt.Errorf("configuring device (%d peers added, %d updated, %d removed): %w", added, updated, removed, err)
	}
	d.setPending(pending)
	d.log.Info("configured WireGuard", "interface", d.opts.Interface, "kind", d.kind,
		"private_key_set", cfg.PrivateKey != nil, "listen_port_set", cfg.ListenPort != nil,
		"peers_added", added, "peers_updated", updated, "peers_removed", removed,
		"keepalives_pending", len(pending))
	return nil
}

// readWireGuard fills the WireGuard fields of s from the device; a missing device
// leaves them zero. A peer whose keepalive is pending reads with it. stats, when
// not nil, receives each peer's latest handshake time and byte counters.
func (d *Dataplane) readWireGuard(s *dataplane.State, stats map[dataplane.Key]dataplane.PeerStats) error {
	dev, err := d.device()
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	s.PrivateKey = dataplane.Key(dev.PrivateKey)
	s.ListenPort = dev.ListenPort
	if d.applied != nil && d.applied.ListenPort == 0 {
		s.ListenPort = 0
	}
	s.Peers = make([]dataplane.Peer, 0, len(dev.Peers))
	for _, p := range dev.Peers {
		ka := int(p.PersistentKeepaliveInterval / time.Second)
		if want, ok := d.pending[p.PublicKey]; ok && ka == 0 {
			ka = want
		}
		if stats != nil {
			stats[dataplane.Key(p.PublicKey)] = dataplane.PeerStats{LastHandshake: p.LastHandshakeTime,
				RxBytes: uint64(max(p.ReceiveBytes, 0)), TxBytes: uint64(max(p.TransmitBytes, 0))}
		}
		s.Peers = append(s.Peers, dataplane.Peer{
			PublicKey:           dataplane.Key(p.PublicKey),
			Endpoint:            udpAddrPort(p.Endpoint),
			AllowedIPs:          prefixesOf(p.AllowedIPs),
			PersistentKeepalive: ka,
		})
	}
	return nil
}

func udpAddrPort(a *net.UDPAddr) netip.AddrPort {
	if a == nil {
		return netip.AddrPort{}
	}
	ap := a.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// prefixesOf converts allowed IPs to sorted prefixes (IPv4 ones in 4-byte form).
func prefixesOf(ns []net.IPNet) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(ns))
	for _, n := range ns {
		if p, ok := prefixOf(n); ok {
			out = append(out, p)
		}
	}
	return dataplane.Canonical(dataplane.State{Addresses: out}).Addresses
}

func prefixOf(n net.IPNet) (netip.Prefix, bool) {
	ones, bits := n.Mask.Size()
	addr, ok := netip.AddrFromSlice(n.IP)
	if !ok || bits == 0 {
		return netip.Prefix{}, false
	}
	if bits == 32 {
		addr = addr.Unmap()
	}
	return netip.PrefixFrom(addr, ones), true
}

func ipNet(p netip.Prefix) net.IPNet {
	return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func ipNets(ps []netip.Prefix) []net.IPNet {
	out := make([]net.IPNet, len(ps))
	for i, p := range ps {
		out[i] = ipNet(p)
	}
	return out
}

// ReadPeers implements dataplane.PeerReader with an uncached read of the device.
func (d *Dataplane) ReadPeers(ctx context.Context) (map[dataplane.Key]dataplane.PeerState, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[dataplane.Key]dataplane.PeerState{}
	dev, err := d.wg.Device(d.opts.Interface)
	if errors.Is(err, os.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading WireGuard device %s: %w", d.opts.Interface, err)
	}
	for _, p := range dev.Peers {
		out[dataplane.Key(p.PublicKey)] = dataplane.PeerState{Endpoint: udpAddrPort(p.Endpoint), PeerStats: dataplane.PeerStats{
			LastHandshake: p.LastHandshakeTime, RxBytes: uint64(max(p.ReceiveBytes, 0)), TxBytes: uint64(max(p.TransmitBytes, 0))}}
	}
	return out, nil
}

var _ dataplane.PeerReader = (*Dataplane)(nil)
