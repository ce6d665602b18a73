package nft

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// A read-back of an interval set costs the kernel time quadratic in its size (every
// dump message walks the set's tree from the start: about 27 s for 200,000 elements
// on a 2-core machine). So the Firewall never re-reads a set it did not see change:
// the tracker follows the kernel's nftables notifications (multicast group
// NFNLGRP_NFTABLES) and records, per ruleset generation, whether another process
// changed the structure of table inet segmesh (table, chains, rules, set definitions)
// and the elements of which sets.

// change is what one or more generations changed in the table.
type change struct {
	structure bool
	sets      map[string]bool
}

func (c *change) empty() bool { return c == nil || !c.structure && len(c.sets) == 0 }

func (c *change) merge(o *change) {
	if o == nil {
		return
	}
	c.structure = c.structure || o.structure
	for s := range o.sets {
		if c.sets == nil {
			c.sets = map[string]bool{}
		}
		c.sets[s] = true
	}
}

// tracker records the changes other netlink sockets make to the table: every
// generation's NEWGEN notification carries, as its sender port id, the socket that
// committed it (nf_tables_fill_gen_info), so the Firewall's own commits are told
// apart by their port id, even from other clients in the same process. Its methods
// are safe for concurrent use.
type tracker struct {
	nsFD int
	conn *netlink.Conn
	done chan struct{}
	// own is the netlink port id of the Firewall's nftables socket (0: unknown).
	own atomic.Uint32

	mu   sync.Mutex
	cond *sync.Cond
	// seen is the latest generation whose notifications were all received.
	seen    uint32
	hasSeen bool
	// losses counts receive failures (e.g. buffer overruns): changes may be unknown.
	losses int
	// marks holds the changes of foreign generations not yet consumed.
	marks map[uint32]*change
	// pending collects the notifications of the transaction not yet closed by its
	// NEWGEN message.
	pending change
	closed  bool
	// watchers are called after a foreign generation that touched the table, and
	// after a loss.
	watchers map[int]func()
	nextID   int
}

// newTracker subscribes to nftables notifications in the namespace netnsFD (0: the
// calling thread's).
func newTracker(netnsFD int) (*tracker, error) {
	c, err := dialNotifications(netnsFD)
	if err != nil {
		return nil, err
	}
	t := &tracker{nsFD: netnsFD, conn: c, done: make(chan struct{}), marks: map[uint32]*change{}, watchers: map[int]func(){}}
	t.cond = sync.NewCond(&t.mu)
	go t.run()
	return t, nil
}

func dialNotifications(netnsFD int) (*netlink.Conn, error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: netnsFD, Groups: 1 << (unix.NFNLGRP_NFTABLES - 1)})
	if err != nil {
		return nil, fmt.Errorf("subscribing to nftables notifications: %w", err)
	}
	if err := bigBuffers(c); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}

func (t *tracker) close() {
	t.mu.Lock()
	t.closed = true
	c := t.conn
	t.mu.Unlock()
	_ = c.Close()
	<-t.done
}

// redialEvery is how often a tracker whose socket failed tries to subscribe again.
const redialEvery = time.Second

func (t *tracker) run() {
	defer close(t.done)
	for {
		t.mu.Lock()
		c := t.conn
		t.mu.Unlock()
		msgs, err := c.Receive()
		t.mu.Lock()
		if err != nil {
			if t.closed {
				t.mu.Unlock()
				return
			}
			// An overrun (ENOBUFS) loses notifications; the socket stays usable.
			// Any other error ends the socket: subscribe again.
			t.losses++
			t.pending = change{}
			t.cond.Broadcast()
			notify := t.watcherList()
			t.mu.Unlock()
			callAll(notify)
			if !errors.Is(err, unix.ENOBUFS) && !t.redial(c) {
				return
			}
			continue
		}
		touched := false
		for _, m := range msgs {
			touched = t.handle(m) || touched
		}
		t.cond.Broadcast()
		var notify []func()
		if touched {
			notify = t.watcherList()
		}
		t.mu.Unlock()
		callAll(notify)
	}
}

// redial replaces the failed socket old until it succeeds or the tracker is closed
// (then it returns false).
func (t *tracker) redial(old *netlink.Conn) bool {
	_ = old.Close()
	for {
		c, err := dialNotifications(t.nsFD)
		t.mu.Lock()
		if t.closed {
			t.mu.Unlock()
			if c != nil {
				_ = c.Close()
			}
			return false
		}
		if err == nil {
			t.conn = c
			t.losses++ // changes during the gap are unknown
			t.mu.Unlock()
			return true
		}
		t.mu.Unlock()
		time.Sleep(redialEvery)
	}
}

