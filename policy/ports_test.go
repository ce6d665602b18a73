package policy

import (
	"reflect"
	"regexp"
	"strconv"
	"testing"
)

func TestParsePort(t *testing.T) {
	tests := []struct {
		in   string
		want PortMatch
	}{
		{"any", PortMatch{Protocol: ProtoAny}},
		{"icmp", PortMatch{Protocol: ProtoICMP}},
		{"tcp", PortMatch{Protocol: ProtoTCP}},
		{"udp", PortMatch{Protocol: ProtoUDP}},
		{"tcp/8080", PortMatch{Protocol: ProtoTCP, Ports: []PortRange{{8080, 8080}}}},
		{"udp/53", PortMatch{Protocol: ProtoUDP, Ports: []PortRange{{53, 53}}}},
		{"tcp/8000-8100", PortMatch{Protocol: ProtoTCP, Ports: []PortRange{{8000, 8100}}}},
		{"tcp/1-65535", PortMatch{Protocol: ProtoTCP, Ports: []PortRange{{1, 65535}}}},
		{"tcp/7-7", PortMatch{Protocol: ProtoTCP, Ports: []PortRange{{7, 7}}}},
		{"tcp/022", PortMatch{Protocol: ProtoTCP, Ports: []PortRange{{22, 22}}}},
	}
	for _, tt := range tests {
		got, err := parsePort(tt.in)
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("parsePort(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
	}
	bad := map[string]string{
		"":                            `unknown protocol "" in ""; want tcp, udp, icmp or any`,
		"443":                         `port "443" has no protocol; did you mean tcp/443 or udp/443?`,
		"tcp/0":                       `port 0 is out of range 1-65535 in "tcp/0"`,
		"tcp/000":                     `port 0 is out of range 1-65535 in "tcp/000"`,
		"tcp/1-99999":                 `port 99999 is out of range 1-65535 in "tcp/1-99999"`,
		"tcp/+1":                      `invalid port "+1": want a number 1-65535 or a range FIRST-LAST in "tcp/+1"`,
		"tcp/1-2-3":                   `invalid port "2-3": want a number 1-65535 or a range FIRST-LAST in "tcp/1-2-3"`,
		"tcp/ 80":                     `invalid port " 80": want a number 1-65535 or a range FIRST-LAST in "tcp/ 80"`,
		"tcp/80,443":                  `invalid port "80,443": want a number 1-65535 or a range FIRST-LAST in "tcp/80,443"`,
		"udp/100-10":                  `port range 100-10 has first > last (did you mean 10-100?) in "udp/100-10"`,
		"icmp/echo":                   `protocol icmp takes no ports; write "icmp"`,
		"Any":                         `unknown protocol "Any" in "Any"; want tcp, udp, icmp or any (did you mean "any"?)`,
		"-1":                          `unknown protocol "-1" in "-1"; want tcp, udp, icmp or any`,
		"1-":                          `unknown protocol "1-" in "1-"; want tcp, udp, icmp or any`,
		"tcp/99999999999999999999999": `port 99999999999999999999999 is out of range 1-65535 in "tcp/99999999999999999999999"`,
	}
	for in, want := range bad {
		if got, err := parsePort(in); err == nil || err.Error() != want {
			t.Errorf("parsePort(%q) = %+v, %v; want error %q", in, got, err, want)
		}
	}
}

func TestMergeMatches(t *testing.T) {
	tcp := func(rs ...PortRange) PortMatch { return PortMatch{Protocol: ProtoTCP, Ports: rs} }
	udp := func(rs ...PortRange) PortMatch { return PortMatch{Protocol: ProtoUDP, Ports: rs} }
	icmp := PortMatch{Protocol: ProtoICMP}
	anyM := PortMatch{Protocol: ProtoAny}
	tests := []struct {
		name string
		in   []PortMatch
		want []PortMatch
	}{
		{"nothing", nil, nil},
		{"sorted by protocol", []PortMatch{udp(PortRange{53, 53}), tcp(PortRange{22, 22}), icmp}, []PortMatch{icmp, tcp(PortRange{22, 22}), udp(PortRange{53, 53})}},
		{"any subsumes everything", []PortMatch{tcp(PortRange{22, 22}), anyM, icmp, anyM}, []PortMatch{anyM}},
		{"all ports subsume ranges", []PortMatch{tcp(PortRange{22, 22}), tcp(), tcp(PortRange{80, 80})}, []PortMatch{tcp()}},
		{"overlap and adjacency merge", []PortMatch{tcp(PortRange{85, 100}), tcp(PortRange{80, 90}), tcp(PortRange{101, 101}), tcp(PortRange{103, 103})},
			[]PortMatch{tcp(PortRange{80, 101}, PortRange{103, 103})}},
		{"wide and narrow", []PortMatch{tcp(PortRange{8000, 8100}), tcp(PortRange{8080, 8080})}, []PortMatch{tcp(PortRange{8000, 8100})}},
		{"edges", []PortMatch{udp(PortRange{65535, 65535}), udp(PortRange{1, 65534})}, []PortMatch{udp(PortRange{1, 65535})}},
		{"duplicates", []PortMatch{icmp, icmp, udp(PortRange{53, 53}), udp(PortRange{53, 53})}, []PortMatch{icmp, udp(PortRange{53, 53})}},
	}
	for _, tt := range tests {
		in := cloneMatches(tt.in)
		if got := mergeMatches(tt.in); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: mergeMatches = %+v, want %+v", tt.name, got, tt.want)
		}
		if !reflect.DeepEqual(in, tt.in) {
			t.Errorf("%s: mergeMatches modified its input", tt.name)
		}
	}
}

