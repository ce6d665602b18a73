package dataplane

import (
	"net/netip"
	"testing"
)

// bigState is a canonical state with n peers (an IPv4 and an IPv6 allowed IP each)
// and one set holding all their allowed IPs.
func bigState(n int) State {
	s := State{PrivateKey: Key{1}, MTU: 1420}
	all := AddressSet{Name: "all"}
	for i := range n {
		p := Peer{PublicKey: Key{byte(i), byte(i >> 8), 9},
			AllowedIPs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)}), 32),
				netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 14: byte(i >> 8), 15: byte(i)}), 128)}}
		s.Peers = append(s.Peers, p)
		all.Prefixes = append(all.Prefixes, p.AllowedIPs...)
	}
	s.Filter.Sets = []AddressSet{all}
	return Canonical(s)
}

// BenchmarkState1000Peers measures the pure steps every Apply and Read of a node with
// 1,000 peers goes through: Validate, Canonical, and Diff of two equal states.
func BenchmarkState1000Peers(b *testing.B) {
	s := bigState(1000)
	b.Run("validate", func(b *testing.B) {
		for range b.N {
			if err := s.Validate(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("canonical", func(b *testing.B) {
		for range b.N {
			Canonical(s)
		}
	})
	b.Run("diff", func(b *testing.B) {
		for range b.N {
			if d := Diff(s, s); len(d) != 0 {
				b.Fatal(d)
			}
		}
	})
}
