package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"segmesh/agent/enroll"
	"segmesh/agent/flowlog"
	"segmesh/agent/netmap"
	"segmesh/agent/reconcile"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/api/wire"
)

// maxBackoff is the longest wait between two attempts to reach the controller; a
// revoked node, or one whose certificate expired, waits this long every time.
const maxBackoff = 30 * time.Second

// errReconnect ends a netmap stream on purpose (a renewed certificate): the loop
// reconnects at once, over a new connection.
var errReconnect = errors.New("reconnecting with the renewed certificate")

// syncer holds the mutual-TLS connection to the controller in use: the netmap
// stream, the status reports, certificate renewal, key rotation, punch and relay
// calls all go to the controller URL in use (agent.ctl), which connectLoop moves to
// the next one when the stream is lost.
type syncer struct {
	a *agent

	mu           sync.Mutex
	hc           *http.Client
	retired      []*http.Client                      // clients with the previous certificate, to close once idle
	client       segmeshv1connect.AgentServiceClient // for url
	url          string                              // the controller URL client calls
	urlCtx       context.Context                     // ends when the agent moves away from url
	urlCancel    context.CancelFunc
	forceReport  atomic.Bool             // the next report requested is sent even when unchanged
	cancelStream context.CancelCauseFunc // ends the open netmap stream; nil when none
	netmapErr    error                   // why the latest netmap from the controller was rejected
	lastReport   *segmeshv1.ReportRequest
	flowBatch    flowlog.Batch // the denied flows of the report being built; reportMu
	reportMu     sync.Mutex    // serialises reports so that they arrive in order
	legacyOnce   sync.Once     // logs the first fallback to Sync
}

func newSyncer(a *agent) (*syncer, error) {
	pool, err := a.dir.CAPool()
	if err != nil {
		return nil, err
	}
	s := &syncer{a: a}
	s.hc = s.newHTTPClient(pool)
	s.url = a.ctl.current()
	s.client = segmeshv1connect.NewAgentServiceClient(s.hc, s.url)
	s.urlCtx, s.urlCancel = context.WithCancel(context.Background())
	return s, nil
}

// useCurrent points the AgentService client at the controller URL in use (after
// connectLoop moved to another one) and drops the idle connections to the
// previous one. Calls in flight finish (or fail) where they went.
func (s *syncer) useCurrent() {
	s.mu.Lock()
	defer s.mu.Unlock()
	url := s.a.ctl.current()
	if url == s.url {
		return
	}
	s.pointAtLocked(url)
	s.hc.CloseIdleConnections()
}

// pointAtLocked makes the AgentService client (a new one, on s.hc) call url;
// when url is another URL, the calls still running on the previous one are
// cancelled. The caller holds s.mu.
func (s *syncer) pointAtLocked(url string) {
	if url != s.url {
		s.urlCancel()
		s.urlCtx, s.urlCancel = context.WithCancel(context.Background())
	}
	s.url = url
	s.client = segmeshv1connect.NewAgentServiceClient(s.hc, url)
}

// call returns the AgentService client for the controller URL in use and a
// context for one call with it: ctx with timeout (0: none), also cancelled when
// the agent moves to another controller URL, so that a call stuck on a replica
// that went silent does not outlive the switch. Call cancel when done.
func (s *syncer) call(ctx context.Context, timeout time.Duration) (segmeshv1connect.AgentServiceClient, context.Context, context.CancelFunc) {
	s.mu.Lock()
	client, urlCtx := s.client, s.urlCtx
	s.mu.Unlock()
	var cctx context.Context
	var cancel context.CancelFunc
	if timeout > 0 {
		cctx, cancel = context.WithTimeout(ctx, timeout)
	} else {
		cctx, cancel = context.WithCancel(ctx)
	}
	stop := context.AfterFunc(urlCtx, cancel)
	return client, cctx, func() { stop(); cancel() }
}

