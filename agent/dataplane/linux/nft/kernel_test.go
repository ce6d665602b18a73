package nft

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"segmesh/agent/dataplane/linux/internal/nstest"
	"segmesh/agent/firewall"
	"segmesh/policy"
)

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func tcp(ports ...uint16) policy.PortMatch {
	m := policy.PortMatch{Protocol: policy.ProtoTCP}
	for i := 0; i+1 < len(ports); i += 2 {
		m.Ports = append(m.Ports, policy.PortRange{First: ports[i], Last: ports[i+1]})
	}
	return m
}

// sampleFilter is a filter exercising every match kind.
func sampleFilter() policy.Filter {
	return policy.Filter{
		Sets: []policy.AddressSet{
			{Name: "web", Prefixes: prefixes("100.64.0.2/32", "100.64.0.3/32", "fd5e:6d65:7368::2/128")},
			{Name: "db", Prefixes: prefixes("100.64.0.9/32", "fd5e:6d65:7368::9/128")},
			{Name: "ext", Prefixes: prefixes("10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24", "192.0.3.0/24", "2001:db8::/32")},
		},
		Ingress: []policy.FilterRule{
			{Set: "web", Origin: "web-to-db (policy.yaml:12:5)", Matches: []policy.PortMatch{tcp(5432, 5432, 8000, 8100), {Protocol: policy.ProtoICMP}}},
			{Set: "ext", Origin: "ext-any", Matches: []policy.PortMatch{{Protocol: policy.ProtoAny}}},
			{Set: "db", Origin: "dns", Matches: []policy.PortMatch{{Protocol: policy.ProtoUDP, Ports: []policy.PortRange{{First: 53, Last: 53}}}, {Protocol: policy.ProtoUDP}}},
		},
		Egress: []policy.FilterRule{
			{Set: "db", Origin: "to-db", Matches: []policy.PortMatch{tcp(5432, 5432)}},
			{Set: "web", Origin: "placeholder without matches"},
		},
	}
}

func newFirewall(t *testing.T) (*Firewall, nstest.NS) {
	t.Helper()
	ns := nstest.New(t)
	fw, err := New("smdp0", int(ns.Handle), slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw.Close() })
	return fw, ns
}

func build(t *testing.T, f policy.Filter) *firewall.Table {
	t.Helper()
	tab, err := firewall.Build("smdp0", f)
	if err != nil {
		t.Fatal(err)
	}
	return tab
}

func mustApply(t *testing.T, fw *Firewall, f policy.Filter, want Result) {
	t.Helper()
	out, err := fw.Apply(build(t, f))
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if got := out.Result; got != want {
		t.Fatalf("Apply = %v, want %v", got, want)
	}
}

// checkRead asserts that the table decoded from the kernel equals the model built
// from want, both through fw's cache and through a fresh snapshot.
func checkRead(t *testing.T, fw *Firewall, want policy.Filter) {
	t.Helper()
	got, err := fw.Read()
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	if d := firewall.Compare(build(t, want), got); d != nil {
		t.Fatalf("Read differs from the applied table: %q", d)
	}
	fw.mu.Lock()
	fresh, err := fw.snapshot(nil, change{structure: true})
	fw.mu.Unlock()
	if err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	if d := cmp.Diff(build(t, want), fresh, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
		t.Fatalf("kernel table differs from the model (-want +got):\n%s", d)
	}
}

