package policy

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strings"
)

// DiffResult is what changes between two policies on one inventory.
type DiffResult struct {
	// Added and Removed are the flows the new policy allows and the old one did
	// not, and the reverse, grouped by segment pair, family and packets.
	Added   []FlowChange `json:"added"`
	Removed []FlowChange `json:"removed"`
	// Peers lists, for every node whose WireGuard peers change, the peers it gains
	// and loses, sorted by node name.
	Peers []PeerChange `json:"peers"`
	// Relays lists, for every relay node whose users change, the nodes that
	// gain and lose the right to use it, sorted by relay name (see RelayChange).
	Relays []RelayChange `json:"relays"`
}

// FlowChange is a group of flows that change the same way. From and To are the
// segments of the rules that allow them (in the new policy for an added flow,
// in the old one for a removed flow); a flow allowed by several rules appears
// under each rule's segment pair.
type FlowChange struct {
	From string `json:"from"`
	To   string `json:"to"`
	// Ports are the packets that change.
	Ports PortSet `json:"ports"`
	// Family is "IPv4" or "IPv6" when the change holds for that family of the
	// flows only; empty when it holds for every family their ends share.
	Family string `json:"family,omitempty"`
	// Rules are the rules of the segment pair that allow the packets.
	Rules []RuleRef `json:"rules"`
	// Count is the number of (source, destination) pairs; Flows lists up to 8 of
	// them as "SRC -> DST", where an external end is an address, prefix or range.
	Count int      `json:"count"`
	Flows []string `json:"flows"`
}

// PeerChange is how one node's WireGuard peers change.
type PeerChange struct {
	Node string `json:"node"`
	NameChanges
}

// RelayChange is how the users of one relay node change. The users of a relay R
// are the nodes other than R that belong to a segment of R's for: R may forward
// between any two of them that the rules make peers. A relay only one policy
// lists gains or loses all its users. The order of the relays section is not
// compared.
type RelayChange struct {
	Relay string `json:"relay"`
	NameChanges
}

// NameChanges are the names one node gains and loses (peers, or users of a relay).
type NameChanges struct {
	// Added and Removed list up to 100 names each, sorted; the counts are exact.
	Added        []string `json:"added,omitempty"`
	Removed      []string `json:"removed,omitempty"`
	AddedCount   int      `json:"added_count"`
	RemovedCount int      `json:"removed_count"`
}

// String writes the changes as "+a +b +N more -c -M more".
func (c NameChanges) String() string {
	var parts []string
	for _, n := range c.Added {
		parts = append(parts, "+"+n)
	}
	if more := c.AddedCount - len(c.Added); more > 0 {
		parts = append(parts, fmt.Sprintf("+%d more", more))
	}
	for _, n := range c.Removed {
		parts = append(parts, "-"+n)
	}
	if more := c.RemovedCount - len(c.Removed); more > 0 {
		parts = append(parts, fmt.Sprintf("-%d more", more))
	}
	return strings.Join(parts, " ")
}

const maxPeerNames = 100

// Identical reports whether the two policies allow exactly the same flows,
// give every node the same peers and every relay the same users on the inventory.
func (d *DiffResult) Identical() bool {
	return len(d.Added) == 0 && len(d.Removed) == 0 && len(d.Peers) == 0 && len(d.Relays) == 0
}

