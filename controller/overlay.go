package controller

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// Overlay prefix sizes: the widest and narrowest prefix accepted per family.
//
// A prefix wider than minOverlayBits would route a large share of the address
// space into the overlay on every host (an IPv4 /7 already holds two public
// /8s; an IPv6 prefix shorter than /16 holds regional registries' whole
// allocations), and a narrower one than maxOverlayBits has no room for nodes.
var (
	minOverlayBits = [2]int{8, 16}   // IPv4, IPv6
	maxOverlayBits = [2]int{30, 126} // IPv4, IPv6
)

// What to use instead, per family.
const (
	useIPv4 = "use a private IPv4 range: 100.64.0.0/10 (the default), 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16, or a part of one"
	useIPv6 = "use a unique local IPv6 /48 from fd00::/8 (RFC 4193), such as the default fd5e:6d65:7368::/48"
)

// overlaySpecialRange is a range of the IANA special-purpose address registries (RFC
// 6890 and its updates) or of the IPv4 and IPv6 address architectures that no
// overlay may use, with why.
type overlaySpecialRange struct {
	prefix netip.Prefix
	what   string // "is link-local (RFC 3927)": completes "prefix X ..."
	why    string // what goes wrong
	use    string // what to use instead; "" for the family's default advice
}

// overlaySpecialRanges are the ranges checkOverlayPrefixes refuses. Sources: the IANA
// IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890, updated by RFC
// 8190), RFC 5737 and RFC 5771 (IPv4), RFC 4291 (IPv6 addressing architecture),
// RFC 3879 (site-local), RFC 9637 (3fff::/20) and RFC 9602 (SRv6 SIDs).
// Private (RFC 1918), shared (RFC 6598, 100.64.0.0/10), unique local (RFC 4193,
// fc00::/7) and global unicast space stay allowed.
var overlaySpecialRanges = []overlaySpecialRange{
	// IPv4
	{netip.MustParsePrefix("0.0.0.0/8"), `is "this network" (RFC 791, RFC 6890)`, "hosts use it as a source address while they have none; it is not routable", ""},
	{netip.MustParsePrefix("0.0.0.0/32"), "is the unspecified address", "it names no host", ""},
	{netip.MustParsePrefix("127.0.0.0/8"), "is loopback (RFC 1122)", "every host keeps it for itself; packets never leave the host", ""},
	{netip.MustParsePrefix("169.254.0.0/16"), "is link-local (RFC 3927)", "it is valid on one link only, and clouds serve instance metadata at 169.254.169.254 from it", ""},
	{netip.MustParsePrefix("192.0.0.0/24"), "is reserved for IETF protocol assignments (RFC 6890)", "it holds DS-Lite, NAT64 discovery and other protocol addresses", ""},
	{netip.MustParsePrefix("192.0.2.0/24"), "is TEST-NET-1, reserved for documentation (RFC 5737)", "it must not appear on real networks", ""},
	{netip.MustParsePrefix("192.31.196.0/24"), "is AS112-v4 (RFC 7535)", "it is anycast by the AS112 DNS service", ""},
	{netip.MustParsePrefix("192.52.193.0/24"), "is AMT (RFC 7450)", "it is anycast by multicast relays", ""},
	{netip.MustParsePrefix("192.88.99.0/24"), "is the deprecated 6to4 relay anycast range (RFC 7526)", "it may still be routed to 6to4 relays", ""},
	{netip.MustParsePrefix("192.175.48.0/24"), "is AS112 direct delegation (RFC 7534)", "it is anycast by the AS112 DNS service", ""},
	{netip.MustParsePrefix("198.18.0.0/15"), "is reserved for network benchmarking (RFC 2544)", "test equipment uses it and it must not appear on production networks", ""},
	{netip.MustParsePrefix("198.51.100.0/24"), "is TEST-NET-2, reserved for documentation (RFC 5737)", "it must not appear on real networks", ""},
	{netip.MustParsePrefix("203.0.113.0/24"), "is TEST-NET-3, reserved for documentation (RFC 5737)", "it must not appear on real networks", ""},
	{netip.MustParsePrefix("224.0.0.0/4"), "is multicast (RFC 5771)", "a multicast address names a group, not one host", ""},
	{netip.MustParsePrefix("240.0.0.0/4"), "is reserved for future use (RFC 1112)", "hosts and routers drop it", ""},
	{netip.MustParsePrefix("255.255.255.255/32"), "is the limited broadcast address (RFC 919)", "it reaches every host of the link, not one", ""},
	// IPv6
	{netip.MustParsePrefix("::/8"), "is reserved by the IPv6 addressing architecture (RFC 4291)", "it holds the unspecified, loopback, IPv4-compatible and IPv4-mapped addresses", ""},
	{netip.MustParsePrefix("::/128"), "is the unspecified address", "it names no host", ""},
	{netip.MustParsePrefix("::1/128"), "is loopback (RFC 4291)", "every host keeps it for itself; packets never leave the host", ""},
	{netip.MustParsePrefix("::/96"), "is IPv4-compatible IPv6, deprecated (RFC 4291)", "hosts do not route it", useMapped},
	{netip.MustParsePrefix("::ffff:0:0/96"), "is IPv4-mapped IPv6 (RFC 4291)", "sockets read these addresses as IPv4, so no policy could match them", useMapped},
	{netip.MustParsePrefix("64:ff9b::/96"), "is the NAT64 well-known prefix (RFC 6052)", "NAT64 gateways translate it to IPv4", ""},
	{netip.MustParsePrefix("64:ff9b:1::/48"), "is the local-use NAT64 prefix (RFC 8215)", "NAT64 gateways translate it to IPv4", ""},
	{netip.MustParsePrefix("100::/64"), "is discard-only (RFC 6666)", "routers drop it on purpose", ""},
	{netip.MustParsePrefix("2001::/23"), "is reserved for IETF protocol assignments (RFC 2928)", "it holds Teredo, benchmarking, ORCHID and other protocol addresses", ""},
	{netip.MustParsePrefix("2001:db8::/32"), "is reserved for documentation (RFC 3849)", "it must not appear on real networks", ""},
	{netip.MustParsePrefix("2002::/16"), "is 6to4 (RFC 3056)", "hosts derive it from IPv4 addresses and route it to 6to4 relays", ""},
	{netip.MustParsePrefix("2620:4f:8000::/48"), "is AS112 direct delegation (RFC 7534)", "it is anycast by the AS112 DNS service", ""},
	{netip.MustParsePrefix("3fff::/20"), "is reserved for documentation (RFC 9637)", "it must not appear on real networks", ""},
	{netip.MustParsePrefix("5f00::/16"), "is reserved for SRv6 SIDs (RFC 9602)", "segment routing uses it", ""},
	{netip.MustParsePrefix("fe80::/10"), "is link-local (RFC 4291)", "it is valid on one link only and every interface already holds an address from it", ""},
	{netip.MustParsePrefix("fec0::/10"), "is site-local, deprecated (RFC 3879)", "hosts no longer treat it as routable", ""},
	{netip.MustParsePrefix("ff00::/8"), "is multicast (RFC 4291)", "a multicast address names a group, not one host", ""},
}

