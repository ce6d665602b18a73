package policy

import (
	"cmp"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// Query asks Explain about one packet. From and To are endpoints as
// ParseEndpoint reads them: a segment, a node, or an overlay or external
// address; To may carry the destination port ("db-1:5432", "[fd5e::4]:5432").
// Packet is "tcp/PORT", "udp/PORT" or "icmp", or just "tcp" or "udp" when To
// carries the port.
type Query struct {
	From, To, Packet string
}

// Verdict is Explain's answer for all flows of a query.
type Verdict string

// Verdicts: every flow of the query allowed, none, or some.
const (
	Allowed       Verdict = "allowed"
	Denied        Verdict = "denied"
	PartlyAllowed Verdict = "partly allowed"
)

// RuleRef names a rule and where it starts. It encodes to JSON as
// {"name": NAME, "pos": "file:line:col"}.
type RuleRef struct {
	Name string
	Pos  Pos
}

// String writes "name (file:line:col)", the form FilterRule.Origin uses.
func (r RuleRef) String() string { return fmt.Sprintf("%s (%s)", r.Name, r.Pos) }

// MarshalJSON encodes r as {"name": NAME, "pos": "file:line:col"}.
func (r RuleRef) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Name string `json:"name"`
		Pos  string `json:"pos"`
	}{r.Name, r.Pos.String()})
}

// Explanation is the answer to a Query.
type Explanation struct {
	// From and To are the query's endpoints, normalised (ports removed).
	From string `json:"from"`
	To   string `json:"to"`
	// Packet is the packet asked about.
	Packet  Packet  `json:"packet"`
	Verdict Verdict `json:"verdict"`
	// Cases group the query's flows (one per source, destination and address
	// family) by outcome: allowed cases first, then denied ones.
	Cases []ExplainCase `json:"cases"`
}

// ExplainCase is a set of flows with the same outcome and the same reasons.
type ExplainCase struct {
	Allowed bool `json:"allowed"`
	// Count is the number of (source, destination) pairs with a flow in the case;
	// Flows lists up to 8 of them, as "SRC -> DST over IPv4", or "over IPv4 and
	// IPv6" when both families of the pair belong here.
	Count int      `json:"count"`
	Flows []string `json:"flows"`
	// Rules are the rules that allow the flows (allowed cases): each of them alone
	// opens both ends, or, when none does, together they open the ends and make
	// the nodes peers.
	Rules []RuleRef `json:"rules,omitempty"`
	// Reason says why the flows are denied (denied cases), e.g. "no rule allows it".
	Reason string `json:"reason,omitempty"`
	// Closest are up to 3 rules that match the most of from, to and packet (at
	// least one), best first, then in file order (denied cases).
	Closest []ClosestRule `json:"closest,omitempty"`
}

// ClosestRule is a rule that nearly allows a denied flow.
type ClosestRule struct {
	Rule RuleRef `json:"rule"`
	// Matches lists the parts that match: "from", "to", "packet".
	Matches []string `json:"matches"`
	// Mismatches explains each part that does not, for the case's first flow,
	// e.g. "from: web-1 is not in api" or "packet: tcp/5432 is not in icmp tcp/22".
	Mismatches []string `json:"mismatches"`
}

// MarshalText encodes pk as String does.
func (pk Packet) MarshalText() ([]byte, error) { return []byte(pk.String()), nil }

const maxCaseFlows = 8

// Explain evaluates one packet from q.From to q.To against p and the inventory
// nodes (use PrototypeInventory(p) when there is none), with the semantics of
// RunTests: every pair of distinct parties and every address family they share
// is a flow. It returns an error when the query does not parse, names neither a
// segment nor a node, matches nothing or has no flow, or when nodes is not a
// valid inventory (see Compile).
func Explain(p *Policy, nodes []Node, q Query) (*Explanation, error) {
	from, err := ParseEndpoint(q.From)
	if err != nil {
		return nil, fmt.Errorf("from: %w", err)
	}
	if from.Port != 0 {
		return nil, fmt.Errorf("from %q has a port; the policy matches destination ports only: drop :%d", q.From, from.Port)
	}
	to, err := ParseEndpoint(q.To)
	if err != nil {
		return nil, fmt.Errorf("to: %w", err)
	}
	pk, err := queryPacket(q.Packet, to.Port)
	if err != nil {
		return nil, err
	}
	to.Port = 0
	u, err := newUniverse(p, nodes, endpointRanges(from, to))
	if err != nil {
		return nil, fmt.Errorf("explaining: %w", err)
	}
	srcs, err := u.resolveQuery(from, "from")
	if err != nil {
		return nil, err
	}
	dsts, err := u.resolveQuery(to, "to")
	if err != nil {
		return nil, err
	}
	x := &Explanation{From: from.String(), To: to.String(), Packet: pk}
	if err := u.explain(x, srcs, dsts, u.name); err != nil {
		return nil, err
	}
	return x, nil
}

