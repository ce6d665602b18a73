package controller

import (
	"maps"
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

// sourceAddr returns the source key (see sourceKey: an IPv4 address or an IPv6
// /64) of a "host:port" peer address (zero when unparsable).
func sourceAddr(peer string) netip.Addr {
	ap, err := netip.ParseAddrPort(peer)
	if err != nil {
		return netip.Addr{}
	}
	return sourceKey(ap.Addr())
}

// sourceBlocked reports whether source used up its refusal budget at now: its
// enrollments are refused before anything is looked up.
func (l *refusalLimiter) sourceBlocked(now time.Time, source netip.Addr) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	lim := l.bySource[source]
	return lim != nil && lim.TokensAt(now) < 1
}

// tokenBlocked reports whether tokenID used up its refusal budget at now. It is
// asked only after a wrong secret, so that guessing a token's secret from many
// sources is slow while its holder, with the right secret, is never throttled.
func (l *refusalLimiter) tokenBlocked(now time.Time, tokenID string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	lim := l.byToken[tokenID]
	return lim != nil && lim.TokensAt(now) < 1
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

// charge takes one refusal from k's limiter in m, creating it when needed. When
// m is full it first forgets the keys whose budget refilled (they owe nothing),
// and only when none did, all of them.
func charge[K comparable](m map[K]*rate.Limiter, k K, now time.Time, burst int) {
	lim := m[k]
	if lim == nil {
		if len(m) >= refusalKeys {
			maps.DeleteFunc(m, func(_ K, l *rate.Limiter) bool { return l.TokensAt(now) >= float64(l.Burst()) })
			if len(m) >= refusalKeys {
				clear(m)
			}
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

// Refused operator calls are audited within a budget per credential: burst
// refusalAuditBurst, then refusalAuditRate per second.
const (
	refusalAuditBurst = 20
	refusalAuditRate  = 1.0
)

// Endpoint changes a node may make: endpointChangeBurst at once, then
// endpointChangeRate per second (roaming is rare; churn costs every peer).
const (
	endpointChangeBurst = 10
	endpointChangeRate  = 0.2
)

// actorLimiter is a rate limit per actor name (operator credentials, nodes).
type actorLimiter struct {
	mu    sync.Mutex
	lims  map[string]*rate.Limiter
	rate  rate.Limit
	burst int
}

func newActorLimiter() *actorLimiter {
	return newActorLimiterWith(refusalAuditRate, refusalAuditBurst)
}

func newActorLimiterWith(r float64, burst int) *actorLimiter {
	return &actorLimiter{lims: map[string]*rate.Limiter{}, rate: rate.Limit(r), burst: burst}
}

// limiter returns actor's limiter, made on first use; l.mu must be held. At most
// refusalKeys actors are kept: past that, every budget starts afresh.
func (l *actorLimiter) limiter(actor string) *rate.Limiter {
	lim := l.lims[actor]
	if lim == nil {
		if len(l.lims) >= refusalKeys {
			clear(l.lims)
		}
		lim = rate.NewLimiter(l.rate, l.burst)
		l.lims[actor] = lim
	}
	return lim
}

// allow reports whether actor may have one more event at now.
func (l *actorLimiter) allow(actor string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.limiter(actor).AllowN(now, 1)
}

// Enrollments in progress, which hold an unauthenticated body in memory: at most
// enrollSlotsTotal at once, and enrollSlotsPerSource per source (loopback, the
// controller's own host, shares only the total).
const (
	enrollSlotsTotal     = 64
	enrollSlotsPerSource = 4
)

// slotLimiter bounds concurrent calls, in total (maxTotal) and per source
// (maxPerSource).
type slotLimiter struct {
	maxTotal, maxPerSource int

	mu        sync.Mutex
	total     int
	perSource map[netip.Addr]int
}

func newSlotLimiter() *slotLimiter {
	return &slotLimiter{maxTotal: enrollSlotsTotal, maxPerSource: enrollSlotsPerSource, perSource: map[netip.Addr]int{}}
}

// acquire takes a slot for a call from source; it returns false when none is
// free, else the function that gives the slot back.
func (l *slotLimiter) acquire(source netip.Addr) (func(), bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	loopback := source.IsLoopback()
	if l.total >= l.maxTotal || !loopback && l.perSource[source] >= l.maxPerSource {
		return nil, false
	}
	l.total++
	if !loopback {
		l.perSource[source]++
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			l.total--
			if !loopback {
				if l.perSource[source]--; l.perSource[source] <= 0 {
					delete(l.perSource, source)
				}
			}
		})
	}, true
}
