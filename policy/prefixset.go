package policy

import (
	"cmp"
	"encoding/binary"
	"math/bits"
	"net/netip"
	"slices"
)

// u128 is an address as a 128-bit unsigned integer; IPv4 addresses use the low 32 bits.
type u128 struct{ hi, lo uint64 }

func (a u128) cmp(b u128) int { return cmp.Or(cmp.Compare(a.hi, b.hi), cmp.Compare(a.lo, b.lo)) }
func (a u128) or(b u128) u128 { return u128{a.hi | b.hi, a.lo | b.lo} }

func (a u128) add1() u128 {
	lo := a.lo + 1
	hi := a.hi
	if lo == 0 {
		hi++
	}
	return u128{hi, lo}
}

func (a u128) sub1() u128 {
	lo := a.lo - 1
	hi := a.hi
	if a.lo == 0 {
		hi--
	}
	return u128{hi, lo}
}

func (a u128) trailingZeros() int {
	if a.lo != 0 {
		return bits.TrailingZeros64(a.lo)
	}
	if a.hi != 0 {
		return 64 + bits.TrailingZeros64(a.hi)
	}
	return 128
}

// lowMask returns a value with the low n bits set, 0 <= n <= 128.
func lowMask(n int) u128 {
	switch {
	case n <= 0:
		return u128{}
	case n < 64:
		return u128{0, 1<<uint(n) - 1}
	case n < 128:
		return u128{1<<uint(n-64) - 1, ^uint64(0)}
	default:
		return u128{^uint64(0), ^uint64(0)}
	}
}

func toU128(a netip.Addr) u128 {
	if a.Is4() {
		b := a.As4()
		return u128{0, uint64(binary.BigEndian.Uint32(b[:]))}
	}
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

func fromU128(v u128, bitLen int) netip.Addr {
	if bitLen == 32 {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], uint32(v.lo))
		return netip.AddrFrom4(b)
	}
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], v.hi)
	binary.BigEndian.PutUint64(b[8:], v.lo)
	return netip.AddrFrom16(b)
}

// addrRange is an inclusive range of addresses of one family (bitLen 32 or 128).
type addrRange struct {
	bitLen      int
	first, last u128
}

func prefixRange(p netip.Prefix) addrRange {
	p = p.Masked()
	bl := p.Addr().BitLen()
	first := toU128(p.Addr())
	return addrRange{bitLen: bl, first: first, last: first.or(lowMask(bl - p.Bits()))}
}

func compareRanges(a, b addrRange) int {
	return cmp.Or(cmp.Compare(a.bitLen, b.bitLen), a.first.cmp(b.first), a.last.cmp(b.last))
}

// subtractRange removes x from every range of rs (one family) and returns the rest.
func subtractRange(rs []addrRange, x addrRange) []addrRange {
	var out []addrRange
	for _, r := range rs {
		if r.bitLen != x.bitLen || x.last.cmp(r.first) < 0 || x.first.cmp(r.last) > 0 {
			out = append(out, r)
			continue
		}
		if r.first.cmp(x.first) < 0 {
			out = append(out, addrRange{r.bitLen, r.first, x.first.sub1()})
		}
		if x.last.cmp(r.last) < 0 {
			out = append(out, addrRange{r.bitLen, x.last.add1(), r.last})
		}
	}
	return out
}

// rangePrefixes appends to dst the fewest prefixes that exactly cover r.
func rangePrefixes(dst []netip.Prefix, r addrRange) []netip.Prefix {
	familyMax := lowMask(r.bitLen)
	s := r.first
	for {
		k := min(s.trailingZeros(), r.bitLen)
		for k > 0 && s.or(lowMask(k)).cmp(r.last) > 0 {
			k--
		}
		dst = append(dst, netip.PrefixFrom(fromU128(s, r.bitLen), r.bitLen-k))
		end := s.or(lowMask(k))
		if end.cmp(r.last) >= 0 || end.cmp(familyMax) >= 0 {
			return dst
		}
		s = end.add1()
	}
}

// cidrPrefixes returns the addresses of an external segment, the union of every
// entry's Prefix minus its Except prefixes, as the shortest sorted list of
// disjoint prefixes (IPv4 first, then by address).
func cidrPrefixes(cidrs []CIDR) []netip.Prefix {
	var all []addrRange
	for _, c := range cidrs {
		rs := []addrRange{prefixRange(c.Prefix)}
		for _, e := range c.Except {
			rs = subtractRange(rs, prefixRange(e))
		}
		all = append(all, rs...)
	}
	slices.SortFunc(all, compareRanges)
	var merged []addrRange
	for _, r := range all {
		if n := len(merged); n > 0 {
			m := &merged[n-1]
			if m.bitLen == r.bitLen && (m.last.cmp(lowMask(r.bitLen)) == 0 || r.first.cmp(m.last.add1()) <= 0) {
				if r.last.cmp(m.last) > 0 {
					m.last = r.last
				}
				continue
			}
		}
		merged = append(merged, r)
	}
	var out []netip.Prefix
	for _, r := range merged {
		out = rangePrefixes(out, r)
	}
	return out
}
