package agent

import (
	"log/slog"
	"net/netip"
	"testing"

	"segmesh/agent/dataplane"
	"segmesh/agent/netmap"
	"segmesh/agent/path"
	"segmesh/api/segmeshv1"
)

func TestParseRelayPorts(t *testing.T) {
	for _, tc := range []struct {
		in          string
		first, last uint16
		bad         bool
	}{
		{in: ""},
		{in: "40000-40999", first: 40000, last: 40999},
		{in: "40000-40001", first: 40000, last: 40001},
		{in: "40000-40000", bad: true}, // one port: no session; the controller refuses it
		{in: "40999-40000", bad: true},
		{in: "80-90", bad: true},
		{in: "40000", bad: true},
		{in: "40000-70000", bad: true},
		{in: "a-b", bad: true},
	} {
		f, l, err := parseRelayPorts(tc.in)
		if (err != nil) != tc.bad || f != tc.first || l != tc.last {
			t.Errorf("parseRelayPorts(%q) = %d, %d, %v; want %d, %d, error %v", tc.in, f, l, err, tc.first, tc.last, tc.bad)
		}
	}
}

func TestSTUNServer(t *testing.T) {
	for _, tc := range []struct{ opt, controller, want string }{
		{"", "https://192.0.2.1:7443", "192.0.2.1:3478"},
		{"", "https://[2001:db8::1]:7443", "[2001:db8::1]:3478"},
		{"198.51.100.9:19302", "https://192.0.2.1:7443", "198.51.100.9:19302"},
		{STUNOff, "https://192.0.2.1:7443", "invalid AddrPort"},
	} {
		got, err := stunServer(tc.opt, tc.controller)
		if err != nil || got.String() != tc.want {
			t.Errorf("stunServer(%q, %q) = %v, %v; want %s", tc.opt, tc.controller, got, err, tc.want)
		}
	}
	if _, err := stunServer("0.0.0.0:0", "https://192.0.2.1:7443"); err == nil {
		t.Error("stunServer accepted 0.0.0.0:0")
	}
}

func TestCandidatesAdvertised(t *testing.T) {
	defer func(f func(string) []netip.Addr) { hostAddrs = f }(hostAddrs)
	hostAddrs = func(string) []netip.Addr {
		return []netip.Addr{netip.MustParseAddr("10.1.0.2"), netip.MustParseAddr("198.51.100.7"), netip.MustParseAddr("2001:db8::7")}
	}
	a := &agent{}
	a.endpoint = netip.MustParseAddrPort("10.1.0.2:51820")
	a.mapped = netip.MustParseAddrPort("203.0.113.1:51820")
	var got []string
	for _, c := range a.candidates() {
		got = append(got, c.Kind+" "+c.Endpoint)
	}
	want := []string{"local 10.1.0.2:51820", "local 198.51.100.7:51820", "local [2001:db8::7]:51820", "stun 203.0.113.1:51820"}
	if len(got) != len(want) {
		t.Fatalf("candidates %q, want %q", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("candidates %q, want %q", got, want)
		}
	}
}

func TestPathPeersOrder(t *testing.T) {
	k := dataplane.Key{7}
	nm := &netmap.Netmap{Peers: []netmap.Peer{{
		Name: "b", PublicKey: k, Endpoint: netip.MustParseAddrPort("10.2.0.2:51820"),
		Candidates: []netmap.Candidate{
			{Endpoint: netip.MustParseAddrPort("10.2.0.2:51820"), Kind: netmap.CandidateLocal},
			{Endpoint: netip.MustParseAddrPort("203.0.113.2:51820"), Kind: netmap.CandidateObserved},
		},
	}}}
	claimed := map[dataplane.Key]netip.AddrPort{k: netip.MustParseAddrPort("10.2.0.9:51820")}
	ps := pathPeers(nm, claimed)
	if len(ps) != 1 {
		t.Fatalf("peers %v", ps)
	}
	var got []string
	for _, c := range ps[0].Candidates {
		got = append(got, c.Endpoint.String())
	}
	want := "[10.2.0.9:51820 10.2.0.2:51820 203.0.113.2:51820]"
	if g := slogValue(got); g != want {
		t.Fatalf("candidates %s, want %s (the verified gossip claim first)", g, want)
	}
	if pathPeers(&netmap.Netmap{Revoked: true, Peers: nm.Peers}, nil) != nil {
		t.Fatal("a revoked netmap has peers for the path selector")
	}
}

func slogValue(v any) string { return slog.AnyValue(v).String() }

func TestPunchOnlyForNetmapPeers(t *testing.T) {
	a := newGossipAgent(t, slog.New(slog.DiscardHandler))
	nm, err := netmap.Parse(wireNetmap(1, 0))
	if err != nil {
		t.Fatal(err)
	}
	a.rec.SetNetmap(nm)
	a.path.SetPeers(pathPeers(nm, nil))
	relayCand := &segmeshv1.Candidate{Endpoint: "192.0.2.50:40001", Kind: "relay", Relay: "r"}
	stranger := dkey(9)
	pub := publicKey(stranger)
	a.handlePunch(&segmeshv1.Punch{Peer: "x", PublicKey: pub[:], Candidates: []*segmeshv1.Candidate{relayCand}})
	for _, p := range a.path.Paths() {
		if p.Kind == path.Relay {
			t.Fatal("a punch for a key outside the netmap set a relay path")
		}
	}
	peer := nm.Peers[0]
	a.handlePunch(&segmeshv1.Punch{Peer: "not-" + peer.Name, PublicKey: peer.PublicKey[:], Candidates: []*segmeshv1.Candidate{relayCand}})
	if a.path.Paths()[peer.PublicKey].Kind == path.Relay {
		t.Fatal("a punch naming the key under another name set a relay path")
	}
	a.handlePunch(&segmeshv1.Punch{Peer: peer.Name, PublicKey: peer.PublicKey[:], Candidates: []*segmeshv1.Candidate{relayCand}})
	if got := a.path.Paths()[peer.PublicKey]; got.Kind != path.Relay || got.Endpoint.String() != "192.0.2.50:40001" {
		t.Fatalf("path %+v after the controller's punch with a relay candidate", got)
	}
}
