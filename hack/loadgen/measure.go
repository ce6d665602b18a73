package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/jointoken"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/hack/internal/benchfig"
	"segmesh/hack/internal/ctlproc"
	"segmesh/hack/internal/procmem"
)

// enrollWorkers is how many enrollments run at once during the setup.
const enrollWorkers = 8

// simLabels are the labels the simulated agents' join token binds.
var simLabels = map[string]string{"role": "sim"}

// meshPolicy lets every simulated agent reach every other on tcp/port: a full
// mesh, every agent a peer of every other.
func meshPolicy(port int) string {
	return fmt.Sprintf(`version: 1
segments:
  - name: sim
    selectors: [{role: sim}]
rules:
  - name: mesh
    from: [sim]
    to: [sim]
    ports: [tcp/%d]
`, port)
}

// noPeersPolicy gives the simulated agents no peers: their only rule reaches an
// external CIDR segment on tcp/port.
func noPeersPolicy(port int) string {
	return fmt.Sprintf(`version: 1
segments:
  - name: sim
    selectors: [{role: sim}]
  - name: outside
    cidrs: [192.0.2.0/24]
rules:
  - name: out
    from: [sim]
    to: [outside]
    ports: [tcp/%d]
`, port)
}

// runner holds the controller, the operator client and the fleet for one run.
type runner struct {
	o     options
	log   *slog.Logger
	ctl   *ctlproc.Proc
	op    segmeshv1connect.OperatorServiceClient
	fleet *fleet
	tok   jointoken.Token
	date  string

	rev  uint64 // latest applied policy revision
	mesh bool   // the policy in force is a full mesh
	port int    // last rule port used, so that every apply changes the policy
	gen  int    // endpoint generation of agent 0
	figs []benchfig.Figure

	// extra holds the nodes the relabel and revoke scenarios enroll and then
	// take out of the mesh: not part of fleet, so that no later watch waits for
	// them and their streams, which the controller ends on revocation, are not
	// counted as failures.
	extra  *fleet
	extras int // extra nodes enrolled so far
}

func measure(ctx context.Context, o options, log *slog.Logger) ([]benchfig.Figure, error) {
	var extra []string
	if o.debugListen != "" {
		extra = []string{"--debug-listen", o.debugListen}
	}
	ctl, err := ctlproc.Start(ctx, o.bin, "loadgen", extra)
	if err != nil {
		return nil, err
	}
	defer ctl.Stop()
	r := &runner{o: o, log: log, ctl: ctl, op: operatorClient(ctl), date: time.Now().UTC().Format(time.RFC3339), port: 1000}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ctl.CAPEM)
	r.fleet = &fleet{log: log, url: ctl.URL.String(), pool: pool, verify: o.verify}
	defer r.fleet.close()
	r.extra = &fleet{log: slog.New(slog.DiscardHandler), url: ctl.URL.String(), pool: pool}
	defer r.extra.close()
	if err := r.setup(ctx); err != nil {
		return r.figs, fmt.Errorf("setup: %w; the controller's log ends with:\n%s", err, ctl.LogTail(15))
	}
	var errs []error
	for _, sc := range o.scenarios {
		if ctx.Err() != nil {
			break
		}
		log.Info("running scenario", "scenario", sc)
		var err error
		switch sc {
		case "mesh":
			if r.mesh {
				err = r.ensureNoPeers(ctx)
			}
			if err == nil {
				err = r.policyChange(ctx, sc, true)
			}
		case "policy":
			if err = r.ensureMesh(ctx); err == nil {
				err = r.policyChange(ctx, sc, true)
			}
		case "nopeers":
			err = r.policyChange(ctx, sc, false)
		case "join":
			err = r.join(ctx)
		case "endpoint":
			err = r.endpoint(ctx)
		case "relabel", "revoke":
			err = r.removeExtra(ctx, sc)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("scenario %s: %w", sc, err))
		}
	}
	if n := r.fleet.errs.Load(); n > 0 {
		errs = append(errs, fmt.Errorf("%d simulated agents' streams ended unexpectedly (-verbose shows why)", n))
	}
	if n := r.fleet.resyncs.Load(); n > 0 {
		errs = append(errs, fmt.Errorf("%d times a simulated agent asked for a full netmap because an update did not apply: the controller sent a wrong delta (-verbose shows the reasons)", n))
	}
	return r.figs, errors.Join(append(errs, ctx.Err())...)
}

