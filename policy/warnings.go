package policy

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strings"
)

// Warning is a problem of a valid policy on one inventory that does not stop
// the policy from being applied: something that selects no node today, and so
// allows nothing until the inventory changes.
type Warning struct {
	Pos Pos
	Msg string
}

// String formats the warning as "file:line:col: warning: message".
func (w Warning) String() string { return w.Pos.String() + ": warning: " + w.Msg }

// Bounds on the node-name hints of Warnings, each of which compares a name
// with every node's: the inventory size up to which it hints, and how many
// missing names it hints at most.
const (
	maxHintNodes = 2000
	maxHints     = 50
)

// Warnings returns what in p selects no node of the inventory nodes, sorted by
// position then message:
//
//   - a node segment (selectors and/or nodes) that holds no node, at the
//     segment: `segment "web" selects no node of the inventory`, naming the
//     selector labels that no node carries at all;
//   - a node name listed in a segment's nodes without a node of that name, at
//     the name, with the closest node name as a hint;
//   - a rule whose from or to holds no node and no external (cidrs) segment,
//     at the from or to key: the rule allows nothing;
//   - a relay whose node is not in the inventory, at the relay's entry, with
//     the closest node name as a hint: it relays for no pair.
//
// External segments never count as empty. nodes is the inventory whatever its
// length: an empty (or nil) inventory makes every node segment and every rule
// without an external side a warning. Warnings assumes p is valid (from Parse)
// and does not validate nodes; it returns nil when there is nothing to say.
func Warnings(p *Policy, nodes []Node) []Warning {
	if p == nil {
		return nil
	}
	var ws []Warning
	add := func(pos, fallback Pos, format string, args ...any) {
		if pos == (Pos{}) {
			pos = fallback
		}
		ws = append(ws, Warning{Pos: pos, Msg: fmt.Sprintf(format, args...)})
	}
	names := make(map[string]bool, len(nodes))
	for i := range nodes {
		names[nodes[i].Name] = true
	}
	var nameList []string // for hints; built on first use
	hints := 0
	// hint returns " (did you mean NAME?)" for a missing node name n, or "".
	hint := func(n string) string {
		if hints++; hints > maxHints || len(nodes) > maxHintNodes {
			return ""
		}
		if nameList == nil {
			nameList = slices.Collect(maps.Keys(names))
		}
		if c := closest(n, nameList); c != "" {
			return fmt.Sprintf(" (did you mean %q?)", c)
		}
		return ""
	}
	// empty[name] reports whether a node segment holds no node; external
	// segments are absent. "all" is empty exactly when the inventory is.
	empty := map[string]bool{AllSegment: len(nodes) == 0}
	for si := range p.Segments {
		s := &p.Segments[si]
		if s.External() {
			continue
		}
		found := false
		for i, n := range s.Nodes {
			if names[n] {
				found = true
				continue
			}
			var pos Pos
			if i < len(s.NodesPos) {
				pos = s.NodesPos[i]
			}
			add(pos, s.Pos, "segment %q names node %q, which is not in the inventory%s", s.Name, n, hint(n))
		}
		for i := 0; !found && i < len(nodes); i++ {
			found = anySelector(s.Selectors, nodes[i].Labels)
		}
		empty[s.Name] = !found
		if !found {
			add(s.Pos, s.Pos, "segment %q selects no node of the inventory%s", s.Name, missingLabels(s.Selectors, nodes))
		}
	}
	for ri := range p.Rules {
		r := &p.Rules[ri]
		for _, side := range []struct {
			field string
			refs  []string
			pos   Pos
		}{{"from", r.From, r.FromPos}, {"to", r.To, r.ToPos}} {
			holds := false
			for _, ref := range side.refs {
				if e, node := empty[ref]; !node || !e {
					holds = true // external, non-empty, or undefined (not from Parse)
					break
				}
			}
			if holds || len(side.refs) == 0 {
				continue
			}
			why := "the inventory has no node"
			if side.refs[0] != AllSegment {
				quoted := make([]string, len(side.refs))
				for i, ref := range side.refs {
					quoted[i] = fmt.Sprintf("%q", ref)
				}
				why = "segment " + quoted[0] + " is empty"
				if len(quoted) > 1 {
					why = "segments " + strings.Join(quoted, ", ") + " are empty"
				}
			}
			add(side.pos, r.Pos, "rule %q allows nothing: its %s selects no node of the inventory (%s)", r.Name, side.field, why)
		}
	}
	for _, r := range p.Relays {
		if !names[r.Node] {
			add(r.Pos, r.Pos, "relay %q is not in the inventory; it relays for no pair%s", r.Node, hint(r.Node))
		}
	}
	slices.SortStableFunc(ws, func(a, b Warning) int {
		return cmp.Or(
			cmp.Compare(a.Pos.File, b.Pos.File),
			cmp.Compare(a.Pos.Line, b.Pos.Line),
			cmp.Compare(a.Pos.Col, b.Pos.Col),
			cmp.Compare(a.Msg, b.Msg),
		)
	})
	return ws
}

// maxMissingLabels is how many labels missingLabels names at most.
const maxMissingLabels = 3

// missingLabels names, as " (no node has the label k=v)" or " (no node has
// any of the labels k=v, ...)", the labels of sels that no node of nodes
// carries, sorted; "" when every label is carried by some node (then only
// their combination is missing) or when there is no node at all.
func missingLabels(sels []Selector, nodes []Node) string {
	var missing []string
	seen := map[string]bool{}
	for _, sel := range sels {
		for _, k := range slices.Sorted(maps.Keys(sel)) {
			kv := k + "=" + sel[k]
			if seen[kv] {
				continue
			}
			seen[kv] = true
			carried := false
			for i := 0; !carried && i < len(nodes); i++ {
				v, ok := nodes[i].Labels[k]
				carried = ok && v == sel[k]
			}
			if !carried {
				missing = append(missing, kv)
			}
		}
	}
	switch {
	case len(missing) == 0 || len(nodes) == 0:
		return ""
	case len(missing) == 1:
		return fmt.Sprintf(" (no node has the label %s)", missing[0])
	}
	slices.Sort(missing)
	more := ""
	if len(missing) > maxMissingLabels {
		more = fmt.Sprintf(" and %d more", len(missing)-maxMissingLabels)
		missing = missing[:maxMissingLabels]
	}
	return fmt.Sprintf(" (no node has any of the labels %s%s)", strings.Join(missing, ", "), more)
}
