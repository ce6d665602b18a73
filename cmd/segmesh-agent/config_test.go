package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/fake"
	"segmesh/cmd/internal/daemonconfig"
)

// runAgent runs segmesh-agent with args and a fake dataplane and returns its exit
// code, standard output and standard error.
func runAgent(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(args, strings.NewReader(""), &stdout, &stderr, factory(fake.New(dataplane.KindUserspace)))
	return code, stdout.String(), stderr.String()
}

// writeConfig writes body to agent.yaml (mode perm) in a test directory and
// returns its path.
func writeConfig(t *testing.T, body string, perm os.FileMode) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(path, []byte(body), perm); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, perm); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestExampleConfig: packaging/agent.yaml names every flag of the agent (as a
// key or a commented-out key) and check-config accepts it.
func TestExampleConfig(t *testing.T) {
	t.Setenv(tokenEnv, "")
	const example = "../../packaging/agent.yaml"
	data, err := os.ReadFile(example)
	if err != nil {
		t.Fatal(err)
	}
	root := newRootCmd(factory(fake.New(dataplane.KindUserspace)))
	for _, fs := range []*pflag.FlagSet{root.Flags(), root.PersistentFlags()} {
		fs.VisitAll(func(f *pflag.Flag) {
			if f.Name == daemonconfig.FlagName || f.Name == "help" {
				return
			}
			if !regexp.MustCompile(`(?m)^(# )?` + regexp.QuoteMeta(f.Name) + `:`).Match(data) {
				t.Errorf("%s does not mention key %q", example, f.Name)
			}
		})
	}
	code, out, errOut := runAgent(t, "check-config", "--config", example)
	if code != 0 {
		t.Fatalf("check-config %s: exit %d: %s", example, code, errOut)
	}
	if !strings.Contains(spaces.ReplaceAllString(out, " "), "state-dir /var/lib/segmesh-agent (file "+example+":") {
		t.Errorf("check-config output lacks state-dir from the file:\n%s", out)
	}
}

func TestCheckConfig(t *testing.T) {
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("smjt1_x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	good := "state-dir: /var/lib/x\nresync: 1m\nuserspace: true\nlisten-port: 51900\n"
	tests := []struct {
		name string
		file string
		perm os.FileMode // default 0644
		env  map[string]string
		args []string
		want []string // parts of the output, or of the error when err; F is the file
		err  bool
	}{
		{name: "file", file: good, want: []string{
			"state-dir     /var/lib/x    (file F:1:12)",
			"resync        1m0s          (file F:2:9)",
			"userspace     true          (file F:3:12)",
			"listen-port   51900         (file F:4:14)",
			"log-level     info          (default)",
		}},
		{name: "env beats file", file: good, env: map[string]string{"SEGMESH_RESYNC": "5s", "SEGMESH_LOG_LEVEL": "debug"},
			want: []string{"5s", "(env SEGMESH_RESYNC)", "debug", "(env SEGMESH_LOG_LEVEL)"}},
		{name: "flag beats env and file", file: good, env: map[string]string{"SEGMESH_RESYNC": "5s"},
			args: []string{"--resync", "7s", "--userspace=false", "--log-level", "warn"},
			want: []string{"7s", "(flag --resync)", "(flag --userspace)", "(flag --log-level)"}},
		{name: "token redacted", file: good + "token: smjt1_secret\n", perm: 0o600,
			want: []string{"token         <redacted>    (file F:5:8)"}},
		{name: "token file", file: good + "token-file: " + tokenFile + "\n", want: []string{"token-file", tokenFile}},
		{name: "token in a readable file", file: good + "token: smjt1_secret\n", err: true,
			want: []string{"holds the join token (token:) and has mode 0644", "chmod 600 F"}},
		{name: "token in file and env", file: good + "token: smjt1_secret\n", perm: 0o600, env: map[string]string{tokenEnv: "b"}, err: true,
			want: []string{"given by token in F:5:8 and $SEGMESH_TOKEN"}},
		{name: "empty token in file", file: good + "token: ''\n", perm: 0o600, err: true,
			want: []string{"token in F:5:8 is empty"}},
		{name: "token-file mode checked", file: good, args: []string{"--token-file", "/nonexistent/token"}, err: true,
			want: []string{"--token-file", "no such file"}},
		{name: "unknown key", file: good + "state_dir: /x\n", err: true,
			want: []string{`F:5:1: unknown key "state_dir" (did you mean "state-dir"?)`}},
		{name: "wrong type", file: "state-dir: /x\nuserspace: on\n", err: true,
			want: []string{`F:2:12: userspace: invalid value "on": want true or false`}},
		{name: "bad memory limit", file: "state-dir: /x\nmemory-limit: 1MiB\n", err: true,
			want: []string{`F:2:15: memory-limit: invalid value "1MiB": 1MiB is below 8MiB`}},
		{name: "bad log level names its source", file: "state-dir: /x\nlog-level: loud\n", err: true,
			want: []string{`F:2:12: log-level: "loud": want debug, info, warn or error`}},
		{name: "bad log level flag", args: []string{"--state-dir", "/x", "--log-level", "loud"}, err: true,
			want: []string{`--log-level: "loud": want debug, info, warn or error`}},
		{name: "bad env names the variable", env: map[string]string{"SEGMESH_LISTEN_PORT": "x"}, args: []string{"--state-dir", "/x"}, err: true,
			want: []string{`$SEGMESH_LISTEN_PORT="x": want an integer`}},
		{name: "state-dir required", file: "resync: 1m\n", err: true,
			want: []string{`state-dir is required: give --state-dir, $SEGMESH_STATE_DIR or "state-dir:" in the --config file`}},
		{name: "env alone", env: map[string]string{"SEGMESH_STATE_DIR": "/s", "SEGMESH_CONTROLLER": "https://192.0.2.1:7443"},
			want: []string{"(env SEGMESH_STATE_DIR)", "https://192.0.2.1:7443", "(env SEGMESH_CONTROLLER)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv(tokenEnv, "")
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			path := "" // check-config without --config reads /etc/segmesh/agent.yaml
			if tt.file != "" {
				path = writeConfig(t, tt.file, cmpOr(tt.perm, 0o644))
			}
			code, out, errOut := runAgent(t, append([]string{"check-config", "--config", path}, tt.args...)...)
			if (code != 0) != tt.err {
				t.Fatalf("exit %d, want error %v\nstdout %s\nstderr %s", code, tt.err, out, errOut)
			}
			if tt.err {
				out = errOut
			}
			out = spaces.ReplaceAllString(out, " ")
			for _, w := range tt.want {
				w = spaces.ReplaceAllString(strings.ReplaceAll(w, "F", path), " ")
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}

// spaces matches the runs of blanks that align check-config's columns.
var spaces = regexp.MustCompile(` +`)

// cmpOr returns p, or def when p is 0.
func cmpOr(p, def os.FileMode) os.FileMode {
	if p == 0 {
		return def
	}
	return p
}

// TestAgentReadsConfig: the agent itself takes its settings from --config: with
// state-dir, controller and token in the file it gets as far as parsing the token.
func TestAgentReadsConfig(t *testing.T) {
	t.Setenv(tokenEnv, "")
	state := filepath.Join(t.TempDir(), "state")
	path := writeConfig(t, "state-dir: "+state+"\ncontroller: https://127.0.0.1:9\ntoken: nope\nlog-level: error\n", 0o600)
	code, _, errOut := runAgent(t, "--config", path)
	if code != 1 || !strings.Contains(errOut, "reading the join token: malformed join token") {
		t.Fatalf("exit %d, stderr %q; want the malformed token error", code, errOut)
	}
	bad := writeConfig(t, "state-dir: "+state+"\nresync: soon\n", 0o600)
	if code, _, errOut = runAgent(t, "--config", bad); code != 1 || !strings.Contains(errOut, bad+`:2:9: resync: invalid value "soon"`) {
		t.Fatalf("exit %d, stderr %q; want the bad resync at %s:2:9", code, errOut, bad)
	}
}

// TestDownStateDir: down takes the state directory from --state-dir, else
// $SEGMESH_STATE_DIR, else the --config file, which it checks whole.
func TestDownStateDir(t *testing.T) {
	enrolled := enrolledDir(t)
	other := filepath.Join(t.TempDir(), "other")
	inFile := writeConfig(t, "state-dir: "+enrolled+"\nresync: 1m\nlog-level: error\n", 0o644)
	otherInFile := writeConfig(t, "state-dir: "+other+"\n", 0o644)
	bad := writeConfig(t, "state-dir: "+enrolled+"\nresync: x\n", 0o644)
	const removed = "nothing to remove: neither interface smt0 nor table inet segmesh exists"
	tests := []struct {
		name string
		args []string
		env  string // $SEGMESH_STATE_DIR
		want string // part of stdout, or of stderr on failure
		code int
	}{
		{name: "flag", args: []string{"--state-dir", enrolled}, want: removed},
		{name: "config file", args: []string{"--config", inFile}, want: removed},
		{name: "env beats file", args: []string{"--config", otherInFile}, env: enrolled, want: removed},
		{name: "flag beats file", args: []string{"--config", otherInFile, "--state-dir", enrolled}, want: removed},
		{name: "file state-dir used", args: []string{"--config", otherInFile}, code: 1, want: other},
		{name: "bad config", args: []string{"--config", bad}, code: 1, want: bad + `:2:9: resync: invalid value "x"`},
		{name: "no state-dir", code: 1, want: "state-dir is required: give --state-dir, $SEGMESH_STATE_DIR"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("SEGMESH_STATE_DIR", tt.env)
			code, out, errOut := runAgent(t, append([]string{"down"}, tt.args...)...)
			if code != tt.code {
				t.Fatalf("exit %d, want %d; stdout %q stderr %q", code, tt.code, out, errOut)
			}
			if code != 0 {
				out = errOut
			}
			if !strings.Contains(out, tt.want) {
				t.Errorf("output %q lacks %q", out, tt.want)
			}
		})
	}
}

// TestControllerFlag: --controller takes comma-separated URLs and adds up when
// repeated on the command line; the environment and the --config file (a scalar,
// as for agents before failover) give the whole list, and the usual precedence
// holds (a list is never merged across sources).
func TestControllerFlag(t *testing.T) {
	const a, b, c = "https://10.0.0.1:7443", "https://10.0.0.2:7443", "https://10.0.0.3:7443"
	tests := []struct {
		name string
		file string
		env  string // $SEGMESH_CONTROLLER
		args []string
		want string // the controller line of check-config, or part of the error
		err  bool
	}{
		{name: "one", args: []string{"--controller", a}, want: "controller " + a + " (flag --controller)"},
		{name: "comma-separated", args: []string{"--controller", a + ", " + b}, want: "controller " + a + "," + b + " (flag --controller)"},
		{name: "repeated", args: []string{"--controller", a, "--controller=" + b + "," + c}, want: "controller " + a + "," + b + "," + c + " (flag --controller)"},
		{name: "old config file: one URL", file: "controller: " + a + "\n", want: "controller " + a + " (file F:2:13)"},
		{name: "config file: several", file: "controller: " + a + "," + b + "\n", want: "controller " + a + "," + b + " (file F:2:13)"},
		{name: "env beats file", file: "controller: " + a + "\n", env: b + "," + c, want: "controller " + b + "," + c + " (env SEGMESH_CONTROLLER)"},
		{name: "flag beats env and file", file: "controller: " + a + "\n", env: b, args: []string{"--controller", c, "--controller", a},
			want: "controller " + c + "," + a + " (flag --controller)"},
		{name: "empty item", args: []string{"--controller", a + ",," + b}, err: true, want: "empty URL in the list"},
		{name: "empty item in the file", file: "controller: " + a + ",\n", err: true, want: "F:2:13: controller: invalid value"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv(tokenEnv, "")
			t.Setenv("SEGMESH_CONTROLLER", tt.env)
			path := writeConfig(t, "state-dir: /var/lib/x\n"+tt.file, 0o644)
			code, out, errOut := runAgent(t, append([]string{"check-config", "--config", path}, tt.args...)...)
			if (code != 0) != tt.err {
				t.Fatalf("exit %d, want error %v\nstdout %s\nstderr %s", code, tt.err, out, errOut)
			}
			if tt.err {
				out = errOut
			}
			out = spaces.ReplaceAllString(out, " ")
			if w := strings.ReplaceAll(tt.want, "F", path); !strings.Contains(out, w) {
				t.Errorf("output lacks %q:\n%s", w, out)
			}
		})
	}
}
