// Package agent is the segmesh host agent: it enrolls with the controller once,
// applies its last known netmap (or default deny) before anything else, keeps a
// mutual-TLS stream to the controller open for new netmaps, reconciles the
// dataplane against them (plus peer endpoints learned by gossip), and reports the
// revision it enforces, whether its latest read-back found the kernel in sync, and
// its drift repairs.
//
// It also looks after its identity for the life of the host: it renews its node
// certificate with a fresh TLS key before it expires, rotates its WireGuard key
// when an operator asks for it, re-enrolls with a new join token after its
// certificate expired (keeping its keys), and, when an operator revoked the node,
// drops every peer, keeps a default-deny filter (also across restarts) and stops
// gossip and reporting.
//
// With several controller replicas (one fleet sharing an etcd store) the agent knows
// every replica's URL: those given in Options.Controllers and those the controller
// it streams from sends (NetmapUpdate.controllers, feature "controllers"), kept in
// the state directory. It uses one replica at a time for the stream and every call;
// when the stream is lost (closed, failed, or its connection silent for
// enroll.PingAfter+enroll.PingTimeout) it moves to the next URL at once, and backs
// off only after every URL failed in turn. The dataplane stays as it is meanwhile.
//
// Run wires the subpackages together: statefile (state directory), enroll (first
// contact, CA pinning), netmap (validation), reconcile (desired state and drift
// repair) and gossip (memberlist).
package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"segmesh/agent/dataplane"
	"segmesh/agent/flowlog"
	"segmesh/agent/gossip"
	"segmesh/agent/netmap"
	"segmesh/agent/path"
	"segmesh/agent/reconcile"
	"segmesh/agent/relay"
	"segmesh/agent/statefile"
	"segmesh/api/wire"
)

// Version is reported to the controller; set it with
// -ldflags "-X segmesh/agent.Version=v1.2.3".
var Version = "dev"

// Defaults for Options.
const (
	DefaultInterface  = "segmesh0"
	DefaultListenPort = 51820
	DefaultResync     = 10 * time.Second
	// TableName is the nftables table (family and name) the dataplane owns.
	TableName = "inet segmesh"
	// MTU of the overlay link: 1500 minus the WireGuard overhead over IPv6 (80 bytes).
	MTU = 1420
)

// Options configure Run. Zero values take the documented defaults.
type Options struct {
	// Controllers are controller URLs ("https://192.0.2.1:7443"), one per
	// replica of the fleet, at most MaxControllers: scheme https and a host are
	// required, anything else is refused before any connection (the join token
	// must never travel in cleartext). Required on the first start, which enrolls
	// with the first that answers. Later starts use the URLs stored in the state
	// directory (those given at enrollment and those the controllers sent since);
	// URLs given on a later start go first, in their order, before the stored
	// ones, and the agent starts with the first of them.
	Controllers []string
	// Token is the join token. It is needed on the first start; later starts ignore
	// it, except to re-enroll under the enrolled name (with the current TLS and
	// WireGuard keys) when the node certificate has expired, or when the node was
	// revoked and an operator deleted it since.
	Token string
	// StateDir holds keys, certificates, identity and the last netmap. Required.
	StateDir string
	// Interface is the overlay link name (at most 15 bytes); defaults to the enrolled
	// one, else DefaultInterface.
	Interface string
	// Name is the node name to enroll with; empty lets the controller derive one from
	// the host name. On later starts it must equal the enrolled name.
	Name string
	// ListenPort is the WireGuard UDP port; defaults to the enrolled one, else
	// DefaultListenPort.
	ListenPort int
	// Endpoint is the underlay "host:port" advertised to peers; empty means the local
	// address the kernel uses to reach the controller, with ListenPort.
	Endpoint string
	// GossipPort overrides the memberlist port from the netmap, for binding and for
	// joining peers; 0 uses the netmap's.
	GossipPort int
	// Resync is the period of dataplane read-back (drift repair), status reports,
	// gossip re-joins and certificate expiry checks; defaults to DefaultResync.
	Resync time.Duration
	// FlowInterval is how often the agent reads the flows its policy dropped from
	// the kernel (a report follows a read that found new ones); defaults to
	// flowlog.Interval.
	FlowInterval time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// NewDataplane opens the dataplane for an interface name. Required.
	NewDataplane func(iface string) (dataplane.Dataplane, error)
	// STUNServer is the STUN server ("host:port") that tells the agent the NAT
	// mapping of its WireGuard port (a "stun" endpoint candidate); empty means
	// the host of the controller in use on DefaultSTUNPort, STUNOff disables it. Only
	// embedded wireguard-go can send STUN from its WireGuard socket.
	STUNServer string
	// RelayPorts, "first-last", makes this node offer to relay WireGuard
	// ciphertext for pairs of nodes on those UDP ports (the policy must also name
	// it a relay); empty offers nothing.
	RelayPorts string
	// Metrics, when set, receives the agent's collectors (see docs/metrics.md);
	// give each agent its own registry, and each Run a new one. Nil exports none.
	Metrics prometheus.Registerer
}