// useMapped is what to use instead of IPv4-mapped or IPv4-compatible IPv6.
const useMapped = "write IPv4 prefixes as IPv4 (10.0.0.0/8, not ::ffff:10.0.0.0/104), and " + useIPv6

// overlayFamily returns 0 for IPv4 and 1 for IPv6.
func overlayFamily(a netip.Addr) int {
	if a.Is4() {
		return 0
	}
	return 1
}

// checkOverlayPrefixes reports whether prefixes can be the overlay prefixes
// nodes get their addresses from (Options.OverlayPrefixes): at least one and at
// most one per address family, each valid, without host bits, between /8 and
// /30 for IPv4 and between /16 and /126 for IPv6 (a shorter prefix would route
// a large part of the address space into the overlay on every host), and
// neither in nor holding a special-purpose range (overlaySpecialRanges: "this
// network", loopback, link-local, multicast, broadcast, reserved, documentation,
// benchmarking, IETF protocol assignments, IPv4-mapped and IPv4-compatible
// IPv6, NAT64, 6to4, Teredo, site-local, discard-only). Private IPv4 ranges (RFC
// 1918), shared address space (100.64.0.0/10, the default), unique local IPv6
// (fc00::/7) and global unicast space are accepted. The error holds one line per
// problem, each saying why and what to use instead.
func checkOverlayPrefixes(prefixes []netip.Prefix) error {
	if len(prefixes) == 0 {
		return errors.New("no overlay prefix: give one per address family, e.g. 100.64.0.0/10 and fd5e:6d65:7368::/48 (the defaults)")
	}
	var errs []error
	var first [2]netip.Prefix
	for i, p := range prefixes {
		if !p.IsValid() {
			errs = append(errs, fmt.Errorf("overlay prefix %d is invalid: want ADDRESS/BITS such as 100.64.0.0/10", i+1))
			continue
		}
		if err := checkOverlayPrefix(p); err != nil {
			errs = append(errs, err)
			continue
		}
		f := overlayFamily(p.Addr())
		if first[f].IsValid() {
			errs = append(errs, fmt.Errorf("overlay prefixes %s and %s are of the same address family; give at most one per family", first[f], p))
			continue
		}
		first[f] = p
	}
	return errors.Join(errs...)
}

