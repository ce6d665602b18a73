// Package nft programs and reads back segmesh's nftables table, `inet segmesh`, over
// netlink. What the table holds is decided by package agent/firewall, which builds it
// as data from a node's filter; this package only encodes a firewall.Table as netlink
// messages and decodes the kernel's table back into one (see encode.go). Every change
// is one atomic netlink batch: either only set elements are added and deleted (when
// chains, rules and set definitions already match), or the whole table is replaced
// (add table; delete table; add table, sets, chains, rules). Reads are skipped while
// the kernel's ruleset generation has not changed since the last read or apply.
package nft

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"segmesh/agent/firewall"
)

// TableName is the name of segmesh's table in the inet family.
const TableName = firewall.TableName

// elementsPerMessage bounds one NEWSETELEM/DELSETELEM message of a batch.
const elementsPerMessage = 1024

// socketBuffer is the send and receive buffer of the netlink socket in bytes; a
// batch is sent with one sendmsg, so it must hold the largest batch (about 60 bytes
// per IPv6 set element).
const socketBuffer = 64 << 20

// Result says what Apply changed.
type Result int

const (
	// Unchanged: the kernel already held the filter; no batch was sent.
	Unchanged Result = iota
	// ElementsUpdated: only set elements were added or deleted.
	ElementsUpdated
	// Replaced: the whole table was (re)created.
	Replaced
)

func (r Result) String() string {
	switch r {
	case Unchanged:
		return "unchanged"
	case ElementsUpdated:
		return "elements updated"
	case Replaced:
		return "replaced"
	}
	return fmt.Sprintf("Result(%d)", int(r))
}

// Firewall owns the table `inet segmesh` of one network namespace for one overlay
// interface. Its methods are safe for concurrent use.
type Firewall struct {
	iface string
	nsFD  int
	log   *slog.Logger
	table *nftables.Table

	mu   sync.Mutex
	conn *nftables.Conn
	// genConn queries the ruleset generation.
	genConn *netlink.Conn
	// cached is the kernel's table (nil: missing) as of generation cachedGen, valid
	// when cacheValid.
	cached     *firewall.Table
	cachedGen  uint32
	cacheValid bool
	// snapshots counts kernel read-backs (for tests).
	snapshots int
}

// New returns a Firewall for overlay interface iface (at most 15 bytes) in the network
// namespace referenced by the open file descriptor netnsFD (the caller keeps it open
// while the Firewall is used; 0 means the namespace of the calling thread).
func New(iface string, netnsFD int, log *slog.Logger) (*Firewall, error) {
	if iface == "" || len(iface) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("interface name %q: must be 1 to %d bytes", iface, unix.IFNAMSIZ-1)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	conn, err := nftables.New(nftables.WithNetNSFd(netnsFD), nftables.AsLasting(), nftables.WithSockOptions(bigBuffers))
	if err != nil {
		return nil, fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	genConn, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: netnsFD})
	if err != nil {
		_ = conn.CloseLasting()
		return nil, fmt.Errorf("opening nftables generation socket: %w", err)
	}
	return &Firewall{
		iface: iface, nsFD: netnsFD, log: log, conn: conn, genConn: genConn,
		table: &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet},
	}, nil
}

// bigBuffers raises the socket buffers beyond the sysctl limits (needs CAP_NET_ADMIN).
func bigBuffers(c *netlink.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = errors.Join(
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, socketBuffer),
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, socketBuffer))
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("setting netlink socket buffers: %w", serr)
	}
	return nil
}

// Close closes the netlink sockets.
func (f *Firewall) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return errors.Join(f.conn.CloseLasting(), f.genConn.Close())
}

// Apply makes the table hold exactly want (a table firewall.Build made). It sends no
// batch when the kernel already holds it, only set element changes when chains, rules
// and set definitions match, and otherwise replaces the table; each in one atomic
// batch. Errors name the failing step; the kernel keeps its previous table on error.
func (f *Firewall) Apply(want *firewall.Table) (Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()

	gen, have, err := f.current()
	if err != nil {
		f.log.Warn("reading nftables table failed; replacing it", "table", TableName, "err", err)
		have = nil
	}
	plan := firewall.PlanUpdate(have, want)
	if plan.Empty() {
		return Unchanged, nil
	}
	if !plan.Replace {
		for _, s := range plan.Delete {
			f.chunked(s.Set, s.Intervals, f.conn.SetDeleteElements)
		}
		for _, s := range plan.Add {
			f.chunked(s.Set, s.Intervals, f.conn.SetAddElements)
		}
		err := f.conn.Flush()
		if err == nil {
			f.committed(gen, want)
			return ElementsUpdated, nil
		}
		f.cacheValid = false
		f.log.Warn("updating set elements failed; replacing the table", "table", TableName, "err", err)
		gen, _ = generation(f.genConn)
	}
	f.replace(want)
	if err := f.conn.Flush(); err != nil {
		f.cacheValid = false
		return Unchanged, fmt.Errorf("replacing table inet %s: %w", TableName, err)
	}
	f.committed(gen, want)
	return Replaced, nil
}

