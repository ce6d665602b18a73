// Package controller is the segmesh controller: it enrolls agents with join
// tokens, allocates overlay addresses, stores nodes, tokens and policy revisions,
// compiles the policy into one netmap per node and pushes each connected agent its
// netmap over a mutually authenticated stream, only when that netmap changed. It
// also serves the operator API (status, nodes, tokens, policy).
//
// One TLS listener serves three connect services (see api/segmesh/v1):
// EnrollService (join token), AgentService (node client certificate) and
// OperatorService (bearer credential from DATA_DIR/operator.json).
//
// State lives in DATA_DIR: ca.crt/ca.key, server.crt/server.key, operator.json and
// controller.db (bbolt). Runtime status (online, applied revision) is kept in memory
// and rebuilt from agent reports after a restart.
package controller

import (
	"compress/gzip"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/netutil"
	"golang.org/x/sync/semaphore"

	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/controller/cluster"
	"segmesh/controller/fanout"
	"segmesh/controller/netmap"
	"segmesh/controller/pki"
	"segmesh/controller/store"
	"segmesh/controller/store/etcdstore"
)

// Defaults applied by New to zero Options fields.
const (
	DefaultListen     = "0.0.0.0:7443"
	DefaultTokenTTL   = 24 * time.Hour
	DefaultGossipPort = 7946
	// StoreFile is the bbolt file name inside the data directory.
	StoreFile = "controller.db"
	// OperatorFile is the operator credential file name inside the data directory.
	OperatorFile = "operator.json"
)

// DefaultOverlayPrefixes returns the default overlay prefixes: 100.64.0.0/10 and
// fd5e:6d65:7368::/48.
func DefaultOverlayPrefixes() []netip.Prefix {
	return []netip.Prefix{netip.MustParsePrefix("100.64.0.0/10"), netip.MustParsePrefix("fd5e:6d65:7368::/48")}
}

const metaGossipKey = "gossip-key"

// Defaults of the identity life cycle.
const (
	// DefaultNodeCertTTL is the lifetime of node client certificates; agents renew
	// them over their stream when a third of it is left.
	DefaultNodeCertTTL = 30 * 24 * time.Hour
	// DefaultAddressQuarantine is how long the overlay addresses of a deleted node
	// stay reserved, so that no other node inherits the trust peers placed in them.
	DefaultAddressQuarantine = 7 * 24 * time.Hour
	// DefaultMaxConnections caps the controller's open TCP connections.
	DefaultMaxConnections = 20000
	// DefaultMaxConnectionsPerSource caps open TCP connections per source
	// address (IPv6: per /64): a site behind one NAT address with this many
	// agents needs a higher value.
	DefaultMaxConnectionsPerSource = 1000
	// AdminOperator names the operator credential written to operator.json at
	// first start.
	AdminOperator = "admin"
)

// timeFormat is how the controller writes times into messages.
const timeFormat = time.RFC3339

// Options configures a Controller. Zero fields take the defaults above.
type Options struct {
	// DataDir holds all state; created with mode 0700 when missing. Required.
	DataDir string
	// Listen is the TCP address "host:port" to serve on; port 0 picks a free port.
	Listen string
	// AdvertiseURL is the URL written to operator.json; default
	// https://<listen host, or 127.0.0.1 when unspecified>:<bound port>.
	AdvertiseURL string
	// OverlayPrefixes are the prefixes node addresses are allocated from, one
	// address per prefix per node; at most one prefix per address family.
	OverlayPrefixes []netip.Prefix
	// SANs are extra host names or IP addresses for the server certificate.
	SANs []string
	// TokenTTL is the lifetime of join tokens created without an explicit TTL.
	TokenTTL time.Duration
	// GossipPort is the memberlist port agents are told to use.
	GossipPort int
	// NodeCertTTL is the lifetime of the node client certificates it issues.
	NodeCertTTL time.Duration
	// AddressQuarantine is how long a deleted node's overlay addresses stay
	// reserved before another node may get them.
	AddressQuarantine time.Duration
	// MaxConnections caps concurrent TCP connections (agents, operators and
	// enrolling hosts together); further clients wait in the kernel's backlog.
	MaxConnections int
	// MaxConnectionsPerSource caps concurrent TCP connections from one source
	// (an IPv4 address or an IPv6 /64); loopback is exempt. Further connections
	// from it are closed at once.
	MaxConnectionsPerSource int
	// STUNListen is the UDP address "host:port" of the STUN Binding responder
	// (RFC 8489; usually ":3478"); empty disables it.
	STUNListen string
	Logger     *slog.Logger
	// Metrics, when set, receives the controller's collectors (see
	// docs/metrics.md); give each controller its own registry. Nil exports none.
	Metrics prometheus.Registerer
	// Store is where state lives: StoreBolt (default; DataDir/controller.db, one
	// controller) or StoreEtcd (several replicas sharing the etcd cluster Etcd
	// names; see ha.go).
	Store string
	// Etcd configures the etcd store (Store = StoreEtcd). Its SecretKey, the
	// same on every replica, is required: it seals the shared secrets.
	Etcd etcdstore.Config
	// LeaseTTL is the lifetime of the replica's etcd lease (etcd store): cut off
	// from etcd's quorum for this long, a replica stops serving and its agents
	// move. Whole seconds, at least 2 s; default cluster.DefaultTTL (5 s).
	LeaseTTL time.Duration
}

