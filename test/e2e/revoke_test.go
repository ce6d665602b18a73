package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"segmesh/test/lab"
)

// heldConn is a TCP connection from one lab node to another node's probe server,
// which echoes what it receives after its greeting byte (hack/probe serve).
type heldConn struct {
	name string
	c    net.Conn
}

var echoSeq atomic.Int64

// roundTrip sends a unique message and reads its echo within timeout.
func (h *heldConn) roundTrip(timeout time.Duration) error {
	msg := fmt.Sprintf("segmesh e2e %d\n", echoSeq.Add(1))
	if err := h.c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	if _, err := io.WriteString(h.c, msg); err != nil {
		return fmt.Errorf("writing: %w", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(h.c, buf); err != nil {
		return fmt.Errorf("reading the echo: %w", err)
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// hold opens a TCP connection from node from to node to's overlay address of family
// (4 or 6) on port, reads the greeting byte and makes one round trip (retrying while
// the WireGuard handshake is pending). The test's end closes it.
func hold(t *testing.T, m *lab.Mesh, st *lab.Status, from, to string, family int, port uint16) *heldConn {
	t.Helper()
	ns := st.Node(to)
	if ns == nil {
		t.Fatalf("node %s missing from status", to)
	}
	dst, ok := ns.Addr(family)
	if !ok {
		t.Fatalf("node %s has no IPv%d overlay address in status: %v", to, family, ns.Addresses)
	}
	h := &heldConn{name: fmt.Sprintf("%s -> %s tcp/%d IPv%d", from, to, port, family)}
	err := lab.WaitFor(context.Background(), matrixTimeout, func(ctx context.Context) (bool, error) {
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		c, err := m.Node(from).Host.DialTCP(dctx, netip.AddrPortFrom(dst, port))
		if err != nil {
			return false, err
		}
		b := make([]byte, 1)
		err = c.SetDeadline(time.Now().Add(2 * time.Second))
		if err == nil {
			_, err = io.ReadFull(c, b)
		}
		if err == nil {
			h.c = c
			err = h.roundTrip(2 * time.Second)
		}
		if err != nil {
			c.Close()
			return false, err
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("holding %s: %v", h.name, err)
	}
	t.Cleanup(func() { h.c.Close() })
	return h
}

// TestRevokedRuleCutsEstablishedFlows holds TCP connections open across a policy
// change: the ones the new policy no longer allows (web-1 -> api-1 tcp/8080) stop
// carrying data once the agents applied it, although web-1 and api-1 remain WireGuard
// peers; the ones it still allows (ops-1 -> api-1 tcp/22, api-1 -> db-1 tcp/5432) keep
// working.
func TestRevokedRuleCutsEstablishedFlows(t *testing.T) {
	m, st, pol := upExample(t)
	ctx := context.Background()
	path := filepath.Join(moduleRoot, "test", "e2e", "testdata", "policy-narrowed.yaml")
	narrowed, err := lab.LoadPolicy(path)
	if err != nil {
		t.Fatal(err)
	}
	web, api, db, ops := m.Node("web-1").Info(), m.Node("api-1").Info(), m.Node("db-1").Info(), m.Node("ops-1").Info()
	if !pol.Allows(web, api, lab.TCP8080) || narrowed.Allows(web, api, lab.TCP8080) || !narrowed.Related(web, api) ||
		!narrowed.Allows(ops, api, lab.TCP22) || !narrowed.Allows(api, db, lab.TCP5432) {
		t.Fatal("the narrowed policy must drop web -> api tcp/8080, keep web and api related, and keep ops -> api tcp/22 and api -> db tcp/5432")
	}

	cut := []*heldConn{
		hold(t, m, st, "web-1", "api-1", 4, 8080),
		hold(t, m, st, "web-1", "api-1", 6, 8080),
	}
	kept := []*heldConn{
		hold(t, m, st, "ops-1", "api-1", 4, 22),
		hold(t, m, st, "ops-1", "api-1", 6, 22),
		hold(t, m, st, "api-1", "db-1", 4, 5432),
	}

	rev, err := m.ApplyPolicy(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	st2, err := m.WaitConverged(ctx, rev, convergeTimeout)
	if err != nil {
		t.Fatal(err)
	}
	apiKey, err := m.WireGuardPublicKey(ctx, m.Node("api-1"))
	if err != nil {
		t.Fatal(err)
	}
	if peers, err := m.WireGuardPeers(ctx, m.Node("web-1")); err != nil || !slices.Contains(peers, apiKey) {
		t.Fatalf("web-1's WireGuard peers %v (%v) lack api-1 (%s): the cut would not be the filter's doing", peers, err, apiKey)
	}

	for _, h := range cut {
		err := lab.WaitFor(ctx, 20*time.Second, func(context.Context) (bool, error) {
			if err := h.roundTrip(500 * time.Millisecond); err != nil {
				t.Logf("%s cut: %v", h.name, err)
				return true, nil
			}
			return false, errors.New("the connection still carries data")
		})
		if err != nil {
			t.Errorf("%s, no longer allowed, was not cut: %v", h.name, err)
		}
	}
	for _, h := range kept {
		if err := h.roundTrip(5 * time.Second); err != nil {
			t.Errorf("%s, still allowed, broke: %v", h.name, err)
		}
	}

	// New connections follow the new policy too.
	dst, _ := st2.Node("api-1").Addr(4)
	out, err := m.Node("web-1").Host.Exec(ctx, m.Bin(lab.ProbeBin), "tcp", netip.AddrPortFrom(dst, 8080).String(), "--timeout", "1s")
	var xe *lab.ExecError
	if !errors.As(err, &xe) || xe.ExitCode != 1 {
		t.Errorf("new web-1 -> api-1 tcp/8080 connection: %v (output %q), want it blocked", err, out)
	}
}

// TestDownRefusedWhileAgentRuns runs `segmesh-agent down` next to a running agent:
// it must refuse, naming the agent, and leave the interface and the table alone.
func TestDownRefusedWhileAgentRuns(t *testing.T) {
	m := newMesh(t, []lab.NodeSpec{{Name: "solo", Labels: map[string]string{"role": "test"}}})
	ctx := context.Background()
	if err := m.StartController(ctx); err != nil {
		t.Fatal(err)
	}
	n := m.Node("solo")
	tok, err := m.CreateToken(ctx, n.Labels, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.StartAgent(n, tok); err != nil {
		t.Fatal(err)
	}
	waitEnrolled(t, m, n.Name)
	present := func(ctx context.Context) error {
		if _, err := n.Host.Exec(ctx, "ip", "link", "show", "dev", n.Interface); err != nil {
			return err
		}
		_, err := n.Host.Exec(ctx, "nft", "list", "table", "inet", "segmesh")
		return err
	}
	if err := lab.WaitFor(ctx, convergeTimeout, func(ctx context.Context) (bool, error) {
		err := present(ctx)
		return err == nil, err
	}); err != nil {
		t.Fatalf("agent's interface and table: %v", err)
	}

	out, err := n.Host.Exec(ctx, m.Bin(lab.AgentBin), "down", "--state-dir", n.StateDir)
	var xe *lab.ExecError
	if !errors.As(err, &xe) || xe.ExitCode <= 0 {
		t.Fatalf("segmesh-agent down next to a running agent: %v (output %q); want it to refuse", err, out)
	}
	msg := xe.Stderr
	for _, want := range []string{
		fmt.Sprintf("another segmesh agent (pid %d) already manages network namespace %s net:[", n.Agent.PID(), n.Host.Namespace),
		fmt.Sprintf("(interface %s); stop it first", n.Interface),
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("segmesh-agent down said %q; want it to contain %q", msg, want)
		}
	}
	t.Logf("refused as expected: %s", strings.TrimSpace(msg))
	if err := present(ctx); err != nil {
		t.Errorf("after the refused down: %v", err)
	}
	if !n.Agent.Running() {
		t.Errorf("agent exited after the refused down: %v", n.Agent.Err())
	}
}
