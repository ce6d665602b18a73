package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"segmesh/controller"
)

func runBackup(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := newCommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(io.Discard)
	cmd.SetArgs(append([]string{"backup"}, args...))
	err := cmd.ExecuteContext(context.Background())
	return out.String(), err
}

// TestBackupCommand: online while a controller runs, offline after it stopped,
// and usage errors.
func TestBackupCommand(t *testing.T) {
	dir := t.TempDir()
	c, err := controller.New(controller.Options{DataDir: dir, Listen: "127.0.0.1:0", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		}
	}
	defer stop()

	file := filepath.Join(t.TempDir(), "ctl.backup")
	out, err := runBackup(t, "--data-dir", dir, file)
	if err != nil {
		t.Fatalf("online backup: %v", err)
	}
	// A new controller has no node or policy, and one audit record: the admin credential.
	for _, want := range []string{"wrote " + file, "taken by the running controller", "nodes 0, policy revisions 0, audit records 1", "owner: controller CA sha256 "} {
		if !strings.Contains(out, want) {
			t.Errorf("online backup output %q lacks %q", out, want)
		}
	}
	stop()

	out, err = runBackup(t, "--data-dir", dir, file)
	if err != nil {
		t.Fatalf("offline backup: %v", err)
	}
	if !strings.Contains(out, "read from the store file") {
		t.Errorf("offline backup output %q", out)
	}

	usage := []struct {
		args []string
		want string
	}{
		{[]string{"--data-dir", dir}, "exactly one argument"},
		{[]string{file}, `"data-dir" not set`},
	}
	for _, u := range usage {
		if _, err := runBackup(t, u.args...); err == nil || !strings.Contains(err.Error(), u.want) {
			t.Errorf("backup %v: err = %v, want %q", u.args, err, u.want)
		}
	}
}