// agent is one Run.
type agent struct {
	opts Options
	log  *slog.Logger
	dir  *statefile.Dir
	// id is set up before the loops start and not changed after (the key
	// generation lives in keyGen, the controller URLs in ctl).
	id  statefile.Identity
	ctl *controllers // the controller URLs and the one in use
	// stored is the identity as last written to the state directory; idMu
	// serialises the writes after start (saveIdentity).
	idMu   sync.Mutex
	stored statefile.Identity
	dp     dataplane.Dataplane
	rec    *reconcile.Reconciler
	flows  *flowlog.Log // denied flows waiting for a report, and drop totals
	peers  *peerTable   // the WireGuard peers of the latest read-back
	gossip *gossip.Manager
	syncer *syncer
	path   *path.Selector   // the path to every peer
	relay  *relay.Forwarder // nil unless RelayPorts
	// relayFirst and relayLast are RelayPorts; zero for none.
	relayFirst, relayLast uint16
	stunAddr              netip.AddrPort // the STUN server; invalid for none
	gossipC               chan struct{}  // member changes and new netmaps, coalesced
	reportC               chan struct{}  // something in the report changed, coalesced
	movedC                chan struct{}  // the local endpoint changed, coalesced
	stunC                 chan struct{}  // ask the STUN server again, coalesced
	rotateC               chan struct{}  // a netmap may ask for a key rotation, coalesced
	renewC                chan struct{}  // check the certificate now, coalesced

	joins sync.WaitGroup // gossip joins in flight

	// netmapMu orders the netmap transitions (a netmap from the stream, a
	// revocation learned from a refused call) so that the last decision is also
	// the last netmap stored and set.
	netmapMu sync.Mutex

	// claims is the last gossip endpoint claim accepted from each peer, by peer
	// name; only gossipStep (one goroutine) uses it.
	claims map[string]acceptedClaim

	// enrolledNow is set when this run enrolled the node (a join token given for
	// that is no news to log).
	enrolledNow bool

	mu       sync.Mutex
	endpoint netip.AddrPort // last discovered; zero until known
	mapped   netip.AddrPort // the STUN mapping of the WireGuard port; zero until known
	alive    []string       // netmap peers gossip sees alive, sorted
	wgKey    dataplane.Key  // current WireGuard private key
	tlsKey   *ecdsa.PrivateKey
	cert     *tls.Certificate // current node certificate for tlsKey (Leaf set)
	keyGen   uint64           // completed key rotation generation
	revoked  bool             // the netmap in force says an operator revoked this node
	told     bool             // the operator was told about the revocation (markRevoked)
	expired  bool             // the node certificate expired (logged once)
	lastSet  []string         // URLs of the latest ControllerSet received, as sent
}

// Run runs the agent until ctx ends, then stops cleanly and returns nil. What stays
// after it returns depends on the dataplane kind: the nftables table always stays
// (so nothing is open); a kernel WireGuard interface stays with its peers, addresses
// and routes; a userspace (wireguard-go) interface goes away with the process. It
// returns an error when a controller URL is not https://HOST[:PORT], when the state
// directory is unusable, when enrollment is refused, or when the dataplane cannot be
// opened.
func Run(ctx context.Context, opts Options) error {
	a, err := setup(ctx, opts)
	if err != nil || a == nil {
		return err
	}
	a.run(ctx)
	kind, st := a.dp.Kind(), a.rec.Status()
	if err := a.dp.Close(); err != nil {
		a.log.Warn("closing dataplane", "err", err)
	}
	msg, attrs := stoppedMessage(a.id.Interface, kind, st)
	a.log.Info(msg, attrs...)
	return nil
}

