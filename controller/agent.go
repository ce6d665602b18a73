package controller

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"maps"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/api/wire"
	"segmesh/controller/netmap"
	"segmesh/controller/pki"
	"segmesh/controller/store"
	"segmesh/policy"
)

type clientCertKey struct{}

// withClientIdentity puts the verified TLS client certificate (the leaf of the
// first verified chain) into the request context for the AgentService handlers.
// A call without one is refused from the TLS state alone, before its body is
// read; bodies are capped at agentBodyLimit.
// writeControlKey is the context key of the stream's http.ResponseController,
// which sets write deadlines (sendLimited).
type writeControlKey struct{}

func withClientIdentity(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
			writeRefusal(w, r, connect.NewError(connect.CodeUnauthenticated, errors.New("agent calls need the node's client certificate (mutual TLS)")))
			return
		}
		if !limitBody(w, r, agentBodyLimit, 0) {
			return
		}
		ctx := context.WithValue(r.Context(), clientCertKey{}, r.TLS.VerifiedChains[0][0])
		ctx = context.WithValue(ctx, writeControlKey{}, http.NewResponseController(w))
		h.ServeHTTP(w, r.WithContext(ctx))
	})
}

type agentService struct {
	segmeshv1connect.UnimplementedAgentServiceHandler
	c *Controller
}

// authenticate returns the enrolled node that holds the verified client
// certificate of the call. It runs on every call and before every message of a
// stream, so that revocation, renewal and expiry take effect at once, not at the
// next TLS handshake. Errors: PermissionDenied when the node was revoked or
// deleted (see isCutOff), Unauthenticated when there is no client certificate,
// when the certificate is not the node's current one (renewed, or the name
// re-enrolled) or when it expired.
func (s *agentService) authenticate(ctx context.Context) (store.Node, error) {
	return s.authenticateFor(ctx, false)
}

// authenticateFor is authenticate; renewal also accepts the certificate of the
// node's previous identity key (store.Node.PrevIdentityKey), so that an agent
// that crashed between the renewal and storing its new certificate can renew
// again. The first call with the new key forgets the previous one.
func (s *agentService) authenticateFor(ctx context.Context, renewal bool) (store.Node, error) {
	cert, _ := ctx.Value(clientCertKey{}).(*x509.Certificate)
	if cert == nil {
		return store.Node{}, connect.NewError(connect.CodeUnauthenticated, errors.New("agent calls need the node's client certificate (mutual TLS)"))
	}
	name := cert.Subject.CommonName
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
	now := s.c.now()
	switch {
	case !ok:
		return n, connect.NewError(connect.CodePermissionDenied, fmt.Errorf("node %q is not enrolled (deleted by an operator?); its credentials are no longer valid", name))
	case n.Revoked():
		return n, connect.NewError(connect.CodePermissionDenied, fmt.Errorf("node %q was revoked at %s by %s; it needs `segmesh nodes delete %s` and a new join token to come back", name, n.RevokedAt.UTC().Format(timeFormat), orUnknown(n.RevokedBy), name))
	case !now.Before(cert.NotAfter):
		return n, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("the certificate of node %q expired at %s; the agent needs a new join token", name, cert.NotAfter.UTC().Format(timeFormat)))
	case len(n.IdentityKey) == 0:
		// Enrolled before identity keys were kept: no certificate can be tied
		// to the node, so none is accepted.
		return n, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("node %q was enrolled before the controller kept node identity keys; `segmesh nodes delete %s` and enroll it again", name, name))
	case bytes.Equal(cert.RawSubjectPublicKeyInfo, n.IdentityKey):
	case renewal && len(n.PrevIdentityKey) > 0 && bytes.Equal(cert.RawSubjectPublicKeyInfo, n.PrevIdentityKey) && now.Before(n.PrevIdentityUntil):
		return n, nil
	default:
		return n, connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("this certificate is no longer node %q's: the node renewed its certificate or enrolled again", name))
	}
	if len(n.PrevIdentityKey) > 0 {
		if err := s.c.forgetPrevIdentity(name, n.IdentityKey); err != nil {
			return n, connect.NewError(connect.CodeInternal, err)
		}
		n.PrevIdentityKey = nil
	}
	return n, nil
}

// forgetPrevIdentity clears node name's previous identity key once it used
// current (still its identity key).
func (c *Controller) forgetPrevIdentity(name string, current []byte) error {
	return c.store.Update(func(tx store.Tx) error {
		n, ok, err := tx.Node(name)
		if err != nil || !ok || !bytes.Equal(n.IdentityKey, current) {
			return err
		}
		n.PrevIdentityKey, n.PrevIdentityUntil = nil, time.Time{}
		return tx.PutNode(n)
	})
}

