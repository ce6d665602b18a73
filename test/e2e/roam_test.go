package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"segmesh/test/lab"
)

// Roaming bounds (issue 10): a node whose underlay address changed is reachable
// again from its peers within roamUpTimeout with the controller up and within
// roamDownTimeout with the controller stopped (gossip alone), and then stays
// reachable for roamStable.
const (
	roamUpTimeout   = 10 * time.Second
	roamDownTimeout = 15 * time.Second
	roamStable      = 30 * time.Second
	roamTrials      = 3
	probeEvery      = 250 * time.Millisecond
	probeTimeout    = 500 * time.Millisecond
)

// roamPeer is a peer of the roaming node and the allowed port it probes.
type roamPeer struct {
	name string
	port uint16
}

// TestRoaming renumbers db-1 (lab Host.Renumber: the new address is added, the
// old one deleted, as DHCP renumbering does; the agent keeps running) three
// times, with the controller up and then with it stopped. Its peers api-1
// (tcp/5432) and ops-1 (tcp/22) probe it over the overlay every 250 ms: each
// must reach it again within the bound, and then see no outage for 30 s (no
// flapping: no drift repair back to the old endpoint, no gossip fallback).
func TestRoaming(t *testing.T) {
	for _, controller := range []string{"up", "down"} {
		t.Run("controller "+controller, func(t *testing.T) {
			nodes := []lab.NodeSpec{}
			for _, n := range lab.ExampleNodes() {
				if n.Name != "web-2" { // the 4-host lab
					nodes = append(nodes, n)
				}
			}
			m := newMesh(t, nodes)
			ctx := context.Background()
			st, err := m.Up(ctx, examplePolicy(), convergeTimeout)
			if err != nil {
				t.Fatal(err)
			}
			dbAddr, ok := st.Node("db-1").Addr(4)
			if !ok {
				t.Fatal("db-1 has no overlay IPv4 address")
			}
			peers := []roamPeer{{"api-1", 5432}, {"ops-1", 22}}
			for _, p := range peers {
				if _, err := waitReach(ctx, m, p, dbAddr, convergeTimeout); err != nil {
					t.Fatalf("before roaming: %v", err)
				}
			}
			bound := roamUpTimeout
			if controller == "down" {
				if err := m.ControllerProc.Stop(10 * time.Second); err != nil {
					t.Fatal(err)
				}
				bound = roamDownTimeout
			}
			db := m.Node("db-1")
			for trial := range roamTrials {
				addr := netip.AddrFrom4([4]byte{192, 0, 2, byte(100 + trial)})
				old := db.Host.Underlay().Addr
				if err := db.Host.Renumber(ctx, addr); err != nil {
					t.Fatal(err)
				}
				moved := time.Now()
				var wg sync.WaitGroup
				took := make([]time.Duration, len(peers))
				errs := make([]error, len(peers))
				for i, p := range peers {
					wg.Go(func() {
						// Measured beyond the bound, so that a slow trial still gives a figure.
						took[i], errs[i] = waitReach(ctx, m, p, dbAddr, 4*bound)
					})
				}
				wg.Wait()
				var figures []string
				for i, p := range peers {
					if errs[i] != nil {
						t.Errorf("trial %d (%v -> %v): %v", trial+1, old, addr, errs[i])
						continue
					}
					figures = append(figures, fmt.Sprintf("%s after %v", p.name, took[i].Round(10*time.Millisecond)))
					if took[i] > bound {
						t.Errorf("trial %d (%v -> %v): %s reached db-1 again after %v, want within %v", trial+1, old, addr, p.name, took[i].Round(10*time.Millisecond), bound)
					}
				}
				outages := make([]int, len(peers))
				for i, p := range peers {
					wg.Go(func() { outages[i] = countOutages(ctx, m, p, dbAddr, roamStable) })
				}
				wg.Wait()
				t.Logf("trial %d, controller %s: db-1 %v -> %v; reached again: %s; outages in the %v after: %v (api-1, ops-1); %v since the move",
					trial+1, controller, old, addr, strings.Join(figures, ", "), roamStable, outages, time.Since(moved).Round(time.Second))
				for i, p := range peers {
					if outages[i] > 0 {
						t.Errorf("trial %d: %s saw %d outages of db-1 in the %v after it was reached again", trial+1, p.name, outages[i], roamStable)
					}
				}
				if t.Failed() {
					return
				}
			}
		})
	}
}

// reach reports whether a TCP connection from p to addr:p.port opens within
// probeTimeout.
func reach(ctx context.Context, m *lab.Mesh, p roamPeer, addr netip.Addr) bool {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	c, err := m.Node(p.name).Host.DialTCP(ctx, netip.AddrPortFrom(addr, p.port))
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// waitReach probes every probeEvery until p reaches addr, and returns how long
// that took; an error after timeout.
func waitReach(ctx context.Context, m *lab.Mesh, p roamPeer, addr netip.Addr, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	var took time.Duration
	err := lab.WaitFor(ctx, timeout, func(ctx context.Context) (bool, error) {
		if reach(ctx, m, p, addr) {
			took = time.Since(start)
			return true, nil
		}
		return false, fmt.Errorf("%s does not reach %s port %d", p.name, addr, p.port)
	})
	return took, err
}

// countOutages probes for d and counts the runs of failed probes.
func countOutages(ctx context.Context, m *lab.Mesh, p roamPeer, addr netip.Addr, d time.Duration) int {
	outages, down := 0, false
	t := time.NewTicker(probeEvery)
	defer t.Stop()
	for end := time.Now().Add(d); time.Now().Before(end); <-t.C {
		ok := reach(ctx, m, p, addr)
		if !ok && !down {
			outages++
		}
		down = !ok
	}
	return outages
}
