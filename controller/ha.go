package controller

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
	"segmesh/controller/cluster"
	"segmesh/controller/netmap"
	"segmesh/controller/pki"
	"segmesh/controller/store"
	"segmesh/controller/store/etcdstore"
)

// Several controllers on one etcd cluster (Options.Store = StoreEtcd).
//
// Every replica keeps the whole state in etcd (etcdstore) and computes every
// netmap from it, like a single controller; what one replica changes reaches the
// others by an etcd watch (cluster.Config.OnStoreChange): a changed node record
// is recomputed, a new policy revision put in force, a new gossip key
// published. Nothing a replica signs or decrypts with is its own: the CA (key
// and certificate), the gossip key and the first admin token live in etcd as
// meta values sealed with the fleet's secret key (etcdstore.Config.SecretKey),
// and each replica's server certificate is issued by that CA for
// pki.ServerName, the name agents and the CLI verify, so it is valid for every
// replica. Runtime state that is a replica's own (which agents stream from it,
// what they last reported) is published as presence records under the
// replica's lease, so that Status on any replica shows every agent. Work one
// replica must do alone (rotating the gossip key when a node loses its peers)
// is done by the elected leader. A replica that loses its lease (cut off from
// etcd's quorum) refuses every call with Unavailable, saying why, and ends its
// agents' streams so that they move to another replica.

// Stores Options.Store names.
const (
	StoreBolt = "bbolt"
	StoreEtcd = "etcd"
)

// Meta keys of the secrets shared by the replicas (sealed by etcdstore).
const (
	metaCACert     = "ca-cert"
	metaCAKey      = "ca-key"
	metaAdminToken = "admin-token"
)

// featureControllers is the SyncRequest feature of agents that take a
// ControllerSet.
const featureControllers = "controllers"

// errNoLease ends the streams of a replica that lost its etcd lease.
var errNoLease = errors.New("this controller lost its etcd lease (it cannot reach a quorum of the etcd cluster); connect to another controller replica")

