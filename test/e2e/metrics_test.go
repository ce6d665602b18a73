package e2e

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"segmesh/test/lab"
)

// promtoolCheck runs `promtool check metrics` on text (Debian package
// prometheus, installed by hack/deps.sh).
func promtoolCheck(t *testing.T, what, text string) {
	t.Helper()
	cmd := exec.Command("promtool", "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Errorf("promtool check metrics on the %s metrics: %v\n%s\nmetrics:\n%s", what, err, out.String(), text)
	}
}

// sample returns the value of the series named series (name and labels exactly as
// printed, e.g. `segmesh_nodes{state="online"}`) in text, and whether it is there.
func sample(text, series string) (float64, bool) {
	for line := range strings.Lines(text) {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), series+" ")
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(strings.Fields(rest)[0], 64)
		return v, err == nil
	}
	return 0, false
}

// TestMetrics runs a controller and three agents with --metrics-listen, scrapes
// each, checks the text with promtool and checks the values the lab knows: the
// policy revision, the nodes online and each agent's peers.
func TestMetrics(t *testing.T) {
	if _, err := exec.LookPath("promtool"); err != nil {
		t.Fatalf("promtool is missing: run hack/deps.sh (Debian package prometheus): %v", err)
	}
	var nodes []lab.NodeSpec
	for _, n := range lab.ExampleNodes() {
		if n.Name == "web-1" || n.Name == "api-1" || n.Name == "db-1" {
			nodes = append(nodes, n)
		}
	}
	listen := []string{"--metrics-listen", ":" + strconv.Itoa(lab.MetricsPort)}
	m := newMeshArgs(t, nodes, listen, listen)
	ctx := context.Background()
	st, err := m.Up(ctx, examplePolicy(), convergeTimeout)
	if err != nil {
		t.Fatal(err)
	}
	// The example policy: web reaches api, api reaches db.
	wantPeers := map[string][]string{"web-1": {"api-1"}, "api-1": {"web-1", "db-1"}, "db-1": {"api-1"}}

	// Traffic from web-1 to api-1 makes their first handshake.
	apiAddr, ok := st.Node("api-1").Addr(4)
	if !ok {
		t.Fatal("api-1 has no IPv4 overlay address")
	}
	conn, err := m.Node("web-1").Host.DialTCP(ctx, netip.AddrPortFrom(apiAddr, 8080))
	if err != nil {
		t.Fatalf("web-1 -> api-1 tcp/8080 (allowed by the example policy): %v", err)
	}
	conn.Close()
	// web-1 may not reach db-1: its egress policy drops the attempt, which the
	// agent counts within a read of the kernel (10 s).
	dbAddr, ok := st.Node("db-1").Addr(4)
	if !ok {
		t.Fatal("db-1 has no IPv4 overlay address")
	}
	// The SYN is dropped, so the connect would wait for the kernel's retries
	// (about two minutes); a few seconds of it are enough.
	dialCtx, cancelDial := context.WithTimeout(ctx, 3*time.Second)
	conn, err = m.Node("web-1").Host.DialTCP(dialCtx, netip.AddrPortFrom(dbAddr, 5432))
	cancelDial()
	if err == nil {
		conn.Close()
		t.Fatal("web-1 -> db-1 tcp/5432 connected; the example policy denies it")
	}

	// Each agent's report reaches the controller's metrics just after its
	// status: poll.
	ctlWant := map[string]float64{
		"segmesh_policy_revision":                       float64(st.PolicyRevision),
		`segmesh_nodes{state="online"}`:                 3,
		`segmesh_nodes{state="revoked"}`:                0,
		`segmesh_enrollments_total{result="ok"}`:        3,
		`segmesh_policy_apply_to_enforce_seconds_count`: 3,
	}
	var ctlText string
	err = lab.WaitFor(ctx, 10*time.Second, func(ctx context.Context) (bool, error) {
		var err error
		if ctlText, err = m.Controller.Scrape(ctx, netip.AddrPortFrom(lab.ControllerAddr, lab.MetricsPort)); err != nil {
			return false, err
		}
		for _, series := range slices.Sorted(maps.Keys(ctlWant)) {
			if got, ok := sample(ctlText, series); !ok || got != ctlWant[series] {
				return false, fmt.Errorf("%s = %v (present %v), want %v", series, got, ok, ctlWant[series])
			}
		}
		return true, nil
	})
	if err != nil {
		t.Errorf("controller: %v\nmetrics:\n%s", err, ctlText)
	}
	promtoolCheck(t, "controller", ctlText)
	t.Logf("controller metrics:\n%s", ctlText)
	if got, _ := sample(ctlText, `segmesh_netmap_updates_sent_total{kind="full"}`); got < 3 {
		t.Errorf("controller: %g whole netmaps sent, want at least one per agent (3)", got)
	}

	for _, n := range m.Nodes() {
		var text string
		// The peers show after the first read-back of the reconciler, and the
		// handshake after the device is read again: poll.
		err := lab.WaitFor(ctx, 60*time.Second, func(ctx context.Context) (bool, error) {
			var err error
			if text, err = n.Host.Scrape(ctx, netip.AddrPortFrom(n.Host.Addr, lab.MetricsPort)); err != nil {
				return false, err
			}
			if n.Name == "web-1" {
				if _, ok := sample(text, `segmesh_agent_peer_last_handshake_seconds{peer="api-1"}`); !ok {
					return false, fmt.Errorf("no handshake with api-1 yet")
				}
			}
			got, ok := sample(text, "segmesh_agent_peers")
			return ok && got == float64(len(wantPeers[n.Name])), fmt.Errorf("segmesh_agent_peers = %v (present %v), want %d", got, ok, len(wantPeers[n.Name]))
		})
		if err != nil {
			t.Errorf("agent %s: %v\nmetrics:\n%s", n.Name, err, text)
			continue
		}
		promtoolCheck(t, "agent "+n.Name, text)
		if got, ok := sample(text, "segmesh_agent_policy_revision"); !ok || got != float64(st.PolicyRevision) {
			t.Errorf("agent %s: segmesh_agent_policy_revision = %v (present %v), want %d", n.Name, got, ok, st.PolicyRevision)
		}
		if got, ok := sample(text, "segmesh_agent_apply_seconds_count"); !ok || got < 1 {
			t.Errorf("agent %s: segmesh_agent_apply_seconds_count = %v (present %v), want at least 1", n.Name, got, ok)
		}
		if n.Name == "web-1" {
			err := lab.WaitFor(ctx, 30*time.Second, func(ctx context.Context) (bool, error) {
				var err error
				if text, err = n.Host.Scrape(ctx, netip.AddrPortFrom(n.Host.Addr, lab.MetricsPort)); err != nil {
					return false, err
				}
				out, _ := sample(text, `segmesh_agent_dropped_packets_total{direction="out"}`)
				bytes, _ := sample(text, `segmesh_agent_dropped_bytes_total{direction="out"}`)
				records, _ := sample(text, "segmesh_agent_denied_flow_records_total")
				return out >= 1 && bytes >= 40 && records >= 1, fmt.Errorf("dropped out %v packets %v bytes, %v denied-flow records; want the denied connection to db-1", out, bytes, records)
			})
			if err != nil {
				t.Errorf("agent %s: %v", n.Name, err)
			}
			if _, ok := sample(text, `segmesh_agent_dropped_packets_total{direction="in"}`); !ok {
				t.Errorf("agent %s: no segmesh_agent_dropped_packets_total{direction=\"in\"}", n.Name)
			}
			t.Logf("metrics of agent %s:\n%s", n.Name, text)
		}
	}
}
