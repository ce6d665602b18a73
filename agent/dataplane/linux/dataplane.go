// Package linux implements dataplane.Dataplane on Linux: a WireGuard interface (kernel
// WireGuard when the kernel has it, embedded wireguard-go on TUN otherwise, both
// configured through wgctrl), its MTU, addresses and routes (netlink), and the nftables
// table `inet segmesh` (package nft) that enforces the node's filter.
//
// A Dataplane is bound to the network namespace of the thread that calls New; every
// kernel object it creates lives there, whichever goroutine calls its methods. It
// holds an exclusive lock on that namespace (a file in LockDir) for its lifetime, so
// two agents never fight over one table `inet segmesh`.
//
// When an Apply changes the filter, the Dataplane also deletes the conntrack entries
// of the node's connections that the new filter would not accept as new connections,
// so that revoking a rule cuts the established flows it allowed.
//
// WireGuard configuration and link, address and route calls go through two small
// interfaces (seams.go), so that the peer diff and the link/route diff are tested
// against the in-memory fakes of internal/fakewg and internal/fakelinks without root.
package linux

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux/internal/nsutil"
	"segmesh/agent/dataplane/linux/nft"
	"segmesh/agent/firewall"
)

// DefaultMTU is the overlay link MTU used when State.MTU is 0: 1500 minus the
// WireGuard overhead over IPv6 (80 bytes).
const DefaultMTU = 1420

// Options configure New.
type Options struct {
	// Interface is the overlay link name, e.g. "segmesh0"; 1 to 15 bytes. With
	// wireguard-go the UAPI socket /var/run/wireguard/NAME.sock is shared by all
	// network namespaces, so the name must be unique on the machine.
	Interface string
	// ForceUserspace skips kernel WireGuard even where it is available (testing).
	ForceUserspace bool
	// Logger receives progress and wireguard-go messages; nil discards them.
	Logger *slog.Logger
}

// Dataplane programs one overlay interface and the nftables table of one network
// namespace. It implements dataplane.Dataplane and dataplane.Watcher; its methods are
// safe for concurrent use.
type Dataplane struct {
	opts Options
	log  *slog.Logger
	// ns is the network namespace the Dataplane works in; foreignNS is true when it
	// differs from the namespace of the process's main thread.
	ns        netns.NsHandle
	foreignNS bool
	nl        *netlink.Handle // rtnetlink; conntrack uses it directly
	rtnl      links           // links, addresses and routes: nl, or a fake in tests
	fw        *nft.Firewall
	lock      *nsLock
	// openWG opens a WireGuard client in the dataplane's namespace.
	openWG func() (wgClient, error)

	// closing is cancelled by Close; it stops the netlink subscriptions, Watch and
	// keepalive goroutines.
	closing context.Context
	cancel  context.CancelFunc
	// wgGen counts UAPI "set" operations on the wireguard-go device this process owns
	// and linkGen rtnetlink events of the overlay link, its addresses and its routes,
	// so that reads skip what did not change (see cache.go).
	wgGen, linkGen generation
	// uapiSets counts UAPI "set" operations; ownSets is non-zero while this
	// Dataplane's own configuration call runs (see configureDevice).
	uapiSets, ownSets atomic.Int64
	// watchers are the Watch calls to poke on kernel changes.
	watchers watchers
	// subErr is why the rtnetlink subscriptions could not be set up (see
	// subscribeLinks); Watch returns it.
	subErr error
	// kick wakes the keepalive goroutine (see keepalive.go).
	kick chan struct{}

	mu      sync.Mutex
	closed  bool
	wg      wgClient
	kind    dataplane.Kind
	user    *userDevice      // the wireguard-go device this process owns, if any
	applied *dataplane.State // the last state Apply made the kernel hold (canonical)
	table   *firewall.Table  // the nftables table of applied
	// swept is what the last successful conntrack sweep judged entries by; nil
	// before the first one, so the first Apply of a process always sweeps.
	swept *sweepKey
	// pending maps peers whose persistent keepalive (seconds) is still to be turned
	// on by the keepalive goroutine (see keepalive.go).
	pending map[wgtypes.Key]int
	// wgCache and linkCache are the last reads of the WireGuard device and of the
	// overlay link, valid while their generation did not change (see cache.go).
	wgCache   *wgSnapshot
	linkCache *linkSnapshot
}

