package etcdstore

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"

	"segmesh/controller/store"
	"segmesh/controller/store/storetest"
)

// endpoint is the client URL of the etcd server TestMain runs.
var endpoint string

// TestMain runs one real single-member etcd server on 127.0.0.1 (ports chosen
// by the kernel) with its data in a temporary directory, for every test.
func TestMain(m *testing.M) {
	os.Exit(runWithEtcd(m))
}

func runWithEtcd(m *testing.M) int {
	dir, err := os.MkdirTemp("", "etcdstore-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	cfg := embed.NewConfig()
	cfg.Dir = dir
	cfg.LogLevel = "panic" // its shutdown logs "errors" for closed listeners
	local := url.URL{Scheme: "http", Host: "127.0.0.1:0"}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{local}, []url.URL{local}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{local}, []url.URL{local}
	cfg.InitialCluster = cfg.Name + "=" + local.String()
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting etcd:", err)
		return 1
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		fmt.Fprintln(os.Stderr, "etcd did not become ready in 30 s")
		return 1
	}
	endpoint = "http://" + e.Clients[0].Addr().String()
	return m.Run()
}

var prefixes atomic.Int64

// newPrefix returns a key prefix no other test uses.
func newPrefix(t *testing.T) string {
	return fmt.Sprintf("/test-%d-%s/", prefixes.Add(1), t.Name())
}

// openAt opens a Store (its own client) on prefix, closed at cleanup.
func openAt(t *testing.T, prefix string, mod func(*Config)) *Store {
	t.Helper()
	cfg := Config{Endpoints: []string{endpoint}, Prefix: prefix, DialTimeout: 5 * time.Second, Logger: slog.New(slog.DiscardHandler)}
	if mod != nil {
		mod(&cfg)
	}
	s, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) (store.Store, func() store.Store) {
		prefix := newPrefix(t)
		s := openAt(t, prefix, nil)
		return s, func() store.Store {
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			return openAt(t, prefix, nil)
		}
	})
}
