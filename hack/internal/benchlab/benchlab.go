// Package benchlab starts small segmesh meshes in network namespaces (package
// segmesh/test/lab) for the benchmark drivers under hack/: a controller, a few real
// agents, a policy, and optionally fake enrolled nodes that make the real agents'
// netmaps bigger without running more agents.
package benchlab

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/enroll"
	"segmesh/api/jointoken"
	"segmesh/test/lab"
)

// Options configure Start.
type Options struct {
	// BinDir holds the binaries lab.Mesh needs (lab.Build makes them).
	BinDir string
	// Nodes are the hosts with a real agent.
	Nodes []lab.NodeSpec
	// Policy is the YAML of the policy to apply once every agent runs.
	Policy string
	// AgentArgs are appended to every agent's command line.
	AgentArgs []string
	// Logger gets lab progress; nil discards it.
	Logger *slog.Logger
	// Keep keeps the lab directory (logs) after Close.
	Keep bool
}

// Start builds a mesh: controller, one agent per node, the policy applied and
// converged (up to 90 s). On error the lab is closed.
func Start(ctx context.Context, o Options) (*lab.Mesh, error) {
	m, err := lab.NewMesh(ctx, lab.MeshOptions{
		Options:   lab.Options{Logger: o.Logger, KeepDir: o.Keep},
		BinDir:    o.BinDir,
		Nodes:     o.Nodes,
		AgentArgs: o.AgentArgs,
	})
	if err != nil {
		return nil, err
	}
	if err := up(ctx, m, o.Policy); err != nil {
		m.Lab.DumpLogs(os.Stderr, 20)
		m.Close()
		return nil, err
	}
	return m, nil
}

func up(ctx context.Context, m *lab.Mesh, policy string) error {
	if err := m.StartController(ctx); err != nil {
		return err
	}
	if err := m.EnrollAll(ctx); err != nil {
		return err
	}
	path := filepath.Join(m.Lab.Dir, "policy.yaml")
	if err := os.WriteFile(path, []byte(policy), 0o644); err != nil {
		return fmt.Errorf("writing policy: %w", err)
	}
	rev, err := m.ApplyPolicy(ctx, path)
	if err != nil {
		return err
	}
	_, err = m.WaitConverged(ctx, rev, 90*time.Second)
	return err
}

// ApplyPolicy writes yaml to the lab directory as name and applies it, then waits
// until every agent enforces the new revision.
func ApplyPolicy(ctx context.Context, m *lab.Mesh, name, yaml string) error {
	path := filepath.Join(m.Lab.Dir, name)
	if err := os.WriteFile(path, []byte(yaml), 0o644); err != nil {
		return fmt.Errorf("writing policy: %w", err)
	}
	rev, err := m.ApplyPolicy(ctx, path)
	if err != nil {
		return err
	}
	_, err = m.WaitConverged(ctx, rev, 120*time.Second)
	return err
}

// OverlayAddr returns the IPv4 overlay address of the node called name.
func OverlayAddr(ctx context.Context, m *lab.Mesh, name string) (netip.Addr, error) {
	st, err := m.Status(ctx)
	if err != nil {
		return netip.Addr{}, err
	}
	ns := st.Node(name)
	if ns == nil {
		return netip.Addr{}, fmt.Errorf("node %s not in status", name)
	}
	a, ok := ns.Addr(4)
	if !ok {
		return netip.Addr{}, fmt.Errorf("node %s has no IPv4 overlay address (%v)", name, ns.Addresses)
	}
	return a, nil
}

// FakeEnrollCommand is the hidden subcommand name a driver's main must dispatch to
// RunFakeEnroll (see EnrollFakeNodes).
const FakeEnrollCommand = "fake-enroll"

// EnrollFakeNodes enrolls n nodes with labels that no agent runs for: each gets a
// fresh WireGuard key and an endpoint on the lab underlay where nothing listens
// (192.0.2.100 and up, port 51820+i), so real agents have them as WireGuard peers
// (keepalives and handshake attempts go nowhere) and gossip members that never
// answer. The enrollments run as `self fake-enroll ...` in the controller's
// namespace (self is the driver's own binary), because the controller is reachable
// only there.
func EnrollFakeNodes(ctx context.Context, m *lab.Mesh, self string, n int, labels map[string]string) error {
	tok, err := m.CreateToken(ctx, labels, true)
	if err != nil {
		return err
	}
	tokFile := filepath.Join(m.Lab.Dir, "fake-token")
	if err := os.WriteFile(tokFile, []byte(tok), 0o600); err != nil {
		return fmt.Errorf("writing fake-node token: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	_, err = m.Controller.Exec(ctx, self, FakeEnrollCommand, m.URL, tokFile, fmt.Sprint(n))
	if err != nil {
		return fmt.Errorf("enrolling %d fake nodes: %w", n, err)
	}
	return nil
}

// RunFakeEnroll is the fake-enroll subcommand: args are CONTROLLER-URL TOKEN-FILE N.
func RunFakeEnroll(ctx context.Context, args []string) error {
	if len(args) != 3 {
		return errors.New("usage: fake-enroll CONTROLLER-URL TOKEN-FILE N")
	}
	b, err := os.ReadFile(args[1])
	if err != nil {
		return fmt.Errorf("reading token: %w", err)
	}
	tok, err := jointoken.Decode(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("parsing token: %w", err)
	}
	var n int
	if _, err := fmt.Sscan(args[2], &n); err != nil || n < 0 || n > 150 {
		return fmt.Errorf("fake node count %q: want 0..150", args[2])
	}
	for i := range n {
		wg, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			return err
		}
		tlsKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		pub := wg.PublicKey()
		ep := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(100 + i)}), uint16(51820+i))
		_, err = enroll.Enroll(ctx, enroll.Request{
			Controller: args[0], Token: tok, Name: fmt.Sprintf("fake-%d", i),
			Hostname: fmt.Sprintf("fake-%d", i), PublicKey: pub[:], Endpoint: ep.String(), TLSKey: tlsKey,
		})
		if err != nil {
			return fmt.Errorf("enrolling fake-%d: %w", i, err)
		}
	}
	return nil
}

