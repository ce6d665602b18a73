// Package cluster is what one controller replica needs to know about the
// others when several share an etcd cluster: which replicas are alive and where
// agents reach them, which one is the leader for work one replica must do alone,
// whether this replica still holds its lease (it can reach a quorum), the
// runtime presence each replica publishes for the agents streaming from it, and
// every change the others make to the shared store.
//
// Each replica holds one etcd lease (a concurrency.Session, TTL Config.TTL)
// and, under it, these keys (PREFIX is the store's prefix):
//
//	PREFIX controllers/NAME   the replica's URL
//	PREFIX live/NODE          presence of a node streaming from the replica: "NAME\n" + value
//	PREFIX leader/...         etcd election (concurrency.Election) among the replicas
//	PREFIX push/NODE          a message for the replica serving NODE: "NAME\n" + payload, put and deleted at once
//
// When the lease ends (the replica lost etcd's quorum for TTL, or etcd expired
// it), its keys vanish for everybody else; the replica reports the loss (Err,
// Changed) and keeps trying to open a new lease, then registers again and asks
// its owner to publish its presence again (Config.OnSession).
package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// DefaultTTL is the lease lifetime: a replica cut off from etcd's quorum stops
// serving after about this long, and its presence vanishes for the others.
const DefaultTTL = 5 * time.Second

// Config configures Start.
type Config struct {
	Client *clientv3.Client
	// Prefix is the store's key prefix, ending in "/".
	Prefix string
	// Name identifies the replica (unique in the fleet), URL is where agents and
	// operators reach it ("https://HOST:PORT").
	Name, URL string
	// TTL is the lease lifetime, whole seconds; default DefaultTTL.
	TTL time.Duration
	// OnStoreChange is called, from one goroutine in etcd order, with the keys
	// (relative to Prefix, e.g. "nodes/web-1") that any replica changed outside
	// controllers/, live/ and leader/; with nil when changes may have been missed
	// (the watch restarted after a compaction or an error), meaning "anything may
	// have changed".
	OnStoreChange func(keys []string)
	// OnSession is called, from its own goroutine, after each new lease is in
	// place (also the first): the owner publishes its presence records again.
	OnSession func()
	// OnPush is called, from the watch goroutine, with a message another
	// replica sent for node (Push).
	OnPush func(node string, payload []byte)
	Logger *slog.Logger
}

// Replica is one live controller replica.
type Replica struct {
	Name, URL string
}

// Presence is what a replica published about one node: the replica's name and
// its opaque value.
type Presence struct {
	Replica string
	Value   []byte
}

// Cluster is this replica's view of the others. Safe for concurrent use.
type Cluster struct {
	cfg    Config
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	session  *concurrency.Session // nil while no lease is held
	err      error                // why no lease is held
	leader   bool
	replicas map[string]string   // name -> URL
	presence map[string]Presence // node -> presence
	changed  chan struct{}       // closed and replaced on every change of replicas, health or leadership
}

// Start opens the first lease (waiting up to ctx for it), registers the replica
// and starts watching. Close stops it and releases the lease.
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.OnStoreChange == nil {
		cfg.OnStoreChange = func([]string) {}
	}
	if cfg.OnSession == nil {
		cfg.OnSession = func() {}
	}
	if cfg.OnPush == nil {
		cfg.OnPush = func(string, []byte) {}
	}
	if cfg.Name == "" || strings.ContainsAny(cfg.Name, "/\n") {
		return nil, fmt.Errorf("cluster: replica name %q: want a non-empty name without '/' or newlines", cfg.Name)
	}
	c := &Cluster{cfg: cfg, log: cfg.Logger, replicas: map[string]string{}, presence: map[string]Presence{}, changed: make(chan struct{})}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	s, err := c.openSession(ctx)
	if err != nil {
		c.cancel()
		return nil, err
	}
	c.mu.Lock()
	c.session = s
	c.mu.Unlock()
	rev, err := c.load(ctx)
	if err != nil {
		_ = s.Close()
		c.cancel()
		return nil, err
	}
	c.wg.Add(2)
	go c.keepSession(s)
	go c.watch(rev)
	return c, nil
}

// Close resigns, revokes the lease (the replica's keys vanish at once) and stops.
func (c *Cluster) Close() {
	c.cancel()
	c.wg.Wait()
	c.mu.Lock()
	s := c.session
	c.session = nil
	c.mu.Unlock()
	if s != nil {
		_ = s.Close()
	}
}

// Err returns nil while the replica holds its lease, else why it does not (it
// cannot reach a quorum of etcd): the replica must not serve meanwhile.
func (c *Cluster) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Leader reports whether this replica is the elected leader now.
func (c *Cluster) Leader() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.leader && c.err == nil
}

