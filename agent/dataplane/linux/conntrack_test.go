package linux

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"segmesh/agent/firewall"
	"segmesh/policy"
)

// echoServe accepts TCP connections on addr:port in n's namespace and echoes what
// they send, until the test ends.
func (n *node) echoServe(t *testing.T, addr netip.Addr, port uint16) {
	t.Helper()
	var l net.Listener
	n.ns.Do(t, func() (err error) {
		l, err = net.Listen("tcp", netip.AddrPortFrom(addr, port).String())
		return err
	})
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
}

// connect opens a TCP connection from n's namespace that has made one round trip;
// the test's end closes it.
func (n *node) connect(t *testing.T, addr netip.Addr, port uint16) net.Conn {
	t.Helper()
	var c net.Conn
	eventually(t, 15*time.Second, fmt.Sprintf("connecting to %s port %d", addr, port), func() error {
		return n.ns.Run(func() (err error) {
			c, err = net.DialTimeout("tcp", netip.AddrPortFrom(addr, port).String(), time.Second)
			if err != nil {
				return err
			}
			if err := roundTrip(c, time.Second); err != nil {
				c.Close()
				return err
			}
			return nil
		})
	})
	t.Cleanup(func() { c.Close() })
	return c
}

var roundTrips atomic.Int64

// roundTrip sends a unique message on c and reads its echo within timeout.
func roundTrip(c net.Conn, timeout time.Duration) error {
	msg := fmt.Sprintf("message %d\n", roundTrips.Add(1))
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	if _, err := io.WriteString(c, msg); err != nil {
		return fmt.Errorf("writing: %w", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("reading the echo: %w", err)
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// hasConntrackEntry reports whether n's namespace holds a conntrack entry whose
// original tuple is c's (local address to remote address, TCP).
func (n *node) hasConntrackEntry(t *testing.T, c net.Conn) bool {
	t.Helper()
	h, err := netlink.NewHandleAt(n.ns.Handle)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	local, remote := c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort()
	family := netlink.InetFamily(unix.AF_INET)
	if local.Addr().Is6() {
		family = unix.AF_INET6
	}
	flows, err := h.ConntrackTableList(netlink.ConntrackTable, family)
	if err != nil {
		t.Fatalf("listing conntrack entries: %v", err)
	}
	for _, f := range flows {
		src, _ := netip.AddrFromSlice(f.Forward.SrcIP)
		dst, _ := netip.AddrFromSlice(f.Forward.DstIP)
		if f.Forward.Protocol == unix.IPPROTO_TCP &&
			netip.AddrPortFrom(src.Unmap(), f.Forward.SrcPort) == local && netip.AddrPortFrom(dst.Unmap(), f.Forward.DstPort) == remote {
			return true
		}
	}
	return false
}

// TestRevokedFlowsAreCut establishes TCP connections through two dataplanes, narrows
// a filter, and checks that the connections the new filter would not allow stop
// working at once (their conntrack entries are gone, so their next packets are
// judged as new and dropped) while the still-allowed ones keep working.
func TestRevokedFlowsAreCut(t *testing.T) {
	a, b := newPair(t)
	aFilter := policy.Filter{Sets: []policy.AddressSet{peerSet("peer", b.v4, b.v6)},
		Egress: []policy.FilterRule{allow("peer", tcpPort(8080), tcpPort(9090))}}
	bFilter := policy.Filter{Sets: []policy.AddressSet{peerSet("peer", a.v4, a.v6)},
		Ingress: []policy.FilterRule{allow("peer", tcpPort(8080), tcpPort(9090))}}
	a.apply(t, a.state(aFilter, b))
	b.apply(t, b.state(bFilter, a))
	for _, addr := range []netip.Addr{b.v4, b.v6} {
		for _, port := range []uint16{8080, 9090} {
			b.echoServe(t, addr, port)
		}
	}

	// flow names a connection from a to b: family (4 or 6) and port.
	type flow struct {
		family int
		port   uint16
	}
	all := []flow{{4, 8080}, {6, 8080}, {4, 9090}, {6, 9090}}
	tests := []struct {
		name       string
		aNew, bNew policy.Filter
		cut        []flow // the rest must survive
	}{
		{
			name: "rule removed from the responder's ingress",
			aNew: aFilter,
			bNew: policy.Filter{Sets: bFilter.Sets, Ingress: []policy.FilterRule{allow("peer", tcpPort(9090))}},
			cut:  []flow{{4, 8080}, {6, 8080}},
		},
		{
			name: "rule removed from the initiator's egress",
			aNew: policy.Filter{Sets: aFilter.Sets, Egress: []policy.FilterRule{allow("peer", tcpPort(9090))}},
			bNew: bFilter,
			cut:  []flow{{4, 8080}, {6, 8080}},
		},
		{
			name: "address removed from the responder's set",
			aNew: aFilter,
			bNew: policy.Filter{Sets: []policy.AddressSet{peerSet("peer", a.v6)}, Ingress: bFilter.Ingress},
			cut:  []flow{{4, 8080}, {4, 9090}},
		},
		{
			name: "port range narrowed to exclude the port",
			aNew: policy.Filter{Sets: aFilter.Sets, Egress: []policy.FilterRule{allow("peer",
				policy.PortMatch{Protocol: policy.ProtoTCP, Ports: []policy.PortRange{{First: 8081, Last: 9090}}})}},
			bNew: bFilter,
			cut:  []flow{{4, 8080}, {6, 8080}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a.apply(t, a.state(aFilter, b))
			b.apply(t, b.state(bFilter, a))
			conns := map[flow]net.Conn{}
			for _, f := range all {
				dst := b.v4
				if f.family == 6 {
					dst = b.v6
				}
				conns[f] = a.connect(t, dst, f.port)
			}

			a.apply(t, a.state(tt.aNew, b))
			b.apply(t, b.state(tt.bNew, a))

			isCut := map[flow]bool{}
			for _, f := range tt.cut {
				isCut[f] = true
			}
			// The entries of still-allowed flows stay on both nodes: a flow whose
			// next packet comes from the responder needs them.
			for _, f := range all {
				if isCut[f] {
					continue
				}
				for _, n := range []*node{a, b} {
					if !n.hasConntrackEntry(t, conns[f]) {
						t.Errorf("IPv%d tcp/%d is still allowed but its conntrack entry on %s is gone", f.family, f.port, n.ns.Name)
					}
				}
			}
			for _, f := range tt.cut {
				eventually(t, 10*time.Second, fmt.Sprintf("IPv%d tcp/%d cut", f.family, f.port), func() error {
					if err := roundTrip(conns[f], 500*time.Millisecond); err == nil {
						return errors.New("the connection still carries data")
					}
					return nil
				})
			}
			for _, f := range all {
				if !isCut[f] {
					if err := roundTrip(conns[f], 5*time.Second); err != nil {
						t.Errorf("IPv%d tcp/%d is still allowed but broke: %v", f.family, f.port, err)
					}
				}
			}
		})
	}
}

func TestOpeningOf(t *testing.T) {
	self := map[netip.Addr]bool{
		netip.MustParseAddr("100.64.0.1"):        true,
		netip.MustParseAddr("fd5e:6d65:7368::1"): true,
	}
	ct := func(family uint8, proto uint8, src, dst string, sport, dport uint16) *netlink.ConntrackFlow {
		return &netlink.ConntrackFlow{FamilyType: family, Forward: netlink.IPTuple{
			SrcIP: net.ParseIP(src), DstIP: net.ParseIP(dst), SrcPort: sport, DstPort: dport, Protocol: proto}}
	}
	addr := netip.MustParseAddr
	in := func(remote, local string, proto uint8, port uint16) firewall.Packet {
		return firewall.Opening("sm0", true, addr(local), addr(remote), proto, port)
	}
	out := func(remote, local string, proto uint8, port uint16) firewall.Packet {
		return firewall.Opening("sm0", false, addr(local), addr(remote), proto, port)
	}
	tests := []struct {
		name   string
		ct     *netlink.ConntrackFlow
		want   firewall.Packet
		wantOK bool
	}{
		{"inbound tcp", ct(unix.AF_INET, unix.IPPROTO_TCP, "100.64.0.2", "100.64.0.1", 40000, 8080),
			in("100.64.0.2", "100.64.0.1", 6, 8080), true},
		{"outbound udp", ct(unix.AF_INET, unix.IPPROTO_UDP, "100.64.0.1", "100.64.0.3", 40000, 514),
			out("100.64.0.3", "100.64.0.1", 17, 514), true},
		{"outbound IPv6 tcp", ct(unix.AF_INET6, unix.IPPROTO_TCP, "fd5e:6d65:7368::1", "fd5e:6d65:7368::2", 1, 22),
			out("fd5e:6d65:7368::2", "fd5e:6d65:7368::1", 6, 22), true},
		{"inbound icmpv6 is an echo request", ct(unix.AF_INET6, unix.IPPROTO_ICMPV6, "fd5e:6d65:7368::2", "fd5e:6d65:7368::1", 0, 7),
			firewall.Packet{Hook: firewall.HookInput, IIF: "sm0", Src: addr("fd5e:6d65:7368::2"), Dst: addr("fd5e:6d65:7368::1"),
				Protocol: 58, ICMPType: firewall.ICMPv6EchoRequest, CtState: firewall.CtNew}, true},
		{"inbound tcp redirected from 8080 to 9000", func() *netlink.ConntrackFlow {
			c := ct(unix.AF_INET, unix.IPPROTO_TCP, "100.64.0.2", "100.64.0.1", 40000, 8080)
			c.Reverse = netlink.IPTuple{SrcIP: net.ParseIP("100.64.0.1"), DstIP: net.ParseIP("100.64.0.2"), SrcPort: 9000, DstPort: 40000, Protocol: 6}
			return c
		}(), in("100.64.0.2", "100.64.0.1", 6, 9000), true},
		{"local traffic to self", ct(unix.AF_INET, unix.IPPROTO_TCP, "100.64.0.1", "100.64.0.1", 1, 2), firewall.Packet{}, false},
		{"not the node's", ct(unix.AF_INET, unix.IPPROTO_TCP, "192.0.2.1", "192.0.2.2", 1, 2), firewall.Packet{}, false},
		{"no addresses", &netlink.ConntrackFlow{FamilyType: unix.AF_INET}, firewall.Packet{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := openingOf(tt.ct, "sm0", self)
			if ok != tt.wantOK || got != tt.want {
				t.Errorf("openingOf = %+v, %v; want %+v, %v", got, ok, tt.want, tt.wantOK)
			}
		})
	}
}
