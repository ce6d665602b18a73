package lab

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Tests in this file need no root: they check the rulesets and the address
// bookkeeping as data.

func TestNATRuleset(t *testing.T) {
	prefix := netip.MustParsePrefix("10.1.0.0/24")
	public := netip.MustParseAddr("192.0.2.201")
	maps := []oneToOne{
		{netip.MustParseAddr("192.0.2.101"), netip.MustParseAddr("10.1.0.2")},
		{netip.MustParseAddr("192.0.2.102"), netip.MustParseAddr("10.1.0.3")},
	}
	tests := []struct {
		kind    NATKind
		maps    []oneToOne
		want    []string
		notWant []string
	}{
		{
			kind:    NATPortPreserving,
			want:    []string{`oifname "eth0" ip saddr 10.1.0.0/24 snat to 192.0.2.201` + "\n"},
			notWant: []string{"random", "dnat", "ct status dnat"},
		},
		{
			kind:    NATSymmetric,
			want:    []string{`oifname "eth0" ip saddr 10.1.0.0/24 snat to 192.0.2.201 random` + "\n"},
			notWant: []string{"dnat", "ct status dnat"},
		},
		{
			kind: NATOneToOne,
			maps: maps,
			want: []string{
				`iifname "eth0" ip daddr 192.0.2.101 dnat to 10.1.0.2`,
				`iifname "eth0" ip daddr 192.0.2.102 dnat to 10.1.0.3`,
				`oifname "eth0" ip saddr 10.1.0.2 snat to 192.0.2.101`,
				`oifname "eth0" ip saddr 10.1.0.3 snat to 192.0.2.102`,
				`iifname "eth0" ct status dnat accept`,
			},
			// No masquerading of the whole subnet: only mapped hosts get out.
			notWant: []string{"random", "10.1.0.0/24", "192.0.2.201"},
		},
	}
	for _, tt := range tests {
		t.Run(string(tt.kind), func(t *testing.T) {
			got := natRuleset(tt.kind, public, prefix, tt.maps)
			common := []string{
				"table ip " + NATTable + " {",
				"counter " + natCounter + " {",
				"type nat hook prerouting priority dstnat; policy accept;",
				"type nat hook postrouting priority srcnat; policy accept;",
				`iifname "eth0" ct state established,related accept`,
				`iifname "eth0" icmp type echo-request accept`,
			}
			for _, w := range append(common, tt.want...) {
				if !strings.Contains(got, w) {
					t.Errorf("ruleset lacks %q:\n%s", w, got)
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(got, w) {
					t.Errorf("ruleset holds %q:\n%s", w, got)
				}
			}
			// Both filter chains end with the counted drop of everything else inbound.
			if n := strings.Count(got, `iifname "eth0" counter name "`+natCounter+`" drop`); n != 2 {
				t.Errorf("ruleset has %d counted drops, want 2 (forward, input):\n%s", n, got)
			}
		})
	}
}

func TestParseNFTCounter(t *testing.T) {
	tests := []struct {
		out     string
		want    uint64
		wantErr bool
	}{
		{out: `{"nftables": [{"metainfo": {"version": "1.1.3"}}, {"counter": {"family": "ip", "name": "inbound_dropped", "table": "smlab_nat", "handle": 1, "packets": 7, "bytes": 420}}]}`, want: 7},
		{out: `{"nftables": [{"metainfo": {}}]}`, wantErr: true},
		{out: `Error: oops`, wantErr: true},
	}
	for _, tt := range tests {
		got, err := parseNFTCounter(tt.out)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("parseNFTCounter(%q) = %d, %v; want %d, error %v", tt.out, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestLastAddr(t *testing.T) {
	for p, want := range map[string]string{"10.1.0.0/24": "10.1.0.255", "192.0.2.0/24": "192.0.2.255", "10.0.0.0/8": "10.255.255.255", "10.9.8.4/30": "10.9.8.7"} {
		if got := lastAddr(netip.MustParsePrefix(p)); got.String() != want {
			t.Errorf("lastAddr(%s) = %s, want %s", p, got, want)
		}
	}
}

// TestNATAddressing checks defaults, validation and allocation of NAT and host
// addresses on a Lab that creates nothing in the kernel.
func TestNATAddressing(t *testing.T) {
	l := &Lab{ID: "test"}
	mustNAT := func(spec NATSpec) *NAT {
		t.Helper()
		n, err := l.newNATLocked(spec)
		if err != nil {
			t.Fatalf("newNATLocked(%+v): %v", spec, err)
		}
		l.nats = append(l.nats, n)
		return n
	}
	pub := &Host{Name: "pub", Index: 1, lab: l}
	if err := l.placeLocked(pub, nil, netip.MustParseAddr("192.0.2.201")); err != nil {
		t.Fatal(err)
	}
	l.hosts = append(l.hosts, pub)

	a := mustNAT(NATSpec{Name: "a", Kind: NATPortPreserving})
	if a.Prefix.String() != "10.1.0.0/24" || a.Gateway.String() != "10.1.0.1" || a.Namespace != "smlab-test-nat-a" {
		t.Errorf("NAT a: prefix %s gateway %s namespace %s; want 10.1.0.0/24, 10.1.0.1, smlab-test-nat-a", a.Prefix, a.Gateway, a.Namespace)
	}
	if a.PublicAddr.String() != "192.0.2.202" {
		t.Errorf("NAT a's public address %s, want 192.0.2.202 (.201 is host pub's)", a.PublicAddr)
	}
	// A second NAT may reuse the first one's private prefix.
	b := mustNAT(NATSpec{Name: "b", Kind: NATOneToOne, Prefix: a.Prefix})
	if b.PublicAddr.String() != "192.0.2.203" || b.Prefix != a.Prefix {
		t.Errorf("NAT b: public %s prefix %s; want 192.0.2.203, %s", b.PublicAddr, b.Prefix, a.Prefix)
	}

	bad := []NATSpec{
		{Name: "a", Kind: NATSymmetric}, // duplicate name
		{Name: "c", Kind: NATSymmetric, Prefix: netip.MustParsePrefix("192.0.2.0/25")},   // overlaps the underlay
		{Name: "c", Kind: NATSymmetric, Prefix: netip.MustParsePrefix("10.5.0.1/24")},    // host bits
		{Name: "c", Kind: NATSymmetric, Prefix: netip.MustParsePrefix("10.5.0.0/31")},    // too small
		{Name: "c", Kind: NATSymmetric, Prefix: netip.MustParsePrefix("fd00::/64")},      // IPv6
		{Name: "c", Kind: NATSymmetric, PublicAddr: netip.MustParseAddr("192.0.2.202")},  // NAT a's
		{Name: "c", Kind: NATSymmetric, PublicAddr: netip.MustParseAddr("198.51.100.1")}, // off the underlay
	}
	for _, spec := range bad {
		if _, err := l.newNATLocked(spec); err == nil {
			t.Errorf("newNATLocked(%+v) succeeded", spec)
		}
	}
	for _, spec := range []NATSpec{{Name: "Bad_Name", Kind: NATSymmetric}, {Name: "ok", Kind: "full-cone"}} {
		if _, err := l.AddNAT(context.Background(), spec); err == nil {
			t.Errorf("AddNAT(%+v) succeeded", spec)
		}
	}

	// Hosts behind a get .2, .3; behind b (same prefix, another network) .2 again,
	// each with its own 1:1 public address.
	place := func(name string, n *NAT, addr string) (*Host, error) {
		h := &Host{Name: name, Index: len(l.hosts) + 1, lab: l}
		var a netip.Addr
		if addr != "" {
			a = netip.MustParseAddr(addr)
		}
		if err := l.placeLocked(h, n, a); err != nil {
			return nil, err
		}
		l.hosts = append(l.hosts, h)
		return h, nil
	}
	want := []struct {
		name   string
		nat    *NAT
		addr   string
		public string
	}{
		{"a1", a, "10.1.0.2", "192.0.2.202"},
		{"a2", a, "10.1.0.3", "192.0.2.202"},
		{"b1", b, "10.1.0.2", "192.0.2.101"},
		{"b2", b, "10.1.0.3", "192.0.2.102"},
	}
	hosts := map[string]*Host{}
	for _, w := range want {
		h, err := place(w.name, w.nat, "")
		if err != nil {
			t.Fatal(err)
		}
		hosts[w.name] = h
		u := h.underlayLocked()
		if u.Addr.String() != w.addr || u.Public.String() != w.public || u.Gateway != w.nat.Gateway || u.Prefix.Bits() != 24 {
			t.Errorf("%s: underlay %+v; want addr %s public %s gateway %s", w.name, u, w.addr, w.public, w.nat.Gateway)
		}
	}
	if u := pub.underlayLocked(); u.Public != u.Addr || u.Gateway.IsValid() || u.NAT != nil {
		t.Errorf("public host's underlay %+v: want Public == Addr, no gateway, no NAT", u)
	}
	for _, tc := range []struct {
		n    *NAT
		addr string
	}{{a, "10.1.0.2"}, {a, "10.1.0.1"}, {a, "10.1.0.255"}, {a, "10.2.0.5"}, {nil, "192.0.2.202"}, {nil, "192.0.2.101"}, {nil, "198.51.100.1"}} {
		if _, err := place("x", tc.n, tc.addr); err == nil {
			t.Errorf("placing a host at %s in %s succeeded", tc.addr, natName(tc.n))
		}
	}
	// Renumbering within a 1:1 NAT keeps the public address; leaving it frees it.
	b1 := hosts["b1"]
	if err := l.placeLocked(b1, b, netip.MustParseAddr("10.1.0.50")); err != nil {
		t.Fatal(err)
	}
	if u := b1.underlayLocked(); u.Public.String() != "192.0.2.101" || u.Addr.String() != "10.1.0.50" {
		t.Errorf("b1 after renumbering: %+v; want 10.1.0.50 with public 192.0.2.101 kept", u)
	}
	if err := l.placeLocked(b1, a, netip.Addr{}); err != nil {
		t.Fatal(err)
	}
	if u := b1.underlayLocked(); u.Public != a.PublicAddr || b1.public.IsValid() {
		t.Errorf("b1 behind a: %+v (1:1 address %s); want a's public address and no 1:1 address", u, b1.public)
	}
	if h, err := place("b3", b, ""); err != nil || h.public.String() != "192.0.2.101" {
		t.Errorf("b3 = %v, %v; want the freed 1:1 address 192.0.2.101", h, err)
	}
}

// TestNewMeshUnknownNAT checks that a node behind an undefined NAT fails before
// anything is created (no root needed: NewMesh validates first).
func TestNewMeshUnknownNAT(t *testing.T) {
	bin := t.TempDir()
	for _, b := range []string{ControllerBin, AgentBin, CLIBin, ProbeBin} {
		if err := os.WriteFile(filepath.Join(bin, b), nil, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	_, err := NewMesh(context.Background(), MeshOptions{
		BinDir: bin,
		NATs:   []NATSpec{{Name: "home", Kind: NATPortPreserving}},
		Nodes:  []NodeSpec{{Name: "a", NAT: "home"}, {Name: "b", NAT: "nosuch"}},
	})
	if err == nil || !strings.Contains(err.Error(), `"nosuch"`) {
		t.Errorf("NewMesh with an undefined NAT = %v; want an error naming it", err)
	}
}

func TestExampleNATs(t *testing.T) {
	nats, nodes := ExampleNATs()
	kinds := map[string]NATKind{}
	for _, n := range nats {
		kinds[n.Name] = n.Kind
	}
	behind := map[NATKind]int{}
	public := 0
	for _, n := range nodes {
		if n.NAT == "" {
			public++
			continue
		}
		k, ok := kinds[n.NAT]
		if !ok {
			t.Errorf("node %s behind undefined NAT %s", n.Name, n.NAT)
		}
		behind[k]++
	}
	if behind[NATPortPreserving] != 2 || behind[NATSymmetric] != 1 || behind[NATOneToOne] != 1 || public != 1 {
		t.Errorf("ExampleNATs: %v behind NATs, %d public; want 2 port-preserving, 1 symmetric, 1 1:1, 1 public", behind, public)
	}
	if ExampleNodes()[0].NAT != "" {
		t.Error("ExampleNATs changed ExampleNodes")
	}
}