// Controller is a configured controller bound to its listen address. Create it
// with New and serve with Run; Run releases the listener and the store when it
// returns.
type Controller struct {
	opts         Options
	log          *slog.Logger
	store        store.Store
	ca           *pki.Authority
	ln           net.Listener
	advertiseURL string
	netmapCfg    netmap.Config
	enrollLimits *refusalLimiter
	enrollSlots  *slotLimiter
	// candidateSlots bounds concurrent compilations of candidate policies
	// (GetNetmap with a candidate).
	candidateSlots chan struct{}
	// endpointChanges budgets endpoint changes per node.
	endpointChanges *actorLimiter
	// candidateChanges budgets candidate changes per node, as endpointChanges.
	candidateChanges *actorLimiter
	// punches budgets hole punching requests per pair of nodes (punch.go).
	punches *actorLimiter
	// punchNodes budgets hole punching requests per requesting node.
	punchNodes    *actorLimiter
	refusalAudits *actorLimiter
	// engine computes the netmaps; hub fans their changes out to the streams.
	// Both are replaced only at start-up (rebuildLocked).
	engine        *netmap.Engine
	hub           *fanout.Hub
	live          *liveTracker
	flows         *deniedFlows // see flows.go
	recomputeKick chan struct{}
	sendBudget    *semaphore.Weighted // see sendBudget in agent.go
	sendSlots     *slots
	dirtyMu       sync.Mutex
	dirty         map[string]struct{} // nodes whose records changed since the last computation
	nodeErrs      map[string]string   // under computeMu: nodes the engine refused, and why
	now           func() time.Time
	metrics       *metrics
	// stunConn is the STUN responder's socket (nil when Options.STUNListen is empty).
	stunConn net.PacketConn
	// relays holds the relay sessions (relay.go).
	relays *relayState
	// storeDesc describes the store for Status. With the etcd store, etcd is it,
	// cluster this replica's view of the others (nil with bbolt), haKick wakes
	// haLoop and presence publishes the live status of this replica's agents
	// (ha.go).
	storeDesc string
	etcd      *etcdstore.Store
	cluster   *cluster.Cluster
	haKick    chan struct{}
	presence  *presenceWriter

	// computeMu serialises netmap computation and policy changes, so netmaps
	// are published in the order their inputs changed.
	computeMu sync.Mutex
	// polMu guards pol, the policy in force (see policy.go).
	polMu sync.RWMutex
	pol   policyState

	shutdown chan struct{} // closed when Run starts shutting down
	runOnce  sync.Once
}

