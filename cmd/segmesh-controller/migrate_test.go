package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"

	"segmesh/controller"
)

func runMigrate(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := newCommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(io.Discard)
	cmd.SetArgs(append([]string{"migrate"}, args...))
	err := cmd.ExecuteContext(context.Background())
	return out.String(), err
}

// startEtcd runs a single-member etcd server on 127.0.0.1 for the test and
// returns its client URL.
func startEtcd(t *testing.T) string {
	t.Helper()
	cfg := embed.NewConfig()
	cfg.Dir = t.TempDir()
	cfg.LogLevel = "panic"
	local := url.URL{Scheme: "http", Host: "127.0.0.1:0"}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{local}, []url.URL{local}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{local}, []url.URL{local}
	cfg.InitialCluster = cfg.Name + "=" + local.String()
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		t.Fatal("etcd did not become ready in 30 s")
	}
	return "http://" + e.Clients[0].Addr().String()
}

// TestMigrateCommand: flag errors name the flag; a stopped controller's data
// directory is migrated and the command prints the counts, the CA fingerprint
// and the next steps; a second run is refused.
func TestMigrateCommand(t *testing.T) {
	if _, err := runMigrate(t, "--etcd-endpoints", "http://127.0.0.1:1"); err == nil || !strings.Contains(err.Error(), "data-dir") {
		t.Errorf("migrate without --data-dir = %v", err)
	}
	if _, err := runMigrate(t, "--data-dir", t.TempDir(), "--etcd-endpoints", "127.0.0.1:2379"); err == nil || !strings.Contains(err.Error(), "--etcd-endpoints") {
		t.Errorf("migrate with a bad endpoint = %v", err)
	}

	dir := t.TempDir()
	c, err := controller.New(controller.Options{DataDir: dir, Listen: "127.0.0.1:0", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	ep := startEtcd(t)
	keyFile := writeFile(t, "secret.key", strings.Repeat("ab", 32)+"\n")
	args := []string{"--data-dir", dir, "--etcd-endpoints", ep, "--secret-key-file", keyFile, "--etcd-prefix", "/fleet/"}
	out, err := runMigrate(t, args...)
	if err != nil {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
	t.Log(out)
	for _, want := range []string{
		"migrated " + filepath.Join(dir, "controller.db") + " into etcd " + ep + " (prefix /fleet/), verified",
		"operators 1,", "controller CA sha256 ", `(operator "admin") shared`,
		"--store etcd --etcd-endpoints " + ep + " --etcd-prefix /fleet/ --secret-key-file " + keyFile,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("migrate output lacks %q:\n%s", want, out)
		}
	}
	if _, err := runMigrate(t, args...); err == nil || !strings.Contains(err.Error(), "only fills an empty prefix") {
		t.Errorf("a second migrate = %v, want a refusal", err)
	}
}
