// Package nft programs and reads back segmesh's nftables table, `inet segmesh`, which
// enforces a node's compiled policy (policy.Filter) on the overlay interface only.
//
// Layout of the table for interface IFACE:
//
//	chain input   { type filter hook input priority filter; policy accept; iifname IFACE jump ingress }
//	chain output  { type filter hook output priority filter; policy accept; oifname IFACE jump egress }
//	chain forward { type filter hook forward priority filter; policy accept;
//	                iifname IFACE jump transit; oifname IFACE jump transit }
//	chain ingress { ct state established,related accept; ct state invalid drop;
//	                ip saddr @SET_v4 <match> accept; ip6 saddr @SET_v6 <match> accept; ...; drop }
//	chain egress  { the same with daddr }
//	chain transit { ct state established,related accept; drop }
//	set SET_v4 { type ipv4_addr; flags interval }   one pair per policy.AddressSet
//	set SET_v6 { type ipv6_addr; flags interval }
//
// Every policy rule carries the FilterRule's Origin as its nft comment and its position
// (rule index, match index) as extra rule userdata, so the Filter can be recovered from
// the kernel exactly. Every change is one netlink batch: either only set elements are
// added and deleted (when chains and rules already match), or the whole table is
// replaced (add table; delete table; add table, sets, chains, rules).
package nft

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"segmesh/api/nftrender"
	"segmesh/policy"
)

// TableName is the name of segmesh's table in the inet family.
const TableName = "segmesh"

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
	// applied is the last filter Apply made the kernel hold; Read uses it to report
	// the original prefixes of sets whose kernel intervals match it.
	applied *policy.Filter
	// origins maps comments that differ from their Origin (cut or sanitised) back to it.
	origins map[string]string
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
	return &Firewall{
		iface: iface, nsFD: netnsFD, log: log, conn: conn,
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

// Close closes the netlink socket.
func (f *Firewall) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.conn.CloseLasting()
}