// committed caches want as the kernel's table after a batch committed on top of
// generation before: only when the generation moved by exactly one, i.e. when no
// other transaction came between the read and the batch or after it.
func (f *Firewall) committed(before uint32, want *firewall.Table) {
	f.cacheValid = false
	after, err := generation(f.genConn)
	if err == nil && after == before+1 {
		f.cached, f.cachedGen, f.cacheValid = want, after, true
	}
}

// current returns the ruleset generation and the kernel's table: the cached one when
// the generation has not changed since it was read, else a fresh snapshot. d.mu must
// be held.
func (f *Firewall) current() (uint32, *firewall.Table, error) {
	gen, gerr := generation(f.genConn)
	if gerr == nil && f.cacheValid && gen == f.cachedGen {
		return gen, f.cached, nil
	}
	f.cacheValid = false
	t, err := f.snapshot()
	if err != nil {
		return gen, nil, err
	}
	if gerr == nil {
		f.cached, f.cachedGen, f.cacheValid = t, gen, true
	} else {
		f.log.Debug("nftables generation unavailable; reading the table every time", "err", gerr)
	}
	return gen, t, nil
}

// chunked queues op on set name with at most elementsPerMessage elements per message.
func (f *Firewall) chunked(name string, ivs []firewall.Interval, op func(*nftables.Set, []nftables.SetElement) error) {
	set := &nftables.Set{Table: f.table, Name: name}
	for len(ivs) > 0 {
		n := min(len(ivs), elementsPerMessage/2)
		// op only queues a message; its error is a marshalling error that Flush reports too.
		_ = op(set, intervalElements(ivs[:n]))
		ivs = ivs[n:]
	}
}

// replace queues the batch that recreates the table as want.
func (f *Firewall) replace(want *firewall.Table) {
	c := f.conn
	c.AddTable(f.table) // so that the delete cannot fail when the table is missing
	c.DelTable(f.table)
	c.AddTable(f.table)
	for i, s := range want.Sets {
		set := &nftables.Set{Table: f.table, Name: s.Name, ID: uint32(i + 1), Interval: s.Interval, KeyType: nftables.TypeIPAddr}
		if s.Type == firewall.TypeIPv6 {
			set.KeyType = nftables.TypeIP6Addr
		}
		// AddSet only queues a message; marshalling errors surface in Flush.
		_ = c.AddSet(set, nil)
		f.chunked(s.Name, s.Elements, c.SetAddElements)
	}
	// Every chain exists before the first rule, so that jumps find their targets.
	added := make([]*nftables.Chain, len(want.Chains))
	for i, ch := range want.Chains {
		nc := &nftables.Chain{Name: ch.Name, Table: f.table}
		if b := ch.Base; b != nil {
			hook, prio, policy := nftables.ChainHook(b.Hook), nftables.ChainPriority(b.Priority), nftables.ChainPolicyAccept
			if b.Policy == firewall.VerdictDrop {
				policy = nftables.ChainPolicyDrop
			}
			nc.Hooknum, nc.Priority, nc.Type, nc.Policy = &hook, &prio, nftables.ChainType(b.Type), &policy
		}
		added[i] = c.AddChain(nc)
	}
	for i, ch := range want.Chains {
		for _, r := range ch.Rules {
			c.AddRule(&nftables.Rule{Table: f.table, Chain: added[i], Exprs: ruleExprs(r), UserData: userData(r)})
		}
	}
}

// Delete removes the table; a missing table is not an error.
func (f *Firewall) Delete() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cacheValid = false
	f.conn.DelTable(f.table)
	if err := f.conn.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("deleting table inet %s: %w", TableName, err)
	}
	return nil
}

// RuleHandles returns the kernel handles of the rules in chain, in order (for tests
// and diagnostics: handles change only when a rule is re-created).
func (f *Firewall) RuleHandles(chain string) ([]uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	chains, err := f.conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("listing chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table == nil || ch.Table.Name != TableName || ch.Name != chain {
			continue
		}
		rules, err := f.conn.GetRules(f.table, ch)
		if err != nil {
			return nil, fmt.Errorf("listing rules of chain %s: %w", ch.Name, err)
		}
		var out []uint64
		for _, r := range rules {
			out = append(out, r.Handle)
		}
		return out, nil
	}
	return nil, fmt.Errorf("chain %s not found", chain)
}

// Read returns the kernel's table (nil when it is missing), re-reading it only when
// the ruleset generation changed since the last read or apply. The result must not be
// modified. A rule of a shape this package never writes has Unknown set; a set with
// flags it never uses has Foreign set.
func (f *Firewall) Read() (*firewall.Table, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, t, err := f.current()
	return t, err
}

