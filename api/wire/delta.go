package wire

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"slices"

	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
)

// ErrDeltaBase is returned by ApplyDelta and ComposeDeltas when a delta does not
// apply to the netmap (or delta) given: the agent missed a change and needs a full
// netmap.
var ErrDeltaBase = errors.New("delta base mismatch")

// ApplyDelta returns the netmap d makes of base, with hash version 2 and Hash set
// to d.hash; base is not modified, and the result shares unchanged peers and
// rules with it. Peers come out sorted by name, sets by name, set prefixes by
// address then length (SortPrefixStrings).
//
// An upserted peer named as base's self is ignored (the controller shares one
// delta among the nodes of a group).
//
// It returns an error wrapping ErrDeltaBase when base's hash is not d.base_hash;
// an error naming the peer or set when d upserts an unnamed peer, names a peer or
// set twice, or changes a set that does not exist; and an error when the result
// does not hash to d.hash.
func ApplyDelta(base *segmeshv1.Netmap, d *segmeshv1.NetmapDelta) (*segmeshv1.Netmap, error) {
	if base.GetHash() != d.GetBaseHash() {
		return nil, fmt.Errorf("%w: delta applies to %.12s, the netmap held is %.12s", ErrDeltaBase, d.GetBaseHash(), base.GetHash())
	}
	if base.GetRevoked() {
		return nil, fmt.Errorf("%w: a revoked netmap takes no delta", ErrDeltaBase)
	}
	out := &segmeshv1.Netmap{
		PolicyRevision:  d.GetPolicyRevision(),
		Self:            base.GetSelf(),
		Gossip:          base.GetGossip(),
		OverlayPrefixes: base.GetOverlayPrefixes(),
		KeyRotation:     base.GetKeyRotation(),
		HashVersion:     HashVersion2,
		Hash:            d.GetHash(),
	}
	if h := d.GetHeader(); h != nil {
		out.Self, out.Gossip, out.OverlayPrefixes, out.KeyRotation = h.GetSelf(), h.GetGossip(), h.GetOverlayPrefixes(), h.GetKeyRotation()
	}

	peers := make(map[string]*segmeshv1.Peer, len(base.GetPeers())+len(d.GetUpsertedPeers()))
	for _, p := range base.GetPeers() {
		peers[p.GetName()] = p
	}
	touched := map[string]bool{}
	for _, name := range d.GetRemovedPeers() {
		if touched[name] {
			return nil, fmt.Errorf("delta: peer %q named twice", name)
		}
		touched[name] = true
		delete(peers, name)
	}
	for _, p := range d.GetUpsertedPeers() {
		if p.GetName() == "" {
			return nil, errors.New("delta: upserted peer without a name")
		}
		if touched[p.GetName()] {
			return nil, fmt.Errorf("delta: peer %q named twice", p.GetName())
		}
		touched[p.GetName()] = true
		if p.GetName() != out.GetSelf().GetName() {
			peers[p.GetName()] = p
		}
	}
	out.Peers = slices.SortedFunc(maps.Values(peers), func(a, b *segmeshv1.Peer) int { return cmp.Compare(a.GetName(), b.GetName()) })
	if len(out.Peers) == 0 {
		out.Peers = nil
	}

	f := base.GetFilter()
	out.Filter = &segmeshv1.Filter{Ingress: f.GetIngress(), Egress: f.GetEgress()}
	if r := d.GetRules(); r != nil {
		out.Filter.Ingress, out.Filter.Egress = r.GetIngress(), r.GetEgress()
	}
	sets := make(map[string]*segmeshv1.AddressSet, len(f.GetSets()))
	for _, s := range f.GetSets() {
		sets[s.GetName()] = s
	}
	seen := map[string]bool{}
	for _, sd := range d.GetSets() {
		name := sd.GetName()
		if seen[name] {
			return nil, fmt.Errorf("delta: set %q named twice", name)
		}
		seen[name] = true
		switch {
		case sd.GetDeleted():
			delete(sets, name)
		case sd.GetReplace():
			ps := slices.Clone(sd.GetPrefixes())
			SortPrefixStrings(ps)
			sets[name] = &segmeshv1.AddressSet{Name: name, Prefixes: ps}
		default:
			old, ok := sets[name]
			if !ok {
				return nil, fmt.Errorf("delta: set %q changes but the netmap has no such set", name)
			}
			sets[name] = &segmeshv1.AddressSet{Name: name, Prefixes: editPrefixes(old.GetPrefixes(), sd.GetAdded(), sd.GetRemoved())}
		}
	}
	out.Filter.Sets = slices.SortedFunc(maps.Values(sets), func(a, b *segmeshv1.AddressSet) int { return cmp.Compare(a.GetName(), b.GetName()) })
	if len(out.Filter.Sets) == 0 {
		out.Filter.Sets = nil
	}
	if got := NetmapHashV2(out); got != d.GetHash() {
		return nil, fmt.Errorf("delta to revision %d: the result hashes to %.12s, the delta says %.12s", d.GetPolicyRevision(), got, d.GetHash())
	}
	return out, nil
}

