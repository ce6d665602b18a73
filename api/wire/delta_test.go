package wire

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"
	"pgregory.net/rapid"

	"segmesh/api/segmeshv1"
)

// genNetmap draws a small version 2 netmap for node "self" from a universe of
// 6 peers, 3 sets and 8 prefixes, with Hash set.
func genNetmap(t *rapid.T, label string) *segmeshv1.Netmap {
	nm := &segmeshv1.Netmap{
		PolicyRevision: rapid.Uint64Range(1, 5).Draw(t, label+" revision"),
		Self:           &segmeshv1.Node{Name: "self", Endpoint: rapid.SampledFrom([]string{"", "192.0.2.1:51820", "192.0.2.2:51820"}).Draw(t, label+" endpoint")},
		KeyRotation:    rapid.Uint64Range(0, 2).Draw(t, label+" rotation"),
		HashVersion:    HashVersion2,
	}
	if rapid.Bool().Draw(t, label+" gossip") {
		nm.Gossip = &segmeshv1.GossipConfig{Key: []byte("0123456789abcdef0123456789abcdef"), Port: 7946}
	}
	for i := range 6 {
		if rapid.Bool().Draw(t, fmt.Sprintf("%s peer %d", label, i)) {
			nm.Peers = append(nm.Peers, &segmeshv1.Peer{
				Name:       fmt.Sprintf("n%d", i),
				PublicKey:  []byte{byte(i)},
				Endpoint:   rapid.SampledFrom([]string{"", "198.51.100.1:1"}).Draw(t, fmt.Sprintf("%s peer %d endpoint", label, i)),
				AllowedIps: []string{fmt.Sprintf("100.64.0.%d/32", i+1)},
			})
		}
	}
	nm.Filter = &segmeshv1.Filter{}
	for i := range 3 {
		if !rapid.Bool().Draw(t, fmt.Sprintf("%s set %d", label, i)) {
			continue
		}
		s := &segmeshv1.AddressSet{Name: fmt.Sprintf("s%d", i)}
		for j := range 8 {
			if rapid.Bool().Draw(t, fmt.Sprintf("%s set %d prefix %d", label, i, j)) {
				s.Prefixes = append(s.Prefixes, fmt.Sprintf("10.0.%d.0/24", j))
			}
		}
		nm.Filter.Sets = append(nm.Filter.Sets, s)
		if rapid.Bool().Draw(t, fmt.Sprintf("%s rule %d", label, i)) {
			nm.Filter.Ingress = append(nm.Filter.Ingress, &segmeshv1.FilterRule{Set: s.Name, Origin: label})
		}
	}
	nm.Hash = NetmapHashV2(nm)
	return nm
}

// TestDeltaAlgebra checks on random netmaps a, b, c that ApplyDelta(a,
// DiffNetmaps(a, b)) is b, that a composed delta has the effect of its parts,
// and that the hash does not depend on the order of peers or set elements.
func TestDeltaAlgebra(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		a, b, c := genNetmap(t, "a"), genNetmap(t, "b"), genNetmap(t, "c")
		ab, bc := DiffNetmaps(a, b), DiffNetmaps(b, c)
		got, err := ApplyDelta(a, ab)
		if err != nil {
			t.Fatalf("ApplyDelta(a, a->b): %v", err)
		}
		if !proto.Equal(got, b) {
			t.Fatalf("ApplyDelta(a, a->b) =\n%v\nwant\n%v", got, b)
		}
		ac, err := ComposeDeltas(ab, bc)
		if err != nil {
			t.Fatalf("ComposeDeltas: %v", err)
		}
		got, err = ApplyDelta(a, ac)
		if err != nil {
			t.Fatalf("ApplyDelta(a, compose(a->b, b->c)): %v", err)
		}
		if !proto.Equal(got, c) {
			t.Fatalf("ApplyDelta(a, compose) =\n%v\nwant\n%v", got, c)
		}
		if _, err := ApplyDelta(b, ab); a.GetHash() != b.GetHash() && !errors.Is(err, ErrDeltaBase) {
			t.Fatalf("ApplyDelta on the wrong base: err = %v, want ErrDeltaBase", err)
		}
		if _, err := ComposeDeltas(bc, ab); a.GetHash() != c.GetHash() && !errors.Is(err, ErrDeltaBase) {
			t.Fatalf("ComposeDeltas out of order: err = %v, want ErrDeltaBase", err)
		}
		shuffled := proto.Clone(c).(*segmeshv1.Netmap)
		slices.Reverse(shuffled.Peers)
		for _, s := range shuffled.GetFilter().GetSets() {
			slices.Reverse(s.Prefixes)
		}
		if NetmapHashV2(shuffled) != c.GetHash() {
			t.Fatal("the hash depends on the order of peers or set elements")
		}
	})
}

