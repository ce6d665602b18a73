// Package fake is an in-memory dataplane.Dataplane for tests of the logic above the
// kernel seam. It records state, not calls: Apply stores dataplane.Canonical of what
// it is given and Read returns it, so a test asserts on what the "kernel" holds.
// Tests can inject drift (Mutate), failures (FailApply, FailRead) and watch events
// (Notify), as the Linux dataplane's netlink/nftables monitor would produce them.
package fake

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"

	"segmesh/agent/dataplane"
)

// Dataplane is an in-memory dataplane. The zero value is not usable; use New.
// All methods are safe for concurrent use.
type Dataplane struct {
	kind dataplane.Kind

	mu       sync.Mutex
	state    dataplane.State
	applied  *dataplane.State // the last state Apply stored; nil before and after Down
	up       bool             // the interface "exists"
	applyErr error
	readErr  error
	applies  int
	reads    int
	downs    int
	closed   bool
	history  []dataplane.State
	watchers []chan struct{}
	onApply  func(dataplane.State)
	// denied is what ReadDenied returns while the table exists.
	denied    dataplane.Denied
	deniedErr error
	stats     map[dataplane.Key]dataplane.PeerStats // SetPeerStats
	binding   func(ctx context.Context, dst netip.AddrPort) (netip.AddrPort, error)
}

// New returns an empty fake (no interface, no table) that reports kind after Apply.
func New(kind dataplane.Kind) *Dataplane {
	return &Dataplane{kind: kind}
}

// Apply stores Canonical(s). Like the Linux dataplane it refuses a state that fails
// s.Validate (what the kernel refuses or would silently change), returning
// "invalid state: ..." and keeping the previous state; it also returns the error
// injected with FailApply, keeping the previous state (all or nothing).
func (d *Dataplane) Apply(ctx context.Context, s dataplane.State) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.Validate(); err != nil {
		return fmt.Errorf("invalid state: %w", err)
	}
	d.mu.Lock()
	if d.applyErr != nil {
		err := d.applyErr
		d.mu.Unlock()
		return err
	}
	c := dataplane.Canonical(s)
	d.state = c
	d.applied = &c
	d.up = true
	d.applies++
	d.history = append(d.history, dataplane.Canonical(c))
	hook := d.onApply
	d.mu.Unlock()
	if hook != nil {
		hook(dataplane.Canonical(c))
	}
	return nil
}

// Read returns a deep copy of the stored state (the zero State when nothing was
// applied or after Down) with its differences from the last applied state (nil
// before the first Apply and after Down); or the error injected with FailRead.
func (d *Dataplane) Read(ctx context.Context) (dataplane.Observed, error) {
	if err := ctx.Err(); err != nil {
		return dataplane.Observed{}, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.reads++
	if d.readErr != nil {
		return dataplane.Observed{}, d.readErr
	}
	var o dataplane.Observed
	if d.up {
		o.State, o.Firewall = dataplane.Canonical(d.state), true
	}
	if d.applied != nil {
		o.Drift = dataplane.Diff(*d.applied, o.State)
	}
	if d.stats != nil {
		o.PeerStats = map[dataplane.Key]dataplane.PeerStats{}
		for _, p := range o.State.Peers {
			o.PeerStats[p.PublicKey] = d.stats[p.PublicKey]
		}
	}
	return o, nil
}

// ReadDenied returns the denied flows and drop counters set with SetDenied (empty
// ones until then), or the error set with FailReadDenied; an error when no table
// exists (before Apply, after Down), as the kernel's read would fail.
func (d *Dataplane) ReadDenied(ctx context.Context) (dataplane.Denied, error) {
	if err := ctx.Err(); err != nil {
		return dataplane.Denied{}, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.deniedErr != nil:
		return dataplane.Denied{}, d.deniedErr
	case !d.up:
		return dataplane.Denied{}, fmt.Errorf("reading denied flows: no table")
	}
	out := d.denied
	out.Flows = slices.Clone(d.denied.Flows)
	return out, nil
}

// SetDenied sets what the kernel "recorded" of dropped traffic, as the packet path
// would (counters grow, elements come and go).
func (d *Dataplane) SetDenied(v dataplane.Denied) {
	d.mu.Lock()
	defer d.mu.Unlock()
	v.Flows = slices.Clone(v.Flows)
	d.denied = v
}

// FailReadDenied makes every following ReadDenied return err; nil restores success.
func (d *Dataplane) FailReadDenied(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.deniedErr = err
}

// Binding implements dataplane.STUN with the function set by SetBinding; until
// then, and for a kernel fake, it returns dataplane.ErrNoSTUN.
func (d *Dataplane) Binding(ctx context.Context, dst netip.AddrPort) (netip.AddrPort, error) {
	d.mu.Lock()
	f := d.binding
	d.mu.Unlock()
	if f == nil || d.kind == dataplane.KindKernel {
		return netip.AddrPort{}, fmt.Errorf("STUN Binding with %v: %w", dst, dataplane.ErrNoSTUN)
	}
	return f(ctx, dst)
}

// SetBinding makes Binding answer with f (a STUN server and peers' sockets, as
// the test sees them); nil restores ErrNoSTUN.
func (d *Dataplane) SetBinding(f func(ctx context.Context, dst netip.AddrPort) (netip.AddrPort, error)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.binding = f
}

// ReadPeers implements dataplane.PeerReader: the endpoints of the peers the
// fake holds, with the statistics set by SetPeerStats.
func (d *Dataplane) ReadPeers(ctx context.Context) (map[dataplane.Key]dataplane.PeerState, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[dataplane.Key]dataplane.PeerState{}
	if !d.up {
		return out, nil
	}
	for _, p := range d.state.Peers {
		out[p.PublicKey] = dataplane.PeerState{Endpoint: p.Endpoint, PeerStats: d.stats[p.PublicKey]}
	}
	return out, nil
}

// Kind returns the kind given to New.
func (d *Dataplane) Kind() dataplane.Kind { return d.kind }

// Down forgets the state and the denied flows, as removing the interface and the
// table would.
func (d *Dataplane) Down(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.state = dataplane.State{}
	d.denied = dataplane.Denied{}
	d.applied = nil
	d.up = false
	d.downs++
	return nil
}

// Close marks the fake closed; the state stays, as kernel state outlives a
// process. It is idempotent.
func (d *Dataplane) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	return nil
}

