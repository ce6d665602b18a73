// Package nft programs and reads back segmesh's nftables table, `inet segmesh`, over
// netlink. What the table holds is decided by package agent/firewall, which builds it
// as data from a node's filter; this package only encodes a firewall.Table as netlink
// messages and decodes the kernel's table back into one (see encode.go). Every change
// is one atomic netlink batch built from firewall.PlanUpdate: set elements added and
// deleted; chains and rules recreated and sets created or deleted, while the other
// sets keep their elements; or, when the table is missing, the whole table created.
// Reads are skipped while the kernel's ruleset generation has not changed, and after
// a change by another process only the parts it touched are read again (see
// tracker.go). The packet path's updates of the denied-flow sets and counters do
// not move the generation; Denied reads them (see denied.go), the table read-back
// never does.
package nft

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"

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
	// Updated: chains and rules, or some sets, were recreated; the other sets kept
	// their elements.
	Updated
	// Replaced: the whole table was (re)created.
	Replaced
)

// Outcome is what Apply did.
type Outcome struct {
	Result Result
	// Drifted is true unless the kernel held exactly the table this Firewall last
	// wrote (as far as the generation counter and the notifications tell): after a
	// repair, and on the first Apply of a Firewall.
	Drifted bool
}

func (r Result) String() string {
	switch r {
	case Unchanged:
		return "unchanged"
	case ElementsUpdated:
		return "elements updated"
	case Updated:
		return "rules updated"
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
	// tracker records which parts of the table other processes changed.
	tracker *tracker
	// cached is the kernel's table (nil: missing) as of generation cachedGen, valid
	// when cacheValid; cachedLosses is the tracker's loss count it was read under.
	cached       *firewall.Table
	cachedGen    uint32
	cacheValid   bool
	cachedLosses int
	// written is the table the last Apply wrote or found in place; the cache holds
	// the same pointer while nobody else changed the table.
	written *firewall.Table
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
	tr, err := newTracker(netnsFD)
	if err != nil {
		return nil, err
	}
	// The tracker tells the Firewall's own commits by the port id of this socket.
	conn, err := nftables.New(nftables.WithNetNSFd(netnsFD), nftables.AsLasting(), nftables.WithSockOptions(func(c *netlink.Conn) error {
		if err := bigBuffers(c); err != nil {
			return err
		}
		tr.own.Store(portID(c))
		return nil
	}))
	if err != nil {
		tr.close()
		return nil, fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	genConn, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: netnsFD})
	if err != nil {
		tr.close()
		_ = conn.CloseLasting()
		return nil, fmt.Errorf("opening nftables generation socket: %w", err)
	}
	return &Firewall{
		iface: iface, nsFD: netnsFD, log: log, conn: conn, genConn: genConn, tracker: tr,
		table: &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet},
	}, nil
}

// portID returns the netlink port id the kernel bound c to (0 when unknown).
func portID(c *netlink.Conn) uint32 {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	var id uint32
	_ = rc.Control(func(fd uintptr) {
		if sa, err := unix.Getsockname(int(fd)); err == nil {
			if nl, ok := sa.(*unix.SockaddrNetlink); ok {
				id = nl.Pid
			}
		}
	})
	return id
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
	f.tracker.close()
	return errors.Join(f.conn.CloseLasting(), f.genConn.Close())
}

// Apply makes the table hold exactly want (a table firewall.Build made), in one atomic
// batch planned by firewall.PlanUpdate against the kernel's table as last read or
// written. It sends no batch when the kernel already holds want. When the Firewall
// knows nothing about the kernel's table (its first Apply, or after a failed read or
// lost notifications) it replaces the table without reading it. Errors name the
// failing step; the kernel keeps its previous table on error.
func (f *Firewall) Apply(want *firewall.Table) (Outcome, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.apply(want)
}