// sweepKey is the input of a conntrack sweep (the table and the node's addresses).
// A sweep is needed when access may have narrowed since the last one.
type sweepKey struct {
	table     *firewall.Table
	addresses []netip.Prefix
}

// covers reports whether a sweep by k leaves nothing for o to cut: the same
// addresses, and o's table accepts everything k's did (the same table, or only set
// elements added). Flows admitted meanwhile were admitted by k's table, unless the
// kernel's table drifted, which the caller checks.
func (k *sweepKey) covers(o *sweepKey) bool {
	if k == nil || o == nil || !slices.Equal(k.addresses, o.addresses) {
		return false
	}
	if k.table == o.table {
		return true
	}
	p := firewall.PlanUpdate(k.table, o.table)
	return p.ElementsOnly() && len(p.Delete) == 0
}

var (
	_ dataplane.Dataplane    = (*Dataplane)(nil)
	_ dataplane.Watcher      = (*Dataplane)(nil)
	_ dataplane.DeniedReader = (*Dataplane)(nil)
)

// processNS identifies the network namespace the process started in, read while
// package initialisation runs on the main thread, before any code could switch it.
var processNS = func() string {
	ns, err := netns.Get()
	if err != nil {
		return ""
	}
	defer ns.Close()
	return ns.UniqueId()
}()

// ErrClosed is returned by methods called after Close.
var ErrClosed = errors.New("dataplane is closed")

