package policy

import (
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"pgregory.net/rapid"
)

func pfxs(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func TestCIDRPrefixes(t *testing.T) {
	tests := []struct {
		name string
		in   []CIDR
		want []netip.Prefix
	}{
		{"single", []CIDR{{Prefix: netip.MustParsePrefix("10.0.0.0/8")}}, pfxs("10.0.0.0/8")},
		{"except upper half", []CIDR{{Prefix: netip.MustParsePrefix("198.51.100.0/24"), Except: pfxs("198.51.100.128/25")}}, pfxs("198.51.100.0/25")},
		{"except one address", []CIDR{{Prefix: netip.MustParsePrefix("10.0.0.0/30"), Except: pfxs("10.0.0.1/32")}}, pfxs("10.0.0.0/32", "10.0.0.2/31")},
		{"except in the middle", []CIDR{{Prefix: netip.MustParsePrefix("10.0.0.0/8"), Except: pfxs("10.128.0.0/16")}},
			pfxs("10.0.0.0/9", "10.129.0.0/16", "10.130.0.0/15", "10.132.0.0/14", "10.136.0.0/13", "10.144.0.0/12", "10.160.0.0/11", "10.192.0.0/10")},
		{"overlapping and adjacent entries merge", []CIDR{
			{Prefix: netip.MustParsePrefix("192.0.2.0/25")},
			{Prefix: netip.MustParsePrefix("192.0.2.128/25")},
			{Prefix: netip.MustParsePrefix("192.0.2.64/26")},
		}, pfxs("192.0.2.0/24")},
		{"except applies to its own entry only", []CIDR{
			{Prefix: netip.MustParsePrefix("10.0.0.0/24"), Except: pfxs("10.0.0.0/25")},
			{Prefix: netip.MustParsePrefix("10.0.0.0/25")},
		}, pfxs("10.0.0.0/24")},
		{"families sorted, v4 first", []CIDR{
			{Prefix: netip.MustParsePrefix("2001:db8::/32"), Except: pfxs("2001:db8::/33")},
			{Prefix: netip.MustParsePrefix("0.0.0.0/0"), Except: pfxs("128.0.0.0/1")},
		}, pfxs("0.0.0.0/1", "2001:db8:8000::/33")},
		{"whole address spaces", []CIDR{
			{Prefix: netip.MustParsePrefix("::/0"), Except: pfxs("::/1")},
			{Prefix: netip.MustParsePrefix("::/1")},
			{Prefix: netip.MustParsePrefix("0.0.0.0/0")},
		}, pfxs("0.0.0.0/0", "::/0")},
		{"top of the v6 space", []CIDR{{Prefix: netip.MustParsePrefix("ffff::/16"), Except: pfxs("ffff::/17")}}, pfxs("ffff:8000::/17")},
		{"top of the v4 space", []CIDR{{Prefix: netip.MustParsePrefix("255.255.255.0/24"), Except: pfxs("255.255.255.0/25")}}, pfxs("255.255.255.128/25")},
	}
	for _, tt := range tests {
		if got := cidrPrefixes(tt.in); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: cidrPrefixes = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestCIDRPrefixesProperties checks on random input that the result holds
// exactly the addresses of the CIDRs minus their excepts, and that it is the
// shortest such list: sorted, masked, disjoint, and without two sibling prefixes
// (which could be merged into their parent).
func TestCIDRPrefixesProperties(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		v6 := rapid.Bool().Draw(t, "v6")
		base := netip.MustParseAddr("10.20.0.0")
		bitLen := 32
		if v6 {
			base = netip.MustParseAddr("2001:db8:0:0:ffff:ffff:ffff:0")
			bitLen = 128
		}
		// Random prefixes inside a /16-sized window near base, to make overlaps likely.
		genPrefix := func(label string, minBits int) netip.Prefix {
			off := rapid.Uint32Range(0, 1<<16-1).Draw(t, label+"-off")
			bits := rapid.IntRange(max(minBits, bitLen-16), bitLen).Draw(t, label+"-bits")
			a := addrAdd(base, uint64(off))
			return netip.PrefixFrom(a, bits).Masked()
		}
		var cidrs []CIDR
		for i := range rapid.IntRange(1, 4).Draw(t, "n") {
			p := genPrefix("cidr"+string(rune('a'+i)), 0)
			c := CIDR{Prefix: p}
			nexcept := 0
			if p.Bits() < bitLen {
				nexcept = rapid.IntRange(0, 3).Draw(t, "nexcept")
			}
			for j := range nexcept {
				e := genPrefix("except"+string(rune('a'+i))+string(rune('a'+j)), p.Bits()+1)
				if e.Bits() > p.Bits() && p.Contains(e.Addr()) {
					c.Except = append(c.Except, e)
				}
			}
			cidrs = append(cidrs, c)
		}
		got := cidrPrefixes(cidrs)
		if !slices.IsSortedFunc(got, comparePrefixes) {
			t.Fatalf("not sorted: %v", got)
		}
		for i, p := range got {
			if p != p.Masked() {
				t.Fatalf("%v has host bits", p)
			}
			for _, q := range got[i+1:] {
				if p.Overlaps(q) {
					t.Fatalf("%v overlaps %v", p, q)
				}
				if p.Bits() == q.Bits() && p.Bits() > 0 {
					pp, _ := p.Addr().Prefix(p.Bits() - 1)
					qp, _ := q.Addr().Prefix(q.Bits() - 1)
					if pp == qp {
						t.Fatalf("siblings %v and %v should be merged", p, q)
					}
				}
			}
		}
		// Membership at every boundary address (and its neighbours) of the input and output.
		var probes []netip.Addr
		for _, list := range [][]netip.Prefix{got, prefixesOf(cidrs)} {
			for _, p := range list {
				r := prefixRange(p)
				first, last := fromU128(r.first, r.bitLen), fromU128(r.last, r.bitLen)
				probes = append(probes, first, last, first.Prev(), last.Next())
			}
		}
		for _, a := range probes {
			if !a.IsValid() {
				continue
			}
			want := false
			for _, c := range cidrs {
				if c.Prefix.Contains(a) && !slices.ContainsFunc(c.Except, func(e netip.Prefix) bool { return e.Contains(a) }) {
					want = true
				}
			}
			in := slices.ContainsFunc(got, func(p netip.Prefix) bool { return p.Contains(a) })
			if in != want {
				t.Fatalf("address %v: in result = %v, want %v (result %v)", a, in, want, got)
			}
		}
	})
}

func prefixesOf(cidrs []CIDR) []netip.Prefix {
	var out []netip.Prefix
	for _, c := range cidrs {
		out = append(out, c.Prefix)
		out = append(out, c.Except...)
	}
	return out
}

func addrAdd(a netip.Addr, n uint64) netip.Addr {
	v := toU128(a)
	lo := v.lo + n
	if lo < v.lo {
		v.hi++
	}
	v.lo = lo
	if a.Is4() {
		v.lo &= 0xffffffff
	}
	return fromU128(v, a.BitLen())
}