// operatorClient is an OperatorService client with the admin bearer token.
func operatorClient(ctl *ctlproc.Proc) segmeshv1connect.OperatorServiceClient {
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: ctl.TLS.Clone(), ForceAttemptHTTP2: true}}
	auth := connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			req.Header().Set("Authorization", "Bearer "+ctl.Token)
			return next(ctx, req)
		}
	})
	return segmeshv1connect.NewOperatorServiceClient(hc, ctl.URL.String(), connect.WithInterceptors(auth))
}

func (r *runner) add(scenario, name string, v float64, unit string) {
	r.figs = append(r.figs, benchfig.Figure{Driver: "loadgen", Scenario: scenario, Figure: name, Value: v, Unit: unit,
		Agents: r.o.agents, Conditions: conditions(r.o), Command: r.o.command, Date: r.date})
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// apply applies yaml and returns how long the call took.
func (r *runner) apply(ctx context.Context, yaml string, mesh bool) (time.Duration, error) {
	start := time.Now()
	resp, err := r.op.ApplyPolicy(ctx, connect.NewRequest(&segmeshv1.ApplyPolicyRequest{Filename: "loadgen.yaml", Content: []byte(yaml)}))
	d := time.Since(start)
	if err != nil {
		return d, fmt.Errorf("applying the policy: %w", err)
	}
	r.rev, r.mesh = resp.Msg.GetRevision(), mesh
	return d, nil
}

func (r *runner) nextPolicy(mesh bool) string {
	r.port++
	if mesh {
		return meshPolicy(r.port)
	}
	return noPeersPolicy(r.port)
}

// setup applies the no-peers policy, creates a reusable join token, enrolls the
// agents (enrollWorkers at a time) and opens their streams, and waits until each
// received its first netmap.
func (r *runner) setup(ctx context.Context) error {
	if _, err := r.apply(ctx, r.nextPolicy(false), false); err != nil {
		return err
	}
	resp, err := r.op.CreateToken(ctx, connect.NewRequest(&segmeshv1.CreateTokenRequest{Labels: simLabels, Reusable: true, TtlSeconds: 24 * 3600}))
	if err != nil {
		return fmt.Errorf("creating a join token: %w", err)
	}
	if r.tok, err = jointoken.Decode(resp.Msg.GetToken()); err != nil {
		return fmt.Errorf("decoding the join token: %w", err)
	}
	f := r.fleet
	n := r.o.agents
	f.agents = make([]*simAgent, n)
	w := newWatch(n, func(update) bool { return true })
	f.watch.Store(w)
	cpu0, _ := procmem.CPU(r.ctl.PID())
	var next atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, enrollWorkers)
	for range enrollWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				a, err := f.enrollAgent(ctx, r.tok, i)
				if err != nil {
					errc <- err
					next.Store(int64(n))
					return
				}
				f.agents[i] = a
				f.start(ctx, a)
				if (i+1)%500 == 0 {
					r.log.Info("enrolled", "agents", i+1)
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		f.agents = compact(f.agents)
		return err
	}
	enrolled := time.Since(w.start)
	_, missing := w.wait(ctx, r.o.timeout)
	if missing > 0 {
		return fmt.Errorf("%d of %d agents got no netmap within %s", missing, n, r.o.timeout)
	}
	cpu1, _ := procmem.CPU(r.ctl.PID())
	r.add("setup", "enroll every agent", ms(enrolled), "ms")
	r.add("setup", "enroll and first netmap, every agent", ms(time.Since(w.start)), "ms")
	r.add("setup", "controller CPU", (cpu1 - cpu0).Seconds(), "s")
	if m, err := procmem.Read(r.ctl.PID()); err == nil {
		r.add("setup", "controller RSS after setup", float64(m.RSS), "B")
	}
	if m, err := procmem.Read(os.Getpid()); err == nil {
		r.add("setup", "load generator RSS after setup", float64(m.RSS), "B")
	}
	if r.o.memProf != "" {
		if err := writeHeapProfile(r.o.memProf); err != nil {
			return err
		}
	}
	return nil
}

// compact drops the nil entries of agents that were never enrolled.
func compact(agents []*simAgent) []*simAgent {
	var out []*simAgent
	for _, a := range agents {
		if a != nil {
			out = append(out, a)
		}
	}
	return out
}

