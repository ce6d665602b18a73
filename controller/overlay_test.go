package controller

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

func mustPrefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

func TestCheckOverlayPrefixes(t *testing.T) {
	const (
		use4 = "; " + useIPv4
		use6 = "; " + useIPv6
	)
	tests := []struct {
		in   []netip.Prefix
		want string // the whole error; "" when accepted
	}{
		// Accepted: the defaults, private, shared, unique local and global unicast space.
		{DefaultOverlayPrefixes(), ""},
		{mustPrefixes("10.0.0.0/8"), ""},
		{mustPrefixes("172.16.0.0/12", "fd00:1234:5678::/48"), ""},
		{mustPrefixes("192.168.0.0/16"), ""},
		{mustPrefixes("100.64.0.0/30", "fd5e::/126"), ""},
		{mustPrefixes("fc00::/16"), ""},
		{mustPrefixes("2001:4860::/32", "8.8.0.0/16"), ""},
		{mustPrefixes("100.0.0.0/8"), ""},
		// The checks applyDefaults made.
		{nil, "no overlay prefix: give one per address family, e.g. 100.64.0.0/10 and fd5e:6d65:7368::/48 (the defaults)"},
		{[]netip.Prefix{{}}, "overlay prefix 1 is invalid: want ADDRESS/BITS such as 100.64.0.0/10"},
		{mustPrefixes("10.0.0.1/8"), "overlay prefix 10.0.0.1/8 has host bits set; write 10.0.0.0/8"},
		{mustPrefixes("10.0.0.0/8", "172.16.0.0/12"), "overlay prefixes 10.0.0.0/8 and 172.16.0.0/12 are of the same address family; give at most one per family"},
		{mustPrefixes("10.0.0.0/31"), "overlay prefix 10.0.0.0/31 is too small: it leaves no room for nodes; give a /30 or shorter (the default is 100.64.0.0/10)"},
		{mustPrefixes("fd00::/127"), "overlay prefix fd00::/127 is too small: it leaves no room for nodes; give a /126 or shorter (the default is fd5e:6d65:7368::/48)"},
		// Defect 7.
		{mustPrefixes("::ffff:10.0.0.0/104"), "overlay prefix ::ffff:10.0.0.0/104 is IPv4-mapped IPv6 (RFC 4291): sockets read these addresses as IPv4, so no policy could match them; write IPv4 prefixes as IPv4: 10.0.0.0/8"},
		{mustPrefixes("::ffff:0:0/96"), "overlay prefix ::ffff:0.0.0.0/96 is IPv4-mapped IPv6 (RFC 4291): sockets read these addresses as IPv4, so no policy could match them; " + useMapped},
		{mustPrefixes("0.0.0.0/0"), "overlay prefix 0.0.0.0/0 is the whole IPv4 address space (a default route): every host would send all its traffic into the overlay" + use4},
		{mustPrefixes("::/0"), "overlay prefix ::/0 is the whole IPv6 address space (a default route): every host would send all its traffic into the overlay" + use6},
		{mustPrefixes("8.0.0.0/7"), "overlay prefix 8.0.0.0/7 is too wide: prefixes shorter than /8 would route a large part of the IPv4 address space into the overlay on every host" + use4},
		{mustPrefixes("fd00::/8"), "overlay prefix fd00::/8 is too wide: prefixes shorter than /16 would route a large part of the IPv6 address space into the overlay on every host" + use6},
		{mustPrefixes("127.0.0.0/8"), "overlay prefix 127.0.0.0/8 is loopback (RFC 1122): every host keeps it for itself; packets never leave the host" + use4},
		{mustPrefixes("::1/128"), "overlay prefix ::1/128 is loopback (RFC 4291): every host keeps it for itself; packets never leave the host" + use6},
		{mustPrefixes("169.254.0.0/16"), "overlay prefix 169.254.0.0/16 is link-local (RFC 3927): it is valid on one link only, and clouds serve instance metadata at 169.254.169.254 from it" + use4},
		{mustPrefixes("fe80::/10"), "overlay prefix fe80::/10 is link-local (RFC 4291): it is valid on one link only and every interface already holds an address from it" + use6},
		{mustPrefixes("224.0.0.0/4"), "overlay prefix 224.0.0.0/4 is multicast (RFC 5771): a multicast address names a group, not one host" + use4},
		{mustPrefixes("ff02::/16"), "overlay prefix ff02::/16 is multicast (RFC 4291): a multicast address names a group, not one host" + use6},
		{mustPrefixes("255.255.255.255/32"), "overlay prefix 255.255.255.255/32 is the limited broadcast address (RFC 919): it reaches every host of the link, not one" + use4},
		{mustPrefixes("192.0.0.0/8"), "overlay prefix 192.0.0.0/8 holds 192.0.0.0/24, which is reserved for IETF protocol assignments (RFC 6890): it holds DS-Lite, NAT64 discovery and other protocol addresses" + use4},
		{mustPrefixes("::/96"), "overlay prefix ::/96 is IPv4-compatible IPv6, deprecated (RFC 4291): hosts do not route it; " + useMapped},
		// Every problem, one line each.
		{[]netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), {}, netip.MustParsePrefix("2001:db8::/32"), netip.MustParsePrefix("fd00::/48")},
			"overlay prefix 127.0.0.0/8 is loopback (RFC 1122): every host keeps it for itself; packets never leave the host" + use4 + "\n" +
				"overlay prefix 2 is invalid: want ADDRESS/BITS such as 100.64.0.0/10\n" +
				"overlay prefix 2001:db8::/32 is reserved for documentation (RFC 3849): it must not appear on real networks" + use6},
	}
	for _, tt := range tests {
		err := checkOverlayPrefixes(tt.in)
		got := ""
		if err != nil {
			got = err.Error()
		}
		if got != tt.want {
			t.Errorf("checkOverlayPrefixes(%v) =\n%s\nwant\n%s", tt.in, got, tt.want)
		}
	}
}

