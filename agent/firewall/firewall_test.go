package firewall

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"segmesh/policy"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func ports(proto policy.Protocol, rs ...uint16) policy.PortMatch {
	m := policy.PortMatch{Protocol: proto}
	for i := 0; i+1 < len(rs); i += 2 {
		m.Ports = append(m.Ports, policy.PortRange{First: rs[i], Last: rs[i+1]})
	}
	return m
}

// Case is one filter used by the golden tests here and the kernel tests of
// agent/dataplane/linux/nft and of this package.
type Case struct {
	Name  string
	Iface string
	F     policy.Filter
}

// Cases returns the filters the tests render; every rule shape the agent programs
// appears at least once.
func Cases() []Case {
	var many []string
	for i := 1; i <= 40; i++ {
		many = append(many, fmt.Sprintf("100.64.1.%d/32", i), fmt.Sprintf("fd5e:6d65:7368::1:%x/128", i))
	}
	return []Case{
		{Name: "default-deny", Iface: "segmesh0"},
		{Name: "web-db", Iface: "segmesh0", F: policy.Filter{
			Sets: []policy.AddressSet{{Name: "web", Prefixes: prefixes("100.64.0.2/32", "100.64.0.3/32", "fd5e:6d65:7368::2/128", "fd5e:6d65:7368::3/128")}},
			Ingress: []policy.FilterRule{{Set: "web", Origin: "web-to-db (policy.yaml:12:5)",
				Matches: []policy.PortMatch{ports(policy.ProtoTCP, 5432, 5432)}}},
		}},
		{Name: "every-match-kind", Iface: "wg-test", F: policy.Filter{
			Sets: []policy.AddressSet{
				{Name: "web", Prefixes: prefixes("100.64.0.2/32", "100.64.0.3/32", "fd5e:6d65:7368::2/128")},
				{Name: "db", Prefixes: prefixes("100.64.0.9/32", "fd5e:6d65:7368::9/128")},
				{Name: "ext", Prefixes: prefixes("10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24", "192.0.3.0/24", "2001:db8::/32")},
				{Name: "nobody"},
			},
			Ingress: []policy.FilterRule{
				{Set: "web", Origin: "web-to-db (policy.yaml:12:5)", Matches: []policy.PortMatch{ports(policy.ProtoTCP, 5432, 5432, 8000, 8100), {Protocol: policy.ProtoICMP}}},
				{Set: "ext", Origin: "ext-any (policy.yaml:20:5)", Matches: []policy.PortMatch{{Protocol: policy.ProtoAny}}},
				{Set: "db", Origin: "dns (policy.yaml:30:5)", Matches: []policy.PortMatch{ports(policy.ProtoUDP, 53, 53), {Protocol: policy.ProtoUDP}, ports(policy.ProtoTCP, 1, 65535)}},
			},
			Egress: []policy.FilterRule{
				{Set: "db", Origin: "to-db", Matches: []policy.PortMatch{ports(policy.ProtoTCP, 5432, 5432)}},
				{Set: "nobody", Origin: "placeholder without matches"},
				{Set: "web", Matches: []policy.PortMatch{{Protocol: policy.ProtoICMP}}},
			},
		}},
		{Name: "prefix-edges", Iface: "segmesh0", F: policy.Filter{
			Sets: []policy.AddressSet{
				{Name: "world", Prefixes: prefixes("0.0.0.0/0", "::/0", "10.0.0.0/8")},
				{Name: "top", Prefixes: prefixes("255.255.255.255/32", "0.0.0.0/32", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "::/128")},
				{Name: "unmasked", Prefixes: prefixes("10.1.2.3/24", "2001:db8::1/64")},
			},
			Egress: []policy.FilterRule{
				{Set: "world", Origin: "internet", Matches: []policy.PortMatch{ports(policy.ProtoTCP, 443, 443)}},
				{Set: "top", Origin: "top", Matches: []policy.PortMatch{{Protocol: policy.ProtoAny}}},
				{Set: "unmasked", Origin: "unmasked", Matches: []policy.PortMatch{ports(policy.ProtoUDP, 65535, 65535)}},
			},
		}},
		{Name: "long-origin-many-elements", Iface: "segmesh0", F: policy.Filter{
			Sets: []policy.AddressSet{{Name: "fleet", Prefixes: prefixes(many...)}},
			Ingress: []policy.FilterRule{{Set: "fleet", Origin: strings.Repeat("a very long origin é ", 20),
				Matches: []policy.PortMatch{ports(policy.ProtoTCP, 22, 22)}}},
		}},
	}
}

