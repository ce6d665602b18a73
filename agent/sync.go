package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"segmesh/agent/enroll"
	"segmesh/agent/netmap"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// syncer holds the mutual-TLS connection to the controller: the netmap stream and
// the status reports.
type syncer struct {
	a      *agent
	hc     *http.Client
	client segmeshv1connect.AgentServiceClient

	mu         sync.Mutex
	netmapErr  error // why the latest netmap from the controller was rejected
	lastReport *segmeshv1.ReportRequest
	reportMu   sync.Mutex // serialises reports so that they arrive in order
}

func newSyncer(a *agent) (*syncer, error) {
	cert, pool, err := a.dir.ClientCertificate()
	if err != nil {
		return nil, err
	}
	hc := enroll.NewHTTPClient(&tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ServerName:   enroll.ServerName,
	})
	return &syncer{a: a, hc: hc, client: segmeshv1connect.NewAgentServiceClient(hc, a.id.Controller)}, nil
}

// close drops the idle connections to the controller.
func (s *syncer) close() { s.hc.CloseIdleConnections() }

// connectLoop keeps a Sync stream open until ctx ends, reconnecting with backoff
// (1 s doubling to 30 s, jittered; reset after a stream that delivered a netmap).
func (s *syncer) connectLoop(ctx context.Context) {
	bo := newBackoff(time.Second, 30*time.Second)
	for {
		received, err := s.syncOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		if received {
			bo.reset()
		}
		d := bo.next()
		s.a.log.Warn("controller stream ended; reconnecting", "controller", s.a.id.Controller, "err", err, "in", d.Round(time.Millisecond))
		if !sleep(ctx, d) {
			return
		}
	}
}

// syncOnce runs one Sync stream; it reports whether a netmap arrived.
func (s *syncer) syncOnce(ctx context.Context) (bool, error) {
	ep, err := s.a.currentEndpoint()
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := s.client.Sync(ctx, connect.NewRequest(&segmeshv1.SyncRequest{
		Endpoint:  ep.String(),
		Dataplane: string(s.a.dp.Kind()),
		Version:   Version,
		Interface: s.a.id.Interface,
	}))
	if err != nil {
		return false, fmt.Errorf("opening netmap stream: %w", err)
	}
	defer stream.Close()
	received := false
	for stream.Receive() {
		if !received {
			s.a.log.Info("connected to controller", "controller", s.a.id.Controller, "endpoint", ep)
		}
		received = true
		s.handleNetmap(ctx, stream.Msg())
	}
	if err := stream.Err(); err != nil {
		return received, fmt.Errorf("netmap stream: %w", err)
	}
	return received, errors.New("netmap stream closed by the controller")
}

// handleNetmap validates, persists and applies one netmap, then reports. An invalid
// netmap is rejected (and the rejection reported); the previous one stays in force.
func (s *syncer) handleNetmap(ctx context.Context, pb *segmeshv1.Netmap) {
	a := s.a
	nm, err := netmap.Parse(pb)
	if err == nil && nm.Self.Name != a.id.NodeName {
		err = fmt.Errorf("netmap is for node %q, this node is %q", nm.Self.Name, a.id.NodeName)
	}
	s.mu.Lock()
	s.netmapErr = err
	s.mu.Unlock()
	if err != nil {
		a.log.Error("rejected netmap from the controller; keeping the previous one", "revision", pb.GetPolicyRevision(), "err", err)
		s.report(ctx, true)
		return
	}
	cur := a.rec.Netmap()
	if cur == nil || cur.Hash != nm.Hash || a.rec.Status().Err != nil {
		if err := a.dir.SaveNetmap(pb); err != nil {
			a.log.Error("storing netmap; a restart would apply an older one", "revision", nm.Revision, "err", err)
		}
		st, err := a.rec.Wait(ctx, a.rec.SetNetmap(nm))
		if err != nil {
			return
		}
		signal(a.gossipC)
		if st.Err != nil {
			a.log.Error("applying netmap failed", "revision", nm.Revision, "err", st.Err)
		}
	}
	s.report(ctx, true)
}

// reportLoop reports every resync interval, and whenever the reconcile status or the
// set of alive peers changes.
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
		}
		s.report(ctx, force)
	}
}

// report sends the current status; unless force, only when it differs from the last
// report that reached the controller.
func (s *syncer) report(ctx context.Context, force bool) {
	s.reportMu.Lock()
	defer s.reportMu.Unlock()
	req := s.buildReport()
	if !force && s.lastReport != nil && proto.Equal(req, s.lastReport) {
		return
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := s.client.Report(rctx, connect.NewRequest(req)); err != nil {
		if ctx.Err() == nil {
			s.a.log.Debug("reporting status failed", "err", err)
		}
		s.lastReport = nil
		return
	}
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
	return &segmeshv1.ReportRequest{
		AppliedRevision: st.Revision,
		AppliedHash:     st.Hash,
		Dataplane:       string(st.Kind),
		Error:           strings.Join(errs, "; "),
		AlivePeers:      slices.Clone(s.a.alivePeers()),
	}
}