// New validates opts, creates or loads the PKI, the operator credential, the
// gossip key and the store in opts.DataDir, puts the newest valid policy revision
// in force (see loadPolicy), and binds the listen address. It returns an error naming the offending option or
// file.
func New(opts Options) (_ *Controller, err error) {
	if err := applyDefaults(&opts); err != nil {
		return nil, err
	}
	c := &Controller{
		opts:             opts,
		log:              opts.Logger,
		live:             newLiveTracker(),
		flows:            newDeniedFlows(),
		enrollLimits:     newRefusalLimiter(),
		enrollSlots:      newSlotLimiter(),
		candidateSlots:   make(chan struct{}, 2),
		endpointChanges:  newActorLimiterWith(endpointChangeRate, endpointChangeBurst),
		candidateChanges: newActorLimiterWith(endpointChangeRate, endpointChangeBurst),
		punches:          newActorLimiterWith(punchRate, punchBurst),
		punchNodes:       newActorLimiterWith(punchNodeRate, punchNodeBurst),
		refusalAudits:    newActorLimiter(),
		recomputeKick:    make(chan struct{}, 1),
		dirty:            map[string]struct{}{},
		nodeErrs:         map[string]string{},
		sendBudget:       semaphore.NewWeighted(sendBudget),
		sendSlots:        newSlots(2*runtime.GOMAXPROCS(0), slotLease),
		now:              time.Now,
		shutdown:         make(chan struct{}),
		haKick:           make(chan struct{}, 1),
	}
	c.presence = newPresenceWriter(c)
	c.relays = newRelayState(func() time.Time { return c.now() })
	c.metrics = newMetrics(c)
	var cleanup []func()
	defer func() {
		if err != nil {
			for i := len(cleanup) - 1; i >= 0; i-- {
				cleanup[i]()
			}
		}
	}()

	if err := os.MkdirAll(opts.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating data directory: %w", err)
	}
	if fi, err := os.Stat(opts.DataDir); err == nil && fi.Mode().Perm()&0o077 != 0 {
		c.log.Warn("data directory is accessible by other users; it holds the CA key", "dir", opts.DataDir, "mode", fi.Mode().Perm())
	}

	// The store comes first: it is the lock that keeps a second controller on the same
	// data directory from touching anything (certificates, operator.json). A store
	// that was lost (ca.crt exists), is damaged or belongs to another CA is refused.
	// With etcd, the data directory takes the fleet's CA before anything else.
	st, desc, err := c.openStore()
	if err != nil {
		return nil, err
	}
	c.store, c.storeDesc = st, desc
	cleanup = append(cleanup, func() { _ = st.Close() })
	if c.etcd != nil {
		if err := c.shareCA(); err != nil {
			return nil, err
		}
	}

	c.ln, err = net.Listen("tcp", opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", opts.Listen, err)
	}
	cleanup = append(cleanup, func() { _ = c.ln.Close() })
	if opts.STUNListen != "" {
		c.stunConn, err = net.ListenPacket("udp", opts.STUNListen)
		if err != nil {
			return nil, fmt.Errorf("STUN: listening on udp %s: %w", opts.STUNListen, err)
		}
		cleanup = append(cleanup, func() { _ = c.stunConn.Close() })
	}
	c.advertiseURL, err = advertiseURL(opts.AdvertiseURL, c.ln.Addr().(*net.TCPAddr))
	if err != nil {
		return nil, err
	}

	c.ca, err = pki.LoadOrCreate(opts.DataDir, serverSANs(opts, c.advertiseURL), c.log)
	if err != nil {
		return nil, fmt.Errorf("loading PKI: %w", err)
	}
	var shared string
	if bolt, ok := st.(*store.Bolt); ok {
		if err := bolt.Bind(c.ca.CACertDER()); err != nil {
			return nil, err
		}
	} else {
		if err := c.publishCA(); err != nil {
			return nil, err
		}
		if shared, err = c.sharedAdminToken(); err != nil {
			return nil, err
		}
	}
	adminToken, err := loadOrCreateOperator(filepath.Join(opts.DataDir, OperatorFile), c.advertiseURL, c.ca.CACertPEM(), shared)
	if err != nil {
		return nil, err
	}
	if err := c.bootstrapAdmin(adminToken); err != nil {
		return nil, err
	}
	if c.etcd != nil {
		if err := c.publishAdminToken(adminToken); err != nil {
			return nil, fmt.Errorf("storing the admin token in etcd: %w", err)
		}
	}

	var gossipKey []byte
	err = st.Update(func(tx store.Tx) error {
		k, err := tx.Meta(metaGossipKey)
		if err != nil {
			return err
		}
		if len(k) == 32 {
			gossipKey = k
			return nil
		}
		gossipKey = make([]byte, 32)
		if _, err := rand.Read(gossipKey); err != nil {
			return err
		}
		return tx.PutMeta(metaGossipKey, gossipKey)
	})
	if err != nil {
		return nil, fmt.Errorf("loading gossip key: %w", err)
	}
	c.netmapCfg = netmap.Config{GossipKey: gossipKey, GossipPort: uint32(opts.GossipPort), OverlayPrefixes: opts.OverlayPrefixes}

	if err := c.checkEnrolled(); err != nil {
		return nil, err
	}
	if err := c.loadPolicy(); err != nil {
		return nil, err
	}
	c.computeMu.Lock()
	err = c.rebuildLocked()
	c.computeMu.Unlock()
	if err != nil {
		return nil, err
	}
	if c.etcd != nil {
		if err := c.startCluster(); err != nil {
			return nil, err
		}
		cleanup = append(cleanup, c.cluster.Close)
	}
	// Last, so that a failed New leaves nothing registered.
	if err := c.metrics.register(opts.Metrics); err != nil {
		return nil, fmt.Errorf("registering metrics: %w", err)
	}
	serving, _ := c.policyInForce()
	c.log.Info("controller ready", "listen", c.ln.Addr().String(), "url", c.advertiseURL, "data_dir", opts.DataDir, "policy_revision", serving)
	return c, nil
}

