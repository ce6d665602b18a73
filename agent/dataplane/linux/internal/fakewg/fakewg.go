// Package fakewg is an in-memory WireGuard configuration client with the two calls
// of wgctrl.Client the Linux dataplane uses (Device, ConfigureDevice). It records the
// devices' state, not the calls, and dumps it as canonical text (String), so that a
// test asserts on what the "kernel" holds.
//
// It applies a wgtypes.Config with the semantics of kernel WireGuard and wireguard-go
// (see wireguard-go device/uapi.go): a new private key removes the peer with the
// matching public key; a peer with the device's own public key is ignored; an
// update-only peer that does not exist and the removal of a missing peer are no-ops;
// an allowed IP moves from the peer that held it to the peer that adds it. It refuses
// what these would silently change (an allowed IP with host bits set, a keepalive
// that is not a whole number of seconds from 0 to 65535, a listen port outside
// 0-65535) and, stricter than the kernel, a peer listed twice in one Config.
package fakewg

import (
	"bytes"
	"cmp"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Client holds WireGuard devices by name. The zero value is not usable; use New.
// Its methods are safe for concurrent use.
type Client struct {
	mu      sync.Mutex
	devices map[string]*device
	sets    int
	onSet   func(name string)
}

type device struct {
	privateKey wgtypes.Key
	listenPort int
	peers      map[wgtypes.Key]*peer
	order      []wgtypes.Key // creation order: what Device lists
	owner      map[netip.Prefix]wgtypes.Key
}

type peer struct {
	endpoint     *net.UDPAddr
	keepalive    time.Duration
	presharedKey wgtypes.Key
	allowedIPs   []netip.Prefix // insertion order
}

// New returns a client without devices.
func New() *Client { return &Client{devices: map[string]*device{}} }

// AddDevice creates an empty device (no key, port 0, no peers), as creating a
// WireGuard link does. It is an error when the device exists.
func (c *Client) AddDevice(name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.devices[name]; ok {
		return fmt.Errorf("fakewg: device %s exists", name)
	}
	c.devices[name] = &device{peers: map[wgtypes.Key]*peer{}, owner: map[netip.Prefix]wgtypes.Key{}}
	return nil
}

// RemoveDevice deletes a device, as deleting its link does; a missing one is ignored.
func (c *Client) RemoveDevice(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.devices, name)
}

// OnSet registers f, called (without the client's lock) after every successful
// ConfigureDevice, like the UAPI "set" hook of the Linux dataplane. nil removes it.
func (c *Client) OnSet(f func(name string)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.onSet = f
}

// Sets counts successful ConfigureDevice calls.
func (c *Client) Sets() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sets
}

// Close does nothing: devices outlive a wgctrl client, and the fake stays usable.
func (c *Client) Close() error { return nil }

// Device returns a snapshot of the device, its peers in creation order; a missing
// device is os.ErrNotExist, as with wgctrl.
func (c *Client) Device(name string) (*wgtypes.Device, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	d, ok := c.devices[name]
	if !ok {
		return nil, fmt.Errorf("fakewg: device %s: %w", name, os.ErrNotExist)
	}
	out := &wgtypes.Device{Name: name, Type: wgtypes.LinuxKernel, PrivateKey: d.privateKey, ListenPort: d.listenPort}
	if d.privateKey != (wgtypes.Key{}) {
		out.PublicKey = d.privateKey.PublicKey()
	}
	for _, k := range d.order {
		p := d.peers[k]
		wp := wgtypes.Peer{PublicKey: k, PresharedKey: p.presharedKey, PersistentKeepaliveInterval: p.keepalive}
		if p.endpoint != nil {
			e := *p.endpoint
			wp.Endpoint = &e
		}
		for _, a := range p.allowedIPs {
			wp.AllowedIPs = append(wp.AllowedIPs, net.IPNet{IP: a.Addr().AsSlice(), Mask: net.CIDRMask(a.Bits(), a.Addr().BitLen())})
		}
		out.Peers = append(out.Peers, wp)
	}
	return out, nil
}

