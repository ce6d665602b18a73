package main

import (
	"sync"
	"time"

	"segmesh/hack/internal/procmem"
)

// sampler records the largest VmRSS of a process, read every interval, until
// stopped.
type sampler struct {
	stopc   chan struct{}
	done    chan struct{}
	mu      sync.Mutex
	peak    int64
	samples int
}

func startSampler(pid int, interval time.Duration) *sampler {
	s := &sampler{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			if m, err := procmem.Read(pid); err == nil {
				s.mu.Lock()
				s.peak = max(s.peak, m.RSS)
				s.samples++
				s.mu.Unlock()
			}
			select {
			case <-s.stopc:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// stop ends sampling and returns the peak VmRSS in bytes and the sample count.
func (s *sampler) stop() (peak int64, samples int) {
	close(s.stopc)
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak, s.samples
}