// prevIdentityGrace is how long after a renewal the previous certificate may
// still renew (once the new one was used, not at all): long enough for a host
// that crashed mid-renewal to come back, short enough to leave a thief of the old
// key little time.
const prevIdentityGrace = 24 * time.Hour

// callerKey returns the PKIX DER of the public key of the call's client
// certificate (nil without one).
func callerKey(ctx context.Context) []byte {
	if cert, _ := ctx.Value(clientCertKey{}).(*x509.Certificate); cert != nil {
		return bytes.Clone(cert.RawSubjectPublicKeyInfo)
	}
	return nil
}

// isCutOff reports whether err is authenticate's answer for a revoked or deleted
// node.
func isCutOff(err error) bool { return connect.CodeOf(err) == connect.CodePermissionDenied }

func orUnknown(s string) string {
	if s == "" {
		return "an operator"
	}
	return s
}

// serve runs one netmap stream (Sync or SyncUpdates): it records the agent's
// endpoint and candidates (updateEndpoint, updateCandidates: a change is
// persisted and recomputes netmaps; candidates refused for their rate are only
// logged), marks the node online,
// sends the node's current netmap at once and then, on every change, a delta
// (with deltas) or the whole netmap, until the agent goes away or the controller shuts down. Before each
// netmap it authenticates the node again; a node revoked or deleted meanwhile is
// sent a revoked netmap (no peers, default deny) and the stream ends with
// PermissionDenied.
func (s *agentService) serve(ctx context.Context, req *connect.Request[segmeshv1.SyncRequest], deltas bool, send func(*segmeshv1.NetmapUpdate) error) error {
	c := s.c
	node, err := s.authenticate(ctx)
	if err != nil {
		return err
	}
	ep := req.Msg.GetEndpoint()
	if err := c.updateEndpoint(node, ep); err != nil {
		return err
	}
	if err := c.updateCandidates(node, req.Peer().Addr, ep, req.Msg.GetCandidates()); err != nil {
		switch connect.CodeOf(err) {
		case connect.CodePermissionDenied:
			return err
		case connect.CodeResourceExhausted:
			c.log.Debug("endpoint candidates not stored; the stored ones stay", "node", node.Name, "err", err)
		default:
			c.log.Warn("endpoint candidates not stored; the stored ones stay", "node", node.Name, "err", err)
		}
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	conn := c.live.connect(node.Name, req.Msg, cancel, c.now())
	c.presence.changed(node.Name)
	defer func() {
		c.live.disconnect(node.Name, conn, c.now())
		c.presence.changed(node.Name)
	}()
	c.log.Info("agent connected", "node", node.Name, "peer", req.Peer().Addr, "endpoint", ep, "dataplane", req.Msg.GetDataplane(), "version", req.Msg.GetVersion())
	defer c.log.Info("agent disconnected", "node", node.Name, "peer", req.Peer().Addr)

	var features []string
	if deltas { // out-of-band updates are NetmapUpdates: SyncUpdates streams only
		features = streamFeatures(req.Msg.GetFeatures())
	}
	c.live.setFeatures(node.Name, conn, features)
	sub := c.hub.Subscribe(node.Name, deltas, features...)
	defer sub.Close()
	if slices.Contains(features, featureControllers) {
		c.push(node.Name, featureControllers, controllerSet(urlsFor(node.Name, c.controllerURLs())))
	}
	c.relayStreamOpened(node.Name, conn, features, req.Msg.GetRelayPorts())
	defer c.relayStreamClosed(node.Name, conn)
	for {
		select {
		case <-ctx.Done():
			if errors.Is(context.Cause(ctx), errStreamReplaced) {
				return connect.NewError(connect.CodeAborted, errStreamReplaced)
			}
			if errors.Is(context.Cause(ctx), errNoLease) {
				return connect.NewError(connect.CodeUnavailable, errNoLease)
			}
			return nil
		case <-c.shutdown:
			return connect.NewError(connect.CodeUnavailable, errors.New("controller is shutting down"))
		case <-sub.Wake():
		}
		if _, err := s.authenticate(ctx); err != nil {
			if isCutOff(err) {
				rev, _ := c.policyInForce()
				full := &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Full{Full: netmap.Revoked(rev, node.Name)}}
				if err := send(full); err != nil {
					c.log.Debug("sending the revoked netmap", "node", node.Name, "err", err)
				}
			}
			if isCutOff(err) {
				c.log.Info("agent stream closed: credentials no longer valid", "node", node.Name, "reason", err)
			} else {
				c.log.Warn("agent stream closed: the node's credentials could not be checked", "node", node.Name, "err", err)
			}
			return err
		}
		if u, ok := sub.Next(); ok {
			if u.GetFull() != nil {
				// A whole netmap may be a new node's under this name (deleted and
				// enrolled again since the check above): check once more.
				if _, err := s.authenticate(ctx); err != nil {
					return err
				}
			}
			if err := c.sendLimited(ctx, u, send); err != nil {
				return fmt.Errorf("sending netmap to %s: %w", node.Name, err)
			}
			c.metrics.sent(u.GetDelta() != nil)
			if d := u.GetDelta(); d != nil {
				c.log.Debug("netmap delta sent", "node", node.Name, "revision", d.GetPolicyRevision(), "hash", d.GetHash())
			} else {
				c.log.Debug("netmap sent", "node", node.Name, "revision", u.GetFull().GetPolicyRevision(), "hash", u.GetFull().GetHash())
			}
		}
		for _, u := range sub.Pushed() { // after the netmap, which may name their peers
			if err := c.sendLimited(ctx, u, send); err != nil {
				return fmt.Errorf("sending an out-of-band update to %s: %w", node.Name, err)
			}
		}
	}
}