// stoppedMessage says what the kernel holds after the agent stopped.
func stoppedMessage(iface string, kind dataplane.Kind, st reconcile.Status) (string, []any) {
	attrs := []any{"interface", iface, "table", TableName}
	if !st.Programmed {
		return "agent stopped before it programmed the dataplane; whatever an earlier run left stays", attrs
	}
	attrs = append(attrs, "revision", st.Revision, "hash", st.Hash)
	if kind == dataplane.KindKernel {
		return "agent stopped; the kernel WireGuard interface (peers, addresses, routes) and the nftables table stay in force", attrs
	}
	return "agent stopped; the userspace WireGuard interface went away with the process, so the overlay carries no traffic until the agent restarts; the nftables table stays, so nothing is open", attrs
}

func setup(ctx context.Context, opts Options) (*agent, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.NewDataplane == nil {
		return nil, errors.New("agent: Options.NewDataplane is required")
	}
	if opts.StateDir == "" {
		return nil, errors.New("agent: a state directory is required")
	}
	good, bad := checkControllerURLs("--controller", opts.Controllers)
	if len(bad) > 0 {
		return nil, errors.Join(bad...)
	}
	if len(good) > MaxControllers {
		return nil, fmt.Errorf("agent: %d controller URLs given; at most %d are kept: give one URL per controller replica", len(good), MaxControllers)
	}
	opts.Controllers = good
	if opts.Resync <= 0 {
		opts.Resync = DefaultResync
	}
	if opts.FlowInterval <= 0 {
		opts.FlowInterval = flowlog.Interval
	}
	if opts.ListenPort < 0 || opts.ListenPort > 65535 || opts.GossipPort < 0 || opts.GossipPort > 65535 {
		return nil, fmt.Errorf("agent: port out of range (listen %d, gossip %d)", opts.ListenPort, opts.GossipPort)
	}
	a := &agent{
		opts:    opts,
		log:     opts.Logger,
		gossipC: make(chan struct{}, 1),
		reportC: make(chan struct{}, 1),
		movedC:  make(chan struct{}, 1),
		stunC:   make(chan struct{}, 1),
		peers:   &peerTable{},
		rotateC: make(chan struct{}, 1),
		renewC:  make(chan struct{}, 1),
		claims:  map[string]acceptedClaim{},
	}
	var err error
	if a.relayFirst, a.relayLast, err = parseRelayPorts(opts.RelayPorts); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	if a.dir, err = statefile.Open(opts.StateDir, a.log); err != nil {
		return nil, err
	}
	if err := a.dir.RecoverRenewal(); err != nil {
		return nil, err
	}
	wgKey, err := a.dir.WireGuardKey()
	if err != nil {
		return nil, err
	}
	a.wgKey = dataplane.Key(wgKey)
	if a.id, err = a.identity(ctx, wgKey.PublicKey()); err != nil {
		return nil, err
	}
	if ctx.Err() != nil {
		return nil, nil
	}
	a.keyGen = a.id.KeyGeneration
	if a.tlsKey, err = a.dir.TLSKey(); err != nil {
		return nil, err
	}
	if len(a.id.Controllers) == 0 {
		return nil, fmt.Errorf("agent: %s names no controller URL; pass --controller URL", a.dir.Path()+"/"+statefile.IdentityFile)
	}
	known, badStored := checkControllerURLs("the controller URL in "+a.dir.Path(), a.id.Controllers)
	if len(badStored) > 0 {
		return nil, fmt.Errorf("%w (pass --controller to replace it)", errors.Join(badStored...))
	}
	a.id.Controllers = known
	a.ctl = newControllers(a.id.Controllers, a.id.Controller)
	a.setStored(a.id)
	if a.stunAddr, err = stunServer(opts.STUNServer, a.ctl.current()); err != nil {
		return nil, fmt.Errorf("agent: %w (pass --stun-server HOST:PORT, or off)", err)
	}
	if n := len(a.id.Interface); n == 0 || n > 15 {
		return nil, fmt.Errorf("agent: interface name %q must have 1 to 15 bytes", a.id.Interface)
	}
	if a.dp, err = opts.NewDataplane(a.id.Interface); err != nil {
		return nil, fmt.Errorf("opening dataplane for %s: %w", a.id.Interface, err)
	}
	addrs, _ := wire.ParsePrefixes(a.id.Addresses)
	routes, _ := wire.ParsePrefixes(a.id.OverlayPrefixes)
	a.rec = reconcile.New(a.dp, reconcile.Local{
		Interface:  a.id.Interface,
		PrivateKey: a.wgKey,
		ListenPort: a.id.ListenPort,
		MTU:        MTU,
		Addresses:  addrs,
		Routes:     routes,
	}, a.log.With("component", "reconcile"))
	a.flows = flowlog.New()
	m := newAgentMetrics(func() uint64 { return a.rec.Status().Revision }, a.rec.Netmap, a.peers, a.flows.Stats, time.Now)
	if err := m.register(opts.Metrics); err != nil {
		_ = a.dp.Close()
		return nil, fmt.Errorf("agent: registering metrics: %w", err)
	}
	if opts.Metrics != nil {
		if err := opts.Metrics.Register(newControllerCollector(a.ctl)); err != nil {
			_ = a.dp.Close()
			return nil, fmt.Errorf("agent: registering controller metrics: %w", err)
		}
	}
	a.rec.SetObserver(m)
	a.gossip = gossip.NewManager(a.log.With("component", "gossip"), func() { signal(a.gossipC) })
	po := path.Options{
		Device:       a.device,
		RequestPunch: a.requestPunch,
		RequestRelay: a.requestRelay,
		Logger:       a.log.With("component", "path"),
	}
	if st, ok := a.dp.(dataplane.STUN); ok {
		po.Probe = func(ctx context.Context, dst netip.AddrPort) error {
			_, err := st.Binding(ctx, dst)
			return err
		}
	}
	a.path = path.New(po)
	a.peers.paths = a.path.Paths
	if a.relayFirst != 0 {
		a.relay = relay.New(relay.Options{Logger: a.log.With("component", "relay")})
		if opts.Metrics != nil {
			if err := opts.Metrics.Register(newRelayCollector(a.relay.Stats)); err != nil {
				_ = a.relay.Close()
				_ = a.dp.Close()
				return nil, fmt.Errorf("agent: registering relay metrics: %w", err)
			}
		}
	}
	return a, nil
}

