package controller

import (
	"testing"
	"time"
)

// TestSlotsLease checks that a heavy send that never finishes holds its slot for
// the lease only, and that light sends never wait for a slot.
func TestSlotsLease(t *testing.T) {
	s := newSlots(1, 50*time.Millisecond)
	stuck := make(chan struct{})
	defer close(stuck)
	go func() { _ = s.do(true, func() error { <-stuck; return nil }) }()
	eventually(t, "the stuck send holds the slot", func() bool { return len(s.ch) == 1 })
	light := make(chan struct{})
	go func() { _ = s.do(false, func() error { close(light); return nil }) }()
	select {
	case <-light:
	case <-time.After(time.Second):
		t.Fatal("a light send waited for the slot")
	}
	heavy := make(chan struct{})
	go func() { _ = s.do(true, func() error { close(heavy); return nil }) }()
	select {
	case <-heavy:
	case <-time.After(5 * time.Second):
		t.Fatal("a stuck send held its slot past the lease")
	}
}
