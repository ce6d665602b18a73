// Package flowlog turns the kernel's record of the traffic a node's policy dropped
// (dataplane.Denied: per-flow counters that live while a flow keeps being dropped,
// and per-direction drop counters) into denied-flow records for the controller
// and drop totals for the metrics.
//
// The agent reads the kernel every Interval and gives each read to Observe. The
// growth of a flow's counters since the previous read becomes pending packets and
// bytes of that flow; Pending lists them for a report and Ack removes what a report
// that reached the controller carried. Memory stays bounded whatever the traffic:
// at most MaxPending flows wait for a report (those with the most packets; the
// others are counted in More), and the counters of the previous read are kept only
// for the flows that read held (the kernel holds a bounded number).
//
// Counters restart: the kernel forgets a flow after a quiet time and may record it
// again from 0, and a new table (or new rules) starts the drop counters at 0. A
// counter lower than at the previous read, or a drop counter of a new epoch, is
// taken as restarted, so growth is never negative nor the wrap-around of one.
//
// The package is pure (no kernel access); a Log is safe for concurrent use.
package flowlog

import (
	"cmp"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"segmesh/agent/dataplane"
)

// Interval is how often the agent reads the kernel's denied flows by default:
// flows are reported within about that much of being dropped, and their first and
// last seen times are accurate to it.
const Interval = 10 * time.Second

// MaxPending is the most distinct flows that wait for a report (the wire's limit
// on ReportRequest.denied_flows).
const MaxPending = 256

// maxTracked bounds the flows whose counters a Log remembers between reads: every
// element the kernel's eight denied-flow sets can hold.
const maxTracked = 8 * 4096

// Key identifies a flow.
type Key struct {
	// Direction is dataplane.DirectionIn or DirectionOut.
	Direction string
	Src, Dst  netip.Addr
	// Protocol is the IANA protocol number; Port the destination port (0 without).
	Protocol uint8
	Port     uint16
}

// Flow is a flow's dropped traffic not yet reported.
type Flow struct {
	Key
	Packets, Bytes uint64
	// First and Last are the reads that first and last found the flow's counters
	// grown (the packets were dropped within Interval before).
	First, Last time.Time
}

// Batch is what one report carries.
type Batch struct {
	// Flows are at most MaxPending, the most packets first.
	Flows []Flow
	// More counts flows left out: pushed out of the pending list by flows with more
	// packets, or (a lower bound) not recorded by the kernel because its set was
	// full.
	More uint64
}

// Totals are the packets and bytes dropped in one direction since the Log began.
type Totals struct{ Packets, Bytes uint64 }

type counts struct{ packets, bytes uint64 }

type dropState struct {
	seen          bool
	epoch         uint64
	last          counts
	packets, byts uint64 // totals
}

// Log aggregates reads of the kernel's denied flows.
type Log struct {
	mu      sync.Mutex
	last    map[Key]counts // counters at the previous read
	in, out dropState
	pending map[Key]*Flow
	more    uint64
	records uint64
}

// New returns an empty Log.
func New() *Log {
	return &Log{last: map[Key]counts{}, pending: map[Key]*Flow{}}
}

// delta returns the growth from prev to cur, taking a counter below prev as one
// that restarted from 0.
func delta(prev, cur counts) counts {
	if cur.packets < prev.packets || cur.bytes < prev.bytes {
		return cur
	}
	return counts{cur.packets - prev.packets, cur.bytes - prev.bytes}
}

func (s *dropState) observe(c dataplane.DropCounter) counts {
	cur := counts{c.Packets, c.Bytes}
	d := cur
	if s.seen && s.epoch == c.Epoch {
		d = delta(s.last, cur)
	}
	s.seen, s.epoch, s.last = true, c.Epoch, cur
	s.packets += d.packets
	s.byts += d.bytes
	return d
}

