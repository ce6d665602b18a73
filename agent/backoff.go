package agent

import (
	"context"
	"math/rand/v2"
	"time"
)

// backoff yields exponentially growing delays (doubling from min up to max) with
// ±20% jitter, so that agents restarted together do not reconnect in lockstep.
type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(min, max time.Duration) *backoff { return &backoff{min: min, max: max} }

// next returns the delay before the next attempt.
func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else {
		b.cur = min(2*b.cur, b.max)
	}
	return time.Duration(float64(b.cur) * (0.8 + 0.4*rand.Float64()))
}

// reset starts over at min after a success.
func (b *backoff) reset() { b.cur = 0 }

// sleep waits d or until ctx ends; it reports whether the full delay passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
