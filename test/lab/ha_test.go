package lab

import (
	"context"
	"encoding/base64"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestEtcdCluster runs the HA mesh's real three-member etcd cluster (hack/etcd)
// on the controller hosts without controllers: it becomes healthy, a stopped
// member rejoins and catches up with writes made while it was down, a
// partitioned member loses the quorum (unhealthy) while the majority stays
// healthy, and Heal restores it and removes the table.
func TestEtcdCluster(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	root, err := ModuleRoot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	if err := buildPackages(ctx, root, bin, "./hack/etcd"); err != nil {
		t.Fatal(err)
	}
	l := newTestLab(t, Options{})
	m := &Mesh{Lab: l, BinDir: bin, opts: MeshOptions{HA: 3}}
	if err := m.initControllers(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			var sb strings.Builder
			l.DumpLogs(&sb, 30)
			t.Logf("logs:\n%s", sb.String())
		}
	})
	if got := m.Replica(1).Host.Addr; got != ControllerAddr {
		t.Errorf("controller-1 at %s, want %s", got, ControllerAddr)
	}
	if want := "http://192.0.2.1:2379,http://192.0.2.2:2379,http://192.0.2.3:2379"; m.EtcdEndpoints() != want {
		t.Errorf("endpoints %q, want %q", m.EtcdEndpoints(), want)
	}
	if err := m.StartEtcd(ctx); err != nil {
		t.Fatal(err)
	}

	put := func(i int, key string) {
		t.Helper()
		body := fmt.Sprintf(`{"key":%q,"value":%q}`, base64.StdEncoding.EncodeToString([]byte(key)), base64.StdEncoding.EncodeToString([]byte("v")))
		if _, err := m.etcdHTTP(ctx, m.Replica(i), "/v3/kv/put", []byte(body)); err != nil {
			t.Fatalf("put %s through member %d: %v", key, i, err)
		}
	}
	revisions := func() []int64 {
		t.Helper()
		var revs []int64
		for i := 1; i <= 3; i++ {
			rev, err := m.EtcdRevision(ctx, i)
			if err != nil {
				t.Fatal(err)
			}
			revs = append(revs, rev)
		}
		return revs
	}
	waitSameRevision := func() {
		t.Helper()
		err := WaitFor(ctx, 10*time.Second, func(ctx context.Context) (bool, error) {
			var revs []int64
			for i := 1; i <= 3; i++ {
				rev, err := m.EtcdRevision(ctx, i)
				if err != nil {
					return false, err
				}
				revs = append(revs, rev)
			}
			if slices.Min(revs) != slices.Max(revs) {
				return false, fmt.Errorf("revisions %v", revs)
			}
			return true, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	put(1, "a")
	waitSameRevision()
	before := revisions()[0]

	if err := m.StopEtcdMember(2); err != nil {
		t.Fatal(err)
	}
	if m.EtcdHealthy(ctx, 2) == nil {
		t.Error("a stopped member reports healthy")
	}
	for i := range 5 {
		put(1+2*(i%2), fmt.Sprintf("while-down-%d", i)) // members 1 and 3
	}
	if err := m.WaitEtcdHealthy(ctx, 10*time.Second); err != nil {
		t.Fatalf("the majority is unhealthy with one member down: %v", err)
	}
	if err := m.StartEtcdMember(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(m.Replica(2).Etcd.Args, "existing") {
		t.Errorf("restarted member's command line lacks --initial-cluster-state existing: %q", m.Replica(2).Etcd.Args)
	}
	waitSameRevision()
	if got := revisions()[1]; got != before+5 {
		t.Errorf("member 2 at revision %d after rejoining, want %d", got, before+5)
	}

	if err := m.Partition(ctx, 3); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(l.Resources(), "nftables table inet "+PartitionTable+" in "+m.Replica(3).Host.Namespace) {
		t.Errorf("partition table not recorded for Close: %v", l.Resources())
	}
	err = WaitFor(ctx, 15*time.Second, func(ctx context.Context) (bool, error) {
		if err := m.EtcdHealthy(ctx, 3); err == nil {
			return false, fmt.Errorf("member 3 still healthy")
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("partitioned member: %v", err)
	}
	for _, i := range []int{1, 2} {
		err := WaitFor(ctx, 10*time.Second, func(ctx context.Context) (bool, error) {
			err := m.EtcdHealthy(ctx, i)
			return err == nil, err
		})
		if err != nil {
			t.Errorf("majority member %d during the partition: %v", i, err)
		}
	}
	put(1, "during-partition")
	// The agents' side of the partition: a node host still reaches controller-3.
	node, err := l.AddHost(ctx, "node", FirstNodeAddr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := node.Exec(ctx, "ping", "-c", "1", "-W", "2", "-n", "-q", m.Replica(3).Host.Addr.String()); err != nil {
		t.Errorf("a node cannot reach the partitioned controller host: %v", err)
	}
	if _, err := m.Replica(3).Host.Exec(ctx, "ping", "-c", "1", "-W", "1", "-n", "-q", m.Replica(1).Host.Addr.String()); err == nil {
		t.Error("the partitioned host still reaches controller-1")
	}

	if err := m.Heal(ctx, 3); err != nil {
		t.Fatal(err)
	}
	if err := m.Heal(ctx, 3); err != nil {
		t.Errorf("second Heal: %v", err)
	}
	if err := m.WaitEtcdHealthy(ctx, 20*time.Second); err != nil {
		t.Fatalf("after Heal: %v", err)
	}
	waitSameRevision()
	for _, r := range l.Resources() {
		if strings.Contains(r, PartitionTable) {
			t.Errorf("Heal left %s recorded", r)
		}
	}
}

func TestConnectedReplicas(t *testing.T) {
	addrs := []netip.Addr{replicaAddr(1), replicaAddr(2), replicaAddr(3)}
	tests := []struct {
		name, out string
		want      []int
	}{
		{"none", "", nil},
		{"one", "0      0      192.0.2.11:41234      192.0.2.2:7443\n", []int{2}},
		{"two", "0 0 192.0.2.11:41234 192.0.2.2:7443\n0 0 192.0.2.11:41236 192.0.2.3:7443\n", []int{2, 3}},
		// Only the peer column counts: not a local port 7443, nor a peer that is
		// no controller.
		{"others", "0 0 192.0.2.1:7443 192.0.2.11:5555\n0 0 192.0.2.11:41234 192.0.2.12:7443\n0 0 192.0.2.11:1 192.0.2.1:7443 users:((\"x\",pid=1,fd=3))\n", []int{1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := slices.Sorted(maps.Keys(connectedReplicas(tt.out, addrs)))
			if !slices.Equal(got, tt.want) {
				t.Errorf("connectedReplicas(%q) = %v, want %v", tt.out, got, tt.want)
			}
		})
	}
}
