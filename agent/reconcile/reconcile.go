// Package reconcile keeps the kernel dataplane equal to the desired state derived
// from the node's netmap and the peer endpoints learned by gossip.
//
// One goroutine (Reconciler.Run) does all kernel work. Triggers — a new netmap, new
// endpoints, a dataplane watch event, the periodic resync tick — are coalesced: many
// triggers while a step runs cause one more step. A step applies the desired state
// when it changed (or the last step failed), and otherwise reads the dataplane back
// and re-applies when it drifted (a drift repair, counted in Status.Repairs).
//
// In sync means read back: a step ends with Status.InSync true only when its last
// read-back found the kernel holding exactly the desired state. A step that applies
// therefore reads back once after the apply to confirm it. That costs one
// read-back per apply (little when the dataplane can tell that the kernel did not
// change since its own batch, as the nftables ruleset generation tells); it does
// not delay the change itself, which is in the kernel before the read starts
// (Wait returns after the read, though), and without it
// SYNC would say "in sync" on the strength of an Apply that returned nil rather
// than of what the kernel holds. When the confirming read finds differences (the
// kernel changed again right after the apply, or the dataplane cannot hold the
// state), they are shown as Status.Unrepaired and repaired by the next step (a
// watch event or the resync tick), not at once, so that a state the kernel never
// holds cannot make the reconciler spin.
package reconcile

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"segmesh/agent/dataplane"
	"segmesh/agent/netmap"
)

// PersistentKeepalive is the keepalive, in seconds, programmed for every peer so that
// NAT mappings and liveness survive idle periods.
const PersistentKeepalive = 25

// Local is the node-local part of the desired state. Only the private key changes
// during the agent's lifetime (Reconciler.SetPrivateKey, after a key rotation).
type Local struct {
	Interface  string
	PrivateKey dataplane.Key
	ListenPort int
	// MTU in bytes; see dataplane.State.MTU.
	MTU int
	// Addresses and Routes from enrollment, used when no netmap is known (default
	// deny) or when the netmap leaves them empty.
	Addresses []netip.Prefix
	Routes    []netip.Prefix
}

// Desired returns the canonical dataplane state for nm. A nil nm yields default deny:
// the interface with its addresses and routes, no peers and an empty filter; so
// does a revoked nm (its addresses and routes apply).
//
// endpoints maps a WireGuard public key to an endpoint learned by gossip. An entry
// only replaces the endpoint of a peer that nm already lists; entries for other keys
// are ignored, so gossip can never add a peer or change allowed IPs.
func Desired(l Local, nm *netmap.Netmap, endpoints map[dataplane.Key]netip.AddrPort) dataplane.State {
	s := dataplane.State{
		Interface:  l.Interface,
		PrivateKey: l.PrivateKey,
		ListenPort: l.ListenPort,
		MTU:        l.MTU,
		Addresses:  l.Addresses,
		Routes:     l.Routes,
	}
	if nm == nil {
		return dataplane.Canonical(s)
	}
	if len(nm.Self.Addresses) > 0 {
		s.Addresses = nm.Self.Addresses
	}
	if len(nm.OverlayPrefixes) > 0 {
		s.Routes = nm.OverlayPrefixes
	}
	if nm.Revoked {
		return dataplane.Canonical(s)
	}
	for _, p := range nm.Peers {
		ep := p.Endpoint
		if o, ok := endpoints[p.PublicKey]; ok && o.IsValid() {
			ep = o
		}
		s.Peers = append(s.Peers, dataplane.Peer{
			PublicKey:           p.PublicKey,
			Endpoint:            ep,
			AllowedIPs:          slices.Clone(p.AllowedIPs),
			PersistentKeepalive: PersistentKeepalive,
		})
	}
	s.Filter = nm.Filter
	return dataplane.Canonical(s)
}

