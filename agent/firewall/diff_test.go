package firewall

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"segmesh/policy"
)

func TestFilterRoundTrip(t *testing.T) {
	for _, tc := range Cases() {
		t.Run(tc.Name, func(t *testing.T) {
			tab := mustBuild(t, tc.Iface, tc.F)
			got := tab.Filter(&tc.F)
			want := tc.F
			slices.SortFunc(want.Sets, func(a, b policy.AddressSet) int { return strings.Compare(a.Name, b.Name) })
			if !reflect.DeepEqual(normal(got), normal(want)) {
				t.Fatalf("Filter(hint) = %+v\nwant %+v", got, want)
			}
			// Without a hint, every set holds prefixes covering the same intervals and
			// building it again yields the same table (comments may be cut).
			again := mustBuild(t, tc.Iface, tab.Filter(nil))
			if d := Compare(tab, again); d != nil {
				t.Fatalf("rebuilt from Filter(nil) differs: %v", d)
			}
		})
	}
}

// normal maps empty slices to nil so that DeepEqual compares content.
func normal(f policy.Filter) policy.Filter {
	var out policy.Filter
	for _, s := range f.Sets {
		s.Prefixes = slices.Clone(s.Prefixes)
		slices.SortFunc(s.Prefixes, func(a, b netip.Prefix) int { return strings.Compare(a.String(), b.String()) })
		if len(s.Prefixes) == 0 {
			s.Prefixes = nil
		}
		out.Sets = append(out.Sets, s)
	}
	fix := func(rs []policy.FilterRule) []policy.FilterRule {
		var o []policy.FilterRule
		for _, r := range rs {
			if len(r.Matches) == 0 {
				r.Matches = nil
			}
			o = append(o, r)
		}
		return o
	}
	out.Ingress, out.Egress = fix(f.Ingress), fix(f.Egress)
	return out
}

