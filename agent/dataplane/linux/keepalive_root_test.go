package linux

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux/internal/nstest"
	"segmesh/policy"
)

// TestPeersInOneSetKeepalivesLater applies new peers with a persistent keepalive onto
// wireguard-go: one UAPI "set" adds them all, Read reports no drift while the
// keepalives are pending, and the keepalive goroutine turns them on.
func TestPeersInOneSetKeepalivesLater(t *testing.T) {
	ns := nstest.New(t)
	n := newNode(t, ns, netip.MustParseAddr("192.0.2.1"), 1)
	n.apply(t, n.state(policy.Filter{}))
	s := n.state(policy.Filter{})
	for i := range 5 {
		k, _ := wgtypes.GeneratePrivateKey()
		s.Peers = append(s.Peers, dataplane.Peer{PublicKey: dataplane.Key(k.PublicKey()),
			Endpoint:            netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i)}), 51820),
			AllowedIPs:          []netip.Prefix{netip.MustParsePrefix(fmt.Sprintf("100.64.0.%d/32", 10+i))},
			PersistentKeepalive: 25})
	}
	before := n.dp.uapiSets.Load()
	if err := n.dp.Apply(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	if sets := n.dp.uapiSets.Load() - before; sets != 1 {
		t.Errorf("Apply of 5 new peers made %d UAPI sets, want 1", sets)
	}
	checkRead(t, n.dp, s)
	eventually(t, 10*time.Second, "keepalives on", func() error {
		for _, p := range s.Peers {
			if got := n.peerInfo(t, wgtypes.Key(p.PublicKey)).PersistentKeepaliveInterval; got != 25*time.Second {
				return fmt.Errorf("peer %s: keepalive %v", wgtypes.Key(p.PublicKey), got)
			}
		}
		return nil
	})
	checkRead(t, n.dp, s)
	before = n.dp.uapiSets.Load()
	n.apply(t, s)
	if sets := n.dp.uapiSets.Load() - before; sets != 0 {
		t.Errorf("re-applying the same state made %d UAPI sets", sets)
	}
}
