package agent

import (
	"cmp"
	"net/netip"
	"slices"
	"sync"
	"time"

	"segmesh/agent/dataplane"
	"segmesh/agent/netmap"
	"segmesh/agent/path"
	"segmesh/api/segmeshv1"
)

// Bounds of the peers a report carries (ReportRequest.peers): at most
// maxReportedPeers, those without a handshake in the last peerStale first.
const (
	maxReportedPeers = 64
	peerStale        = 3 * time.Minute
)

// peerTable holds the WireGuard peers of the reconciler's latest read-back of the
// dataplane (endpoint, latest handshake, byte counters), for the reports and the
// metrics. set copies into a buffer it keeps, so that a read-back of 1,000 peers
// costs no allocation per peer; a report sorts that buffer in place and builds
// at most maxReportedPeers messages. Safe for concurrent use.
type peerTable struct {
	mu    sync.Mutex
	read  bool // set was called
	peers []observedPeer
	// names holds the peer names of netmap namesOf by public key; it is rebuilt
	// when the netmap in force changes.
	namesOf *netmap.Netmap
	names   map[dataplane.Key]string
	// paths, when set, returns the path chosen for every peer (agent/path).
	paths func() map[dataplane.Key]path.Path
}

// observedPeer is one peer of a read-back.
type observedPeer struct {
	key      dataplane.Key
	endpoint netip.AddrPort
	stats    dataplane.PeerStats
	name     string // from the netmap; set by nameLocked
}

// set records the peers of a read-back (o.State.Peers, with o.PeerStats).
func (t *peerTable) set(o dataplane.Observed) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.read = true
	t.peers = t.peers[:0]
	for _, p := range o.State.Peers {
		t.peers = append(t.peers, observedPeer{key: p.PublicKey, endpoint: p.Endpoint, stats: o.PeerStats[p.PublicKey]})
	}
}

// nameLocked fills the name of every peer from nm ("" for a key nm does not
// list; nm nil: default deny). t.mu must be held.
func (t *peerTable) nameLocked(nm *netmap.Netmap) {
	if nm != t.namesOf || t.names == nil {
		t.namesOf = nm
		t.names = map[dataplane.Key]string{}
		if nm != nil {
			for _, p := range nm.Peers {
				t.names[p.PublicKey] = p.Name
			}
		}
	}
	for i := range t.peers {
		t.peers[i].name = t.names[t.peers[i].key]
	}
}

// visit calls f with every peer of the latest read-back, named from nm, and
// returns whether there was a read-back. f must not keep p beyond the call.
func (t *peerTable) visit(nm *netmap.Netmap, f func(p *observedPeer)) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.nameLocked(nm)
	for i := range t.peers {
		f(&t.peers[i])
	}
	return t.read
}

// report returns the peers of the latest read-back as a report carries them: at
// most maxReportedPeers, those without a handshake since now-peerStale first,
// then by name (then key), named from nm; and how many were left out.
func (t *peerTable) report(nm *netmap.Netmap, now time.Time) ([]*segmeshv1.PeerStatus, uint32) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.nameLocked(nm)
	stale := func(p *observedPeer) bool {
		return p.stats.LastHandshake.IsZero() || now.Sub(p.stats.LastHandshake) >= peerStale
	}
	slices.SortFunc(t.peers, func(a, b observedPeer) int {
		sa, sb := stale(&a), stale(&b)
		if sa != sb {
			if sa {
				return -1
			}
			return 1
		}
		return cmp.Or(cmp.Compare(a.name, b.name), slices.Compare(a.key[:], b.key[:]))
	})
	n := min(len(t.peers), maxReportedPeers)
	if n == 0 {
		return nil, 0
	}
	var paths map[dataplane.Key]path.Path
	if t.paths != nil {
		paths = t.paths()
	}
	out := make([]*segmeshv1.PeerStatus, n)
	for i, p := range t.peers[:n] {
		ps := &segmeshv1.PeerStatus{Name: p.name, PublicKey: dataplane.KeyString(p.key), RxBytes: p.stats.RxBytes, TxBytes: p.stats.TxBytes}
		if p.endpoint.IsValid() {
			ps.Endpoint = p.endpoint.String()
		}
		if !p.stats.LastHandshake.IsZero() {
			ps.LastHandshakeUnix = p.stats.LastHandshake.Unix()
		}
		if pa, ok := paths[p.key]; ok && pa.Endpoint == p.endpoint {
			ps.Path, ps.Relay = pa.Kind, pa.Relay
		}
		out[i] = ps
	}
	return out, uint32(len(t.peers) - n)
}
