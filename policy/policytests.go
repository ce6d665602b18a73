package policy

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// Inventories a TestFailure can come from.
const (
	PrototypeRun = "prototype"
	InventoryRun = "inventory"
)

// TestFailure is one failed assertion of a policy's tests section.
type TestFailure struct {
	// Test is the test's name and Pos where its entry starts.
	Test string
	Pos  Pos
	// Inventory is PrototypeRun or InventoryRun: the inventory the test failed on.
	Inventory string
	// Msg says what failed, naming the first counterexample flow, e.g.
	// `db-1 -> web-1 tcp/22 is allowed by rule ops-admin (policy.yaml:45:5), want deny`.
	Msg string
	// NoMatch is set when the test could pass only vacuously on this inventory:
	// an endpoint names neither a segment nor a node of it (a typo, or a node that
	// has not enrolled yet; the message then suggests the closest name), names a
	// segment without a member in it, or the test has no flow to check. A caller
	// may tolerate it on a real inventory that is still filling up; the prototype
	// inventory never has an empty segment.
	NoMatch bool
	// EmptyEndpoint is set, with NoMatch, when the reason is that an endpoint holds
	// no node of this inventory (as opposed to a name it does not know, or a test
	// whose endpoints hold no two distinct parties).
	EmptyEndpoint bool
}

// Error formats the failure as `file:line:col: test "NAME": MESSAGE`, followed by
// " (prototype inventory)" for a failure on the prototype inventory.
func (f TestFailure) Error() string {
	s := fmt.Sprintf("%s: test %q: %s", f.Pos, f.Test, f.Msg)
	if f.Inventory == PrototypeRun {
		s += " (prototype inventory)"
	}
	return s
}

// RunTests evaluates the tests of p against PrototypeInventory(p) and, when
// nodes is not nil, against nodes too, and returns every failure: at most one
// per test and inventory, with the first counterexample (sources, then
// destinations, by name; IPv4 before IPv6), sorted by position, the prototype
// inventory's failure first.
//
// Semantics (see also the package's evaluator): a flow test fails when some
// source of From and some destination of To (two distinct parties, over an
// address family both have) lack a packet of Allow or carry a packet of Deny,
// with packets as PortSetOf reads the entries. An only test fails when some
// source of From can open a connection, on any packet, to a node or external
// address that no target of Only holds (a node named by an address is held for
// that family only). Nodes are parties, and so are external addresses, cut into
// ranges that the same external segments hold. A test fails with NoMatch when
// From, To or a target of Only names neither a segment nor a node, matches
// nothing, names an address inside the default overlay prefixes that no node
// holds, or when From and To have no pair of distinct parties with a common
// family, or when neither From nor To can hold a node (two external parties).
//
// On the prototype inventory, nodes that stand for explicit node names carry
// the labels of the same-named node of nodes, if any. A test naming a node that
// the prototype lacks, or an address inside the default overlay prefixes
// (100.64.0.0/10, fd5e:6d65:7368::/48), is left to the run on nodes when nodes
// is not nil and fails otherwise: such names mean real nodes. RunTests returns
// an error, and no failures, when nodes is not a valid inventory (see Compile).
func RunTests(p *Policy, nodes []Node) ([]TestFailure, error) {
	if p == nil {
		return nil, fmt.Errorf("running policy tests: nil policy")
	}
	if len(p.Tests) == 0 {
		return nil, nil
	}
	var all []TestFailure
	proto := PrototypeInventory(p)
	if nodes != nil {
		// A prototype node that stands for an explicit node name carries the
		// labels of the inventory's node of that name.
		byName := make(map[string]*Node, len(nodes))
		for i := range nodes {
			byName[nodes[i].Name] = &nodes[i]
		}
		for i := range proto {
			if n, ok := byName[proto[i].Name]; ok {
				proto[i].Labels = n.Labels
			}
		}
	}
	runs := []struct {
		name  string
		nodes []Node
	}{{PrototypeRun, proto}}
	if nodes != nil {
		runs = append(runs, struct {
			name  string
			nodes []Node
		}{InventoryRun, nodes})
	}
	for _, run := range runs {
		var extra []addrRange
		for _, t := range p.Tests {
			extra = append(extra, endpointRanges(append([]Endpoint{t.From, t.To}, t.Only...)...)...)
		}
		u, err := newUniverse(p, run.nodes, extra)
		if err != nil {
			return nil, fmt.Errorf("running policy tests on the %s inventory: %w", run.name, err)
		}
		tr := &testRunner{u: u, run: run.name, haveInventory: nodes != nil, cache: map[[3]int]PortSet{}}
		for i := range p.Tests {
			if f, failed := tr.runTest(&p.Tests[i]); failed {
				all = append(all, f)
			}
		}
	}
	slices.SortStableFunc(all, func(a, b TestFailure) int {
		return cmp.Or(cmp.Compare(a.Pos.Line, b.Pos.Line), cmp.Compare(a.Pos.Col, b.Pos.Col))
	})
	return all, nil
}

