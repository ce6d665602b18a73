package linux

import (
	"errors"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/dataplane"
)

// generation counts the changes a kernel source reported (UAPI "set" operations,
// rtnetlink events). A read records the count before it reads; its result stays valid
// while the count is unchanged and the source is healthy. A source that may have
// missed changes (a failed subscription, or none at all) is broken, and then every
// read goes to the kernel.
type generation struct {
	n      atomic.Uint64
	broken atomic.Int32 // sources that are down; valid counts need 0
}

// bump records a change.
func (g *generation) bump() { g.n.Add(1) }

// load returns the count and whether it can be trusted.
func (g *generation) load() (uint64, bool) {
	ok := g.broken.Load() == 0
	return g.n.Load(), ok
}

// down marks one source broken (it may miss changes from now on).
func (g *generation) down() {
	g.broken.Add(1)
	g.bump()
}

// up marks a source healthy again, after it started counting.
func (g *generation) up() {
	g.bump()
	g.broken.Add(-1)
}

// wgCacheMaxAge bounds how long a read of the wireguard-go device is reused. Only
// UAPI "set" operations are counted, but the device also changes by itself: it learns
// a peer's new endpoint from an authenticated packet (the peer roamed).
const wgCacheMaxAge = 30 * time.Second

// wgSnapshot is a read of the WireGuard device; dev is shared and never modified.
type wgSnapshot struct {
	gen  uint64
	at   time.Time
	user *userDevice
	dev  *wgtypes.Device
}

// device returns the WireGuard device: the last read when no UAPI "set" reached the
// wireguard-go device since and it is younger than wgCacheMaxAge, otherwise a new
// read. d.mu must be held; the result must not be modified.
func (d *Dataplane) device() (*wgtypes.Device, error) {
	n, ok := d.wgGen.load()
	if c := d.wgCache; ok && c != nil && c.gen == n && c.user == d.user && time.Since(c.at) < wgCacheMaxAge {
		return c.dev, nil
	}
	d.wgCache = nil
	dev, err := d.wg.Device(d.opts.Interface)
	if errors.Is(err, os.ErrNotExist) && d.kind == dataplane.KindKernel {
		// The WireGuard module was loaded after wgctrl was opened: reopen it.
		if err = d.reopenWgctrl(); err == nil {
			dev, err = d.wg.Device(d.opts.Interface)
		}
	}
	if err != nil {
		return nil, err
	}
	if ok {
		d.wgCache = &wgSnapshot{gen: n, at: time.Now(), user: d.user, dev: dev}
	}
	return dev, nil
}

// linkSnapshot is a read of the overlay link: nil link when it is missing, else its
// addresses and the main-table routes through it that the kernel did not derive from
// addresses.
type linkSnapshot struct {
	gen    uint64
	link   netlink.Link
	addrs  []netip.Prefix
	routes []netlink.Route
}

func (s *linkSnapshot) addresses() []netip.Prefix { return append([]netip.Prefix(nil), s.addrs...) }

func (s *linkSnapshot) routeDsts() []netip.Prefix {
	var out []netip.Prefix
	for _, r := range s.routes {
		p, _ := routeDst(r)
		out = append(out, p)
	}
	return out
}

// linkState returns the overlay link, its addresses and routes: the last read when
// no rtnetlink event arrived since, otherwise a new read. d.mu must be held; the
// result must not be modified.
func (d *Dataplane) linkState() (*linkSnapshot, error) {
	n, ok := d.linkGen.load()
	if c := d.linkCache; ok && c != nil && c.gen == n {
		return c, nil
	}
	d.linkCache = nil
	s := &linkSnapshot{gen: n}
	var err error
	if s.link, err = d.linkByName(); err != nil {
		return nil, err
	}
	if s.link != nil {
		if s.addrs, err = d.addresses(s.link); err != nil {
			return nil, err
		}
		if s.routes, err = d.routeList(s.link); err != nil {
			return nil, err
		}
	}
	if ok {
		d.linkCache = s
	}
	return s, nil
}

// linkChanged forgets the cached read of the link after this process changed it
// (the rtnetlink events of the change may arrive later). d.mu must be held.
func (d *Dataplane) linkChanged() { d.linkCache = nil }

// wgChanged forgets the cached read of the WireGuard device after this process
// configured it. d.mu must be held.
func (d *Dataplane) wgChanged() { d.wgCache = nil }
