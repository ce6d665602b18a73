package nft

import (
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/google/nftables/expr"
	"pgregory.net/rapid"

	"segmesh/agent/dataplane"
	"segmesh/agent/firewall"
	"segmesh/policy"
)

func TestDecodeRuleRoundTrip(t *testing.T) {
	f := policy.Filter{
		Sets: []policy.AddressSet{{Name: "web"}, {Name: "db"}},
		Ingress: []policy.FilterRule{
			{Set: "web", Origin: "web-to-db (policy.yaml:12:5)", Matches: []policy.PortMatch{
				{Protocol: policy.ProtoTCP, Ports: []policy.PortRange{{First: 5432, Last: 5432}, {First: 8000, Last: 8100}}},
				{Protocol: policy.ProtoUDP},
				{Protocol: policy.ProtoICMP},
			}},
			{Set: "db", Origin: "", Matches: []policy.PortMatch{{Protocol: policy.ProtoAny}}},
			{Set: "db", Origin: "no matches"},
		},
		Egress: []policy.FilterRule{{Set: "web", Origin: "out", Matches: []policy.PortMatch{{Protocol: policy.ProtoUDP, Ports: []policy.PortRange{{First: 53, Last: 53}}}}}},
	}
	tab, err := firewall.Build("smdp0", f)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range tab.Chains {
		for i, r := range c.Rules {
			got, err := decodeRule(ruleExprs(r), userData(r))
			if err != nil {
				t.Fatalf("%s[%d] %+v: %v", c.Name, i, r, err)
			}
			if got != r {
				t.Errorf("%s[%d]: decoded %+v, want %+v", c.Name, i, got, r)
			}
		}
	}
	// 3 fixed + (2 tcp ports + udp + icmp) * 2 families + 2 any + 2 placeholders
	// + (3 port protocols + 1 other) * 2 families of record rules + final drop
	if got := len(tab.Chain(firewall.ChainIngress).Rules); got != 3+8+2+2+8+1 {
		t.Errorf("ingress has %d rules, want 24", got)
	}
}

func TestDecodeRuleRejectsOtherShapes(t *testing.T) {
	accept := &expr.Verdict{Kind: expr.VerdictAccept}
	tcp := []expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{6}}}
	tests := []struct {
		name  string
		exprs []expr.Any
		udata []byte
	}{
		{"counter after verdict", []expr.Any{accept, &expr.Counter{}}, nil},
		{"two counters", []expr.Any{&expr.Counter{}, &expr.Counter{}, accept}, nil},
		{"record without family", recordExprs(firewall.FamilyIPv4, false, "denied_in4_proto"), nil},
		{"record with a timeout", append(append([]expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{2}}}, recordExprs(firewall.FamilyIPv4, false, "s")[:3]...),
			&expr.Dynset{SrcRegKey: 1, SetName: "s", Operation: dynsetOpUpdate, Timeout: 1000}), nil},
		{"record add, not update", append(append([]expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{2}}}, recordExprs(firewall.FamilyIPv4, false, "s")[:3]...),
			&expr.Dynset{SrcRegKey: 1, SetName: "s"}), nil},
		{"port key without protocol", append([]expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{2}}}, recordExprs(firewall.FamilyIPv4, true, "s")...), nil},
		{"two protocol exclusions", append(notPortExprs(), notPortExprs()...), nil},
		{"two verdicts", []expr.Any{accept, accept}, nil},
		{"verdict before match", append([]expr.Any{accept}, tcp...), nil},
		{"wildcard interface", []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("smdp")}, accept}, nil},
		{"negated protocol", []expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{6}}, accept}, nil},
		{"inverted lookup", []expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
			&expr.Lookup{SourceRegister: 1, SetName: "x_v4", Invert: true}, accept}, nil},
		{"meta without cmp", []expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}}, nil},
		{"return verdict", []expr.Any{&expr.Verdict{Kind: expr.VerdictReturn}}, nil},
		{"unknown userdata", []expr.Any{accept}, []byte{7, 1, 0}},
		{"truncated userdata", []expr.Any{accept}, []byte{0, 5, 'a'}},
		{"comment without NUL", []expr.Any{accept}, []byte{0, 1, 'a'}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if s, err := decodeRule(tt.exprs, tt.udata); !errors.Is(err, errShape) {
				t.Errorf("decodeRule = %+v, %v; want errShape", s, err)
			}
		})
	}
}

func TestIntervals(t *testing.T) {
	pp := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	a := netip.MustParseAddr
	tests := []struct {
		name string
		in   []netip.Prefix
		want []firewall.Interval
	}{
		{"empty", nil, nil},
		{"hosts", pp("100.64.0.2/32", "100.64.0.1/32"), []firewall.Interval{{First: a("100.64.0.1"), Last: a("100.64.0.1")}, {First: a("100.64.0.2"), Last: a("100.64.0.2")}}},
		{"contained", pp("10.0.0.0/8", "10.1.0.0/16", "10.0.0.0/8"), []firewall.Interval{{First: a("10.0.0.0"), Last: a("10.255.255.255")}}},
		{"unmasked", pp("10.1.2.3/24"), []firewall.Interval{{First: a("10.1.2.0"), Last: a("10.1.2.255")}}},
		{"all v4", pp("0.0.0.0/0"), []firewall.Interval{{First: a("0.0.0.0"), Last: a("255.255.255.255")}}},
		{"v6", pp("fd5e:6d65:7368::/48"), []firewall.Interval{{First: a("fd5e:6d65:7368::"), Last: a("fd5e:6d65:7368:ffff:ffff:ffff:ffff:ffff")}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := firewall.PrefixIntervals(tt.in)
			if !slices.Equal(got, tt.want) {
				t.Errorf("prefixIntervals = %v, want %v", got, tt.want)
			}
			if len(tt.in) == 0 {
				return
			}
			addrLen := tt.in[0].Addr().BitLen() / 8
			if back := elementIntervals(intervalElements(got), addrLen); !slices.Equal(back, got) {
				t.Errorf("elements round trip = %v, want %v", back, got)
			}
		})
	}
}