// editPrefixes returns ps without removed and with added, sorted.
func editPrefixes(ps, added, removed []string) []string {
	set := make(map[string]struct{}, len(ps)+len(added))
	for _, p := range ps {
		set[p] = struct{}{}
	}
	for _, p := range removed {
		delete(set, p)
	}
	for _, p := range added {
		set[p] = struct{}{}
	}
	out := slices.Collect(maps.Keys(set))
	SortPrefixStrings(out)
	return out
}

// ComposeDeltas returns one delta with the effect of a followed by b. It returns
// an error wrapping ErrDeltaBase when b does not apply to the result of a
// (b.base_hash is not a.hash). a and b are not modified.
func ComposeDeltas(a, b *segmeshv1.NetmapDelta) (*segmeshv1.NetmapDelta, error) {
	if b.GetBaseHash() != a.GetHash() {
		return nil, fmt.Errorf("%w: composing deltas: the second applies to %.12s, the first ends at %.12s", ErrDeltaBase, b.GetBaseHash(), a.GetHash())
	}
	out := &segmeshv1.NetmapDelta{
		BaseHash:       a.GetBaseHash(),
		Hash:           b.GetHash(),
		PolicyRevision: b.GetPolicyRevision(),
		Header:         cmp.Or(b.GetHeader(), a.GetHeader()),
		Rules:          cmp.Or(b.GetRules(), a.GetRules()),
	}
	upserts := map[string]*segmeshv1.Peer{}
	removes := map[string]bool{}
	for _, d := range []*segmeshv1.NetmapDelta{a, b} {
		for _, name := range d.GetRemovedPeers() {
			delete(upserts, name)
			removes[name] = true
		}
		for _, p := range d.GetUpsertedPeers() {
			delete(removes, p.GetName())
			upserts[p.GetName()] = p
		}
	}
	out.UpsertedPeers = slices.SortedFunc(maps.Values(upserts), func(x, y *segmeshv1.Peer) int { return cmp.Compare(x.GetName(), y.GetName()) })
	out.RemovedPeers = slices.Sorted(maps.Keys(removes))

	type setState struct {
		replace, deleted bool
		prefixes         map[string]struct{} // replace: the whole set
		added, removed   map[string]struct{}
	}
	states := map[string]*setState{}
	for _, d := range []*segmeshv1.NetmapDelta{a, b} {
		for _, sd := range d.GetSets() {
			st := states[sd.GetName()]
			if st == nil {
				st = &setState{added: map[string]struct{}{}, removed: map[string]struct{}{}}
				states[sd.GetName()] = st
			}
			switch {
			case sd.GetDeleted():
				*st = setState{deleted: true}
			case sd.GetReplace():
				*st = setState{replace: true, prefixes: make(map[string]struct{}, len(sd.GetPrefixes()))}
				for _, p := range sd.GetPrefixes() {
					st.prefixes[p] = struct{}{}
				}
			case st.deleted:
				return nil, fmt.Errorf("composing deltas: set %q changes after it was deleted", sd.GetName())
			case st.replace:
				for _, p := range sd.GetRemoved() {
					delete(st.prefixes, p)
				}
				for _, p := range sd.GetAdded() {
					st.prefixes[p] = struct{}{}
				}
			default:
				for _, p := range sd.GetRemoved() {
					delete(st.added, p)
					st.removed[p] = struct{}{}
				}
				for _, p := range sd.GetAdded() {
					delete(st.removed, p)
					st.added[p] = struct{}{}
				}
			}
		}
	}
	for _, name := range slices.Sorted(maps.Keys(states)) {
		st := states[name]
		sd := &segmeshv1.AddressSetDelta{Name: name, Replace: st.replace, Deleted: st.deleted}
		switch {
		case st.replace:
			sd.Prefixes = slices.Collect(maps.Keys(st.prefixes))
			SortPrefixStrings(sd.Prefixes)
		case !st.deleted:
			if len(st.added) == 0 && len(st.removed) == 0 {
				continue
			}
			sd.Added = slices.Collect(maps.Keys(st.added))
			sd.Removed = slices.Collect(maps.Keys(st.removed))
			SortPrefixStrings(sd.Added)
			SortPrefixStrings(sd.Removed)
		}
		out.Sets = append(out.Sets, sd)
	}
	return out, nil
}

