package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// requireRoot fails the test (it does not skip) when not running as root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (network namespaces, veth, nftables): run `sudo go test ./test/lab/`")
	}
}

// newTestLab creates a lab whose Close is checked at cleanup.
func newTestLab(t *testing.T, opts Options) *Lab {
	t.Helper()
	requireRoot(t)
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	l, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return l
}

func nsExists(name string) bool {
	_, err := os.Stat(filepath.Join("/run/netns", name))
	return err == nil
}

func rootLinks(t *testing.T) string {
	t.Helper()
	out, err := runCmd(context.Background(), "ip", "-o", "link", "show")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, f[1])
		}
	}
	return strings.Join(names, " ")
}

func TestTopology(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	before := rootLinks(t)
	l := newTestLab(t, Options{})
	a, err := l.AddHost(ctx, "a", netip.MustParseAddr("192.0.2.11"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddHost(ctx, "b", netip.MustParseAddr("192.0.2.12"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.AddHost(ctx, "a", netip.MustParseAddr("192.0.2.13")); err == nil {
		t.Error("AddHost accepted a duplicate name")
	}
	if _, err := l.AddHost(ctx, "c", netip.MustParseAddr("198.51.100.1")); err == nil {
		t.Error("AddHost accepted an address outside the underlay")
	}
	if after := rootLinks(t); after != before {
		t.Errorf("root namespace links changed:\nbefore %s\nafter  %s", before, after)
	}
	for _, h := range []*Host{a, b} {
		if want := "smlab-" + l.ID + "-" + h.Name; h.Namespace != want {
			t.Errorf("namespace %q, want %q", h.Namespace, want)
		}
		if !nsExists(h.Namespace) {
			t.Errorf("namespace %s missing", h.Namespace)
		}
		v6, err := h.Exec(ctx, "sysctl", "-n", "net.ipv6.conf.all.disable_ipv6")
		if err != nil || strings.TrimSpace(v6) != "0" {
			t.Errorf("%s: disable_ipv6 = %q, %v; want 0", h.Name, v6, err)
		}
		lo, err := h.Exec(ctx, "ip", "-o", "link", "show", "lo")
		if err != nil || !strings.Contains(lo, "UP") {
			t.Errorf("%s: lo not up: %q %v", h.Name, lo, err)
		}
	}
	if name := l.InterfaceName(12); len(name) > 15 || !strings.Contains(name, l.ID) {
		t.Errorf("InterfaceName(12) = %q: want <= 15 bytes holding the lab id", name)
	}
	// Underlay: a reaches b over the bridge, and b's loopback answers inside b only.
	if out, err := l.Exec(ctx, "a", "ping", "-c", "1", "-W", "2", "192.0.2.12"); err != nil {
		t.Errorf("a cannot ping b over the underlay: %v\n%s", err, out)
	}
	if _, err := l.Exec(ctx, "nosuch", "true"); err == nil {
		t.Error("Exec in an unknown host succeeded")
	}
	var xe *ExecError
	if _, err := a.Exec(ctx, "sh", "-c", "echo oops >&2; exit 3"); !errors.As(err, &xe) || xe.ExitCode != 3 || !strings.Contains(err.Error(), "oops") {
		t.Errorf("Exec exit 3 = %v, want an ExecError with code 3 naming stderr", err)
	}

	namespaces := l.Namespaces()
	if len(namespaces) != 3 {
		t.Fatalf("Namespaces() = %v, want underlay + 2 hosts", namespaces)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	for _, ns := range namespaces {
		if nsExists(ns) {
			t.Errorf("namespace %s left after Close", ns)
		}
	}
	if _, err := l.AddHost(ctx, "late", netip.MustParseAddr("192.0.2.20")); err == nil {
		t.Error("AddHost after Close succeeded")
	}
}

func netnsOf(t *testing.T, pid int) string {
	t.Helper()
	link, err := os.Readlink("/proc/" + itoa(pid) + "/ns/net")
	if err != nil {
		t.Fatalf("reading netns of pid %d: %v", pid, err)
	}
	return link
}

func itoa(i int) string { return strconv.Itoa(i) }

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

func TestProcesses(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	l := newTestLab(t, Options{StopTimeout: 500 * time.Millisecond})
	h, err := l.AddHost(ctx, "a", netip.MustParseAddr("192.0.2.11"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := h.Start("sleeper", "sleep", "1000")
	if err != nil {
		t.Fatal(err)
	}
	pid := p.PID()
	// `ip netns exec` execs the command: the pid is sleep itself, in the host's netns.
	if err := WaitFor(ctx, 5*time.Second, func(context.Context) (bool, error) {
		comm, err := os.ReadFile("/proc/" + itoa(pid) + "/comm")
		return strings.TrimSpace(string(comm)) == "sleep", fmt.Errorf("pid %d is %q (%v), want sleep", pid, comm, err)
	}); err != nil {
		t.Error(err)
	}
	hostNS, err := h.Exec(ctx, "readlink", "/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	if got := netnsOf(t, pid); got != strings.TrimSpace(hostNS) {
		t.Errorf("process netns %s, want the host's %s", got, hostNS)
	}
	if err := p.Restart(); err == nil {
		t.Error("Restart of a running process succeeded")
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	if p.Running() || alive(pid) {
		t.Fatalf("pid %d still running after Kill", pid)
	}
	if err := p.Restart(); err != nil {
		t.Fatal(err)
	}
	if p.PID() == pid || !p.Running() {
		t.Errorf("after Restart pid %d (was %d), running %v", p.PID(), pid, p.Running())
	}
	if !strings.Contains(p.Log(), "===== run 2") {
		t.Errorf("log lacks the second run's header:\n%s", p.Log())
	}

	quick, err := h.Start("quick", "sh", "-c", "echo hello; exit 4")
	if err != nil {
		t.Fatal(err)
	}
	if err := quick.Wait(ctx); err == nil || quick.ExitCode() != 4 {
		t.Errorf("quick: Wait = %v, exit code %d; want exit 4", err, quick.ExitCode())
	}
	if !strings.Contains(quick.Log(), "hello") {
		t.Errorf("quick log lacks its output: %q", quick.Log())
	}

	// A process that ignores SIGTERM, with a child in its process group.
	stubborn, err := h.Start("stubborn", "sh", "-c", `trap "" TERM; sleep 1000 & wait`)
	if err != nil {
		t.Fatal(err)
	}
	hooked := false
	l.OnClose(func(context.Context) error {
		hooked = true
		if p.Running() || stubborn.Running() {
			t.Error("OnClose hook ran before the processes stopped")
		}
		return nil
	})
	pids := []int{p.PID(), stubborn.PID()}
	start := time.Now()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if !hooked {
		t.Error("OnClose hook did not run")
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Close took %s", d)
	}
	for _, pid := range pids {
		if alive(pid) {
			t.Errorf("pid %d alive after Close", pid)
		}
	}
	if _, err := h.Start("late", "true"); err == nil {
		t.Error("Start after Close succeeded")
	}
}

// TestProbeAcrossNamespaces runs hack/probe and ping between two lab hosts over the
// underlay, then drops traffic with nftables and expects "blocked".
func TestProbeAcrossNamespaces(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	root, err := ModuleRoot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	if err := buildPackages(ctx, root, bin, "./hack/probe"); err != nil {
		t.Fatal(err)
	}
	l := newTestLab(t, Options{})
	m := &Mesh{Lab: l, BinDir: bin}
	addr := netip.MustParseAddr("192.0.2.11")
	for _, name := range []string{"a", "b"} {
		h, err := l.AddHost(ctx, name, addr)
		addr = addr.Next()
		if err != nil {
			t.Fatal(err)
		}
		n := &Node{Name: name, Host: h}
		// Cells lists nodes with an agent; the probe server stands in for one.
		n.Agent, err = h.Start("probe", m.Bin(ProbeBin), "serve", "--tcp", joinInts(ProbeTCPPorts), "--udp", joinInts(ProbeUDPPorts))
		if err != nil {
			t.Fatal(err)
		}
		n.Probe = n.Agent
		m.nodes = append(m.nodes, n)
	}
	b := netip.MustParseAddr("192.0.2.12")
	// The underlay addresses stand in for overlay addresses.
	st := &Status{Nodes: []NodeStatus{
		{Name: "a", Addresses: []string{"192.0.2.11/32"}},
		{Name: "b", Addresses: []string{"192.0.2.12/32"}},
	}}
	denyAll, err := ParsePolicy([]byte("version: 1\n"))
	if err != nil {
		t.Fatal(err)
	}
	allowAll, err := ParsePolicy([]byte("version: 1\nrules:\n  - {name: open, from: [all], to: [all], ports: [any]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	v4only := MatrixOptions{Checks4: []Check{TCP22, UDP514, ICMP}, Checks6: []Check{}, Timeout: 500 * time.Millisecond}
	cells := func(want bool) []Cell {
		var cs []Cell
		for _, c := range []Check{TCP22, TCP5432, TCP8080, UDP514, ICMP} {
			cs = append(cs, Cell{Src: "a", Dst: "b", Family: 4, Check: c, Addr: b, Want: want})
		}
		cs = append(cs, Cell{Src: "a", Dst: "b", Family: 4, Check: Check{"tcp", 9}, Addr: b, Want: false})
		cs = append(cs, Cell{Src: "a", Dst: "b", Family: 4, Check: Check{"udp", 9}, Addr: b, Want: false})
		return cs
	}
	// The probe server may still be binding: poll until the matrix holds.
	opts := MatrixOptions{Timeout: 500 * time.Millisecond}
	if err := WaitFor(ctx, 10*time.Second, func(ctx context.Context) (bool, error) {
		cs := cells(true)
		if err := m.Probe(ctx, cs, opts); err != nil {
			return false, err
		}
		bad := Mismatches(cs)
		if len(bad) > 0 {
			return false, errors.New(bad[0].Key() + ": " + bad[0].Output)
		}
		return true, nil
	}); err != nil {
		t.Fatalf("open underlay: %v", err)
	}

	// A flow the policy denies that gets through ends WaitMatrix at once.
	cs, rounds, err := m.WaitMatrix(ctx, denyAll, st, time.Minute, v4only)
	if err == nil || !strings.Contains(err.Error(), "got through") || rounds != 1 || len(cs) != 6 {
		t.Errorf("WaitMatrix(deny all) over an open underlay = %d cells, %d rounds, %v; want 6 cells, a leak error in round 1", len(cs), rounds, err)
	}
	if _, _, err := m.WaitMatrix(ctx, allowAll, st, 10*time.Second, v4only); err != nil {
		t.Errorf("WaitMatrix(allow all) over an open underlay: %v", err)
	}

	// Drop everything b receives on eth0.
	rules := "add table inet labtest\nadd chain inet labtest in { type filter hook input priority 0; policy accept; }\nadd rule inet labtest in iifname eth0 drop\n"
	if _, err := m.Node("b").Host.Exec(ctx, "sh", "-c", "printf '"+rules+"' | nft -f -"); err != nil {
		t.Fatal(err)
	}
	cs = cells(false)
	if err := m.Probe(ctx, cs, opts); err != nil {
		t.Fatal(err)
	}
	var sb strings.Builder
	if err := WriteMatrix(&sb, cs); err != nil {
		t.Fatal(err)
	}
	if bad := Mismatches(cs); len(bad) > 0 {
		t.Errorf("blocked underlay: %d mismatches:\n%s", len(bad), sb.String())
	}
	if !strings.Contains(sb.String(), "SRC") || !strings.Contains(sb.String(), "7 cells (0 allowed, 7 denied by policy): 7 match, 0 mismatch") {
		t.Errorf("unexpected table:\n%s", sb.String())
	}
	// Allowed flows that stay blocked are re-probed until the timeout.
	cs, rounds, err = m.WaitMatrix(ctx, allowAll, st, 1500*time.Millisecond, v4only)
	if err == nil || !strings.Contains(err.Error(), "still mismatch") || rounds < 2 || len(Mismatches(cs)) != len(cs) {
		t.Errorf("WaitMatrix(allow all) over a blocked underlay = %d rounds, %v; want a timeout after several rounds with every cell mismatching", rounds, err)
	}
}