func mustBuild(t testing.TB, iface string, f policy.Filter) *Table {
	t.Helper()
	tab, err := Build(iface, f)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return tab
}

func TestStringGolden(t *testing.T) {
	for _, tc := range Cases() {
		t.Run(tc.Name, func(t *testing.T) {
			got := mustBuild(t, tc.Iface, tc.F).String()
			path := filepath.Join("testdata", tc.Name+".nft")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("String differs from %s (run go test -update after checking):\n--- got\n%s\n--- want\n%s", path, got, want)
			}
		})
	}
}

func TestComment(t *testing.T) {
	tests := []struct{ in, want string }{
		{"web-to-db (p.yaml:1:2)", "web-to-db (p.yaml:1:2)"},
		{"a\x00b", "ab"},
		{"bad \xff utf8", "bad ? utf8"},
		{strings.Repeat("x", 128), strings.Repeat("x", 128)},
		{strings.Repeat("x", 129), strings.Repeat("x", 125) + "…"},
		{strings.Repeat("x", 124) + "éé", strings.Repeat("x", 124) + "éé"},
		{strings.Repeat("x", 124) + "ééé", strings.Repeat("x", 124) + "…"}, // a cut inside é moves back
	}
	for _, tt := range tests {
		if got := Comment(tt.in); got != tt.want {
			t.Errorf("Comment(%q) = %q, want %q", tt.in, got, tt.want)
		}
		if len(Comment(tt.in)) > MaxComment {
			t.Errorf("Comment(%q) longer than %d bytes", tt.in, MaxComment)
		}
	}
}

func TestQuoteDoubleQuote(t *testing.T) {
	got := mustBuild(t, "segmesh0", policy.Filter{
		Sets:    []policy.AddressSet{{Name: "s", Prefixes: prefixes("100.64.0.2/32")}},
		Ingress: []policy.FilterRule{{Set: "s", Origin: `r ("odd".yaml:1:1)`, Matches: []policy.PortMatch{{Protocol: policy.ProtoAny}}}},
	}).String()
	if !strings.Contains(got, `comment "r ('odd'.yaml:1:1)"`) {
		t.Errorf("double quotes not replaced:\n%s", got)
	}
}

func TestBuildRejects(t *testing.T) {
	any := []policy.PortMatch{{Protocol: policy.ProtoAny}}
	s := []policy.AddressSet{{Name: "s"}}
	tests := []struct {
		name, iface string
		f           policy.Filter
		want        string
	}{
		{"empty interface", "", policy.Filter{}, "interface name"},
		{"long interface", "sixteen-bytes-xx", policy.Filter{}, "interface name"},
		{"undefined set", "x0", policy.Filter{Ingress: []policy.FilterRule{{Set: "nope", Matches: any}}}, `set "nope" is not defined`},
		{"set twice", "x0", policy.Filter{Sets: []policy.AddressSet{{Name: "s"}, {Name: "s"}}}, "defined twice"},
		{"empty set name", "x0", policy.Filter{Sets: []policy.AddressSet{{}}}, "set name"},
		{"NUL in set name", "x0", policy.Filter{Sets: []policy.AddressSet{{Name: "a\x00b"}}}, "set name"},
		{"invalid prefix", "x0", policy.Filter{Sets: []policy.AddressSet{{Name: "s", Prefixes: []netip.Prefix{{}}}}}, "invalid prefix"},
		{"ports on icmp", "x0", policy.Filter{Sets: s, Egress: []policy.FilterRule{{Set: "s", Matches: []policy.PortMatch{ports(policy.ProtoICMP, 1, 2)}}}}, "takes no ports"},
		{"empty range", "x0", policy.Filter{Sets: s, Egress: []policy.FilterRule{{Set: "s", Matches: []policy.PortMatch{ports(policy.ProtoTCP, 9, 2)}}}}, "is empty"},
		{"unknown protocol", "x0", policy.Filter{Sets: s, Egress: []policy.FilterRule{{Set: "s", Matches: []policy.PortMatch{{Protocol: "sctp"}}}}}, "unknown protocol"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Build(tt.iface, tt.f)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Build = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}