type testRunner struct {
	u             *universe
	run           string
	haveInventory bool
	cache         map[[3]int]PortSet
	everyone      *partySet
}

// skip is returned by resolve for an endpoint the prototype run leaves to the inventory run.
type skip struct{}

func (skip) Error() string { return "needs an inventory" }

func (tr *testRunner) allowed(a, b, f int) PortSet {
	k := [3]int{a, b, f}
	if s, ok := tr.cache[k]; ok {
		return s
	}
	s := tr.u.allowed(tr.u.classes[a], tr.u.classes[b], f)
	tr.cache[k] = s
	return s
}

// resolve returns the parties of endpoint e; what says which side it is.
func (tr *testRunner) resolve(e Endpoint, what string) (partySet, *TestFailure, error) {
	u := tr.u
	if tr.run == PrototypeRun {
		_, isSeg := u.segIndex[e.Name]
		_, isNode := u.nodeIndex[e.Name]
		if e.Name != "" && !isSeg && !isNode || e.Addr.IsValid() && inPrototypeOverlay(e.Addr) {
			if tr.haveInventory {
				return partySet{}, nil, skip{}
			}
			return partySet{}, &TestFailure{NoMatch: true, Msg: fmt.Sprintf(
				"%s %s matches no node of the prototype inventory%s; a real node needs an inventory (segmesh policy check --inventory NODES.yaml)",
				what, e, u.nameHint(e.Name))}, nil
		}
	}
	if e.Addr.IsValid() && inPrototypeOverlay(e.Addr) {
		// An overlay address means a node; outside an inventory node it is
		// no party a policy could ever hold, and the test would pass vacuously.
		if _, held := u.addrOwner[e.Addr]; !held {
			return partySet{}, &TestFailure{NoMatch: true, EmptyEndpoint: true, Msg: fmt.Sprintf(
				"%s %s matches no node: no node of the inventory holds this overlay address", what, e)}, nil
		}
	}
	s, err := u.resolve(e)
	if err != nil {
		return partySet{}, &TestFailure{NoMatch: true, Msg: fmt.Sprintf("%s %s", what, err)}, nil
	}
	if s.empty() {
		return partySet{}, &TestFailure{NoMatch: true, EmptyEndpoint: true, Msg: fmt.Sprintf("%s %s matches no node", what, e)}, nil
	}
	return s, nil, nil
}

// holdsNode reports whether s holds a node.
func (tr *testRunner) holdsNode(s partySet) bool {
	for _, c := range s.classes() {
		if tr.u.classes[c].node {
			return true
		}
	}
	return false
}

// counterexample is one flow that breaks a test.
type counterexample struct {
	src, dst, fam int
	srcClass      int
	dstClass      int
	pk            Packet
}

func (c counterexample) less(d counterexample) bool {
	return cmp.Or(cmp.Compare(c.src, d.src), cmp.Compare(c.dst, d.dst), cmp.Compare(c.fam, d.fam)) < 0
}

