// Package flowlog is the controller's bounded in-memory log of the flows nodes
// report as dropped by their policy (denied flows).
//
// It is telemetry: records live in memory only and are lost when the controller
// restarts. The log holds at most Limits.Total records in all and at most
// Limits.PerNode records per node; when either bound is reached, the oldest
// record (of the node, or of the whole log) is evicted first and counted in
// Dropped. A report of a flow the log already holds for the same node (same
// direction, source, destination, protocol and port) whose packets came within
// Limits.MergeWindow of the held record's last packet is merged into it
// (packets and bytes added, last seen moved on), so that a flow dropped for
// hours takes one record, not one per report.
//
// Adding a record costs O(1); a query sorts the matching records: at most
// Limits.PerNode for one node, at most Limits.Total for every node.
package flowlog

import (
	"cmp"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// Defaults of Limits.
const (
	DefaultTotal       = 65536
	DefaultPerNode     = 1024
	DefaultMergeWindow = 5 * time.Minute
)

// Limits bound a Log. Zero fields take the defaults above.
type Limits struct {
	// Total is the most records the log holds.
	Total int
	// PerNode is the most records it holds for one node.
	PerNode int
	// MergeWindow: a report of a held flow whose first packet came at most this
	// long after the held record's last packet is merged into the record.
	MergeWindow time.Duration
}

// Key identifies a flow of one node.
type Key struct {
	// Node is the reporting node's name.
	Node string
	// Direction is "in" or "out".
	Direction string
	Source    netip.Addr
	Dest      netip.Addr
	// Protocol is "tcp", "udp", "icmp", "icmpv6", "sctp" or a decimal number.
	Protocol string
	// Port is the destination port, 0 for a protocol without ports.
	Port uint16
}

// Record is one denied flow as the log holds it. The caller validates its
// fields (the log stores them as given).
type Record struct {
	Key
	Packets, Bytes uint64
	// First and Last are the times of the first and latest packet.
	First, Last time.Time
}

// entry is a held record, linked in the log's insertion order and in its node's.
type entry struct {
	rec                Record
	seq                uint64 // insertion or merge order, increasing
	prev, next         *entry // log order (oldest first)
	nodePrev, nodeNext *entry // node order (oldest first)
}

type nodeList struct {
	head, tail *entry
	n          int
}

// Log is a bounded log of denied flows, safe for concurrent use.
type Log struct {
	lim     Limits
	mu      sync.Mutex
	seq     uint64
	head    *entry // oldest
	tail    *entry // newest
	n       int
	byKey   map[Key]*entry
	byNode  map[string]*nodeList
	dropped uint64
}

// New returns an empty log bounded by lim.
func New(lim Limits) *Log {
	if lim.Total <= 0 {
		lim.Total = DefaultTotal
	}
	if lim.PerNode <= 0 {
		lim.PerNode = DefaultPerNode
	}
	if lim.MergeWindow <= 0 {
		lim.MergeWindow = DefaultMergeWindow
	}
	return &Log{lim: lim, byKey: map[Key]*entry{}, byNode: map[string]*nodeList{}}
}

// Add records r, merging it into the held record of the same Key when r's
// first packet came within the merge window of that record's last one (packet
// and byte counts saturate at the uint64 maximum). It returns how many records
// it evicted to make room (0 or 1).
func (l *Log) Add(r Record) (evicted int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.seq++
	if e, ok := l.byKey[r.Key]; ok {
		if !r.First.After(e.rec.Last.Add(l.lim.MergeWindow)) {
			e.rec.Packets = satAdd(e.rec.Packets, r.Packets)
			e.rec.Bytes = satAdd(e.rec.Bytes, r.Bytes)
			if r.First.Before(e.rec.First) {
				e.rec.First = r.First
			}
			if r.Last.After(e.rec.Last) {
				e.rec.Last = r.Last
			}
			e.seq = l.seq
			l.unlink(e)
			l.link(e)
			return 0
		}
		// Too far apart: the held record stays as it is, the new one is kept
		// separately; the key now names the new one.
	}
	e := &entry{rec: r, seq: l.seq}
	l.byKey[r.Key] = e
	l.link(e)
	nl := l.byNode[r.Node]
	switch {
	case nl.n > l.lim.PerNode:
		l.evict(nl.head)
		evicted++
	case l.n > l.lim.Total:
		l.evict(l.head)
		evicted++
	}
	return evicted
}

// Dropped returns how many records the log evicted since it was created.
func (l *Log) Dropped() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dropped
}

// Len returns how many records the log holds.
func (l *Log) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

// Query returns copies of at most limit records (limit <= 0: none) of node
// (empty: every node) whose last packet came at or after since (zero: any), the
// most recent last packet first, records added or merged later first among
// equal times.
func (l *Log) Query(node string, since time.Time, limit int) []Record {
	if limit <= 0 {
		return nil
	}
	l.mu.Lock()
	var es []*entry
	if node != "" {
		if nl := l.byNode[node]; nl != nil {
			for e := nl.head; e != nil; e = e.nodeNext {
				if !e.rec.Last.Before(since) {
					es = append(es, e)
				}
			}
		}
	} else {
		for e := l.head; e != nil; e = e.next {
			if !e.rec.Last.Before(since) {
				es = append(es, e)
			}
		}
	}
	slices.SortFunc(es, func(a, b *entry) int {
		return cmp.Or(b.rec.Last.Compare(a.rec.Last), cmp.Compare(b.seq, a.seq))
	})
	es = es[:min(limit, len(es))]
	out := make([]Record, len(es))
	for i, e := range es {
		out[i] = e.rec
	}
	l.mu.Unlock()
	return out
}

// link appends e at the newest end of the log's and its node's lists.
func (l *Log) link(e *entry) {
	e.prev, e.next = l.tail, nil
	if l.tail != nil {
		l.tail.next = e
	} else {
		l.head = e
	}
	l.tail = e
	l.n++
	nl := l.byNode[e.rec.Node]
	if nl == nil {
		nl = &nodeList{}
		l.byNode[e.rec.Node] = nl
	}
	e.nodePrev, e.nodeNext = nl.tail, nil
	if nl.tail != nil {
		nl.tail.nodeNext = e
	} else {
		nl.head = e
	}
	nl.tail = e
	nl.n++
}

// unlink removes e from both lists; a node left without records is forgotten.
func (l *Log) unlink(e *entry) {
	if e.prev != nil {
		e.prev.next = e.next
	} else {
		l.head = e.next
	}
	if e.next != nil {
		e.next.prev = e.prev
	} else {
		l.tail = e.prev
	}
	l.n--
	nl := l.byNode[e.rec.Node]
	if e.nodePrev != nil {
		e.nodePrev.nodeNext = e.nodeNext
	} else {
		nl.head = e.nodeNext
	}
	if e.nodeNext != nil {
		e.nodeNext.nodePrev = e.nodePrev
	} else {
		nl.tail = e.nodePrev
	}
	nl.n--
	if nl.n == 0 {
		delete(l.byNode, e.rec.Node)
	}
	e.prev, e.next, e.nodePrev, e.nodeNext = nil, nil, nil, nil
}

// evict removes e and counts it as dropped.
func (l *Log) evict(e *entry) {
	l.unlink(e)
	if l.byKey[e.rec.Key] == e {
		delete(l.byKey, e.rec.Key)
	}
	l.dropped++
}

func satAdd(a, b uint64) uint64 {
	if s := a + b; s >= a {
		return s
	}
	return ^uint64(0)
}
