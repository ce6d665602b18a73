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

// inNamespace runs fn on a locked OS thread switched into network namespace ns.
// Sockets fn opens belong to ns for their whole life and can be used from any
// goroutine afterwards.
func inNamespace(ns string, fn func() error) error {
	res := make(chan error, 1)
	go func() {
		// Network namespaces are per thread: switch a locked thread in and back.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			res <- fmt.Errorf("getting current network namespace: %w", err)
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(filepath.Join("/run/netns", ns))
		if err != nil {
			runtime.UnlockOSThread()
			res <- fmt.Errorf("opening network namespace %s: %w", ns, err)
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			res <- fmt.Errorf("entering network namespace %s: %w", ns, err)
			return
		}
		err = fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		} // else the goroutine exits locked and the runtime discards the thread
		res <- err
	}()
	return <-res
}

// DialTCP opens a TCP connection to addr from inside the host's network namespace,
// from this process: the socket belongs to the host's namespace for its whole life,
// so a test can hold a connection open across a policy change and use it directly.
// ctx bounds the connect.
func (h *Host) DialTCP(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := inNamespace(h.Namespace, func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, "tcp", addr.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dialing %s from %s: %w", addr, h.Name, err)
	}
	return c, nil
}

// ListenUDP opens a UDP socket bound to addr (e.g. 0.0.0.0:40000; port 0 picks a
// free one) inside the host's network namespace, from this process, for tests
// that exchange plain datagrams across the underlay (such as the NAT self-tests).
// The caller closes it.
func (h *Host) ListenUDP(addr netip.AddrPort) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := inNamespace(h.Namespace, func() error {
		var err error
		c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listening on UDP %s in %s: %w", addr, h.Name, err)
	}
	return c, nil
}
