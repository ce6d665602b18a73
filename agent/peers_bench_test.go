package agent

import (
	"fmt"
	"testing"
	"time"

	"segmesh/agent/dataplane"
	"segmesh/agent/netmap"
)

// BenchmarkPeerTable1000 measures what the peers cost an agent with 1,000
// peers: recording a read-back (every resync and watch event) and building the
// peers of a report (every report sent).
func BenchmarkPeerTable1000(b *testing.B) {
	const n = 1000
	now := time.Now()
	nm := &netmap.Netmap{}
	o := dataplane.Observed{PeerStats: map[dataplane.Key]dataplane.PeerStats{}}
	for i := range n {
		var k dataplane.Key
		k[0], k[1] = byte(i>>8), byte(i)
		nm.Peers = append(nm.Peers, netmap.Peer{Name: fmt.Sprintf("node-%04d", i), PublicKey: k})
		o.State.Peers = append(o.State.Peers, dataplane.Peer{PublicKey: k})
		if i%3 != 0 {
			o.PeerStats[k] = dataplane.PeerStats{LastHandshake: now.Add(-time.Duration(i) * time.Second), RxBytes: uint64(i)}
		}
	}
	var pt peerTable
	pt.set(o)
	pt.report(nm, now) // names cached for the netmap
	b.Run("set", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			pt.set(o)
		}
	})
	b.Run("report", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			pt.set(o)
			pt.report(nm, now)
		}
	})
}
