package linux

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux/internal/nsutil"
	"segmesh/agent/dataplane/stunbind"
)

// userDevice is an embedded wireguard-go device on a TUN interface, configured through
// its UAPI socket (/var/run/wireguard/NAME.sock) like a kernel device is through netlink.
type userDevice struct {
	name  string
	dev   *device.Device
	index int
	log   *slog.Logger
	// stun shares the device's UDP socket with STUN (see Binding).
	stun *stunbind.Bind

	uapi     net.Listener
	uapiDone chan struct{} // closed when the accept loop ends
	// onSet is called after each UAPI "set" operation (see uapiConn).
	onSet func()
}

// Binding implements dataplane.STUN on the wireguard-go device's socket. With
// kernel WireGuard, or before the first Apply created the device, it returns
// dataplane.ErrNoSTUN; after the device was re-created, transactions in flight
// end with stunbind.ErrClosed.
func (d *Dataplane) Binding(ctx context.Context, dst netip.AddrPort) (netip.AddrPort, error) {
	d.mu.Lock()
	var sb *stunbind.Bind
	if d.user != nil {
		sb = d.user.stun
	}
	d.mu.Unlock()
	if sb == nil {
		return netip.AddrPort{}, fmt.Errorf("STUN Binding with %v: %w", dst, dataplane.ErrNoSTUN)
	}
	return sb.Binding(ctx, dst)
}

// ensureDevice makes the WireGuard interface exist (kernel WireGuard unless forced to
// or unavailable, else wireguard-go) and returns its link. It reuses a kernel device
// left by an earlier process and replaces anything else holding the name: no other
// process can serve a wireguard-go device here, since the namespace's lock is ours
// and a wireguard-go device ends with its process. d.mu must be held.
func (d *Dataplane) ensureDevice(mtu int) (netlink.Link, error) {
	name := d.opts.Interface
	snap, err := d.linkState()
	if err != nil {
		return nil, err
	}
	link := snap.link
	if u := d.user; u != nil {
		if link != nil && link.Attrs().Index == u.index && !u.closed() {
			if err := u.ensureUAPI(); err != nil {
				return nil, err
			}
			d.kind = dataplane.KindUserspace
			return link, nil
		}
		d.log.Warn("wireguard-go device lost its interface; re-creating it", "interface", name)
		d.closeUserDevice()
		d.linkChanged()
		if link, err = d.linkByName(); err != nil {
			return nil, err
		}
	}
	if link != nil {
		if link.Type() == "wireguard" && !d.opts.ForceUserspace {
			d.kind = dataplane.KindKernel
			return link, nil
		}
		d.log.Warn("replacing interface", "interface", name, "type", link.Type())
		d.linkChanged()
		if err := d.rtnl.LinkDel(link); err != nil && !isNotFound(err) {
			return nil, fmt.Errorf("deleting stale interface: %w", err)
		}
	}

	d.linkChanged()
	if !d.opts.ForceUserspace {
		err := d.rtnl.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}})
		switch {
		case err == nil:
			d.kind = dataplane.KindKernel
			// The module may have been loaded just now: reopen wgctrl so it has a
			// netlink client for kernel devices.
			if err := d.reopenWgctrl(); err != nil {
				return nil, err
			}
			d.setAddrGenModeNone()
			return d.mustLinkByName()
		case errors.Is(err, unix.EOPNOTSUPP):
			d.log.Info("kernel WireGuard is not available; using embedded wireguard-go", "interface", name)
		default:
			return nil, fmt.Errorf("adding kernel WireGuard link: %w", err)
		}
	}
	u, err := d.newUserDevice(mtu)
	if err != nil {
		return nil, err
	}
	d.user = u
	d.kind = dataplane.KindUserspace
	d.wgGen.up() // u's UAPI socket counts "set" operations from now on
	d.setAddrGenModeNone()
	return d.mustLinkByName()
}

// setAddrGenModeNone stops the kernel from adding an IPv6 link-local address when the
// link comes up: the interface holds exactly State.Addresses.
func (d *Dataplane) setAddrGenModeNone() {
	link, err := d.linkByName()
	if err == nil && link != nil {
		err = d.rtnl.LinkSetIP6AddrGenMode(link, addrGenModeNone)
	}
	if err != nil {
		d.log.Debug("setting IPv6 address generation mode", "interface", d.opts.Interface, "err", err)
	}
}

func (d *Dataplane) reopenWgctrl() error {
	c, err := d.openWG()
	if err != nil {
		return err
	}
	_ = d.wg.Close()
	d.wg = c
	d.wgChanged()
	return nil
}

// closeUserDevice closes the wireguard-go device this process owns, if any. d.mu
// must be held.
func (d *Dataplane) closeUserDevice() {
	if d.user == nil {
		return
	}
	d.user.close()
	d.user = nil
	d.wgChanged()
	d.wgGen.down()
}

// configureDevice sends cfg to the WireGuard device. Watch is poked for UAPI "set"
// operations of others only, so when another one completed during this call, it is
// poked here. d.mu must be held.
func (d *Dataplane) configureDevice(cfg wgtypes.Config) error {
	d.ownSets.Add(1)
	before := d.uapiSets.Load()
	err := d.wg.ConfigureDevice(d.opts.Interface, cfg)
	if d.uapiSets.Load()-before > 1 {
		d.watchers.poke()
	}
	d.ownSets.Add(-1)
	d.wgChanged()
	return err
}