// IperfResult is what RunIperf reads from iperf3's JSON summary.
type IperfResult struct {
	ReceivedBPS float64 // bits per second the receiver got
	Retransmits int
}

// IperfPort is the TCP port the iperf3 servers listen on.
const IperfPort = 5201

// StartIperfServer starts `iperf3 -s -B addr` in host and waits until it listens.
func StartIperfServer(ctx context.Context, h *lab.Host, addr string) (*lab.Process, error) {
	p, err := h.Start("iperf3-server", "iperf3", "-s", "-B", addr, "-p", "5201", "--forceflush")
	if err != nil {
		return nil, err
	}
	err = lab.WaitFor(ctx, 10*time.Second, func(context.Context) (bool, error) {
		if !p.Running() {
			return false, lab.Abort(fmt.Errorf("iperf3 server exited: %s", p.Log()))
		}
		return strings.Contains(p.Log(), "Server listening"), nil
	})
	if err != nil {
		p.Stop(time.Second)
		return nil, err
	}
	return p, nil
}

// RunIperf runs one iperf3 client in h towards addr:5201 for d and returns its summary.
func RunIperf(ctx context.Context, h *lab.Host, addr string, d time.Duration) (IperfResult, error) {
	secs := fmt.Sprint(int((d + time.Second - 1) / time.Second))
	ctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	raw, err := h.Exec(ctx, "iperf3", "-c", addr, "-p", "5201", "-t", secs, "-J")
	if err != nil {
		return IperfResult{}, fmt.Errorf("iperf3 client: %w", err)
	}
	var v struct {
		End struct {
			SumSent     struct{ Retransmits int } `json:"sum_sent"`
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(raw), &v); err != nil {
		return IperfResult{}, fmt.Errorf("decoding iperf3 output: %w", err)
	}
	if v.Error != "" {
		return IperfResult{}, fmt.Errorf("iperf3: %s", v.Error)
	}
	return IperfResult{ReceivedBPS: v.End.SumReceived.BitsPerSecond, Retransmits: v.End.SumSent.Retransmits}, nil
}

// PartnersPolicy is a policy for nodes a (role a) and b (role b) in which a may
// reach b on tcp/5201 and, when n > 0, an external segment "partners" of n IPv4
// /32s may reach b on tcp/9000, so that b's table holds n prefixes in a set. The
// prefixes are every other address from 10.0.0.0 up (so none merge into a larger
// interval); they are written in flow style to stay below the 4 MiB policy file
// limit (about 15 bytes each). PartnerPrefix(i) is the i-th.
func PartnersPolicy(n int) string {
	var sb strings.Builder
	sb.WriteString("version: 1\nsegments:\n  - name: a\n    selectors: [{role: a}]\n  - name: b\n    selectors: [{role: b}]\n")
	if n > 0 {
		sb.WriteString("  - name: partners\n    cidrs: [")
		for i := range n {
			if i > 0 {
				sb.WriteString(", ")
			}
			sb.WriteString(PartnerPrefix(i).String())
		}
		sb.WriteString("]\n")
	}
	sb.WriteString("rules:\n  - name: iperf\n    from: [a]\n    to: [b]\n    ports: [tcp/5201]\n")
	if n > 0 {
		sb.WriteString("  - name: partners\n    from: [partners]\n    to: [b]\n    ports: [tcp/9000]\n")
	}
	return sb.String()
}

// PartnerPrefix is the i-th prefix of PartnersPolicy: 10.0.0.0 + 2i, /32.
func PartnerPrefix(i int) netip.Prefix {
	v := uint32(10<<24) + 2*uint32(i)
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), 32)
}

// Main is the shape every benchmark driver's run function shares. setup parses the
// flags and checks the binaries; its error is printed as "name: err" and exits 2
// (flag.ErrHelp exits 2 without a message). measure gets a logger on stderr at warn
// level (debug when setup says verbose) and its error exits 1, printed the same way.
func Main(name string, stderr io.Writer, setup func() (verbose bool, err error), measure func(*slog.Logger) error) int {
	verbose, err := setup()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(stderr, "%s: %v\n", name, err)
		}
		return 2
	}
	level := slog.LevelWarn
	if verbose {
		level = slog.LevelDebug
	}
	if err := measure(slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))); err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return 1
	}
	return 0
}