// Features of SyncRequest.features the controller knows: the kinds of
// out-of-band update (Controller.push) an agent understands.
const (
	featurePunch = "punch"
	featureRelay = "relay"
)

// streamFeatures returns the known features among fs, once each, in the order
// featurePunch, featureRelay.
func streamFeatures(fs []string) []string {
	var out []string
	for _, f := range []string{featurePunch, featureRelay, featureControllers} {
		if slices.Contains(fs, f) {
			out = append(out, f)
		}
	}
	return out
}

// push queues u, an update that is not a netmap (a Punch, a RelayConfig), for
// the open SyncUpdates streams of node whose agents listed feature in their
// SyncRequest.features (at most fanout.MaxPushed per stream, the oldest dropped
// and counted in segmesh_controller_pushes_dropped_total). It reports whether
// any stream queued it; false when node has no such stream (offline, or its
// agent predates feature).
//
// With several replicas, an update for a node that streams from none here goes
// to the other replicas through etcd (pushToReplicas), and push reports true.
func (c *Controller) push(node, feature string, u *segmeshv1.NetmapUpdate) bool {
	if c.pushLocal(node, feature, u) {
		return true
	}
	if c.cluster != nil {
		if _, ok := c.cluster.Presence(node); ok {
			c.pushToReplicas(node, feature, u)
			return true
		}
	}
	return false
}

// pushLocal is push to this replica's streams only.
func (c *Controller) pushLocal(node, feature string, u *segmeshv1.NetmapUpdate) bool {
	queued, dropped := c.hub.Push(node, feature, u)
	if dropped > 0 {
		c.metrics.pushesDropped.Add(float64(dropped))
		c.log.Debug("out-of-band updates dropped: the stream's queue was full", "node", node, "dropped", dropped)
	}
	return queued > 0
}

// heavyUpdate is the number of peers and set elements above which an update
// counts against sendBudget.
const heavyUpdate = 256

// updateElements counts the peers and set elements u carries: the measure of
// what marshalling and compressing it costs.
func updateElements(u *segmeshv1.NetmapUpdate) int {
	if f := u.GetFull(); f != nil {
		n := len(f.GetPeers())
		for _, s := range f.GetFilter().GetSets() {
			n += len(s.GetPrefixes())
		}
		return n
	}
	d := u.GetDelta()
	n := len(d.GetUpsertedPeers()) + len(d.GetRemovedPeers())
	for _, s := range d.GetSets() {
		n += len(s.GetPrefixes()) + len(s.GetAdded()) + len(s.GetRemoved())
	}
	return n
}

// sendBudget bounds, in peers and set elements (about 100 bytes each marshalled),
// the heavy updates being marshalled, compressed and written at once (whole
// netmaps, and large deltas after a policy change, to thousands of agents at
// once): each is held in memory until written, so the budget bounds the memory
// a burst takes, and keeps it from starving the rest of the controller (an
// operator's call waits behind it).
const sendBudget = 64 << 10

// sendTimeout is how long one message may take to reach an agent: a stream whose
// agent does not read (its flow-control window stays full) ends then, freeing
// its share of sendBudget; the agent reconnects and gets a whole netmap.
const sendTimeout = 30 * time.Second

