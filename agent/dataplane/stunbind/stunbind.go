// Package stunbind shares wireguard-go's UDP socket with STUN (RFC 8489).
//
// A *Bind wraps a conn.Bind: its receive functions divert STUN messages before
// WireGuard sees them, answer Binding requests from anyone (rate limited per source and in total, never
// larger than the request plus 32 bytes), and complete the Binding transactions
// started by (*Bind).Binding, so the address a NAT maps the WireGuard socket to
// can be learned from the socket itself.
package stunbind

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/stun/v3"
	"golang.org/x/time/rate"
	"golang.zx2c4.com/wireguard/conn"
)

const (
	// MaxInFlight is the most Binding transactions in flight at once.
	MaxInFlight = 256
	// answerRate and answerBurst bound the Binding requests answered, globally.
	answerRate  = 64
	answerBurst = 128
	// sourceRate and sourceBurst bound those of one source (an IPv4 address or
	// an IPv6 /64), so that one flooding source cannot use up the global budget
	// peers' connectivity checks need; maxSources bounds the map of sources,
	// which starts over when full.
	sourceRate  = 8
	sourceBurst = 16
	maxSources  = 4096
	// maxGrowth is how much larger than its request a response may be.
	maxGrowth = 32
	// magicCookie is the STUN magic cookie (RFC 8489 section 5).
	magicCookie = 0x2112A442
	headerSize  = 20
)

// Errors of Binding.
var (
	ErrClosed      = errors.New("stunbind: bind is not open")
	ErrTooMany     = errors.New("stunbind: too many STUN transactions in flight")
	ErrBadResponse = errors.New("stunbind: Binding response without a mapped address")
)

// Stats are counters since New.
type Stats struct {
	RequestsAnswered   uint64 // Binding requests answered
	RequestsDropped    uint64 // Binding requests over the rate limit, or with a too large answer
	ResponsesUnmatched uint64 // Binding responses for no transaction in flight, or from another address
	Invalid            uint64 // STUN-looking packets that failed to decode or were neither of the above
}

type result struct {
	addr netip.AddrPort
	err  error
}

type transaction struct {
	dst netip.AddrPort // unmapped
	ch  chan result    // buffered 1
}

// Bind is a conn.Bind that also speaks STUN on the same socket. Safe for
// concurrent use.
type Bind struct {
	conn.Bind
	log *slog.Logger
	lim *rate.Limiter

	limMu sync.Mutex
	bySrc map[netip.Addr]*rate.Limiter

	mu   sync.Mutex
	open bool
	txs  map[[stun.TransactionIDSize]byte]*transaction

	answered, dropped, unmatched, invalid atomic.Uint64
}

// New wraps inner; log may be nil (slog.Default).
func New(inner conn.Bind, log *slog.Logger) *Bind {
	if log == nil {
		log = slog.Default()
	}
	return &Bind{
		Bind:  inner,
		log:   log.With("component", "stunbind"),
		lim:   rate.NewLimiter(answerRate, answerBurst),
		bySrc: make(map[netip.Addr]*rate.Limiter),
		txs:   make(map[[stun.TransactionIDSize]byte]*transaction),
	}
}

// Open opens inner and wraps its receive functions so that STUN is diverted.
func (b *Bind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.Bind.Open(port)
	if err != nil {
		return nil, 0, err
	}
	wrapped := make([]conn.ReceiveFunc, len(fns))
	for i, fn := range fns {
		wrapped[i] = b.wrap(fn)
	}
	b.mu.Lock()
	b.open = true
	b.mu.Unlock()
	return wrapped, actual, nil
}

// Close closes inner; Binding calls in flight keep retrying until their context ends
// or the bind is opened again.
func (b *Bind) Close() error {
	b.mu.Lock()
	b.open = false
	b.mu.Unlock()
	return b.Bind.Close()
}

// Stats returns the counters.
func (b *Bind) Stats() Stats {
	return Stats{
		RequestsAnswered:   b.answered.Load(),
		RequestsDropped:    b.dropped.Load(),
		ResponsesUnmatched: b.unmatched.Load(),
		Invalid:            b.invalid.Load(),
	}
}

// IsSTUN reports whether p is to be handled as STUN rather than WireGuard: not a
// WireGuard message (type byte 1..4 then three zero bytes, WireGuard paper section
// 5.4), the first two bits zero, the magic cookie at bytes 4..8 and a length field
// (bytes 2..4, a multiple of 4) matching the packet (RFC 8489 section 5).
func IsSTUN(p []byte) bool {
	if len(p) < headerSize {
		return false
	}
	if p[0] >= 1 && p[0] <= 4 && p[1] == 0 && p[2] == 0 && p[3] == 0 {
		return false
	}
	if p[0]&0xC0 != 0 || binary.BigEndian.Uint32(p[4:8]) != magicCookie {
		return false
	}
	l := int(binary.BigEndian.Uint16(p[2:4]))
	return l%4 == 0 && l+headerSize == len(p)
}

// wrap diverts STUN from fn's batches, compacting packets, sizes and eps so that
// the first n entries are the WireGuard (or other non-STUN) packets. Packets are
// copied, not swapped: wireguard-go reads its buffers by index.
func (b *Bind) wrap(fn conn.ReceiveFunc) conn.ReceiveFunc {
	return func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		for {
			n, err := fn(packets, sizes, eps)
			j := 0
			for i := 0; i < n; i++ {
				p := packets[i][:sizes[i]]
				if IsSTUN(p) {
					b.handle(p, eps[i])
					continue
				}
				if j != i {
					sizes[j] = copy(packets[j], p)
					eps[j] = eps[i]
				}
				j++
			}
			if j > 0 || err != nil || n == 0 {
				return j, err
			}
		}
	}
}

