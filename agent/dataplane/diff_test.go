package dataplane

import (
	"net/netip"
	"testing"
)

func TestEndpointDifferenceKey(t *testing.T) {
	var k Key
	k[0] = 7
	withEP := func(ep string) State {
		p := Peer{PublicKey: k, AllowedIPs: []netip.Prefix{netip.MustParsePrefix("100.64.0.7/32")}}
		if ep != "" {
			p.Endpoint = netip.MustParseAddrPort(ep)
		}
		return State{Peers: []Peer{p}}
	}
	tests := []struct {
		name     string
		desired  State
		observed State
		want     bool
	}{
		{name: "endpoint differs", desired: withEP("192.0.2.1:1"), observed: withEP("192.0.2.2:1"), want: true},
		{name: "keepalive differs", desired: withEP("192.0.2.1:1"), observed: func() State {
			s := withEP("192.0.2.1:1")
			s.Peers[0].PersistentKeepalive = 25
			return s
		}()},
		{name: "peer missing", desired: withEP("192.0.2.1:1"), observed: State{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ds := Diff(tt.desired, tt.observed)
			if len(ds) != 1 {
				t.Fatalf("Diff = %v, want one difference", ds)
			}
			got, ok := EndpointDifferenceKey(ds[0])
			if ok != tt.want || (ok && got != k) {
				t.Fatalf("EndpointDifferenceKey(%v) = %v, %v; want %v", ds[0], KeyString(got), ok, tt.want)
			}
		})
	}
	if _, ok := EndpointDifferenceKey(Difference{Part: PartRoute, Detail: KeyString(k) + ": endpoint x"}); ok {
		t.Error("a route difference read as a peer endpoint difference")
	}
}
