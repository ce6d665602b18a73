package controller

import (
	"testing"
	"time"
)

// TestSlotsLease checks that a send that never finishes holds its slot for the
// lease only.
func TestSlotsLease(t *testing.T) {
	s := newSlots(1, 50*time.Millisecond)
	stuck := make(chan struct{})
	defer close(stuck)
	go func() { _ = s.do(func() error { <-stuck; return nil }) }()
	eventually(t, "the stuck send holds the slot", func() bool { return len(s.ch) == 1 })
	next := make(chan struct{})
	go func() { _ = s.do(func() error { close(next); return nil }) }()
	select {
	case <-next:
	case <-time.After(5 * time.Second):
		t.Fatal("a stuck send held its slot past the lease")
	}
}
