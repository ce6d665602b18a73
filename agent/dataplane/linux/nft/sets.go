package nft

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/google/nftables"
)

// interval is an inclusive address range [First, Last] of one family, the unit an
// nftables interval set stores (as a start element and an "interval end" element
// holding Last+1, omitted when Last is the family's highest address).
type interval struct{ First, Last netip.Addr }

// prefixIntervals turns prefixes of one family into sorted, non-overlapping intervals:
// a prefix contained in another is dropped (the kernel rejects overlapping intervals);
// adjacent prefixes stay separate intervals, which the kernel accepts.
func prefixIntervals(ps []netip.Prefix) []interval {
	sorted := make([]netip.Prefix, 0, len(ps))
	for _, p := range ps {
		sorted = append(sorted, p.Masked())
	}
	slices.SortFunc(sorted, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return cmp.Compare(a.Bits(), b.Bits())
	})
	var out []interval
	for _, p := range sorted {
		iv := interval{p.Addr(), lastAddr(p)}
		if n := len(out); n > 0 && out[n-1].Last.Compare(iv.First) >= 0 {
			continue // sorted by start then length: an overlapping prefix is contained
		}
		out = append(out, iv)
	}
	return out
}

// lastAddr returns the highest address of p (p must be masked).
func lastAddr(p netip.Prefix) netip.Addr {
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

// intervalPrefixes returns the shortest list of prefixes covering exactly iv.
func intervalPrefixes(iv interval) []netip.Prefix {
	var out []netip.Prefix
	first := iv.First
	for {
		// The largest prefix that starts at first and ends at or before Last.
		bits := first.BitLen()
		for bits > 0 {
			p := netip.PrefixFrom(first, bits-1)
			if p.Masked().Addr() != first || lastAddr(p).Compare(iv.Last) > 0 {
				break
			}
			bits--
		}
		p := netip.PrefixFrom(first, bits)
		out = append(out, p)
		end := lastAddr(p)
		if end.Compare(iv.Last) >= 0 {
			return out
		}
		first = end.Next()
	}
}

// intervalElements renders intervals as interval set elements.
func intervalElements(ivs []interval) []nftables.SetElement {
	out := make([]nftables.SetElement, 0, 2*len(ivs))
	for _, iv := range ivs {
		out = append(out, nftables.SetElement{Key: iv.First.AsSlice()})
		if next := iv.Last.Next(); next.IsValid() {
			out = append(out, nftables.SetElement{Key: next.AsSlice(), IntervalEnd: true})
		}
	}
	return out
}

// elementIntervals parses the elements of an interval set (in any order) of addresses
// of addrLen bytes. A lone "interval end" at the zero address, which nft(8) adds to
// interval sets, is ignored. A start without an end runs to the highest address.
func elementIntervals(elems []nftables.SetElement, addrLen int) []interval {
	type el struct {
		a   netip.Addr
		end bool
	}
	var es []el
	for _, e := range elems {
		a, ok := netip.AddrFromSlice(e.Key)
		if !ok || len(e.Key) != addrLen {
			continue
		}
		es = append(es, el{a, e.IntervalEnd})
	}
	// At equal keys an interval end (of the previous interval) sorts before a start.
	slices.SortFunc(es, func(x, y el) int {
		if c := x.a.Compare(y.a); c != 0 {
			return c
		}
		switch {
		case x.end == y.end:
			return 0
		case x.end:
			return -1
		default:
			return 1
		}
	})
	var out []interval
	var start netip.Addr
	open := false
	for _, e := range es {
		switch {
		case !e.end && open:
			// A new start closes the open interval just below it.
			out = append(out, interval{start, e.a.Prev()})
			start = e.a
		case !e.end:
			start, open = e.a, true
		case open:
			if e.a.Compare(start) > 0 {
				out = append(out, interval{start, e.a.Prev()})
			}
			open = false
		}
	}
	if open {
		last := netip.AddrFrom4([4]byte{255, 255, 255, 255})
		if addrLen == 16 {
			last = netip.AddrFrom16([16]byte{0: 0xff, 1: 0xff, 2: 0xff, 3: 0xff, 4: 0xff, 5: 0xff, 6: 0xff, 7: 0xff,
				8: 0xff, 9: 0xff, 10: 0xff, 11: 0xff, 12: 0xff, 13: 0xff, 14: 0xff, 15: 0xff})
		}
		out = append(out, interval{start, last})
	}
	return out
}