// openStore opens the store Options.Store names and returns it with its
// description for Status. It refuses an etcd prefix that a migrate left marked
// incomplete (etcdstore.MigratingKey).
func (c *Controller) openStore() (store.Store, string, error) {
	switch c.opts.Store {
	case StoreBolt:
		path := filepath.Join(c.opts.DataDir, StoreFile)
		st, err := store.OpenWith(path, store.OpenOptions{CACertPath: filepath.Join(c.opts.DataDir, pki.CACertFile)})
		if err != nil {
			return nil, "", err
		}
		return st, "bbolt " + path, nil
	case StoreEtcd:
		cfg := c.opts.Etcd
		if cfg.Logger == nil {
			cfg.Logger = c.log
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		st, err := etcdstore.Open(ctx, cfg)
		if err != nil {
			return nil, "", err
		}
		if migrating, err := st.Migrating(); err != nil || migrating {
			_ = st.Close()
			if err == nil {
				err = fmt.Errorf("%s: an interrupted migrate left %s incomplete (%smeta/%s exists); clear it with \"etcdctl del --prefix %s\" and run segmesh-controller migrate again (if a migrate is still running, wait for it to finish)",
					st, st.Prefix(), st.Prefix(), etcdstore.MigratingKey, st.Prefix())
			}
			return nil, "", err
		}
		c.etcd = st
		return st, st.String(), nil
	}
	return nil, "", fmt.Errorf("store %q: want %s or %s", c.opts.Store, StoreBolt, StoreEtcd)
}

// shareCA makes the data directory hold the fleet's CA (etcd store): the one in
// etcd when there is one (written to the data directory, which must not hold
// another), else the data directory's (a migrated controller's), else a new one
// that pki.LoadOrCreate creates and publishCA then stores.
func (c *Controller) shareCA() error {
	var certPEM, keyPEM []byte
	err := c.store.View(func(tx store.Tx) error {
		var err error
		if certPEM, err = tx.Meta(metaCACert); err != nil {
			return err
		}
		keyPEM, err = tx.Meta(metaCAKey)
		return err
	})
	if err != nil {
		return fmt.Errorf("reading the fleet CA from etcd: %w", err)
	}
	if certPEM == nil || keyPEM == nil {
		return nil
	}
	certPath, keyPath := filepath.Join(c.opts.DataDir, pki.CACertFile), filepath.Join(c.opts.DataDir, pki.CAKeyFile)
	if have, err := os.ReadFile(certPath); err == nil {
		if !bytes.Equal(have, certPEM) {
			return fmt.Errorf("%s is not the CA of the controllers on this etcd cluster (prefix %s): this data directory belongs to another fleet; give this replica an empty --data-dir", certPath, c.etcd.Prefix())
		}
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.WriteFile(keyPath, keyPEM, 0o600); err != nil {
		return fmt.Errorf("writing the fleet CA: %w", err)
	}
	if err := os.WriteFile(certPath, certPEM, 0o644); err != nil {
		return fmt.Errorf("writing the fleet CA: %w", err)
	}
	// A server certificate from another CA would be re-issued by pki only when
	// its names change: remove it so that this CA issues a new one.
	for _, f := range []string{pki.ServerCertFile, pki.ServerKeyFile} {
		if err := os.Remove(filepath.Join(c.opts.DataDir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	c.log.Info("took the fleet CA from etcd", "ca", certPath)
	return nil
}

// publishCA stores the data directory's CA in etcd unless the fleet has one; a
// replica that raced another first start and lost gets an error and starts again.
func (c *Controller) publishCA() error {
	certPEM, err := os.ReadFile(filepath.Join(c.opts.DataDir, pki.CACertFile))
	if err != nil {
		return err
	}
	keyPEM, err := os.ReadFile(filepath.Join(c.opts.DataDir, pki.CAKeyFile))
	if err != nil {
		return err
	}
	return c.store.Update(func(tx store.Tx) error {
		have, err := tx.Meta(metaCACert)
		if err != nil {
			return err
		}
		if have != nil {
			if bytes.Equal(have, certPEM) {
				return nil
			}
			return fmt.Errorf("another controller replica stored the fleet CA while this one created its own; remove %s and %s and start again", pki.CACertFile, pki.CAKeyFile)
		}
		if err := tx.PutMeta(metaCACert, certPEM); err != nil {
			return err
		}
		return tx.PutMeta(metaCAKey, keyPEM)
	})
}

// sharedAdminToken returns the admin token every replica writes to its
// operator.json (etcd store): the one in etcd, else the one in this data
// directory's operator.json when it is a credential of the store (a migrated
// controller), else "" (loadOrCreateOperator creates one, publishAdminToken
// stores it).
func (c *Controller) sharedAdminToken() (string, error) {
	var tok []byte
	err := c.store.View(func(tx store.Tx) error {
		var err error
		tok, err = tx.Meta(metaAdminToken)
		return err
	})
	if err != nil {
		return "", fmt.Errorf("reading the admin token from etcd: %w", err)
	}
	return string(tok), nil
}

// publishAdminToken stores token as the fleet's admin token unless one is
// stored, and when it names a credential of the store (or none exists yet).
func (c *Controller) publishAdminToken(token string) error {
	return c.store.Update(func(tx store.Tx) error {
		have, err := tx.Meta(metaAdminToken)
		if err != nil || have != nil {
			return err
		}
		if _, ok, err := tx.OperatorByTokenHash(tokenHash(token)); err != nil || !ok {
			return err
		}
		return tx.PutMeta(metaAdminToken, []byte(token))
	})
}

// replicaName is the name of this replica in the cluster: the advertised
// host:port.
func replicaName(advertise string) string {
	if u, err := url.Parse(advertise); err == nil && u.Host != "" {
		return u.Host
	}
	return advertise
}

// startCluster joins the replicas (etcd store only), after the netmaps are
// computed: changes made meanwhile are caught by a full resync.
func (c *Controller) startCluster() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl, err := cluster.Start(ctx, cluster.Config{
		Client: c.etcd.Client(), Prefix: c.etcd.Prefix(), Name: replicaName(c.advertiseURL), URL: c.advertiseURL, TTL: c.opts.LeaseTTL,
		OnStoreChange: c.storeChanged, OnSession: c.presence.republish, OnPush: c.pushFromReplica, Logger: c.log,
	})
	if err != nil {
		return err
	}
	c.cluster = cl
	c.metrics.addReplicas(c)
	c.storeChanged(nil)
	return nil
}

// storeChanged takes the keys another replica (or this one) changed in etcd:
// node records are recomputed, a policy revision or gossip key change is
// looked at by haLoop; nil means anything may have changed.
func (c *Controller) storeChanged(keys []string) {
	var nodes []string
	other := keys == nil
	for _, k := range keys {
		table, name, _ := strings.Cut(k, "/")
		switch {
		case table == "nodes":
			nodes = append(nodes, name)
		case table == "policies", k == "meta/"+metaGossipKey:
			other = true
		}
	}
	if keys == nil {
		nodes = c.allNodeNames()
	}
	if len(nodes) > 0 {
		c.nodesChanged(nodes...)
	}
	if other {
		select {
		case c.haKick <- struct{}{}:
		default:
		}
	}
}

// allNodeNames lists the nodes of the store and of the netmaps (a node deleted
// meanwhile is only in the latter).
func (c *Controller) allNodeNames() []string {
	names := map[string]bool{}
	_ = c.store.View(func(tx store.Tx) error {
		nodes, err := tx.Nodes()
		for _, n := range nodes {
			names[n.Name] = true
		}
		return err
	})
	c.computeMu.Lock()
	for _, n := range c.engine.Nodes() {
		names[n] = true
	}
	c.computeMu.Unlock()
	out := make([]string, 0, len(names))
	for n := range names {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// haLoop brings the policy in force and the gossip key up to date with etcd
// when storeChanged saw them change, ends the agent streams when the lease is
// lost and sends agents the replicas when they change; until ctx is done.
func (c *Controller) haLoop(ctx context.Context) {
	changed := c.cluster.Changed()
	last := c.controllerURLs()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.haKick:
			c.syncPolicy()
			c.syncGossipKey()
		case <-changed:
			changed = c.cluster.Changed()
			if err := c.cluster.Err(); err != nil {
				c.live.cancelAll(errNoLease)
			}
			if urls := c.controllerURLs(); !slices.Equal(urls, last) {
				last = urls
				c.log.Info("controller replicas changed", "replicas", urls)
				for _, node := range c.live.onlineWith(featureControllers) {
					c.push(node, featureControllers, controllerSet(urlsFor(node, urls)))
				}
			}
		}
	}
}

// syncPolicy puts in force the latest stored revision when another replica
// stored it (it validated it; this replica checks it again against the same
// inventory).
func (c *Controller) syncPolicy() {
	c.computeMu.Lock()
	defer c.computeMu.Unlock()
	serving, _ := c.policyInForce()
	var p store.Policy
	var ok bool
	var nodes []store.Node
	err := c.store.View(func(tx store.Tx) error {
		var err error
		if p, ok, err = tx.LatestPolicy(); err != nil || !ok {
			return err
		}
		nodes, err = tx.Nodes()
		return err
	})
	if err != nil {
		c.log.Error("reading the latest policy revision another replica stored; the next change retries", "err", err)
		return
	}
	if !ok || p.Revision <= serving {
		return
	}
	pol, _, _, err := checkPolicy(p.Filename, p.Content, netmap.Inventory(nodes), c.opts.OverlayPrefixes)
	if err != nil {
		c.polMu.Lock()
		c.pol.latest = p.Revision
		c.pol.loadErr = fmt.Sprintf("policy revision %d stored by another replica is invalid here (are the replicas' --overlay-prefix the same?):\n%v", p.Revision, err)
		c.polMu.Unlock()
		c.log.Error("policy revision stored by another replica is invalid here; not serving it", "revision", p.Revision, "err", err)
		return
	}
	changed, err := c.setPolicyLocked(p.Revision, pol)
	if err != nil {
		c.log.Error("computing the netmaps of a policy revision another replica stored", "revision", p.Revision, "err", err)
		return
	}
	c.polMu.Lock()
	c.pol = policyState{serving: p.Revision, parsed: pol, latest: p.Revision}
	c.polMu.Unlock()
	c.metrics.policyApplied(p.Revision, p.AppliedAt)
	c.log.Info("policy revision from another replica in force", "revision", p.Revision, "netmaps_changed", changed)
}

// syncGossipKey publishes the stored gossip key when another replica rotated it.
func (c *Controller) syncGossipKey() {
	var key []byte
	if err := c.store.View(func(tx store.Tx) error {
		var err error
		key, err = tx.Meta(metaGossipKey)
		return err
	}); err != nil {
		c.log.Error("reading the gossip key another replica stored; the next change retries", "err", err)
		return
	}
	c.computeMu.Lock()
	defer c.computeMu.Unlock()
	if len(key) == 32 && !bytes.Equal(key, c.netmapCfg.GossipKey) {
		c.setGossipKeyLocked(key)
	}
}

// pushToReplicas sends u (an out-of-band update for feature) to the replica
// node's agent streams from, when it does not stream from this one.
func (c *Controller) pushToReplicas(node, feature string, u *segmeshv1.NetmapUpdate) {
	if c.cluster == nil {
		return
	}
	b, err := proto.Marshal(u)
	if err != nil {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := c.cluster.Push(ctx, node, append([]byte(feature+"\n"), b...)); err != nil {
			c.log.Debug("sending an out-of-band update through etcd", "node", node, "feature", feature, "err", err)
		}
	}()
}

// pushFromReplica queues an out-of-band update another replica sent for node
// on node's streams here (cluster.Config.OnPush).
func (c *Controller) pushFromReplica(node string, payload []byte) {
	feature, b, ok := bytes.Cut(payload, []byte("\n"))
	if !ok {
		return
	}
	u := &segmeshv1.NetmapUpdate{}
	if err := proto.Unmarshal(b, u); err != nil {
		c.log.Warn("an out-of-band update from another replica does not decode", "node", node, "err", err)
		return
	}
	c.pushLocal(node, string(feature), u)
}

// leaderOnly reports whether this replica may do work one replica does alone:
// always with the bbolt store, only the elected leader with etcd.
func (c *Controller) leaderOnly() bool { return c.cluster == nil || c.cluster.Leader() }

// controllerURLs lists the URLs of the live replicas, this one first; only this
// one's with the bbolt store.
func (c *Controller) controllerURLs() []string {
	urls := []string{c.advertiseURL}
	if c.cluster == nil {
		return urls
	}
	for _, r := range c.cluster.Replicas() {
		if r.URL != c.advertiseURL {
			urls = append(urls, r.URL)
		}
	}
	return urls
}

// urlsFor returns urls (this replica first) for node: the others rotated by a
// hash of the node's name, so that the agents of a replica that fails spread
// over the others instead of all moving to the same one.
func urlsFor(node string, urls []string) []string {
	if len(urls) < 3 {
		return urls
	}
	h := fnv.New32a()
	_, _ = h.Write([]byte(node))
	rest := urls[1:]
	k := int(h.Sum32() % uint32(len(rest)))
	return append(append([]string{urls[0]}, rest[k:]...), rest[:k]...)
}

func controllerSet(urls []string) *segmeshv1.NetmapUpdate {
	return &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Controllers{Controllers: &segmeshv1.ControllerSet{Urls: urls}}}
}

// withLease refuses every call with Unavailable, saying why, while this replica
// holds no etcd lease (etcd store only): its view of the store may be stale and
// its writes would not commit.
func (c *Controller) withLease(h http.Handler) http.Handler {
	ew := connect.NewErrorWriter()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c.cluster != nil {
			if err := c.cluster.Err(); err != nil && ew.IsSupported(r) {
				_ = ew.Write(w, r, connect.NewError(connect.CodeUnavailable, fmt.Errorf("%v; retry on another controller replica", err)))
				return
			}
		}
		h.ServeHTTP(w, r)
	})
}

// storeUnavailable turns the errors of calls that failed because etcd did not
// answer (etcdstore.ErrUnavailable, usually reported as Internal) into
// Unavailable saying so, so that agents and the CLI try another replica.
type storeUnavailable struct{}

func unavailableError(err error) error {
	if err == nil || !errors.Is(err, etcdstore.ErrUnavailable) {
		return err
	}
	return connect.NewError(connect.CodeUnavailable, fmt.Errorf("this controller could not reach a quorum of its etcd cluster (%v); retry on another controller replica", err))
}

func (storeUnavailable) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		resp, err := next(ctx, req)
		return resp, unavailableError(err)
	}
}

