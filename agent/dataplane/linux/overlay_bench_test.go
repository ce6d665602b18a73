package linux

import (
	"context"
	"testing"
	"time"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux/internal/nstest"
)

// waitKeepalives waits until the keepalive goroutine turned on every pending
// keepalive, so that a benchmark measures the steady state.
func waitKeepalives(t testing.TB, dp *Dataplane) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		dp.mu.Lock()
		n := len(dp.pending)
		dp.mu.Unlock()
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d keepalives still pending", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// BenchmarkInterface1000Peers measures the interface steps alone (WireGuard device,
// link, addresses, routes; no nftables) of a node with 1,000 peers when nothing
// changed: "read" is the interface part of Read, "reapply" of Apply. With untracked,
// the read caches are off (as for kernel WireGuard, or after a failed subscription).
func BenchmarkInterface1000Peers(b *testing.B) {
	ns := nstest.New(b)
	iface := nstest.IfaceName(b)
	dp := newDataplane(b, ns, iface, nil)
	full := dataplane.Canonical(bigState(b, iface, 1000, 25))
	ctx := context.Background()
	if err := dp.Apply(ctx, full); err != nil {
		b.Fatal(err)
	}
	waitKeepalives(b, dp)
	for _, untracked := range []bool{false, true} {
		name := func(s string) string {
			if untracked {
				return s + "/untracked"
			}
			return s
		}
		run := func(b *testing.B, f func() error) {
			dp.mu.Lock()
			defer dp.mu.Unlock()
			if untracked {
				dp.wgGen.down()
				dp.linkGen.down()
				defer dp.wgGen.up()
				defer dp.linkGen.up()
			}
			b.ResetTimer()
			for range b.N {
				if err := f(); err != nil {
					b.Fatal(err)
				}
			}
		}
		b.Run(name("read"), func(b *testing.B) {
			run(b, func() error {
				var s dataplane.State
				return dp.readInterface(&s)
			})
		})
		b.Run(name("reapply"), func(b *testing.B) {
			run(b, func() error { return dp.applyInterface(ctx, full, full.MTU) })
		})
	}
}