// TestCheckOverlaySpecialRanges checks one prefix of every special range:
// each is refused with its own reason, whether inside the range or holding it.
func TestCheckOverlaySpecialRanges(t *testing.T) {
	tests := []struct{ in, reason string }{
		{"0.0.0.0/8", `is "this network"`},
		{"0.0.0.0/16", `is "this network"`},
		{"0.0.0.0/32", "is the unspecified address"},
		{"127.1.0.0/16", "is loopback"},
		{"169.254.169.0/24", "is link-local"},
		{"192.0.0.0/29", "is reserved for IETF protocol assignments"},
		{"192.0.2.0/24", "is TEST-NET-1, reserved for documentation"},
		{"192.31.196.0/24", "is AS112-v4"},
		{"192.52.193.0/24", "is AMT"},
		{"192.88.99.0/24", "is the deprecated 6to4 relay anycast range"},
		{"192.175.48.0/24", "is AS112 direct delegation"},
		{"198.18.0.0/15", "is reserved for network benchmarking"},
		{"198.0.0.0/8", "holds 198.18.0.0/15, which is reserved for network benchmarking"},
		{"198.51.100.0/24", "is TEST-NET-2, reserved for documentation"},
		{"203.0.113.0/24", "is TEST-NET-3, reserved for documentation"},
		{"203.0.0.0/16", "holds 203.0.113.0/24, which is TEST-NET-3"},
		{"239.255.0.0/16", "is multicast"},
		{"240.0.0.0/4", "is reserved for future use"},
		{"250.0.0.0/8", "is reserved for future use"},
		{"::/8", "is reserved by the IPv6 addressing architecture"},
		{"::/128", "is the unspecified address"},
		{"::ffff:0:0/100", "is IPv4-mapped IPv6"},
		{"64:ff9b::/96", "is the NAT64 well-known prefix"},
		{"64:ff9b:1::/48", "is the local-use NAT64 prefix"},
		{"64:ff9b::/32", "is reserved by the IPv6 addressing architecture"},
		{"2001::/16", "holds 2001::/23, which is reserved for IETF protocol assignments"},
		{"100::/64", "is discard-only"},
		{"2001::/23", "is reserved for IETF protocol assignments"},
		{"2001::/32", "is reserved for IETF protocol assignments"},
		{"2001:db8:1::/48", "is reserved for documentation (RFC 3849)"},
		{"2002::/16", "is 6to4"},
		{"2620:4f:8000::/48", "is AS112 direct delegation"},
		{"3fff::/20", "is reserved for documentation (RFC 9637)"},
		{"5f00::/16", "is reserved for SRv6 SIDs"},
		{"fe80::/64", "is link-local"},
		{"fec0::/10", "is site-local, deprecated"},
		{"ff00::/8", "is multicast"},
	}
	for _, tt := range tests {
		p := netip.MustParsePrefix(tt.in)
		err := checkOverlayPrefixes([]netip.Prefix{p})
		if want := fmt.Sprintf("overlay prefix %s %s", p, tt.reason); err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("checkOverlayPrefixes(%s) = %v, want %s...", tt.in, err, want)
		}
	}
	// Every listed range is refused as such.
	for _, r := range overlaySpecialRanges {
		if err := checkOverlayPrefix(r.prefix); err == nil {
			t.Errorf("special range %s is accepted", r.prefix)
		}
	}
}

