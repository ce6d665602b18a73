package firewall

import (
	"fmt"
	"slices"
	"strings"
)

// SetElements are intervals of one set.
type SetElements struct {
	Set       string
	Intervals []Interval
}

// Plan is how to turn the kernel's table into the desired one in one batch.
// Chains and rules are few and cheap to recreate; sets may hold hundreds of
// thousands of elements, so a set whose definition is unchanged is only updated.
type Plan struct {
	// Replace is true when the table is missing or its flags differ: the whole
	// table is recreated and the other fields are empty.
	Replace bool
	// Chains is true when any chain or rule differs: every rule and chain is
	// deleted and the desired ones are added.
	Chains bool
	// DeleteSets are deleted (not desired, or another definition); AddSets are
	// created with their elements (missing, or another definition). Sorted.
	DeleteSets, AddSets []string
	// Delete and Add are the element changes of the other sets, sorted by set name.
	Delete, Add []SetElements
}

// Empty reports whether the kernel already holds the desired table.
func (p Plan) Empty() bool {
	return !p.Replace && !p.Chains && len(p.DeleteSets) == 0 && len(p.AddSets) == 0 && len(p.Delete) == 0 && len(p.Add) == 0
}

// ElementsOnly reports whether the plan changes set elements and nothing else.
func (p Plan) ElementsOnly() bool {
	return !p.Replace && !p.Chains && len(p.DeleteSets) == 0 && len(p.AddSets) == 0
}

// Elements returns the number of intervals the plan adds to and deletes from kept
// sets.
func (p Plan) Elements() (added, deleted int) {
	for _, s := range p.Add {
		added += len(s.Intervals)
	}
	for _, s := range p.Delete {
		deleted += len(s.Intervals)
	}
	return added, deleted
}

// Size returns the number of set elements (intervals) one batch of the plan writes
// or deletes, want being the table it leads to.
func (p Plan) Size(want *Table) int {
	if p.Replace {
		return want.ElementCount()
	}
	added, deleted := p.Elements()
	for _, name := range p.AddSets {
		if s := want.Set(name); s != nil {
			added += len(s.Elements)
		}
	}
	return added + deleted
}

// PlanUpdate returns how to turn have (the kernel's table; nil when it is missing)
// into want. Work is linear in the number of set elements.
func PlanUpdate(have, want *Table) Plan {
	if have == nil || have.Flags != want.Flags {
		return Plan{Replace: true}
	}
	var p Plan
	if len(have.Chains) != len(want.Chains) {
		p.Chains = true
	} else {
		for i := range want.Chains {
			if !sameChain(have.Chains[i], want.Chains[i]) {
				p.Chains = true
				break
			}
		}
	}
	for _, h := range have.Sets {
		if w := want.Set(h.Name); w == nil || !sameSetDefinition(*w, h) {
			p.DeleteSets = append(p.DeleteSets, h.Name)
		}
	}
	for _, w := range want.Sets {
		h := have.Set(w.Name)
		if h == nil || !sameSetDefinition(w, *h) {
			p.AddSets = append(p.AddSets, w.Name)
			continue
		}
		if w.Dynamic || slices.Equal(w.Elements, h.Elements) {
			continue
		}
		d, a := minusIntervals(h.Elements, w.Elements), minusIntervals(w.Elements, h.Elements)
		if len(d) > recreateAbove && len(d) > len(w.Elements) {
			// Deleting most of a large set one element at a time costs the kernel
			// far more than dropping the set and creating the small one; its rules
			// go and come back with it.
			p.DeleteSets, p.AddSets, p.Chains = append(p.DeleteSets, w.Name), append(p.AddSets, w.Name), true
			continue
		}
		if len(d) > 0 {
			p.Delete = append(p.Delete, SetElements{Set: w.Name, Intervals: d})
		}
		if len(a) > 0 {
			p.Add = append(p.Add, SetElements{Set: w.Name, Intervals: a})
		}
	}
	slices.Sort(p.DeleteSets)
	slices.Sort(p.AddSets)
	return p
}

// recreateAbove is the number of deletions from one set above which PlanUpdate
// recreates the set when it is to keep fewer elements than it loses.
const recreateAbove = 1024

