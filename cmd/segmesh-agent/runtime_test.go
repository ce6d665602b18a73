package main

import (
	"context"
	"math"
	"runtime"
	"runtime/debug"
	"testing"
	"time"
)

func TestMemoryLimitFlag(t *testing.T) {
	tests := []struct {
		in      string
		want    int64
		wantErr bool
	}{
		{in: "64MiB", want: 64 << 20},
		{in: "100MB", want: 100e6},
		{in: "1GiB", want: 1 << 30},
		{in: "16777216", want: 16 << 20},
		{in: "off", want: math.MaxInt64},
		{in: "1MiB", wantErr: true}, // below 8 MiB
		{in: "64 mb", wantErr: true},
		{in: "-5MiB", wantErr: true},
		{in: "lots", wantErr: true},
		{in: "9999999999GiB", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			var f memoryLimitFlag
			err := f.Set(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("Set(%q) error = %v, want error %v", tt.in, err, tt.wantErr)
			}
			if err == nil && f.bytes != tt.want {
				t.Errorf("Set(%q) = %d bytes, want %d", tt.in, f.bytes, tt.want)
			}
		})
	}
}

func TestApplyMemoryLimit(t *testing.T) {
	prev := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(prev) })
	t.Setenv("GOMEMLIMIT", "")

	var f memoryLimitFlag
	if err := f.Set("96MiB"); err != nil {
		t.Fatal(err)
	}
	if got, from := applyMemoryLimit(f); got != 96<<20 || from != "--memory-limit" || debug.SetMemoryLimit(-1) != 96<<20 {
		t.Errorf("applyMemoryLimit(96MiB) = %d from %s; runtime has %d", got, from, debug.SetMemoryLimit(-1))
	}
	debug.SetMemoryLimit(math.MaxInt64)
	if got, from := applyMemoryLimit(memoryLimitFlag{}); got != math.MaxInt64 || from != "none" {
		t.Errorf("applyMemoryLimit(unset) = %d from %s, want none", got, from)
	}
	t.Setenv("GOMEMLIMIT", "200MiB")
	debug.SetMemoryLimit(200 << 20) // what the runtime did at start
	if got, from := applyMemoryLimit(memoryLimitFlag{}); got != 200<<20 || from != "GOMEMLIMIT" {
		t.Errorf("applyMemoryLimit with GOMEMLIMIT = %d from %s", got, from)
	}
}

func TestApplyGCPercent(t *testing.T) {
	prev := debug.SetGCPercent(100)
	t.Cleanup(func() { debug.SetGCPercent(prev) })
	t.Setenv("GOGC", "")
	if got := applyGCPercent(); got != DefaultGCPercent || debug.SetGCPercent(DefaultGCPercent) != DefaultGCPercent {
		t.Errorf("applyGCPercent() without GOGC = %d, want %d in force", got, DefaultGCPercent)
	}
	t.Setenv("GOGC", "80")
	debug.SetGCPercent(80) // what the runtime did at start
	if got := applyGCPercent(); got != 80 || debug.SetGCPercent(80) != 80 {
		t.Errorf("applyGCPercent() with GOGC=80 = %d, want 80 kept", got)
	}
}

func TestReturnMemoryStops(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); returnMemory(ctx, time.Millisecond) }()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	deadline := time.Now().Add(10 * time.Second)
	for {
		runtime.ReadMemStats(&after)
		if after.NumForcedGC > before.NumForcedGC || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	<-done
	if after.NumForcedGC <= before.NumForcedGC {
		t.Errorf("returnMemory forced no collection in 10 s")
	}
}