// newHTTPClient returns a client whose TLS handshakes present the agent's current
// node certificate (GetClientCertificate reads it at every handshake).
func (s *syncer) newHTTPClient(pool *x509.CertPool) *http.Client {
	return enroll.NewHTTPClient(&tls.Config{
		MinVersion: tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return s.a.certificate(), nil
		},
		RootCAs:    pool,
		ServerName: enroll.ServerName,
	})
}

// reconnect drops every connection made so far (with the previous certificate,
// or from the previous local address): it puts a new HTTP client in place and
// ends the open netmap stream with cause (errReconnect or errEndpointMoved),
// which connectLoop reopens at once (and then closes the old client's
// connections).
func (s *syncer) reconnect(cause error) {
	pool, err := s.a.dir.CAPool()
	if err != nil {
		s.a.log.Warn("reloading the CA certificate; the next connection presents the renewed certificate", "err", err)
	}
	s.mu.Lock()
	cancel := s.cancelStream
	if err == nil {
		s.retired = append(s.retired, s.hc)
		s.hc = s.newHTTPClient(pool)
		s.pointAtLocked(s.a.ctl.current())
	}
	s.mu.Unlock()
	if cancel != nil {
		cancel(cause)
	}
	s.closeRetired()
}

// closeRetired closes the idle connections of the clients reconnect replaced. A
// connection still busy (a report in flight) is closed by the transport's idle
// timeout later.
func (s *syncer) closeRetired() {
	s.mu.Lock()
	retired := s.retired
	s.retired = nil
	s.mu.Unlock()
	for _, hc := range retired {
		hc.CloseIdleConnections()
	}
}

// close drops the idle connections to the controller.
func (s *syncer) close() {
	s.closeRetired()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.urlCancel()
	s.hc.CloseIdleConnections()
}

// Resyncs: when a delta does not apply (a gap, a hash mismatch, a delta before any
// full netmap) the agent ends the stream and opens a new one at once, which starts
// with a full netmap; at most maxResyncs times in resyncWindow, so that a
// controller that keeps sending bad deltas cannot make the agent spin.
const (
	maxResyncs   = 3
	resyncWindow = time.Minute
)

// resyncError ends a SyncUpdates stream on purpose: an update did not apply to
// the netmap held. reason goes into SyncRequest.resync_reason of the next stream.
type resyncError struct{ reason string }

func (e *resyncError) Error() string { return "asking for a full netmap: " + e.reason }

// resyncLimiter spaces resyncs: at most n in any window.
type resyncLimiter struct {
	n      int
	window time.Duration
	times  []time.Time // the recent resyncs (some maybe in the future), oldest first
}

// next records a resync wanted at now and returns how long to wait before it (0:
// at once), so that no window holds more than n.
func (l *resyncLimiter) next(now time.Time) time.Duration {
	cut := now.Add(-l.window)
	i := 0
	for i < len(l.times) && !l.times[i].After(cut) {
		i++
	}
	l.times = l.times[i:]
	var d time.Duration
	if len(l.times) >= l.n {
		d = l.times[len(l.times)-l.n].Add(l.window).Sub(now)
	}
	l.times = append(l.times, now.Add(d))
	return d
}

