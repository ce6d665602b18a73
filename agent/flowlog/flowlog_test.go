package flowlog

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"segmesh/agent/dataplane"
)

var (
	t0    = time.Date(2026, 12, 2, 5, 0, 0, 0, time.UTC)
	local = netip.MustParseAddr("100.64.0.1")
)

func peer(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{100, byte(i >> 16), byte(i >> 8), byte(i)})
}

// in returns a kernel flow from peer i to local TCP port 22 with its counters.
func in(i int, packets, bytes uint64) dataplane.DeniedFlow {
	return dataplane.DeniedFlow{Direction: dataplane.DirectionIn, Src: peer(i), Dst: local, Protocol: 6, Port: 22, Packets: packets, Bytes: bytes}
}

func keyOf(f dataplane.DeniedFlow) Key {
	return Key{Direction: f.Direction, Src: f.Src, Dst: f.Dst, Protocol: f.Protocol, Port: f.Port}
}

// TestObserveDeltas: each step is one read; want is the pending packets and bytes
// per flow (by peer index) after it.
func TestObserveDeltas(t *testing.T) {
	type pend struct{ packets, bytes uint64 }
	tests := []struct {
		name  string
		reads [][]dataplane.DeniedFlow
		grew  []int
		want  map[int]pend
	}{
		{"new flow", [][]dataplane.DeniedFlow{{in(1, 3, 180)}}, []int{1}, map[int]pend{1: {3, 180}}},
		{"growth adds", [][]dataplane.DeniedFlow{{in(1, 3, 180)}, {in(1, 5, 300)}}, []int{1, 1}, map[int]pend{1: {5, 300}}},
		{"no growth is no record", [][]dataplane.DeniedFlow{{in(1, 3, 180)}, {in(1, 3, 180)}}, []int{1, 0}, map[int]pend{1: {3, 180}}},
		{"restart below the previous count", [][]dataplane.DeniedFlow{{in(1, 10, 600)}, {in(1, 2, 120)}}, []int{1, 1}, map[int]pend{1: {12, 720}}},
		{"bytes restart alone", [][]dataplane.DeniedFlow{{in(1, 10, 600)}, {in(1, 11, 60)}}, []int{1, 1}, map[int]pend{1: {21, 660}}},
		{"timed out and back above", [][]dataplane.DeniedFlow{{in(1, 2, 120)}, {}, {in(1, 4, 240)}}, []int{1, 0, 1}, map[int]pend{1: {6, 360}}},
		{"two flows", [][]dataplane.DeniedFlow{{in(1, 1, 60), in(2, 7, 420)}}, []int{2}, map[int]pend{1: {1, 60}, 2: {7, 420}}},
		{"duplicate element counted once", [][]dataplane.DeniedFlow{{in(1, 1, 60), in(1, 1, 60)}}, []int{1}, map[int]pend{1: {1, 60}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := New()
			for i, r := range tt.reads {
				if g := l.Observe(t0.Add(time.Duration(i)*Interval), dataplane.Denied{Flows: r}); g != tt.grew[i] {
					t.Errorf("read %d: %d flows grew, want %d", i, g, tt.grew[i])
				}
			}
			b := l.Pending()
			if len(b.Flows) != len(tt.want) || b.More != 0 {
				t.Fatalf("pending %+v, want %d flows and no more", b, len(tt.want))
			}
			for i, w := range tt.want {
				found := false
				for _, f := range b.Flows {
					if f.Key == keyOf(in(i, 0, 0)) {
						found = true
						if f.Packets != w.packets || f.Bytes != w.bytes {
							t.Errorf("flow %d: %d packets %d bytes, want %d %d", i, f.Packets, f.Bytes, w.packets, w.bytes)
						}
					}
				}
				if !found {
					t.Errorf("flow %d not pending", i)
				}
			}
		})
	}
}

func TestFirstLastSeen(t *testing.T) {
	l := New()
	l.Observe(t0, dataplane.Denied{Flows: []dataplane.DeniedFlow{in(1, 1, 60)}})
	l.Observe(t0.Add(Interval), dataplane.Denied{Flows: []dataplane.DeniedFlow{in(1, 1, 60)}})
	l.Observe(t0.Add(2*Interval), dataplane.Denied{Flows: []dataplane.DeniedFlow{in(1, 2, 120)}})
	f := l.Pending().Flows[0]
	if !f.First.Equal(t0) || !f.Last.Equal(t0.Add(2*Interval)) {
		t.Errorf("first %v last %v, want %v and %v", f.First, f.Last, t0, t0.Add(2*Interval))
	}
}

// TestDropTotals: the drop counters become monotonic totals across restarts of
// the kernel's counters (a new epoch, or a lower value).
func TestDropTotals(t *testing.T) {
	c := func(p, b, e uint64) dataplane.DropCounter {
		return dataplane.DropCounter{Packets: p, Bytes: b, Epoch: e}
	}
	reads := []struct {
		in, out dataplane.DropCounter
		want    Stats
	}{
		{c(5, 300, 7), c(1, 40, 8), Stats{In: Totals{5, 300}, Out: Totals{1, 40}}},
		{c(9, 540, 7), c(1, 40, 8), Stats{In: Totals{9, 540}, Out: Totals{1, 40}}},
		{c(2, 120, 11), c(3, 120, 12), Stats{In: Totals{11, 660}, Out: Totals{4, 160}}}, // rules recreated
		{c(1, 60, 11), c(3, 120, 12), Stats{In: Totals{12, 720}, Out: Totals{4, 160}}},  // same handle, lower: restarted
		{c(1, 60, 11), c(4, 200, 12), Stats{In: Totals{12, 720}, Out: Totals{5, 240}}},  // quiet in, growth out
		{c(0, 0, 11), c(0, 0, 12), Stats{In: Totals{12, 720}, Out: Totals{5, 240}}},     // table replaced, same handles by chance
		{c(1<<62, 1<<62, 13), c(0, 0, 14), Stats{In: Totals{12 + 1<<62, 720 + 1<<62}, Out: Totals{5, 240}}},
	}
	l := New()
	for i, r := range reads {
		l.Observe(t0.Add(time.Duration(i)*Interval), dataplane.Denied{In: r.in, Out: r.out})
		if got := l.Stats(); got != r.want {
			t.Errorf("read %d: stats %+v, want %+v", i, got, r.want)
		}
	}
}