// checkOverlayPrefix checks one valid prefix (see checkOverlayPrefixes).
func checkOverlayPrefix(p netip.Prefix) error {
	if m := p.Masked(); m != p {
		return fmt.Errorf("overlay prefix %s has host bits set; write %s", p, m)
	}
	f := overlayFamily(p.Addr())
	use := useIPv4
	if f == 1 {
		use = useIPv6
	}
	if p.Addr().Is4In6() && p.Bits()-96 >= minOverlayBits[0] {
		return fmt.Errorf("overlay prefix %s is IPv4-mapped IPv6 (RFC 4291): sockets read these addresses as IPv4, so no policy could match them; write IPv4 prefixes as IPv4: %s",
			p, netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96))
	}
	if p.Bits() == 0 {
		return fmt.Errorf("overlay prefix %s is the whole %s address space (a default route): every host would send all its traffic into the overlay; %s", p, overlayFamilyName(f), use)
	}
	r, special := specialFor(p)
	if special && r.use != "" {
		use = r.use
	}
	if special && r.prefix.Bits() <= p.Bits() {
		return fmt.Errorf("overlay prefix %s %s: %s; %s", p, r.what, r.why, use)
	}
	if p.Bits() < minOverlayBits[f] {
		return fmt.Errorf("overlay prefix %s is too wide: prefixes shorter than /%d would route a large part of the %s address space into the overlay on every host; %s",
			p, minOverlayBits[f], overlayFamilyName(f), use)
	}
	if special {
		return fmt.Errorf("overlay prefix %s holds %s, which %s: %s; %s", p, r.prefix, r.what, r.why, use)
	}
	if p.Bits() > maxOverlayBits[f] {
		return fmt.Errorf("overlay prefix %s is too small: it leaves no room for nodes; give a /%d or shorter (the default is %s)", p, maxOverlayBits[f], DefaultOverlayPrefixes()[f])
	}
	return nil
}

// specialFor returns the special range p lies in (the narrowest, whose
// reason is the most precise) or, when p lies in none, the first range p holds.
func specialFor(p netip.Prefix) (overlaySpecialRange, bool) {
	var held, in *overlaySpecialRange
	for i := range overlaySpecialRanges {
		r := &overlaySpecialRanges[i]
		switch {
		case r.prefix.Addr().BitLen() != p.Addr().BitLen() || !r.prefix.Overlaps(p):
		case r.prefix.Bits() <= p.Bits():
			if in == nil || r.prefix.Bits() > in.prefix.Bits() {
				in = r
			}
		case held == nil:
			held = r
		}
	}
	switch {
	case in != nil:
		return *in, true
	case held != nil:
		return *held, true
	}
	return overlaySpecialRange{}, false
}

func overlayFamilyName(f int) string {
	if f == 0 {
		return "IPv4"
	}
	return "IPv6"
}

// maxStrayNodes bounds how many nodes checkEnrolledAddresses names.
const maxStrayNodes = 10

// checkEnrolledAddresses reports whether every overlay address of the enrolled
// nodes (addrs: node name -> its overlay addresses, of revoked nodes in
// quarantine too) lies in the overlay prefix of its family among prefixes (as
// checked by checkOverlayPrefixes). A controller restarted with other prefixes
// must not keep such addresses silently: the error names the nodes (the first
// maxStrayNodes, by name) and their stray addresses, and says what to do.
func checkEnrolledAddresses(prefixes []netip.Prefix, addrs map[string][]netip.Addr) error {
	var outside []string
	for _, name := range slices.Sorted(maps.Keys(addrs)) {
		var stray []string
		for _, a := range addrs[name] {
			if !slices.ContainsFunc(prefixes, func(p netip.Prefix) bool { return p.Contains(a) }) {
				stray = append(stray, a.String())
			}
		}
		if len(stray) > 0 {
			outside = append(outside, fmt.Sprintf("%s (%s)", name, strings.Join(stray, ", ")))
		}
	}
	if len(outside) == 0 {
		return nil
	}
	listed := outside[:min(len(outside), maxStrayNodes)]
	more := ""
	if n := len(outside) - len(listed); n > 0 {
		more = fmt.Sprintf(" and %d more", n)
	}
	shown := slices.Clone(prefixes)
	slices.SortFunc(shown, func(a, b netip.Prefix) int { return cmp.Compare(overlayFamily(a.Addr()), overlayFamily(b.Addr())) })
	ps := make([]string, len(shown))
	for i, p := range shown {
		ps[i] = p.String()
	}
	noun := "node has an overlay address"
	if len(outside) > 1 {
		noun = "nodes have overlay addresses"
	}
	return fmt.Errorf("%d enrolled %s outside the overlay prefixes %s: %s%s; "+
		"start the controller with the overlay prefixes those nodes were enrolled with (give --overlay-prefix once per "+
		"address family: a single one replaces both defaults); to move to new prefixes, start with the old ones, "+
		"delete those nodes (segmesh nodes delete NAME), restart with the new ones and enroll the nodes again with new join tokens",
		len(outside), noun, strings.Join(ps, ", "), strings.Join(listed, ", "), more)
}