// connectLoop keeps a netmap stream open until ctx ends. When the stream is lost
// (it ends or fails, cannot be opened, or its connection stops answering HTTP/2
// pings, see enroll.PingAfter), it moves to the next controller URL and tries it
// at once; only after every known URL failed in turn does it wait, with backoff
// (1 s doubling to 30 s, jittered; reset after a stream that delivered a netmap),
// see failover. With one URL that is a backoff after every failure. The dataplane
// is not touched meanwhile: the last netmap stays in force. A revoked node, or one
// whose certificate expired, tries only every 30 s (on the same URL): it keeps its
// default-deny or last netmap meanwhile and does not hammer the controller. A
// stream the agent ended for a resync (see resyncError) is reopened at once, on the
// same URL, within the limits of maxResyncs.
func (s *syncer) connectLoop(ctx context.Context) {
	a := s.a
	fo := failover{bo: newBackoff(time.Second, maxBackoff)}
	resyncs := resyncLimiter{n: maxResyncs, window: resyncWindow}
	resync := "" // SyncRequest.resync_reason of the next stream
	for {
		if a.certificateExpired() {
			if !sleep(ctx, maxBackoff) {
				return
			}
			continue
		}
		began := time.Now()
		received, err := s.syncOnce(ctx, resync)
		resync = ""
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errReconnect) || errors.Is(err, errEndpointMoved) {
			a.log.Info("reconnecting to the controller", "reason", err)
			s.closeRetired() // the old stream is closed now
			fo.bo.reset()
			continue
		}
		if re := (*resyncError)(nil); errors.As(err, &re) {
			resync = re.reason
			if received {
				fo.bo.reset()
			}
			d := resyncs.next(time.Now())
			if d == 0 {
				a.log.Warn("a netmap update from the controller did not apply; asking for a full netmap", "reason", re.reason)
				continue
			}
			a.log.Warn("a netmap update from the controller did not apply again; asking for a full netmap later", "reason", re.reason,
				"in", d.Round(time.Millisecond), "limit", fmt.Sprintf("%d per %v", maxResyncs, resyncWindow))
			if !sleep(ctx, d) {
				return
			}
			continue
		}
		if isRevokedError(err) {
			// Under reportMu: a report in flight lands first, and none starts
			// until the node is marked revoked. (Only then: a report stuck on a
			// silent controller must not delay the failover.)
			s.reportMu.Lock()
			s.checkRevoked(ctx, err)
			s.reportMu.Unlock()
		}
		var d time.Duration
		switch {
		case a.isRevoked():
			d = maxBackoff
			a.log.Debug("node is revoked; asking the controller again later", "err", err, "in", d)
		case a.certificateExpired():
			continue // logged by certificateExpired
		default:
			d = fo.next(received, received && time.Since(began) >= stableStream, a.ctl.count())
			from, to := a.ctl.advance()
			if from == to {
				a.log.Warn("controller stream ended; reconnecting", "controller", from, "err", err, "in", d.Round(time.Millisecond))
				break
			}
			s.useCurrent()
			a.log.Warn("controller stream ended; switching to the next controller", "controller", from, "err", err, "next", to, "in", d.Round(time.Millisecond))
		}
		if !sleep(ctx, d) {
			return
		}
	}
}

// syncOnce runs one netmap stream; it reports whether a netmap arrived. It opens
// AgentService.SyncUpdates (full netmap, then deltas) with resync as the
// resync_reason, and when the controller does not serve it (CodeUnimplemented: a
// controller older than deltas) AgentService.Sync (full netmaps only) instead.
// Every connection tries SyncUpdates first, so that an upgraded controller sends
// deltas from the next reconnect on; the fallback is logged once per process.
//
// The error is errReconnect or errEndpointMoved when reconnect ended the stream, a *resyncError when
// an update did not apply.
func (s *syncer) syncOnce(ctx context.Context, resync string) (bool, error) {
	ep, err := s.a.currentEndpoint()
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	s.mu.Lock()
	s.cancelStream = cancel
	client, url := s.client, s.url
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.cancelStream = nil
		s.mu.Unlock()
	}()
	req := &segmeshv1.SyncRequest{
		Endpoint:     ep.String(),
		Dataplane:    string(s.a.dp.Kind()),
		Version:      Version,
		Interface:    s.a.id.Interface,
		ResyncReason: resync,
		Candidates:   s.a.candidates(),
		Features:     []string{featurePunch, featureControllers},
	}
	if s.a.relay != nil {
		req.Features = append(req.Features, featureRelay)
		req.RelayPorts = fmt.Sprintf("%d-%d", s.a.relayFirst, s.a.relayLast)
	}
	received, err := s.syncUpdates(ctx, client, url, req, ep)
	if !received && connect.CodeOf(err) == connect.CodeUnimplemented && context.Cause(ctx) == nil {
		s.legacyOnce.Do(func() {
			s.a.log.Info("the controller does not serve netmap deltas (SyncUpdates); receiving full netmaps (Sync)", "controller", url)
		})
		req.ResyncReason = ""
		received, err = s.syncFull(ctx, client, url, req, ep)
	}
	if c := context.Cause(ctx); errors.Is(c, errReconnect) || errors.Is(c, errEndpointMoved) {
		return received, c
	}
	return received, err
}

