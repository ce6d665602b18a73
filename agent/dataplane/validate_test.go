package dataplane

import (
	"crypto/ecdh"
	"net/netip"
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	priv := Key{1, 2, 3}
	k, err := ecdh.X25519().NewPrivateKey(priv[:])
	if err != nil {
		t.Fatal(err)
	}
	var own Key
	copy(own[:], k.PublicKey().Bytes())
	pfx := netip.MustParsePrefix
	valid := func() State {
		return State{
			Interface: "sm0", PrivateKey: priv, ListenPort: 51820, MTU: 1420,
			Addresses: []netip.Prefix{pfx("100.64.0.1/32"), pfx("fd5e::1/128"), pfx("10.1.0.1/24")},
			Routes:    []netip.Prefix{pfx("100.64.0.0/10"), pfx("fd5e::/48")},
			Peers: []Peer{
				{PublicKey: Key{9}, Endpoint: netip.MustParseAddrPort("192.0.2.2:51820"),
					AllowedIPs: []netip.Prefix{pfx("100.64.0.2/32"), pfx("10.0.0.0/24")}, PersistentKeepalive: 25},
				// A longer prefix inside another peer's is fine: WireGuard routes by longest match.
				{PublicKey: Key{8}, AllowedIPs: []netip.Prefix{pfx("10.0.0.7/32")}},
			},
			Filter: Filter{
				Sets: []AddressSet{{Name: "web", Prefixes: []netip.Prefix{pfx("100.64.0.2/32")}}},
				Ingress: []FilterRule{{Set: "web", Origin: "r1", Matches: []PortMatch{
					{Protocol: ProtoTCP, Ports: []PortRange{{First: 80, Last: 443}}}, {Protocol: ProtoICMP}}}},
				Egress: []FilterRule{{Set: "web", Origin: "r2"}},
			},
		}
	}
	tests := []struct {
		name   string
		mutate func(*State)
		want   string // substring of the error; "" means valid
	}{
		{"valid", func(*State) {}, ""},
		{"zero state", func(s *State) { *s = State{} }, ""},
		{"default MTU and port", func(s *State) { s.MTU, s.ListenPort = 0, 0 }, ""},
		{"IPv4 only with small MTU", func(s *State) {
			s.MTU, s.Addresses, s.Routes = 1000, []netip.Prefix{pfx("100.64.0.1/32")}, []netip.Prefix{pfx("100.64.0.0/10")}
		}, ""},
		{"listen port", func(s *State) { s.ListenPort = 70000 }, "listen port 70000"},
		{"negative listen port", func(s *State) { s.ListenPort = -1 }, "listen port -1"},
		{"MTU too small", func(s *State) { s.MTU = 100 }, "MTU 100 out of range"},
		{"MTU too large", func(s *State) { s.MTU = 70000 }, "MTU 70000 out of range"},
		{"MTU below IPv6 minimum", func(s *State) { s.MTU = 1200 }, "disables IPv6"},
		{"invalid address", func(s *State) { s.Addresses = append(s.Addresses, netip.Prefix{}) }, "address is not a valid prefix"},
		{"mapped address", func(s *State) { s.Addresses = append(s.Addresses, pfx("::ffff:10.0.0.1/128")) }, "IPv4-mapped"},
		{"address twice", func(s *State) { s.Addresses = append(s.Addresses, pfx("100.64.0.1/24")) }, "prefix lengths 32 and 24"},
		{"unmasked route", func(s *State) { s.Routes = []netip.Prefix{pfx("100.64.0.1/10")} }, "route 100.64.0.1/10 has host bits set"},
		{"invalid route", func(s *State) { s.Routes = []netip.Prefix{{}} }, "route is not a valid prefix"},
		{"duplicate peer", func(s *State) { s.Peers = append(s.Peers, Peer{PublicKey: Key{9}}) }, "listed twice"},
		{"own key as peer", func(s *State) { s.Peers = append(s.Peers, Peer{PublicKey: own}) }, "own public key"},
		{"keepalive", func(s *State) { s.Peers[0].PersistentKeepalive = 65536 }, "persistent keepalive 65536"},
		{"mapped endpoint", func(s *State) { s.Peers[0].Endpoint = netip.MustParseAddrPort("[::ffff:192.0.2.1]:1") }, "endpoint"},
		{"unmasked allowed IP", func(s *State) { s.Peers[0].AllowedIPs = []netip.Prefix{pfx("100.64.0.2/10")} }, "allowed IP 100.64.0.2/10 has host bits"},
		{"allowed IP on two peers", func(s *State) { s.Peers[1].AllowedIPs = []netip.Prefix{pfx("100.64.0.2/32")} }, "is on peers"},
		{"undefined set", func(s *State) { s.Filter.Egress[0].Set = "nope" }, `set "nope" is not defined`},
		{"set twice", func(s *State) { s.Filter.Sets = append(s.Filter.Sets, AddressSet{Name: "web"}) }, "defined twice"},
		{"unnamed set", func(s *State) { s.Filter.Sets = append(s.Filter.Sets, AddressSet{}) }, `set name ""`},
		{"ports on icmp", func(s *State) {
			s.Filter.Ingress[0].Matches[1].Ports = []PortRange{{First: 1, Last: 1}}
		}, "protocol icmp takes no ports"},
		{"empty port range", func(s *State) { s.Filter.Ingress[0].Matches[0].Ports[0] = PortRange{First: 9, Last: 8} }, "port range 9-8 is empty"},
		{"unknown protocol", func(s *State) { s.Filter.Ingress[0].Matches[0].Protocol = "sctp" }, `unknown protocol "sctp"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := valid()
			tt.mutate(&s)
			err := s.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("Validate = %v, want nil", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("Validate = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}