// TestCheckOverlayPrefixesProperty checks accepted prefixes against netip's own
// classification: neither end of an accepted prefix is unspecified, loopback,
// link-local, multicast, IPv4-mapped or private to another use, and every
// refusal names the prefix.
func TestCheckOverlayPrefixesProperty(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		var p netip.Prefix
		if rapid.Bool().Draw(t, "v4") {
			b := rapid.SliceOfN(rapid.Byte(), 4, 4).Draw(t, "addr")
			p = netip.PrefixFrom(netip.AddrFrom4([4]byte(b)), rapid.IntRange(0, 32).Draw(t, "bits")).Masked()
		} else {
			b := rapid.SliceOfN(rapid.Byte(), 16, 16).Draw(t, "addr")
			// Bias the first bytes towards the special ranges.
			b[0] = rapid.SampledFrom([]byte{0x00, 0x01, 0x20, 0x26, 0x3f, 0x5f, 0xfc, 0xfd, 0xfe, 0xff, b[0]}).Draw(t, "first")
			p = netip.PrefixFrom(netip.AddrFrom16([16]byte(b)), rapid.IntRange(0, 128).Draw(t, "bits")).Masked()
		}
		err := checkOverlayPrefixes([]netip.Prefix{p})
		if err != nil {
			if !strings.Contains(err.Error(), p.String()) {
				t.Fatalf("error for %s does not name it: %v", p, err)
			}
			return
		}
		first, last := p.Addr(), lastOf(p)
		for _, a := range []netip.Addr{first, last} {
			if a.IsUnspecified() || a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsMulticast() || a.Is4In6() {
				t.Fatalf("accepted %s, which holds %s", p, a)
			}
		}
		for _, r := range overlaySpecialRanges {
			if r.prefix.Overlaps(p) {
				t.Fatalf("accepted %s, which overlaps %s", p, r.prefix)
			}
		}
		if f := overlayFamily(first); p.Bits() < minOverlayBits[f] || p.Bits() > maxOverlayBits[f] {
			t.Fatalf("accepted %s of size /%d", p, p.Bits())
		}
	})
}

// lastOf returns the last address of p.
func lastOf(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

func TestCheckEnrolledAddresses(t *testing.T) {
	addr := netip.MustParseAddr
	def := DefaultOverlayPrefixes()
	const todo = "; start the controller with the overlay prefixes those nodes were enrolled with (give --overlay-prefix once per " +
		"address family: a single one replaces both defaults); to move to new prefixes, start with the old ones, " +
		"delete those nodes (segmesh nodes delete NAME), restart with the new ones and enroll the nodes again with new join tokens"
	many := map[string][]netip.Addr{}
	for i := range 12 {
		many[fmt.Sprintf("n%02d", i)] = []netip.Addr{netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)})}
	}
	tests := []struct {
		name     string
		prefixes []netip.Prefix
		addrs    map[string][]netip.Addr
		want     string
	}{
		{"no nodes", def, nil, ""},
		{"all inside", def, map[string][]netip.Addr{
			"a": {addr("100.64.0.1"), addr("fd5e:6d65:7368::1")},
			"b": {addr("100.127.255.254")},
			"c": nil,
		}, ""},
		{"moved IPv4 prefix", mustPrefixes("10.0.0.0/8", "fd5e:6d65:7368::/48"), map[string][]netip.Addr{
			"web-1": {addr("100.64.0.1"), addr("fd5e:6d65:7368::1")},
			"db-1":  {addr("10.0.0.4"), addr("fd5e:6d65:7368::4")},
			"api-1": {addr("100.64.0.3"), addr("fd5e:6d65:7368::3")},
		}, "2 enrolled nodes have overlay addresses outside the overlay prefixes 10.0.0.0/8, fd5e:6d65:7368::/48: api-1 (100.64.0.3), web-1 (100.64.0.1)" + todo},
		{"family dropped", mustPrefixes("fd5e:6d65:7368::/48", "100.64.0.0/10")[:1], map[string][]netip.Addr{
			"a": {addr("100.64.0.1"), addr("fd5e:6d65:7368::1")},
		}, "1 enrolled node has an overlay address outside the overlay prefixes fd5e:6d65:7368::/48: a (100.64.0.1)" + todo},
		{"both families", mustPrefixes("fd00::/48", "10.0.0.0/8"), map[string][]netip.Addr{
			"a": {addr("100.64.0.1"), addr("fd5e:6d65:7368::1")},
		}, "1 enrolled node has an overlay address outside the overlay prefixes 10.0.0.0/8, fd00::/48: a (100.64.0.1, fd5e:6d65:7368::1)" + todo},
		{"mapped address", def, map[string][]netip.Addr{"a": {addr("::ffff:100.64.0.1")}},
			"1 enrolled node has an overlay address outside the overlay prefixes 100.64.0.0/10, fd5e:6d65:7368::/48: a (::ffff:100.64.0.1)" + todo},
		{"many", def, many, "12 enrolled nodes have overlay addresses outside the overlay prefixes 100.64.0.0/10, fd5e:6d65:7368::/48: " +
			"n00 (10.0.0.1), n01 (10.0.0.2), n02 (10.0.0.3), n03 (10.0.0.4), n04 (10.0.0.5), n05 (10.0.0.6), n06 (10.0.0.7), n07 (10.0.0.8), n08 (10.0.0.9), n09 (10.0.0.10) and 2 more" + todo},
	}
	for _, tt := range tests {
		err := checkEnrolledAddresses(tt.prefixes, tt.addrs)
		got := ""
		if err != nil {
			got = err.Error()
		}
		if got != tt.want {
			t.Errorf("%s: checkEnrolledAddresses =\n%s\nwant\n%s", tt.name, got, tt.want)
		}
	}
}