// TestIntervalsProperty checks, for random prefix lists, that the rendered elements
// parse back to the same intervals and that intervalPrefixes covers each interval
// exactly with prefixes that re-render to it.
func TestIntervalsProperty(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		v6 := rapid.Bool().Draw(t, "v6")
		n := rapid.IntRange(0, 20).Draw(t, "n")
		var ps []netip.Prefix
		for i := range n {
			var addr netip.Addr
			bits := 0
			if v6 {
				var b [16]byte
				copy(b[:], rapid.SliceOfN(rapid.Byte(), 16, 16).Draw(t, "a6"))
				addr, bits = netip.AddrFrom16(b), rapid.IntRange(0, 128).Draw(t, "bits6")
			} else {
				var b [4]byte
				copy(b[:], rapid.SliceOfN(rapid.Byte(), 4, 4).Draw(t, "a4"))
				addr, bits = netip.AddrFrom4(b), rapid.IntRange(0, 32).Draw(t, "bits4")
			}
			_ = i
			ps = append(ps, netip.PrefixFrom(addr, bits))
		}
		ivs := firewall.PrefixIntervals(ps)
		addrLen := 4
		if v6 {
			addrLen = 16
		}
		if back := elementIntervals(intervalElements(ivs), addrLen); !slices.Equal(back, ivs) {
			t.Fatalf("elements round trip = %v, want %v", back, ivs)
		}
		for i, iv := range ivs {
			if i > 0 && ivs[i-1].Last.Compare(iv.First) >= 0 {
				t.Fatalf("intervals overlap or are unsorted: %v", ivs)
			}
			cover := firewall.IntervalPrefixes(iv)
			if got := firewall.PrefixIntervals(cover); len(got) != len(cover) || got[0].First != iv.First || got[len(got)-1].Last != iv.Last {
				t.Fatalf("IntervalPrefixes(%v) = %v", iv, cover)
			}
			for j := 1; j < len(cover); j++ {
				if firewall.LastAddr(cover[j-1]).Next() != cover[j].Addr() {
					t.Fatalf("IntervalPrefixes(%v) = %v has a gap", iv, cover)
				}
			}
		}
		// Every input address is covered by some interval.
		for _, p := range ps {
			a := p.Masked().Addr()
			if !slices.ContainsFunc(ivs, func(iv firewall.Interval) bool { return iv.First.Compare(a) <= 0 && iv.Last.Compare(a) >= 0 }) {
				t.Fatalf("%v not covered by %v", p, ivs)
			}
		}
	})
}

func TestParseFlowKey(t *testing.T) {
	sets := map[string]firewall.DeniedSet{}
	for _, d := range firewall.DeniedSets() {
		sets[d.Name] = d
	}
	v6 := func(s string) []byte { return netip.MustParseAddr(s).AsSlice() }
	cat := func(parts ...[]byte) []byte { return slices.Concat(parts...) }
	tests := []struct {
		name, set string
		key       []byte
		want      dataplane.DeniedFlow
		ok        bool
	}{
		{"v4 udp in", "denied_in4", []byte{100, 64, 0, 2, 100, 64, 0, 1, 17, 0, 0, 0, 0x1e, 0x61, 0, 0}, dataplane.DeniedFlow{Direction: "in",
			Src: netip.MustParseAddr("100.64.0.2"), Dst: netip.MustParseAddr("100.64.0.1"), Protocol: 17, Port: 7777}, true},
		{"v4 icmp out", "denied_out4_proto", []byte{100, 64, 0, 1, 100, 64, 0, 2, 1, 0, 0, 0}, dataplane.DeniedFlow{Direction: "out",
			Src: netip.MustParseAddr("100.64.0.1"), Dst: netip.MustParseAddr("100.64.0.2"), Protocol: 1}, true},
		{"v6 sctp", "denied_in6", cat(v6("fd00::2"), v6("fd00::1"), []byte{132, 0, 0, 0, 0, 80, 0, 0}), dataplane.DeniedFlow{Direction: "in",
			Src: netip.MustParseAddr("fd00::2"), Dst: netip.MustParseAddr("fd00::1"), Protocol: 132, Port: 80}, true},
		{"v6 icmpv6", "denied_out6_proto", cat(v6("fd00::1"), v6("fd00::2"), []byte{58, 0, 0, 0}), dataplane.DeniedFlow{Direction: "out",
			Src: netip.MustParseAddr("fd00::1"), Dst: netip.MustParseAddr("fd00::2"), Protocol: 58}, true},
		{"short", "denied_in4", []byte{100, 64, 0, 2}, dataplane.DeniedFlow{}, false},
		{"v4 key in a v6 set", "denied_in6_proto", []byte{100, 64, 0, 1, 100, 64, 0, 2, 1, 0, 0, 0}, dataplane.DeniedFlow{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := parseFlowKey(sets[tt.set], tt.key)
			if ok != tt.ok || ok && got != tt.want {
				t.Errorf("parseFlowKey = %+v, %v; want %+v, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
}