// syncUpdates runs one SyncUpdates stream. It holds the netmap the stream last
// made (a full netmap, or the result of a delta applied to the one before),
// whether or not handleNetmap accepted it: deltas continue from the controller's
// view. An update that does not apply ends the stream with a *resyncError.
func (s *syncer) syncUpdates(ctx context.Context, client segmeshv1connect.AgentServiceClient, url string, req *segmeshv1.SyncRequest, ep netip.AddrPort) (bool, error) {
	stream, err := client.SyncUpdates(ctx, connect.NewRequest(req))
	if err != nil {
		return false, fmt.Errorf("opening netmap stream: %w", err)
	}
	defer stream.Close()
	received := false
	var held *segmeshv1.Netmap
	for stream.Receive() {
		var next *segmeshv1.Netmap
		switch u := stream.Msg().GetUpdate().(type) {
		case *segmeshv1.NetmapUpdate_Full:
			next = u.Full
		case *segmeshv1.NetmapUpdate_Punch:
			s.a.handlePunch(u.Punch)
			continue
		case *segmeshv1.NetmapUpdate_Relay:
			s.a.handleRelayConfig(u.Relay)
			continue
		case *segmeshv1.NetmapUpdate_Controllers:
			s.a.handleControllerSet(u.Controllers)
			continue
		case *segmeshv1.NetmapUpdate_Delta:
			if held == nil {
				return received, &resyncError{reason: fmt.Sprintf("delta to revision %d before any full netmap", u.Delta.GetPolicyRevision())}
			}
			if next, err = wire.ApplyDelta(held, u.Delta); err != nil {
				return received, &resyncError{reason: err.Error()}
			}
		default:
			return received, &resyncError{reason: "netmap update of a kind this agent does not know"}
		}
		held = next
		s.logConnected(received, url, ep)
		s.handleNetmap(ctx, next, !received)
		received = true
	}
	if err := stream.Err(); err != nil {
		return received, fmt.Errorf("netmap stream: %w", err)
	}
	return received, errors.New("netmap stream closed by the controller")
}

// syncFull runs one Sync stream (full netmaps only, from a controller older than
// deltas).
func (s *syncer) syncFull(ctx context.Context, client segmeshv1connect.AgentServiceClient, url string, req *segmeshv1.SyncRequest, ep netip.AddrPort) (bool, error) {
	stream, err := client.Sync(ctx, connect.NewRequest(req))
	if err != nil {
		return false, fmt.Errorf("opening netmap stream: %w", err)
	}
	defer stream.Close()
	received := false
	for stream.Receive() {
		s.logConnected(received, url, ep)
		s.handleNetmap(ctx, stream.Msg(), !received)
		received = true
	}
	if err := stream.Err(); err != nil {
		return received, fmt.Errorf("netmap stream: %w", err)
	}
	return received, errors.New("netmap stream closed by the controller")
}

// logConnected logs the first netmap of a stream from url (before is whether one
// came already) and stores url as the controller in use, so that a restart
// starts with the one that worked last.
func (s *syncer) logConnected(before bool, url string, ep netip.AddrPort) {
	if before {
		return
	}
	s.a.log.Info("connected to controller", "controller", url, "endpoint", ep)
	if err := s.a.saveIdentity(nil); err != nil {
		s.a.log.Warn("storing the controller URL in use; a restart starts with the previous one", "err", err)
	}
}