// sameSetDefinition compares everything but the elements. The elements of a
// dynamic set are never compared anywhere: the kernel's packet path writes them.
func sameSetDefinition(a, b Set) bool {
	return a.Name == b.Name && a.Type == b.Type && a.Interval == b.Interval && a.Dynamic == b.Dynamic &&
		a.Size == b.Size && a.Timeout == b.Timeout && a.Counter == b.Counter && a.Foreign == b.Foreign
}

// SameStructure reports whether a and b (both sorted) have the same flags, chains,
// rules and set definitions, i.e. differ at most in set elements. A nil table has
// no structure in common with any.
func SameStructure(a, b *Table) bool {
	if a == nil || b == nil || a.Flags != b.Flags || len(a.Chains) != len(b.Chains) || len(a.Sets) != len(b.Sets) {
		return false
	}
	for i := range a.Chains {
		if !sameChain(a.Chains[i], b.Chains[i]) {
			return false
		}
	}
	for i := range a.Sets {
		if !sameSetDefinition(a.Sets[i], b.Sets[i]) {
			return false
		}
	}
	return true
}

func sameChain(a, b Chain) bool {
	if a.Name != b.Name || (a.Base == nil) != (b.Base == nil) || a.Base != nil && *a.Base != *b.Base {
		return false
	}
	return slices.Equal(a.Rules, b.Rules)
}

// maxListed bounds the elements or rules one difference names.
const maxListed = 4

// Compare lists how have (the kernel's table, nil when missing) differs from want,
// one human-readable item per difference (e.g. "chain ingress: rule 3 is ..., want
// ..." or "set web_v4: 2 elements missing (100.64.0.2, 100.64.0.3)"); nil when they are
// equal.
func Compare(want, have *Table) []string {
	if have == nil {
		return []string{fmt.Sprintf("table inet %s is missing", TableName)}
	}
	var out []string
	add := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
	if have.Flags != want.Flags {
		add("table flags are %#x, want %#x", have.Flags, want.Flags)
	}
	for _, w := range want.Chains {
		h := have.Chain(w.Name)
		switch {
		case h == nil:
			add("chain %s is missing", w.Name)
		case (w.Base == nil) != (h.Base == nil) || w.Base != nil && *w.Base != *h.Base:
			add("chain %s has another type, hook, priority or policy", w.Name)
		}
		if h != nil && !slices.Equal(w.Rules, h.Rules) {
			add("chain %s: %s", w.Name, ruleDiff(w.Rules, h.Rules))
		}
	}
	for _, h := range have.Chains {
		if want.Chain(h.Name) == nil {
			add("unexpected chain %s (%d rules)", h.Name, len(h.Rules))
		}
	}
	for _, w := range want.Sets {
		h := have.Set(w.Name)
		switch {
		case h == nil:
			add("set %s is missing", w.Name)
			continue
		case !sameSetDefinition(*h, w):
			add("set %s has another type, flags, size, timeout or counter", w.Name)
		}
		if w.Dynamic || h.Dynamic {
			continue // elements are kernel state
		}
		if missing := minusIntervals(w.Elements, h.Elements); len(missing) > 0 {
			add("set %s: %s missing", w.Name, elementList(missing))
		}
		if extra := minusIntervals(h.Elements, w.Elements); len(extra) > 0 {
			add("set %s: %s unexpected", w.Name, elementList(extra))
		}
	}
	for _, h := range have.Sets {
		if want.Set(h.Name) == nil {
			add("unexpected set %s", h.Name)
		}
	}
	return out
}

// ruleDiff describes the first difference of two rule lists.
func ruleDiff(want, have []Rule) string {
	for i := range min(len(want), len(have)) {
		if want[i] != have[i] {
			return fmt.Sprintf("rule %d is %q, want %q", i, have[i].String(), want[i].String())
		}
	}
	if len(have) > len(want) {
		return fmt.Sprintf("unexpected rule %d %q", len(want), have[len(want)].String())
	}
	return fmt.Sprintf("rule %d %q is missing", len(have), want[len(have)].String())
}

func elementList(ivs []Interval) string {
	var parts []string
	for _, iv := range ivs[:min(len(ivs), maxListed)] {
		parts = append(parts, elementText(iv))
	}
	if len(ivs) > maxListed {
		parts = append(parts, fmt.Sprintf("and %d more", len(ivs)-maxListed))
	}
	noun := "elements"
	if len(ivs) == 1 {
		noun = "element"
	}
	return fmt.Sprintf("%d %s (%s)", len(ivs), noun, strings.Join(parts, ", "))
}