// Replicas returns the live replicas sorted by name (this one included while it
// holds its lease).
func (c *Cluster) Replicas() []Replica {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Replica, 0, len(c.replicas))
	for _, name := range slices.Sorted(maps.Keys(c.replicas)) {
		out = append(out, Replica{Name: name, URL: c.replicas[name]})
	}
	return out
}

// Changed returns a channel closed at the next change of the replicas, of this
// replica's lease or of its leadership.
func (c *Cluster) Changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

// notifyLocked wakes the waiters of Changed; the caller holds mu.
func (c *Cluster) notifyLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// Presence returns what another replica published for node (never this
// replica's own records).
func (c *Cluster) Presence(node string) (Presence, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.presence[node]
	if !ok || p.Replica == c.cfg.Name {
		return Presence{}, false
	}
	return p, true
}

// PutPresence publishes value for node under this replica's lease. It fails
// while no lease is held.
func (c *Cluster) PutPresence(ctx context.Context, node string, value []byte) error {
	c.mu.Lock()
	s := c.session
	c.mu.Unlock()
	if s == nil {
		return errors.New("cluster: no lease")
	}
	_, err := c.cfg.Client.Put(ctx, c.cfg.Prefix+"live/"+node, c.cfg.Name+"\n"+string(value), clientv3.WithLease(s.Lease()))
	return err
}

// DeletePresence removes this replica's record for node, if it is still this
// replica's (another replica may have published one since).
func (c *Cluster) DeletePresence(ctx context.Context, node string) error {
	key := c.cfg.Prefix + "live/" + node
	c.mu.Lock()
	s := c.session
	c.mu.Unlock()
	if s == nil {
		return nil // the lease is gone, and the record with it
	}
	_, err := c.cfg.Client.Txn(ctx).
		If(clientv3.Compare(clientv3.LeaseValue(key), "=", s.Lease())).
		Then(clientv3.OpDelete(key)).Commit()
	return err
}

// Push sends payload to the other replicas' OnPush for node (the replica its
// agent streams from delivers it): one etcd put and one delete. The message is
// not kept: a replica that is not watching at that moment never gets it.
func (c *Cluster) Push(ctx context.Context, node string, payload []byte) error {
	c.mu.Lock()
	s := c.session
	c.mu.Unlock()
	if s == nil {
		return errors.New("cluster: no lease")
	}
	key := c.cfg.Prefix + "push/" + node
	if _, err := c.cfg.Client.Put(ctx, key, c.cfg.Name+"\n"+string(payload), clientv3.WithLease(s.Lease())); err != nil {
		return err
	}
	_, err := c.cfg.Client.Delete(ctx, key)
	return err
}

func (c *Cluster) openSession(ctx context.Context) (*concurrency.Session, error) {
	ttl := max(1, int(c.cfg.TTL/time.Second))
	s, err := concurrency.NewSession(c.cfg.Client, concurrency.WithTTL(ttl), concurrency.WithContext(c.ctx))
	if err != nil {
		return nil, fmt.Errorf("cluster: opening an etcd lease: %w", err)
	}
	if _, err := c.cfg.Client.Put(ctx, c.cfg.Prefix+"controllers/"+c.cfg.Name, c.cfg.URL, clientv3.WithLease(s.Lease())); err != nil {
		_ = s.Close()
		return nil, fmt.Errorf("cluster: registering replica %s: %w", c.cfg.Name, err)
	}
	return s, nil
}

// keepSession campaigns for leadership under s until s ends, then opens new
// sessions until Close.
func (c *Cluster) keepSession(s *concurrency.Session) {
	defer c.wg.Done()
	for {
		c.cfg.OnSession()
		c.campaign(s)
		select {
		case <-c.ctx.Done():
			return
		case <-s.Done():
		}
		c.mu.Lock()
		c.session, c.leader = nil, false
		c.err = errors.New("this controller lost its etcd lease: it cannot reach a quorum of the etcd cluster")
		c.notifyLocked()
		c.mu.Unlock()
		c.log.Error("lost the etcd lease; not serving until a new one is held", "replica", c.cfg.Name)
		for {
			var err error
			ctx, cancel := context.WithTimeout(c.ctx, c.cfg.TTL)
			s, err = c.openSession(ctx)
			cancel()
			if err == nil {
				break
			}
			c.mu.Lock()
			c.err = fmt.Errorf("this controller has no etcd lease: it cannot reach a quorum of the etcd cluster: %w", err)
			c.mu.Unlock()
			select {
			case <-c.ctx.Done():
				return
			case <-time.After(time.Second):
			}
		}
		c.mu.Lock()
		c.session, c.err = s, nil
		c.replicas[c.cfg.Name] = c.cfg.URL
		c.notifyLocked()
		c.mu.Unlock()
		c.log.Info("holding an etcd lease again; serving", "replica", c.cfg.Name)
	}
}

