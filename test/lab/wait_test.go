package lab

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestWaitFor(t *testing.T) {
	ctx := context.Background()
	n := 0
	if err := WaitFor(ctx, 5*time.Second, func(context.Context) (bool, error) {
		n++
		return n == 3, errors.New("not yet")
	}); err != nil {
		t.Fatalf("WaitFor = %v, want nil after 3 polls", err)
	}

	err := WaitFor(ctx, 600*time.Millisecond, func(context.Context) (bool, error) {
		return false, errors.New("still pending")
	})
	if err == nil || !strings.Contains(err.Error(), "timed out") || !strings.Contains(err.Error(), "still pending") {
		t.Errorf("WaitFor timeout error = %v, want it to name the timeout and the last reason", err)
	}

	sentinel := errors.New("process exited")
	start := time.Now()
	err = WaitFor(ctx, time.Minute, func(context.Context) (bool, error) { return false, Abort(sentinel) })
	if !errors.Is(err, sentinel) || time.Since(start) > 5*time.Second {
		t.Errorf("WaitFor with Abort = %v after %s, want the sentinel at once", err, time.Since(start))
	}

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := WaitFor(cctx, time.Minute, func(context.Context) (bool, error) { return false, nil }); !errors.Is(err, context.Canceled) {
		t.Errorf("WaitFor on a cancelled context = %v, want context.Canceled", err)
	}
}