// DiffNetmaps returns the delta that turns a into b (both hash version 2, with
// Hash set): the header when it differs, peers upserted when new or changed and
// removed when gone, per set the elements added and removed (a new set whole),
// and the rules when they differ. It costs time linear in the size of a and b.
func DiffNetmaps(a, b *segmeshv1.Netmap) *segmeshv1.NetmapDelta {
	d := &segmeshv1.NetmapDelta{BaseHash: a.GetHash(), Hash: b.GetHash(), PolicyRevision: b.GetPolicyRevision()}
	ha := &segmeshv1.NetmapHeader{Self: a.GetSelf(), Gossip: a.GetGossip(), OverlayPrefixes: a.GetOverlayPrefixes(), KeyRotation: a.GetKeyRotation()}
	hb := &segmeshv1.NetmapHeader{Self: b.GetSelf(), Gossip: b.GetGossip(), OverlayPrefixes: b.GetOverlayPrefixes(), KeyRotation: b.GetKeyRotation()}
	if !proto.Equal(ha, hb) {
		d.Header = hb
	}
	old := make(map[string]*segmeshv1.Peer, len(a.GetPeers()))
	for _, p := range a.GetPeers() {
		old[p.GetName()] = p
	}
	for _, p := range b.GetPeers() {
		if o, ok := old[p.GetName()]; !ok || (o != p && !proto.Equal(o, p)) {
			d.UpsertedPeers = append(d.UpsertedPeers, p)
		}
		delete(old, p.GetName())
	}
	d.RemovedPeers = slices.Sorted(maps.Keys(old))

	fa, fb := a.GetFilter(), b.GetFilter()
	if !proto.Equal(&segmeshv1.FilterRules{Ingress: fa.GetIngress(), Egress: fa.GetEgress()}, &segmeshv1.FilterRules{Ingress: fb.GetIngress(), Egress: fb.GetEgress()}) {
		d.Rules = &segmeshv1.FilterRules{Ingress: fb.GetIngress(), Egress: fb.GetEgress()}
	}
	oldSets := make(map[string]*segmeshv1.AddressSet, len(fa.GetSets()))
	for _, s := range fa.GetSets() {
		oldSets[s.GetName()] = s
	}
	for _, s := range fb.GetSets() {
		o, ok := oldSets[s.GetName()]
		delete(oldSets, s.GetName())
		if !ok {
			d.Sets = append(d.Sets, &segmeshv1.AddressSetDelta{Name: s.GetName(), Replace: true, Prefixes: s.GetPrefixes()})
			continue
		}
		if sd := DiffSet(s.GetName(), o.GetPrefixes(), s.GetPrefixes()); sd != nil {
			d.Sets = append(d.Sets, sd)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(oldSets)) {
		d.Sets = append(d.Sets, &segmeshv1.AddressSetDelta{Name: name, Deleted: true})
	}
	return d
}

// DiffSet returns the change from prefixes a to b of set name, or nil when they
// hold the same prefixes.
func DiffSet(name string, a, b []string) *segmeshv1.AddressSetDelta {
	inA := make(map[string]bool, len(a))
	for _, p := range a {
		inA[p] = true
	}
	sd := &segmeshv1.AddressSetDelta{Name: name}
	for _, p := range b {
		if inA[p] {
			delete(inA, p)
			continue
		}
		sd.Added = append(sd.Added, p)
	}
	for _, p := range a {
		if inA[p] {
			sd.Removed = append(sd.Removed, p)
		}
	}
	if len(sd.Added) == 0 && len(sd.Removed) == 0 {
		return nil
	}
	return sd
}