func (t *tracker) watcherList() []func() {
	out := make([]func(), 0, len(t.watchers))
	for _, w := range t.watchers {
		out = append(out, w)
	}
	return out
}

func callAll(fs []func()) {
	for _, f := range fs {
		f()
	}
}

// watch calls notify (from the tracker's goroutine; it must not block) after every
// generation in which another process changed the table, and after notifications
// were lost; the returned function stops it.
func (t *tracker) watch(notify func()) (stop func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	id := t.nextID
	t.nextID++
	t.watchers[id] = notify
	return func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		delete(t.watchers, id)
	}
}

// pause leaves the notification group so that the kernel does not build
// notifications for a large batch of the Firewall's own (for a set of 200,000
// elements that costs seconds); resume joins it again. The caller must check with the
// generation counter that nobody else committed in between.
func (t *tracker) pause() error { return t.socket().LeaveGroup(unix.NFNLGRP_NFTABLES) }

func (t *tracker) resume() error { return t.socket().JoinGroup(unix.NFNLGRP_NFTABLES) }

func (t *tracker) socket() *netlink.Conn {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.conn
}

// handle records one notification; it reports whether the message closed a
// generation in which another process changed the table. t.mu must be held.
func (t *tracker) handle(m netlink.Message) bool {
	if m.Header.Type>>8 != unix.NFNL_SUBSYS_NFTABLES || len(m.Data) < 4 {
		return false
	}
	typ := int(m.Header.Type & 0xff)
	family := m.Data[0]
	ad, err := netlink.NewAttributeDecoder(m.Data[4:])
	if err != nil {
		return false
	}
	ad.ByteOrder = binary.BigEndian
	var table, set string
	var gen uint32
	for ad.Next() {
		switch {
		case typ == unix.NFT_MSG_NEWGEN && ad.Type() == unix.NFTA_GEN_ID:
			gen = ad.Uint32()
		case typ != unix.NFT_MSG_NEWGEN && ad.Type() == 1: // NFTA_{TABLE_NAME,CHAIN,RULE,SET,SET_ELEM_LIST}_TABLE
			table = ad.String()
		case (typ == unix.NFT_MSG_NEWSETELEM || typ == unix.NFT_MSG_DELSETELEM) && ad.Type() == unix.NFTA_SET_ELEM_LIST_SET:
			set = ad.String()
		}
	}
	switch typ {
	case unix.NFT_MSG_NEWGEN:
		// Every generation that touched the table counts unless the Firewall's own
		// socket committed it (large batches of its own are not even heard: see
		// pause). Any other client, in this process or not, is seen.
		foreign := !t.pending.empty() && (m.Header.PID == 0 || m.Header.PID != t.own.Load())
		if foreign {
			c := t.pending
			t.marks[gen] = &c
		}
		t.pending = change{}
		t.seen, t.hasSeen = gen, true
		return foreign
	case unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM:
		if family == unix.NFPROTO_INET && table == TableName {
			t.pending.merge(&change{sets: map[string]bool{set: true}})
		}
	default:
		if family == unix.NFPROTO_INET && table == TableName {
			t.pending.structure = true
		}
	}
	return false
}

// trackerWait bounds how long since waits for notifications to arrive; they are
// queued on the socket when the kernel commits, so this only covers scheduling.
const trackerWait = 200 * time.Millisecond

// since returns the merged changes other processes made in the generations after
// from up to to, and consumes the records up to to. ok is false when the changes are
// unknown: notifications were lost since the loss count base, or those of generation
// to did not arrive in time.
func (t *tracker) since(from, to uint32, base int) (c change, ok bool) {
	deadline := time.Now().Add(trackerWait)
	t.mu.Lock()
	defer t.mu.Unlock()
	for !t.closed && t.losses == base && (!t.hasSeen || int32(t.seen-to) < 0) {
		if time.Now().After(deadline) {
			return change{}, false
		}
		// Wake up at the deadline even without a notification.
		timer := time.AfterFunc(time.Until(deadline), func() {
			t.mu.Lock()
			t.cond.Broadcast()
			t.mu.Unlock()
		})
		t.cond.Wait()
		timer.Stop()
	}
	if t.closed || t.losses != base {
		return change{}, false
	}
	for g, m := range t.marks {
		if int32(g-from) > 0 && int32(g-to) <= 0 {
			c.merge(m)
		}
		if int32(g-to) <= 0 {
			delete(t.marks, g)
		}
	}
	return c, true
}

// lossCount returns the current loss count, the base for since.
func (t *tracker) lossCount() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.losses
}

// lost records that notifications may have been missed, and tells the watchers.
func (t *tracker) lost() {
	t.mu.Lock()
	t.losses++
	t.cond.Broadcast()
	notify := t.watcherList()
	t.mu.Unlock()
	callAll(notify)
}