// campaign runs an election campaign under s in the background: leadership
// lasts while s does.
func (c *Cluster) campaign(s *concurrency.Session) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		e := concurrency.NewElection(s, c.cfg.Prefix+"leader/")
		ctx, cancel := context.WithCancel(c.ctx)
		defer cancel()
		go func() {
			select {
			case <-s.Done():
			case <-ctx.Done():
			}
			cancel()
		}()
		if err := e.Campaign(ctx, c.cfg.Name); err != nil {
			return
		}
		c.mu.Lock()
		c.leader = true
		c.notifyLocked()
		c.mu.Unlock()
		c.log.Info("elected leader of the controller replicas", "replica", c.cfg.Name)
		<-ctx.Done()
		c.mu.Lock()
		c.leader = false
		c.notifyLocked()
		c.mu.Unlock()
	}()
}

// load reads the replicas and presence records and returns the etcd revision
// to watch from.
func (c *Cluster) load(ctx context.Context) (int64, error) {
	reps, err := c.cfg.Client.Get(ctx, c.cfg.Prefix+"controllers/", clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("cluster: reading the replicas: %w", err)
	}
	live, err := c.cfg.Client.Get(ctx, c.cfg.Prefix+"live/", clientv3.WithPrefix(), clientv3.WithRev(reps.Header.Revision))
	if err != nil {
		return 0, fmt.Errorf("cluster: reading presence: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.replicas)
	clear(c.presence)
	for _, kv := range reps.Kvs {
		c.replicas[strings.TrimPrefix(string(kv.Key), c.cfg.Prefix+"controllers/")] = string(kv.Value)
	}
	for _, kv := range live.Kvs {
		c.setPresenceLocked(strings.TrimPrefix(string(kv.Key), c.cfg.Prefix+"live/"), kv.Value)
	}
	c.notifyLocked()
	return reps.Header.Revision, nil
}

func (c *Cluster) setPresenceLocked(node string, v []byte) {
	replica, value, ok := strings.Cut(string(v), "\n")
	if !ok {
		return
	}
	c.presence[node] = Presence{Replica: replica, Value: []byte(value)}
}

// watch follows every key under the prefix from rev+1 until Close; when the
// watch fails (compaction, error) it reloads and tells OnStoreChange that
// anything may have changed.
func (c *Cluster) watch(rev int64) {
	defer c.wg.Done()
	for c.ctx.Err() == nil {
		err := c.watchFrom(rev)
		if c.ctx.Err() != nil {
			return
		}
		c.log.Warn("etcd watch ended; reloading", "err", err)
		for {
			ctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
			var lerr error
			rev, lerr = c.load(ctx)
			cancel()
			if lerr == nil {
				break
			}
			select {
			case <-c.ctx.Done():
				return
			case <-time.After(time.Second):
			}
		}
		c.cfg.OnStoreChange(nil)
	}
}

type push struct {
	node    string
	payload []byte
}

func (c *Cluster) watchFrom(rev int64) error {
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(c.ctx))
	defer cancel()
	ch := c.cfg.Client.Watch(ctx, c.cfg.Prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	for resp := range ch {
		if err := resp.Err(); err != nil {
			return err
		}
		var keys []string
		var pushes []push
		c.mu.Lock()
		changed := false
		for _, ev := range resp.Events {
			key := strings.TrimPrefix(string(ev.Kv.Key), c.cfg.Prefix)
			del := ev.Type == clientv3.EventTypeDelete
			switch {
			case strings.HasPrefix(key, "controllers/"):
				name := strings.TrimPrefix(key, "controllers/")
				if del {
					delete(c.replicas, name)
				} else {
					c.replicas[name] = string(ev.Kv.Value)
				}
				changed = true
			case strings.HasPrefix(key, "live/"):
				node := strings.TrimPrefix(key, "live/")
				if del {
					delete(c.presence, node)
				} else {
					c.setPresenceLocked(node, ev.Kv.Value)
				}
			case strings.HasPrefix(key, "push/"):
				if !del {
					if from, payload, ok := strings.Cut(string(ev.Kv.Value), "\n"); ok && from != c.cfg.Name {
						pushes = append(pushes, push{strings.TrimPrefix(key, "push/"), []byte(payload)})
					}
				}
			case strings.HasPrefix(key, "leader/"):
			default:
				keys = append(keys, key)
			}
		}
		if changed {
			c.notifyLocked()
		}
		c.mu.Unlock()
		if len(keys) > 0 {
			c.cfg.OnStoreChange(keys)
		}
		for _, p := range pushes {
			c.cfg.OnPush(p.node, p.payload)
		}
	}
	if c.ctx.Err() != nil {
		return c.ctx.Err()
	}
	return errors.New("watch channel closed")
}