// explain fills x's cases and verdict for the flows from the parties of srcs to
// those of dsts with packet x.Packet; name says how messages call a party. It
// returns an error when the sets hold no flow.
func (u *universe) explain(x *Explanation, srcs, dsts partySet, name func(int) string) error {
	pk := x.Packet
	type caseAcc struct {
		c       ExplainCase
		flows   map[[2]int]int
		counted map[[2]int]bool // class pairs already in Count
	}
	cases := map[string]*caseAcc{}
	var order []string
	pkSet := pk.set()
	for _, cs := range srcs.classes() {
		for _, cd := range dsts.classes() {
			a, b := u.classes[cs], u.classes[cd]
			ss, ds := srcs.byClass[cs], dsts.byClass[cd]
			n := pairCount(ss, ds)
			if n == 0 {
				continue
			}
			for _, f := range familiesOf(a, b) {
				var key string
				var ec ExplainCase
				if u.allowed(a, b, f).Has(pk) {
					rules := u.allowingRules(a, b, f, pkSet)
					if len(rules) > 0 && !u.fullRule(a, b, f, rules[0]) {
						rules = u.combinedRules(a, b, rules)
					}
					ec = ExplainCase{Allowed: true}
					for _, r := range rules {
						ec.Rules = append(ec.Rules, RuleRef{u.rules[r].rule.Name, u.rules[r].rule.Pos})
					}
					key = fmt.Sprint("allowed", rules)
				} else {
					ec = ExplainCase{Reason: u.denyReason(a, b, f, pk)}
					key = "denied " + ec.Reason + fmt.Sprint(u.closest(a, b, f, pkSet))
				}
				acc, ok := cases[key]
				if !ok {
					acc = &caseAcc{c: ec, flows: map[[2]int]int{}, counted: map[[2]int]bool{}}
					cases[key] = acc
					order = append(order, key)
					if !ec.Allowed {
						s, d, _ := firstPair(ss, ds)
						acc.c.Closest = u.closestRules(a, b, f, pk, s, d, name)
					}
				}
				if !acc.counted[[2]int{cs, cd}] {
					acc.counted[[2]int{cs, cd}] = true
					acc.c.Count += n
				}
				scanned := 0
			pairs:
				for _, s := range ss {
					for _, d := range ds {
						if s == d {
							continue
						}
						if scanned++; scanned > maxCaseFlows {
							break pairs
						}
						k := [2]int{s, d}
						if i, seen := acc.flows[k]; seen {
							acc.c.Flows[i] += " and " + familyName(f)
						} else if len(acc.flows) < maxCaseFlows {
							acc.flows[k] = len(acc.c.Flows)
							acc.c.Flows = append(acc.c.Flows, fmt.Sprintf("%s -> %s over %s", name(s), name(d), familyName(f)))
						}
					}
				}
			}
		}
	}
	if len(order) == 0 {
		return fmt.Errorf("no flow from %s to %s: they hold no two distinct parties with a common address family", x.From, x.To)
	}
	allowed, denied := 0, 0
	for _, k := range order {
		c := cases[k].c
		slices.Sort(c.Flows)
		x.Cases = append(x.Cases, c)
		if c.Allowed {
			allowed++
		} else {
			denied++
		}
	}
	slices.SortStableFunc(x.Cases, func(a, b ExplainCase) int {
		if a.Allowed != b.Allowed {
			if a.Allowed {
				return -1
			}
			return 1
		}
		return cmp.Compare(a.Flows[0], b.Flows[0])
	})
	switch {
	case denied == 0:
		x.Verdict = Allowed
	case allowed == 0:
		x.Verdict = Denied
	default:
		x.Verdict = PartlyAllowed
	}
	return nil
}

// queryPacket combines a query's packet with the port of its destination.
func queryPacket(s string, toPort uint16) (Packet, error) {
	if toPort == 0 {
		if s == "" {
			return Packet{}, fmt.Errorf("no packet: give one such as tcp/5432, udp/53 or icmp")
		}
		return ParsePacket(s)
	}
	switch s {
	case "":
		return Packet{}, fmt.Errorf("to names port %d but no protocol: give tcp or udp", toPort)
	case string(ProtoTCP), string(ProtoUDP):
		return Packet{Protocol: Protocol(s), Port: toPort}, nil
	}
	pk, err := ParsePacket(s)
	if err != nil {
		return Packet{}, err
	}
	if pk.Protocol == ProtoICMP || pk.Port != toPort {
		return Packet{}, fmt.Errorf("to names port %d but the packet is %s; give one of them", toPort, pk)
	}
	return pk, nil
}