// uapiSet is called after every UAPI "set" operation on the wireguard-go device.
func (d *Dataplane) uapiSet() {
	d.uapiSets.Add(1)
	d.wgGen.bump()
	if d.ownSets.Load() == 0 {
		d.watchers.poke()
	}
}

// newUserDevice creates the TUN interface (in the dataplane's namespace), the
// wireguard-go device on it, and the UAPI socket serving it.
func (d *Dataplane) newUserDevice(mtu int) (*userDevice, error) {
	name := d.opts.Interface
	var tdev tun.Device
	if err := nsutil.Do(d.ns, func() (err error) {
		tdev, err = tun.CreateTUN(name, mtu)
		return err
	}); err != nil {
		return nil, fmt.Errorf("creating TUN device: %w", err)
	}
	var bind conn.Bind = conn.NewDefaultBind()
	if d.foreignNS {
		bind = &nsBind{Bind: bind, ns: d.ns}
	}
	log := d.log.With("interface", name, "component", "wireguard-go")
	sb := stunbind.New(bind, log.With("component", "stun"))
	logger := &device.Logger{
		Verbosef: func(format string, args ...any) { log.Debug(fmt.Sprintf(format, args...)) },
		Errorf:   func(format string, args ...any) { log.Warn(fmt.Sprintf(format, args...)) },
	}
	u := &userDevice{name: name, dev: device.NewDevice(tdev, sb, logger), stun: sb, log: log, onSet: d.uapiSet}
	link, err := d.linkByName()
	if err == nil && link == nil {
		err = fmt.Errorf("TUN device %s vanished", name)
	}
	if err != nil {
		u.dev.Close()
		return nil, err
	}
	u.index = link.Attrs().Index
	if err := u.ensureUAPI(); err != nil {
		u.dev.Close()
		return nil, err
	}
	return u, nil
}

// ensureUAPI (re)opens the UAPI socket unless it is being served.
func (u *userDevice) ensureUAPI() error {
	if u.uapiDone != nil {
		select {
		case <-u.uapiDone:
			u.log.Warn("UAPI socket stopped serving; reopening it")
		default:
			return nil
		}
	}
	f, err := ipc.UAPIOpen(u.name)
	if err != nil {
		return fmt.Errorf("opening UAPI socket: %w", err)
	}
	l, err := ipc.UAPIListen(u.name, f)
	f.Close() // the listener holds its own descriptor
	if err != nil {
		return fmt.Errorf("listening on UAPI socket: %w", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go u.dev.IpcHandle(&uapiConn{Conn: c, onSet: u.onSet})
		}
	}()
	u.uapi, u.uapiDone = l, done
	return nil
}

// uapiConn is one UAPI connection of the wireguard-go device. It watches the
// requests for "set=1" operations and, once one came, calls onSet before each write
// of wireguard-go: it answers every operation ("errno=N") after applying it, so the
// last onSet runs after the change. Counting too often (a write for an earlier or a
// later "get" on the same connection; wgctrl and wg(8) use one connection per
// operation) is harmless: it only makes the next read go to the device.
type uapiConn struct {
	net.Conn
	onSet  func()
	line   [5]byte // the first bytes of the current request line
	n      int     // length of the current request line
	sawSet bool
}

func (c *uapiConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	for _, ch := range b[:n] {
		if ch == '\n' {
			if c.n == len("set=1") && string(c.line[:]) == "set=1" {
				c.sawSet = true
			}
			c.n = 0
			continue
		}
		if c.n < len(c.line) {
			c.line[c.n] = ch
		}
		c.n++
	}
	return n, err
}

func (c *uapiConn) Write(b []byte) (int, error) {
	if c.sawSet {
		c.onSet()
	}
	return c.Conn.Write(b)
}

// closed reports whether wireguard-go shut the device down (e.g. its TUN was deleted).
func (u *userDevice) closed() bool {
	select {
	case <-u.dev.Wait():
		return true
	default:
		return false
	}
}

// close stops the UAPI socket (removing its file) and the device, which removes the TUN.
func (u *userDevice) close() {
	if u.uapi != nil {
		_ = u.uapi.Close()
		<-u.uapiDone
	}
	u.dev.Close()
}

// nsBind opens wireguard-go's UDP sockets in the dataplane's network namespace.
// wireguard-go (re)opens them from its own goroutines (e.g. when the TUN comes up),
// which run on threads of the process's namespace; this matters only when the
// dataplane lives in another namespace than the process (in-process tests).
type nsBind struct {
	conn.Bind
	ns netns.NsHandle
}

func (b *nsBind) Open(port uint16) (fns []conn.ReceiveFunc, actual uint16, err error) {
	err = nsutil.Do(b.ns, func() error {
		var oerr error
		fns, actual, oerr = b.Bind.Open(port)
		return oerr
	})
	return fns, actual, err
}

// addrGenModeNone is IN6_ADDR_GEN_MODE_NONE (linux/if_link.h).
const addrGenModeNone = 1

var _ dataplane.STUN = (*Dataplane)(nil)
