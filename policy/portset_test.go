package policy

import (
	"testing"

	"pgregory.net/rapid"
)

func matches(t testing.TB, ss ...string) []PortMatch {
	t.Helper()
	var out []PortMatch
	for _, s := range ss {
		m, err := parsePort(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
	}
	return out
}

func TestPortSetString(t *testing.T) {
	tests := []struct {
		in   []string
		want string
	}{
		{nil, ""},
		{[]string{"any"}, "any"},
		{[]string{"tcp", "udp", "icmp"}, "icmp tcp udp"}, // everything but other protocols
		{[]string{"tcp/22", "tcp/20-21", "tcp/8000-8100", "tcp/8080"}, "tcp/20-22,8000-8100"},
		{[]string{"udp/53", "icmp"}, "icmp udp/53"},
		{[]string{"tcp/1-65535"}, "tcp/1-65535"}, // port 0 is left out: not "tcp"
		{[]string{"tcp/65535", "tcp/1"}, "tcp/1,65535"},
	}
	for _, tt := range tests {
		if got := PortSetOf(matches(t, tt.in...)).String(); got != tt.want {
			t.Errorf("PortSetOf(%v) = %q, want %q", tt.in, got, tt.want)
		}
	}
	// Minus leaves what only "any" covers.
	if got := PortSetOf(matches(t, "any")).Minus(PortSetOf(matches(t, "tcp", "udp", "icmp"))).String(); got != "other" {
		t.Errorf("any minus tcp, udp, icmp = %q, want other", got)
	}
	if got := PortSetOf(matches(t, "tcp")).Minus(PortSetOf(matches(t, "tcp/1-65535"))).String(); got != "tcp/0" {
		t.Errorf("tcp minus tcp/1-65535 = %q, want tcp/0", got)
	}
}

func TestPortSetFirst(t *testing.T) {
	tests := []struct {
		in   []string
		want string
	}{
		{[]string{"any"}, "icmp"},
		{[]string{"tcp"}, "tcp/1"}, // port 0 comes last
		{[]string{"udp/53", "tcp/8080"}, "tcp/8080"},
		{[]string{"udp/100-200"}, "udp/100"},
	}
	for _, tt := range tests {
		pk, ok := PortSetOf(matches(t, tt.in...)).First()
		if !ok || pk.String() != tt.want {
			t.Errorf("First of %v = %v, %v; want %s", tt.in, pk, ok, tt.want)
		}
	}
	if pk, ok := (PortSet{}).First(); ok {
		t.Errorf("First of the empty set = %v", pk)
	}
	if pk, _ := PortSetOf(matches(t, "any")).Minus(PortSetOf(matches(t, "tcp", "udp", "icmp"))).First(); pk.String() != "other" {
		t.Errorf("First of other = %v", pk)
	}
	only0 := PortSetOf(matches(t, "tcp")).Minus(PortSetOf(matches(t, "tcp/1-65535")))
	if pk, _ := only0.First(); pk.String() != "tcp/0" {
		t.Errorf("First of tcp/0 = %v", pk)
	}
}

func TestParsePacket(t *testing.T) {
	good := map[string]Packet{
		"tcp/5432": {ProtoTCP, 5432}, "udp/53": {ProtoUDP, 53}, "icmp": {ProtoICMP, 0}, "tcp/65535": {ProtoTCP, 65535},
	}
	for in, want := range good {
		if got, err := ParsePacket(in); err != nil || got != want {
			t.Errorf("ParsePacket(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	bad := map[string]string{
		"any":        `"any" is every packet; name one: tcp/PORT, udp/PORT or icmp`,
		"tcp":        `"tcp" names no port; write tcp/PORT`,
		"tcp/1-2":    `"tcp/1-2" is a range; name one port, e.g. tcp/1`,
		"5432":       `port "5432" has no protocol; did you mean tcp/5432 or udp/5432?`,
		"tcp/0":      `port 0 is out of range 1-65535 in "tcp/0"`,
		"icmp/8":     `protocol icmp takes no ports; write "icmp"`,
		"sctp/9":     `unknown protocol "sctp" in "sctp/9"; want tcp, udp, icmp or any`,
		"tcp/80,443": `invalid port "80,443": want a number 1-65535 or a range FIRST-LAST in "tcp/80,443"`,
	}
	for in, want := range bad {
		if got, err := ParsePacket(in); err == nil || err.Error() != want {
			t.Errorf("ParsePacket(%q) = %v, %v; want error %q", in, got, err, want)
		}
	}
}

// probePackets are the packets the port-set properties look at: every boundary
// of portPool, port 0, ICMP echo and another protocol.
func probePackets() []Packet {
	out := []Packet{{ProtoICMP, 0}, {ProtoAny, 0}}
	for _, proto := range []Protocol{ProtoTCP, ProtoUDP} {
		out = append(out, Packet{proto, 0})
		for _, p := range probePorts {
			out = append(out, Packet{proto, p})
		}
	}
	return out
}

// setHas is the direct reading of the port syntax for one packet.
func setHas(ms []PortMatch, pk Packet) bool {
	for _, m := range ms {
		switch {
		case m.Protocol == ProtoAny:
			return true
		case pk.Protocol == ProtoAny:
		case m.Protocol != pk.Protocol:
		case len(m.Ports) == 0:
			return true
		default:
			for _, r := range m.Ports {
				if r.First <= pk.Port && pk.Port <= r.Last {
					return true
				}
			}
		}
	}
	return false
}

// TestPortSetAlgebra checks PortSetOf, Union, Intersect, Minus, Contains,
// Equal, Empty and the canonical form packet by packet on random port lists.
func TestPortSetAlgebra(t *testing.T) {
	gen := rapid.Custom(func(t *rapid.T) []PortMatch {
		var ms []PortMatch
		for _, s := range rapid.SliceOfN(rapid.SampledFrom(portPool), 0, 4).Draw(t, "ports") {
			m, err := parsePort(s)
			if err != nil {
				t.Fatal(err)
			}
			ms = append(ms, m)
		}
		return ms
	})
	rapid.Check(t, func(t *rapid.T) {
		ma, mb := gen.Draw(t, "a"), gen.Draw(t, "b")
		a, b := PortSetOf(ma), PortSetOf(mb)
		u, i, d := a.Union(b), a.Intersect(b), a.Minus(b)
		subset := true
		empty := true
		for _, pk := range probePackets() {
			inA, inB := setHas(ma, pk), setHas(mb, pk)
			for _, c := range []struct {
				name string
				got  bool
				want bool
			}{
				{"a", a.Has(pk), inA}, {"union", u.Has(pk), inA || inB},
				{"intersect", i.Has(pk), inA && inB}, {"minus", d.Has(pk), inA && !inB},
			} {
				if c.got != c.want {
					t.Fatalf("%s of %v and %v: %v is in it = %v, want %v", c.name, ma, mb, pk, c.got, c.want)
				}
			}
			if inB && !inA {
				subset = false
			}
			if inA {
				empty = false
			}
		}
		if a.Contains(b) != subset && len(mb) > 0 {
			// Probes cover every boundary of the pool, so they decide containment.
			t.Fatalf("%v contains %v = %v, probes say %v", ma, mb, a.Contains(b), subset)
		}
		if a.Empty() != empty {
			t.Fatalf("%v empty = %v, want %v", ma, a.Empty(), empty)
		}
		if !a.Union(b).Equal(b.Union(a)) || !PortSetOf(mergeMatches(ma)).Equal(a) {
			t.Fatalf("union not commutative or merge changes the set: %v %v", ma, mb)
		}
	})
}