// handleNetmap validates, persists and applies one netmap, then reports when the
// report changed. After the first netmap of a stream (first) the next report is
// sent even when unchanged, so that a controller that just (re)connected learns
// the node's status; an apply wakes reportLoop too, and whichever report comes
// second is not sent again. An invalid netmap is rejected (and the
// rejection reported); the previous one stays in force.
// A revoked netmap puts the node at default deny (see enterRevoked); a netmap that
// asks for a key rotation wakes rotateLoop.
func (s *syncer) handleNetmap(ctx context.Context, pb *segmeshv1.Netmap, first bool) {
	a := s.a
	if first {
		s.reportMu.Lock()
		s.lastReport = nil
		s.reportMu.Unlock()
	}
	nm, err := netmap.Parse(pb)
	if err == nil && nm.Self.Name != a.id.NodeName {
		err = fmt.Errorf("netmap is for node %q, this node is %q", nm.Self.Name, a.id.NodeName)
	}
	s.mu.Lock()
	s.netmapErr = err
	s.mu.Unlock()
	if err != nil {
		a.log.Error("rejected netmap from the controller; keeping the previous one", "revision", pb.GetPolicyRevision(), "err", err)
		s.requestReport(true)
		return
	}
	if nm.Revoked {
		a.enterRevoked(ctx, pb, nm, "the controller sent a revoked netmap")
		return
	}
	a.netmapMu.Lock()
	if a.clearRevoked() {
		a.log.Warn("the controller sent a netmap for this node again; it is no longer revoked", "node", a.id.NodeName, "revision", nm.Revision)
	}
	cur := a.rec.Netmap()
	gen := uint64(0)
	if cur == nil || cur.Hash != nm.Hash || a.rec.Status().Err != nil {
		if err := a.dir.SaveNetmap(pb); err != nil {
			a.log.Error("storing netmap; a restart would apply an older one", "revision", nm.Revision, "err", err)
		}
		gen = a.rec.SetNetmap(nm)
	}
	a.netmapMu.Unlock()
	if gen != 0 {
		st, err := a.rec.Wait(ctx, gen)
		if err != nil {
			return
		}
		signal(a.gossipC)
		if st.Err != nil {
			a.log.Error("applying netmap failed", "revision", nm.Revision, "err", st.Err)
		}
	}
	signal(a.rotateC)
	s.requestReport(false)
}

// requestReport has reportLoop send a report (force: even when unchanged). The
// netmap stream does not report itself, so that a report stuck on a controller
// that went silent never keeps the stream from noticing its loss.
func (s *syncer) requestReport(force bool) {
	if force {
		s.forceReport.Store(true)
	}
	signal(s.a.reportC)
}

// checkRevoked puts the node at default deny when err is the controller saying that
// the node is revoked (see isRevokedError).
func (s *syncer) checkRevoked(ctx context.Context, err error) {
	if isRevokedError(err) {
		s.a.enterRevoked(ctx, nil, nil, "the controller refused a call: "+connectMessage(err))
	}
}

// reportLoop reports every resync interval, and whenever the reconcile status or the
// set of alive peers changes; when the local endpoint changed, it reconnects first
// (see errEndpointMoved), so that the report carrying the new endpoint leaves from
// the new address.
func (s *syncer) reportLoop(ctx context.Context) {
	t := time.NewTicker(s.a.opts.Resync)
	defer t.Stop()
	for {
		force := false
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			force = true
		case <-s.a.rec.Changed():
		case <-s.a.reportC:
			force = s.forceReport.Swap(false)
		case <-s.a.movedC:
			s.reconnect(errEndpointMoved)
		}
		s.report(ctx, force)
	}
}