func (tr *testRunner) runTest(t *Test) (TestFailure, bool) {
	fail := func(f *TestFailure) (TestFailure, bool) {
		f.Test, f.Pos, f.Inventory = t.Name, t.Pos, tr.run
		return *f, true
	}
	from, f, err := tr.resolve(t.From, "from")
	if _, skipped := err.(skip); skipped {
		return TestFailure{}, false
	}
	if f != nil {
		return fail(f)
	}
	if t.IsOnly() {
		return tr.runOnly(t, from, fail)
	}
	to, f, err := tr.resolve(t.To, "to")
	if _, skipped := err.(skip); skipped {
		return TestFailure{}, false
	}
	if f != nil {
		return fail(f)
	}
	u := tr.u
	if !tr.holdsNode(from) && !tr.holdsNode(to) {
		// Like a rule between external segments, such a test checks nothing
		// the overlay filters; it fails once, on the prototype run.
		if tr.run != PrototypeRun {
			return TestFailure{}, false
		}
		return fail(&TestFailure{Msg: fmt.Sprintf("connects no node: from %s and to %s hold only external addresses, and the overlay filters only traffic of nodes", t.From, t.To)})
	}
	type check struct {
		set   PortSet
		allow bool
	}
	var checks []check
	for _, m := range t.Allow {
		checks = append(checks, check{portSetOfMatch(m), true})
	}
	for _, m := range t.Deny {
		checks = append(checks, check{portSetOfMatch(m), false})
	}
	flows := 0
	for _, ch := range checks {
		var best *counterexample
		for _, cs := range from.classes() {
			for _, cd := range to.classes() {
				srcs, dsts := from.byClass[cs], to.byClass[cd]
				s, d, ok := firstPair(srcs, dsts)
				if !ok {
					continue
				}
				for _, fam := range familiesOf(u.classes[cs], u.classes[cd]) {
					flows++
					got := tr.allowed(cs, cd, fam)
					bad := ch.set.Minus(got)
					if !ch.allow {
						bad = ch.set.Intersect(got)
					}
					pk, found := bad.First()
					if !found {
						continue
					}
					c := counterexample{s, d, fam, cs, cd, pk}
					if best == nil || c.less(*best) {
						best = &c
					}
				}
			}
		}
		if best != nil {
			want := "want deny"
			if ch.allow {
				want = "want allow"
			}
			return fail(&TestFailure{Msg: tr.describe(*best, nil) + ", " + want})
		}
	}
	if flows == 0 {
		return fail(&TestFailure{NoMatch: true, Msg: fmt.Sprintf("no flow from %s to %s: they hold no two distinct parties with a common address family", t.From, t.To)})
	}
	return TestFailure{}, false
}

func (tr *testRunner) runOnly(t *Test, from partySet, fail func(*TestFailure) (TestFailure, bool)) (TestFailure, bool) {
	u := tr.u
	var targets partySet
	var names []string
	for _, e := range t.Only {
		s, f, err := tr.resolve(e, "only target")
		if _, skipped := err.(skip); skipped {
			return TestFailure{}, false
		}
		if f != nil {
			return fail(f)
		}
		for c, ps := range s.byClass {
			for _, p := range ps {
				targets.add(c, p)
			}
		}
		names = append(names, e.String())
	}
	held := targets.families(u)
	if tr.everyone == nil {
		tr.everyone = &partySet{}
		for p := range len(u.nodes) + len(u.atoms) {
			if !u.isNode(p) && u.atoms[p-len(u.nodes)].nodeAddr {
				continue
			}
			tr.everyone.add(u.classOf[p], p)
		}
	}
	var best *counterexample
	for _, cs := range from.classes() {
		srcs := from.byClass[cs]
		for _, cd := range tr.everyone.classes() {
			for _, fam := range familiesOf(u.classes[cs], u.classes[cd]) {
				got := tr.allowed(cs, cd, fam)
				pk, found := got.First()
				if !found {
					continue
				}
				// The first destination of the class outside the targets, and a source other than it.
				for _, d := range tr.everyone.byClass[cd] {
					if held[d][fam] {
						continue
					}
					s, _, ok := firstPair(srcs, []int{d})
					if !ok {
						continue
					}
					c := counterexample{s, d, fam, cs, cd, pk}
					if best == nil || c.less(*best) {
						best = &c
					}
					break
				}
			}
		}
	}
	if best != nil {
		want := "want no flow at all"
		if len(names) > 0 {
			want = "want flows only to " + strings.Join(names, ", ")
		}
		b := *best
		otherFails := func() bool {
			return !tr.allowed(b.srcClass, b.dstClass, 1-b.fam).Empty() && !held[b.dst][1-b.fam]
		}
		return fail(&TestFailure{Msg: tr.describe(b, otherFails) + ", " + want})
	}
	return TestFailure{}, false
}

