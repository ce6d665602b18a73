package linux

import (
	"errors"
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
