package nft

import (
	"net/netip"
	"slices"

	"github.com/google/nftables"

	"segmesh/agent/firewall"
)

// intervalElements renders intervals as interval set elements: a start element and
// an "interval end" element holding Last+1, omitted when Last is the family's highest
// address.
func intervalElements(ivs []firewall.Interval) []nftables.SetElement {
	out := make([]nftables.SetElement, 0, 2*len(ivs))
	for _, iv := range ivs {
		out = append(out, nftables.SetElement{Key: iv.First.AsSlice()})
		if next := iv.Last.Next(); next.IsValid() {
			out = append(out, nftables.SetElement{Key: next.AsSlice(), IntervalEnd: true})
		}
	}
	return out
}

// lastAddr returns the highest address of addrLen bytes.
func lastAddr(addrLen int) netip.Addr {
	if addrLen == 16 {
		return netip.AddrFrom16([16]byte{0: 0xff, 1: 0xff, 2: 0xff, 3: 0xff, 4: 0xff, 5: 0xff, 6: 0xff, 7: 0xff,
			8: 0xff, 9: 0xff, 10: 0xff, 11: 0xff, 12: 0xff, 13: 0xff, 14: 0xff, 15: 0xff})
	}
	return netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// elementIntervals parses the elements of an interval set (in any order) of addresses
// of addrLen bytes into sorted intervals. A lone "interval end" at the zero address,
// which nft(8) adds to interval sets, is ignored. A start without an end runs to the
// highest address. A catch-all element makes the set the whole address space.
func elementIntervals(elems []nftables.SetElement, addrLen int) []firewall.Interval {
	type el struct {
		a   netip.Addr
		end bool
	}
	es := make([]el, 0, len(elems))
	for _, e := range elems {
		if len(e.Key) == 0 && !e.IntervalEnd {
			// The catch-all element (NFT_SET_ELEM_CATCHALL, the only element without a
			// key; the library drops its flag) makes every lookup match.
			first := netip.IPv4Unspecified()
			if addrLen == 16 {
				first = netip.IPv6Unspecified()
			}
			return []firewall.Interval{{First: first, Last: lastAddr(addrLen)}}
		}
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
	out := make([]firewall.Interval, 0, len(es)/2+1)
	var start netip.Addr
	open := false
	for _, e := range es {
		switch {
		case !e.end && open:
			// A new start closes the open interval just below it.
			out = append(out, firewall.Interval{First: start, Last: e.a.Prev()})
			start = e.a
		case !e.end:
			start, open = e.a, true
		case open:
			if e.a.Compare(start) > 0 {
				out = append(out, firewall.Interval{First: start, Last: e.a.Prev()})
			}
			open = false
		}
	}
	if open {
		out = append(out, firewall.Interval{First: start, Last: lastAddr(addrLen)})
	}
	if len(out) == 0 {
		return nil // as firewall.Build holds an empty set
	}
	return out
}
