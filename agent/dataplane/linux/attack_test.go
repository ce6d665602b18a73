package linux

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"segmesh/policy"
)

// TestAttackFlowToAnotherLocalAddressSurvivesRevocation: the ingress chain judges
// every packet that arrives on the overlay interface, whatever local address it is
// for, but the conntrack sweep only judges entries with one of the overlay addresses
// at one end. A peer (its WireGuard source address checked, its destination not) can
// reach any address of the node through the tunnel, e.g. its LAN or docker0 address;
// a connection opened that way while allowed survives the revocation of the peer's
// access, while the same connection to the overlay address is cut.
func TestAttackFlowToAnotherLocalAddressSurvivesRevocation(t *testing.T) {
	a, b := newPair(t)
	other := netip.MustParseAddr("10.99.0.2") // an address of b outside the overlay
	b.ns.MustExec(t, "ip", "addr", "add", other.String()+"/32", "dev", "lo")
	aFilter := policy.Filter{Sets: []policy.AddressSet{peerSet("peer", b.v4, other)},
		Egress: []policy.FilterRule{allow("peer", tcpPort(8080))}}
	bFilter := policy.Filter{Sets: []policy.AddressSet{peerSet("peer", a.v4)},
		Ingress: []policy.FilterRule{allow("peer", tcpPort(8080))}}
	as := a.state(aFilter, b) // a sends to b's other address through the tunnel
	as.Peers[0].AllowedIPs = append(as.Peers[0].AllowedIPs, netip.PrefixFrom(other, 32))
	as.Routes = append(as.Routes, netip.PrefixFrom(other, 32))
	a.apply(t, as)
	b.apply(t, b.state(bFilter, a))
	b.echoServe(t, b.v4, 8080)
	b.echoServe(t, other, 8080)
	toOverlay := a.connect(t, b.v4, 8080)
	toOther := a.connect(t, other, 8080)

	b.apply(t, b.state(policy.Filter{Sets: bFilter.Sets}, a)) // b revokes a's access
	if err := a.dial(other, 8080, time.Second); err == nil {
		t.Fatal("b's filter no longer allows a, yet a new connection to b's other address passed")
	}
	for _, c := range []struct {
		name string
		addr netip.Addr
	}{{"overlay", b.v4}, {"other", other}} {
		conn := toOverlay
		if c.name == "other" {
			conn = toOther
		}
		eventually(t, 5*time.Second, "connection to b's "+c.name+" address "+c.addr.String()+" cut", func() error {
			if err := roundTrip(conn, 300*time.Millisecond); err == nil {
				return errors.New("the connection still carries data")
			}
			return nil
		})
	}
}

// TestAttackRedirectedFlowSurvivesRevocation: the sweep judges a conntrack entry by
// its original tuple, but the filter sees the packet after destination NAT (nat
// prerouting and output run before the filter hooks): with a redirect from port 8080
// to 9000 (a transparent proxy, say) the filter judged the flow at port 9000 and the
// sweep judges it at 8080. Revoking 9000 while keeping 8080 leaves the flow working,
// although a new connection the same way is dropped.
func TestAttackRedirectedFlowSurvivesRevocation(t *testing.T) {
	a, b := newPair(t)
	b.ns.MustExec(t, "nft", "add table ip redir; add chain ip redir pre { type nat hook prerouting priority dstnat; }; "+
		"add rule ip redir pre tcp dport 8080 redirect to :9000")
	aFilter := policy.Filter{Sets: []policy.AddressSet{peerSet("peer", b.v4)},
		Egress: []policy.FilterRule{allow("peer", tcpPort(8080))}}
	bSets := []policy.AddressSet{peerSet("peer", a.v4)}
	a.apply(t, a.state(aFilter, b))
	b.apply(t, b.state(policy.Filter{Sets: bSets, Ingress: []policy.FilterRule{allow("peer", tcpPort(9000))}}, a))
	b.echoServe(t, b.v4, 9000)
	conn := a.connect(t, b.v4, 8080) // reaches the server on 9000

	// b allows 8080 only: what arrives there is redirected to 9000, which is denied.
	b.apply(t, b.state(policy.Filter{Sets: bSets, Ingress: []policy.FilterRule{allow("peer", tcpPort(8080))}}, a))
	if err := a.dial(b.v4, 8080, time.Second); err == nil {
		t.Fatal("b's filter no longer allows port 9000, yet a new redirected connection passed")
	}
	eventually(t, 5*time.Second, "redirected connection cut", func() error {
		if err := roundTrip(conn, 300*time.Millisecond); err == nil {
			return errors.New("the connection still carries data")
		}
		return nil
	})
}

// TestAttackRevokedFlowResumesWhenTheServerSpeaksFirst: the sweep deletes the
// conntrack entry of a revoked inbound flow, expecting its next packet to be judged
// as new by the ingress chain and dropped. But when the node's egress lets it reach
// the peer on any port and the node's side sends next (data, a TCP keepalive),
// conntrack picks the stream up mid-way as a new outbound connection
// (nf_conntrack_tcp_loose), the egress chain accepts it, and the peer's packets are
// then replies: the connection the new filter denies works again both ways.
func TestAttackRevokedFlowResumesWhenTheServerSpeaksFirst(t *testing.T) {
	a, b := newPair(t)
	aFilter := policy.Filter{Sets: []policy.AddressSet{peerSet("peer", b.v4)},
		Egress:  []policy.FilterRule{allow("peer", tcpPort(8080))},
		Ingress: []policy.FilterRule{allow("peer", policy.PortMatch{Protocol: policy.ProtoAny})}}
	bSets := []policy.AddressSet{peerSet("peer", a.v4)}
	bEgress := []policy.FilterRule{allow("peer", policy.PortMatch{Protocol: policy.ProtoAny})}
	a.apply(t, a.state(aFilter, b))
	b.apply(t, b.state(policy.Filter{Sets: bSets, Ingress: []policy.FilterRule{allow("peer", tcpPort(8080))}, Egress: bEgress}, a))
	var l net.Listener
	b.ns.Do(t, func() (err error) { l, err = net.Listen("tcp", netip.AddrPortFrom(b.v4, 8080).String()); return err })
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	var c net.Conn
	a.ns.Do(t, func() (err error) {
		c, err = net.DialTimeout("tcp", netip.AddrPortFrom(b.v4, 8080).String(), 5*time.Second)
		return err
	})
	defer c.Close()
	s := <-accepted
	defer s.Close()
	b.apply(t, b.state(policy.Filter{Sets: bSets, Egress: bEgress}, a)) // ingress revoked
	if _, err := s.Write([]byte("push")); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		return // cut, as it should be
	}
	c.Write([]byte("back"))
	s.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.ReadFull(s, buf); err != nil {
		return
	}
	t.Errorf("b no longer lets a connect to port 8080, yet a's connection there carries data both ways after b spoke")
}
