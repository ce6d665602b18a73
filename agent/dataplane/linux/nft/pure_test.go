package nft

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables/expr"
	"pgregory.net/rapid"

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
	m, err := desiredModel("smdp0", f)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for chain, rules := range m.Rules {
		for i, r := range rules {
			got, err := decodeRule(r.exprs(), r.userData())
			if err != nil {
				t.Fatalf("%s[%d] %+v: %v", chain, i, r, err)
			}
			if got != r {
				t.Errorf("%s[%d]: decoded %+v, want %+v", chain, i, got, r)
			}
			n++
		}
	}
	// 2 fixed + (2 tcp ports + udp + icmp) * 2 families + 2 any + 2 placeholders + final drop
	if got := len(m.Rules[chainIngress]); got != 2+8+2+2+1 {
		t.Errorf("ingress has %d rules, want 15", got)
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
		{"counter", []expr.Any{&expr.Counter{}, accept}, nil},
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

func TestDesiredModelRejectsInvalidFilters(t *testing.T) {
	set := []policy.AddressSet{{Name: "s"}}
	tests := []struct {
		name string
		f    policy.Filter
		want string
	}{
		{"undefined set", policy.Filter{Ingress: []policy.FilterRule{{Set: "nope"}}}, "not defined"},
		{"duplicate set", policy.Filter{Sets: []policy.AddressSet{{Name: "s"}, {Name: "s"}}}, "twice"},
		{"empty set name", policy.Filter{Sets: []policy.AddressSet{{}}}, "set name"},
		{"ports on icmp", policy.Filter{Sets: set, Egress: []policy.FilterRule{{Set: "s", Matches: []policy.PortMatch{
			{Protocol: policy.ProtoICMP, Ports: []policy.PortRange{{First: 1, Last: 1}}}}}}}, "takes no ports"},
		{"reversed range", policy.Filter{Sets: set, Egress: []policy.FilterRule{{Set: "s", Matches: []policy.PortMatch{
			{Protocol: policy.ProtoTCP, Ports: []policy.PortRange{{First: 9, Last: 1}}}}}}}, "empty"},
		{"unknown protocol", policy.Filter{Sets: set, Egress: []policy.FilterRule{{Set: "s", Matches: []policy.PortMatch{
			{Protocol: "sctp"}}}}}, "unknown protocol"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := desiredModel("smdp0", tt.f)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("desiredModel error = %v, want it to contain %q", err, tt.want)
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
		want []interval
	}{
		{"empty", nil, nil},
		{"hosts", pp("100.64.0.2/32", "100.64.0.1/32"), []interval{{a("100.64.0.1"), a("100.64.0.1")}, {a("100.64.0.2"), a("100.64.0.2")}}},
		{"contained", pp("10.0.0.0/8", "10.1.0.0/16", "10.0.0.0/8"), []interval{{a("10.0.0.0"), a("10.255.255.255")}}},
		{"unmasked", pp("10.1.2.3/24"), []interval{{a("10.1.2.0"), a("10.1.2.255")}}},
		{"all v4", pp("0.0.0.0/0"), []interval{{a("0.0.0.0"), a("255.255.255.255")}}},
		{"v6", pp("fd5e:6d65:7368::/48"), []interval{{a("fd5e:6d65:7368::"), a("fd5e:6d65:7368:ffff:ffff:ffff:ffff:ffff")}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := prefixIntervals(tt.in)
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
		ivs := prefixIntervals(ps)
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
			cover := intervalPrefixes(iv)
			if got := prefixIntervals(cover); len(got) != len(cover) || got[0].First != iv.First || got[len(got)-1].Last != iv.Last {
				t.Fatalf("intervalPrefixes(%v) = %v", iv, cover)
			}
			for j := 1; j < len(cover); j++ {
				if lastAddr(cover[j-1]).Next() != cover[j].Addr() {
					t.Fatalf("intervalPrefixes(%v) = %v has a gap", iv, cover)
				}
			}
		}
		// Every input address is covered by some interval.
		for _, p := range ps {
			a := p.Masked().Addr()
			if !slices.ContainsFunc(ivs, func(iv interval) bool { return iv.First.Compare(a) <= 0 && iv.Last.Compare(a) >= 0 }) {
				t.Fatalf("%v not covered by %v", p, ivs)
			}
		}
	})
}