// Status is the outcome of the latest reconcile step.
type Status struct {
	// Generation is the desired-state generation the latest step worked on; it
	// grows with every SetNetmap and every effective SetEndpoints.
	Generation uint64
	// Revision and Hash identify the netmap the dataplane enforces (zero and "" for
	// default deny). They change when a step finds the kernel holding the netmap's
	// desired state: after a successful apply, or after a read-back when the state
	// already in force is what the new netmap asks for (then nothing is applied).
	// A failed apply or read-back keeps the previous values.
	Revision uint64
	Hash     string
	// Programmed is true once an apply has succeeded.
	Programmed bool
	// InSync is true when the latest step's last read-back found the kernel equal
	// to the desired state (see the package documentation: an apply is followed by
	// a read-back). It is false after a failed apply or read-back (Err says why),
	// and while Unrepaired lists differences.
	InSync bool
	// Err is the latest apply or read error; nil once a later step succeeds.
	Err error
	// Unrepaired lists, bounded, the drift that read-backs found and no apply has
	// repaired yet: the apply after the read-back failed (then Err is set), or the
	// read-back confirming an apply found it. Empty when InSync. The next
	// successful apply counts as its repair.
	Unrepaired Differences
	// Repairs are the drift repairs since New.
	Repairs Repairs
	// LastApply is the wall-clock time the latest successful apply (a step that
	// changed the kernel: a new desired state, a drift repair or a retry after a
	// failure) finished; zero before the first one. LastApplyDuration is how long
	// that apply's Dataplane.Apply call took (the confirming read-back excluded).
	LastApply         time.Time
	LastApplyDuration time.Duration
	// Kind is the dataplane's WireGuard kind.
	Kind dataplane.Kind
}

// Repairs counts drift repairs: successful applies that restored drift a read-back
// had found (the kernel differing from the state the reconciler applied last), in
// the same step or, when that apply failed, in a later one.
type Repairs struct {
	// Count is the number of repairs since the reconciler was created.
	Count uint64
	// Last is the wall-clock time the latest repair's apply succeeded; zero when
	// Count is 0.
	Last time.Time
	// Fixed is what the latest repair restored, bounded.
	Fixed Differences
}

// Bounds of a Differences list: what an agent reports and logs stays small even
// when, say, a set of 200,000 prefixes was flushed.
const (
	// MaxDifferences is the most items a Differences list keeps.
	MaxDifferences = 8
	// MaxDifferenceBytes bounds the sum of len(Part)+len(Detail) over the items.
	MaxDifferenceBytes = 1024
	// MaxDetailBytes bounds one Detail, the "…" that marks a cut included.
	MaxDetailBytes = 256
)

// Differences is a bounded list of dataplane differences: at most MaxDifferences
// items of at most MaxDifferenceBytes in all, each Detail cut to MaxDetailBytes;
// More counts the differences left out.
type Differences struct {
	Items []dataplane.Difference
	More  int
}

// Bound returns the first differences of ds that fit the bounds, in order, and
// how many were left out. Bound(nil) is the zero Differences.
func Bound(ds []dataplane.Difference) Differences {
	var out Differences
	size := 0
	for i, d := range ds {
		d.Detail = cut(d.Detail, MaxDetailBytes)
		n := len(d.Part) + len(d.Detail)
		if len(out.Items) == MaxDifferences || size+n > MaxDifferenceBytes {
			out.More = len(ds) - i
			break
		}
		out.Items = append(out.Items, d)
		size += n
	}
	return out
}

// Len is the number of differences, those left out included.
func (d Differences) Len() int { return len(d.Items) + d.More }

// String joins the items as "part: detail; part: detail", followed by
// "; … and N more" when some were left out; "" when there are none.
func (d Differences) String() string {
	parts := make([]string, 0, len(d.Items)+1)
	for _, it := range d.Items {
		parts = append(parts, it.String())
	}
	if d.More > 0 {
		parts = append(parts, fmt.Sprintf("… and %d more", d.More))
	}
	return strings.Join(parts, "; ")
}

// cut shortens s to at most max bytes, ending in "…" when it was cut, without
// splitting a UTF-8 sequence.
func cut(s string, max int) string {
	const ellipsis = "…"
	if len(s) <= max {
		return s
	}
	return strings.ToValidUTF8(s[:max-len(ellipsis)], "") + ellipsis
}