func (f *Firewall) apply(want *firewall.Table) (Outcome, error) {

	losses := f.tracker.lossCount()
	var (
		gen   uint32
		genOK bool
		have  *firewall.Table
		err   error
	)
	if f.cacheValid {
		gen, genOK, have, err = f.current()
		if err != nil {
			f.log.Warn("reading nftables table failed; replacing it", "table", TableName, "err", err)
			have = nil
		}
	} else {
		// Nothing known about the kernel's table (a new process, lost notifications):
		// replacing it costs about as much as building it, while reading it back
		// costs time quadratic in the size of its sets.
		var gerr error
		gen, gerr = generation(f.genConn)
		genOK = gerr == nil
	}
	drifted := have == nil || have != f.written
	plan := firewall.PlanUpdate(have, want)
	if plan.Empty() {
		f.written = have
		return Outcome{Result: Unchanged, Drifted: drifted}, nil
	}
	res, paused := Replaced, false
	if !plan.Replace {
		res = ElementsUpdated
		if !plan.ElementsOnly() {
			res = Updated
		}
		f.update(have, want, plan)
		if paused, err = f.flush(plan.Size(want) > quietAbove); err != nil {
			f.log.Warn("updating the table failed; replacing it", "table", TableName, "err", err)
		}
	}
	if plan.Replace || err != nil {
		res = Replaced
		f.replace(want)
		if paused, err = f.flush(plan.Size(want) > quietAbove); err != nil {
			f.cacheValid, f.written = false, nil
			return Outcome{Result: Unchanged, Drifted: drifted}, fmt.Errorf("replacing table inet %s: %w", TableName, err)
		}
	}
	after, gerr := generation(f.genConn)
	f.cached, f.cachedLosses, f.written = want, losses, want
	if paused {
		// Nobody heard this batch. When another client committed while the tracker
		// was out of the group (a busy neighbour: its transaction waits for the
		// commit lock during the whole batch and lands right after it), the
		// structure is read again; set elements are taken as written. The blind
		// spot is a change to this table's elements committed between this batch
		// and the tracker's return to the group.
		f.cachedGen = after
		f.cacheValid = genOK && gerr == nil && f.tracker.lossCount() == losses
		if f.cacheValid && after != gen+1 {
			t, err := f.snapshot(want, change{structure: true})
			switch {
			case err != nil:
				f.cacheValid = false
			case firewall.Compare(want, t) != nil:
				f.cached = t
			}
		}
	} else {
		// The tracker hears this batch's generation and skips it as the
		// Firewall's own; whatever others committed since gen is marked.
		f.cachedGen = gen
		f.cacheValid = genOK && f.tracker.lossCount() == losses
	}
	return Outcome{Result: res, Drifted: drifted}, nil
}

// quietAbove is the number of set elements in a batch above which the batch is sent
// while the tracker is out of the notification group: the kernel builds one
// notification per element for every listener (seconds for 200,000 elements).
const quietAbove = 4096

// flush sends the queued batch, with the tracker out of the notification group when
// quiet (see tracker.pause); paused says whether it was.
func (f *Firewall) flush(quiet bool) (paused bool, err error) {
	paused = quiet && f.tracker.pause() == nil
	err = f.conn.Flush()
	if paused {
		if rerr := f.tracker.resume(); rerr != nil {
			f.log.Warn("rejoining nftables notifications failed", "err", rerr)
			f.tracker.lost()
		}
	}
	return paused, err
}

// current returns the ruleset generation (genOK false when it could not be queried)
// and the kernel's table. While the generation stays the same it returns the cached
// table; when it moved, it re-reads only what other processes changed according to
// the tracker (the structure without elements, and the elements of the sets they
// touched); when the tracker cannot tell (lost notifications, no cache), it reads the
// whole table. f.mu must be held.
func (f *Firewall) current() (gen uint32, genOK bool, t *firewall.Table, err error) {
	gen, gerr := generation(f.genConn)
	if gerr != nil {
		f.log.Debug("nftables generation unavailable; reading the table every time", "err", gerr)
		f.cacheValid = false
		t, err := f.snapshot(nil, change{structure: true})
		return 0, false, t, err
	}
	if f.cacheValid {
		if gen == f.cachedGen {
			return gen, true, f.cached, nil
		}
		if ch, ok := f.tracker.since(f.cachedGen, gen, f.cachedLosses); ok {
			t := f.cached
			if !ch.empty() {
				if t, err = f.snapshot(f.cached, ch); err != nil {
					f.cacheValid = false
					return gen, true, nil, err
				}
			}
			f.cached, f.cachedGen = t, gen
			return gen, true, t, nil
		}
	}
	f.cacheValid = false
	losses := f.tracker.lossCount()
	if t, err = f.snapshot(nil, change{structure: true}); err != nil {
		return gen, true, nil, err
	}
	f.cached, f.cachedGen, f.cachedLosses, f.cacheValid = t, gen, losses, true
	return gen, true, t, nil
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
	f.conn.AddTable(f.table) // so that the delete cannot fail when the table is missing
	f.conn.DelTable(f.table)
	f.conn.AddTable(f.table)
	for _, s := range want.Sets {
		f.addSet(s)
	}
	f.addChains(want.Chains)
}