// resolveQuery resolves a query endpoint, refusing one that matches nothing.
func (u *universe) resolveQuery(e Endpoint, what string) (partySet, error) {
	s, err := u.resolve(e)
	if err != nil {
		return s, fmt.Errorf("%s: %w", what, err)
	}
	if s.empty() {
		return s, fmt.Errorf("%s: %s matches no node", what, e)
	}
	return s, nil
}

// ruleMatch says which parts of a flow rule r holds: the source (a node in a
// node segment of From, an external address in an external one), the
// destination (likewise with To) and the packet.
func (u *universe) ruleMatch(r *evalRule, a, b *class, f int, pk PortSet) (from, to, port bool) {
	if a.node {
		from = a.segs.intersects(r.fromNode)
	} else {
		from = a.ext[f].intersects(r.fromExt)
	}
	if b.node {
		to = b.segs.intersects(r.toNode)
	} else {
		to = b.ext[f].intersects(r.toExt)
	}
	return from, to, r.ports.Contains(pk)
}

type closeness struct {
	rule, score      int
	from, to, packet bool
}

// closest ranks the rules by how many parts of the flow they match (at least
// one), best first, then in file order, and returns up to 3.
func (u *universe) closest(a, b *class, f int, pk PortSet) []closeness {
	var out []closeness
	for i := range u.rules {
		fm, tm, pm := u.ruleMatch(&u.rules[i], a, b, f, pk)
		score := 0
		for _, m := range []bool{fm, tm, pm} {
			if m {
				score++
			}
		}
		if score > 0 {
			out = append(out, closeness{i, score, fm, tm, pm})
		}
	}
	slices.SortStableFunc(out, func(x, y closeness) int { return cmp.Compare(y.score, x.score) })
	return out[:min(3, len(out))]
}

// closestRules describes closest for the flow from party s to party d; name
// says how messages call a party.
func (u *universe) closestRules(a, b *class, f int, pk Packet, s, d int, name func(int) string) []ClosestRule {
	var out []ClosestRule
	for _, c := range u.closest(a, b, f, pk.set()) {
		r := &u.rules[c.rule]
		fm, tm, pm := c.from, c.to, c.packet
		cr := ClosestRule{Rule: RuleRef{r.rule.Name, r.rule.Pos}, Matches: []string{}, Mismatches: []string{}}
		for _, part := range []struct {
			name  string
			ok    bool
			party int
			cl    *class
			ext   bitset
			segs  []string
		}{{"from", fm, s, a, r.fromExt, r.rule.From}, {"to", tm, d, b, r.toExt, r.rule.To}} {
			if part.ok {
				cr.Matches = append(cr.Matches, part.name)
				continue
			}
			msg := fmt.Sprintf("%s: %s is not in %s", part.name, name(part.party), strings.Join(part.segs, ", "))
			if part.cl.node && part.cl.ext[f].intersects(part.ext) {
				msg += fmt.Sprintf(" (an external segment there holds its %s address, but external segments hold no node)", familyName(f))
			}
			cr.Mismatches = append(cr.Mismatches, msg)
		}
		if pm {
			cr.Matches = append(cr.Matches, "packet")
		} else {
			cr.Mismatches = append(cr.Mismatches, fmt.Sprintf("packet: %s is not in %s", pk, r.ports))
		}
		out = append(out, cr)
	}
	return out
}

// Text writes the explanation for people, e.g.
//
//	web-1 -> db-1 tcp/5432: denied
//	  web-1 -> db-1 over IPv4 and IPv6: no rule allows it
//	    closest: api-to-db (policy.yaml:40:5) matches to, packet; from: web-1 is not in api
func (x *Explanation) Text() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s -> %s %s: %s\n", x.From, x.To, x.Packet, x.Verdict)
	for _, c := range x.Cases {
		flows := strings.Join(c.Flows, ", ")
		if more := c.Count - len(c.Flows); more > 0 {
			flows += fmt.Sprintf(" and %d more", more)
		}
		if c.Allowed {
			refs := make([]string, len(c.Rules))
			for i, r := range c.Rules {
				refs[i] = r.String()
			}
			word := "rule"
			if len(refs) > 1 {
				word = "rules"
			}
			fmt.Fprintf(&b, "  allowed: %s\n    by %s %s\n", flows, word, strings.Join(refs, ", "))
			continue
		}
		fmt.Fprintf(&b, "  denied: %s\n    %s\n", flows, c.Reason)
		if len(c.Closest) == 0 && c.Reason == "no rule allows it" {
			fmt.Fprintf(&b, "    no rule matches its source, destination or packet\n")
		}
		for _, cr := range c.Closest {
			matches := "nothing"
			if len(cr.Matches) > 0 {
				matches = strings.Join(cr.Matches, ", ")
			}
			fmt.Fprintf(&b, "    closest: rule %s matches %s; %s\n", cr.Rule, matches, strings.Join(cr.Mismatches, "; "))
		}
	}
	return b.String()
}
