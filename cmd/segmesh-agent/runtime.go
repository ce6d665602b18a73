package main

import (
	"context"
	"fmt"
	"math"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"time"
)

// DefaultGCPercent is the agent's garbage collection target (runtime/debug.
// SetGCPercent) unless $GOGC sets one: the heap may grow 25 % over the live heap
// between collections instead of Go's default 100 %. wireguard-go keeps about
// 24 MiB of preallocated 64 KiB buffers live (untouched pages cost no RSS but count
// as live heap), so the default let an idle agent with 100 peers collect garbage
// only past ~78 MB of heap. Measured with hack/agentmem (docs/benchmarks.md): idle
// RSS 76 -> 48 MB, receiver peak under line-rate load 345 -> 238 MB, collector CPU
// 0.02 -> 0.1 s per 20 s of load, throughput unchanged.
//
// The agent sets no Go memory limit of its own: a limit below the ~150-300 MB that
// wireguard-go's unbounded queues hold at line rate makes the collector run
// thousands of times per 20 s (sync.Pool is emptied by every cycle, so each packet
// allocates a fresh 64 KiB buffer) and cuts TCP throughput to a third; even idle, a
// 40 MiB limit costs 12 % of a core, since the preallocated buffers keep the live
// heap near it. --memory-limit or $GOMEMLIMIT set one where memory matters more.
const DefaultGCPercent = 25

// ReturnMemoryEvery is how often the agent collects garbage and returns free memory
// to the kernel (runtime/debug.FreeOSMemory). After a burst of traffic
// wireguard-go's sync.Pools hold what the burst needed until two collections have
// passed, and an agent that then allocates little sees a collection only every 2
// minutes (the runtime's forced period) while the scavenger returns pages slowly:
// measured, a receiver still held 211 MB 200 s after 20 s of line-rate load. Every
// 30 s, a pool is emptied within about a minute; a collection costs milliseconds.
const ReturnMemoryEvery = 30 * time.Second

// returnMemory calls debug.FreeOSMemory every interval until ctx ends.
func returnMemory(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			debug.FreeOSMemory()
		}
	}
}

// applyGCPercent sets DefaultGCPercent unless $GOGC is set, and returns the value
// in force.
func applyGCPercent() int {
	if os.Getenv("GOGC") != "" {
		p := debug.SetGCPercent(100)
		debug.SetGCPercent(p)
		return p
	}
	debug.SetGCPercent(DefaultGCPercent)
	return DefaultGCPercent
}

// memoryLimitFlag is the value of --memory-limit: a size ("40MiB", "64MB", "0"
// bytes), or "off".
type memoryLimitFlag struct {
	bytes int64 // math.MaxInt64: off
	set   bool
}

func (f *memoryLimitFlag) String() string {
	if !f.set || f.bytes == math.MaxInt64 {
		return "off"
	}
	return formatSize(f.bytes)
}

func (f *memoryLimitFlag) Type() string { return "size" }

func (f *memoryLimitFlag) Set(s string) error {
	if s == "off" {
		f.bytes, f.set = math.MaxInt64, true
		return nil
	}
	n, err := parseSize(s)
	if err != nil {
		return err
	}
	if n < 8<<20 {
		return fmt.Errorf("%s is below 8MiB; the agent cannot run in that (use \"off\" for no limit)", s)
	}
	f.bytes, f.set = n, true
	return nil
}

// sizeUnits are the suffixes parseSize accepts, as GOMEMLIMIT spells them.
var sizeUnits = []struct {
	suffix string
	mult   int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1},
}

// parseSize reads a byte count with an optional unit (B, KB, MB, GB, KiB, MiB, GiB).
func parseSize(s string) (int64, error) {
	num, mult := s, int64(1)
	for _, u := range sizeUnits {
		if strings.HasSuffix(s, u.suffix) {
			num, mult = strings.TrimSuffix(s, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(num), 10, 64)
	if err != nil || n < 0 || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("size %q: want a byte count with an optional unit B, KB, MB, GB, KiB, MiB or GiB, e.g. 40MiB", s)
	}
	return n * mult, nil
}

func formatSize(n int64) string {
	if n%(1<<20) == 0 {
		return strconv.FormatInt(n>>20, 10) + "MiB"
	}
	return strconv.FormatInt(n, 10) + "B"
}

// applyMemoryLimit sets the Go memory limit from --memory-limit when given; else
// the limit $GOMEMLIMIT set at start (if any) stays. It returns the limit in force
// (math.MaxInt64: none) and where it came from, for the start-up log.
func applyMemoryLimit(f memoryLimitFlag) (int64, string) {
	switch {
	case f.set:
		debug.SetMemoryLimit(f.bytes)
		return f.bytes, "--memory-limit"
	case os.Getenv("GOMEMLIMIT") != "":
		return debug.SetMemoryLimit(-1), "GOMEMLIMIT"
	default:
		return debug.SetMemoryLimit(-1), "none"
	}
}
