package cluster

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"segmesh/controller/internal/etcdtest"
)

func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func start(t *testing.T, te *etcdtest.Server, name string, onChange func([]string)) *Cluster {
	t.Helper()
	return startWith(t, te, name, onChange, nil)
}

func startWith(t *testing.T, te *etcdtest.Server, name string, onChange func([]string), onPush func(string, []byte)) *Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Start(ctx, Config{Client: te.Client(t), Prefix: "/p/", Name: name, URL: "https://" + name,
		TTL: 2 * time.Second, OnStoreChange: onChange, OnPush: onPush, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// TestReplicasLeaderPresence: replicas see each other, exactly one leads, a
// replica's presence records reach the others (not itself), store changes are
// reported, and a closed replica vanishes with its records and leadership.
func TestReplicasLeaderPresence(t *testing.T) {
	te := etcdtest.New(t)
	var mu sync.Mutex
	var seen []string
	a := start(t, te, "a:1", nil)
	b := start(t, te, "b:1", func(keys []string) {
		mu.Lock()
		seen = append(seen, keys...)
		mu.Unlock()
	})
	eventually(t, 5*time.Second, "both replicas known to both", func() bool {
		return len(a.Replicas()) == 2 && len(b.Replicas()) == 2
	})
	eventually(t, 5*time.Second, "one leader", func() bool { return a.Leader() != b.Leader() })
	if err := a.PutPresence(context.Background(), "web-1", []byte("status")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "b sees a's presence", func() bool {
		p, ok := b.Presence("web-1")
		return ok && p.Replica == "a:1" && string(p.Value) == "status"
	})
	if _, ok := a.Presence("web-1"); ok {
		t.Error("a sees its own presence record as another replica's")
	}
	cli := te.Client(t)
	if _, err := cli.Put(context.Background(), "/p/nodes/web-1", "{}"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "b told of nodes/web-1", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return slices.Contains(seen, "nodes/web-1")
	})
	mu.Lock()
	for _, k := range seen {
		if k != "nodes/web-1" {
			t.Errorf("OnStoreChange got %q: only store keys belong there", k)
		}
	}
	mu.Unlock()
	// b takes a stale presence from a only while a's record is a's: a record of
	// b's for the same node is not deleted by a.
	if err := b.PutPresence(context.Background(), "web-1", []byte("moved")); err != nil {
		t.Fatal(err)
	}
	if err := a.DeletePresence(context.Background(), "web-1"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "a sees b's presence", func() bool {
		p, ok := a.Presence("web-1")
		return ok && p.Replica == "b:1"
	})
	a.Close()
	eventually(t, 5*time.Second, "b alone and leader", func() bool { return len(b.Replicas()) == 1 && b.Leader() })
}

// TestLeaseLoss: when etcd is gone for longer than the TTL the replica reports
// why (Err) and leads no more; when etcd is back it holds a lease again,
// registers again and its owner is asked to publish its presence again.
func TestLeaseLoss(t *testing.T) {
	te := etcdtest.New(t)
	var mu sync.Mutex
	sessions := 0
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Start(ctx, Config{Client: te.Client(t), Prefix: "/p/", Name: "a:1", URL: "https://a:1", TTL: 2 * time.Second,
		OnSession: func() { mu.Lock(); sessions++; mu.Unlock() }, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	eventually(t, 5*time.Second, "leader", c.Leader)
	changed := c.Changed()
	te.Stop()
	eventually(t, 10*time.Second, "the lease loss reported", func() bool { return c.Err() != nil })
	select {
	case <-changed:
	default:
		t.Error("Changed was not closed by the lease loss")
	}
	if c.Leader() {
		t.Error("a replica without a lease says it leads")
	}
	te.Start()
	eventually(t, 15*time.Second, "a lease again", func() bool { return c.Err() == nil })
	eventually(t, 5*time.Second, "leader again", c.Leader)
	resp, err := te.Client(t).Get(context.Background(), "/p/controllers/a:1")
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("registration after the new lease: %v %v", resp, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if sessions != 2 {
		t.Errorf("OnSession ran %d times, want 2 (first lease, new lease)", sessions)
	}
}

// TestPush: a message pushed by one replica reaches the others' OnPush once,
// not the sender's, and leaves no key behind.
func TestPush(t *testing.T) {
	te := etcdtest.New(t)
	var mu sync.Mutex
	got := map[string][]string{}
	rec := func(name string) func(string, []byte) {
		return func(node string, p []byte) {
			mu.Lock()
			got[name] = append(got[name], node+"="+string(p))
			mu.Unlock()
		}
	}
	a := startWith(t, te, "a:1", nil, rec("a"))
	startWith(t, te, "b:1", nil, rec("b"))
	if err := a.Push(context.Background(), "web-1", []byte("punch")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "b got the push", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got["b"]) > 0
	})
	mu.Lock()
	if !slices.Equal(got["b"], []string{"web-1=punch"}) || len(got["a"]) != 0 {
		t.Errorf("pushes received: %v, want b: [web-1=punch] and none for a", got)
	}
	mu.Unlock()
	resp, err := te.Client(t).Get(context.Background(), "/p/push/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil || resp.Count != 0 {
		t.Errorf("push keys left: %v %v", resp, err)
	}
}