func endpointAddr(ep conn.Endpoint) (netip.AddrPort, bool) {
	if ep == nil {
		return netip.AddrPort{}, false
	}
	ap, err := netip.ParseAddrPort(ep.DstToString())
	if err != nil {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
}

func (b *Bind) handle(p []byte, ep conn.Endpoint) {
	m := &stun.Message{Raw: append([]byte(nil), p...)}
	src, ok := endpointAddr(ep)
	if err := m.Decode(); err != nil || !ok {
		b.invalid.Add(1)
		return
	}
	switch m.Type {
	case stun.BindingRequest:
		b.answer(m, src, ep)
	case stun.BindingSuccess:
		b.complete(m, src)
	default:
		b.invalid.Add(1)
	}
}

// allow reports whether a Binding request from src may be answered now: within
// its source's budget (sourceRate) and then the global one (answerRate).
func (b *Bind) allow(src netip.Addr) bool {
	key := src.Unmap()
	if key.Is6() {
		p, _ := key.Prefix(64)
		key = p.Addr()
	}
	b.limMu.Lock()
	defer b.limMu.Unlock()
	l := b.bySrc[key]
	if l == nil {
		if len(b.bySrc) >= maxSources {
			clear(b.bySrc)
		}
		l = rate.NewLimiter(sourceRate, sourceBurst)
		b.bySrc[key] = l
	}
	return l.Allow() && b.lim.Allow()
}

func (b *Bind) answer(req *stun.Message, src netip.AddrPort, ep conn.Endpoint) {
	if !b.allow(src.Addr()) {
		b.dropped.Add(1)
		return
	}
	resp, err := stun.Build(stun.NewTransactionIDSetter(req.TransactionID), stun.BindingSuccess,
		&stun.XORMappedAddress{IP: net.IP(src.Addr().AsSlice()), Port: int(src.Port())})
	if err != nil || len(resp.Raw) > len(req.Raw)+maxGrowth {
		b.dropped.Add(1)
		return
	}
	if err := b.Bind.Send([][]byte{resp.Raw}, ep); err != nil {
		b.log.Debug("sending STUN Binding response", "to", src, "err", err)
		b.dropped.Add(1)
		return
	}
	b.answered.Add(1)
}

func (b *Bind) complete(m *stun.Message, src netip.AddrPort) {
	b.mu.Lock()
	tx := b.txs[m.TransactionID]
	b.mu.Unlock()
	if tx == nil || tx.dst != src {
		b.unmatched.Add(1)
		return
	}
	var r result
	var xa stun.XORMappedAddress
	if err := xa.GetFrom(m); err == nil {
		r.addr = toAddrPort(xa.IP, xa.Port)
	} else {
		var ma stun.MappedAddress
		if err := ma.GetFrom(m); err == nil {
			r.addr = toAddrPort(ma.IP, ma.Port)
		}
	}
	if !r.addr.IsValid() {
		r.err = ErrBadResponse
	}
	select {
	case tx.ch <- r:
	default: // a duplicate response
	}
}

func toAddrPort(ip net.IP, port int) netip.AddrPort {
	a, ok := netip.AddrFromSlice(ip)
	if !ok || port < 0 || port > 0xFFFF {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(a.Unmap(), uint16(port))
}

// retransmit is the delay before the i-th retransmission (i from 0): 250 ms, 500 ms,
// then doubling up to 4 s (sends at 0, 250 ms, 750 ms, 1.75 s, ...).
func retransmit(i int) time.Duration {
	d := 250 * time.Millisecond << min(i, 4)
	return min(d, 4*time.Second)
}

// Binding sends a STUN Binding request (RFC 8489 section 3) to dst from the
// WireGuard socket and returns the address dst saw it from (XOR-MAPPED-ADDRESS, else
// MAPPED-ADDRESS). It retransmits until a success response from dst with the
// request's transaction ID arrives or ctx ends (then ctx's error, wrapped). Errors:
// ErrClosed if the bind is not open, ErrTooMany beyond MaxInFlight concurrent calls,
// ErrBadResponse if the response has no usable address.
func (b *Bind) Binding(ctx context.Context, dst netip.AddrPort) (netip.AddrPort, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if !dst.IsValid() {
		return netip.AddrPort{}, fmt.Errorf("stunbind: invalid STUN server address %v", dst)
	}
	req, err := stun.Build(stun.TransactionID, stun.BindingRequest)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("stunbind: building Binding request: %w", err)
	}
	tx := &transaction{dst: dst, ch: make(chan result, 1)}
	b.mu.Lock()
	switch {
	case !b.open:
		err = ErrClosed
	case len(b.txs) >= MaxInFlight:
		err = ErrTooMany
	default:
		b.txs[req.TransactionID] = tx
	}
	b.mu.Unlock()
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer func() {
		b.mu.Lock()
		delete(b.txs, req.TransactionID)
		b.mu.Unlock()
	}()
	ep, err := b.Bind.ParseEndpoint(dst.String())
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("stunbind: endpoint %v: %w", dst, err)
	}
	t := time.NewTimer(0)
	defer t.Stop()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return netip.AddrPort{}, fmt.Errorf("stunbind: Binding with %v: %w", dst, ctx.Err())
		case r := <-tx.ch:
			if r.err != nil {
				return netip.AddrPort{}, fmt.Errorf("stunbind: Binding with %v: %w", dst, r.err)
			}
			return r.addr, nil
		case <-t.C:
			if err := b.Bind.Send([][]byte{req.Raw}, ep); err != nil {
				b.log.Debug("sending STUN Binding request", "to", dst, "err", err)
			}
			t.Reset(retransmit(i))
		}
	}
}