// Reconciler drives one dataplane. Create it with New, start Run once, and feed it
// with SetNetmap, SetEndpoints and Trigger from any goroutine.
type Reconciler struct {
	dp  dataplane.Dataplane
	log *slog.Logger

	trigger chan struct{}

	mu        sync.Mutex
	local     Local
	gen       uint64
	nm        *netmap.Netmap
	endpoints map[dataplane.Key]netip.AddrPort
	status    Status
	changed   chan struct{} // closed and replaced whenever status changes

	now func() time.Time // the clock of Repairs.Last and LastApply; tests replace it before Run
	obs Observer         // set before Run; nil: none

	// owned by the Run goroutine
	lastDesired *dataplane.State
	roam        roaming // peers' roamed endpoints adopted from the device
	// pending is the drift a read-back found that no apply has repaired yet (the
	// apply failed, or the read-back confirming an apply found it); the next
	// successful apply counts as its repair.
	pending Differences
}

// New returns a reconciler for dp; logger may be nil for slog.Default().
func New(dp dataplane.Dataplane, local Local, logger *slog.Logger) *Reconciler {
	if logger == nil {
		logger = slog.Default()
	}
	return &Reconciler{
		dp:      dp,
		local:   local,
		log:     logger,
		trigger: make(chan struct{}, 1),
		changed: make(chan struct{}),
		now:     time.Now,
	}
}

// Observer is told of a Reconciler's kernel calls as they happen, for metrics.
// Its methods run on the Run goroutine and must return quickly.
type Observer interface {
	// Applied reports a successful Apply that took took; repaired is the drift
	// it restored, counted in Status.Repairs (empty when it repaired none).
	Applied(took time.Duration, repaired Differences)
	// Observed reports the result of a successful Read.
	Observed(o dataplane.Observed)
}

// SetObserver makes o receive the reconciler's events; call it before Run.
func (r *Reconciler) SetObserver(o Observer) { r.obs = o }

// SetNetmap makes nm (nil for default deny) the desired netmap and triggers a step.
// It returns the generation to pass to Wait.
func (r *Reconciler) SetNetmap(nm *netmap.Netmap) uint64 {
	r.mu.Lock()
	r.gen++
	r.nm = nm
	g := r.gen
	r.mu.Unlock()
	r.Trigger()
	return g
}

// SetPrivateKey makes k the WireGuard private key of the desired state (after a key
// rotation) and triggers a step; peers, addresses and the filter stay as they are,
// so the dataplane changes only the device's key. It returns the generation to
// pass to Wait.
func (r *Reconciler) SetPrivateKey(k dataplane.Key) uint64 {
	r.mu.Lock()
	r.gen++
	r.local.PrivateKey = k
	g := r.gen
	r.mu.Unlock()
	r.Trigger()
	return g
}

// Netmap returns the desired netmap (nil for default deny). It must not be modified.
func (r *Reconciler) Netmap() *netmap.Netmap {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nm
}

// SetEndpoints replaces the gossip-learned endpoints (public key -> underlay
// address). When they differ from the previous ones it triggers a step and returns
// the new generation and true.
func (r *Reconciler) SetEndpoints(eps map[dataplane.Key]netip.AddrPort) (uint64, bool) {
	r.mu.Lock()
	if maps.Equal(eps, r.endpoints) {
		g := r.gen
		r.mu.Unlock()
		return g, false
	}
	r.endpoints = maps.Clone(eps)
	r.gen++
	g := r.gen
	r.mu.Unlock()
	r.Trigger()
	return g, true
}

// Trigger asks for a step (read back, repair drift). It never blocks.
func (r *Reconciler) Trigger() {
	select {
	case r.trigger <- struct{}{}:
	default:
	}
}

