package wire

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/bits"
	"net/netip"
	"slices"

	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
)

// HashVersion2 is the Netmap.hash_version of NetmapHashV2.
const HashVersion2 = 2

// Digest is a SHA-256 digest.
type Digest [32]byte

// Sum is a multiset hash: the sum modulo 2^256 of the digests of its elements,
// read as big-endian integers (AdHash, from M. Bellare and D. Micciancio, "A New
// Paradigm for Collision-free Hashing: Incrementality at Reduced Cost",
// EUROCRYPT 1997). Adding or removing one element costs one addition, whatever
// the size, and the order of elements does not matter.
//
// Sum detects that an agent's netmap diverged from the controller's; it is not a
// security boundary (the stream is mutually authenticated TLS, and the
// controller is trusted for the netmap anyway), so the 256-bit modulus suffices.
type Sum [32]byte

// Add returns s with d added.
func (s Sum) Add(d Digest) Sum {
	var out Sum
	var carry uint64
	for i := 3; i >= 0; i-- {
		a := binary.BigEndian.Uint64(s[i*8:])
		b := binary.BigEndian.Uint64(d[i*8:])
		var r uint64
		r, carry = bits.Add64(a, b, carry)
		binary.BigEndian.PutUint64(out[i*8:], r)
	}
	return out
}

// Sub returns s with d taken away (the inverse of Add).
func (s Sum) Sub(d Digest) Sum {
	var out Sum
	var borrow uint64
	for i := 3; i >= 0; i-- {
		a := binary.BigEndian.Uint64(s[i*8:])
		b := binary.BigEndian.Uint64(d[i*8:])
		var r uint64
		r, borrow = bits.Sub64(a, b, borrow)
		binary.BigEndian.PutUint64(out[i*8:], r)
	}
	return out
}

var deterministic = proto.MarshalOptions{Deterministic: true}

func digestOf(domain string, m proto.Message) Digest {
	b, err := deterministic.Marshal(m)
	if err != nil {
		// Marshal of a well-formed message cannot fail; a failure is a programming error.
		panic(fmt.Sprintf("wire: marshal %T: %v", m, err))
	}
	h := sha256.New()
	h.Write([]byte(domain))
	h.Write(b)
	var d Digest
	h.Sum(d[:0])
	return d
}

// PeerDigest is the digest of one peer entry: SHA-256 of "peer\x00" and its
// deterministic protobuf encoding.
func PeerDigest(p *segmeshv1.Peer) Digest { return digestOf("peer\x00", p) }

// PrefixDigest is the digest of one set element: SHA-256 of "prefix\x00" and the
// prefix as written by netip.Prefix.String.
func PrefixDigest(prefix string) Digest {
	h := sha256.New()
	h.Write([]byte("prefix\x00"))
	h.Write([]byte(prefix))
	var d Digest
	h.Sum(d[:0])
	return d
}

// HeaderDigest is the digest of every field of nm but peers, filter and hash:
// SHA-256 of "header\x00" and their deterministic protobuf encoding.
func HeaderDigest(nm *segmeshv1.Netmap) Digest {
	return digestOf("header\x00", &segmeshv1.Netmap{
		PolicyRevision:  nm.GetPolicyRevision(),
		Self:            nm.GetSelf(),
		Gossip:          nm.GetGossip(),
		OverlayPrefixes: nm.GetOverlayPrefixes(),
		Revoked:         nm.GetRevoked(),
		KeyRotation:     nm.GetKeyRotation(),
		HashVersion:     nm.GetHashVersion(),
	})
}

// RulesDigest is the digest of a filter's rules, without its sets: SHA-256 of
// "rules\x00" and the deterministic encoding of FilterRules{ingress, egress}.
func RulesDigest(ingress, egress []*segmeshv1.FilterRule) Digest {
	return digestOf("rules\x00", &segmeshv1.FilterRules{Ingress: ingress, Egress: egress})
}

