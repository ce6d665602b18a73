package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"segmesh/test/lab"
)

// NAT traversal bounds (issue 10).
const (
	// firstPacketTimeout bounds the time from the policy apply that connects a
	// pair to its first packet, relayed ones included (direct checks for
	// FallbackAfter, a relay session, WireGuard's handshake through it).
	firstPacketTimeout = 45 * time.Second
	// pathTimeout bounds how long a path takes to show in status (reports come
	// every resync, 10 s).
	pathTimeout = 40 * time.Second
	// directAgainTimeout bounds the move from relay back to direct once the NAT
	// allows it (direct checks every 30 s).
	directAgainTimeout = 75 * time.Second
	relayPorts         = "40000-40099"
	iperfPort          = 5201
	iperfTime          = 3 // seconds
)

func natPolicy() string {
	return filepath.Join(moduleRoot, "test", "e2e", "testdata", "policy-nat.yaml")
}
func emptyPolicy() string {
	return filepath.Join(moduleRoot, "test", "e2e", "testdata", "policy-empty.yaml")
}

// natPair is an allowed flow between two nodes behind the NATs of
// lab.ExampleNATs and the path each end must choose for the other.
type natPair struct {
	src, dst string
	check    lab.Check
	path     string // "direct" or "relay"
	scenario string
}

var natPairs = []natPair{
	{"web-1", "web-2", lab.TCP8080, "direct", "port-preserving <-> port-preserving"},
	{"web-1", "api-1", lab.TCP8080, "relay", "port-preserving <-> symmetric"},
	{"api-1", "db-1", lab.TCP5432, "direct", "symmetric <-> 1:1"},
	{"ops-1", "api-1", lab.TCP22, "direct", "public <-> symmetric"},
	{"ops-1", "web-2", lab.TCP22, "direct", "public <-> port-preserving"},
	{"db-1", "ops-1", lab.UDP514, "direct", "1:1 <-> public"},
}

// TestNATTraversal runs the example lab behind NAT routers (lab.ExampleNATs:
// web-1 and web-2 behind two port-preserving NATs, api-1 behind a symmetric
// NAT, db-1 behind a 1:1 NAT, ops-1 public and the policy's relay). After a
// policy that connects nobody, it applies one that connects them and measures,
// per pair, the time to the first packet; then the whole matrix (IPv4 and IPv6
// inside the overlay) must hold, each end must show the expected path (direct,
// or relay via ops-1), and TCP throughput is measured on a direct and a relayed
// path. Then the symmetric NAT becomes port-preserving: the relayed pairs must
// move to direct. Last, web-2 moves behind web-1's NAT: it is reachable again
// within roamUpTimeout, over the LAN.
func TestNATTraversal(t *testing.T) {
	nats, nodes := lab.ExampleNATs()
	m := newMeshOpts(t, lab.MeshOptions{
		NATs: nats, Nodes: nodes,
		ControllerArgs: []string{"--stun-listen", ":3478"},
		AgentArgs:      []string{"--relay-ports", relayPorts, "--metrics-listen", ":" + strconv.Itoa(lab.MetricsPort)},
	})
	ctx := context.Background()
	if _, err := m.Up(ctx, emptyPolicy(), convergeTimeout); err != nil {
		t.Fatal(err)
	}
	pol, err := lab.LoadPolicy(natPolicy())
	if err != nil {
		t.Fatal(err)
	}
	applied := time.Now()
	rev, err := m.ApplyPolicy(ctx, natPolicy())
	if err != nil {
		t.Fatal(err)
	}
	st, err := m.WaitConverged(ctx, rev, convergeTimeout)
	if err != nil {
		t.Fatal(err)
	}
	first := firstPackets(t, m, st, applied)

	requireMatrix(t, m, pol, st, lab.MatrixOptions{})

	for _, p := range natPairs {
		requirePath(t, m, p.src, p.dst, p.path)
		requirePath(t, m, p.dst, p.src, p.path)
	}

	requireRelayRefusesStrangers(t, m)

	direct := iperf(t, m, st, "web-1", "web-2")
	relayed := iperf(t, m, st, "web-1", "api-1")
	if direct <= 0 || relayed <= 0 {
		t.Errorf("TCP throughput direct %.0f Mbit/s, relayed %.0f Mbit/s: want both above 0", direct, relayed)
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "%-38s %-14s %-7s %s\n", "NAT scenario", "pair", "path", "first packet after apply")
	for _, p := range natPairs {
		fmt.Fprintf(&sb, "%-38s %-14s %-7s %.1f s\n", p.scenario, p.src+"->"+p.dst, p.path, first[p.src+"->"+p.dst].Seconds())
	}
	fmt.Fprintf(&sb, "TCP throughput web-1 -> web-2 (direct): %.0f Mbit/s; web-1 -> api-1 (relayed via ops-1): %.0f Mbit/s\n", direct, relayed)
	t.Logf("NAT traversal figures:\n%s", sb.String())

	// The symmetric NAT is reconfigured to preserve ports: direct replaces the relay.
	if err := m.Lab.NAT("corp").SetKind(ctx, lab.NATPortPreserving); err != nil {
		t.Fatal(err)
	}
	moved := time.Now()
	waitPath(t, m, "api-1", "web-1", "direct", directAgainTimeout)
	waitPath(t, m, "web-1", "api-1", "direct", directAgainTimeout)
	t.Logf("relay -> direct after the NAT allowed it: %.1f s", time.Since(moved).Seconds())
	requireMatrix(t, m, pol, st, lab.MatrixOptions{Involving: []string{"api-1"}})

	// web-2 moves behind web-1's NAT (same site, no hairpinning): reachable
	// again over the LAN.
	if err := m.Node("web-2").Host.MoveTo(ctx, m.Lab.NAT("home-a"), netip.Addr{}); err != nil {
		t.Fatal(err)
	}
	moved = time.Now()
	web2, _ := st.Node("web-2").Addr(4)
	cell := []lab.Cell{{Src: "web-1", Dst: "web-2", Family: 4, Check: lab.TCP8080, Addr: web2, Want: true}}
	if err := lab.WaitFor(ctx, roamUpTimeout, func(ctx context.Context) (bool, error) {
		c := slices.Clone(cell)
		if err := m.Probe(ctx, c, lab.MatrixOptions{Timeout: 500 * time.Millisecond}); err != nil {
			return false, err
		}
		return c[0].Got, nil
	}); err != nil {
		t.Fatalf("web-1 does not reach web-2 within %s of its move behind home-a: %v", roamUpTimeout, err)
	}
	t.Logf("web-2 behind web-1's NAT: reachable again after %.1f s", time.Since(moved).Seconds())
}

