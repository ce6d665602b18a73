package lab

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// PollInterval is how often WaitFor evaluates its condition.
const PollInterval = 250 * time.Millisecond

// abortError makes WaitFor stop polling at once.
type abortError struct{ err error }

func (e abortError) Error() string { return e.err.Error() }
func (e abortError) Unwrap() error { return e.err }

// Abort wraps err so that a WaitFor condition returning it ends the wait at once
// with err (for example when the process being waited for has exited).
func Abort(err error) error { return abortError{err} }

// WaitFor evaluates cond every PollInterval until it returns true, ctx ends or
// timeout passes. A condition error means "not yet" and is kept as the reason
// reported on timeout, unless it was made with Abort, which ends the wait with it.
// The returned error names the timeout and the last reason.
func WaitFor(ctx context.Context, timeout time.Duration, cond func(ctx context.Context) (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ticker := time.NewTicker(PollInterval)
	defer ticker.Stop()
	var last error
	for {
		ok, err := cond(ctx)
		if ok {
			return nil
		}
		var ae abortError
		if errors.As(err, &ae) {
			return ae.err
		}
		// An error caused by the wait's own deadline would hide the real reason.
		if err != nil && (ctx.Err() == nil || last == nil) {
			last = err
		}
		select {
		case <-ticker.C:
		case <-ctx.Done():
			if last == nil {
				last = errors.New("condition never held")
			}
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("timed out after %s: %w", timeout, last)
			}
			return fmt.Errorf("%w: %w", ctx.Err(), last)
		}
	}
}
