package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netns"
)

// DialTCP opens a TCP connection to addr from inside the host's network namespace,
// from this process: the socket belongs to the host's namespace for its whole life,
// so a test can hold a connection open across a policy change and use it directly.
// ctx bounds the connect.
func (h *Host) DialTCP(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	res := make(chan result, 1)
	go func() {
		// Network namespaces are per thread: switch a locked thread in and back.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{err: fmt.Errorf("getting current network namespace: %w", err)}
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(filepath.Join("/run/netns", h.Namespace))
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{err: fmt.Errorf("opening network namespace %s: %w", h.Namespace, err)}
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			res <- result{err: fmt.Errorf("entering network namespace %s: %w", h.Namespace, err)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr.String())
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		} // else the goroutine exits locked and the runtime discards the thread
		if err != nil {
			err = fmt.Errorf("dialing %s from %s: %w", addr, h.Name, err)
		}
		res <- result{c, err}
	}()
	r := <-res
	return r.c, r.err
}
