package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"segmesh/cmd/internal/daemonconfig"
)

// runController runs segmesh-controller with args and returns its standard
// output and error.
func runController(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := newCommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), err
}

// writeFile writes body to name in a test directory and returns its path.
func writeFile(t *testing.T, name, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestExampleConfig: packaging/controller.yaml names every flag of the daemon
// (as a key or a commented-out key) and check-config accepts it.
func TestExampleConfig(t *testing.T) {
	const example = "../../packaging/controller.yaml"
	data, err := os.ReadFile(example)
	if err != nil {
		t.Fatal(err)
	}
	newCommand().Flags().VisitAll(func(f *pflag.Flag) {
		if f.Name == daemonconfig.FlagName || f.Name == "help" {
			return
		}
		if !regexp.MustCompile(`(?m)^(# )?` + regexp.QuoteMeta(f.Name) + `:`).Match(data) {
			t.Errorf("%s does not mention key %q", example, f.Name)
		}
	})
	out, err := runController(t, "check-config", "--config", example)
	if err != nil {
		t.Fatalf("check-config %s: %v\n%s", example, err, out)
	}
	if !strings.Contains(out, "(file "+example+":") {
		t.Errorf("check-config output names no value from the file:\n%s", out)
	}
}

func TestCheckConfig(t *testing.T) {
	good := "data-dir: /var/lib/x\nlisten: 127.0.0.1:8443\nsan: [a.example, 192.0.2.1]\ntoken-ttl: 1h\n"
	tests := []struct {
		name string
		file string
		env  map[string]string
		args []string
		want []string // lines or parts of lines of the output or error; F is the file
		err  bool
	}{
		{name: "file", file: good, want: []string{
			"listen                      127.0.0.1:8443                       (file F:2:9)",
			"san                         [a.example,192.0.2.1]",
			"token-ttl                   1h0m0s",
			"gossip-port                 7946                                 (default)",
		}},
		{name: "env beats file", file: good, env: map[string]string{"SEGMESH_LISTEN": "127.0.0.1:9443", "SEGMESH_SAN": "b.example,c.example"},
			want: []string{"127.0.0.1:9443", "(env SEGMESH_LISTEN)", "[b.example,c.example]", "(env SEGMESH_SAN)"}},
		{name: "flag beats env and file", file: good, env: map[string]string{"SEGMESH_LISTEN": "127.0.0.1:9443"},
			args: []string{"--listen", "127.0.0.1:10443", "--token-ttl", "2h"},
			want: []string{"127.0.0.1:10443", "(flag --listen)", "2h0m0s", "(flag --token-ttl)"}},
		{name: "unknown key", file: good + "lisen: x\n", err: true,
			want: []string{`F:5:1: unknown key "lisen" (did you mean "listen"?)`}},
		{name: "wrong type", file: "data-dir: /x\nmax-connections: many\n", err: true,
			want: []string{`F:2:18: max-connections: invalid value "many": want an integer`}},
		{name: "bad duration", file: "data-dir: /x\nnode-cert-ttl: 30\n", err: true,
			want: []string{`F:2:16: node-cert-ttl: invalid value "30": want a duration`}},
		{name: "bad prefix names its source", file: "data-dir: /x\noverlay-prefix: [10.0.0.0]\n", err: true,
			want: []string{`F:2:17: overlay-prefix: "10.0.0.0" is not a prefix`}},
		{name: "bad prefix in env", env: map[string]string{"SEGMESH_OVERLAY_PREFIX": "10.0.0.0/8,x"}, args: []string{"--data-dir", "/x"}, err: true,
			want: []string{`$SEGMESH_OVERLAY_PREFIX: "x" is not a prefix`}},
		{name: "bad log level", file: "data-dir: /x\nlog-level: loud\n", err: true,
			want: []string{`F:2:12: log-level: "loud": want debug, info, warn or error`}},
		{name: "value the controller rejects", file: "data-dir: /x\nnode-cert-ttl: 1ms\n", err: true,
			want: []string{"node certificate lifetime 1ms: want between 1s and"}},
		{name: "bad env", env: map[string]string{"SEGMESH_GOSSIP_PORT": "x"}, args: []string{"--data-dir", "/x"}, err: true,
			want: []string{`$SEGMESH_GOSSIP_PORT="x": want an integer`}},
		{name: "data-dir required", file: "listen: 127.0.0.1:1\n", err: true,
			want: []string{`data-dir is required: give --data-dir, $SEGMESH_DATA_DIR or "data-dir:" in the --config file`}},
		{name: "env alone", env: map[string]string{"SEGMESH_DATA_DIR": "/x"},
			want: []string{"/x", "(env SEGMESH_DATA_DIR)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			path := "" // check-config without --config reads /etc/segmesh/controller.yaml
			if tt.file != "" {
				path = writeFile(t, "controller.yaml", tt.file)
			}
			out, err := runController(t, append([]string{"check-config", "--config", path}, tt.args...)...)
			if (err != nil) != tt.err {
				t.Fatalf("error = %v, want error %v\n%s", err, tt.err, out)
			}
			if err != nil {
				out = err.Error()
			}
			for _, w := range tt.want {
				if w = strings.ReplaceAll(w, "F:", path+":"); !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}

// TestDaemonReadsConfig: the daemon itself reads --config before starting, so a
// bad file stops it with the position of the problem.
func TestDaemonReadsConfig(t *testing.T) {
	path := writeFile(t, "controller.yaml", "data-dir: "+t.TempDir()+"\nlisten-port: 1\n")
	_, err := runController(t, "--config", path)
	if err == nil || !strings.Contains(err.Error(), path+`:2:1: unknown key "listen-port"`) {
		t.Fatalf("error = %v, want the unknown key at %s:2:1", err, path)
	}
}