// snapshot reads the table from the kernel; nil when it is missing.
func (f *Firewall) snapshot() (*firewall.Table, error) {
	f.snapshots++
	nt, err := f.conn.ListTableOfFamily(TableName, nftables.TableFamilyINet)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, nil
		}
		return nil, fmt.Errorf("listing table inet %s: %w", TableName, err)
	}
	t := &firewall.Table{Flags: nt.Flags}
	chains, err := f.conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("listing chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table == nil || ch.Table.Name != TableName {
			continue
		}
		c := firewall.Chain{Name: ch.Name}
		if ch.Hooknum != nil {
			b := &firewall.BaseChain{Type: string(ch.Type), Hook: firewall.Hook(*ch.Hooknum), Policy: firewall.VerdictAccept}
			if ch.Priority != nil {
				b.Priority = int32(*ch.Priority)
			}
			if ch.Policy != nil && *ch.Policy == nftables.ChainPolicyDrop {
				b.Policy = firewall.VerdictDrop
			}
			c.Base = b
		}
		rules, err := f.conn.GetRules(f.table, ch)
		if err != nil {
			return nil, fmt.Errorf("listing rules of chain %s: %w", ch.Name, err)
		}
		for _, r := range rules {
			spec, err := decodeRule(r.Exprs, r.UserData)
			if err != nil {
				spec = firewall.Rule{Unknown: fmt.Sprintf("handle %d: %v", r.Handle, err)}
			}
			c.Rules = append(c.Rules, spec)
		}
		t.Chains = append(t.Chains, c)
	}
	sets, err := f.conn.GetSets(f.table)
	if err != nil {
		return nil, fmt.Errorf("listing sets: %w", err)
	}
	for _, s := range sets {
		fs := firewall.Set{Name: s.Name, Type: firewall.SetType(s.KeyType.Name), Interval: s.Interval, Foreign: foreignFlags(s)}
		if s.KeyType.Name == nftables.TypeIPAddr.Name || s.KeyType.Name == nftables.TypeIP6Addr.Name {
			elems, err := f.conn.GetSetElements(s)
			if err != nil {
				return nil, fmt.Errorf("listing elements of set %s: %w", s.Name, err)
			}
			fs.Elements = elementIntervals(elems, int(s.KeyType.Bytes))
		}
		t.Sets = append(t.Sets, fs)
	}
	t.Sort()
	return t, nil
}

// foreignFlags names the flags of s that segmesh never sets.
func foreignFlags(s *nftables.Set) string {
	var out []string
	for _, fl := range []struct {
		on   bool
		name string
	}{{s.Anonymous, "anonymous"}, {s.Constant, "constant"}, {s.IsMap, "map"}, {s.HasTimeout, "timeout"},
		{s.Dynamic, "dynamic"}, {s.Concatenation, "concatenation"}, {s.Counter, "counter"}} {
		if fl.on {
			out = append(out, fl.name)
		}
	}
	return strings.Join(out, ",")
}

// Watch calls notify (from one goroutine) after every kernel change to the table or
// its sets' elements, until ctx is done. It returns once the nftables monitor is
// subscribed. If the monitor fails (e.g. its socket buffer overflows), Watch calls
// notify, since changes may have been missed, and subscribes again.
func (f *Firewall) Watch(ctx context.Context, notify func()) error {
	events, mon, err := f.subscribe()
	if err != nil {
		return err
	}
	go func() {
		stop := func() {
			_ = mon.Close()
			for range events { // let the monitor goroutine finish
			}
		}
		for {
			select {
			case <-ctx.Done():
				stop()
				return
			case ev, ok := <-events:
				failed := !ok || ev.GeneratedBy != nil && ev.GeneratedBy.Type == nftables.MonitorEventTypeOOB
				if !failed {
					if f.relevant(ev) {
						notify()
					}
					continue
				}
				notify()
				stop()
				for {
					if events, mon, err = f.subscribe(); err == nil {
						break
					}
					f.log.Warn("resubscribing to nftables events failed", "err", err)
					t := time.NewTimer(time.Second)
					select {
					case <-ctx.Done():
						t.Stop()
						return
					case <-t.C:
					}
				}
			}
		}
	}()
	return nil
}

func (f *Firewall) subscribe() (chan *nftables.MonitorEvents, *nftables.Monitor, error) {
	c, err := nftables.New(nftables.WithNetNSFd(f.nsFD), nftables.WithSockOptions(bigBuffers))
	if err != nil {
		return nil, nil, fmt.Errorf("opening nftables monitor socket: %w", err)
	}
	mon := nftables.NewMonitor(nftables.WithMonitorEventBuffer(256))
	events, err := c.AddGenerationalMonitor(mon)
	if err != nil {
		return nil, nil, fmt.Errorf("subscribing to nftables events: %w", err)
	}
	return events, mon, nil
}

// relevant reports whether a generation of changes touches the table (element
// changes carry no table name and always count).
func (f *Firewall) relevant(ev *nftables.MonitorEvents) bool {
	for _, c := range ev.Changes {
		var t *nftables.Table
		switch d := c.Data.(type) {
		case *nftables.Table:
			t = d
		case *nftables.Chain:
			t = d.Table
		case *nftables.Rule:
			t = d.Table
		case *nftables.Set:
			t = d.Table
		default:
			return true
		}
		if t == nil || t.Name == TableName {
			return true
		}
	}
	return false
}
