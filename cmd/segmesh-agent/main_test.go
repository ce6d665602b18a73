package main

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
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
		code := run([]string{"down", "--state-dir", dir, "--log-level", "error"}, nil, &stdout, &stderr, factory(tt.dp))
		if code != tt.code || stdout.String() != tt.stdout || stderr.String() != tt.stderr {
			t.Errorf("%s: exit %d, stdout %q, stderr %q; want %d, %q, %q", tt.name, code, stdout.String(), stderr.String(), tt.code, tt.stdout, tt.stderr)
		}
	}
}

func TestRefusesCleartextController(t *testing.T) {
	for _, url := range []string{"http://127.0.0.1:7443", "https://"} {
		dir := filepath.Join(t.TempDir(), "state")
		var stdout, stderr bytes.Buffer
		code := run([]string{"--controller", url, "--token", "x", "--state-dir", dir}, nil, &stdout, &stderr, factory(fake.New(dataplane.KindUserspace)))
		if code != 1 || !bytes.HasPrefix(stderr.Bytes(), []byte("segmesh-agent: --controller \""+url+"\"")) || !bytes.Contains(stderr.Bytes(), []byte("want https://HOST:PORT")) {
			t.Errorf("%s: exit %d, stderr %q; want exit 1 and an error naming --controller", url, code, stderr.String())
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: state directory created", url)
		}
	}
}

// TestTokenSources: the join token comes from exactly one of --token,
// --token-file FILE, --token-file - (standard input) and $SEGMESH_TOKEN, and reaches
// the agent (a malformed token is refused by the agent's decoder, which proves it
// arrived); a token file that others may read is refused with its mode and the fix.
func TestTokenSources(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("token", "  not-a-token-from-file\n", 0o600)
	readOnly := write("token-0400", "not-a-token-0400\n", 0o400)
	groupReadable := write("token-0640", "x\n", 0o640)
	worldReadable := write("token-0644", "x\n", 0o644)
	empty := write("empty", " \n", 0o600)
	const reached = "reading the join token: malformed join token"
	tests := []struct {
		name  string
		args  []string
		env   string
		stdin string
		want  []string // substrings of stderr
	}{
		{name: "flag", args: []string{"--token", "nope-flag"}, want: []string{reached}},
		{name: "file", args: []string{"--token-file", good}, want: []string{reached}},
		{name: "file 0400", args: []string{"--token-file", readOnly}, want: []string{reached}},
		{name: "stdin", args: []string{"--token-file", "-"}, stdin: "nope-stdin\n", want: []string{reached}},
		{name: "env", env: "nope-env", want: []string{reached}},
		{name: "no token at all", want: []string{"needs a join token (--token-file FILE"}},
		{name: "group-readable file", args: []string{"--token-file", groupReadable},
			want: []string{"--token-file " + groupReadable + " has mode 0640", "chmod 600 " + groupReadable}},
		{name: "world-readable file", args: []string{"--token-file", worldReadable},
			want: []string{"has mode 0644", "chmod 600 " + worldReadable}},
		{name: "missing file", args: []string{"--token-file", filepath.Join(dir, "missing")}, want: []string{"--token-file", "no such file"}},
		{name: "directory", args: []string{"--token-file", dir}, want: []string{"is not a regular file"}},
		{name: "empty file", args: []string{"--token-file", empty}, want: []string{"empty"}},
		{name: "empty stdin", args: []string{"--token-file", "-"}, want: []string{"standard input", "empty"}},
		{name: "empty flag", args: []string{"--token", ""}, want: []string{"--token is empty"}},
		{name: "flag and env", args: []string{"--token", "a"}, env: "b", want: []string{"--token and $SEGMESH_TOKEN", "one way only"}},
		{name: "flag and file", args: []string{"--token", "a", "--token-file", good}, want: []string{"--token and --token-file"}},
		{name: "file and env", args: []string{"--token-file", good}, env: "b", want: []string{"--token-file and $SEGMESH_TOKEN"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv(tokenEnv, tt.env)
			state := filepath.Join(t.TempDir(), "state")
			args := append([]string{"--controller", "https://127.0.0.1:9", "--state-dir", state, "--log-level", "error"}, tt.args...)
			var stdout, stderr bytes.Buffer
			code := run(args, strings.NewReader(tt.stdin), &stdout, &stderr, factory(fake.New(dataplane.KindUserspace)))
			if code != 1 {
				t.Fatalf("exit %d, want 1; stderr %q", code, stderr.String())
			}
			for _, w := range tt.want {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr %q does not contain %q", stderr.String(), w)
				}
			}
		})
	}
}

func TestResolveTokenTrims(t *testing.T) {
	p := filepath.Join(t.TempDir(), "tok")
	if err := os.WriteFile(p, []byte("\n smjt1_abc \r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, src := range []tokenSources{{Flag: " smjt1_abc\n", FlagSet: true}, {File: p}, {Env: "smjt1_abc\n"}, {File: "-"}} {
		got, err := resolveToken(src, strings.NewReader("smjt1_abc\n"))
		if err != nil || got != "smjt1_abc" {
			t.Errorf("%+v: %q, %v; want smjt1_abc", src, got, err)
		}
	}
	if got, err := resolveToken(tokenSources{}, nil); got != "" || err != nil {
		t.Errorf("no source: %q, %v", got, err)
	}
	big := filepath.Join(t.TempDir(), "big")
	if err := os.WriteFile(big, bytes.Repeat([]byte("a"), maxTokenBytes+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := resolveToken(tokenSources{File: big}, nil); err == nil || !strings.Contains(err.Error(), "more than") {
		t.Errorf("oversized token file: %v", err)
	}
}

// TestHelpWarnsAboutTokenFlag: --help says that --token is visible to other users
// and names the alternatives.
func TestHelpWarnsAboutTokenFlag(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"--help"}, nil, &stdout, &stderr, factory(fake.New(dataplane.KindUserspace))); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	var line string
	for l := range strings.Lines(stdout.String()) {
		if strings.Contains(l, "--token string") {
			line = l
		}
	}
	for _, w := range []string{"visible to every local user", "process list", "prefer --token-file or $SEGMESH_TOKEN"} {
		if !strings.Contains(line, w) {
			t.Errorf("--token help %q does not say %q", line, w)
		}
	}
	if !strings.Contains(stdout.String(), "--token-file") {
		t.Error("--help does not list --token-file")
	}
}