// Apply makes the table hold exactly filter. It sends no batch when the kernel already
// holds it, only set element changes when chains and rules match, and otherwise
// replaces the table; each in one atomic batch. Errors name the failing step; the
// kernel keeps its previous table on error.
func (f *Firewall) Apply(filter policy.Filter) (Result, error) {
	want, err := desiredModel(f.iface, filter)
	if err != nil {
		return Unchanged, fmt.Errorf("rendering filter: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()

	have, err := f.snapshot()
	switch {
	case err != nil:
		f.log.Warn("reading nftables table failed; replacing it", "table", TableName, "err", err)
	case sameStructure(want, have):
		added, removed := elementDiff(want, have)
		if len(added) == 0 && len(removed) == 0 {
			f.record(filter)
			return Unchanged, nil
		}
		for _, name := range slices.Sorted(maps.Keys(removed)) {
			f.chunked(name, removed[name], f.conn.SetDeleteElements)
		}
		for _, name := range slices.Sorted(maps.Keys(added)) {
			f.chunked(name, added[name], f.conn.SetAddElements)
		}
		err := f.conn.Flush()
		if err == nil {
			f.record(filter)
			return ElementsUpdated, nil
		}
		f.log.Warn("updating set elements failed; replacing the table", "table", TableName, "err", err)
	}

	f.replace(want)
	if err := f.conn.Flush(); err != nil {
		return Unchanged, fmt.Errorf("replacing table inet %s: %w", TableName, err)
	}
	f.record(filter)
	return Replaced, nil
}

func (f *Firewall) record(filter policy.Filter) {
	c := filter
	f.applied = &c
	f.origins = map[string]string{}
	for _, r := range slices.Concat(filter.Ingress, filter.Egress) {
		if c := nftrender.Comment(r.Origin); c != r.Origin {
			f.origins[c] = r.Origin
		}
	}
}

// chunked queues op on set name with at most elementsPerMessage intervals' elements per message.
func (f *Firewall) chunked(name string, ivs []interval, op func(*nftables.Set, []nftables.SetElement) error) {
	set := &nftables.Set{Table: f.table, Name: name}
	for len(ivs) > 0 {
		n := min(len(ivs), elementsPerMessage/2)
		// op only queues a message; its error is a marshalling error that Flush reports too.
		_ = op(set, intervalElements(ivs[:n]))
		ivs = ivs[n:]
	}
}

// replace queues the batch that recreates the table as want.
func (f *Firewall) replace(want *model) {
	c := f.conn
	c.AddTable(f.table) // so that the delete cannot fail when the table is missing
	c.DelTable(f.table)
	c.AddTable(f.table)
	for i, name := range slices.Sorted(maps.Keys(want.Sets)) {
		spec := want.Sets[name]
		set := &nftables.Set{Table: f.table, Name: name, ID: uint32(i + 1), Interval: true, KeyType: nftables.TypeIPAddr}
		if spec == v6SetSpec {
			set.KeyType = nftables.TypeIP6Addr
		}
		// AddSet only queues a message; marshalling errors surface in Flush.
		_ = c.AddSet(set, nil)
		f.chunked(name, want.Elems[name], c.SetAddElements)
	}
	chains := map[string]*nftables.Chain{}
	for _, name := range slices.Sorted(maps.Keys(want.Chains)) {
		spec := want.Chains[name]
		ch := &nftables.Chain{Name: name, Table: f.table}
		if spec.Hooked {
			hook, prio, policy := nftables.ChainHook(spec.Hook), nftables.ChainPriority(spec.Prio), spec.Policy
			ch.Hooknum, ch.Priority, ch.Type, ch.Policy = &hook, &prio, spec.Type, &policy
		}
		chains[name] = c.AddChain(ch)
	}
	for _, name := range slices.Sorted(maps.Keys(want.Rules)) {
		for _, r := range want.Rules[name] {
			c.AddRule(&nftables.Rule{Table: f.table, Chain: chains[name], Exprs: r.exprs(), UserData: r.userData()})
		}
	}
}

// elementDiff returns, per set, the intervals to add and to delete to turn have into want.
func elementDiff(want, have *model) (added, removed map[string][]interval) {
	added, removed = map[string][]interval{}, map[string][]interval{}
	for name := range want.Sets {
		w, h := want.Elems[name], have.Elems[name]
		if a := minus(w, h); len(a) > 0 {
			added[name] = a
		}
		if r := minus(h, w); len(r) > 0 {
			removed[name] = r
		}
	}
	return added, removed
}

func minus(a, b []interval) []interval {
	in := map[interval]bool{}
	for _, iv := range b {
		in[iv] = true
	}
	var out []interval
	for _, iv := range a {
		if !in[iv] {
			out = append(out, iv)
		}
	}
	return out
}

// Delete removes the table; a missing table is not an error.
func (f *Firewall) Delete() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.applied, f.origins = nil, nil
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
	m, err := f.snapshot()
	if err != nil {
		return nil, err
	}
	return m.handles[chain], nil
}

// snapshot reads the table from the kernel. A missing table yields Present == false.
func (f *Firewall) snapshot() (*model, error) {
	m := &model{Chains: map[string]chainSpec{}, Rules: map[string][]ruleSpec{}, Sets: map[string]setSpec{},
		Elems: map[string][]interval{}, handles: map[string][]uint64{}}
	t, err := f.conn.ListTableOfFamily(TableName, nftables.TableFamilyINet)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return m, nil
		}
		return nil, fmt.Errorf("listing table inet %s: %w", TableName, err)
	}
	m.Present, m.Flags = true, t.Flags
	chains, err := f.conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("listing chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table == nil || ch.Table.Name != TableName {
			continue
		}
		var spec chainSpec
		if ch.Hooknum != nil {
			spec.Hooked, spec.Hook, spec.Type = true, uint32(*ch.Hooknum), ch.Type
			if ch.Priority != nil {
				spec.Prio = int32(*ch.Priority)
			}
			if ch.Policy != nil {
				spec.Policy = *ch.Policy
			}
		}
		m.Chains[ch.Name] = spec
		rules, err := f.conn.GetRules(f.table, ch)
		if err != nil {
			return nil, fmt.Errorf("listing rules of chain %s: %w", ch.Name, err)
		}
		for _, r := range rules {
			spec, err := decodeRule(r.Exprs, r.UserData)
			if err != nil {
				spec = ruleSpec{Unknown: fmt.Sprintf("handle %d: %v", r.Handle, err)}
			}
			m.Rules[ch.Name] = append(m.Rules[ch.Name], spec)
			m.handles[ch.Name] = append(m.handles[ch.Name], r.Handle)
		}
	}
	sets, err := f.conn.GetSets(f.table)
	if err != nil {
		return nil, fmt.Errorf("listing sets: %w", err)
	}
	for _, s := range sets {
		m.Sets[s.Name] = setSpec{KeyType: s.KeyType.Name, Interval: s.Interval, Anonymous: s.Anonymous,
			Constant: s.Constant, IsMap: s.IsMap, Timeout: s.HasTimeout, Dynamic: s.Dynamic,
			Concatenation: s.Concatenation, Counter: s.Counter}
		if s.KeyType.Name != nftables.TypeIPAddr.Name && s.KeyType.Name != nftables.TypeIP6Addr.Name {
			continue
		}
		elems, err := f.conn.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("listing elements of set %s: %w", s.Name, err)
		}
		m.Elems[s.Name] = elementIntervals(elems, int(s.KeyType.Bytes))
	}
	return m, nil
}

