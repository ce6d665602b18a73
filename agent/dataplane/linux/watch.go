package linux

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// coalesce is how long Watch waits after a change for more changes before it signals.
const coalesce = 50 * time.Millisecond

// Watch signals kernel changes that may be drift: link events of the overlay interface,
// address and route events on it (rtnetlink), UAPI "set" operations of others on the
// wireguard-go device this process owns (kernel WireGuard has no such notification:
// its peers are only checked by reads), and changes to the nftables table. A burst of
// changes yields one receive (changes within 50 ms are coalesced, and the channel
// holds at most one pending signal). Changes made by Apply are signalled too, except
// its WireGuard configuration. The channel is closed when ctx is done or the
// Dataplane is closed. When an rtnetlink subscription fails it is renewed, with a
// signal since changes may have been missed. Errors: the rtnetlink subscriptions
// could not be set up when the Dataplane was created, or the nftables one now.
func (d *Dataplane) Watch(ctx context.Context) (<-chan struct{}, error) {
	d.mu.Lock()
	closed, subErr := d.closed, d.subErr
	d.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	if subErr != nil {
		return nil, subErr
	}
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(d.closing, cancel)
	raw := make(chan struct{}, 1)
	poke := func() {
		select {
		case raw <- struct{}{}:
		default:
		}
	}
	remove := d.watchers.add(poke)
	if err := d.fw.Watch(ctx, poke); err != nil {
		remove()
		stop()
		cancel()
		return nil, err
	}

	out := make(chan struct{}, 1)
	go func() {
		defer stop()
		defer remove()
		defer close(out)
		for {
			select {
			case <-ctx.Done():
				return
			case <-raw:
			}
			t := time.NewTimer(coalesce)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			select { // drop signals that arrived during the wait
			case <-raw:
			default:
			}
			select {
			case out <- struct{}{}:
			default: // one signal is already pending
			}
		}
	}()
	return out, nil
}

// watchers are the pokes of the Watch calls in progress.
type watchers struct {
	mu   sync.Mutex
	next int
	m    map[int]func()
}

// add registers poke and returns the function that removes it.
func (w *watchers) add(poke func()) (remove func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.m == nil {
		w.m = map[int]func(){}
	}
	id := w.next
	w.next++
	w.m[id] = poke
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		delete(w.m, id)
	}
}

// poke signals every Watch in progress (pokes do not block).
func (w *watchers) poke() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, p := range w.m {
		p()
	}
}

// subscribeLinks subscribes, for the Dataplane's lifetime, to rtnetlink link, address
// and route events of the overlay link. Each one bumps d.linkGen, so that reads of
// the link skip what did not change, and pokes Watch. A subscription that could not
// be set up leaves d.linkGen broken (every read goes to the kernel) and is reported
// by Watch (d.subErr). Called by New, before anything is read.
func (d *Dataplane) subscribeLinks() {
	// index is the overlay link's index (0: unknown); maxIndex the highest link index
	// seen (in the link list at start and in link events). Link indexes grow as links are created, so an address or
	// route event for a link above maxIndex may be for the overlay link whose link
	// event was not processed yet (the subscriptions are separate sockets).
	var index, maxIndex atomic.Int32
	changed := func() {
		d.linkGen.bump()
		d.watchers.poke()
	}
	onLink := func(u netlink.LinkUpdate) bool {
		a := u.Attrs()
		if a == nil {
			return false
		}
		raise(&maxIndex, u.Index)
		switch {
		case a.Name == d.opts.Interface:
			index.Store(u.Index)
			return true
		case u.Index == index.Load(): // renamed or deleted
			return true
		}
		return false
	}
	ours := func(i int) bool { return int32(i) == index.Load() || int32(i) > maxIndex.Load() }
	onAddr := func(u netlink.AddrUpdate) bool { return ours(u.LinkIndex) }
	onRoute := func(u netlink.RouteUpdate) bool { return ours(u.LinkIndex) }

	// nil: the process's namespace, without setns (which needs CAP_SYS_ADMIN).
	var ns *netns.NsHandle
	if d.foreignNS {
		ns = &d.ns
	}
	const bufSize = 1 << 20
	err := subscribe(d.closing, d, "link", changed, onLink, func(ch chan netlink.LinkUpdate, done chan struct{}, onErr func(error)) error {
		return netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{Namespace: ns, ErrorCallback: onErr,
			ReceiveBufferSize: bufSize, ReceiveBufferForceSize: true})
	})
	if all, lerr := d.nl.LinkList(); lerr == nil {
		for _, l := range all {
			a := l.Attrs()
			if a.Name == d.opts.Interface {
				index.CompareAndSwap(0, int32(a.Index)) // unless an event was faster
			}
			raise(&maxIndex, int32(a.Index))
		}
	}
	if err == nil {
		err = subscribe(d.closing, d, "address", changed, onAddr, func(ch chan netlink.AddrUpdate, done chan struct{}, onErr func(error)) error {
			return netlink.AddrSubscribeWithOptions(ch, done, netlink.AddrSubscribeOptions{Namespace: ns, ErrorCallback: onErr,
				ReceiveBufferSize: bufSize, ReceiveBufferForceSize: true})
		})
	}
	if err == nil {
		err = subscribe(d.closing, d, "route", changed, onRoute, func(ch chan netlink.RouteUpdate, done chan struct{}, onErr func(error)) error {
			return netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{Namespace: ns, ErrorCallback: onErr,
				ReceiveBufferSize: bufSize, ReceiveBufferForceSize: true})
		})
	}
	if err != nil {
		d.log.Warn("rtnetlink subscription failed; every read goes to the kernel and Watch is unavailable", "err", err)
		d.subErr = err
	}
}

// subscribe runs an rtnetlink subscription until ctx is done, calling changed for
// updates that relevant accepts. It counts as one source of d.linkGen: broken until
// subscribed, and while a subscription that ended early (socket error) is renewed,
// which it tries every second, calling changed since updates may have been missed.
// An error (the first subscription failed) leaves the source broken.
func subscribe[T any](ctx context.Context, d *Dataplane, what string, changed func(), relevant func(T) bool,
	start func(ch chan T, done chan struct{}, onErr func(error)) error) error {
	d.linkGen.broken.Add(1)
	run := func() (chan T, chan struct{}, error) {
		ch, done := make(chan T, 256), make(chan struct{})
		onErr := func(err error) { d.log.Debug("netlink subscription error", "what", what, "err", err) }
		if err := start(ch, done, onErr); err != nil {
			return nil, nil, fmt.Errorf("subscribing to %s events: %w", what, err)
		}
		return ch, done, nil
	}
	ch, done, err := run()
	if err != nil {
		return err
	}
	d.linkGen.up()
	go func() {
		for {
			select {
			case <-ctx.Done():
				close(done)
				for range ch { // the subscription closes ch once it notices done
				}
				return
			case u, ok := <-ch:
				if ok {
					if relevant(u) {
						changed()
					}
					continue
				}
				d.linkGen.down()
				changed()
				close(done)
				for {
					t := time.NewTimer(time.Second)
					select {
					case <-ctx.Done():
						t.Stop()
						return
					case <-t.C:
					}
					if ch, done, err = run(); err == nil {
						d.linkGen.up()
						break
					}
					d.log.Warn("renewing netlink subscription failed", "what", what, "err", err)
				}
			}
		}
	}()
	return nil
}

// raise sets v to x when x is larger.
func raise(v *atomic.Int32, x int32) {
	for m := v.Load(); x > m && !v.CompareAndSwap(m, x); m = v.Load() {
	}
}