// Check reports what New would reject in opts before touching the data
// directory: a missing data directory, bad overlay prefixes, lifetimes, ports or
// limits out of range. New may still fail on the data directory, store or address.
func (o Options) Check() error { return applyDefaults(&o) }

func applyDefaults(o *Options) error {
	if o.DataDir == "" {
		return errors.New("data directory is required (--data-dir)")
	}
	if o.Listen == "" {
		o.Listen = DefaultListen
	}
	if len(o.OverlayPrefixes) == 0 {
		o.OverlayPrefixes = DefaultOverlayPrefixes()
	}
	if err := checkOverlayPrefixes(o.OverlayPrefixes); err != nil {
		return fmt.Errorf("--overlay-prefix: %w", err)
	}
	if o.TokenTTL == 0 {
		o.TokenTTL = DefaultTokenTTL
	}
	if o.TokenTTL < 0 {
		return fmt.Errorf("token TTL %v is negative", o.TokenTTL)
	}
	if o.GossipPort == 0 {
		o.GossipPort = DefaultGossipPort
	}
	if o.GossipPort < 1 || o.GossipPort > 65535 {
		return fmt.Errorf("gossip port %d is out of range 1-65535", o.GossipPort)
	}
	if o.NodeCertTTL == 0 {
		o.NodeCertTTL = DefaultNodeCertTTL
	}
	if o.NodeCertTTL < time.Second || o.NodeCertTTL > pki.ClientValidity {
		return fmt.Errorf("node certificate lifetime %v: want between 1s and %v", o.NodeCertTTL, pki.ClientValidity)
	}
	if o.AddressQuarantine == 0 {
		o.AddressQuarantine = DefaultAddressQuarantine
	}
	if o.AddressQuarantine < 0 {
		return fmt.Errorf("address quarantine %v is negative", o.AddressQuarantine)
	}
	if o.MaxConnections == 0 {
		o.MaxConnections = DefaultMaxConnections
	}
	if o.MaxConnections < 1 {
		return fmt.Errorf("maximum connections %d: want at least 1", o.MaxConnections)
	}
	if o.MaxConnectionsPerSource == 0 {
		o.MaxConnectionsPerSource = DefaultMaxConnectionsPerSource
	}
	if o.MaxConnectionsPerSource < 1 {
		return fmt.Errorf("maximum connections per source %d: want at least 1", o.MaxConnectionsPerSource)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	switch o.Store {
	case "":
		o.Store = StoreBolt
	case StoreBolt:
	case StoreEtcd:
		if len(o.Etcd.Endpoints) == 0 {
			return errors.New("the etcd store needs its endpoints (--etcd-endpoints)")
		}
		if len(o.Etcd.SecretKey) != 32 {
			return errors.New("the etcd store needs the fleet's 32-byte secret key (--secret-key-file)")
		}
		if o.LeaseTTL == 0 {
			o.LeaseTTL = cluster.DefaultTTL
		}
		if o.LeaseTTL < 2*time.Second || o.LeaseTTL%time.Second != 0 {
			return fmt.Errorf("etcd lease TTL %v: want whole seconds, at least 2s", o.LeaseTTL)
		}
	default:
		return fmt.Errorf("store %q: want %s or %s", o.Store, StoreBolt, StoreEtcd)
	}
	return nil
}

// checkEnrolled refuses to start when an enrolled node holds an overlay address
// outside the configured prefixes (the controller was restarted with other
// --overlay-prefix values): those nodes would keep addresses no route covers.
func (c *Controller) checkEnrolled() error {
	addrs := map[string][]netip.Addr{}
	err := c.store.View(func(tx store.Tx) error {
		nodes, err := tx.Nodes()
		for _, n := range nodes {
			addrs[n.Name] = n.Addresses
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("reading the enrolled nodes: %w", err)
	}
	return checkEnrolledAddresses(c.opts.OverlayPrefixes, addrs)
}

// advertiseURL returns explicit when set (validated), else the URL derived from
// the bound address.
func advertiseURL(explicit string, bound *net.TCPAddr) (string, error) {
	if explicit != "" {
		u, err := url.Parse(explicit)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return "", fmt.Errorf("advertise URL %q: want https://HOST:PORT", explicit)
		}
		return explicit, nil
	}
	host := "127.0.0.1"
	if !bound.IP.IsUnspecified() {
		host = bound.IP.String()
	}
	return "https://" + net.JoinHostPort(host, fmt.Sprint(bound.Port)), nil
}

// serverSANs lists the names and addresses the server certificate must carry
// besides pki.ServerName: the listen IP when specific, the advertised host, and
// opts.SANs.
func serverSANs(opts Options, advertise string) []string {
	var sans []string
	if host, _, err := net.SplitHostPort(opts.Listen); err == nil {
		if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() {
			sans = append(sans, ip.String())
		}
	}
	if u, err := url.Parse(advertise); err == nil && u.Hostname() != "" {
		sans = append(sans, u.Hostname())
	}
	return append(sans, opts.SANs...)
}

// Addr returns the address the controller listens on.
func (c *Controller) Addr() net.Addr { return c.ln.Addr() }

// URL returns the controller URL written to operator.json.
func (c *Controller) URL() string { return c.advertiseURL }

// Run serves until ctx is done, then shuts down gracefully: agent streams end with
// CodeUnavailable, in-flight calls finish (for up to 10 s), and the listener and
// store are closed. It returns nil after a shutdown caused by ctx, or the server's
// error. Run may be called once.
func (c *Controller) Run(ctx context.Context) error {
	err := errors.New("controller: Run called twice")
	c.runOnce.Do(func() { err = c.run(ctx) })
	return err
}

func (c *Controller) run(ctx context.Context) error {
	defer func() {
		if err := c.store.Close(); err != nil {
			c.log.Error("closing store", "err", err)
		}
	}()
	loopCtx, stopLoop := context.WithCancel(context.Background())
	loopDone := make(chan struct{})
	sweepDone := make(chan struct{})
	go func() {
		defer close(loopDone)
		c.recomputeLoop(loopCtx)
	}()
	go func() {
		defer close(sweepDone)
		c.relaySweepLoop(loopCtx)
	}()
	haDone := make(chan struct{}, 2)
	if c.cluster != nil {
		go func() { c.haLoop(loopCtx); haDone <- struct{}{} }()
		go func() { c.presence.run(loopCtx); haDone <- struct{}{} }()
	}
	defer func() {
		stopLoop()
		<-loopDone
		<-sweepDone
		if c.cluster != nil {
			<-haDone
			<-haDone
			c.cluster.Close() // before the store closes its client
		}
	}()

	srv := c.httpServer()
	serveErr := make(chan error, 1)
	ln := newSourceLimitListener(netutil.LimitListener(c.ln, c.opts.MaxConnections), c.opts.MaxConnectionsPerSource)
	go func() { serveErr <- srv.ServeTLS(ln, "", "") }()
	if c.stunConn != nil {
		stunDone := make(chan struct{})
		go func() {
			defer close(stunDone)
			if err := newSTUNServer(c.stunConn, c.metrics.stun).serve(); err != nil {
				c.log.Error("STUN responder stopped", "err", err)
			}
		}()
		defer func() {
			_ = c.stunConn.Close()
			<-stunDone
		}()
	}

	select {
	case err := <-serveErr:
		close(c.shutdown)
		return fmt.Errorf("serving on %s: %w", c.ln.Addr(), err)
	case <-ctx.Done():
	}
	c.log.Info("shutting down")
	close(c.shutdown)
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		c.log.Warn("graceful shutdown timed out; closing connections", "err", err)
		_ = srv.Close()
	}
	<-serveErr // http.ErrServerClosed
	return nil
}

// compressMinBytes is the smallest agent stream message the controller
// compresses: deltas are small and go as they are; whole netmaps are compressed.
const compressMinBytes = 1024

// fastGzip is connect's gzip at the fastest level: whole netmaps are large and
// one goes to every agent that connects, so the level trades a little size for
// a third of the CPU of the default.
func fastGzip() connect.HandlerOption {
	return connect.WithCompression("gzip",
		func() connect.Decompressor { return &gzip.Reader{} },
		func() connect.Compressor {
			w, _ := gzip.NewWriterLevel(io.Discard, gzip.BestSpeed) // a valid level: no error
			return w
		})
}

func (c *Controller) httpServer() *http.Server {
	mux := http.NewServeMux()
	// No request compression for the unauthenticated service: 60 KB of gzip
	// inflate to 60 MiB.
	path, h := segmeshv1connect.NewEnrollServiceHandler(&enrollService{c: c}, connect.WithReadMaxBytes(enrollBodyLimit),
		connect.WithCompression("gzip", nil, nil), connect.WithInterceptors(storeUnavailable{}))
	mux.Handle(path, c.withEnrollLimits(h))
	path, h = segmeshv1connect.NewAgentServiceHandler(&agentService{c: c}, connect.WithReadMaxBytes(agentBodyLimit),
		fastGzip(), connect.WithCompressMinBytes(compressMinBytes), connect.WithInterceptors(storeUnavailable{}))
	mux.Handle(path, withClientIdentity(h))
	path, h = segmeshv1connect.NewOperatorServiceHandler(&operatorService{c: c}, connect.WithReadMaxBytes(policyBodyLimit),
		connect.WithInterceptors(storeUnavailable{}, c.auditRefusals()))
	mux.Handle(path, c.withOperatorAuth(h))
	ui := uiHandler()
	mux.Handle(UIPath, ui)
	mux.Handle("/{$}", ui)
	return &http.Server{
		Handler: c.withLease(mux),
		TLSConfig: &tls.Config{
			MinVersion:     tls.VersionTLS12,
			GetCertificate: c.ca.GetCertificate,
			ClientCAs:      c.ca.CAPool(),
			ClientAuth:     tls.VerifyClientCertIfGiven,
		},
		// Pings detect agents that vanished without closing their stream. The
		// receive buffers bound what a client can make the controller hold before
		// its call is authenticated: at most 256 KiB per stream, 1 MiB per
		// connection.
		HTTP2: &http.HTTP2Config{
			SendPingTimeout: 30 * time.Second, PingTimeout: 15 * time.Second,
			MaxReceiveBufferPerStream: 256 << 10, MaxReceiveBufferPerConnection: 1 << 20,
			// An agent needs three streams (netmaps, reports, renewal).
			MaxConcurrentStreams: 16,
		},
		ReadHeaderTimeout: 10 * time.Second,
		// A connection without a request in flight for this long is closed; an
		// agent's open stream keeps its connection busy.
		IdleTimeout: 2 * time.Minute,
		// A bearer token is 43 bytes; nothing the controller serves needs more.
		MaxHeaderBytes: 16 << 10,
		ErrorLog:       slog.NewLogLogger(c.log.Handler(), slog.LevelDebug),
	}
}