// firstPackets probes every natPairs flow every 250 ms until it gets through and
// returns the time from applied to the first success, by "src->dst".
func firstPackets(t *testing.T, m *lab.Mesh, st *lab.Status, applied time.Time) map[string]time.Duration {
	t.Helper()
	ctx := context.Background()
	var mu sync.Mutex
	out := map[string]time.Duration{}
	var wg sync.WaitGroup
	for _, p := range natPairs {
		addr, ok := st.Node(p.dst).Addr(4)
		if !ok {
			t.Fatalf("%s has no overlay IPv4 address", p.dst)
		}
		wg.Go(func() {
			err := lab.WaitFor(ctx, firstPacketTimeout, func(ctx context.Context) (bool, error) {
				c := []lab.Cell{{Src: p.src, Dst: p.dst, Family: 4, Check: p.check, Addr: addr, Want: true}}
				if err := m.Probe(ctx, c, lab.MatrixOptions{Timeout: 250 * time.Millisecond}); err != nil {
					return false, err
				}
				if c[0].Got {
					mu.Lock()
					out[p.src+"->"+p.dst] = time.Since(applied)
					mu.Unlock()
				}
				return c[0].Got, nil
			})
			if err != nil {
				t.Errorf("%s -> %s (%s): no packet within %s of the apply: %v", p.src, p.dst, p.scenario, firstPacketTimeout, err)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	return out
}

// peerPaths returns the path and relay node's peers show, by peer name, from
// `segmesh nodes show NAME -o json`.
func peerPaths(ctx context.Context, m *lab.Mesh, node string) (map[string]string, error) {
	out, err := m.CLI(ctx, "nodes", "show", node, "-o", "json")
	if err != nil {
		return nil, err
	}
	var v struct {
		Peers []struct {
			Name  string `json:"name"`
			Path  string `json:"path"`
			Relay string `json:"relay"`
		} `json:"peers"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		return nil, fmt.Errorf("decoding nodes show %q: %w", out, err)
	}
	paths := map[string]string{}
	for _, p := range v.Peers {
		paths[p.Name] = p.Path
		if p.Relay != "" {
			paths[p.Name] += " via " + p.Relay
		}
	}
	return paths, nil
}

// waitPath waits until node shows path to peer ("direct", or "relay" which
// must be via ops-1).
func waitPath(t *testing.T, m *lab.Mesh, node, peer, path string, timeout time.Duration) {
	t.Helper()
	want := path
	if path == "relay" {
		want = "relay via ops-1"
	}
	var last map[string]string
	err := lab.WaitFor(context.Background(), timeout, func(ctx context.Context) (bool, error) {
		ps, err := peerPaths(ctx, m, node)
		if err != nil {
			return false, err
		}
		last = ps
		return ps[peer] == want, nil
	})
	if err != nil {
		t.Fatalf("%s's path to %s is not %q within %s: %v (last seen: %v)", node, peer, want, timeout, err, last)
	}
}

func requirePath(t *testing.T, m *lab.Mesh, node, peer, path string) {
	t.Helper()
	waitPath(t, m, node, peer, path, pathTimeout)
}

// iperf runs one iperf3 TCP stream src -> dst over the overlay for iperfTime
// seconds and returns the receiver's rate in Mbit/s.
func iperf(t *testing.T, m *lab.Mesh, st *lab.Status, src, dst string) float64 {
	t.Helper()
	ctx := context.Background()
	addr, _ := st.Node(dst).Addr(4)
	srv, err := m.Node(dst).Host.Start("iperf3-server", "iperf3", "-s", "-1", "-p", strconv.Itoa(iperfPort))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv.Stop(5 * time.Second) }()
	type result struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	var res result
	var out string
	err = lab.WaitFor(ctx, 15*time.Second, func(ctx context.Context) (bool, error) {
		out, err = m.Node(src).Host.Exec(ctx, "iperf3", "-c", addr.String(), "-p", strconv.Itoa(iperfPort), "-t", strconv.Itoa(iperfTime), "-J")
		if err != nil {
			return false, nil // the server is not listening yet
		}
		res = result{}
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			return false, lab.Abort(fmt.Errorf("decoding iperf3 output: %w", err))
		}
		// "unable to connect to server": the server is not listening yet.
		return res.Error == "", nil
	})
	if err != nil || res.Error != "" {
		t.Fatalf("iperf3 %s -> %s: %v %s\n%s", src, dst, err, res.Error, out)
	}
	if res.End.SumReceived.BitsPerSecond == 0 {
		t.Logf("iperf3 %s -> %s carried nothing:\n%s", src, dst, out)
	}
	return res.End.SumReceived.BitsPerSecond / 1e6
}

// requireRelayRefusesStrangers sends, from db-1 (whose pairs are all direct),
// WireGuard handshake initiations to every relay port of ops-1: the relay
// must count them as refused for a bad mac1 (it checks each handshake message
// against the keys of the session the port belongs to) instead of forwarding.
func requireRelayRefusesStrangers(t *testing.T, m *lab.Mesh) {
	t.Helper()
	ctx := context.Background()
	ops := m.Node("ops-1")
	scrape := func() (dropped float64) {
		text, err := ops.Host.Scrape(ctx, netip.AddrPortFrom(ops.Host.Addr, lab.MetricsPort))
		if err != nil {
			t.Fatal(err)
		}
		if v, ok := sample(text, "segmesh_agent_relay_sessions"); !ok || v < 1 {
			t.Fatalf("ops-1 relays no session (segmesh_agent_relay_sessions %v, %v)", v, ok)
		}
		d, _ := sample(text, `segmesh_agent_relay_dropped_packets_total{reason="mac1"}`)
		return d
	}
	before := scrape()
	conn, err := m.Node("db-1").Host.ListenUDP(netip.AddrPortFrom(netip.IPv4Unspecified(), 0))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	first, last, _ := strings.Cut(relayPorts, "-")
	lo, _ := strconv.Atoi(first)
	hi, _ := strconv.Atoi(last)
	// A handshake initiation (type 1, 148 bytes) whose mac1 is not valid for
	// any key the relay forwards to.
	msg := make([]byte, 148)
	msg[0] = 1
	for i := 8; i < len(msg); i++ {
		msg[i] = byte(i * 7)
	}
	for port := lo; port <= hi; port++ {
		if _, err := conn.WriteToUDPAddrPort(msg, netip.AddrPortFrom(ops.Host.Addr, uint16(port))); err != nil {
			t.Fatal(err)
		}
	}
	err = lab.WaitFor(ctx, 10*time.Second, func(ctx context.Context) (bool, error) { return scrape() >= before+1, nil })
	if err != nil {
		t.Fatalf("the relay did not count forged handshakes from a stranger as refused (mac1 drops before %v, now %v): %v", before, scrape(), err)
	}
}