func (storeUnavailable) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (storeUnavailable) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		return unavailableError(next(ctx, conn))
	}
}

// presenceWriter publishes, under the replica's lease, the runtime status of the
// nodes streaming from this replica (cluster presence records), so that the
// other replicas' Status shows them online. Writes are coalesced per node and
// made by one goroutine; a record that differs from the last written one only
// in its times is written again after presenceRefresh.
type presenceWriter struct {
	c       *Controller
	mu      sync.Mutex
	pending map[string]bool
	written map[string]presenceRecord
	kick    chan struct{}
}

type presenceRecord struct {
	body []byte // the record without its times
	at   time.Time
}

// presenceRefresh is how often an unchanged presence record is written again
// (its last-seen and last-report times).
const presenceRefresh = 30 * time.Second

func newPresenceWriter(c *Controller) *presenceWriter {
	return &presenceWriter{c: c, pending: map[string]bool{}, written: map[string]presenceRecord{}, kick: make(chan struct{}, 1)}
}

// changed queues node's presence to be written (or removed) soon; a no-op with
// the bbolt store.
func (p *presenceWriter) changed(node string) {
	if p == nil || p.c.etcd == nil {
		return
	}
	p.mu.Lock()
	p.pending[node] = true
	p.mu.Unlock()
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// republish queues every node's presence again (a new lease: the old records
// are gone).
func (p *presenceWriter) republish() {
	p.mu.Lock()
	clear(p.written)
	p.mu.Unlock()
	for _, n := range p.c.live.onlineWith("") {
		p.changed(n)
	}
}

func (p *presenceWriter) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.kick:
		}
		p.mu.Lock()
		nodes := make([]string, 0, len(p.pending))
		for n := range p.pending {
			nodes = append(nodes, n)
		}
		clear(p.pending)
		p.mu.Unlock()
		for _, n := range nodes {
			p.write(ctx, n)
		}
	}
}