// change measures one change: do makes it; every agent's netmap is checked
// against match until all satisfy it (or -timeout); then the controller's status
// is polled until it shows every node converged.
func (r *runner) change(ctx context.Context, scenario string, match func(update) bool, do func() error) error {
	pid := r.ctl.PID()
	for _, p := range []int{pid, os.Getpid()} {
		if err := procmem.ResetHWM(p); err != nil {
			r.log.Warn("peak RSS covers the whole run", "err", err)
		}
	}
	bytes0 := r.fleet.snapshotBytes()
	mem0, err := procmem.Read(pid)
	if err != nil {
		return err
	}
	cpu0, err := procmem.CPU(pid)
	if err != nil {
		return err
	}
	self0, _ := procmem.CPU(os.Getpid())
	w := newWatch(len(r.fleet.agents), match)
	r.fleet.watch.Store(w)
	if err := do(); err != nil {
		return err
	}
	lat, missing := w.wait(ctx, r.o.timeout)
	cpu1, err := procmem.CPU(pid)
	if err != nil {
		return err
	}
	self1, _ := procmem.CPU(os.Getpid())
	deltas := byteDeltas(bytes0, r.fleet.snapshotBytes())
	conv, convErr := r.waitStatusConverged(ctx, w.start)
	r.add(scenario, "delivery p50", ms(percentile(lat, 50)), "ms")
	r.add(scenario, "delivery p99", ms(percentile(lat, 99)), "ms")
	r.add(scenario, "delivery max", ms(percentile(lat, 100)), "ms")
	r.add(scenario, "agents reached", float64(len(lat)), "agents")
	r.add(scenario, "bytes to each agent p50", float64(percentile(deltas, 50)), "B")
	r.add(scenario, "bytes to each agent p99", float64(percentile(deltas, 99)), "B")
	var sizes []int64 // of the agents that know the size of the netmap they hold
	for _, a := range r.fleet.agents {
		if n := a.size.Load(); n >= 0 {
			sizes = append(sizes, n)
		}
	}
	if len(sizes) > 0 {
		r.add(scenario, "netmap size after, uncompressed, p50", float64(percentile(sizes, 50)), "B")
	}
	r.add(scenario, "controller CPU", (cpu1 - cpu0).Seconds(), "s")
	r.add(scenario, "load generator CPU (same machine)", (self1 - self0).Seconds(), "s")
	if convErr == nil {
		r.add(scenario, "status shows every node converged", ms(conv), "ms")
	}
	r.add(scenario, "controller RSS before", float64(mem0.RSS), "B")
	if m, err := procmem.Read(pid); err == nil {
		r.add(scenario, "controller peak RSS", float64(m.HWM), "B")
		if convErr == nil {
			r.add(scenario, "controller RSS after, converged", float64(m.RSS), "B")
		}
	}
	if m, err := procmem.Read(os.Getpid()); err == nil {
		r.add(scenario, "load generator peak RSS", float64(m.HWM), "B")
	}
	var errs []error
	if missing > 0 {
		errs = append(errs, fmt.Errorf("%d of %d agents did not get the change within %s", missing, len(w.at), r.o.timeout))
	}
	return errors.Join(append(errs, convErr)...)
}