func cloneMatches(ms []PortMatch) []PortMatch {
	if ms == nil {
		return nil
	}
	out := make([]PortMatch, len(ms))
	for i, m := range ms {
		out[i] = PortMatch{Protocol: m.Protocol, Ports: append([]PortRange(nil), m.Ports...)}
	}
	return out
}

// portOracle is an independent description of the port syntax.
var portOracle = regexp.MustCompile(`^(?:any|icmp|tcp|udp|(?:tcp|udp)/([0-9]+)(?:-([0-9]+))?)$`)

// FuzzPortSyntax checks parsePort against a regular-expression oracle and checks
// that what it accepts formats and parses back to the same match.
func FuzzPortSyntax(f *testing.F) {
	for _, s := range []string{"any", "icmp", "tcp", "udp/53", "tcp/8000-8100", "tcp/0", "5432", "tcp/65536", "icmp/1", "tcp/9-1", "TCP/1", "tcp/-", "/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, err := parsePort(s)
		sub := portOracle.FindStringSubmatch(s)
		wantOK := sub != nil
		if wantOK && sub[1] != "" {
			first, err1 := strconv.ParseUint(sub[1], 10, 64)
			last := first
			var err2 error
			if sub[2] != "" {
				last, err2 = strconv.ParseUint(sub[2], 10, 64)
			}
			wantOK = err1 == nil && err2 == nil && first >= 1 && last <= 65535 && first <= last
		}
		if (err == nil) != wantOK {
			t.Fatalf("parsePort(%q) = %+v, %v; oracle says valid=%v", s, m, err, wantOK)
		}
		if err != nil {
			if err.Error() == "" {
				t.Fatalf("parsePort(%q): empty error message", s)
			}
			return
		}
		for _, r := range m.Ports {
			if r.First == 0 || r.First > r.Last {
				t.Fatalf("parsePort(%q) = invalid range %+v", s, r)
			}
		}
		back, err := parsePort(formatMatch(m))
		if err != nil || !reflect.DeepEqual(back, m) {
			t.Fatalf("parsePort(formatMatch(%+v)=%q) = %+v, %v", m, formatMatch(m), back, err)
		}
	})
}