// New returns a Dataplane for opts.Interface in the network namespace of the calling
// thread. It takes the namespace's lock (see LockDir) and opens netlink, nftables and
// wgctrl sockets there but changes nothing in the kernel. Errors: an invalid interface
// name; *NamespaceBusyError when another Dataplane, in this or another process, holds
// the namespace (message "another segmesh agent (pid N) already manages network
// namespace NS (interface X); stop it first"); a lock file or socket that cannot be
// opened.
func New(opts Options) (*Dataplane, error) {
	if opts.Interface == "" || len(opts.Interface) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("interface name %q: must be 1 to %d bytes", opts.Interface, unix.IFNAMSIZ-1)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Dataplane{opts: opts, log: log, kick: make(chan struct{}, 1)}
	d.openWG = func() (wgClient, error) {
		var c *wgctrl.Client
		err := nsutil.Do(d.ns, func() (err error) {
			c, err = wgctrl.New()
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("opening wgctrl: %w", err)
		}
		return c, nil
	}
	var err error
	if d.ns, err = netns.Get(); err != nil {
		return nil, fmt.Errorf("getting network namespace: %w", err)
	}
	d.foreignNS = processNS == "" || d.ns.UniqueId() != processNS
	fail := func(err error) (*Dataplane, error) {
		d.closeSockets()
		if d.lock != nil {
			d.lock.release()
		}
		return nil, err
	}
	if d.lock, err = lockNetNS(d.ns, opts.Interface); err != nil {
		return fail(err)
	}
	// Sockets in another namespace than the process's need setns, hence
	// CAP_SYS_ADMIN; in its own namespace (the agent's service, which has only
	// CAP_NET_ADMIN) they are opened where the process is.
	var (
		h    *netlink.Handle
		nsFD int // 0: the calling thread's namespace
	)
	if d.foreignNS {
		nsFD = int(d.ns)
		h, err = netlink.NewHandleAt(d.ns)
	} else {
		h, err = netlink.NewHandle()
	}
	if err != nil {
		return fail(fmt.Errorf("opening netlink socket: %w", err))
	}
	d.nl, d.rtnl = h, h
	if d.fw, err = nft.New(opts.Interface, nsFD, log); err != nil {
		return fail(err)
	}
	if d.wg, err = d.openWG(); err != nil {
		return fail(err)
	}
	d.closing, d.cancel = context.WithCancel(context.Background())
	d.wgGen.down() // no wireguard-go device yet
	d.subscribeLinks()
	go d.keepaliveLoop()
	return d, nil
}

func (d *Dataplane) closeSockets() {
	if d.wg != nil {
		_ = d.wg.Close()
	}
	if d.fw != nil {
		_ = d.fw.Close()
	}
	if d.nl != nil {
		d.nl.Close()
	}
	_ = d.ns.Close()
}

// Kind reports how WireGuard is provided: the kind the last Apply used, or, before
// any Apply, KindUserspace when forced and "" otherwise.
func (d *Dataplane) Kind() dataplane.Kind {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.kind == "" && d.opts.ForceUserspace {
		return dataplane.KindUserspace
	}
	return d.kind
}

// Apply makes the kernel hold exactly s (see dataplane.Dataplane). Order: the nftables
// table first (so traffic is filtered before the interface passes any); then, when
// access may have narrowed since the last sweep (the table lost rules or set
// elements, the node's addresses changed, the kernel's table had drifted, or this is
// the first Apply of the Dataplane), the conntrack entries of flows the filter no
// longer allows are deleted (see cutRevokedFlows) while the next steps run: the
// WireGuard device and its configuration (private key, listen port and the peer diff,
// in one configuration call; a persistent keepalive that goes from 0 to non-zero is
// turned on shortly after Apply returns, in batches, so that the handshakes it starts
// do not all happen at once, and Read reports it as set meanwhile), then MTU,
// addresses, link up and routes. s.Interface must equal Options.Interface and s must
// pass s.Validate. A zero ListenPort keeps the device's current port; a zero peer
// Endpoint keeps whatever endpoint the device has learned. A failed conntrack sweep
// does not stop the other steps; Apply returns its error at the end and sweeps again
// on the next call. Errors: *NamespaceBusyError (nothing changed) when the
// namespace's lock file was taken over by another holder.
func (d *Dataplane) Apply(ctx context.Context, s dataplane.State) error {
	want := dataplane.Canonical(s)
	if err := d.validate(want); err != nil {
		return fmt.Errorf("invalid state: %w", err)
	}
	table, err := firewall.Build(d.opts.Interface, want.Filter)
	if err != nil {
		return fmt.Errorf("invalid state: filter: %w", err)
	}
	mtu := want.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	if err := d.lock.check(); err != nil {
		return err
	}

	res, err := d.fw.Apply(table)
	if err != nil {
		return fmt.Errorf("programming nftables table inet %s: %w", nft.TableName, err)
	}
	if res.Result != nft.Unchanged {
		d.log.Info("programmed nftables table", "table", nft.TableName, "change", res.Result.String(), "drifted", res.Drifted)
	}
	// The conntrack sweep (netfilter netlink; mostly kernel time) runs while the
	// interface is configured (rtnetlink and wgctrl, other sockets): the new filter
	// is in place already.
	var sweepErr error
	key := &sweepKey{table: table, addresses: want.Addresses}
	var swept chan error
	if res.Drifted || !d.swept.covers(key) {
		swept = make(chan error, 1)
		go func() {
			n, err := d.cutRevokedFlows(table, want)
			if n > 0 {
				d.log.Info("cut flows the filter no longer allows", "conntrack_entries", n)
			}
			swept <- err
		}()
	}
	ifErr := d.applyInterface(ctx, want, mtu)
	if swept != nil {
		if err := <-swept; err != nil {
			sweepErr = fmt.Errorf("cutting flows the filter no longer allows: %w", err)
			d.swept = nil
		} else {
			d.swept = key
		}
	}
	if ifErr != nil {
		return ifErr
	}
	d.applied, d.table = &want, table
	return sweepErr
}

// Read returns what the kernel holds, in canonical form, and its differences from
// the state the last successful Apply programmed (nil before the first Apply). When the
// interface is missing, Interface is "" and the WireGuard fields are zero; when it is
// not a WireGuard device, the WireGuard fields are zero. The nftables part of the
// drift compares the kernel's table with the one Apply built (firewall.Compare), so
// it names rules, chains and sets the Filter cannot express; Filter is the applied
// filter when the table matches, else what the kernel's table enforces. MTU and
// ListenPort read as 0 when the last Apply asked for 0 and the kernel holds the
// default MTU or any port. The
// wireguard-go device and the link's addresses and routes are read again only when a
// UAPI "set" or an rtnetlink event showed they may have changed, and the device at
// least every 30 s (it learns endpoints by itself); kernel WireGuard is always read.
func (d *Dataplane) Read(ctx context.Context) (dataplane.Observed, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return dataplane.Observed{}, ErrClosed
	}
	kernel, err := d.fw.Read()
	if err != nil {
		return dataplane.Observed{}, fmt.Errorf("reading nftables table inet %s: %w", nft.TableName, err)
	}
	o := dataplane.Observed{Firewall: kernel != nil}
	var tableDiff []string
	if d.table != nil {
		tableDiff = firewall.Compare(d.table, kernel)
	}
	switch {
	case d.applied != nil && len(tableDiff) == 0:
		o.State.Filter = d.applied.Filter
	case kernel != nil && d.applied != nil:
		o.State.Filter = kernel.Filter(&d.applied.Filter)
	case kernel != nil:
		o.State.Filter = kernel.Filter(nil)
	}
	if err := ctx.Err(); err != nil {
		return dataplane.Observed{}, err
	}
	o.PeerStats = map[dataplane.Key]dataplane.PeerStats{}
	if err := d.readInterfaceStats(&o.State, o.PeerStats); err != nil {
		return dataplane.Observed{}, err
	}
	o.State = dataplane.Canonical(o.State)
	if d.applied != nil {
		want, have := *d.applied, o.State
		want.Filter, have.Filter = dataplane.Filter{}, dataplane.Filter{}
		o.Drift = dataplane.Diff(want, have)
		for _, t := range tableDiff {
			o.Drift = append(o.Drift, dataplane.Difference{Part: dataplane.PartNftables, Detail: t})
		}
		if o.Drift == nil {
			o.Drift = []dataplane.Difference{}
		}
	}
	return o, nil
}

