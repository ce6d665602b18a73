package controller

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/controller/store"
)

type clientNameKey struct{}

// withClientIdentity puts the common name of a verified TLS client certificate
// into the request context for the AgentService handlers.
func withClientIdentity(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && len(r.TLS.VerifiedChains[0]) > 0 {
			cn := r.TLS.VerifiedChains[0][0].Subject.CommonName
			r = r.WithContext(context.WithValue(r.Context(), clientNameKey{}, cn))
		}
		h.ServeHTTP(w, r)
	})
}

type agentService struct {
	segmeshv1connect.UnimplementedAgentServiceHandler
	c *Controller
}

// authenticate returns the enrolled node that holds the verified client
// certificate of the call, or an Unauthenticated error.
func (s *agentService) authenticate(ctx context.Context) (store.Node, error) {
	name, _ := ctx.Value(clientNameKey{}).(string)
	if name == "" {
		return store.Node{}, connect.NewError(connect.CodeUnauthenticated, errors.New("agent calls need the node's client certificate (mutual TLS)"))
	}
	var n store.Node
	var ok bool
	err := s.c.store.View(func(tx store.Tx) error {
		var err error
		n, ok, err = tx.Node(name)
		return err
	})
	if err != nil {
		return n, connect.NewError(connect.CodeInternal, fmt.Errorf("looking up node %s: %w", name, err))
	}
	if !ok {
		return n, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("node %q is not enrolled", name))
	}
	return n, nil
}

// Sync implements AgentService.Sync: it records the agent's endpoint (a change
// is persisted and recomputes netmaps), marks the node online, sends the node's
// current netmap at once and then every netmap whose hash differs from the last
// one sent, until the agent goes away or the controller shuts down.
func (s *agentService) Sync(ctx context.Context, req *connect.Request[segmeshv1.SyncRequest], stream *connect.ServerStream[segmeshv1.Netmap]) error {
	c := s.c
	node, err := s.authenticate(ctx)
	if err != nil {
		return err
	}
	ep := req.Msg.GetEndpoint()
	if ep != "" {
		if err := validateEndpoint(ep); err != nil {
			return connect.NewError(connect.CodeInvalidArgument, err)
		}
		if ep != node.Endpoint {
			if err := c.setEndpoint(node.Name, ep); err != nil {
				return connect.NewError(connect.CodeInternal, err)
			}
		}
	}
	conn := c.live.connect(node.Name, req.Msg, c.now())
	defer c.live.disconnect(node.Name, conn, c.now())
	c.log.Info("agent connected", "node", node.Name, "peer", req.Peer().Addr, "endpoint", ep, "dataplane", req.Msg.GetDataplane(), "version", req.Msg.GetVersion())
	defer c.log.Info("agent disconnected", "node", node.Name, "peer", req.Peer().Addr)

	sub := c.hub.Subscribe(node.Name)
	defer sub.Close()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-c.shutdown:
			return connect.NewError(connect.CodeUnavailable, errors.New("controller is shutting down"))
		case <-sub.Wake():
		}
		if nm, ok := sub.Next(); ok {
			if err := stream.Send(nm); err != nil {
				return fmt.Errorf("sending netmap to %s: %w", node.Name, err)
			}
			c.log.Debug("netmap sent", "node", node.Name, "revision", nm.GetPolicyRevision(), "hash", nm.GetHash())
		}
	}
}

// setEndpoint persists a node's new endpoint and schedules a recompute.
func (c *Controller) setEndpoint(name, ep string) error {
	err := c.store.Update(func(tx store.Tx) error {
		n, ok, err := tx.Node(name)
		if err != nil || !ok {
			return err
		}
		n.Endpoint = ep
		return tx.PutNode(n)
	})
	if err != nil {
		return fmt.Errorf("storing endpoint of node %s: %w", name, err)
	}
	c.log.Info("node endpoint changed", "node", name, "endpoint", ep)
	c.requestRecompute()
	return nil
}

// Report implements AgentService.Report: it records what the agent enforces.
func (s *agentService) Report(ctx context.Context, req *connect.Request[segmeshv1.ReportRequest]) (*connect.Response[segmeshv1.ReportResponse], error) {
	node, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	s.c.live.report(node.Name, req.Msg, s.c.now())
	return connect.NewResponse(&segmeshv1.ReportResponse{}), nil
}

// liveTracker keeps runtime status per node: open streams and the last report.
type liveTracker struct {
	mu     sync.Mutex
	nextID uint64
	nodes  map[string]*liveNode
}

type liveNode struct {
	conns       map[uint64]bool
	dataplane   string
	iface       string
	appliedRev  uint64
	appliedHash string
	err         string
	alivePeers  []string
	lastSeen    time.Time
}

func newLiveTracker() *liveTracker { return &liveTracker{nodes: map[string]*liveNode{}} }

func (l *liveTracker) get(name string) *liveNode {
	n := l.nodes[name]
	if n == nil {
		n = &liveNode{conns: map[uint64]bool{}}
		l.nodes[name] = n
	}
	return n
}

// connect records an open stream of node and returns its id for disconnect.
func (l *liveTracker) connect(name string, req *segmeshv1.SyncRequest, now time.Time) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.nextID++
	n := l.get(name)
	n.conns[l.nextID] = true
	if req.GetDataplane() != "" {
		n.dataplane = req.GetDataplane()
	}
	if req.GetInterface() != "" {
		n.iface = req.GetInterface()
	}
	n.lastSeen = now
	return l.nextID
}

// disconnect closes stream id of node; the node stays online while another
// stream (a reconnect that overtook this one) is open.
func (l *liveTracker) disconnect(name string, id uint64, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.get(name)
	delete(n.conns, id)
	n.lastSeen = now
}

func (l *liveTracker) report(name string, r *segmeshv1.ReportRequest, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.get(name)
	n.appliedRev = r.GetAppliedRevision()
	n.appliedHash = r.GetAppliedHash()
	if r.GetDataplane() != "" {
		n.dataplane = r.GetDataplane()
	}
	n.err = r.GetError()
	n.alivePeers = slices.Sorted(slices.Values(r.GetAlivePeers()))
	n.lastSeen = now
}

// iface returns the overlay interface name node's agent last reported, or "".
func (l *liveTracker) iface(name string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if n, ok := l.nodes[name]; ok {
		return n.iface
	}
	return ""
}

// fill copies the runtime status of node into st.
func (l *liveTracker) fill(st *segmeshv1.NodeStatus) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, ok := l.nodes[st.Name]
	if !ok {
		return
	}
	st.Online = len(n.conns) > 0
	st.AppliedRevision = n.appliedRev
	st.AppliedHash = n.appliedHash
	st.Dataplane = n.dataplane
	st.Error = n.err
	st.AlivePeers = slices.Clone(n.alivePeers)
	if !n.lastSeen.IsZero() {
		st.LastSeenUnix = n.lastSeen.Unix()
	}
}
