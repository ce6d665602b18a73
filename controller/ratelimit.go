package controller

import (
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Limits on refused enrollments. A source address or a token ID may be refused
// refusalBurst times at once and then refusalRate times per second; past that its
// enrollments are answered with ResourceExhausted before the token is looked up.
// Log lines and audit records of refusals share one budget for the whole
// controller (refusalLogRate per second), and say how many were suppressed.
const (
	refusalBurst   = 10
	refusalRate    = 1.0
	refusalLogRate = 5.0
	// refusalKeys bounds each limiter map; when full it starts over, which can
	// only make the limiter more lenient for a moment, never grow memory.
	refusalKeys = 1 << 16
)

// refusalLimiter throttles refused enrollments per source address and per token
// ID, and their log lines. Safe for concurrent use.
type refusalLimiter struct {
	// burst is the number of refusals a key may have at once (refusalBurst).
	burst      int
	mu         sync.Mutex
	bySource   map[netip.Addr]*rate.Limiter
	byToken    map[string]*rate.Limiter
	logs       *rate.Limiter
	suppressed int
}

func newRefusalLimiter() *refusalLimiter {
	return &refusalLimiter{
		burst:    refusalBurst,
		bySource: map[netip.Addr]*rate.Limiter{},
		byToken:  map[string]*rate.Limiter{},
		logs:     rate.NewLimiter(refusalLogRate, 2*int(refusalLogRate)),
	}
}

// sourceAddr returns the IP of a "host:port" peer address (zero when unparsable).
func sourceAddr(peer string) netip.Addr {
	ap, err := netip.ParseAddrPort(peer)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// blocked reports whether source or tokenID used up its refusal budget at now.
func (l *refusalLimiter) blocked(now time.Time, source netip.Addr, tokenID string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if lim := l.bySource[source]; lim != nil && lim.TokensAt(now) < 1 {
		return true
	}
	if lim := l.byToken[tokenID]; lim != nil && lim.TokensAt(now) < 1 {
		return true
	}
	return false
}

// refused charges one refusal to source and tokenID (when not empty).
func (l *refusalLimiter) refused(now time.Time, source netip.Addr, tokenID string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	charge(l.bySource, source, now, l.burst)
	if tokenID != "" {
		charge(l.byToken, tokenID, now, l.burst)
	}
}

func charge[K comparable](m map[K]*rate.Limiter, k K, now time.Time, burst int) {
	lim := m[k]
	if lim == nil {
		if len(m) >= refusalKeys {
			clear(m)
		}
		lim = rate.NewLimiter(refusalRate, burst)
		m[k] = lim
	}
	lim.AllowN(now, 1)
}

// logAllowed reports whether one more refusal may be logged (and audited) at now,
// and how many were suppressed since the last one that was.
func (l *refusalLimiter) logAllowed(now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.logs.AllowN(now, 1) {
		l.suppressed++
		return false, 0
	}
	n := l.suppressed
	l.suppressed = 0
	return true, n
}