// sendLimited writes u with send under a write deadline of sendTimeout; a heavy
// update also holds a CPU slot (sendSlots) and its share of c.sendBudget, at most
// a quarter of it. Both are leased: a send still running after sendSlow (its
// agent reads slowly, or not at all) gives them back, so that stuck agents delay
// the others by sendSlow at most; what such a send holds in memory is bounded by
// the streams per node and ends with the write deadline.
func (c *Controller) sendLimited(ctx context.Context, u *segmeshv1.NetmapUpdate, send func(*segmeshv1.NetmapUpdate) error) error {
	rc, _ := ctx.Value(writeControlKey{}).(*http.ResponseController)
	write := func() error {
		if rc != nil {
			defer deadlineIfSlow(rc, time.Now())()
		}
		return send(u)
	}
	n := int64(updateElements(u))
	if n <= heavyUpdate {
		return write()
	}
	n = min(n, sendBudget/4)
	if err := c.sendBudget.Acquire(ctx, n); err != nil {
		return err
	}
	var once sync.Once
	release := func() { once.Do(func() { c.sendBudget.Release(n) }) }
	t := time.AfterFunc(sendSlow, release)
	defer func() {
		t.Stop()
		release()
	}()
	return c.sendSlots.do(write)
}

// sendSlow is how long a send runs before it gives back its budget and gets a
// write deadline (setting one costs about a millisecond of the HTTP/2
// connection's time, too much for every message to thousands of agents).
const sendSlow = time.Second

// deadlineIfSlow gives a send that began at start a write deadline of
// start+sendTimeout once it has run for sendSlow, and returns the function that
// ends the send, removing the deadline if it was set.
func deadlineIfSlow(rc *http.ResponseController, start time.Time) func() {
	var mu sync.Mutex
	set, done := false, false
	t := time.AfterFunc(sendSlow, func() {
		mu.Lock()
		defer mu.Unlock()
		if !done {
			set = rc.SetWriteDeadline(start.Add(sendTimeout)) == nil // unsupported only by test writers
		}
	})
	return func() {
		t.Stop()
		mu.Lock()
		defer mu.Unlock()
		done = true
		if set {
			_ = rc.SetWriteDeadline(time.Time{})
		}
	}
}

// slots bounds how many streams marshal and compress a heavy update at once: past
// a couple per core they only compete for the same cores and caches (a full-mesh
// policy reached 1,000 agents with 2.8 CPU-s under 4 slots, 4.1 under 20). A slot
// is leased for at most lease: a stream whose agent reads slowly keeps writing
// after the lease ends, under its write deadline and its share of sendBudget, but
// no longer holds up the others.
type slots struct {
	ch    chan struct{}
	lease time.Duration
}

// slotLease is the longest one stream holds a send slot.
const slotLease = 2 * time.Second

func newSlots(n int, lease time.Duration) *slots {
	return &slots{ch: make(chan struct{}, n), lease: lease}
}

// do runs f holding a slot, for at most the lease.
func (s *slots) do(f func() error) error {
	s.ch <- struct{}{}
	var once sync.Once
	release := func() { once.Do(func() { <-s.ch }) }
	t := time.AfterFunc(s.lease, release)
	defer func() {
		t.Stop()
		release()
	}()
	return f()
}

// Sync implements AgentService.Sync for agents that predate deltas: whole
// netmaps only, with hash version 1. The agent reports that hash; the controller
// translates it back (liveTracker.sentLegacy).
func (s *agentService) Sync(ctx context.Context, req *connect.Request[segmeshv1.SyncRequest], stream *connect.ServerStream[segmeshv1.Netmap]) error {
	name := ""
	return s.serve(ctx, req, false, func(u *segmeshv1.NetmapUpdate) error {
		nm := u.GetFull()
		if name == "" {
			name = nm.GetSelf().GetName()
		}
		v2 := nm.GetHash()
		nm.HashVersion = 0
		nm.Hash = wire.NetmapHash(nm)
		s.c.live.sentLegacy(name, nm.GetHash(), v2)
		return stream.Send(nm)
	})
}

// SyncUpdates implements AgentService.SyncUpdates: one whole netmap, then deltas.
func (s *agentService) SyncUpdates(ctx context.Context, req *connect.Request[segmeshv1.SyncRequest], stream *connect.ServerStream[segmeshv1.NetmapUpdate]) error {
	if r := req.Msg.GetResyncReason(); r != "" {
		s.c.log.Info("agent asks for a whole netmap", "peer", req.Peer().Addr, "reason", reportedText(r, 256))
	}
	return s.serve(ctx, req, true, stream.Send)
}

