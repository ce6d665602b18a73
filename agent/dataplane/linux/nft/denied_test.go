package nft

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux/internal/nstest"
	"segmesh/agent/firewall"
	"segmesh/policy"
)

// Addresses of the veth pair of deniedPair: the Firewall's side smdp0, the peer's side.
var (
	localAddr = netip.MustParseAddr("100.64.0.1")
	peerAddr  = netip.MustParseAddr("100.64.0.2")
)

// deniedPair returns a Firewall at default deny on overlay interface smdp0, one end
// of a veth pair whose other end is in namespace peer; IPv6 is off in both, so
// that only the packets a test sends meet the filter.
func deniedPair(t *testing.T) (fw *Firewall, local, peer nstest.NS) {
	t.Helper()
	fw, local = newFirewall(t)
	peer = nstest.New(t)
	for _, ns := range []nstest.NS{local, peer} {
		ns.MustExec(t, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
	}
	local.MustExec(t, "ip", "link", "add", "smdp0", "type", "veth", "peer", "name", "peer0", "netns", peer.Name)
	local.MustExec(t, "ip", "addr", "add", localAddr.String()+"/24", "dev", "smdp0")
	local.MustExec(t, "ip", "link", "set", "smdp0", "up")
	peer.MustExec(t, "ip", "addr", "add", peerAddr.String()+"/24", "dev", "peer0")
	peer.MustExec(t, "ip", "link", "set", "peer0", "up")
	mustApply(t, fw, policy.Filter{}, Replaced)
	return fw, local, peer
}

// sendUDP sends one datagram of payload bytes from namespace ns to dst at every
// port of ports, from one socket; a write the local filter refuses is no error.
func sendUDP(t *testing.T, ns nstest.NS, dst netip.Addr, payload int, ports ...uint16) {
	t.Helper()
	var c net.PacketConn
	ns.Do(t, func() (err error) {
		c, err = net.ListenPacket("udp4", ":0")
		return err
	})
	defer c.Close()
	for _, p := range ports {
		_, _ = c.WriteTo(make([]byte, payload), net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, p)))
	}
}

// waitDenied polls Denied until done accepts it, for at most 10 s.
func waitDenied(t *testing.T, fw *Firewall, done func(dataplane.Denied) bool) dataplane.Denied {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		d, err := fw.Denied()
		if err != nil {
			t.Fatalf("Denied: %v", err)
		}
		if done(d) {
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("Denied still %+v after 10 s", d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestDeniedFlowsRecorded: real packets the default-deny policy drops, in and out,
// come back as denied flows with their packet and byte counts, the drop counters
// count them, and none of it is drift or costs a read-back of the table.
func TestDeniedFlowsRecorded(t *testing.T) {
	fw, local, peer := deniedPair(t)
	snapshots := func() int {
		fw.mu.Lock()
		defer fw.mu.Unlock()
		return fw.snapshots
	}
	before := snapshots()

	sendUDP(t, peer, localAddr, 10, 7777, 7777, 7777) // 3 × (20 + 8 + 10) bytes
	_, _ = peer.Exec("ping", "-c", "1", "-W", "1", "-s", "56", localAddr.String())
	sendUDP(t, local, peerAddr, 2, 8888) // dropped on the way out

	d := waitDenied(t, fw, func(d dataplane.Denied) bool { return d.In.Packets >= 4 && d.Out.Packets >= 1 })
	want := map[dataplane.DeniedFlow]bool{
		{Direction: dataplane.DirectionIn, Src: peerAddr, Dst: localAddr, Protocol: firewall.ProtoUDP, Port: 7777, Packets: 3, Bytes: 3 * 38}: true,
		{Direction: dataplane.DirectionIn, Src: peerAddr, Dst: localAddr, Protocol: firewall.ProtoICMP, Packets: 1, Bytes: 84}:                true,
		{Direction: dataplane.DirectionOut, Src: localAddr, Dst: peerAddr, Protocol: firewall.ProtoUDP, Port: 8888, Packets: 1, Bytes: 30}:    true,
	}
	if len(d.Flows) != len(want) {
		t.Fatalf("flows %+v, want %d", d.Flows, len(want))
	}
	for _, f := range d.Flows {
		if !want[f] {
			t.Errorf("unexpected flow %+v; want %v", f, want)
		}
	}
	if d.In.Packets != 4 || d.In.Bytes != 3*38+84 || d.Out.Packets != 1 || d.Out.Bytes != 30 || d.Full {
		t.Errorf("drop counters in %+v, out %+v, full %v; want 4 packets/198 bytes in, 1/30 out, not full", d.In, d.Out, d.Full)
	}

	// With kernel state taken out, nft(8)'s listing is the table's text again.
	if listing := firewall.ZeroKernelState(local.MustExec(t, "nft", "list", "table", "inet", TableName) + "\n"); listing != build(t, policy.Filter{}).String() {
		t.Errorf("listing after dropped traffic, kernel state taken out:\n%s\nwant\n%s", listing, build(t, policy.Filter{}).String())
	}

	// Elements and counter values are kernel state: no drift, no read-back.
	got, err := fw.Read()
	if err != nil {
		t.Fatal(err)
	}
	if diff := firewall.Compare(build(t, policy.Filter{}), got); diff != nil {
		t.Errorf("denied flows read as drift: %q", diff)
	}
	mustApply(t, fw, policy.Filter{}, Unchanged)
	if n := snapshots() - before; n != 0 {
		t.Errorf("%d read-backs of the table after dropped traffic, want 0", n)
	}

	// A policy change recreates the rules (a new drop counter epoch) and keeps the
	// sets with their flows.
	allowWeb := policy.Filter{Sets: []policy.AddressSet{{Name: "web", Prefixes: prefixes("100.64.0.9/32")}},
		Ingress: []policy.FilterRule{{Set: "web", Matches: []policy.PortMatch{tcp(80, 80)}}}}
	mustApply(t, fw, allowWeb, Updated)
	after, err := fw.Denied()
	if err != nil {
		t.Fatal(err)
	}
	if after.In.Epoch == d.In.Epoch || after.In.Packets != 0 || len(after.Flows) != len(want) {
		t.Errorf("after a rule change: in %+v (was %+v), %d flows; want a new epoch at 0 and the %d flows kept", after.In, d.In, len(after.Flows), len(want))
	}
}

// TestFullDeniedSetStillDrops: once a denied-flow set holds DeniedSetSize flows,
// new flows are no longer recorded, but every packet is still dropped and counted.
func TestFullDeniedSetStillDrops(t *testing.T) {
	fw, _, peer := deniedPair(t)
	const extra = 100
	ports := make([]uint16, firewall.DeniedSetSize+extra)
	for i := range ports {
		ports[i] = uint16(1 + i)
	}
	sendUDP(t, peer, localAddr, 0, ports...)
	d := waitDenied(t, fw, func(d dataplane.Denied) bool { return d.In.Packets >= uint64(len(ports)) })
	start := time.Now()
	if _, err := fw.Denied(); err != nil {
		t.Fatal(err)
	}
	t.Logf("reading %d denied flows took %v", len(d.Flows), time.Since(start))
	if d.In.Packets != uint64(len(ports)) {
		t.Errorf("drop counter %d packets, want %d: every packet reaches the drop", d.In.Packets, len(ports))
	}
	if len(d.Flows) != firewall.DeniedSetSize || !d.Full {
		t.Errorf("%d flows recorded (full %v), want %d and full", len(d.Flows), d.Full, firewall.DeniedSetSize)
	}
}