func TestApplyReadRoundTrip(t *testing.T) {
	long := strings.Repeat("a very long origin é ", 20)
	tests := []struct {
		name string
		f    policy.Filter
	}{
		{"empty (default deny)", policy.Filter{}},
		{"sample", sampleFilter()},
		{"long origin", policy.Filter{Sets: []policy.AddressSet{{Name: "s", Prefixes: prefixes("100.64.0.1/32")}},
			Ingress: []policy.FilterRule{{Set: "s", Origin: long, Matches: []policy.PortMatch{tcp(1, 65535)}}}}},
		{"whole address space", policy.Filter{Sets: []policy.AddressSet{{Name: "all", Prefixes: prefixes("0.0.0.0/0", "::/0")}},
			Egress: []policy.FilterRule{{Set: "all", Matches: []policy.PortMatch{{Protocol: policy.ProtoAny}}}}}},
		{"top addresses", policy.Filter{Sets: []policy.AddressSet{{Name: "top", Prefixes: prefixes("255.255.255.255/32", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "0.0.0.0/32")}}}},
		{"unmasked prefix", policy.Filter{Sets: []policy.AddressSet{{Name: "u", Prefixes: prefixes("10.1.2.3/24")}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fw, ns := newFirewall(t)
			mustApply(t, fw, tt.f, Replaced)
			checkRead(t, fw, tt.f)
			mustApply(t, fw, tt.f, Unchanged)
			// nft(8) must be able to list what we wrote, including our userdata.
			out := ns.MustExec(t, "nft", "list", "table", "inet", TableName)
			for _, r := range slices.Concat(tt.f.Ingress, tt.f.Egress) {
				if r.Origin != "" && len(r.Matches) > 0 && !strings.Contains(out, fmt.Sprintf("comment %q", firewall.Comment(r.Origin))) {
					t.Errorf("nft list lacks comment %q:\n%s", firewall.Comment(r.Origin), out)
				}
			}
			// A fresh Firewall (a new process) reads the same filter, except for
			// prefix lists that are not minimal (it reports the covering prefixes).
			fw2, err := New("smdp0", int(ns.Handle), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer fw2.Close()
			got, err := fw2.Read()
			if err != nil {
				t.Fatal(err)
			}
			if d := firewall.Compare(build(t, tt.f), got); d != nil {
				t.Errorf("fresh Read differs: %q", d)
			}
			mustApply(t, fw2, tt.f, Unchanged)
		})
	}
}

func TestMembershipChangeTouchesOnlyElements(t *testing.T) {
	fw, ns := newFirewall(t)
	f := sampleFilter()
	mustApply(t, fw, f, Replaced)
	handles := func() map[string][]uint64 {
		out := map[string][]uint64{}
		for _, c := range []string{firewall.ChainInput, firewall.ChainOutput, firewall.ChainForward, firewall.ChainIngress, firewall.ChainEgress, firewall.ChainTransit} {
			h, err := fw.RuleHandles(c)
			if err != nil {
				t.Fatal(err)
			}
			out[c] = h
		}
		return out
	}
	before, tableBefore := handles(), tableHandle(t, ns)

	g := sampleFilter()
	g.Sets[0].Prefixes = prefixes("100.64.0.3/32", "100.64.0.4/32", "fd5e:6d65:7368::4/128") // one out, one in
	g.Sets[2].Prefixes = prefixes("10.0.0.0/9", "192.0.2.0/24")                              // same start, new end
	mustApply(t, fw, g, ElementsUpdated)
	checkRead(t, fw, g)
	if d := cmp.Diff(before, handles()); d != "" {
		t.Fatalf("rule handles changed on a membership-only change:\n%s", d)
	}
	if got := tableHandle(t, ns); got != tableBefore {
		t.Fatalf("table handle changed from %s to %s on a membership-only change", tableBefore, got)
	}

	// A rule change recreates the rules but keeps the table and its sets.
	h := g
	h.Ingress = slices.Clone(g.Ingress)
	h.Ingress[0].Matches = []policy.PortMatch{tcp(5433, 5433)}
	mustApply(t, fw, h, Updated)
	checkRead(t, fw, h)
	if got := tableHandle(t, ns); got != tableBefore {
		t.Fatalf("table handle changed from %s to %s on a rule change", tableBefore, got)
	}
	if after := handles(); slices.Equal(after[firewall.ChainIngress], before[firewall.ChainIngress]) {
		t.Fatal("rule handles unchanged after a rule change")
	}
	// A new set is created next to the others.
	k := h
	k.Sets = append(slices.Clone(h.Sets), policy.AddressSet{Name: "new", Prefixes: prefixes("100.64.7.7/32")})
	mustApply(t, fw, k, Updated)
	checkRead(t, fw, k)
	mustApply(t, fw, h, Updated)
	checkRead(t, fw, h)
}

// tableHandle returns the kernel handle of the table, which the kernel allocates
// anew (increasing per namespace) whenever the table is re-created.
func tableHandle(t *testing.T, ns nstest.NS) string {
	t.Helper()
	out := ns.MustExec(t, "nft", "-a", "list", "table", "inet", TableName)
	first, _, _ := strings.Cut(out, "\n")
	_, h, ok := strings.Cut(first, "# handle ")
	if !ok {
		t.Fatalf("no table handle in %q", first)
	}
	return h
}

func TestDriftIsReadAndRepaired(t *testing.T) {
	tests := []struct {
		name string
		cmd  func(h map[string][]uint64) [][]string
	}{
		{"policy rule deleted", func(h map[string][]uint64) [][]string {
			return [][]string{{"nft", "delete", "rule", "inet", TableName, firewall.ChainIngress, "handle", fmt.Sprint(h[firewall.ChainIngress][3])}}
		}},
		{"jump rule deleted", func(h map[string][]uint64) [][]string {
			return [][]string{{"nft", "delete", "rule", "inet", TableName, firewall.ChainInput, "handle", fmt.Sprint(h[firewall.ChainInput][0])}}
		}},
		{"rule added", func(map[string][]uint64) [][]string {
			return [][]string{{"nft", "insert", "rule", "inet", TableName, firewall.ChainIngress, "tcp", "dport", "22", "accept"}}
		}},
		{"table flushed", func(map[string][]uint64) [][]string {
			return [][]string{{"nft", "flush", "table", "inet", TableName}}
		}},
		{"table deleted", func(map[string][]uint64) [][]string {
			return [][]string{{"nft", "delete", "table", "inet", TableName}}
		}},
		{"element added", func(map[string][]uint64) [][]string {
			return [][]string{{"nft", "add", "element", "inet", TableName, "web_v4", "{ 100.64.9.9 }"}}
		}},
		{"element deleted", func(map[string][]uint64) [][]string {
			return [][]string{{"nft", "delete", "element", "inet", TableName, "db_v6", "{ fd5e:6d65:7368::9 }"}}
		}},
		{"chain policy changed", func(map[string][]uint64) [][]string {
			return [][]string{{"nft", "add", "chain", "inet", TableName, firewall.ChainInput, "{ type filter hook input priority filter; policy drop; }"}}
		}},
		{"chain added", func(map[string][]uint64) [][]string {
			return [][]string{{"nft", "add", "chain", "inet", TableName, "extra"}}
		}},
		{"set added", func(map[string][]uint64) [][]string {
			return [][]string{{"nft", "add", "set", "inet", TableName, "extra", "{ type ipv4_addr; }"}}
		}},
		{"table dormant", func(map[string][]uint64) [][]string {
			return [][]string{{"nft", "add", "table", "inet", TableName, "{ flags dormant; }"}}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fw, ns := newFirewall(t)
			f := sampleFilter()
			mustApply(t, fw, f, Replaced)
			h := map[string][]uint64{}
			for _, c := range []string{firewall.ChainInput, firewall.ChainIngress} {
				hs, err := fw.RuleHandles(c)
				if err != nil {
					t.Fatal(err)
				}
				h[c] = hs
			}
			for _, c := range tt.cmd(h) {
				ns.MustExec(t, c...)
			}
			got, err := fw.Read()
			if err != nil {
				t.Fatal(err)
			}
			if d := firewall.Compare(build(t, f), got); d == nil {
				t.Fatalf("Read after drift equals the applied table:\n%s", ns.MustExec(t, "nft", "list", "ruleset"))
			}
			res, err := fw.Apply(build(t, f))
			if err != nil || res.Result == Unchanged || !res.Drifted {
				t.Fatalf("repairing Apply = %+v, %v; want a change of a drifted table", res, err)
			}
			checkRead(t, fw, f)
		})
	}
}

// TestReadSkippedWhileGenerationUnchanged: reads and re-applies use the table read
// (or written) last as long as the kernel's ruleset generation stays the same, and
// see any change made behind the Firewall's back.
func TestReadSkippedWhileGenerationUnchanged(t *testing.T) {
	fw, ns := newFirewall(t)
	f := sampleFilter()
	mustApply(t, fw, f, Replaced)
	count := func() int {
		fw.mu.Lock()
		defer fw.mu.Unlock()
		return fw.snapshots
	}
	before := count()
	for range 3 {
		if got, err := fw.Read(); err != nil || firewall.Compare(build(t, f), got) != nil {
			t.Fatalf("Read = %v, %v", got, err)
		}
		mustApply(t, fw, f, Unchanged)
	}
	if n := count() - before; n != 0 {
		t.Fatalf("%d snapshots while nothing changed, want 0", n)
	}
	ns.MustExec(t, "nft", "add", "element", "inet", TableName, "web_v4", "{ 100.64.9.9 }")
	got, err := fw.Read()
	if err != nil {
		t.Fatal(err)
	}
	if d := firewall.Compare(build(t, f), got); len(d) != 1 || !strings.Contains(d[0], "100.64.9.9") {
		t.Fatalf("Read after an element was added: %q", d)
	}
	ns.MustExec(t, "nft", "add", "table", "inet", "unrelated") // moves the generation, not our table
	mustApply(t, fw, f, ElementsUpdated)
	checkRead(t, fw, f)
	// One read-back, of set web_v4 only: the other table, and this process's own
	// repair, are known from the notifications.
	if n := count() - before; n != 2 { // checkRead's fresh snapshot is the second
		t.Fatalf("%d snapshots, want 2", n)
	}
	ns.MustExec(t, "nft", "add", "rule", "inet", TableName, firewall.ChainEgress, "accept")
	if got, err := fw.Read(); err != nil || len(firewall.Compare(build(t, f), got)) != 1 {
		t.Fatalf("Read after a rule was added: %v", err)
	}
}

func TestOtherTablesUntouched(t *testing.T) {
	fw, ns := newFirewall(t)
	ns.MustExec(t, "nft", "add", "table", "inet", "other")
	ns.MustExec(t, "nft", "add", "chain", "inet", "other", "input", "{ type filter hook input priority 10; policy accept; }")
	ns.MustExec(t, "nft", "add", "rule", "inet", "other", "input", "tcp", "dport", "22", "accept")
	ns.MustExec(t, "nft", "add", "table", "ip", TableName) // same name, other family
	before := ns.MustExec(t, "nft", "list", "table", "inet", "other")

	mustApply(t, fw, sampleFilter(), Replaced)
	mustApply(t, fw, policy.Filter{}, Updated)
	if err := fw.Delete(); err != nil {
		t.Fatal(err)
	}
	if err := fw.Delete(); err != nil {
		t.Fatalf("second Delete: %v", err)
	}
	if after := ns.MustExec(t, "nft", "list", "table", "inet", "other"); after != before {
		t.Errorf("table inet other changed:\n%s\nwant\n%s", after, before)
	}
	ns.MustExec(t, "nft", "list", "table", "ip", TableName)
	if out, err := ns.Exec("nft", "list", "table", "inet", TableName); err == nil {
		t.Errorf("table inet %s still exists after Delete:\n%s", TableName, out)
	}
}

func TestWatchFiresOnChanges(t *testing.T) {
	fw, ns := newFirewall(t)
	mustApply(t, fw, sampleFilter(), Replaced)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fired := make(chan struct{}, 100)
	if err := fw.Watch(ctx, func() { fired <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	ns.MustExec(t, "nft", "add", "table", "inet", "unrelated") // not ours: no event expected
	for _, c := range [][]string{
		{"nft", "add", "element", "inet", TableName, "web_v4", "{ 100.64.9.9 }"},
		{"nft", "flush", "chain", "inet", TableName, firewall.ChainEgress},
		{"nft", "delete", "table", "inet", TableName},
	} {
		ns.MustExec(t, c...)
		select {
		case <-fired:
		case <-time.After(5 * time.Second):
			t.Fatalf("no notification after %v", c)
		}
		for len(fired) > 0 {
			<-fired
		}
	}
}