// Read returns the filter the kernel's table enforces. When the table differs from
// anything Apply writes (missing table, changed or extra chains, rules or sets, a rule
// of another shape), the result carries one extra Ingress rule per difference with an
// empty Set and Origin "drift: <what>", so it never equals a filter given to Apply.
func (f *Firewall) Read() (policy.Filter, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	have, err := f.snapshot()
	if err != nil {
		return policy.Filter{}, err
	}
	return f.decode(have), nil
}

// decode turns a snapshot into a Filter (see Read).
func (f *Firewall) decode(have *model) (out policy.Filter) {
	var drift []string
	defer func() {
		for _, d := range drift {
			out.Ingress = append(out.Ingress, policy.FilterRule{Origin: "drift: " + d})
		}
	}()
	if !have.Present {
		drift = append(drift, fmt.Sprintf("table inet %s is missing", TableName))
		return out
	}
	if have.Flags != 0 {
		drift = append(drift, fmt.Sprintf("table flags are %#x", have.Flags))
	}
	wantChains, wantRules := fixedChains(f.iface)
	for _, name := range slices.Sorted(maps.Keys(wantChains)) {
		h, ok := have.Chains[name]
		switch {
		case !ok:
			drift = append(drift, fmt.Sprintf("chain %s is missing", name))
		case h != wantChains[name]:
			drift = append(drift, fmt.Sprintf("chain %s has another type, hook, priority or policy", name))
		}
	}
	for _, name := range slices.Sorted(maps.Keys(have.Chains)) {
		if _, ok := wantChains[name]; !ok {
			drift = append(drift, fmt.Sprintf("unexpected chain %s", name))
		}
	}
	for _, name := range slices.Sorted(maps.Keys(wantRules)) {
		if _, ok := have.Chains[name]; ok && !slices.Equal(have.Rules[name], wantRules[name]) {
			drift = append(drift, fmt.Sprintf("rules of chain %s differ", name))
		}
	}

	// Sets: pairs NAME_v4 / NAME_v6 of the expected types.
	halves := map[string]int{}
	for _, name := range slices.Sorted(maps.Keys(have.Sets)) {
		spec := have.Sets[name]
		switch {
		case strings.HasSuffix(name, suffixV4) && spec == v4SetSpec:
			halves[strings.TrimSuffix(name, suffixV4)] |= 1
		case strings.HasSuffix(name, suffixV6) && spec == v6SetSpec:
			halves[strings.TrimSuffix(name, suffixV6)] |= 2
		default:
			drift = append(drift, fmt.Sprintf("unexpected set %s", name))
		}
	}
	defined := map[string]bool{}
	for _, base := range slices.Sorted(maps.Keys(halves)) {
		if halves[base] != 3 {
			drift = append(drift, fmt.Sprintf("set %s lacks its IPv4 or IPv6 half", base))
			continue
		}
		defined[base] = true
		prefixes := slices.Concat(f.setPrefixes(have, base, suffixV4), f.setPrefixes(have, base, suffixV6))
		out.Sets = append(out.Sets, policy.AddressSet{Name: base, Prefixes: prefixes})
	}

	for _, pc := range []struct {
		chain string
		dir   direction
		dst   *[]policy.FilterRule
	}{{chainIngress, dirIngress, &out.Ingress}, {chainEgress, dirEgress, &out.Egress}} {
		rules, ok := have.Rules[pc.chain]
		if _, exists := have.Chains[pc.chain]; !exists {
			continue // reported as a missing chain
		}
		n := len(rules)
		if !ok || n < 3 || rules[0] != ctEstablished || rules[1] != ctInvalid || rules[n-1] != finalDrop {
			drift = append(drift, fmt.Sprintf("chain %s lacks its conntrack rules or final drop", pc.chain))
			continue
		}
		got, err := f.policyFromRules(rules[2:n-1], pc.dir, defined)
		if err != nil {
			drift = append(drift, fmt.Sprintf("chain %s: %v", pc.chain, err))
		}
		*pc.dst = append(*pc.dst, got...)
	}
	return out
}

