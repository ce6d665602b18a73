package firewall

import (
	"net/netip"
	"slices"
)

// Interval is an inclusive address range [First, Last] of one family, the unit an
// nftables interval set stores (in the kernel: a start element and an "interval end"
// element holding Last+1, omitted when Last is the family's highest address).
type Interval struct{ First, Last netip.Addr }

// Compare orders intervals by First, then Last.
func (iv Interval) Compare(o Interval) int {
	if c := iv.First.Compare(o.First); c != 0 {
		return c
	}
	return iv.Last.Compare(o.Last)
}

// Contains reports whether a lies in iv.
func (iv Interval) Contains(a netip.Addr) bool {
	return iv.First.Compare(a) <= 0 && a.Compare(iv.Last) <= 0
}

// Prefix returns iv as a prefix when it is exactly one.
func (iv Interval) Prefix() (netip.Prefix, bool) {
	bits := iv.First.BitLen()
	for b := 0; b <= bits; b++ {
		p := netip.PrefixFrom(iv.First, b)
		if p.Masked().Addr() == iv.First && LastAddr(p) == iv.Last {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

// PrefixIntervals turns prefixes of one family into sorted, non-overlapping
// intervals: a prefix contained in another is dropped (the kernel rejects
// overlapping intervals); adjacent prefixes stay separate intervals, which the
// kernel accepts.
func PrefixIntervals(ps []netip.Prefix) []Interval {
	sorted := make([]netip.Prefix, 0, len(ps))
	for _, p := range ps {
		sorted = append(sorted, p.Masked())
	}
	slices.SortFunc(sorted, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	var out []Interval
	for _, p := range sorted {
		iv := Interval{p.Addr(), LastAddr(p)}
		if n := len(out); n > 0 && out[n-1].Last.Compare(iv.First) >= 0 {
			continue // sorted by start then length: an overlapping prefix is contained
		}
		out = append(out, iv)
	}
	return out
}

// LastAddr returns the highest address of p (p must be masked).
func LastAddr(p netip.Prefix) netip.Addr {
	a := p.Addr()
	if a.Is4() {
		b := a.As4()
		setHostBits(b[:], p.Bits())
		return netip.AddrFrom4(b)
	}
	b := a.As16()
	setHostBits(b[:], p.Bits())
	return netip.AddrFrom16(b)
}

func setHostBits(b []byte, bits int) {
	for i := range b {
		switch {
		case bits >= (i+1)*8:
		case bits <= i*8:
			b[i] = 0xff
		default:
			b[i] |= 0xff >> (bits - i*8)
		}
	}
}

// IntervalPrefixes returns the shortest list of prefixes covering exactly iv.
func IntervalPrefixes(iv Interval) []netip.Prefix {
	var out []netip.Prefix
	first := iv.First
	for {
		// The largest prefix that starts at first and ends at or before Last.
		bits := first.BitLen()
		for bits > 0 {
			p := netip.PrefixFrom(first, bits-1)
			if p.Masked().Addr() != first || LastAddr(p).Compare(iv.Last) > 0 {
				break
			}
			bits--
		}
		p := netip.PrefixFrom(first, bits)
		out = append(out, p)
		end := LastAddr(p)
		if end.Compare(iv.Last) >= 0 {
			return out
		}
		first = end.Next()
	}
}

// containsAddr reports whether the sorted, non-overlapping ivs hold a.
func containsAddr(ivs []Interval, a netip.Addr) bool {
	i, _ := slices.BinarySearchFunc(ivs, a, func(iv Interval, a netip.Addr) int { return iv.First.Compare(a) })
	// ivs[i-1] is the last interval starting at or before a (or ivs[i] starts at a).
	if i < len(ivs) && ivs[i].First == a {
		return true
	}
	return i > 0 && ivs[i-1].Contains(a)
}

// minusIntervals returns the intervals of a (sorted) that are not in b (sorted).
func minusIntervals(a, b []Interval) []Interval {
	var out []Interval
	j := 0
	for _, iv := range a {
		for j < len(b) && b[j].Compare(iv) < 0 {
			j++
		}
		if j < len(b) && b[j] == iv {
			continue
		}
		out = append(out, iv)
	}
	return out
}
