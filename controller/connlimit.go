package controller

import (
	"net"
	"net/netip"
	"sync"
)

// sourceKey groups addresses the way one client usually holds them: an IPv4
// address, or an IPv6 /64 (one host or LAN gets a whole /64). The zero Addr for
// an unparsable address.
func sourceKey(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p.Addr()
	}
	return a
}

// sourceLimitListener closes connections from a source (sourceKey) that already
// holds max open connections, right after accepting them, so that one client
// cannot use up the controller's connection budget. Loopback sources are exempt:
// they are on the controller's host.
type sourceLimitListener struct {
	net.Listener
	max int

	mu    sync.Mutex
	count map[netip.Addr]int
}

func newSourceLimitListener(ln net.Listener, max int) *sourceLimitListener {
	return &sourceLimitListener{Listener: ln, max: max, count: map[netip.Addr]int{}}
}

// Accept returns the next connection whose source is within its limit.
func (l *sourceLimitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ap, perr := netip.ParseAddrPort(c.RemoteAddr().String())
		if perr != nil || ap.Addr().Unmap().IsLoopback() {
			return c, nil
		}
		key := sourceKey(ap.Addr())
		l.mu.Lock()
		if l.count[key] >= l.max {
			l.mu.Unlock()
			_ = c.Close()
			continue
		}
		l.count[key]++
		l.mu.Unlock()
		return &countedConn{Conn: c, release: func() { l.release(key) }}, nil
	}
}

func (l *sourceLimitListener) release(key netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.count[key]--; l.count[key] <= 0 {
		delete(l.count, key)
	}
}

// countedConn gives its source's slot back when closed (once).
type countedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *countedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