// Watch returns a channel that receives a value on every Notify (coalesced: a
// notification is dropped when one is already pending). The channel is closed when
// ctx is done.
func (d *Dataplane) Watch(ctx context.Context) (<-chan struct{}, error) {
	ch := make(chan struct{}, 1)
	d.mu.Lock()
	d.watchers = append(d.watchers, ch)
	d.mu.Unlock()
	go func() {
		<-ctx.Done()
		d.mu.Lock()
		defer d.mu.Unlock()
		for i, w := range d.watchers {
			if w == ch {
				d.watchers = append(d.watchers[:i], d.watchers[i+1:]...)
				close(ch)
				break
			}
		}
	}()
	return ch, nil
}

// Notify sends a watch event to every watcher, as a netlink or nftables change would.
func (d *Dataplane) Notify() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, w := range d.watchers {
		select {
		case w <- struct{}{}:
		default:
		}
	}
}

// Mutate changes the stored state behind the reconciler's back (drift). The state
// passed to f is a deep copy; the result is stored in canonical form. It does not
// send a watch event; call Notify for that.
func (d *Dataplane) Mutate(f func(s *dataplane.State)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := dataplane.Canonical(d.state)
	f(&s)
	d.state = dataplane.Canonical(s)
	d.up = true
}

// SetPeerStats makes every following Read report stats (copied) for the peers
// the stored state holds (zero stats for those stats lacks), as a WireGuard
// device counts them; nil, the default, reports none (Observed.PeerStats nil).
func (d *Dataplane) SetPeerStats(stats map[dataplane.Key]dataplane.PeerStats) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stats = maps.Clone(stats)
}

// FailApply makes every following Apply return err; nil restores success.
func (d *Dataplane) FailApply(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.applyErr = err
}

// FailRead makes every following Read return err; nil restores success.
func (d *Dataplane) FailRead(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.readErr = err
}

// OnApply registers f to be called (outside the lock) with the stored state after
// every successful Apply. Pass nil to remove it.
func (d *Dataplane) OnApply(f func(dataplane.State)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.onApply = f
}

// State returns a deep copy of the stored state and whether an interface exists.
func (d *Dataplane) State() (dataplane.State, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return dataplane.Canonical(d.state), d.up
}

// Stats counts calls: successful applies, reads (including failed ones) and downs.
type Stats struct{ Applies, Reads, Downs int }

// Stats returns the call counters.
func (d *Dataplane) Stats() Stats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return Stats{Applies: d.applies, Reads: d.reads, Downs: d.downs}
}

// History returns every state stored by a successful Apply, oldest first.
func (d *Dataplane) History() []dataplane.State {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]dataplane.State, 0, len(d.history))
	for _, s := range d.history {
		out = append(out, dataplane.Canonical(s))
	}
	return out
}

// Closed reports whether Close was called.
func (d *Dataplane) Closed() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.closed
}

var (
	_ dataplane.Dataplane    = (*Dataplane)(nil)
	_ dataplane.Watcher      = (*Dataplane)(nil)
	_ dataplane.DeniedReader = (*Dataplane)(nil)
)