func (p *presenceWriter) write(ctx context.Context, node string) {
	cl := p.c.cluster
	if cl == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st := &segmeshv1.NodeStatus{Name: node}
	p.c.live.fill(st, false)
	if !st.Online {
		p.mu.Lock()
		delete(p.written, node)
		p.mu.Unlock()
		if err := cl.DeletePresence(ctx, node); err != nil {
			p.c.log.Debug("removing a presence record", "node", node, "err", err)
		}
		return
	}
	times := proto.CloneOf(st)
	times.LastSeenUnix, times.LastReportUnix = 0, 0
	body, _ := proto.Marshal(times)
	now := time.Now()
	p.mu.Lock()
	last, ok := p.written[node]
	p.mu.Unlock()
	if ok && bytes.Equal(last.body, body) && now.Sub(last.at) < presenceRefresh {
		return
	}
	full, _ := proto.Marshal(st)
	if err := cl.PutPresence(ctx, node, full); err != nil {
		p.c.log.Debug("publishing a presence record; the next change retries", "node", node, "err", err)
		return
	}
	p.mu.Lock()
	p.written[node] = presenceRecord{body: body, at: now}
	p.mu.Unlock()
}

// fillRemote copies into st the runtime status another replica published for
// st.Name when no stream of it is open here.
func (c *Controller) fillRemote(st *segmeshv1.NodeStatus) {
	if c.cluster == nil || st.Online {
		return
	}
	pr, ok := c.cluster.Presence(st.Name)
	if !ok {
		return
	}
	var r segmeshv1.NodeStatus
	if err := proto.Unmarshal(pr.Value, &r); err != nil || !r.Online {
		return
	}
	st.Online = true
	st.AppliedRevision, st.AppliedHash = r.AppliedRevision, r.AppliedHash
	st.Dataplane, st.Error, st.AlivePeers, st.InSync = r.Dataplane, r.Error, r.AlivePeers, r.InSync
	st.Drift, st.LastSeenUnix, st.Version, st.Interface = r.Drift, r.LastSeenUnix, r.Version, r.Interface
	st.LastApplyUnixMs, st.LastApplyDurationUs, st.LastReportUnix = r.LastApplyUnixMs, r.LastApplyDurationUs, r.LastReportUnix
	st.Controller = pr.Replica
}
