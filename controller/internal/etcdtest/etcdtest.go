// Package etcdtest runs a real one-member etcd server (go.etcd.io/etcd/server/v3
// embed) on loopback for tests, on fixed ports so that a test can stop it and
// start it again on the same data directory and URL.
package etcdtest

import (
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
)

// Server is one etcd member. Its methods are safe for concurrent use.
type Server struct {
	t            testing.TB
	dir          string
	client, peer url.URL
	mu           sync.Mutex
	e            *embed.Etcd
}

// New starts a member and stops it at the test's cleanup.
func New(t testing.TB) *Server {
	t.Helper()
	s := &Server{t: t, dir: t.TempDir(),
		client: url.URL{Scheme: "http", Host: freePort(t)}, peer: url.URL{Scheme: "http", Host: freePort(t)}}
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

func freePort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// URL is the client URL, e.g. "http://127.0.0.1:40123".
func (s *Server) URL() string { return s.client.String() }

// Start starts the member (again) and waits until it serves, up to 30 s.
func (s *Server) Start() {
	s.t.Helper()
	cfg := embed.NewConfig()
	cfg.Dir = s.dir
	cfg.LogLevel = "panic" // its shutdown logs "errors" for closed listeners
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{s.client}, []url.URL{s.client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{s.peer}, []url.URL{s.peer}
	cfg.InitialCluster = cfg.Name + "=" + s.peer.String()
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		s.t.Fatal(err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		s.t.Fatal("etcd did not become ready in 30 s")
	}
	s.mu.Lock()
	s.e = e
	s.mu.Unlock()
}

// Stop stops the member; a no-op when it is stopped.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.e != nil {
		s.e.Close()
		s.e = nil
	}
}

// Client returns a client of the member, closed at the test's cleanup.
func (s *Server) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{s.URL()}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}