// TestHashV2Covers checks that a change to any part of a netmap changes its hash.
func TestHashV2Covers(t *testing.T) {
	base := &segmeshv1.Netmap{
		PolicyRevision: 3, HashVersion: HashVersion2,
		Self:   &segmeshv1.Node{Name: "a", Endpoint: "192.0.2.1:1"},
		Gossip: &segmeshv1.GossipConfig{Key: []byte("k"), Port: 1},
		Peers:  []*segmeshv1.Peer{{Name: "b", PublicKey: []byte{1}, AllowedIps: []string{"100.64.0.2/32"}}},
		Filter: &segmeshv1.Filter{
			Sets:    []*segmeshv1.AddressSet{{Name: "s", Prefixes: []string{"100.64.0.2/32"}}},
			Ingress: []*segmeshv1.FilterRule{{Set: "s"}},
		},
	}
	h := NetmapHashV2(base)
	for name, edit := range map[string]func(nm *segmeshv1.Netmap){
		"revision":   func(nm *segmeshv1.Netmap) { nm.PolicyRevision++ },
		"self":       func(nm *segmeshv1.Netmap) { nm.Self.Endpoint = "192.0.2.9:1" },
		"gossip":     func(nm *segmeshv1.Netmap) { nm.Gossip = nil },
		"rotation":   func(nm *segmeshv1.Netmap) { nm.KeyRotation = 1 },
		"revoked":    func(nm *segmeshv1.Netmap) { nm.Revoked = true },
		"peer":       func(nm *segmeshv1.Netmap) { nm.Peers[0].Endpoint = "192.0.2.3:1" },
		"no peer":    func(nm *segmeshv1.Netmap) { nm.Peers = nil },
		"set":        func(nm *segmeshv1.Netmap) { nm.Filter.Sets[0].Prefixes = nil },
		"set name":   func(nm *segmeshv1.Netmap) { nm.Filter.Sets[0].Name = "t"; nm.Filter.Ingress[0].Set = "t" },
		"rule":       func(nm *segmeshv1.Netmap) { nm.Filter.Ingress[0].Origin = "x" },
		"egress":     func(nm *segmeshv1.Netmap) { nm.Filter.Egress, nm.Filter.Ingress = nm.Filter.Ingress, nil },
		"v1 version": func(nm *segmeshv1.Netmap) { nm.HashVersion = 0 },
	} {
		nm := proto.Clone(base).(*segmeshv1.Netmap)
		edit(nm)
		if NetmapHashV2(nm) == h {
			t.Errorf("%s: the hash did not change", name)
		}
	}
}

func TestSumAddSub(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		var s Sum
		copy(s[:], rapid.SliceOfN(rapid.Byte(), 32, 32).Draw(t, "s"))
		var d Digest
		copy(d[:], rapid.SliceOfN(rapid.Byte(), 32, 32).Draw(t, "d"))
		if s.Add(d).Sub(d) != s {
			t.Fatal("Sub does not undo Add")
		}
		var e Digest
		copy(e[:], rapid.SliceOfN(rapid.Byte(), 32, 32).Draw(t, "e"))
		if s.Add(d).Add(e) != s.Add(e).Add(d) {
			t.Fatal("Add is not commutative")
		}
	})
}

// TestApplyDeltaIgnoresSelf checks that an upserted peer named as the node itself
// (a delta shared by a group) does not become a peer.
func TestApplyDeltaIgnoresSelf(t *testing.T) {
	base := &segmeshv1.Netmap{Self: &segmeshv1.Node{Name: "a"}, HashVersion: HashVersion2, Filter: &segmeshv1.Filter{}}
	base.Hash = NetmapHashV2(base)
	want := proto.Clone(base).(*segmeshv1.Netmap)
	want.Peers = []*segmeshv1.Peer{{Name: "b", PublicKey: []byte{2}}}
	want.Hash = NetmapHashV2(want)
	d := &segmeshv1.NetmapDelta{BaseHash: base.Hash, Hash: want.Hash,
		UpsertedPeers: []*segmeshv1.Peer{{Name: "a", PublicKey: []byte{1}}, {Name: "b", PublicKey: []byte{2}}}}
	got, err := ApplyDelta(base, d)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}
