package reconcile

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/fake"
	"segmesh/agent/internal/testlog"
)

// recorder is an Observer that records what it is told.
type recorder struct {
	mu       sync.Mutex
	applies  int
	repaired []Differences
	reads    int
	peers    int
}

func (r *recorder) Applied(_ time.Duration, repaired Differences) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.applies++
	if repaired.Len() > 0 {
		r.repaired = append(r.repaired, repaired)
	}
}

func (r *recorder) Observed(o dataplane.Observed) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reads++
	r.peers = len(o.State.Peers)
}

func (r *recorder) counts() (applies, repairs, reads, peers int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.applies, len(r.repaired), r.reads, r.peers
}

// TestObserver: every successful apply and read-back reaches the observer, a
// repair with the drift it fixed.
func TestObserver(t *testing.T) {
	dp := fake.New(dataplane.KindUserspace)
	r := New(dp, local, slog.New(slog.NewTextHandler(&testlog.Buffer{}, nil)))
	rec := &recorder{}
	r.SetObserver(rec)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); r.Run(ctx, time.Hour) }()
	t.Cleanup(func() { cancel(); <-done })

	wait(t, r, r.SetNetmap(testNetmap()))
	if applies, repairs, reads, peers := rec.counts(); applies != 1 || repairs != 0 || reads != 1 || peers != 2 {
		t.Fatalf("after the first apply: %d applies, %d repairs, %d reads, %d peers; want 1, 0, 1, 2", applies, repairs, reads, peers)
	}
	dp.Mutate(func(s *dataplane.State) { s.Peers = s.Peers[1:] })
	dp.Notify()
	eventually(t, "the repair observed", func() bool { _, repairs, _, _ := rec.counts(); return repairs == 1 })
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if got := rec.repaired[0].Items[0].Part; got != dataplane.PartPeer {
		t.Errorf("repaired part %q, want %q", got, dataplane.PartPeer)
	}
	// The read that found the drift, and the read-back after the repair.
	if rec.applies != 2 || rec.reads != 3 || rec.peers != 2 {
		t.Errorf("after the repair: %d applies, %d reads, %d peers; want 2, 3, 2", rec.applies, rec.reads, rec.peers)
	}
}