// ReadDenied returns the flows the nftables table recorded as dropped by the policy
// and its drop counters (see nft.Firewall.Denied); it reads the kernel every time.
func (d *Dataplane) ReadDenied(ctx context.Context) (dataplane.Denied, error) {
	if err := ctx.Err(); err != nil {
		return dataplane.Denied{}, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return dataplane.Denied{}, ErrClosed
	}
	out, err := d.fw.Denied()
	if err != nil {
		return dataplane.Denied{}, fmt.Errorf("reading denied flows of table inet %s: %w", nft.TableName, err)
	}
	return out, nil
}

// Down removes the nftables table and the interface, closing the wireguard-go device
// if this process owns it. Missing table or interface are not errors. Down changes
// nothing and returns *NamespaceBusyError when the namespace's lock file was taken
// over by another holder (New already refuses while another agent runs).
func (d *Dataplane) Down(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	if err := d.lock.check(); err != nil {
		return err
	}
	d.swept = nil
	d.applied, d.table = nil, nil
	d.pending = nil
	var errs []error
	if err := d.fw.Delete(); err != nil {
		errs = append(errs, err)
	}
	d.closeUserDevice()
	d.linkCache = nil
	link, err := d.linkByName()
	if err == nil && link != nil {
		err = d.rtnl.LinkDel(link)
		if isNotFound(err) {
			err = nil
		}
	}
	if err != nil {
		errs = append(errs, fmt.Errorf("deleting interface %s: %w", d.opts.Interface, err))
	}
	return errors.Join(errs...)
}

// Close stops the wireguard-go device this process owns (its TUN interface disappears
// with it), stops Watch, closes sockets and releases the namespace's lock. Kernel
// WireGuard interfaces, addresses, routes and the nftables table stay. Close is
// idempotent.
func (d *Dataplane) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	d.cancel()
	d.closeUserDevice()
	d.closeSockets()
	d.lock.release()
	return nil
}

// linkByName returns the overlay link, or nil when it does not exist.
func (d *Dataplane) linkByName() (netlink.Link, error) {
	link, err := d.rtnl.LinkByName(d.opts.Interface)
	if err != nil {
		if isNotFound(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("looking up interface %s: %w", d.opts.Interface, err)
	}
	return link, nil
}

func (d *Dataplane) mustLinkByName() (netlink.Link, error) {
	link, err := d.linkByName()
	if err == nil && link == nil {
		err = fmt.Errorf("interface %s vanished after creation", d.opts.Interface)
	}
	return link, err
}

func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}
