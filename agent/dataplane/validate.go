package dataplane

import (
	"crypto/ecdh"
	"fmt"
	"net/netip"

	"segmesh/agent/firewall"
)

// MTU bounds accepted by Validate, in bytes. Below MinIPv6MTU the kernel disables
// IPv6 on the link and drops its IPv6 addresses and routes.
const (
	MinMTU     = 576
	MinIPv6MTU = 1280
	MaxMTU     = 65535
)

// Validate reports the first way s asks for something the kernel refuses or would
// silently change, so that a Read after Apply could never equal s: a listen port or
// persistent keepalive (seconds) outside 0-65535; an MTU other than 0 outside
// MinMTU-MaxMTU, or below MinIPv6MTU while s has IPv6 addresses or routes; an invalid
// or IPv4-mapped IPv6 prefix; an address listed with two prefix lengths; a route or
// allowed IP with host bits set; a peer listed twice, or whose public key is the
// device's own (WireGuard ignores it); an allowed IP on two peers (WireGuard moves it
// to the last one); an IPv4-mapped IPv6 endpoint; a filter that cannot become an
// nftables table (firewall.CheckFilter). It does not check the interface name, which only the implementation
// knows. The error names the offending item.
func (s State) Validate() error {
	if s.ListenPort < 0 || s.ListenPort > 65535 {
		return fmt.Errorf("listen port %d out of range 0-65535", s.ListenPort)
	}
	ipv6 := false
	addrLen := make(map[netip.Addr]int, len(s.Addresses))
	for _, p := range s.Addresses {
		if problem := prefixProblem(p); problem != "" {
			return fmt.Errorf("address %s", problem)
		}
		if bits, ok := addrLen[p.Addr()]; ok && bits != p.Bits() {
			return fmt.Errorf("address %s is listed with prefix lengths %d and %d", p.Addr(), bits, p.Bits())
		}
		addrLen[p.Addr()] = p.Bits()
		ipv6 = ipv6 || p.Addr().Is6()
	}
	for _, p := range s.Routes {
		if problem := prefixProblem(p); problem != "" {
			return fmt.Errorf("route %s", problem)
		}
		if p != p.Masked() {
			return fmt.Errorf("route %s has host bits set (want %s)", p, p.Masked())
		}
		ipv6 = ipv6 || p.Addr().Is6()
	}
	if s.MTU != 0 && (s.MTU < MinMTU || s.MTU > MaxMTU) {
		return fmt.Errorf("MTU %d out of range %d-%d", s.MTU, MinMTU, MaxMTU)
	}
	if s.MTU != 0 && s.MTU < MinIPv6MTU && ipv6 {
		return fmt.Errorf("MTU %d is below %d, where the kernel disables IPv6, but the state has IPv6 addresses or routes", s.MTU, MinIPv6MTU)
	}
	var own Key
	hasOwn := false
	if s.PrivateKey != (Key{}) {
		if k, err := ecdh.X25519().NewPrivateKey(s.PrivateKey[:]); err == nil {
			copy(own[:], k.PublicKey().Bytes())
			hasOwn = true
		}
	}
	peers := make(map[Key]bool, len(s.Peers))
	n := 0
	for _, p := range s.Peers {
		n += len(p.AllowedIPs)
	}
	owner := make(map[netip.Prefix]Key, n)
	for _, p := range s.Peers {
		name := func() string { return KeyString(p.PublicKey) } // only for errors: it allocates
		if peers[p.PublicKey] {
			return fmt.Errorf("peer %s is listed twice", name())
		}
		peers[p.PublicKey] = true
		if hasOwn && p.PublicKey == own {
			return fmt.Errorf("peer %s is this device's own public key", name())
		}
		if p.PersistentKeepalive < 0 || p.PersistentKeepalive > 65535 {
			return fmt.Errorf("peer %s: persistent keepalive %d s out of range 0-65535", name(), p.PersistentKeepalive)
		}
		if p.Endpoint.IsValid() && p.Endpoint.Addr().Is4In6() {
			return fmt.Errorf("peer %s: endpoint %s is an IPv4-mapped IPv6 address; use the IPv4 form", name(), p.Endpoint)
		}
		for _, a := range p.AllowedIPs {
			if problem := prefixProblem(a); problem != "" {
				return fmt.Errorf("peer %s: allowed IP %s", name(), problem)
			}
			if a != a.Masked() {
				return fmt.Errorf("peer %s: allowed IP %s has host bits set (want %s)", name(), a, a.Masked())
			}
			if o, ok := owner[a]; ok && o != p.PublicKey {
				return fmt.Errorf("allowed IP %s is on peers %s and %s; WireGuard routes a prefix to one peer", a, KeyString(o), name())
			}
			owner[a] = p.PublicKey
		}
	}
	if err := firewall.CheckFilter(s.Filter); err != nil {
		return fmt.Errorf("filter: %w", err)
	}
	return nil
}

// prefixProblem says what is wrong with p, to follow its kind ("route ..."); "" when
// nothing is.
func prefixProblem(p netip.Prefix) string {
	switch {
	case !p.IsValid():
		return "is not a valid prefix"
	case p.Addr().Is4In6():
		return p.String() + " is IPv4-mapped IPv6; use the IPv4 form"
	}
	return ""
}