func TestPlanUpdate(t *testing.T) {
	base := Cases()[2] // every-match-kind
	want := mustBuild(t, base.Iface, base.F)

	if p := PlanUpdate(nil, want); !p.Replace {
		t.Errorf("missing table: %+v, want Replace", p)
	}
	flags := mustBuild(t, base.Iface, base.F)
	flags.Flags = 1
	if p := PlanUpdate(flags, want); !p.Replace {
		t.Errorf("table flags: %+v, want Replace", p)
	}
	if p := PlanUpdate(mustBuild(t, base.Iface, base.F), want); !p.Empty() {
		t.Errorf("same table: %+v, want empty", p)
	}

	grown := base.F
	grown.Sets = slices.Clone(base.F.Sets)
	grown.Sets[0].Prefixes = append(slices.Clone(grown.Sets[0].Prefixes), netip.MustParsePrefix("100.64.0.77/32"))
	grown.Sets[1].Prefixes = grown.Sets[1].Prefixes[1:] // db loses 100.64.0.9
	p := PlanUpdate(want, mustBuild(t, base.Iface, grown))
	if !p.ElementsOnly() {
		t.Fatalf("membership change: %+v, want elements only", p)
	}
	if added, deleted := p.Elements(); added != 1 || deleted != 1 ||
		p.Add[0].Set != "web_v4" || p.Delete[0].Set != "db_v4" {
		t.Errorf("plan %+v, want +1 in web_v4 and -1 in db_v4", p)
	}
	diff := Compare(want, mustBuild(t, base.Iface, grown))
	if !slices.Contains(diff, "set db_v4: 1 element (100.64.0.9) missing") ||
		!slices.Contains(diff, "set web_v4: 1 element (100.64.0.77) unexpected") {
		t.Errorf("Compare = %q", diff)
	}

	// Emptying a large set recreates it (with the rules) rather than deleting
	// every element.
	var many []netip.Prefix
	for i := range 3000 {
		many = append(many, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 9, byte(i >> 8), byte(i)}), 32))
	}
	large := base.F
	large.Sets = slices.Clone(base.F.Sets)
	large.Sets[2].Prefixes = many // ext
	if p := PlanUpdate(mustBuild(t, base.Iface, large), want); !p.Chains || !slices.Equal(p.AddSets, []string{"ext_v4"}) ||
		!slices.Equal(p.DeleteSets, []string{"ext_v4"}) {
		t.Errorf("shrinking a large set: %+v, want ext_v4 recreated", p)
	}
	if p := PlanUpdate(want, mustBuild(t, base.Iface, large)); !p.ElementsOnly() {
		t.Errorf("growing a set: %+v, want elements only", p)
	}

	// A change of rules or chains recreates them; a set definition change recreates
	// that set; the other sets keep their elements.
	for name, tt := range map[string]struct {
		mutate      func(*Table)
		chains      bool
		delete, add []string
	}{
		"rule changed":  {func(t *Table) { t.Chain(ChainIngress).Rules[3].DPort.Last++ }, true, nil, nil},
		"rule removed":  {func(t *Table) { c := t.Chain(ChainEgress); c.Rules = slices.Delete(c.Rules, 2, 3) }, true, nil, nil},
		"chain policy":  {func(t *Table) { t.Chain(ChainInput).Base.Policy = VerdictDrop }, true, nil, nil},
		"foreign chain": {func(t *Table) { t.Chains = append(t.Chains, Chain{Name: "zz"}) }, true, nil, nil},
		"unknown rule": {func(t *Table) {
			c := t.Chain(ChainTransit)
			c.Rules = append(c.Rules, Rule{Unknown: "handle 9: counter"})
		}, true, nil, nil},
		"missing chain":  {func(t *Table) { t.Chains = t.Chains[1:] }, true, nil, nil},
		"interface name": {func(t *Table) { t.Chain(ChainInput).Rules[0].IIFName = "eth0" }, true, nil, nil},
		"set flags":      {func(t *Table) { t.Sets[0].Interval = false }, false, []string{"db_v4"}, []string{"db_v4"}},
		"foreign set":    {func(t *Table) { t.Sets = append(t.Sets, Set{Name: "zz", Type: TypeIPv4}) }, false, []string{"zz"}, nil},
		"missing set":    {func(t *Table) { t.Sets = t.Sets[1:] }, false, nil, []string{"db_v4"}},
	} {
		t.Run(name, func(t *testing.T) {
			have := mustBuild(t, base.Iface, base.F)
			tt.mutate(have)
			p := PlanUpdate(have, want)
			if p.Replace || p.Chains != tt.chains || !slices.Equal(p.DeleteSets, tt.delete) || !slices.Equal(p.AddSets, tt.add) ||
				len(p.Add) != 0 || len(p.Delete) != 0 {
				t.Errorf("plan %+v, want chains=%v delete sets %v add sets %v", p, tt.chains, tt.delete, tt.add)
			}
			if d := Compare(want, have); len(d) == 0 {
				t.Error("Compare reports no difference")
			}
		})
	}
}

// TestDeniedSetsAreNotDrift: the elements of the denied-flow sets are kernel state
// (the packet path writes them): a read-back holding some is no difference and no
// plan; a change of such a set's definition is, and recreates only that set.
func TestDeniedSetsAreNotDrift(t *testing.T) {
	want := mustBuild(t, "segmesh0", Cases()[1].F)
	have := mustBuild(t, "segmesh0", Cases()[1].F)
	s := have.Set("denied_in4")
	if s == nil || !s.Dynamic || s.Size != DeniedSetSize || s.Timeout != DeniedSetTimeout || !s.Counter {
		t.Fatalf("denied_in4 = %+v, want a dynamic set of %d flows with a %v timeout and counters", s, DeniedSetSize, DeniedSetTimeout)
	}
	s.Elements = []Interval{{First: netip.MustParseAddr("100.64.0.7"), Last: netip.MustParseAddr("100.64.0.7")}}
	if d := Compare(want, have); d != nil {
		t.Errorf("Compare reports denied flows as drift: %q", d)
	}
	if p := PlanUpdate(have, want); !p.Empty() {
		t.Errorf("plan %+v for denied flows, want none", p)
	}
	for name, mutate := range map[string]func(*Set){
		"size":    func(s *Set) { s.Size = 10 },
		"timeout": func(s *Set) { s.Timeout = time.Second },
		"counter": func(s *Set) { s.Counter = false },
		"dynamic": func(s *Set) { s.Dynamic = false },
	} {
		t.Run(name, func(t *testing.T) {
			have := mustBuild(t, "segmesh0", Cases()[1].F)
			mutate(have.Set("denied_out6"))
			p := PlanUpdate(have, want)
			if p.Chains || !slices.Equal(p.DeleteSets, []string{"denied_out6"}) || !slices.Equal(p.AddSets, []string{"denied_out6"}) {
				t.Errorf("plan %+v, want denied_out6 recreated alone", p)
			}
			if d := Compare(want, have); len(d) != 1 || !strings.Contains(d[0], "set denied_out6 has another") {
				t.Errorf("Compare = %q, want the set's definition named", d)
			}
		})
	}
}