// ConfigureDevice applies cfg (see the package doc). A refused Config changes
// nothing; a missing device is os.ErrNotExist.
func (c *Client) ConfigureDevice(name string, cfg wgtypes.Config) error {
	c.mu.Lock()
	d, ok := c.devices[name]
	if !ok {
		c.mu.Unlock()
		return fmt.Errorf("fakewg: device %s: %w", name, os.ErrNotExist)
	}
	if err := check(cfg); err != nil {
		c.mu.Unlock()
		return fmt.Errorf("fakewg: configuring %s: %w", name, err)
	}
	d.apply(cfg)
	c.sets++
	hook := c.onSet
	c.mu.Unlock()
	if hook != nil {
		hook(name)
	}
	return nil
}

func check(cfg wgtypes.Config) error {
	if cfg.ListenPort != nil && (*cfg.ListenPort < 0 || *cfg.ListenPort > 65535) {
		return fmt.Errorf("listen port %d out of range", *cfg.ListenPort)
	}
	seen := map[wgtypes.Key]bool{}
	for _, p := range cfg.Peers {
		if seen[p.PublicKey] {
			return fmt.Errorf("peer %s is listed twice in one configuration", p.PublicKey)
		}
		seen[p.PublicKey] = true
		if ka := p.PersistentKeepaliveInterval; ka != nil && (*ka < 0 || *ka > 65535*time.Second || *ka%time.Second != 0) {
			return fmt.Errorf("peer %s: persistent keepalive %v is not a whole number of seconds in 0-65535", p.PublicKey, *ka)
		}
		for _, n := range p.AllowedIPs {
			a, err := prefixOf(n)
			if err != nil {
				return fmt.Errorf("peer %s: %w", p.PublicKey, err)
			}
			if a != a.Masked() {
				return fmt.Errorf("peer %s: allowed IP %s has host bits set; the kernel would store %s", p.PublicKey, a, a.Masked())
			}
		}
	}
	return nil
}

func (d *device) apply(cfg wgtypes.Config) {
	if cfg.PrivateKey != nil {
		d.privateKey = *cfg.PrivateKey
		if d.privateKey != (wgtypes.Key{}) {
			d.removePeer(d.privateKey.PublicKey())
		}
	}
	if cfg.ListenPort != nil {
		d.listenPort = *cfg.ListenPort
	}
	if cfg.ReplacePeers {
		for _, k := range slices.Clone(d.order) {
			d.removePeer(k)
		}
	}
	var own wgtypes.Key
	if d.privateKey != (wgtypes.Key{}) {
		own = d.privateKey.PublicKey()
	}
	for _, pc := range cfg.Peers {
		if d.privateKey != (wgtypes.Key{}) && pc.PublicKey == own {
			continue
		}
		if pc.Remove {
			d.removePeer(pc.PublicKey)
			continue
		}
		p, ok := d.peers[pc.PublicKey]
		if !ok {
			if pc.UpdateOnly {
				continue
			}
			p = &peer{}
			d.peers[pc.PublicKey] = p
			d.order = append(d.order, pc.PublicKey)
		}
		if pc.PresharedKey != nil {
			p.presharedKey = *pc.PresharedKey
		}
		if pc.Endpoint != nil {
			e := *pc.Endpoint
			p.endpoint = &e
		}
		if pc.PersistentKeepaliveInterval != nil {
			p.keepalive = *pc.PersistentKeepaliveInterval
		}
		if pc.ReplaceAllowedIPs {
			for _, a := range p.allowedIPs {
				delete(d.owner, a)
			}
			p.allowedIPs = nil
		}
		for _, n := range pc.AllowedIPs {
			a, _ := prefixOf(n) // checked
			if o, ok := d.owner[a]; ok {
				if o == pc.PublicKey {
					continue
				}
				op := d.peers[o]
				op.allowedIPs = slices.DeleteFunc(op.allowedIPs, func(x netip.Prefix) bool { return x == a })
			}
			d.owner[a] = pc.PublicKey
			p.allowedIPs = append(p.allowedIPs, a)
		}
	}
}