// Status returns the outcome of the latest step.
func (r *Reconciler) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// Wait blocks until a step has worked on generation gen or later, and returns that
// step's status. It returns ctx's error when ctx ends first.
func (r *Reconciler) Wait(ctx context.Context, gen uint64) (Status, error) {
	for {
		r.mu.Lock()
		st, ch := r.status, r.changed
		r.mu.Unlock()
		if st.Generation >= gen {
			return st, nil
		}
		select {
		case <-ctx.Done():
			return st, ctx.Err()
		case <-ch:
		}
	}
}

// Changed returns a channel that is closed at the next status change.
func (r *Reconciler) Changed() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.changed
}

// Run performs steps on every trigger, every dataplane watch event (when the
// dataplane implements dataplane.Watcher) and every resync interval, until ctx ends. It must
// be called once.
func (r *Reconciler) Run(ctx context.Context, resync time.Duration) {
	t := time.NewTicker(resync)
	defer t.Stop()
	var events <-chan struct{}
	if w, ok := r.dp.(dataplane.Watcher); ok {
		ch, err := w.Watch(ctx)
		if err != nil {
			r.log.Warn("watching the dataplane failed; relying on periodic resync", "err", err, "resync", resync)
		} else {
			events = ch
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.trigger:
		case <-t.C:
		case _, ok := <-events:
			if !ok {
				if ctx.Err() == nil {
					r.log.Warn("dataplane watch ended; relying on periodic resync", "resync", resync)
				}
				events = nil
				continue
			}
		}
		r.step(ctx)
	}
}

// step brings the kernel to the desired state (see the package documentation) and
// records the outcome. When ctx ends during a kernel call it returns without a new
// status.
func (r *Reconciler) step(ctx context.Context) {
	r.mu.Lock()
	gen, nm, eps, local := r.gen, r.nm, r.endpoints, r.local
	prev := r.status
	r.mu.Unlock()

	next := prev
	next.Generation = gen
	base := Desired(local, nm, eps)
	r.roam.track(base, r.now())
	desired := r.roam.apply(base)
	needApply := prev.Err != nil || r.lastDesired == nil || !dataplane.Equal(*r.lastDesired, desired)
	drift := r.pending
	if !needApply {
		observed, err := r.dp.Read(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			r.log.Warn("reading dataplane back failed", "err", err)
			r.setStatus(failed(next, fmt.Errorf("reading dataplane: %w", err), r.pending))
			return
		}
		if r.obs != nil {
			r.obs.Observed(observed)
		}
		if r.roam.observe(observed, r.now()) {
			// A peer roamed (or its roaming ended): the desired state follows.
			desired = r.roam.apply(base)
			needApply = true
			r.logRoaming(base, observed)
		}
		drift = Bound(r.roam.adoptedDrift(observed.Drift, observed))
		r.pending = drift
		if drift.Len() == 0 && !needApply {
			// The kernel already holds what nm asks for (for example a netmap without
			// peers or rules after default deny): nm is enforced without a change.
			if !sameNetmap(prev, nm) {
				r.log.Info("enforcing netmap; the dataplane already holds its state", "revision", revisionOf(nm), "hash", hashOf(nm))
			}
			next.Revision, next.Hash = revisionOf(nm), hashOf(nm)
			r.setStatus(inSync(next))
			return
		}
	}
	applyStart := time.Now()
	if err := r.dp.Apply(ctx, desired); err != nil {
		if ctx.Err() != nil {
			return
		}
		r.log.Error("applying dataplane state failed", "err", err, "revision", revisionOf(nm))
		r.lastDesired = nil
		r.setStatus(failed(next, err, drift))
		return
	}
	took := time.Since(applyStart)
	r.pending = Differences{}
	next.LastApply, next.LastApplyDuration = r.now(), took
	if r.obs != nil {
		r.obs.Applied(took, drift)
	}
	if drift.Len() > 0 {
		next.Repairs = Repairs{Count: prev.Repairs.Count + 1, Last: r.now(), Fixed: drift}
		r.log.Warn("drift repaired", "interface", desired.Interface, "repairs", next.Repairs.Count, "diff", drift.String())
	}
	if r.lastDesired == nil || !sameNetmap(prev, nm) {
		if nm == nil {
			r.log.Info("applied default deny", "interface", desired.Interface, "kind", r.dp.Kind())
		} else {
			r.log.Info("applied netmap", "revision", nm.Revision, "hash", nm.Hash, "peers", len(desired.Peers), "kind", r.dp.Kind())
		}
	}
	r.lastDesired = &desired
	next.Revision, next.Hash, next.Programmed = revisionOf(nm), hashOf(nm), true

	// Confirm the apply by reading back (see the package documentation).
	observed, err := r.dp.Read(ctx)
	if err == nil && r.obs != nil {
		r.obs.Observed(observed)
	}
	switch {
	case err != nil:
		if ctx.Err() != nil {
			return
		}
		r.log.Warn("reading dataplane back after the apply failed", "err", err)
		next = failed(next, fmt.Errorf("reading dataplane back after the apply: %w", err), Differences{})
	default:
		if r.roamedMeanwhile(base, observed) {
			// A peer roamed, or its roaming ended, while this step applied: the
			// next step makes that the desired state.
			r.Trigger()
		}
		r.pending = Bound(r.roam.adoptedDrift(observed.Drift, observed))
		if r.pending.Len() == 0 {
			next = inSync(next)
			break
		}
		next.InSync, next.Err, next.Unrepaired = false, nil, r.pending
		r.log.Warn("the dataplane differs from the state just applied; repairing at the next watch event or resync",
			"interface", desired.Interface, "diff", next.Unrepaired.String())
	}
	r.setStatus(next)
}