func TestZeroKernelState(t *testing.T) {
	want := mustBuild(t, "segmesh0", Cases()[1].F).String()
	listing := strings.Replace(want, "counter packets 0 bytes 0 drop", "counter packets 17 bytes 1020 drop", 1)
	listing = strings.Replace(listing, "\t\ttimeout 2m\n\t}\n", "\t\ttimeout 2m\n"+
		"\t\telements = { 100.64.0.7 . 100.64.0.1 . tcp . 22 counter packets 3 bytes 180 expires 1m58s,\n"+
		"\t\t\t     100.64.0.8 . 100.64.0.1 . udp . 53 counter packets 1 bytes 60 expires 1m2s }\n\t}\n", 1)
	listing = strings.Replace(listing, "\t\ttimeout 2m\n\t}\n\n\tset denied_out4 {", "\t\ttimeout 2m\n"+
		"\t\telements = { 100.64.0.7 . 100.64.0.1 . icmp counter packets 1 bytes 84 expires 2s }\n\t}\n\n\tset denied_out4 {", 1)
	if listing == want {
		t.Fatal("test listing has no kernel state")
	}
	if got := ZeroKernelState(listing); got != want {
		t.Errorf("ZeroKernelState:\n%s\nwant\n%s", got, want)
	}
	// Policy set elements stay.
	if got := ZeroKernelState(want); got != want {
		t.Errorf("ZeroKernelState changed a listing without kernel state:\n%s", got)
	}
}

// TestNormalizeListing: a listing whose sets the kernel holds in another order
// (new sets after the denied-flow sets, as an update in place leaves them) reads
// as Table.String once normalised; chains are not reordered.
func TestNormalizeListing(t *testing.T) {
	want := mustBuild(t, "segmesh0", Cases()[1].F).String()
	blocks := strings.SplitAfter(want, "\t}\n\n")
	var sets, rest []string
	for _, b := range blocks {
		if strings.Contains(b, "\tset ") && !strings.Contains(b, "\tchain ") {
			sets = append(sets, b)
		} else {
			rest = append(rest, b)
		}
	}
	if len(sets) < 3 {
		t.Fatalf("want a table with at least 3 sets, got %d:\n%s", len(sets), want)
	}
	const head = "table inet segmesh {\n"
	first, ok := strings.CutPrefix(sets[0], head)
	if !ok {
		t.Fatalf("table text does not start with %q", head)
	}
	sets[0] = first
	// The first set moves to the end of the sets, the last to the front.
	sets[0], sets[len(sets)-1] = sets[len(sets)-1], sets[0]
	swapped := head + strings.Join(sets, "") + strings.Join(rest, "")
	if swapped == want {
		t.Fatal("the swapped listing equals the table; the test swaps nothing")
	}
	if got := NormalizeListing(swapped); got != want {
		t.Errorf("normalised listing differs from the table:\n%s\nwant:\n%s", got, want)
	}
	if got := NormalizeListing(want); got != want {
		t.Errorf("normalising the table's own text changed it:\n%s", got)
	}
}