// setPrefixes returns the prefixes of kernel set base+suffix: the ones last applied
// when the kernel's intervals are exactly their rendering, otherwise the shortest
// prefix list covering the intervals.
func (f *Firewall) setPrefixes(have *model, base, suffix string) []netip.Prefix {
	ivs := have.Elems[base+suffix]
	if f.applied != nil {
		for _, s := range f.applied.Sets {
			if s.Name != base {
				continue
			}
			var mine []netip.Prefix
			for _, p := range s.Prefixes {
				if p.Addr().Is4() == (suffix == suffixV4) {
					mine = append(mine, p)
				}
			}
			if slices.Equal(prefixIntervals(mine), ivs) {
				return mine
			}
		}
	}
	var out []netip.Prefix
	for _, iv := range ivs {
		out = append(out, intervalPrefixes(iv)...)
	}
	return out
}

// policyFromRules recovers FilterRules from the policy rules of a chain and checks
// that rendering them again yields exactly those kernel rules. On error the rules
// recovered so far are returned along with it.
func (f *Firewall) policyFromRules(rules []ruleSpec, dir direction, defined map[string]bool) ([]policy.FilterRule, error) {
	var out []policy.FilterRule
	lastRule, lastMatch := -1, -1
	for _, r := range rules {
		if r.Unknown != "" {
			return out, fmt.Errorf("unexpected rule %s", r.Unknown)
		}
		if !r.HasPos || r.Set == "" {
			return out, errors.New("unexpected rule without set or position")
		}
		ri, mi := int(r.Pos>>16), int(r.Pos&0xffff)
		if ri != lastRule {
			origin := r.Comment
			if full, ok := f.origins[r.Comment]; ok {
				origin = full
			}
			set := strings.TrimSuffix(strings.TrimSuffix(r.Set, suffixV4), suffixV6)
			out = append(out, policy.FilterRule{Set: set, Origin: origin})
			lastRule, lastMatch = ri, -1
		}
		if mi == posNoMatch {
			continue
		}
		cur := &out[len(out)-1]
		if mi != lastMatch {
			cur.Matches = append(cur.Matches, policy.PortMatch{Protocol: protocolOf(r)})
			lastMatch = mi
		}
		if r.HasDPort && r.NFProto == unix.NFPROTO_IPV4 {
			m := &cur.Matches[len(cur.Matches)-1]
			m.Ports = append(m.Ports, r.DPort)
		}
	}
	again, err := policyRules(out, dir, defined)
	if err != nil {
		return out, err
	}
	if !slices.Equal(again, rules) {
		return out, errors.New("policy rules are incomplete, reordered or altered")
	}
	return out, nil
}

func protocolOf(r ruleSpec) policy.Protocol {
	switch r.L4Proto {
	case 0:
		return policy.ProtoAny
	case unix.IPPROTO_TCP:
		return policy.ProtoTCP
	case unix.IPPROTO_UDP:
		return policy.ProtoUDP
	case unix.IPPROTO_ICMP, unix.IPPROTO_ICMPV6:
		return policy.ProtoICMP
	}
	return policy.Protocol(fmt.Sprintf("ipproto-%d", r.L4Proto))
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