// SetSum is one address set of a filter for FilterDigest: its name and the Sum of
// the PrefixDigest of its prefixes.
type SetSum struct {
	Name string
	Sum  Sum
}

// FilterDigest is the digest of a filter: SHA-256 of "filter\x00", the rules
// digest and, for each set in name order (names unique), the length of its name
// as a uvarint, the name and its Sum. sets must be sorted by name.
func FilterDigest(rules Digest, sets []SetSum) Digest {
	h := sha256.New()
	h.Write([]byte("filter\x00"))
	h.Write(rules[:])
	var n [binary.MaxVarintLen64]byte
	for _, s := range sets {
		h.Write(n[:binary.PutUvarint(n[:], uint64(len(s.Name)))])
		h.Write([]byte(s.Name))
		h.Write(s.Sum[:])
	}
	var d Digest
	h.Sum(d[:0])
	return d
}

// ComposeHash is the version 2 netmap hash from its parts: hex SHA-256 of
// "segmesh netmap v2\x00", the header digest, the Sum of the peers' PeerDigest
// and the filter digest.
func ComposeHash(header Digest, peers Sum, filter Digest) string {
	h := sha256.New()
	h.Write([]byte("segmesh netmap v2\x00"))
	h.Write(header[:])
	h.Write(peers[:])
	h.Write(filter[:])
	return hex.EncodeToString(h.Sum(nil))
}

// SetSumOf returns the Sum of the PrefixDigest of prefixes.
func SetSumOf(prefixes []string) Sum {
	var s Sum
	for _, p := range prefixes {
		s = s.Add(PrefixDigest(p))
	}
	return s
}

// NetmapHashV2 computes the version 2 hash of nm from scratch (ComposeHash of its
// parts). Peers and set prefixes count as sets: their order does not matter.
// nm is not modified; its Hash field is ignored.
func NetmapHashV2(nm *segmeshv1.Netmap) string {
	var peers Sum
	for _, p := range nm.GetPeers() {
		peers = peers.Add(PeerDigest(p))
	}
	return ComposeHash(HeaderDigest(nm), peers, filterDigestOf(nm.GetFilter()))
}

func filterDigestOf(f *segmeshv1.Filter) Digest {
	sets := make([]SetSum, 0, len(f.GetSets()))
	for _, s := range f.GetSets() {
		sets = append(sets, SetSum{Name: s.GetName(), Sum: SetSumOf(s.GetPrefixes())})
	}
	slices.SortFunc(sets, func(a, b SetSum) int { return cmp.Compare(a.Name, b.Name) })
	return FilterDigest(RulesDigest(f.GetIngress(), f.GetEgress()), sets)
}

// HashOf returns the hash of nm in the version its hash_version names: 0 for
// NetmapHash, 2 for NetmapHashV2. It returns an error for another version.
func HashOf(nm *segmeshv1.Netmap) (string, error) {
	switch nm.GetHashVersion() {
	case 0:
		return NetmapHash(nm), nil
	case HashVersion2:
		return NetmapHashV2(nm), nil
	}
	return "", fmt.Errorf("unknown hash version %d", nm.GetHashVersion())
}

// SortPrefixStrings sorts prefixes (netip.Prefix.String form) by address, then
// length, the order the controller lists set elements in; strings that do not
// parse sort last, in string order.
func SortPrefixStrings(ps []string) {
	type kv struct {
		s  string
		p  netip.Prefix
		ok bool
	}
	tmp := make([]kv, len(ps))
	for i, s := range ps {
		p, err := netip.ParsePrefix(s)
		tmp[i] = kv{s, p, err == nil}
	}
	slices.SortFunc(tmp, func(a, b kv) int {
		switch {
		case a.ok && b.ok:
			return cmp.Or(a.p.Addr().Compare(b.p.Addr()), cmp.Compare(a.p.Bits(), b.p.Bits()))
		case a.ok != b.ok:
			if a.ok {
				return -1
			}
			return 1
		}
		return cmp.Compare(a.s, b.s)
	})
	for i := range tmp {
		ps[i] = tmp[i].s
	}
}
