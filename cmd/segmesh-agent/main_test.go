package main

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/fake"
	"segmesh/agent/statefile"
)

// refusingDP is a fake whose Down fails, as the Linux dataplane's does while an
// agent still runs.
type refusingDP struct {
	*fake.Dataplane
	err error
}

func (d *refusingDP) Down(context.Context) error { return d.err }

// enrolledDir returns a state directory holding an identity for interface smt0.
func enrolledDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "state")
	d, err := statefile.Open(dir, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.SaveIdentity(statefile.Identity{NodeName: "web-1", Addresses: []string{"100.64.0.1/32"}, Controller: "https://127.0.0.1:7443", Interface: "smt0", ListenPort: 51820}); err != nil {
		t.Fatal(err)
	}
	return dir
}

func factory(dp dataplane.Dataplane) dataplaneFactory {
	return func(bool, *slog.Logger) func(string) (dataplane.Dataplane, error) {
		return func(string) (dataplane.Dataplane, error) { return dp, nil }
	}
}

func TestDownPrintsWhatItRemoved(t *testing.T) {
	dir := enrolledDir(t)
	dp := fake.New(dataplane.KindUserspace)
	up := dataplane.State{Interface: "smt0", Filter: dataplane.Filter{Sets: []dataplane.AddressSet{{Name: "db"}}}}
	if err := dp.Apply(context.Background(), up); err != nil {
		t.Fatal(err)
	}
	running := &refusingDP{Dataplane: fake.New(dataplane.KindUserspace), err: errors.New("an agent (pid 42) still runs for interface smt0; stop it first")}
	tests := []struct {
		name           string
		dp             dataplane.Dataplane
		code           int
		stdout, stderr string
	}{
		{name: "interface and table", dp: dp, stdout: "removed interface smt0 and table inet segmesh\n"},
		{name: "again: nothing", dp: dp, stdout: "nothing to remove: neither interface smt0 nor table inet segmesh exists\n"},
		{name: "agent still runs", dp: running, code: 1,
			stderr: "segmesh-agent: taking down smt0: an agent (pid 42) still runs for interface smt0; stop it first\n"},
	}
	for _, tt := range tests {
		var stdout, stderr bytes.Buffer
		code := run([]string{"down", "--state-dir", dir, "--log-level", "error"}, &stdout, &stderr, factory(tt.dp))
		if code != tt.code || stdout.String() != tt.stdout || stderr.String() != tt.stderr {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want %d, %q, %q", tt.name, code, stdout.String(), stderr.String(), tt.code, tt.stdout, tt.stderr)
		}
	}
}

func TestRefusesCleartextController(t *testing.T) {
	for _, url := range []string{"http://127.0.0.1:7443", "https://"} {
		dir := filepath.Join(t.TempDir(), "state")
		var stdout, stderr bytes.Buffer
		code := run([]string{"--controller", url, "--token", "x", "--state-dir", dir}, &stdout, &stderr, factory(fake.New(dataplane.KindUserspace)))
		if code != 1 || !bytes.HasPrefix(stderr.Bytes(), []byte("segmesh-agent: --controller \""+url+"\"")) || !bytes.Contains(stderr.Bytes(), []byte("want https://HOST:PORT")) {
			t.Errorf("%s: exit %d, stderr %q; want exit 1 and an error naming --controller", url, code, stderr.String())
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: state directory created", url)
		}
	}
}
