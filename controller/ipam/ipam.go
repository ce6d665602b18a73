// Package ipam allocates overlay addresses from the controller's overlay prefixes.
//
// Allocation walks a prefix from a cursor (normally the last address handed out)
// and returns the next address that is usable and not in use, wrapping around once.
// The network address and the first host address of every prefix are reserved
// (the first host address is kept free for a future gateway/controller role), and
// so is the IPv4 broadcast address. Whether an address is in use is decided by the
// caller, so the same code serves any store.
package ipam

import (
	"errors"
	"fmt"
	"net/netip"
)

// ErrExhausted is returned (wrapped) by Next when every usable address is in use.
var ErrExhausted = errors.New("overlay address pool exhausted")

// Range returns the first and last allocatable address of prefix, or an error when
// the prefix is invalid or holds no allocatable address (IPv4 /31 and /32, IPv6
// /127 and /128).
func Range(prefix netip.Prefix) (first, last netip.Addr, err error) {
	if !prefix.IsValid() {
		return first, last, fmt.Errorf("invalid overlay prefix %q", prefix)
	}
	p := prefix.Masked()
	first = p.Addr().Next().Next() // skip network and first host address
	last = lastAddr(p)
	if p.Addr().Is4() {
		last = last.Prev() // broadcast
	}
	if !first.IsValid() || !last.IsValid() || !p.Contains(first) || last.Less(first) {
		return netip.Addr{}, netip.Addr{}, fmt.Errorf("overlay prefix %s is too small: it has no allocatable address", prefix)
	}
	return first, last, nil
}

// Next returns the first allocatable address of prefix after cursor for which
// inUse reports false, wrapping from the end of the prefix to its start. A cursor
// outside the allocatable range (including the zero Addr) starts the walk at the
// first allocatable address. It returns an error wrapping ErrExhausted when every
// allocatable address is in use, and any error of inUse wrapped with context.
func Next(prefix netip.Prefix, cursor netip.Addr, inUse func(netip.Addr) (bool, error)) (netip.Addr, error) {
	first, last, err := Range(prefix)
	if err != nil {
		return netip.Addr{}, err
	}
	start := first
	if cursor.IsValid() && cursor.BitLen() == first.BitLen() && !cursor.Less(first) && cursor.Less(last) {
		start = cursor.Next()
	}
	a := start
	for {
		used, err := inUse(a)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("checking overlay address %s: %w", a, err)
		}
		if !used {
			return a, nil
		}
		if a == last {
			a = first
		} else {
			a = a.Next()
		}
		if a == start {
			return netip.Addr{}, fmt.Errorf("prefix %s: %w", prefix, ErrExhausted)
		}
	}
}

// lastAddr returns the highest address of the masked prefix p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	bits := p.Bits()
	for i := range b {
		for j := 0; j < 8; j++ {
			if i*8+j >= bits {
				b[i] |= 0x80 >> j
			}
		}
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}