// report sends the current status; unless force, only when it differs from the last
// report that reached the controller. The peers (endpoints, handshakes, byte
// counters) change all the time and do not count as a difference: every report
// carries them fresh, and the periodic one (force) keeps them current at the
// controller. A revoked node, or one whose certificate expired, does not report.
func (s *syncer) report(ctx context.Context, force bool) {
	s.reportMu.Lock()
	defer s.reportMu.Unlock()
	if s.a.isRevoked() || s.a.certificateExpired() {
		return
	}
	req := s.buildReport()
	if !force && s.lastReport != nil && proto.Equal(req, s.lastReport) {
		return
	}
	req.Peers, req.PeersMore = s.a.peers.report(s.a.rec.Netmap(), time.Now())
	client, rctx, cancel := s.call(ctx, 10*time.Second)
	defer cancel()
	if _, err := client.Report(rctx, connect.NewRequest(req)); err != nil {
		if ctx.Err() == nil {
			s.a.log.Debug("reporting status failed", "err", err)
			s.checkRevoked(ctx, err)
		}
		s.lastReport = nil
		return
	}
	s.a.flows.Ack(s.flowBatch) // only now: a failed report carries them again
	// The next report is compared without peers (see above) and without the flows
	// this one delivered, so that it is sent only when something else changed.
	req.Peers, req.PeersMore = nil, 0
	req.DeniedFlows, req.DeniedFlowsMore = nil, 0
	s.lastReport = req
}

func (s *syncer) buildReport() *segmeshv1.ReportRequest {
	st := s.a.rec.Status()
	var errs []string
	s.mu.Lock()
	if s.netmapErr != nil {
		errs = append(errs, "rejected netmap: "+s.netmapErr.Error())
	}
	s.mu.Unlock()
	if st.Err != nil {
		errs = append(errs, st.Err.Error())
	}
	s.flowBatch = s.a.flows.Pending()
	denied, deniedMore := deniedReport(s.flowBatch)
	req := &segmeshv1.ReportRequest{
		AppliedRevision: st.Revision,
		AppliedHash:     st.Hash,
		Dataplane:       string(st.Kind),
		Error:           strings.Join(errs, "; "),
		AlivePeers:      slices.Clone(s.a.alivePeers()),
		Endpoint:        s.a.advertisedEndpoint(),
		Candidates:      s.a.candidates(),
		InSync:          st.InSync,
		Drift:           driftReport(st),
		DeniedFlows:     denied,
		DeniedFlowsMore: deniedMore,
	}
	if !st.LastApply.IsZero() {
		req.LastApplyUnixMs = st.LastApply.UnixMilli()
		req.LastApplyDurationUs = st.LastApplyDuration.Microseconds()
	}
	return req
}

// driftReport is the wire form of the drift facts in st (already bounded by
// reconcile.Bound). The report changes, and is sent, whenever a repair happens or
// the unrepaired drift changes.
func driftReport(st reconcile.Status) *segmeshv1.Drift {
	d := &segmeshv1.Drift{
		Repairs:          st.Repairs.Count,
		LastRepaired:     wireDifferences(st.Repairs.Fixed),
		LastRepairedMore: uint32(min(st.Repairs.Fixed.More, math.MaxUint32)),
		Unrepaired:       wireDifferences(st.Unrepaired),
		UnrepairedMore:   uint32(min(st.Unrepaired.More, math.MaxUint32)),
	}
	if !st.Repairs.Last.IsZero() {
		d.LastRepairUnix = st.Repairs.Last.Unix()
	}
	return d
}

func wireDifferences(ds reconcile.Differences) []*segmeshv1.DriftDifference {
	out := make([]*segmeshv1.DriftDifference, 0, len(ds.Items))
	for _, d := range ds.Items {
		out = append(out, &segmeshv1.DriftDifference{Part: d.Part, Detail: d.Detail})
	}
	return out
}