// RenewCertificate implements AgentService.RenewCertificate: over the node's
// current, valid certificate it issues a certificate for a new TLS key (a CSR
// with the node's name as common name) valid for Options.NodeCertTTL. The new key
// becomes the node's identity at once, so the old certificate is refused from
// then on for everything but another renewal, and for that too once the node used
// the new one (authenticateFor). InvalidArgument for a bad CSR, a wrong name or the
// same key.
func (s *agentService) RenewCertificate(ctx context.Context, req *connect.Request[segmeshv1.RenewCertificateRequest]) (*connect.Response[segmeshv1.RenewCertificateResponse], error) {
	c := s.c
	node, err := s.authenticateFor(ctx, true)
	if err != nil {
		return nil, err
	}
	csr, err := pki.ParseCSR(req.Msg.GetCsrDer())
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	if csr.Subject.CommonName != node.Name {
		return nil, invalidArg("certificate request is for %q, this node is %q", csr.Subject.CommonName, node.Name)
	}
	idKey := identityKey(csr)
	if idKey == nil {
		return nil, invalidArg("the certificate request's key must be ECDSA P-256")
	}
	if bytes.Equal(idKey, node.IdentityKey) {
		return nil, invalidArg("renewal needs a new TLS key; the request is for the current one")
	}
	now := c.now()
	notAfter := now.Add(c.opts.NodeCertTTL)
	der, err := c.ca.SignClient(csr, node.Name, notAfter)
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, err)
	}
	err = c.store.Update(func(tx store.Tx) error {
		n, ok, err := tx.Node(node.Name)
		if err != nil {
			return err
		}
		if !ok || n.Revoked() || !bytes.Equal(n.IdentityKey, node.IdentityKey) {
			return connect.NewError(connect.CodeAborted, fmt.Errorf("node %s changed during the renewal; retry", node.Name))
		}
		// The key this call authenticated with stays good for renewals until the
		// new one is used.
		n.PrevIdentityKey, n.IdentityKey, n.CertNotAfter = callerKey(ctx), idKey, notAfter
		n.PrevIdentityUntil = now.Add(prevIdentityGrace)
		if err := tx.PutNode(n); err != nil {
			return err
		}
		return tx.AppendAudit(store.AuditEntry{Time: now, Actor: "node:" + n.Name, Action: "node.cert.renew", Object: "node:" + n.Name, Result: "ok",
			Detail: "new TLS key; certificate valid until " + notAfter.UTC().Format(timeFormat)})
	})
	if err != nil {
		return nil, internalOr("storing the renewed identity of "+node.Name, err)
	}
	c.log.Info("node certificate renewed", "node", node.Name, "not_after", notAfter)
	c.nodesChanged(node.Name) // peers verify gossip claims with the node's identity key
	return connect.NewResponse(&segmeshv1.RenewCertificateResponse{CertificateDer: der, NotAfterUnix: notAfter.Unix()}), nil
}

// RotateKey implements AgentService.RotateKey: it stores the node's new
// WireGuard public key for the rotation generation an operator requested
// (RotateNodeKey) and republishes the netmaps, so peers switch to the new key.
// FailedPrecondition when that generation was not requested or was completed with
// another key, InvalidArgument for a bad key, AlreadyExists when another node
// holds it.
func (s *agentService) RotateKey(ctx context.Context, req *connect.Request[segmeshv1.RotateKeyRequest]) (*connect.Response[segmeshv1.RotateKeyResponse], error) {
	c := s.c
	node, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	key, gen := req.Msg.GetPublicKey(), req.Msg.GetGeneration()
	if len(key) != 32 || bytes.Equal(key, make([]byte, 32)) {
		return nil, invalidArg("WireGuard public key must be 32 bytes and not all zeros")
	}
	now := c.now()
	changed := false
	err = c.store.Update(func(tx store.Tx) error {
		n, ok, err := tx.Node(node.Name)
		if err != nil || !ok {
			return err
		}
		switch {
		case n.Revoked():
			return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("node %q was revoked", n.Name))
		case gen == 0 || gen != n.KeyRotation:
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("no key rotation %d was requested for node %s (requested: %d)", gen, n.Name, n.KeyRotation))
		case gen == n.KeyRotationDone && bytes.Equal(n.PublicKey, key):
			return nil // a retry of a rotation that went through
		case gen == n.KeyRotationDone:
			return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("key rotation %d of node %s was already completed with another key", gen, n.Name))
		}
		if owner, taken, err := tx.NodeByPublicKey(key); err != nil {
			return err
		} else if taken && owner != n.Name {
			return connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("WireGuard public key already belongs to node %q", owner))
		}
		n.PublicKey, n.KeyRotationDone = key, gen
		if err := tx.PutNode(n); err != nil {
			return err
		}
		changed = true
		return tx.AppendAudit(store.AuditEntry{Time: now, Actor: "node:" + n.Name, Action: "node.key.rotate", Object: "node:" + n.Name, Result: "ok",
			Detail: fmt.Sprintf("generation %d, new WireGuard key %s", gen, base64.StdEncoding.EncodeToString(key))})
	})
	if err != nil {
		return nil, internalOr("storing the new key of "+node.Name, err)
	}
	if changed {
		c.log.Info("node WireGuard key rotated", "node", node.Name, "generation", gen)
		c.syncNodes(node.Name)
	}
	return connect.NewResponse(&segmeshv1.RotateKeyResponse{}), nil
}