// update queues the batch of plan (not a Replace) from have to want: with
// plan.Chains every rule and chain goes and want's come back; sets are deleted and
// created as the plan says, the other sets get their element changes.
func (f *Firewall) update(have, want *firewall.Table, plan firewall.Plan) {
	c := f.conn
	if plan.Chains {
		c.FlushTable(f.table) // every rule, so that the chains and sets they use can go
		for _, ch := range have.Chains {
			c.DelChain(&nftables.Chain{Name: ch.Name, Table: f.table})
		}
	}
	for _, name := range plan.DeleteSets {
		c.DelSet(&nftables.Set{Table: f.table, Name: name})
	}
	for _, name := range plan.AddSets {
		f.addSet(*want.Set(name))
	}
	for _, s := range plan.Delete {
		f.chunked(s.Set, s.Intervals, c.SetDeleteElements)
	}
	for _, s := range plan.Add {
		f.chunked(s.Set, s.Intervals, c.SetAddElements)
	}
	if plan.Chains {
		f.addChains(want.Chains)
	}
}

func (f *Firewall) addSet(s firewall.Set) {
	set := &nftables.Set{Table: f.table, Name: s.Name, Interval: s.Interval, KeyType: keyType(s.Type),
		Dynamic: s.Dynamic, HasTimeout: s.Timeout > 0, Timeout: s.Timeout, Size: s.Size, Counter: s.Counter}
	// AddSet only queues a message; marshalling errors surface in Flush.
	_ = f.conn.AddSet(set, nil)
	f.chunked(s.Name, s.Elements, f.conn.SetAddElements)
}

// addChains queues chains and then their rules, so that jumps find their targets.
func (f *Firewall) addChains(chains []firewall.Chain) {
	added := make([]*nftables.Chain, len(chains))
	for i, ch := range chains {
		nc := &nftables.Chain{Name: ch.Name, Table: f.table}
		if b := ch.Base; b != nil {
			hook, prio, policy := nftables.ChainHook(b.Hook), nftables.ChainPriority(b.Priority), nftables.ChainPolicyAccept
			if b.Policy == firewall.VerdictDrop {
				policy = nftables.ChainPolicyDrop
			}
			nc.Hooknum, nc.Priority, nc.Type, nc.Policy = &hook, &prio, nftables.ChainType(b.Type), &policy
		}
		added[i] = f.conn.AddChain(nc)
	}
	for i, ch := range chains {
		for _, r := range ch.Rules {
			f.conn.AddRule(&nftables.Rule{Table: f.table, Chain: added[i], Exprs: ruleExprs(r), UserData: userData(r)})
		}
	}
}

// Delete removes the table; a missing table is not an error.
func (f *Firewall) Delete() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cacheValid, f.written = false, nil
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
	_, _, t, err := f.current()
	return t, err
}

// snapshot reads the table from the kernel; nil when it is missing. With a base
// table, it re-reads only what ch names: with ch.structure the table, chains, rules
// and set definitions (elements of a set whose definition is unchanged and that ch
// does not name are taken from base), and the elements of the sets in ch.sets.
func (f *Firewall) snapshot(base *firewall.Table, ch change) (*firewall.Table, error) {
	f.snapshots++
	if base != nil && !ch.structure {
		t := &firewall.Table{Flags: base.Flags, Chains: base.Chains, Sets: slices.Clone(base.Sets)}
		for i, s := range t.Sets {
			if !ch.sets[s.Name] || !addressSet(s) {
				continue
			}
			elems, err := f.elements(&nftables.Set{Table: f.table, Name: s.Name, KeyType: keyType(s.Type)})
			if err != nil {
				return nil, err
			}
			t.Sets[i].Elements = elems
		}
		return t, nil
	}
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
	names, err := exprNames(f.genConn)
	if err != nil {
		return nil, err
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
			switch {
			case err != nil:
				spec = firewall.Rule{Unknown: fmt.Sprintf("handle %d: %v", r.Handle, err)}
			case !sameExpressions(r.Exprs, names[r.Handle]):
				spec = firewall.Rule{Unknown: fmt.Sprintf("handle %d: the kernel holds expressions %v", r.Handle, names[r.Handle])}
			}
			c.Rules = append(c.Rules, spec)
		}
		t.Chains = append(t.Chains, c)
	}
	sets, err := f.conn.GetSets(f.table)
	if err != nil {
		return nil, fmt.Errorf("listing sets: %w", err)
	}
	setExprs, err := setExprNames(f.genConn)
	if err != nil {
		return nil, err
	}
	for _, s := range sets {
		fs := firewall.Set{Name: s.Name, Type: firewall.SetType(s.KeyType.Name), Interval: s.Interval, Dynamic: s.Dynamic,
			Size: s.Size, Foreign: foreignFlags(s, setExprs[s.Name])}
		if s.HasTimeout {
			fs.Timeout = s.Timeout
		}
		fs.Counter = slices.Equal(setExprs[s.Name], []string{"counter"})
		var old *firewall.Set
		if base != nil {
			old = base.Set(s.Name)
		}
		switch {
		case !addressSet(fs):
			// A dynamic set's elements are kernel state (see firewall.Set), and a
			// set of another type is foreign.
		case old != nil && !ch.sets[s.Name] && old.Type == fs.Type && old.Interval == fs.Interval && old.Foreign == fs.Foreign:
			fs.Elements = old.Elements
		default:
			if fs.Elements, err = f.elements(s); err != nil {
				return nil, err
			}
		}
		t.Sets = append(t.Sets, fs)
	}
	t.Sort()
	return t, nil
}