// Observe takes one read of the kernel made at now and returns how many flows grew
// since the previous read (each one a new record; 0: nothing new to report).
func (l *Log) Observe(now time.Time, d dataplane.Denied) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	in, out := l.in.observe(d.In), l.out.observe(d.Out)
	seen := make(map[Key]counts, min(len(d.Flows), maxTracked))
	grew := 0
	var recorded uint64
	for _, f := range d.Flows {
		k := Key{Direction: f.Direction, Src: f.Src, Dst: f.Dst, Protocol: f.Protocol, Port: f.Port}
		if _, dup := seen[k]; dup {
			continue
		}
		if len(seen) >= maxTracked {
			l.more++
			continue
		}
		cur := counts{f.Packets, f.Bytes}
		seen[k] = cur
		prev, ok := l.last[k]
		if !ok {
			prev = counts{}
		}
		g := delta(prev, cur)
		if g.packets == 0 && g.bytes == 0 {
			continue
		}
		grew++
		recorded += g.packets
		if p := l.pending[k]; p != nil {
			p.Packets += g.packets
			p.Bytes += g.bytes
			p.Last = now
			continue
		}
		l.pending[k] = &Flow{Key: k, Packets: g.packets, Bytes: g.bytes, First: now, Last: now}
	}
	l.last = seen
	l.records += uint64(grew)
	if d.Full && in.packets+out.packets > recorded {
		l.more++ // at least one flow the kernel had no room for
	}
	l.trim()
	return grew
}

// byPackets orders flows by packets, then bytes (most first), then key, so that
// the order is total.
func byPackets(a, b *Flow) int {
	if c := cmp.Compare(b.Packets, a.Packets); c != 0 {
		return c
	}
	if c := cmp.Compare(b.Bytes, a.Bytes); c != 0 {
		return c
	}
	return compareKeys(a.Key, b.Key)
}

func compareKeys(a, b Key) int {
	return cmp.Or(cmp.Compare(a.Direction, b.Direction), a.Src.Compare(b.Src), a.Dst.Compare(b.Dst),
		cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Port, b.Port))
}

// sorted returns the pending flows, the most packets first.
func (l *Log) sorted() []*Flow {
	out := make([]*Flow, 0, len(l.pending))
	for _, f := range l.pending {
		out = append(out, f)
	}
	slices.SortFunc(out, byPackets)
	return out
}

// trim keeps the MaxPending pending flows with the most packets and counts the
// others in more.
func (l *Log) trim() {
	if len(l.pending) <= MaxPending {
		return
	}
	for _, f := range l.sorted()[MaxPending:] {
		delete(l.pending, f.Key)
		l.more++
	}
}

// Pending returns what the next report carries (copies; the Log keeps them until
// Ack).
func (l *Log) Pending() Batch {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := Batch{More: l.more}
	for _, f := range l.sorted() {
		b.Flows = append(b.Flows, *f)
	}
	return b
}

// Ack removes what b (a Batch from Pending) carried, after the report with it
// reached the controller. Growth observed since Pending stays pending, with the
// latest read that found it as its first seen time.
func (l *Log) Ack(b Batch) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, f := range b.Flows {
		p := l.pending[f.Key]
		if p == nil {
			continue
		}
		p.Packets -= min(p.Packets, f.Packets)
		p.Bytes -= min(p.Bytes, f.Bytes)
		if p.Packets == 0 && p.Bytes == 0 {
			delete(l.pending, f.Key)
			continue
		}
		p.First = p.Last
	}
	l.more -= min(l.more, b.More)
}

// Stats are a Log's totals since New, for metrics.
type Stats struct {
	// In and Out are what the ingress and egress policy dropped.
	In, Out Totals
	// Records counts flow records: a flow whose counters grew between two reads
	// counts once per read.
	Records uint64
}

// Stats returns the totals.
func (l *Log) Stats() Stats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return Stats{In: Totals{l.in.packets, l.in.byts}, Out: Totals{l.out.packets, l.out.byts}, Records: l.records}
}

// ProtocolName names IANA protocol p as the wire does: "tcp", "udp", "icmp",
// "icmpv6", "sctp", or the number in decimal.
func ProtocolName(p uint8) string {
	switch p {
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	case 58:
		return "icmpv6"
	case 132:
		return "sctp"
	}
	return strconv.Itoa(int(p))
}