// updateEndpoint records ep, the endpoint a node's agent says it has now (a
// SyncRequest or a ReportRequest; "" says nothing), when it differs from the
// stored one: checked (validateEndpoint: CodeInvalidArgument) and rate limited
// per node (endpointChanges: CodeResourceExhausted), then persisted with a
// recompute of the affected netmaps (setEndpoint).
func (c *Controller) updateEndpoint(node store.Node, ep string) error {
	if ep == "" {
		return nil
	}
	if err := validateEndpoint(ep, c.opts.OverlayPrefixes); err != nil {
		return connect.NewError(connect.CodeInvalidArgument, err)
	}
	if ep == node.Endpoint {
		return nil
	}
	// Every change is a write and a netmap for each peer: a node may roam, not
	// churn.
	if !c.endpointChanges.allow(node.Name, c.now()) {
		return connect.NewError(connect.CodeResourceExhausted, errors.New("endpoint changes too often; retry in a few seconds"))
	}
	if err := c.setEndpoint(node.Name, ep); err != nil {
		return internalOr("storing the endpoint", err)
	}
	return nil
}

// setEndpoint persists a node's new endpoint and schedules a recompute. A node
// revoked meanwhile is refused with PermissionDenied.
func (c *Controller) setEndpoint(name, ep string) error {
	_, err := c.editNode(name, func(n *store.Node) bool {
		n.Endpoint = ep
		return true
	})
	if err != nil {
		return fmt.Errorf("storing endpoint of node %s: %w", name, err)
	}
	c.log.Info("node endpoint changed", "node", name, "endpoint", ep)
	c.nodesChanged(name)
	return nil
}

// Report implements AgentService.Report: it records what the agent enforces and,
// when the report names a new endpoint (the host roamed), updates the node's
// endpoint as a new stream's SyncRequest.endpoint would (updateEndpoint: the same
// checks and rate limit), then, when it names an endpoint or candidates, the
// node's candidates (updateCandidates). The status is recorded even when the
// endpoint or the candidates are refused; the error then tells the agent to
// report again.
func (s *agentService) Report(ctx context.Context, req *connect.Request[segmeshv1.ReportRequest]) (*connect.Response[segmeshv1.ReportResponse], error) {
	node, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	now := s.c.now()
	prev := s.c.live.report(node.Name, req.Msg, now)
	s.c.presence.changed(node.Name)
	s.c.metrics.reported(prev, req.Msg.GetAppliedRevision(), now)
	s.c.recordDeniedFlows(node, req.Msg, now)
	ep := req.Msg.GetEndpoint()
	if err := s.c.updateEndpoint(node, ep); err != nil {
		return nil, err
	}
	if ep != "" || len(req.Msg.GetCandidates()) > 0 { // else the agent predates candidates in reports
		if err := s.c.updateCandidates(node, req.Peer().Addr, ep, req.Msg.GetCandidates()); err != nil {
			return nil, err
		}
	}
	return connect.NewResponse(&segmeshv1.ReportResponse{}), nil
}

// liveTracker keeps runtime status per node: open streams and the last report.
type liveTracker struct {
	mu     sync.Mutex
	nextID uint64
	nodes  map[string]*liveNode
}

type liveNode struct {
	conns       map[uint64]context.CancelCauseFunc // open streams by ID
	dataplane   string
	iface       string
	appliedRev  uint64
	appliedHash string
	err         string
	alivePeers  []string
	lastSeen    time.Time
	inSync      bool
	drift       *segmeshv1.Drift // sanitised (reportedDrift); nil before a report
	// version is the agent version its latest stream named (reportedText).
	version string
	// lastReport is when the latest report arrived; zero before one.
	lastReport time.Time
	// As the latest report said, checked (nodeinfo.go): the latest apply
	// (Unix ms, µs) and the WireGuard peers.
	lastApplyMs, lastApplyUs int64
	peers                    []reportedPeer
	peersMore                uint32
	// features are the known SyncRequest.features of the newest stream
	// (streamFeatures; none on a Sync stream), featuresOf its ID.
	features   []string
	featuresOf uint64
	// legacy maps the version 1 hashes of the netmaps last sent on a Sync stream
	// to their version 2 hashes (at most legacyHashes), so that an agent that
	// predates deltas reports a hash status can compare.
	legacy map[string]string
}