// describe writes a counterexample: "SRC -> DST PACKET is allowed by rule R
// (POS)" or "... is denied (no rule allows it)", naming the family when the
// other family of the same pair behaves differently.
//
// otherFails says whether the same packet fails the test over the pair's other
// family too; nil compares the verdicts of both families instead.
func (tr *testRunner) describe(c counterexample, otherFails func() bool) string {
	u := tr.u
	a, b := u.classes[c.srcClass], u.classes[c.dstClass]
	isAllowed := tr.allowed(c.srcClass, c.dstClass, c.fam).Has(c.pk)
	over := ""
	if len(familiesOf(a, b)) == 2 {
		same := tr.allowed(c.srcClass, c.dstClass, 1-c.fam).Has(c.pk) == isAllowed
		if otherFails != nil {
			same = otherFails()
		}
		if !same {
			over = " over " + familyName(c.fam)
		}
	}
	s := fmt.Sprintf("%s -> %s %s%s", u.name(c.src), u.name(c.dst), c.pk, over)
	if isAllowed {
		rules := u.allowingRules(a, b, c.fam, c.pk.set())
		if len(rules) > 0 && !u.fullRule(a, b, c.fam, rules[0]) {
			rules = u.combinedRules(a, b, rules)
		}
		return s + " is allowed by " + u.rulesText(rules)
	}
	return s + " is denied (" + u.denyReason(a, b, c.fam, c.pk) + ")"
}

// rulesText writes rule references: "rule a (p:1:1)" or "rules a (p:1:1), b (p:5:1)".
func (u *universe) rulesText(rules []int) string {
	refs := make([]string, len(rules))
	for i, r := range rules {
		refs[i] = u.ruleRef(r)
	}
	if len(refs) == 1 {
		return "rule " + refs[0]
	}
	return "rules " + strings.Join(refs, ", ")
}

// denyReason says why pk from a to b over f is denied: "no rule allows it", or,
// when rules open part of the path, which parts nothing opens.
func (u *universe) denyReason(a, b *class, f int, pk Packet) string {
	if !a.node && !b.node {
		return "neither end is a node"
	}
	partial := u.allowingRules(a, b, f, pk.set())
	if len(partial) == 0 {
		return "no rule allows it"
	}
	var egress, ingress bool
	ps := pk.set()
	for i := range u.rules {
		r := &u.rules[i]
		if !r.ports.Contains(ps) {
			continue
		}
		egress = egress || a.node && r.opensEgress(a, b, f)
		ingress = ingress || b.node && r.opensIngress(a, b, f)
	}
	var missing []string
	if a.node && !egress {
		missing = append(missing, "nothing opens the source's egress")
	}
	if b.node && !ingress {
		missing = append(missing, "nothing opens the destination's ingress")
	}
	if a.node && b.node && !u.peers(a, b) {
		missing = append(missing, "nothing makes the nodes peers (a rule with one in a node segment of from and the other in a node segment of to)")
	}
	verb := "opens"
	if len(partial) > 1 {
		verb = "open"
	}
	return fmt.Sprintf("%s %s only part of the path: %s", u.rulesText(partial), verb, strings.Join(missing, "; "))
}