func (d *device) removePeer(k wgtypes.Key) {
	p, ok := d.peers[k]
	if !ok {
		return
	}
	for _, a := range p.allowedIPs {
		delete(d.owner, a)
	}
	delete(d.peers, k)
	d.order = slices.DeleteFunc(d.order, func(x wgtypes.Key) bool { return x == k })
}

// prefixOf converts an allowed IP as wgctrl carries it (4- or 16-byte IP, mask of 32
// or 128 bits) to a prefix; IPv4 in 16-byte form with a 32-bit mask is IPv4.
func prefixOf(n net.IPNet) (netip.Prefix, error) {
	ones, bits := n.Mask.Size()
	addr, ok := netip.AddrFromSlice(n.IP)
	if !ok || (bits != 32 && bits != 128) {
		return netip.Prefix{}, fmt.Errorf("allowed IP %v is malformed", n)
	}
	if bits == 32 {
		if !addr.Unmap().Is4() {
			return netip.Prefix{}, fmt.Errorf("allowed IP %v: IPv6 address with an IPv4 mask", n)
		}
		addr = addr.Unmap()
	} else if addr.Is4() {
		return netip.Prefix{}, fmt.Errorf("allowed IP %v: IPv4 address with an IPv6 mask", n)
	}
	return netip.PrefixFrom(addr, ones), nil
}

// String dumps every device in canonical form, devices by name, peers by public key,
// allowed IPs by address then length, one line per device and per peer:
//
//	device wg0 public-key <base64|none> listen-port 51820
//	  peer <base64> endpoint 192.0.2.1:51820 keepalive 25s allowed-ips 10.0.0.2/32,fd00::2/128
//
// "endpoint -" is an unknown endpoint and "allowed-ips -" none; a preshared key
// shows as " preshared-key set". Keys print as public keys, never private ones.
func (c *Client) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var b strings.Builder
	for _, name := range slices.Sorted(maps.Keys(c.devices)) {
		b.WriteString(c.devices[name].dump(name))
	}
	return b.String()
}

// DeviceString dumps one device as String does; "" when it does not exist.
func (c *Client) DeviceString(name string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	d, ok := c.devices[name]
	if !ok {
		return ""
	}
	return d.dump(name)
}

func (d *device) dump(name string) string {
	var b strings.Builder
	pub := "none"
	if d.privateKey != (wgtypes.Key{}) {
		pub = d.privateKey.PublicKey().String()
	}
	fmt.Fprintf(&b, "device %s public-key %s listen-port %d\n", name, pub, d.listenPort)
	keys := slices.Clone(d.order)
	slices.SortFunc(keys, func(a, b wgtypes.Key) int { return bytes.Compare(a[:], b[:]) })
	for _, k := range keys {
		p := d.peers[k]
		ep := "-"
		if p.endpoint != nil {
			ap := p.endpoint.AddrPort()
			ep = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
		}
		ips := slices.Clone(p.allowedIPs)
		slices.SortFunc(ips, func(a, b netip.Prefix) int {
			if c := a.Addr().Compare(b.Addr()); c != 0 {
				return c
			}
			return cmp.Compare(a.Bits(), b.Bits())
		})
		list := "-"
		if len(ips) > 0 {
			parts := make([]string, len(ips))
			for i, a := range ips {
				parts[i] = a.String()
			}
			list = strings.Join(parts, ",")
		}
		fmt.Fprintf(&b, "  peer %s endpoint %s keepalive %v allowed-ips %s", k, ep, p.keepalive, list)
		if p.presharedKey != (wgtypes.Key{}) {
			b.WriteString(" preshared-key set")
		}
		b.WriteString("\n")
	}
	return b.String()
}
