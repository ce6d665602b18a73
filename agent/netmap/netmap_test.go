package netmap

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"net/netip"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
	"segmesh/api/wire"
)

// idKey is peer b's identity key in valid().
var idKey = func() *ecdsa.PublicKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	return &k.PublicKey
}()

func pkix(t testing.TB, c elliptic.Curve) []byte {
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func valid() *segmeshv1.Netmap {
	idDER, err := x509.MarshalPKIXPublicKey(idKey)
	if err != nil {
		panic(err)
	}
	return &segmeshv1.Netmap{
		PolicyRevision: 3,
		Self:           &segmeshv1.Node{Name: "a", Addresses: []string{"100.64.0.1/32"}, PublicKey: bytes.Repeat([]byte{1}, 32), Endpoint: "192.0.2.1:51820"},
		Peers: []*segmeshv1.Peer{
			{Name: "b", PublicKey: bytes.Repeat([]byte{2}, 32), Endpoint: "[::ffff:192.0.2.2]:51820", AllowedIps: []string{"100.64.0.2/32"}, IdentityKey: idDER},
			{Name: "c", PublicKey: bytes.Repeat([]byte{3}, 32), AllowedIps: []string{"100.64.0.3/32", "fd5e:6d65:7368::3/128"}},
		},
		Filter: &segmeshv1.Filter{
			Sets:    []*segmeshv1.AddressSet{{Name: "s", Prefixes: []string{"100.64.0.2/32"}}},
			Ingress: []*segmeshv1.FilterRule{{Set: "s", Matches: []*segmeshv1.PortMatch{{Protocol: segmeshv1.Protocol_PROTOCOL_ICMP}}}},
		},
		Gossip:          &segmeshv1.GossipConfig{Key: bytes.Repeat([]byte{7}, 32), Port: 7946},
		OverlayPrefixes: []string{"100.64.0.0/10"},
	}
}

func hashed(f func(nm *segmeshv1.Netmap)) *segmeshv1.Netmap {
	nm := valid()
	f(nm)
	nm.Hash = wire.NetmapHash(nm)
	return nm
}

// hashedV2 is hashed with hash version 2 (wire.NetmapHashV2).
func hashedV2(f func(nm *segmeshv1.Netmap)) *segmeshv1.Netmap {
	nm := valid()
	f(nm)
	nm.HashVersion = wire.HashVersion2
	nm.Hash = wire.NetmapHashV2(nm)
	return nm
}

func TestParse(t *testing.T) {
	tests := []struct {
		name string
		in   *segmeshv1.Netmap
		want string // error substring; "" = valid
	}{
		{name: "valid", in: hashed(func(*segmeshv1.Netmap) {})},
		{name: "no gossip", in: hashed(func(nm *segmeshv1.Netmap) { nm.Gossip = nil })},
		{name: "nil", in: nil, want: "nil message"},
		{name: "hash mismatch", in: func() *segmeshv1.Netmap {
			nm := hashed(func(*segmeshv1.Netmap) {})
			nm.Peers[0].AllowedIps = []string{"0.0.0.0/0"}
			return nm
		}(), want: "hash mismatch"},
		{name: "empty hash", in: valid(), want: "hash mismatch"},
		{name: "hash version 2", in: hashedV2(func(*segmeshv1.Netmap) {})},
		{name: "hash version 2, peers in another order", in: hashedV2(func(nm *segmeshv1.Netmap) {
			nm.Peers[0], nm.Peers[1] = nm.Peers[1], nm.Peers[0]
		})},
		{name: "hash version 2 mismatch", in: func() *segmeshv1.Netmap {
			nm := hashedV2(func(*segmeshv1.Netmap) {})
			nm.Filter.Sets[0].Prefixes = []string{"0.0.0.0/0"}
			return nm
		}(), want: "hash mismatch (hash version 2)"},
		{name: "version 1 hash labelled version 2", in: func() *segmeshv1.Netmap {
			nm := hashed(func(*segmeshv1.Netmap) {})
			nm.HashVersion = wire.HashVersion2
			return nm
		}(), want: "hash mismatch"},
		{name: "version 2 hash labelled version 1", in: func() *segmeshv1.Netmap {
			nm := hashedV2(func(*segmeshv1.Netmap) {})
			nm.HashVersion = 0
			return nm
		}(), want: "hash mismatch (hash version 0)"},
		{name: "unknown hash version", in: hashed(func(nm *segmeshv1.Netmap) { nm.HashVersion = 3 }), want: "unknown hash version 3 (this agent knows hash versions 0 and 2; upgrade the agent)"},
		{name: "no self name", in: hashed(func(nm *segmeshv1.Netmap) { nm.Self.Name = "" }), want: "self: empty name"},
		{name: "short peer key", in: hashed(func(nm *segmeshv1.Netmap) { nm.Peers[1].PublicKey = []byte{1} }), want: "peer c: public key: 1 bytes"},
		{name: "duplicate peer key", in: hashed(func(nm *segmeshv1.Netmap) { nm.Peers[1].PublicKey = nm.Peers[0].PublicKey }), want: "already used by peer b"},
		{name: "bad endpoint", in: hashed(func(nm *segmeshv1.Netmap) { nm.Peers[0].Endpoint = "host:51820" }), want: "peer b: endpoint"},
		{name: "endpoint port 0", in: hashed(func(nm *segmeshv1.Netmap) { nm.Peers[0].Endpoint = "192.0.2.2:0" }), want: "port 0"},
		{name: "allowed IP with host bits", in: hashed(func(nm *segmeshv1.Netmap) { nm.Peers[0].AllowedIps = []string{"100.64.0.2/24"} }), want: "peer b: allowed IPs"},
		{name: "bad self address", in: hashed(func(nm *segmeshv1.Netmap) { nm.Self.Addresses = []string{"nope"} }), want: "self addresses"},
		{name: "unknown set", in: hashed(func(nm *segmeshv1.Netmap) { nm.Filter.Ingress[0].Set = "x" }), want: "filter"},
		{name: "gossip key length", in: hashed(func(nm *segmeshv1.Netmap) { nm.Gossip.Key = []byte{1, 2, 3} }), want: "gossip key: 3 bytes"},
		{name: "gossip port", in: hashed(func(nm *segmeshv1.Netmap) { nm.Gossip.Port = 70000 }), want: "gossip port"},
		{name: "identity key not DER", in: hashed(func(nm *segmeshv1.Netmap) { nm.Peers[0].IdentityKey = []byte{1, 2} }), want: "peer b: identity key"},
		{name: "identity key not P-256", in: hashed(func(nm *segmeshv1.Netmap) { nm.Peers[0].IdentityKey = pkix(t, elliptic.P384()) }), want: "peer b: identity key: want an ECDSA P-256"},
		{name: "overlay prefix", in: hashed(func(nm *segmeshv1.Netmap) { nm.OverlayPrefixes = []string{"x"} }), want: "overlay prefixes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.in)
			if tt.want != "" {
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("Parse error = %v, want one containing %q", err, tt.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Revision != 3 || got.Hash != tt.in.GetHash() || got.Self.Name != "a" || len(got.Peers) != 2 || len(got.Filter.Ingress) != 1 {
				t.Fatalf("Parse = %+v", got)
			}
			if got.Peers[0].Name != tt.in.GetPeers()[0].GetName() {
				t.Fatalf("peers reordered: %s first, the message has %s", got.Peers[0].Name, tt.in.GetPeers()[0].GetName())
			}
			if got.Peers[0].Name == "c" {
				return // the checks below name the peers in valid()'s order
			}
			if ep := got.Peers[0].Endpoint; ep != netip.MustParseAddrPort("192.0.2.2:51820") {
				t.Errorf("IPv4-mapped endpoint not unmapped: %v", ep)
			}
			p, ok := got.Peer(got.Peers[1].PublicKey)
			if !ok || p.Name != "c" || got.Peers[1].Endpoint.IsValid() {
				t.Errorf("Peer lookup = %+v, %v", p, ok)
			}
			if k := got.Peers[0].IdentityKey; k == nil || !k.Equal(idKey) || got.Peers[1].IdentityKey != nil {
				t.Errorf("identity keys = %v, %v; want b's and none for c", k, got.Peers[1].IdentityKey)
			}
			if got.Gossip.Enabled() != (tt.in.GetGossip() != nil) {
				t.Errorf("gossip enabled = %v", got.Gossip.Enabled())
			}
		})
	}
}

// FuzzParse feeds arbitrary wire bytes through Parse: it must never panic, and what
// it accepts must have a matching hash and well-formed peers.
func FuzzParse(f *testing.F) {
	for _, nm := range []*segmeshv1.Netmap{hashed(func(*segmeshv1.Netmap) {}), hashedV2(func(*segmeshv1.Netmap) {}), valid()} {
		b, err := proto.Marshal(nm)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var pb segmeshv1.Netmap
		if proto.Unmarshal(b, &pb) != nil {
			return
		}
		nm, err := Parse(&pb)
		if err != nil {
			return
		}
		if h, err := wire.HashOf(&pb); err != nil || nm.Hash != h {
			t.Fatalf("accepted a netmap whose hash does not match (hash version %d: %v)", pb.GetHashVersion(), err)
		}
		for _, p := range nm.Peers {
			for _, ip := range p.AllowedIPs {
				if ip != ip.Masked() {
					t.Fatalf("accepted allowed IP %v with host bits", ip)
				}
			}
		}
	})
}

// TestParseRevoked: a revoked netmap parses with no peers, so that it can be
// stored and applied as default deny; whatever peers, filter or gossip it carries
// (even malformed) are dropped, never programmed.
func TestParseRevoked(t *testing.T) {
	tests := []struct {
		name string
		in   *segmeshv1.Netmap
		want string
	}{
		{name: "as the controller sends it", in: func() *segmeshv1.Netmap {
			nm := &segmeshv1.Netmap{PolicyRevision: 4, Self: &segmeshv1.Node{Name: "a", Addresses: []string{"100.64.0.1/32"}}, Revoked: true, KeyRotation: 2}
			nm.Hash = wire.NetmapHash(nm)
			return nm
		}()},
		{name: "with peers, filter and gossip", in: hashed(func(nm *segmeshv1.Netmap) { nm.Revoked = true; nm.KeyRotation = 2 })},
		{name: "with a malformed peer", in: hashed(func(nm *segmeshv1.Netmap) { nm.Revoked = true; nm.KeyRotation = 2; nm.Peers[0].PublicKey = []byte{1} })},
		{name: "hash still checked", in: func() *segmeshv1.Netmap {
			nm := hashed(func(nm *segmeshv1.Netmap) { nm.Revoked = true })
			nm.Revoked = false
			return nm
		}(), want: "hash mismatch"},
		{name: "self still checked", in: hashed(func(nm *segmeshv1.Netmap) { nm.Revoked = true; nm.Self.Name = "" }), want: "self: empty name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.in)
			if tt.want != "" {
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("Parse = %v, want %q", err, tt.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !got.Revoked || got.KeyRotation != 2 || len(got.Peers) != 0 || len(got.Filter.Sets) != 0 || len(got.Filter.Ingress) != 0 ||
				len(got.Filter.Egress) != 0 || got.Gossip.Enabled() || got.Self.Name != "a" {
				t.Fatalf("Parse = %+v, want revoked with no peers, empty filter, no gossip", got)
			}
		})
	}
	if nm, err := Parse(hashed(func(nm *segmeshv1.Netmap) { nm.KeyRotation = 5 })); err != nil || nm.Revoked || nm.KeyRotation != 5 {
		t.Fatalf("key rotation: %+v, %v", nm, err)
	}
}
