package dataplane

import (
	"encoding/base64"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Parts of the dataplane a Difference names.
const (
	PartInterface = "interface"
	PartWireGuard = "wireguard"
	PartPeer      = "peer"
	PartAddress   = "address"
	PartRoute     = "route"
	PartNftables  = "nftables"
)

// Difference is one way the kernel differs from the desired state.
type Difference struct {
	// Part is one of PartInterface, PartWireGuard, PartPeer, PartAddress, PartRoute,
	// PartNftables.
	Part string
	// Detail says what differs, e.g. "missing [100.64.0.1/32]" or
	// "peer AbC…=: endpoint 192.0.2.1:51820, want 192.0.2.9:51820".
	Detail string
}

// String returns "part: detail".
func (d Difference) String() string { return d.Part + ": " + d.Detail }

// Observed is the result of Dataplane.Read.
type Observed struct {
	// State is what the kernel holds, in canonical form.
	State State
	// Firewall reports whether the nftables table exists (State.Filter is empty both
	// when the table is missing and when it holds default deny).
	Firewall bool
	// Drift lists how the kernel differs from the state the last successful Apply
	// made it hold; it is empty when the kernel still holds it, and nil before any
	// Apply of this Dataplane.
	Drift []Difference
	// PeerStats holds, per peer of State.Peers, what the WireGuard device counts
	// for it, as of the read of the device; nil when the implementation does not
	// know.
	PeerStats map[Key]PeerStats
}

// PeerStats is what a WireGuard device counts for one peer.
type PeerStats struct {
	// LastHandshake is the time of the latest handshake; zero when none yet.
	LastHandshake time.Time
	// RxBytes and TxBytes count the bytes received from and sent to the peer
	// since the device learned it.
	RxBytes, TxBytes uint64
}

// Diff lists how observed differs from desired, one Difference per item, in a fixed
// order (interface, WireGuard, addresses, routes, peers by key, nftables). A peer
// whose desired endpoint is unknown (zero) may hold any endpoint: the kernel learns
// it from the peer's handshake. The private key is compared but never printed.
func Diff(desired, observed State) []Difference {
	d := Canonical(desired)
	o := Canonical(observed)
	var out []Difference
	add := func(part, format string, args ...any) {
		out = append(out, Difference{Part: part, Detail: fmt.Sprintf(format, args...)})
	}
	if d.Interface != o.Interface {
		add(PartInterface, "name %q, want %q", o.Interface, d.Interface)
	}
	if d.MTU != o.MTU {
		add(PartInterface, "MTU %d, want %d", o.MTU, d.MTU)
	}
	if d.PrivateKey != o.PrivateKey {
		add(PartWireGuard, "private key differs")
	}
	if d.ListenPort != o.ListenPort {
		add(PartWireGuard, "listen port %d, want %d", o.ListenPort, d.ListenPort)
	}
	prefixDiff(func(f string, a ...any) { add(PartAddress, f, a...) }, "", d.Addresses, o.Addresses)
	prefixDiff(func(f string, a ...any) { add(PartRoute, f, a...) }, "", d.Routes, o.Routes)
	peer := func(f string, a ...any) { add(PartPeer, f, a...) }
	have := make(map[Key]Peer, len(o.Peers))
	for _, p := range o.Peers {
		have[p.PublicKey] = p
	}
	for _, dp := range d.Peers {
		op, ok := have[dp.PublicKey]
		name := KeyString(dp.PublicKey)
		if !ok {
			peer("%s missing", name)
			continue
		}
		delete(have, dp.PublicKey)
		if dp.Endpoint.IsValid() && dp.Endpoint != op.Endpoint {
			peer("%s"+endpointDetail+"%v, want %v", name, op.Endpoint, dp.Endpoint)
		}
		prefixDiff(peer, name+": allowed IPs ", dp.AllowedIPs, op.AllowedIPs)
		if dp.PersistentKeepalive != op.PersistentKeepalive {
			peer("%s: persistent keepalive %d s, want %d s", name, op.PersistentKeepalive, dp.PersistentKeepalive)
		}
	}
	for _, op := range o.Peers {
		if _, ok := have[op.PublicKey]; ok {
			peer("unexpected %s (allowed IPs %v)", KeyString(op.PublicKey), op.AllowedIPs)
		}
	}
	if !filterEqual(d.Filter, o.Filter) {
		for _, s := range filterDiff(d.Filter, o.Filter) {
			add(PartNftables, "%s", s)
		}
	}
	return out
}

// endpointDetail follows the peer's key in the Detail of an endpoint difference.
const endpointDetail = ": endpoint "

// EndpointDifferenceKey returns the peer whose endpoint d says differs ("KEY:
// endpoint HAVE, want WANT", as Diff writes it), and false when d is another
// difference.
func EndpointDifferenceKey(d Difference) (Key, bool) {
	var k Key
	if d.Part != PartPeer {
		return k, false
	}
	name, _, ok := strings.Cut(d.Detail, endpointDetail)
	if !ok {
		return k, false
	}
	b, err := base64.StdEncoding.DecodeString(name)
	if err != nil || len(b) != len(k) {
		return k, false
	}
	copy(k[:], b)
	return k, true
}

// Equal reports whether a and b, both canonical (see Canonical), describe the same
// dataplane, endpoints included.
func Equal(a, b State) bool {
	return a.Interface == b.Interface && a.PrivateKey == b.PrivateKey && a.ListenPort == b.ListenPort && a.MTU == b.MTU &&
		slices.Equal(a.Addresses, b.Addresses) && slices.Equal(a.Routes, b.Routes) &&
		slices.EqualFunc(a.Peers, b.Peers, func(x, y Peer) bool {
			return x.PublicKey == y.PublicKey && x.Endpoint == y.Endpoint && x.PersistentKeepalive == y.PersistentKeepalive &&
				slices.Equal(x.AllowedIPs, y.AllowedIPs)
		}) && filterEqual(a.Filter, b.Filter)
}

// KeyString returns k in WireGuard's base64 form.
func KeyString(k Key) string { return base64.StdEncoding.EncodeToString(k[:]) }

// prefixDiff reports the prefixes missing from have and the unexpected ones in it
// (both lists canonical).
func prefixDiff(add func(string, ...any), what string, want, have []netip.Prefix) {
	in := func(ps []netip.Prefix, p netip.Prefix) bool {
		_, ok := slices.BinarySearchFunc(ps, p, comparePrefix)
		return ok
	}
	var missing, extra []netip.Prefix
	for _, p := range want {
		if !in(have, p) {
			missing = append(missing, p)
		}
	}
	for _, p := range have {
		if !in(want, p) {
			extra = append(extra, p)
		}
	}
	if len(missing) > 0 {
		add("%smissing %v", what, missing)
	}
	if len(extra) > 0 {
		add("%sunexpected %v", what, extra)
	}
}

// filterDiff names the sets and rule lists that differ.
func filterDiff(want, have Filter) []string {
	var out []string
	sets := map[string]bool{}
	for _, s := range want.Sets {
		sets[s.Name] = true
	}
	for _, s := range have.Sets {
		sets[s.Name] = true
	}
	find := func(ss []AddressSet, name string) (AddressSet, bool) {
		i := slices.IndexFunc(ss, func(s AddressSet) bool { return s.Name == name })
		if i < 0 {
			return AddressSet{}, false
		}
		return ss[i], true
	}
	for _, name := range slices.Sorted(maps.Keys(sets)) {
		w, wok := find(want.Sets, name)
		h, hok := find(have.Sets, name)
		switch {
		case !hok:
			out = append(out, fmt.Sprintf("set %s missing", name))
		case !wok:
			out = append(out, fmt.Sprintf("unexpected set %s", name))
		case !slices.Equal(w.Prefixes, h.Prefixes):
			prefixDiff(func(f string, a ...any) { out = append(out, fmt.Sprintf(f, a...)) },
				"set "+name+": ", w.Prefixes, h.Prefixes)
		}
	}
	for _, dir := range []struct {
		name       string
		want, have []FilterRule
	}{{"ingress", want.Ingress, have.Ingress}, {"egress", want.Egress, have.Egress}} {
		if !slices.EqualFunc(dir.want, dir.have, ruleEqual) {
			out = append(out, fmt.Sprintf("%s rules %s, want %s", dir.name, ruleList(dir.have), ruleList(dir.want)))
		}
	}
	return out
}

func ruleList(rs []FilterRule) string {
	if len(rs) == 0 {
		return "[]"
	}
	var parts []string
	for _, r := range rs {
		var ms []string
		for _, m := range r.Matches {
			if len(m.Ports) == 0 {
				ms = append(ms, string(m.Protocol))
			}
			for _, p := range m.Ports {
				if p.First == p.Last {
					ms = append(ms, fmt.Sprintf("%s/%d", m.Protocol, p.First))
				} else {
					ms = append(ms, fmt.Sprintf("%s/%d-%d", m.Protocol, p.First, p.Last))
				}
			}
		}
		parts = append(parts, fmt.Sprintf("%s %s (%s)", r.Set, strings.Join(ms, ","), r.Origin))
	}
	return "[" + strings.Join(parts, "; ") + "]"
}

// filterEqual reports whether two canonical filters are equal.
func filterEqual(a, b Filter) bool {
	return slices.EqualFunc(a.Sets, b.Sets, func(x, y AddressSet) bool {
		return x.Name == y.Name && slices.Equal(x.Prefixes, y.Prefixes)
	}) && slices.EqualFunc(a.Ingress, b.Ingress, ruleEqual) && slices.EqualFunc(a.Egress, b.Egress, ruleEqual)
}

func ruleEqual(x, y FilterRule) bool {
	return x.Set == y.Set && x.Origin == y.Origin && slices.EqualFunc(x.Matches, y.Matches, func(m, n PortMatch) bool {
		return m.Protocol == n.Protocol && slices.Equal(m.Ports, n.Ports)
	})
}