// legacyHashes bounds liveNode.legacy: the netmaps a legacy agent may still be
// applying when it reports.
const legacyHashes = 4

func newLiveTracker() *liveTracker { return &liveTracker{nodes: map[string]*liveNode{}} }

func (l *liveTracker) get(name string) *liveNode {
	n := l.nodes[name]
	if n == nil {
		n = &liveNode{conns: map[uint64]context.CancelCauseFunc{}}
		l.nodes[name] = n
	}
	return n
}

// What agents report is shown to operators (status, render): it is bounded and
// checked so that a node cannot inject lines or terminal escapes.
const (
	maxReportedError   = 1024
	maxAlivePeers      = 4096
	maxReportedVersion = 64
	// Bounds of each list of drift differences (the agent keeps the same ones,
	// see agent/reconcile.Bound): items, bytes of part+detail in all, bytes of
	// one detail, bytes of one part.
	maxDriftItems  = 8
	maxDriftBytes  = 1024
	maxDriftDetail = 256
	maxDriftPart   = 16
)

// reportedDataplane returns d when it is a dataplane kind, else "".
func reportedDataplane(d string) string {
	if d == "kernel" || d == "userspace" {
		return d
	}
	return ""
}

// reportedInterface returns iface when it is a Linux interface name (1-15
// printable bytes without '/' or white space), else "".
func reportedInterface(iface string) string {
	if len(iface) == 0 || len(iface) > 15 {
		return ""
	}
	for _, r := range iface {
		if r <= ' ' || r > '~' || r == '/' {
			return ""
		}
	}
	return iface
}

// reportedText makes s one printable line of at most max bytes: control
// characters become spaces.
func reportedText(s string, max int) string {
	s = strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return ' '
		}
		return r
	}, strings.ToValidUTF8(s, "?"))
	if len(s) > max {
		s = strings.ToValidUTF8(s[:max], "") + "…"
	}
	return s
}

// reportedDrift returns a bounded, printable copy of what an agent reported about
// drift: at most maxDriftItems differences of at most maxDriftBytes per list
// (those left out are added to the *_more count), each detail one line of at most
// maxDriftDetail bytes, each part a lowercase word ("other" otherwise), and a last
// repair time neither negative nor later than now (the agent's clock may be ahead).
func reportedDrift(d *segmeshv1.Drift, now time.Time) *segmeshv1.Drift {
	out := &segmeshv1.Drift{Repairs: d.GetRepairs(), LastRepairUnix: d.GetLastRepairUnix()}
	if out.LastRepairUnix < 0 || out.Repairs == 0 {
		out.LastRepairUnix = 0
	}
	if out.LastRepairUnix > now.Unix() {
		out.LastRepairUnix = now.Unix()
	}
	out.LastRepaired, out.LastRepairedMore = reportedDifferences(d.GetLastRepaired(), d.GetLastRepairedMore())
	out.Unrepaired, out.UnrepairedMore = reportedDifferences(d.GetUnrepaired(), d.GetUnrepairedMore())
	return out
}

func reportedDifferences(ds []*segmeshv1.DriftDifference, more uint32) ([]*segmeshv1.DriftDifference, uint32) {
	var out []*segmeshv1.DriftDifference
	size := 0
	for i, d := range ds {
		part, detail := reportedPart(d.GetPart()), reportedText(d.GetDetail(), maxDriftDetail)
		if len(out) == maxDriftItems || size+len(part)+len(detail) > maxDriftBytes {
			left := uint64(more) + uint64(len(ds)-i)
			return out, uint32(min(left, math.MaxUint32))
		}
		out = append(out, &segmeshv1.DriftDifference{Part: part, Detail: detail})
		size += len(part) + len(detail)
	}
	return out, more
}

// reportedPart returns p when it is a lowercase ASCII word of at most
// maxDriftPart bytes, else "other".
func reportedPart(p string) string {
	if p == "" || len(p) > maxDriftPart || strings.ContainsFunc(p, func(r rune) bool { return r < 'a' || r > 'z' }) {
		return "other"
	}
	return p
}

// reportedPeers keeps the valid node names of peers, at most maxAlivePeers.
func reportedPeers(peers []string) []string {
	var out []string
	for _, p := range peers {
		if len(out) == maxAlivePeers {
			break
		}
		if policy.ValidNodeName(p) {
			out = append(out, p)
		}
	}
	return out
}

// connect records an open stream of node and returns its id for disconnect.
// maxStreamsPerNode is how many netmap streams one node may hold at once: a
// reconnecting agent's new stream overlaps its old one for a moment. Past it, a
// new stream ends the node's oldest, so that one node (stolen credentials, an
// agent that leaks streams) cannot hold subscriptions, goroutines and send
// budget without bound.
const maxStreamsPerNode = 4