// run applies the stored netmap (or default deny), then starts the reconcile,
// gossip, report and controller loops, and waits for ctx.
func (a *agent) run(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var s *syncer
	// Shutdown order: end the loops, then leave gossip (memberlist sends its leave
	// over its own sockets), give a join in flight a moment to finish, and drop the
	// connections to the controller. Run closes the dataplane last.
	defer func() {
		cancel()
		wg.Wait()
		a.gossip.Stop()
		a.waitJoins(2 * time.Second)
		if s != nil {
			s.close()
		}
		if a.relay != nil {
			_ = a.relay.Close()
		}
	}()
	wg.Go(func() { a.rec.Run(ctx, a.opts.Resync) })

	// No window with open traffic: the last netmap (or default deny) is in force
	// before the controller is contacted.
	st, err := a.rec.Wait(ctx, a.rec.SetNetmap(a.storedNetmap()))
	if err != nil {
		return
	}
	if st.Err != nil {
		a.log.Error("initial apply failed; retrying every resync", "err", st.Err, "resync", a.opts.Resync)
	}
	signal(a.gossipC)
	if r, ok := a.dp.(dataplane.DeniedReader); ok {
		wg.Go(func() { a.flowLoop(ctx, r) })
	}

	if err := a.loadCertificate(); err != nil {
		a.log.Error("cannot talk to the controller", "err", err)
		<-ctx.Done()
		return
	}
	if !a.reenrollIfNeeded(ctx) {
		return
	}
	if s, err = newSyncer(a); err != nil {
		a.log.Error("cannot talk to the controller", "err", err)
		<-ctx.Done()
		return
	}
	a.syncer = s
	signal(a.rotateC) // a rotation a restart interrupted, or one the stored netmap asks for
	wg.Go(func() { a.gossipLoop(ctx) })
	wg.Go(func() { a.endpointLoop(ctx) })
	wg.Go(func() { a.stunLoop(ctx, a.stunAddr) })
	wg.Go(func() { a.pathLoop(ctx) })
	wg.Go(func() { a.syncer.reportLoop(ctx) })
	wg.Go(func() { a.renewLoop(ctx) })
	wg.Go(func() { a.rotateLoop(ctx) })
	a.syncer.connectLoop(ctx)
}

