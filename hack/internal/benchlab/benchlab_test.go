package benchlab

import (
	"net/netip"
	"testing"

	"segmesh/policy"
)

func TestPartnersPolicy(t *testing.T) {
	tests := []struct {
		n            int
		wantSegments int
		wantRules    int
	}{
		{n: 0, wantSegments: 2, wantRules: 1},
		{n: 3, wantSegments: 3, wantRules: 2},
		{n: 200_000, wantSegments: 3, wantRules: 2},
	}
	for _, tt := range tests {
		src := PartnersPolicy(tt.n)
		if len(src) > policy.MaxFileSize {
			t.Fatalf("PartnersPolicy(%d) is %d bytes, above the policy file limit %d", tt.n, len(src), policy.MaxFileSize)
		}
		p, err := policy.Parse("partners.yaml", []byte(src))
		if err != nil {
			t.Fatalf("PartnersPolicy(%d) does not parse: %v", tt.n, err)
		}
		if len(p.Segments) != tt.wantSegments || len(p.Rules) != tt.wantRules {
			t.Errorf("PartnersPolicy(%d): %d segments, %d rules; want %d, %d", tt.n, len(p.Segments), len(p.Rules), tt.wantSegments, tt.wantRules)
		}
		if tt.n > 0 {
			if got := len(p.Segments[2].CIDRs); got != tt.n {
				t.Errorf("PartnersPolicy(%d): partners has %d cidrs", tt.n, got)
			}
		}
	}
}

func TestPartnerPrefix(t *testing.T) {
	for i, want := range map[int]string{0: "10.0.0.0/32", 1: "10.0.0.2/32", 128: "10.0.1.0/32", 199_999: "10.6.26.126/32"} {
		if got := PartnerPrefix(i); got != netip.MustParsePrefix(want) {
			t.Errorf("PartnerPrefix(%d) = %s, want %s", i, got, want)
		}
	}
}
