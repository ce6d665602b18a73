package policy

import (
	"net/netip"
	"testing"
)

func TestCheckExternal(t *testing.T) {
	overlay := []netip.Prefix{netip.MustParsePrefix("100.64.0.0/10"), netip.MustParsePrefix("fd5e:6d65:7368::/48")}
	tests := []struct {
		name, cidrs string
		want        []string
	}{
		{"outside", "[192.0.2.0/24, \"2001:db8::/32\"]", nil},
		{"inside v4", "[192.0.2.0/24, 100.64.1.0/24]", []string{
			`p.yaml:5:27: external segment "ext": cidr 100.64.1.0/24 overlaps the overlay prefix 100.64.0.0/10; external segments hold addresses outside the overlay, select nodes with selectors or nodes instead`}},
		{"covering v4", "[0.0.0.0/0]", []string{
			`p.yaml:5:13: external segment "ext": cidr 0.0.0.0/0 overlaps the overlay prefix 100.64.0.0/10; external segments hold addresses outside the overlay, select nodes with selectors or nodes instead`}},
		{"inside v6 with except", "[{cidr: \"fd5e:6d65:7368::/64\", except: [\"fd5e:6d65:7368::/65\"]}]", []string{
			`p.yaml:5:20: external segment "ext": cidr fd5e:6d65:7368::/64 overlaps the overlay prefix fd5e:6d65:7368::/48; external segments hold addresses outside the overlay, select nodes with selectors or nodes instead`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Parse("p.yaml", []byte("version: 1\nsegments:\n  - name: ext\n    # external\n    cidrs: "+tt.cidrs+"\n"))
			if err != nil {
				t.Fatal(err)
			}
			got := CheckExternal(p, overlay)
			if len(got) != len(tt.want) {
				t.Fatalf("CheckExternal = %v, want %v", got, tt.want)
			}
			for i := range got {
				if got[i].Error() != tt.want[i] {
					t.Errorf("error %d = %q\nwant      %q", i, got[i].Error(), tt.want[i])
				}
			}
		})
	}
}