// storedNetmap returns the last netmap from the state directory, or nil (default
// deny) when there is none or it is unusable.
func (a *agent) storedNetmap() *netmap.Netmap {
	file := a.dir.Path() + "/" + statefile.NetmapFile
	pb, err := a.dir.Netmap()
	if errors.Is(err, statefile.ErrNoNetmap) {
		a.log.Info("no stored netmap; applying default deny until the controller sends one")
		return nil
	}
	if err == nil {
		var nm *netmap.Netmap
		if nm, err = netmap.Parse(pb); err == nil {
			switch {
			case nm.Self.Name != a.id.NodeName:
				err = fmt.Errorf("netmap is for node %q, this node is %q", nm.Self.Name, a.id.NodeName)
			case nm.Revoked && a.opts.Token != "":
				// reenrollIfNeeded tries the join token next; no need for the
				// operator's instructions yet.
				a.mu.Lock()
				a.revoked = true
				a.mu.Unlock()
				a.log.Info("this node was revoked; applying default deny and trying the join token to enroll again", "node", a.id.NodeName)
				return nm
			case nm.Revoked:
				a.markRevoked("the stored netmap says so")
				return nm
			default:
				a.log.Info("applying stored netmap before contacting the controller", "revision", nm.Revision, "hash", nm.Hash, "peers", len(nm.Peers))
				return nm
			}
		}
	}
	a.log.Error("stored netmap is unusable; applying default deny until the controller sends one", "file", file, "err", err)
	return nil
}

// signal does a non-blocking send on a coalescing channel of capacity 1.
func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// DownResult says what Down found and removed.
type DownResult struct {
	// Interface is the overlay interface name from the agent's identity.
	Interface string
	// InterfaceRemoved and TableRemoved say whether the interface and the nftables
	// table existed (and are now gone).
	InterfaceRemoved, TableRemoved bool
	// Unknown is true when the dataplane could not be read around Down, so Down
	// removed whatever existed without telling what that was.
	Unknown bool
}

// String is a one-line summary for the operator, e.g. "removed interface segmesh0
// and table inet segmesh".
func (r DownResult) String() string {
	iface := "interface " + r.Interface
	table := "table " + TableName
	switch {
	case r.Unknown:
		return fmt.Sprintf("removed %s and %s (whichever existed)", iface, table)
	case r.InterfaceRemoved && r.TableRemoved:
		return fmt.Sprintf("removed %s and %s", iface, table)
	case r.InterfaceRemoved:
		return fmt.Sprintf("removed %s (%s did not exist)", iface, table)
	case r.TableRemoved:
		return fmt.Sprintf("removed %s (%s did not exist)", table, iface)
	default:
		return fmt.Sprintf("nothing to remove: neither %s nor %s exists", iface, table)
	}
}

// Down removes the overlay interface and the nftables table of the agent whose
// state directory is stateDir; the interface name comes from its identity. It is
// not an error when they do not exist; the result says what existed. The state
// directory itself is kept. Errors: no state directory or identity, a dataplane
// that cannot be opened, or Down's own refusal or failure (wrapped).
//
// What existed is found by reading the dataplane before and after Down: the
// interface existed when the first read names it (dataplane.Dataplane.Read leaves
// Interface empty for a missing interface); the table existed when the first read
// found it (dataplane.Observed.Firewall) and the second did not.
func Down(ctx context.Context, stateDir string, newDP func(iface string) (dataplane.Dataplane, error)) (DownResult, error) {
	if st, err := os.Stat(stateDir); err != nil || !st.IsDir() {
		return DownResult{}, fmt.Errorf("taking down: no state directory %s", stateDir)
	}
	dir, err := statefile.Open(stateDir, slog.Default())
	if err != nil {
		return DownResult{}, err
	}
	id, err := dir.Identity()
	if err != nil {
		return DownResult{}, fmt.Errorf("taking down: %w", err)
	}
	res := DownResult{Interface: id.Interface}
	dp, err := newDP(id.Interface)
	if err != nil {
		return res, fmt.Errorf("opening dataplane for %s: %w", id.Interface, err)
	}
	defer dp.Close()
	before, errBefore := dp.Read(ctx)
	if err := dp.Down(ctx); err != nil {
		return res, fmt.Errorf("taking down %s: %w", id.Interface, err)
	}
	after, errAfter := dp.Read(ctx)
	if errBefore != nil || errAfter != nil {
		res.Unknown = true
		return res, nil
	}
	res.InterfaceRemoved = before.State.Interface != ""
	res.TableRemoved = before.Firewall && !after.Firewall
	return res, nil
}