// Diff compares what old and new allow on the inventory nodes (nil: the
// prototype inventory of both policies, PrototypeInventory(old, new)), with the
// semantics of RunTests: per pair of distinct parties (nodes, and ranges of
// external addresses that the same segments of either policy hold) and address
// family, the packets allowed; per node, its peers. Policies that differ only
// in order, names or layout but allow the same flows are identical. Per relay
// node it compares the users (see RelayChange). It returns an error when nodes
// is not a valid inventory (see Compile).
func Diff(old, new *Policy, nodes []Node) (*DiffResult, error) {
	if old == nil || new == nil {
		return nil, fmt.Errorf("diffing policies: nil policy")
	}
	if nodes == nil {
		nodes = PrototypeInventory(old, new)
	}
	uo, err := newUniverse(old, nodes, externalRanges(new))
	if err != nil {
		return nil, fmt.Errorf("diffing policies: old policy: %w", err)
	}
	un, err := newUniverse(new, nodes, externalRanges(old))
	if err != nil {
		return nil, fmt.Errorf("diffing policies: new policy: %w", err)
	}
	if len(uo.atoms) != len(un.atoms) {
		return nil, fmt.Errorf("diffing policies: internal error: %d and %d address ranges", len(uo.atoms), len(un.atoms))
	}
	// Combined classes: parties that both policies put in the same classes.
	type combined struct {
		old, new int
		members  []int
		node     bool
	}
	var cls []*combined
	index := map[[2]int]int{}
	for p := range len(uo.nodes) + len(uo.atoms) {
		if !uo.isNode(p) && uo.atoms[p-len(uo.nodes)].nodeAddr {
			continue
		}
		k := [2]int{uo.classOf[p], un.classOf[p]}
		i, ok := index[k]
		if !ok {
			i = len(cls)
			index[k] = i
			cls = append(cls, &combined{old: k[0], new: k[1], node: uo.isNode(p)})
		}
		cls[i].members = append(cls[i].members, p)
	}

	d := &DiffResult{Added: []FlowChange{}, Removed: []FlowChange{}, Peers: []PeerChange{}}
	if d.Relays, err = relayChanges(old, new, nodes); err != nil {
		return nil, fmt.Errorf("diffing policies: %w", err)
	}
	groups := map[string]*FlowChange{}
	var keys []string
	record := func(added bool, u *universe, ci, cj *combined, fam string, f int, delta PortSet) {
		a, b := u.classes[pick(added, ci.old, ci.new)], u.classes[pick(added, cj.old, cj.new)]
		for _, at := range u.attribute(a, b, f, delta) {
			k := fmt.Sprintf("%v|%s|%s|%s|%s", added, at.from, at.to, fam, at.ports)
			g, ok := groups[k]
			if !ok {
				g = &FlowChange{From: at.from, To: at.to, Ports: at.ports, Family: fam, Rules: []RuleRef{}}
				groups[k] = g
				keys = append(keys, k)
			}
			for _, r := range at.rules {
				ref := RuleRef{u.rules[r].rule.Name, u.rules[r].rule.Pos}
				if !slices.Contains(g.Rules, ref) {
					g.Rules = append(g.Rules, ref)
				}
			}
			g.Count += pairCount(ci.members, cj.members)
			for _, s := range ci.members {
				if len(g.Flows) >= maxCaseFlows {
					break
				}
				for _, t := range cj.members {
					if s == t {
						continue
					}
					if len(g.Flows) >= maxCaseFlows {
						break
					}
					g.Flows = append(g.Flows, uo.name(s)+" -> "+uo.name(t))
				}
			}
		}
	}
	peerDelta := make([][2][]int, len(cls)) // per class: classes of gained, lost peers
	for i, ci := range cls {
		for j, cj := range cls {
			if !ci.node && !cj.node || pairCount(ci.members, cj.members) == 0 {
				continue
			}
			oa, ob := uo.classes[ci.old], uo.classes[cj.old]
			na, nb := un.classes[ci.new], un.classes[cj.new]
			if ci.node && cj.node {
				po, pn := uo.peers(oa, ob), un.peers(na, nb)
				if pn && !po {
					peerDelta[i][0] = append(peerDelta[i][0], j)
				} else if po && !pn {
					peerDelta[i][1] = append(peerDelta[i][1], j)
				}
			}
			fams := familiesOf(oa, ob)
			var deltas [2][2]PortSet // family -> added, removed
			for _, f := range fams {
				o, n := uo.allowed(oa, ob, f), un.allowed(na, nb, f)
				deltas[f] = [2]PortSet{n.Minus(o), o.Minus(n)}
			}
			same := len(fams) == 2 && deltas[0][0].Equal(deltas[1][0]) && deltas[0][1].Equal(deltas[1][1])
			for _, f := range fams {
				fam := ""
				if len(fams) == 2 && !same {
					fam = familyName(f)
				}
				if !deltas[f][0].Empty() {
					record(true, un, ci, cj, fam, f, deltas[f][0])
				}
				if !deltas[f][1].Empty() {
					record(false, uo, ci, cj, fam, f, deltas[f][1])
				}
				if same {
					break
				}
			}
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		g := groups[k]
		slices.SortFunc(g.Rules, func(a, b RuleRef) int { return cmp.Compare(a.String(), b.String()) })
		if strings.HasPrefix(k, "true|") {
			d.Added = append(d.Added, *g)
		} else {
			d.Removed = append(d.Removed, *g)
		}
	}
	members := make([][]int, len(cls))
	for i, c := range cls {
		members[i] = c.members
	}
	d.Peers = peerChanges(uo, members, peerDelta)
	return d, nil
}

// relayUsers returns, per relay node of p that has users among nodes, its
// users, sorted.
func relayUsers(p *Policy, nodes []Node) (map[string][]string, error) {
	prog, err := Prepare(p)
	if err != nil {
		return nil, err
	}
	users := make(map[string][]string, len(prog.relays))
	var ms []int32
	for i := range nodes {
		n := &nodes[i]
		ms = prog.Memberships(n, ms[:0])
		for ri := range prog.relays {
			r := &prog.relays[ri]
			if r.node != n.Name && r.segs.anyOf(ms) {
				users[r.node] = append(users[r.node], n.Name)
			}
		}
	}
	for _, u := range users {
		slices.Sort(u)
	}
	return users, nil
}

// relayChanges compares the users of every relay of old and new on nodes.
func relayChanges(old, new *Policy, nodes []Node) ([]RelayChange, error) {
	uo, err := relayUsers(old, nodes)
	if err != nil {
		return nil, fmt.Errorf("old policy: %w", err)
	}
	un, err := relayUsers(new, nodes)
	if err != nil {
		return nil, fmt.Errorf("new policy: %w", err)
	}
	names := slices.AppendSeq(slices.Collect(maps.Keys(uo)), maps.Keys(un))
	slices.Sort(names)
	names = slices.Compact(names)
	out := []RelayChange{}
	for _, relay := range names {
		rc := RelayChange{Relay: relay}
		rc.Added, rc.AddedCount = sortedMinus(un[relay], uo[relay])
		rc.Removed, rc.RemovedCount = sortedMinus(uo[relay], un[relay])
		if rc.AddedCount+rc.RemovedCount > 0 {
			out = append(out, rc)
		}
	}
	return out, nil
}

// sortedMinus returns up to maxPeerNames of the names of sorted list a that
// sorted list b lacks, and how many there are.
func sortedMinus(a, b []string) ([]string, int) {
	var out []string
	n := 0
	for _, x := range a {
		if _, found := slices.BinarySearch(b, x); found {
			continue
		}
		n++
		if len(out) < maxPeerNames {
			out = append(out, x)
		}
	}
	return out, n
}

func pick(added bool, old, new int) int {
	if added {
		return new
	}
	return old
}

// peerChanges turns per-class peer deltas into per-node lists.
func peerChanges(u *universe, members [][]int, delta [][2][]int) []PeerChange {
	out := []PeerChange{}
	for i, ms := range members {
		if len(delta[i][0]) == 0 && len(delta[i][1]) == 0 {
			continue
		}
		var lists [2][]int
		for k := range 2 {
			for _, j := range delta[i][k] {
				lists[k] = append(lists[k], members[j]...)
			}
			slices.Sort(lists[k])
		}
		for _, x := range ms {
			pc := PeerChange{Node: u.name(x)}
			for k, dst := range []*[]string{&pc.Added, &pc.Removed} {
				n := 0
				for _, p := range lists[k] {
					if p == x {
						continue
					}
					n++
					if len(*dst) < maxPeerNames {
						*dst = append(*dst, u.name(p))
					}
				}
				if k == 0 {
					pc.AddedCount = n
				} else {
					pc.RemovedCount = n
				}
			}
			if pc.AddedCount+pc.RemovedCount > 0 {
				out = append(out, pc)
			}
		}
	}
	slices.SortFunc(out, func(a, b PeerChange) int { return cmp.Compare(a.Node, b.Node) })
	return out
}

// externalRanges returns the ranges of p's external segments.
func externalRanges(p *Policy) []addrRange {
	var out []addrRange
	for _, s := range p.Segments {
		for _, pfx := range cidrPrefixes(s.CIDRs) {
			out = append(out, prefixRange(pfx))
		}
	}
	return out
}

// attribution is the part of a change that the rules of one segment pair allow.
type attribution struct {
	from, to string
	ports    PortSet
	rules    []int
}

// attribute splits the packets delta, which u allows from a to b over f, by
// the segment pairs of the rules that allow them: a rule holding the source in
// a segment F of From and the destination in a segment T of To contributes its
// packets of delta to (F, T). Packets that only several rules together allow
// (one opening each end, others making the nodes peers) go to the pairs of the
// rules opening the ends, every such pair citing all of them.
func (u *universe) attribute(a, b *class, f int, delta PortSet) []attribution {
	acc := map[[2]string]*attribution{}
	var order [][2]string
	add := func(ri int, strict bool, ports PortSet, together []int) {
		r := &u.rules[ri]
		holds := func(c *class, node, ext bitset, names []string) []string {
			var out []string
			for _, name := range names {
				si := u.segIndex[name]
				if c.node && c.segs.has(si) && node.has(si) || c.ext[f].has(si) && ext.has(si) && (!strict || !c.node) {
					out = append(out, name)
				}
			}
			return out
		}
		for _, fn := range holds(a, r.fromNode, r.fromExt, r.rule.From) {
			for _, tn := range holds(b, r.toNode, r.toExt, r.rule.To) {
				k := [2]string{fn, tn}
				at, ok := acc[k]
				if !ok {
					at = &attribution{from: fn, to: tn}
					acc[k] = at
					order = append(order, k)
				}
				at.ports = at.ports.Union(ports)
				for _, r := range append([]int{ri}, together...) {
					if !slices.Contains(at.rules, r) {
						at.rules = append(at.rules, r)
					}
				}
			}
		}
	}
	rest := delta
	for i := range u.rules {
		r := &u.rules[i]
		fm, tm, _ := u.ruleMatch(r, a, b, f, PortSet{})
		if both := r.ports.Intersect(delta); fm && tm && !both.Empty() {
			add(i, true, both, nil)
			rest = rest.Minus(both)
		}
	}
	if !rest.Empty() {
		parts := u.allowingRules(a, b, f, rest)
		together := u.combinedRules(a, b, parts)
		for _, i := range parts {
			add(i, false, u.rules[i].ports.Intersect(rest), together)
		}
	}
	out := make([]attribution, len(order))
	for i, k := range order {
		out[i] = *acc[k]
	}
	return out
}

// Text writes the diff for people: "identical" or the added and removed flows
// ("+ FROM -> TO PORTS (N flows: ...) by rule ..."), the peers per node
// ("NODE: +gained -lost") and the users per relay ("RELAY: +gained -lost").
func (d *DiffResult) Text() string {
	if d.Identical() {
		return "identical: no flow and no peer changes\n"
	}
	var b strings.Builder
	for _, sec := range []struct {
		title, sign string
		changes     []FlowChange
	}{{"flows added", "+", d.Added}, {"flows removed", "-", d.Removed}} {
		if len(sec.changes) == 0 {
			continue
		}
		fmt.Fprintf(&b, "%s:\n", sec.title)
		for _, c := range sec.changes {
			over := ""
			if c.Family != "" {
				over = " over " + c.Family
			}
			flows := strings.Join(c.Flows, ", ")
			if more := c.Count - len(c.Flows); more > 0 {
				flows += fmt.Sprintf(" and %d more", more)
			}
			noun := "flows"
			if c.Count == 1 {
				noun = "flow"
			}
			refs := make([]string, len(c.Rules))
			for i, r := range c.Rules {
				refs[i] = r.String()
			}
			word := "rule"
			if len(refs) > 1 {
				word = "rules"
			}
			fmt.Fprintf(&b, "  %s %s -> %s %s%s (%d %s: %s) by %s %s\n", sec.sign, c.From, c.To, c.Ports, over, c.Count, noun, flows, word, strings.Join(refs, ", "))
		}
	}
	if len(d.Peers) > 0 {
		fmt.Fprintf(&b, "peers:\n")
		for _, pc := range d.Peers {
			fmt.Fprintf(&b, "  %s: %s\n", pc.Node, pc.NameChanges)
		}
	}
	if len(d.Relays) > 0 {
		fmt.Fprintf(&b, "relay users:\n")
		for _, rc := range d.Relays {
			fmt.Fprintf(&b, "  %s: %s\n", rc.Relay, rc.NameChanges)
		}
	}
	return b.String()
}
