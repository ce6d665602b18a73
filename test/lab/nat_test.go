package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// The NAT self-tests exchange plain UDP datagrams between sockets this process
// opens inside the lab's namespaces (Host.ListenUDP); no segmesh runs.

// udpRecvTimeout bounds one read of a datagram that must arrive.
const udpRecvTimeout = 5 * time.Second

// listenUDP opens a UDP socket on port in h (0: any), closed at cleanup.
func listenUDP(t *testing.T, h *Host, port uint16) *net.UDPConn {
	t.Helper()
	c, err := h.ListenUDP(netip.AddrPortFrom(netip.IPv4Unspecified(), port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// datagram is one received datagram.
type datagram struct {
	payload string
	src     netip.AddrPort
}

// recv reads one datagram from c within timeout.
func recv(c *net.UDPConn, timeout time.Duration) (datagram, error) {
	buf := make([]byte, 1500)
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return datagram{}, err
	}
	n, src, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		return datagram{}, err
	}
	return datagram{string(buf[:n]), netip.AddrPortFrom(src.Addr().Unmap(), src.Port())}, nil
}

// deliver sends payload from c to dst until dstConn receives it (a first
// datagram may wait for ARP) and returns the source address dstConn saw.
// Datagrams with other payloads that arrive meanwhile are an error.
func deliver(t *testing.T, c *net.UDPConn, dst netip.AddrPort, dstConn *net.UDPConn, payload string) netip.AddrPort {
	t.Helper()
	var src netip.AddrPort
	err := WaitFor(context.Background(), 10*time.Second, func(context.Context) (bool, error) {
		if _, err := c.WriteToUDPAddrPort([]byte(payload), dst); err != nil {
			return false, err
		}
		d, err := recv(dstConn, PollInterval)
		if err != nil {
			return false, err
		}
		if d.payload != payload {
			return false, Abort(fmt.Errorf("received %q from %s, want %q", d.payload, d.src, payload))
		}
		src = d.src
		return true, nil
	})
	if err != nil {
		t.Fatalf("delivering %q to %s: %v", payload, dst, err)
	}
	// Drain the duplicates of the retries.
	for {
		d, err := recv(dstConn, 50*time.Millisecond)
		if err != nil {
			break
		}
		if d.payload != payload {
			t.Fatalf("received %q from %s, want only %q", d.payload, d.src, payload)
		}
	}
	return src
}

// refused sends payload from c to dst once and checks that nat drops it: its
// DroppedInbound counter grows (a packet the router counts on its drop rule is
// not forwarded). Then, unless checkConn is nil, it sends a datagram from
// checkConn to dst, which must be the first to reach want.
func refused(t *testing.T, nat *NAT, c *net.UDPConn, dst netip.AddrPort, want *net.UDPConn, checkConn *net.UDPConn, payload string) {
	t.Helper()
	ctx := context.Background()
	before, err := nat.DroppedInbound(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteToUDPAddrPort([]byte(payload), dst); err != nil {
		t.Fatal(err)
	}
	if err := WaitFor(ctx, 5*time.Second, func(ctx context.Context) (bool, error) {
		n, err := nat.DroppedInbound(ctx)
		return n > before, fmt.Errorf("drop counter %d, was %d (%v)", n, before, err)
	}); err != nil {
		t.Fatalf("NAT %s did not drop %q to %s: %v", nat.Name, payload, dst, err)
	}
	if checkConn == nil {
		return
	}
	check := payload + "-then-allowed"
	if _, err := checkConn.WriteToUDPAddrPort([]byte(check), dst); err != nil {
		t.Fatal(err)
	}
	d, err := recv(want, udpRecvTimeout)
	if err != nil {
		t.Fatalf("the allowed datagram after %q did not arrive: %v", payload, err)
	}
	if d.payload != check {
		t.Fatalf("after the refused %q, received %q from %s; want %q", payload, d.payload, d.src, check)
	}
}

// TestNATBehaviour checks each NAT kind's mapping and filtering with plain UDP:
// one lab with the controller's address and another public host as remotes, two
// port-preserving NATs with the same private prefix, a symmetric NAT and a 1:1 NAT.
func TestNATBehaviour(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	l := newTestLab(t, Options{})
	ctl, err := l.AddHost(ctx, "controller", ControllerAddr)
	if err != nil {
		t.Fatal(err)
	}
	ext, err := l.AddHost(ctx, "ext", netip.MustParseAddr("192.0.2.50"))
	if err != nil {
		t.Fatal(err)
	}
	addNAT := func(spec NATSpec) *NAT {
		n, err := l.AddNAT(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	ppA := addNAT(NATSpec{Name: "pp-a", Kind: NATPortPreserving})
	ppB := addNAT(NATSpec{Name: "pp-b", Kind: NATPortPreserving, Prefix: ppA.Prefix})
	sym := addNAT(NATSpec{Name: "sym", Kind: NATSymmetric})
	one := addNAT(NATSpec{Name: "one", Kind: NATOneToOne})
	behind := func(name string, n *NAT) *Host {
		h, err := l.AddHostBehind(ctx, name, n, netip.Addr{})
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	a, b, s, o := behind("a", ppA), behind("b", ppB), behind("s", sym), behind("o", one)
	if a.Addr != b.Addr {
		t.Errorf("a (%s) and b (%s) behind NATs with the same prefix: want the same first address", a.Addr, b.Addr)
	}

	// Remote endpoints: the controller's address and two ports of ext.
	ctlConn := listenUDP(t, ctl, 5000)
	ext1 := listenUDP(t, ext, 5000)
	ext2 := listenUDP(t, ext, 5001)
	stranger := listenUDP(t, ext, 5002) // never contacted by anyone
	ctlEP := netip.AddrPortFrom(ControllerAddr, 5000)
	ext1EP := netip.AddrPortFrom(ext.Addr, 5000)
	ext2EP := netip.AddrPortFrom(ext.Addr, 5001)

	tests := []struct {
		name string
		host *Host
		nat  *NAT
		// wantPublic is the source address remotes see.
		wantPublic netip.Addr
		// mapping: the source port is kept (port-preserving), the same for every
		// remote (endpoint-independent) or different per remote (symmetric).
		keepsPort, samePortPerRemote, newPortPerRemote bool
		// filtering: a remote the host never sent to reaches the mapped port.
		strangerReaches bool
	}{
		{name: "port-preserving", host: a, nat: ppA, wantPublic: ppA.PublicAddr, keepsPort: true, samePortPerRemote: true},
		{name: "port-preserving, second NAT, same private prefix", host: b, nat: ppB, wantPublic: ppB.PublicAddr, keepsPort: true, samePortPerRemote: true},
		{name: "symmetric", host: s, nat: sym, wantPublic: sym.PublicAddr, newPortPerRemote: true},
		{name: "1:1", host: o, nat: one, wantPublic: o.Underlay().Public, keepsPort: true, samePortPerRemote: true, strangerReaches: true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if u := tt.host.Underlay(); u.NAT != tt.nat || u.Public != tt.wantPublic || u.Gateway != tt.nat.Gateway || !tt.nat.Prefix.Contains(u.Addr) {
				t.Errorf("underlay %+v; want behind %s, public %s", u, tt.nat.Name, tt.wantPublic)
			}
			// The host sees only its private address, and routes via the NAT.
			addrs, err := tt.host.Exec(ctx, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
			if err != nil || strings.Count(addrs, " inet ") != 1 || !strings.Contains(addrs, " inet "+tt.host.Addr.String()+"/") {
				t.Errorf("eth0 addresses %q (%v); want only %s", addrs, err, tt.host.Addr)
			}
			if route, err := tt.host.Exec(ctx, "ip", "-4", "route", "show", "default"); err != nil || !strings.Contains(route, "via "+tt.nat.Gateway.String()) {
				t.Errorf("default route %q (%v); want via %s", route, err, tt.nat.Gateway)
			}

			port := uint16(40000 + i)
			c := listenUDP(t, tt.host, port)
			seen := map[netip.AddrPort]netip.AddrPort{} // remote -> source it saw
			for _, r := range []struct {
				ep   netip.AddrPort
				conn *net.UDPConn
			}{{ctlEP, ctlConn}, {ext1EP, ext1}, {ext2EP, ext2}} {
				seen[r.ep] = deliver(t, c, r.ep, r.conn, fmt.Sprintf("%s to %s", tt.host.Name, r.ep))
			}
			var ports []uint16
			for ep, src := range seen {
				if src.Addr() != tt.wantPublic {
					t.Errorf("%s saw source %s, want address %s", ep, src, tt.wantPublic)
				}
				if tt.keepsPort && src.Port() != port {
					t.Errorf("%s saw source port %d, want the host's %d", ep, src.Port(), port)
				}
				ports = append(ports, src.Port())
			}
			slices.Sort(ports)
			distinct := len(slices.Compact(ports))
			if tt.samePortPerRemote && distinct != 1 {
				t.Errorf("public ports per remote %v: want one mapping for every remote", seen)
			}
			if tt.newPortPerRemote && distinct != len(seen) {
				t.Errorf("public ports per remote %v: want a different port per remote", seen)
			}

			// A reply from the controller's address comes back through the mapping.
			if src := deliver(t, ctlConn, seen[ctlEP], c, tt.name+": controller's reply"); src != ctlEP {
				t.Errorf("the controller's reply came from %s, want %s", src, ctlEP)
			}
			// A remote the host never sent to, to the port mapped for ext:5000.
			if tt.strangerReaches {
				if src := deliver(t, stranger, seen[ext1EP], c, tt.name+": stranger"); src.Addr() != ext.Addr || src.Port() != 5002 {
					t.Errorf("the stranger's datagram came from %s, want %s:5002", src, ext.Addr)
				}
			} else {
				refused(t, tt.nat, stranger, seen[ext1EP], c, ext1, tt.name+": stranger")
			}
			if tt.newPortPerRemote {
				// The same remote address from another port, and another remote,
				// to the port mapped for ext:5000: both refused.
				refused(t, tt.nat, ext2, seen[ext1EP], c, ext1, tt.name+": ext:5001 to ext:5000's mapping")
				refused(t, tt.nat, ctlConn, seen[ext1EP], c, ext1, tt.name+": controller to ext:5000's mapping")
			}
		})
	}

	t.Run("1:1 unsolicited", func(t *testing.T) {
		// A port the host never sent from: an unsolicited datagram reaches it,
		// and so does a ping to its public address.
		idle := listenUDP(t, o, 41000)
		pub := netip.AddrPortFrom(o.Underlay().Public, 41000)
		if src := deliver(t, stranger, pub, idle, "unsolicited"); src != netip.AddrPortFrom(ext.Addr, 5002) {
			t.Errorf("unsolicited datagram came from %s, want %s:5002", src, ext.Addr)
		}
		if out, err := ext.Exec(ctx, "ping", "-c", "1", "-W", "2", o.Underlay().Public.String()); err != nil {
			t.Errorf("ping of o's public address: %v\n%s", err, out)
		}
	})
	t.Run("no unsolicited inbound through masquerading NATs", func(t *testing.T) {
		for _, tc := range []struct {
			h *Host
			n *NAT
		}{{a, ppA}, {s, sym}} {
			idle := listenUDP(t, tc.h, 41000)
			refused(t, tc.n, stranger, netip.AddrPortFrom(tc.n.PublicAddr, 41000), idle, nil, tc.h.Name+": unsolicited")
		}
	})
	t.Run("private networks are isolated", func(t *testing.T) {
		// s behind sym cannot reach o's private address, and a public host has
		// no route to any private prefix.
		if out, err := s.Exec(ctx, "ping", "-c", "1", "-W", "1", o.Addr.String()); err == nil {
			t.Errorf("s reached o's private address %s:\n%s", o.Addr, out)
		}
		if out, err := ext.Exec(ctx, "ping", "-c", "1", "-W", "1", a.Addr.String()); err == nil {
			t.Errorf("ext reached a's private address %s:\n%s", a.Addr, out)
		}
		// Every host behind a NAT reaches the controller's address (ICMP too).
		for _, h := range []*Host{a, b, s, o} {
			if out, err := h.Exec(ctx, "ping", "-c", "1", "-W", "2", ControllerAddr.String()); err != nil {
				t.Errorf("%s cannot ping the controller's address: %v\n%s", h.Name, err, out)
			}
		}
	})
}

// TestNATRenumberAndMove renumbers a host and moves it between NATs and the
// public underlay with a process and a UDP socket open, and checks after each
// step its addresses, its route, the source the controller's address sees and,
// where the host is reachable, an unsolicited datagram to its public address.
func TestNATRenumberAndMove(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	l := newTestLab(t, Options{})
	ctl, err := l.AddHost(ctx, "controller", ControllerAddr)
	if err != nil {
		t.Fatal(err)
	}
	pp, err := l.AddNAT(ctx, NATSpec{Name: "pp", Kind: NATPortPreserving})
	if err != nil {
		t.Fatal(err)
	}
	one, err := l.AddNAT(ctx, NATSpec{Name: "one", Kind: NATOneToOne})
	if err != nil {
		t.Fatal(err)
	}
	h, err := l.AddHostBehind(ctx, "roamer", pp, netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	sleeper, err := h.Start("sleeper", "sleep", "1000")
	if err != nil {
		t.Fatal(err)
	}
	pid := sleeper.PID()
	ctlConn := listenUDP(t, ctl, 5000)
	ctlEP := netip.AddrPortFrom(ControllerAddr, 5000)
	// One socket, bound to the wildcard address, lives through every move.
	c := listenUDP(t, h, 40000)

	steps := []struct {
		name       string
		do         func() error
		wantNAT    *NAT
		wantAddr   string // "" : any address of the NAT's prefix
		wantPublic func() netip.Addr
		// inbound: an unsolicited datagram from the controller to the host's
		// public address reaches it (1:1 or public).
		inbound bool
	}{
		{"behind port-preserving", func() error { return nil }, pp, "10.1.0.2", func() netip.Addr { return pp.PublicAddr }, false},
		{"renumbered behind port-preserving", func() error { return h.Renumber(ctx, netip.MustParseAddr("10.1.0.50")) }, pp, "10.1.0.50", func() netip.Addr { return pp.PublicAddr }, false},
		{"moved behind 1:1", func() error { return h.MoveTo(ctx, one, netip.Addr{}) }, one, "10.2.0.2", func() netip.Addr { return netip.MustParseAddr("192.0.2.101") }, true},
		{"renumbered behind 1:1", func() error { return h.Renumber(ctx, netip.MustParseAddr("10.2.0.9")) }, one, "10.2.0.9", func() netip.Addr { return netip.MustParseAddr("192.0.2.101") }, true},
		{"moved to the public underlay", func() error { return h.MoveTo(ctx, nil, netip.MustParseAddr("192.0.2.60")) }, nil, "192.0.2.60", func() netip.Addr { return netip.MustParseAddr("192.0.2.60") }, true},
		{"moved back behind port-preserving", func() error { return h.MoveTo(ctx, pp, netip.Addr{}) }, pp, "10.1.0.2", func() netip.Addr { return pp.PublicAddr }, false},
	}
	for i, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			if err := st.do(); err != nil {
				t.Fatal(err)
			}
			u := h.Underlay()
			if u.NAT != st.wantNAT || u.Addr.String() != st.wantAddr || u.Public != st.wantPublic() {
				t.Fatalf("underlay %+v; want NAT %s, address %s, public %s", u, natName(st.wantNAT), st.wantAddr, st.wantPublic())
			}
			addrs, err := h.Exec(ctx, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
			if err != nil || strings.Count(addrs, " inet ") != 1 || !strings.Contains(addrs, " inet "+st.wantAddr+"/") {
				t.Errorf("eth0 addresses %q (%v); want only %s", addrs, err, st.wantAddr)
			}
			route, err := h.Exec(ctx, "ip", "-4", "route", "show", "default")
			switch {
			case err != nil:
				t.Errorf("reading the default route: %v", err)
			case st.wantNAT == nil && strings.TrimSpace(route) != "":
				t.Errorf("default route %q on the public underlay, want none", route)
			case st.wantNAT != nil && !strings.Contains(route, "via "+st.wantNAT.Gateway.String()):
				t.Errorf("default route %q, want via %s", route, st.wantNAT.Gateway)
			}
			src := deliver(t, c, ctlEP, ctlConn, fmt.Sprintf("step %d", i))
			if src.Addr() != st.wantPublic() {
				t.Errorf("the controller saw source %s, want address %s", src, st.wantPublic())
			}
			if st.inbound {
				idle := listenUDP(t, h, uint16(41000+i))
				deliver(t, ctlConn, netip.AddrPortFrom(st.wantPublic(), uint16(41000+i)), idle, fmt.Sprintf("unsolicited %d", i))
			}
			if !sleeper.Running() || sleeper.PID() != pid {
				t.Errorf("the host's process stopped or changed (pid %d, was %d)", sleeper.PID(), pid)
			}
		})
	}
	// The veth's bridge end is back in pp's namespace, recorded there for Close.
	port := resource{ns: pp.Namespace, kind: resourceLink, name: h.port()}.String()
	if !slices.Contains(l.Resources(), port) {
		t.Errorf("Resources() = %v; want %s", l.Resources(), port)
	}
	if one.Ruleset() != natRuleset(NATOneToOne, one.PublicAddr, one.Prefix, nil) {
		t.Errorf("1:1 ruleset after the host left still maps it:\n%s", one.Ruleset())
	}
	if out, err := runCmd(ctx, "ip", "-n", one.Namespace, "-4", "-o", "addr", "show", "dev", "eth0"); err != nil || strings.Contains(out, "192.0.2.101") {
		t.Errorf("1:1 router eth0 after the host left: %q (%v); want 192.0.2.101 gone", out, err)
	}
	if err := h.Renumber(ctx, h.Addr); err == nil {
		t.Error("Renumber to the current address succeeded")
	}
	if err := h.MoveTo(ctx, nil, netip.MustParseAddr("192.0.2.1")); err == nil {
		t.Error("MoveTo onto the controller's address succeeded")
	}
}

// TestNATCleanup checks that Close removes everything of a lab with NATs, also
// after an AddNAT that failed half-way, and leaves the root namespace as it was.
func TestNATCleanup(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	before := rootLinks(t)
	l, err := New(ctx, Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			l.Close()
		}
	})
	if _, err := l.AddHost(ctx, "controller", ControllerAddr); err != nil {
		t.Fatal(err)
	}
	var nats []*NAT
	for _, k := range NATKinds {
		n, err := l.AddNAT(ctx, NATSpec{Name: strings.ReplaceAll(string(k), ":", "to"), Kind: k})
		if err != nil {
			t.Fatal(err)
		}
		nats = append(nats, n)
		if _, err := l.AddHostBehind(ctx, "h-"+n.Name, n, netip.Addr{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Host("h-"+nats[0].Name).MoveTo(ctx, nats[2], netip.Addr{}); err != nil {
		t.Fatal(err)
	}
	// Make the next AddNAT fail half-way: its public veth end's name is taken.
	if err := l.ip(ctx, "-n", l.underlayNS, "link", "add", fmt.Sprintf("r%d", len(nats)+1), "type", "dummy"); err != nil {
		t.Fatal(err)
	}
	if _, err := l.AddNAT(ctx, NATSpec{Name: "broken", Kind: NATPortPreserving}); err == nil {
		t.Fatal("AddNAT with its veth name taken succeeded")
	}
	broken := nsPrefix + l.ID + "-nat-broken"
	if !slices.Contains(l.Namespaces(), broken) {
		t.Errorf("Namespaces() = %v; want the half-made %s recorded", l.Namespaces(), broken)
	}
	for _, n := range nats {
		if _, err := runCmd(ctx, "ip", "netns", "exec", n.Namespace, "nft", "list", "table", "ip", NATTable); err != nil {
			t.Errorf("NAT %s has no table: %v", n.Name, err)
		}
	}
	if len(l.Resources()) == 0 {
		t.Fatal("Resources() is empty")
	}

	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	closed = true
	if got := l.Namespaces(); len(got) != 0 {
		t.Errorf("Namespaces() after Close = %v", got)
	}
	if got := l.Resources(); len(got) != 0 {
		t.Errorf("Resources() after Close = %v", got)
	}
	left, err := filepath.Glob("/run/netns/" + nsPrefix + l.ID + "-*")
	if err != nil || len(left) > 0 {
		t.Errorf("namespaces left after Close: %v %v", left, err)
	}
	if after := rootLinks(t); after != before {
		t.Errorf("root namespace links changed:\nbefore %s\nafter  %s", before, after)
	}
	if _, err := l.AddNAT(ctx, NATSpec{Name: "late", Kind: NATSymmetric}); err == nil {
		t.Error("AddNAT after Close succeeded")
	}
}
