package flowlog

import (
	"fmt"
	"net/netip"
	"testing"
	"time"
)

var t0 = time.Date(2026, 12, 2, 5, 0, 0, 0, time.UTC)

func rec(node string, port uint16, first, last time.Duration, packets uint64) Record {
	return Record{
		Key: Key{Node: node, Direction: "in", Source: netip.MustParseAddr("100.64.0.1"), Dest: netip.MustParseAddr("100.64.0.2"),
			Protocol: "tcp", Port: port},
		Packets: packets, Bytes: packets * 60, First: t0.Add(first), Last: t0.Add(last),
	}
}

// describe writes records as "node:port:packets" for comparisons.
func describe(rs []Record) string {
	s := ""
	for _, r := range rs {
		s += fmt.Sprintf("%s:%d:%d ", r.Node, r.Port, r.Packets)
	}
	return s
}

func TestMergeAndOrder(t *testing.T) {
	l := New(Limits{MergeWindow: time.Minute})
	l.Add(rec("a", 22, 0, time.Second, 2))
	l.Add(rec("a", 80, 0, 2*time.Second, 1))
	l.Add(rec("b", 22, 0, 3*time.Second, 5))
	// Within the window of a:22's last packet: merged, moves to the front.
	l.Add(rec("a", 22, 30*time.Second, 40*time.Second, 3))
	// Past the window of b:22: a second record.
	l.Add(rec("b", 22, 5*time.Minute, 5*time.Minute, 7))
	tests := []struct {
		node  string
		since time.Duration
		limit int
		want  string
	}{
		{"", 0, 100, "b:22:7 a:22:5 b:22:5 a:80:1 "},
		{"a", 0, 100, "a:22:5 a:80:1 "},
		{"b", 0, 1, "b:22:7 "},
		{"", 3 * time.Second, 100, "b:22:7 a:22:5 b:22:5 "},
		{"", 0, 0, ""},
		{"c", 0, 10, ""},
	}
	for _, tt := range tests {
		var since time.Time
		if tt.since != 0 {
			since = t0.Add(tt.since)
		}
		if got := describe(l.Query(tt.node, since, tt.limit)); got != tt.want {
			t.Errorf("Query(%q, %v, %d) = %q, want %q", tt.node, tt.since, tt.limit, got, tt.want)
		}
	}
	merged := l.Query("a", time.Time{}, 1)[0]
	if !merged.First.Equal(t0) || !merged.Last.Equal(t0.Add(40*time.Second)) || merged.Bytes != 300 {
		t.Errorf("merged record %+v: want first %v, last +40s, 300 bytes", merged, t0)
	}
	if l.Len() != 4 || l.Dropped() != 0 {
		t.Errorf("Len %d Dropped %d, want 4 and 0", l.Len(), l.Dropped())
	}
}

func TestBounds(t *testing.T) {
	tests := []struct {
		name        string
		lim         Limits
		adds        func(l *Log)
		wantLen     int
		wantDropped uint64
		wantOldest  string // the oldest record kept, of Query("", ...)
	}{
		{"per node", Limits{Total: 100, PerNode: 3}, func(l *Log) {
			l.Add(rec("b", 1, 0, 0, 1))
			for i := range 10 {
				l.Add(rec("a", uint16(100+i), 0, time.Duration(i+1)*time.Second, 1))
			}
		}, 4, 7, "b:1:1 "},
		{"total", Limits{Total: 5, PerNode: 100}, func(l *Log) {
			for i := range 8 {
				l.Add(rec(fmt.Sprint("n", i), 1, 0, time.Duration(i)*time.Second, 1))
			}
		}, 5, 3, "n3:1:1 "},
		{"merges take no room", Limits{Total: 2, PerNode: 2}, func(l *Log) {
			for i := range 1000 {
				l.Add(rec("a", 1, time.Duration(i)*time.Second, time.Duration(i)*time.Second, 1))
			}
		}, 1, 0, "a:1:1000 "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := New(tt.lim)
			tt.adds(l)
			all := l.Query("", time.Time{}, 1000)
			if l.Len() != tt.wantLen || len(all) != tt.wantLen || l.Dropped() != tt.wantDropped {
				t.Fatalf("Len %d, Query %d, Dropped %d; want %d records and %d dropped", l.Len(), len(all), l.Dropped(), tt.wantLen, tt.wantDropped)
			}
			if got := describe(all[len(all)-1:]); got != tt.wantOldest {
				t.Errorf("oldest kept %q, want %q", got, tt.wantOldest)
			}
		})
	}
}

func TestSaturatingCounts(t *testing.T) {
	l := New(Limits{})
	l.Add(rec("a", 1, 0, 0, ^uint64(0)-1))
	l.Add(rec("a", 1, 0, 0, 5))
	if got := l.Query("a", time.Time{}, 1)[0]; got.Packets != ^uint64(0) || got.Bytes != ^uint64(0) {
		t.Errorf("packets %d bytes %d, want both saturated", got.Packets, got.Bytes)
	}
}

// TestEvictionKeepsIndex checks that evicting a record superseded by a newer
// one of the same key keeps the newer one mergeable.
func TestEvictionKeepsIndex(t *testing.T) {
	l := New(Limits{Total: 10, PerNode: 2, MergeWindow: time.Second})
	l.Add(rec("a", 1, 0, 0, 1))
	l.Add(rec("a", 1, time.Hour, time.Hour, 1)) // too late: second record
	l.Add(rec("a", 2, time.Hour, time.Hour, 1)) // evicts the first
	l.Add(rec("a", 1, time.Hour, time.Hour, 1)) // merges into the second
	if got := describe(l.Query("a", time.Time{}, 10)); got != "a:1:2 a:2:1 " {
		t.Errorf("records %q, want a:1:2 a:2:1", got)
	}
}

func BenchmarkAdd(b *testing.B) {
	l := New(Limits{})
	i := 0
	for b.Loop() {
		i++
		l.Add(rec(fmt.Sprint("n", i%10000), uint16(i), 0, time.Duration(i), 1))
	}
}