// elements reads the elements of an address set.
func (f *Firewall) elements(s *nftables.Set) ([]firewall.Interval, error) {
	elems, err := f.conn.GetSetElements(s)
	if err != nil {
		return nil, fmt.Errorf("listing elements of set %s: %w", s.Name, err)
	}
	return elementIntervals(elems, int(s.KeyType.Bytes)), nil
}

// addressSet reports whether s is a set of addresses whose elements are read back
// (a policy set).
func addressSet(s firewall.Set) bool {
	return !s.Dynamic && (s.Type == firewall.TypeIPv4 || s.Type == firewall.TypeIPv6)
}

func mustConcat(types ...nftables.SetDatatype) nftables.SetDatatype {
	t, err := nftables.ConcatSetType(types...)
	if err != nil {
		panic(err) // four types fit in the 32-bit type magic
	}
	return t
}

var keyTypes = map[firewall.SetType]nftables.SetDatatype{
	firewall.TypeIPv4:       nftables.TypeIPAddr,
	firewall.TypeIPv6:       nftables.TypeIP6Addr,
	firewall.TypeFlow4:      mustConcat(nftables.TypeIPAddr, nftables.TypeIPAddr, nftables.TypeInetProto, nftables.TypeInetService),
	firewall.TypeFlow4Proto: mustConcat(nftables.TypeIPAddr, nftables.TypeIPAddr, nftables.TypeInetProto),
	firewall.TypeFlow6:      mustConcat(nftables.TypeIP6Addr, nftables.TypeIP6Addr, nftables.TypeInetProto, nftables.TypeInetService),
	firewall.TypeFlow6Proto: mustConcat(nftables.TypeIP6Addr, nftables.TypeIP6Addr, nftables.TypeInetProto),
}

// keyType returns the library's key type of t, a type firewall.Build uses.
func keyType(t firewall.SetType) nftables.SetDatatype {
	if k, ok := keyTypes[t]; ok {
		return k
	}
	return nftables.TypeIPAddr
}

// foreignFlags names the flags of s, and the element expressions exprs, that
// segmesh never sets.
func foreignFlags(s *nftables.Set, exprs []string) string {
	var out []string
	for _, fl := range []struct {
		on   bool
		name string
	}{{s.Anonymous, "anonymous"}, {s.Constant, "constant"}, {s.IsMap, "map"}, {s.HasTimeout && s.Timeout == 0, "timeout"},
		{s.Concatenation, "concatenation"}} {
		if fl.on {
			out = append(out, fl.name)
		}
	}
	if len(exprs) > 0 && !slices.Equal(exprs, []string{"counter"}) {
		out = append(out, "expressions "+strings.Join(exprs, ","))
	}
	return strings.Join(out, ",")
}

// Watch calls notify (from one goroutine; it must not block) after every change
// another process makes to the table or its sets' elements, and after
// notifications were lost (changes may have been missed), until ctx is done.
func (f *Firewall) Watch(ctx context.Context, notify func()) error {
	stop := f.tracker.watch(notify)
	go func() {
		<-ctx.Done()
		stop()
	}()
	return nil
}