// errStreamReplaced ends a node's oldest stream when it opens one too many.
var errStreamReplaced = errors.New("a newer netmap stream of this node replaced this one")

// connect records a new netmap stream of node name, which cancel ends, and
// returns its ID; past maxStreamsPerNode it ends the node's oldest stream.
func (l *liveTracker) connect(name string, req *segmeshv1.SyncRequest, cancel context.CancelCauseFunc, now time.Time) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.nextID++
	n := l.get(name)
	n.conns[l.nextID] = cancel
	if len(n.conns) > maxStreamsPerNode {
		oldest := slices.Min(slices.Collect(maps.Keys(n.conns)))
		n.conns[oldest](errStreamReplaced)
		delete(n.conns, oldest)
	}
	if d := reportedDataplane(req.GetDataplane()); d != "" {
		n.dataplane = d
	}
	if i := reportedInterface(req.GetInterface()); i != "" {
		n.iface = i
	}
	if v := reportedText(req.GetVersion(), maxReportedVersion); v != "" {
		n.version = v
	}
	n.lastSeen = now
	return l.nextID
}

// setFeatures records the features of node name's stream id (streamFeatures)
// unless a newer stream recorded its own.
func (l *liveTracker) setFeatures(name string, id uint64, features []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.get(name)
	if id >= n.featuresOf {
		n.features, n.featuresOf = features, id
	}
}

// online reports whether node name has an open netmap stream and the features
// of its newest one.
func (l *liveTracker) online(name string) (bool, []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, ok := l.nodes[name]
	if !ok || len(n.conns) == 0 {
		return false, nil
	}
	return true, slices.Clone(n.features)
}

// cancelAll ends every open stream with cause.
func (l *liveTracker) cancelAll(cause error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, n := range l.nodes {
		for _, cancel := range n.conns {
			cancel(cause)
		}
	}
}

// onlineWith lists the nodes with an open stream whose newest one listed
// feature (any stream when feature is "").
func (l *liveTracker) onlineWith(feature string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for name, n := range l.nodes {
		if len(n.conns) > 0 && (feature == "" || slices.Contains(n.features, feature)) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
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

// sentLegacy records that a Sync stream sent node name the netmap whose version 1
// hash is v1 and version 2 hash v2.
func (l *liveTracker) sentLegacy(name, v1, v2 string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.get(name)
	if n.legacy == nil || len(n.legacy) >= legacyHashes {
		n.legacy = map[string]string{}
	}
	n.legacy[v1] = v2
}

// report records r as node name's last report and returns the revision its
// previous report enforced (0 for none).
func (l *liveTracker) report(name string, r *segmeshv1.ReportRequest, now time.Time) (prev uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.get(name)
	prev = n.appliedRev
	n.appliedRev = r.GetAppliedRevision()
	n.appliedHash = reportedText(r.GetAppliedHash(), 64)
	if v2, ok := n.legacy[n.appliedHash]; ok {
		n.appliedHash = v2
	}
	if d := reportedDataplane(r.GetDataplane()); d != "" {
		n.dataplane = d
	}
	n.err = reportedText(r.GetError(), maxReportedError)
	n.alivePeers = slices.Sorted(slices.Values(reportedPeers(r.GetAlivePeers())))
	n.inSync = r.GetInSync()
	n.drift = reportedDrift(r.GetDrift(), now)
	n.lastApplyMs, n.lastApplyUs = reportedApply(r.GetLastApplyUnixMs(), r.GetLastApplyDurationUs(), now)
	n.peers, n.peersMore = reportedWireGuardPeers(n.peers[:0], r.GetPeers(), r.GetPeersMore(), now)
	n.lastSeen, n.lastReport = now, now
	return prev
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

// fill copies the runtime status of node into st; the WireGuard peers only when
// withPeers (Status leaves them out to stay small).
func (l *liveTracker) fill(st *segmeshv1.NodeStatus, withPeers bool) {
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
	st.InSync = n.inSync
	if n.drift != nil {
		st.Drift = proto.CloneOf(n.drift)
	}
	if !n.lastSeen.IsZero() {
		st.LastSeenUnix = n.lastSeen.Unix()
	}
	st.Version, st.Interface = n.version, n.iface
	st.LastApplyUnixMs, st.LastApplyDurationUs = n.lastApplyMs, n.lastApplyUs
	if !n.lastReport.IsZero() {
		st.LastReportUnix = n.lastReport.Unix()
	}
	if withPeers {
		st.Peers, st.PeersMore = peerStatuses(n.peers), n.peersMore
	}
}