// roamedMeanwhile updates the adoptions from the read-back confirming an apply
// and reports whether they changed (then it logs them).
func (r *Reconciler) roamedMeanwhile(base dataplane.State, o dataplane.Observed) bool {
	if !r.roam.observe(o, r.now()) {
		return false
	}
	r.logRoaming(base, o)
	return true
}

// logRoaming logs the peers whose adopted endpoint (see roaming) differs from
// the desired one of base, and those whose adoption ended.
func (r *Reconciler) logRoaming(base dataplane.State, o dataplane.Observed) {
	for _, p := range base.Peers {
		ep, adopted := r.roam.adopted[p.PublicKey]
		dev := deviceEndpoint(o.State, p.PublicKey)
		switch {
		case adopted:
			r.log.Info("peer roamed: keeping the endpoint its handshake came from", "peer", dataplane.KeyString(p.PublicKey),
				"endpoint", ep, "desired", p.Endpoint, "handshake", o.PeerStats[p.PublicKey].LastHandshake)
		case p.Endpoint.IsValid() && dev.IsValid() && dev != p.Endpoint:
			r.log.Info("peer endpoint not proven by a recent handshake; the desired one applies", "peer", dataplane.KeyString(p.PublicKey),
				"device", dev, "desired", p.Endpoint, "handshake", o.PeerStats[p.PublicKey].LastHandshake)
		}
	}
}

// inSync returns st for a step whose last read-back found no difference.
func inSync(st Status) Status {
	st.InSync, st.Err, st.Unrepaired = true, nil, Differences{}
	return st
}

// failed returns st for a step that ended with err; drift is the drift found by
// read-backs and not repaired yet.
func failed(st Status, err error, drift Differences) Status {
	st.InSync, st.Err, st.Unrepaired = false, err, drift
	return st
}

func sameNetmap(st Status, nm *netmap.Netmap) bool {
	if nm == nil {
		return st.Hash == "" && st.Programmed
	}
	return st.Hash == nm.Hash
}

func revisionOf(nm *netmap.Netmap) uint64 {
	if nm == nil {
		return 0
	}
	return nm.Revision
}

func hashOf(nm *netmap.Netmap) string {
	if nm == nil {
		return ""
	}
	return nm.Hash
}

func (r *Reconciler) setStatus(st Status) {
	st.Kind = r.dp.Kind()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.status = st
	close(r.changed)
	r.changed = make(chan struct{})
}