// TestFloodStaysBounded: a flood of distinct flows keeps at most MaxPending
// pending, those with the most packets, and counts every other one in More.
func TestFloodStaysBounded(t *testing.T) {
	l := New()
	const reads, perRead = 5, 8 * 4096
	var all []uint64 // packets of every flow sent
	for r := range reads {
		var flows []dataplane.DeniedFlow
		for i := range perRead {
			n := r*perRead + i
			flows = append(flows, in(n, uint64(1+n%1000), uint64(60*(1+n%1000))))
			all = append(all, uint64(1+n%1000))
		}
		// More elements than the kernel's sets hold: the excess is only counted.
		flows = append(flows, in(reads*perRead+r, 1, 60))
		l.Observe(t0.Add(time.Duration(r)*Interval), dataplane.Denied{Flows: flows})
		if len(l.pending) > MaxPending || len(l.last) > maxTracked {
			t.Fatalf("read %d: %d pending, %d tracked; want at most %d and %d", r, len(l.pending), len(l.last), MaxPending, maxTracked)
		}
	}
	b := l.Pending()
	if len(b.Flows) != MaxPending {
		t.Fatalf("%d pending, want %d", len(b.Flows), MaxPending)
	}
	total := reads*perRead + reads
	if b.More != uint64(total-MaxPending) {
		t.Errorf("more %d, want %d", b.More, total-MaxPending)
	}
	slices.Sort(all)
	slices.Reverse(all)
	for i, f := range b.Flows {
		if f.Packets != all[i] {
			t.Fatalf("pending flow %d has %d packets, want %d: the flows with the most packets are kept, the most first", i, f.Packets, all[i])
		}
		if i > 0 && byPackets(&b.Flows[i-1], &b.Flows[i]) > 0 {
			t.Fatalf("pending not sorted by packets at %d", i)
		}
	}
}

// TestFullKernelSetCountsMore: when a kernel set was full and the drop counters
// grew by more than the recorded flows, at least one flow is missing: More counts it.
func TestFullKernelSetCountsMore(t *testing.T) {
	tests := []struct {
		name string
		d    dataplane.Denied
		more uint64
	}{
		{"full, unrecorded drops", dataplane.Denied{Flows: []dataplane.DeniedFlow{in(1, 2, 120)}, In: dataplane.DropCounter{Packets: 5}, Full: true}, 1},
		{"full, all recorded", dataplane.Denied{Flows: []dataplane.DeniedFlow{in(1, 5, 300)}, In: dataplane.DropCounter{Packets: 5}, Full: true}, 0},
		{"not full", dataplane.Denied{Flows: []dataplane.DeniedFlow{in(1, 2, 120)}, In: dataplane.DropCounter{Packets: 5}}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := New()
			l.Observe(t0, tt.d)
			if got := l.Pending().More; got != tt.more {
				t.Errorf("more %d, want %d", got, tt.more)
			}
		})
	}
}

// TestAckRemovesOnlyWhatWasReported: flows stay pending until Ack; growth seen
// between Pending and Ack stays for the next report.
func TestAckRemovesOnlyWhatWasReported(t *testing.T) {
	l := New()
	l.Observe(t0, dataplane.Denied{Flows: []dataplane.DeniedFlow{in(1, 3, 180), in(2, 1, 60)}})
	b := l.Pending()
	if again := l.Pending(); len(again.Flows) != 2 {
		t.Fatalf("Pending without Ack lost flows: %+v", again)
	}
	later := t0.Add(Interval)
	l.Observe(later, dataplane.Denied{Flows: []dataplane.DeniedFlow{in(1, 7, 420), in(2, 1, 60)}})
	l.Ack(b)
	rest := l.Pending()
	if len(rest.Flows) != 1 || rest.Flows[0].Key != keyOf(in(1, 0, 0)) || rest.Flows[0].Packets != 4 || rest.Flows[0].Bytes != 240 ||
		!rest.Flows[0].First.Equal(later) {
		t.Fatalf("after Ack: %+v; want flow 1 with the 4 packets seen since, first seen %v", rest, later)
	}
	l.Ack(rest)
	if empty := l.Pending(); len(empty.Flows) != 0 || empty.More != 0 {
		t.Fatalf("after the second Ack: %+v, want nothing", empty)
	}
	if got := l.Stats().Records; got != 3 {
		t.Errorf("records %d, want 3", got)
	}
}

func TestProtocolName(t *testing.T) {
	for p, want := range map[uint8]string{1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 47: "47", 0: "0"} {
		if got := ProtocolName(p); got != want {
			t.Errorf("ProtocolName(%d) = %q, want %q", p, got, want)
		}
	}
}
