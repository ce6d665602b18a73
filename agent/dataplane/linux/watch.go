package linux

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
)

// coalesce is how long Watch waits after a change for more changes before it signals.
const coalesce = 50 * time.Millisecond

// Watch signals kernel changes that may be drift: link events of the overlay interface,
// address and route events on it (rtnetlink), and changes to the nftables table. A
// burst of changes yields one receive (changes within 50 ms are coalesced, and the
// channel holds at most one pending signal). Changes made by Apply are signalled too.
// The channel is closed when ctx is done or the Dataplane is closed. If a kernel
// subscription fails it is renewed, with a signal since changes may have been missed.
func (d *Dataplane) Watch(ctx context.Context) (<-chan struct{}, error) {
	d.mu.Lock()
	closed := d.closed
	d.mu.Unlock()
	if closed {
		return nil, ErrClosed
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
	fail := func(err error) (<-chan struct{}, error) {
		stop()
		cancel()
		return nil, err
	}

	var index atomic.Int32 // the overlay link's index, 0 when it does not exist
	if link, err := d.nl.LinkByName(d.opts.Interface); err == nil {
		index.Store(int32(link.Attrs().Index))
	}
	onLink := func(u netlink.LinkUpdate) bool {
		if u.Attrs() == nil || u.Attrs().Name != d.opts.Interface {
			return false
		}
		index.Store(u.Index)
		return true
	}
	onAddr := func(u netlink.AddrUpdate) bool { return int32(u.LinkIndex) == index.Load() }
	onRoute := func(u netlink.RouteUpdate) bool { return int32(u.LinkIndex) == index.Load() }

	ns := d.ns
	const bufSize = 1 << 20
	if err := subscribe(ctx, d, "link", poke, onLink, func(ch chan netlink.LinkUpdate, done chan struct{}, onErr func(error)) error {
		return netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{Namespace: &ns, ErrorCallback: onErr,
			ReceiveBufferSize: bufSize, ReceiveBufferForceSize: true})
	}); err != nil {
		return fail(err)
	}
	if err := subscribe(ctx, d, "address", poke, onAddr, func(ch chan netlink.AddrUpdate, done chan struct{}, onErr func(error)) error {
		return netlink.AddrSubscribeWithOptions(ch, done, netlink.AddrSubscribeOptions{Namespace: &ns, ErrorCallback: onErr,
			ReceiveBufferSize: bufSize, ReceiveBufferForceSize: true})
	}); err != nil {
		return fail(err)
	}
	if err := subscribe(ctx, d, "route", poke, onRoute, func(ch chan netlink.RouteUpdate, done chan struct{}, onErr func(error)) error {
		return netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{Namespace: &ns, ErrorCallback: onErr,
			ReceiveBufferSize: bufSize, ReceiveBufferForceSize: true})
	}); err != nil {
		return fail(err)
	}
	if err := d.fw.Watch(ctx, poke); err != nil {
		return fail(err)
	}

	out := make(chan struct{}, 1)
	go func() {
		defer stop()
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

// subscribe runs an rtnetlink subscription until ctx is done, calling poke for updates
// that relevant accepts. When the subscription ends early (socket error), it pokes and
// subscribes again after a second.
func subscribe[T any](ctx context.Context, d *Dataplane, what string, poke func(), relevant func(T) bool,
	start func(ch chan T, done chan struct{}, onErr func(error)) error) error {
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
						poke()
					}
					continue
				}
				poke()
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
						break
					}
					d.log.Warn("renewing netlink subscription failed", "what", what, "err", err)
				}
			}
		}
	}()
	return nil
}
