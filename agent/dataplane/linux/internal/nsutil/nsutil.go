// Package nsutil runs code inside a network namespace. Linux network namespaces are a
// per-thread attribute, so the code runs on a goroutine locked to an OS thread that
// is switched into the namespace and back afterwards.
package nsutil

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs fn on a fresh goroutine whose OS thread is in network namespace ns, and
// returns fn's error. Sockets and devices fn creates belong to ns. If the thread
// cannot be switched back, it is discarded instead of being reused. When the
// thread already is in ns, fn runs there without switching (no CAP_SYS_ADMIN needed).
func Do(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("getting current network namespace: %w", err)
			return
		}
		defer orig.Close()
		if orig.Equal(ns) {
			// Already there: no setns, which needs CAP_SYS_ADMIN (the agent's
			// service has only CAP_NET_ADMIN).
			runtime.UnlockOSThread()
			errc <- fn()
			return
		}
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err == nil {
			runtime.UnlockOSThread()
		} // else: the goroutine exits locked and the runtime terminates the thread.
		errc <- ferr
	}()
	return <-errc
}