// waitStatusConverged polls Status every 100 ms (so the figure is that coarse)
// until every active node's applied hash equals its desired hash, and returns the
// time since start.
func (r *runner) waitStatusConverged(ctx context.Context, start time.Time) (time.Duration, error) {
	deadline := time.Now().Add(r.o.timeout)
	var last string
	for {
		resp, err := r.op.Status(ctx, connect.NewRequest(&segmeshv1.StatusRequest{}))
		if err == nil {
			behind := 0
			for _, n := range resp.Msg.GetNodes() {
				if n.GetState() == "active" && n.GetAppliedHash() != n.GetDesiredHash() {
					behind++
				}
			}
			if behind == 0 {
				return time.Since(start), nil
			}
			last = fmt.Sprintf("%d nodes not converged", behind)
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return 0, fmt.Errorf("status did not show every node converged within %s: %s", r.o.timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// policyChange applies a full-mesh (mesh) or no-peers policy and measures it.
func (r *runner) policyChange(ctx context.Context, scenario string, mesh bool) error {
	prev := r.rev
	yaml := r.nextPolicy(mesh)
	return r.change(ctx, scenario, func(u update) bool { return u.revision > prev }, func() error {
		d, err := r.apply(ctx, yaml, mesh)
		if err == nil {
			r.add(scenario, "policy apply returns", ms(d), "ms")
		}
		return err
	})
}

// ensureMesh puts a full-mesh policy in force (unless it is) and waits until every
// agent has it; not measured.
func (r *runner) ensureMesh(ctx context.Context) error {
	if r.mesh {
		return nil
	}
	return r.putPolicy(ctx, true)
}

// ensureNoPeers puts the no-peers policy in force (unless it is) and waits until
// every agent has it; not measured.
func (r *runner) ensureNoPeers(ctx context.Context) error {
	if !r.mesh {
		return nil
	}
	return r.putPolicy(ctx, false)
}

// putPolicy applies the full-mesh (mesh) or no-peers policy and waits until every
// agent has it; not measured.
func (r *runner) putPolicy(ctx context.Context, mesh bool) error {
	prev := r.rev
	w := newWatch(len(r.fleet.agents), func(u update) bool { return u.revision > prev })
	r.fleet.watch.Store(w)
	if _, err := r.apply(ctx, r.nextPolicy(mesh), mesh); err != nil {
		return err
	}
	if _, missing := w.wait(ctx, r.o.timeout); missing > 0 {
		return fmt.Errorf("%d agents did not get the new policy within %s", missing, r.o.timeout)
	}
	return nil
}

// join enrolls one more node under the full-mesh policy and measures until every
// existing agent lists it as a peer.
func (r *runner) join(ctx context.Context) error {
	if err := r.ensureMesh(ctx); err != nil {
		return err
	}
	idx := len(r.fleet.agents)
	name := fmt.Sprintf("sim-%d", idx)
	var added *simAgent
	err := r.change(ctx, "join", func(u update) bool { return u.lists(name, "") }, func() error {
		a, err := r.fleet.enrollAgent(ctx, r.tok, idx)
		if err != nil {
			return err
		}
		added = a
		r.fleet.start(ctx, a)
		return nil
	})
	if added != nil {
		r.fleet.agents = append(r.fleet.agents, added)
	}
	return err
}

// endpoint reopens agent 0's stream with a new endpoint and measures until every
// agent has it (agent 0 in its own netmap, the others for their peer).
func (r *runner) endpoint(ctx context.Context) error {
	if err := r.ensureMesh(ctx); err != nil {
		return err
	}
	a := r.fleet.agents[0]
	r.gen++
	ep := simEndpoint(0, r.gen)
	match := func(u update) bool {
		if u.self.GetName() == a.name {
			return u.self.GetEndpoint() == ep
		}
		return u.lists(a.name, ep)
	}
	return r.change(ctx, "endpoint", match, func() error {
		a.endpoint.Store(&ep)
		r.fleet.start(ctx, a)
		return nil
	})
}

// extraIndex is the index of the first extra node (names sim-50000, ...; their
// endpoints stay inside 198.18.0.0/15 for up to 20,000 agents and 81,072 extras).
const extraIndex = 50000

// removeExtra runs the relabel or revoke scenario: under the full-mesh policy one
// extra node enrolls and every agent gets it as a peer (not measured); then it is
// relabeled out of the mesh (relabel) or revoked (revoke), measured until no
// agent lists it any more.
func (r *runner) removeExtra(ctx context.Context, scenario string) error {
	if err := r.ensureMesh(ctx); err != nil {
		return err
	}
	idx := extraIndex + r.extras
	r.extras++
	w := newWatch(len(r.fleet.agents), func(u update) bool { return u.lists(fmt.Sprintf("sim-%d", idx), "") })
	r.fleet.watch.Store(w)
	a, err := r.extra.enrollAgent(ctx, r.tok, idx)
	if err != nil {
		return err
	}
	r.extra.agents = append(r.extra.agents, a)
	r.extra.start(ctx, a)
	if _, missing := w.wait(ctx, r.o.timeout); missing > 0 {
		return fmt.Errorf("%d agents did not list the extra node %s within %s", missing, a.name, r.o.timeout)
	}
	return r.change(ctx, scenario, func(u update) bool { return u.drops(a.name) }, func() error {
		var err error
		if scenario == "revoke" {
			_, err = r.op.RevokeNode(ctx, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: a.name}))
		} else {
			_, err = r.op.LabelNode(ctx, connect.NewRequest(&segmeshv1.LabelNodeRequest{Name: a.name, Set: map[string]string{"role": "sim-out"}}))
		}
		if err != nil {
			return fmt.Errorf("%s of node %s: %w", scenario, a.name, err)
		}
		return nil
	})
}

// writeHeapProfile writes the load generator's heap profile (after a GC) to path.
func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("creating the heap profile: %w", err)
	}
	runtime.GC()
	err = pprof.WriteHeapProfile(f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing the heap profile %s: %w", path, err)
	}
	return nil
}
