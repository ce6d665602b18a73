package daemonconfig

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

// testFlags is a flag set with one flag of every type the daemons use.
type testFlags struct {
	fs       *pflag.FlagSet
	listen   string
	port     int
	resync   time.Duration
	user     bool
	prefixes []string
	token    string
	config   string
}

func newTestFlags() *testFlags {
	t := &testFlags{fs: pflag.NewFlagSet("test", pflag.ContinueOnError)}
	t.fs.StringVar(&t.listen, "listen", "127.0.0.1:7443", "")
	t.fs.IntVar(&t.port, "listen-port", 51820, "")
	t.fs.DurationVar(&t.resync, "resync", 30*time.Second, "")
	t.fs.BoolVar(&t.user, "userspace", false, "")
	t.fs.StringArrayVar(&t.prefixes, "overlay-prefix", []string{"100.64.0.0/10", "fd5e:6d65:7368::/48"}, "")
	t.fs.StringVar(&t.token, "token", "", "")
	t.fs.StringVar(&t.config, FlagName, "", "")
	return t
}

// writeConfig writes body to a file in a test directory and returns its path.
func writeConfig(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "test.yaml")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// envMap returns a LookupEnv reading m.
func envMap(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestApply(t *testing.T) {
	tests := []struct {
		name string
		file string // "" for no file
		env  map[string]string
		args []string
		// want maps a flag to "value source"; source "file:L:C" is relative to the file.
		want map[string]string
	}{
		{
			name: "defaults",
			want: map[string]string{"listen": "127.0.0.1:7443 default", "listen-port": "51820 default", "overlay-prefix": "[100.64.0.0/10,fd5e:6d65:7368::/48] default"},
		},
		{
			name: "file",
			file: "listen: 0.0.0.0:8443\nlisten-port: 7000\nresync: 1m30s\nuserspace: true\noverlay-prefix:\n  - 10.0.0.0/8\n",
			want: map[string]string{
				"listen":         "0.0.0.0:8443 file:1:9",
				"listen-port":    "7000 file:2:14",
				"resync":         "1m30s file:3:9",
				"userspace":      "true file:4:12",
				"overlay-prefix": "[10.0.0.0/8] file:6:3",
			},
		},
		{
			name: "env beats file",
			file: "listen-port: 7000\nresync: 10s\n",
			env:  map[string]string{"SEGMESH_LISTEN_PORT": "7001", "SEGMESH_OVERLAY_PREFIX": "10.0.0.0/8,fd00::/48", "SEGMESH_RESYNC": ""},
			want: map[string]string{
				"listen-port":    "7001 env SEGMESH_LISTEN_PORT",
				"overlay-prefix": "[10.0.0.0/8,fd00::/48] env SEGMESH_OVERLAY_PREFIX",
				"resync":         "10s file:2:9", // an empty variable counts as unset
			},
		},
		{
			name: "flag beats env and file",
			file: "listen-port: 7000\noverlay-prefix: [10.0.0.0/8]\nuserspace: true\n",
			env:  map[string]string{"SEGMESH_LISTEN_PORT": "7001"},
			args: []string{"--listen-port", "7002", "--overlay-prefix", "192.168.0.0/16", "--userspace=false"},
			want: map[string]string{
				"listen-port":    "7002 flag --listen-port",
				"overlay-prefix": "[192.168.0.0/16] flag --overlay-prefix",
				"userspace":      "false flag --userspace",
			},
		},
		{
			name: "flow list with unquoted and quoted IPv6",
			file: "overlay-prefix: [fd00::/48, \"fd01::/48\", 2001:db8::/32]\n",
			want: map[string]string{"overlay-prefix": "[fd00::/48,fd01::/48,2001:db8::/32] file:1:17"},
		},
		{
			name: "empty list",
			file: "overlay-prefix: []\n",
			want: map[string]string{"overlay-prefix": "[] file:1:17"},
		},
		{
			name: "quoted scalars and an empty file body",
			file: "# only a comment\nlisten: \"[::1]:7443\"\nlisten-port: \"7000\"\n",
			want: map[string]string{"listen": "[::1]:7443 file:2:9", "listen-port": "7000 file:3:14"},
		},
		{
			name: "secret redacted",
			file: "token: abc\n",
			want: map[string]string{"token": "<redacted> file:1:8"},
		},
		{
			name: "token not read from the environment",
			env:  map[string]string{"SEGMESH_TOKEN": "abc"},
			want: map[string]string{"token": " default"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newTestFlags()
			if err := f.fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			path := ""
			if tt.file != "" {
				path = writeConfig(t, tt.file)
			}
			b := &Binder{EnvPrefix: "SEGMESH_", NoEnv: []string{"token"}, Secret: []string{"token"}, LookupEnv: envMap(tt.env)}
			eff, err := b.Apply(f.fs, path)
			if err != nil {
				t.Fatalf("Apply: %v", err)
			}
			got := map[string]string{}
			for _, en := range eff.Entries {
				src := en.Source.String()
				if en.Source.Kind == FromFile {
					src = strings.TrimPrefix(src, "file "+path)
					src = "file" + src
				}
				got[en.Name] = en.Value + " " + src
			}
			for k, w := range tt.want {
				if got[k] != w {
					t.Errorf("%s = %q, want %q", k, got[k], w)
				}
			}
			if _, ok := got[FlagName]; ok {
				t.Errorf("the %s flag is listed as a key", FlagName)
			}
			for name, e := range got {
				changed := f.fs.Lookup(name).Changed
				if fromDefault := strings.HasSuffix(e, " default"); changed == fromDefault {
					t.Errorf("%s: Changed = %v for %q", name, changed, e)
				}
			}
		})
	}
}

func TestApplyVariables(t *testing.T) {
	f := newTestFlags()
	path := writeConfig(t, "listen-port: 7000\nresync: 2m\noverlay-prefix: [10.0.0.0/8, 10.1.0.0/16]\n")
	b := &Binder{EnvPrefix: "SEGMESH_", LookupEnv: envMap(map[string]string{"SEGMESH_USERSPACE": "true"})}
	if _, err := b.Apply(f.fs, path); err != nil {
		t.Fatal(err)
	}
	if f.port != 7000 || f.resync != 2*time.Minute || !f.user || strings.Join(f.prefixes, " ") != "10.0.0.0/8 10.1.0.0/16" {
		t.Errorf("variables: port %d resync %v userspace %v prefixes %q", f.port, f.resync, f.user, f.prefixes)
	}
}

func TestApplyErrors(t *testing.T) {
	tests := []struct {
		name     string
		file     string
		env      map[string]string
		required []string
		want     []string // each a line of the error; "F" stands for the file's path
	}{
		{"unknown key with suggestion", "listen-prot: 1\n", nil, nil,
			[]string{`F:1:1: unknown key "listen-prot" (did you mean "listen-port"?)`}},
		{"unknown key", "colour: red\n", nil, nil,
			[]string{`F:1:1: unknown key "colour"; the keys are the flags of the command (see --help)`}},
		{"config key", "config: /x\n", nil, nil,
			[]string{`F:1:1: "config" names the configuration file; it cannot be set inside one`}},
		{"wrong type int", "listen-port: abc\n", nil, nil,
			[]string{`F:1:14: listen-port: invalid value "abc": want an integer`}},
		{"int out of range", "listen-port: 99999999999999999999\n", nil, nil,
			[]string{`F:1:14: listen-port: invalid value "99999999999999999999": out of range`}},
		{"duration without unit", "resync: 30\n", nil, nil,
			[]string{`F:1:9: resync: invalid value "30": want a duration such as 30s, 5m or 1h30m`}},
		{"bool", "userspace: yes\n", nil, nil,
			[]string{`F:1:12: userspace: invalid value "yes": want true or false`}},
		{"list for scalar", "listen: [a, b]\n", nil, nil,
			[]string{`F:1:9: listen must be a single value, got a list`}},
		{"scalar for list", "overlay-prefix: 10.0.0.0/8\n", nil, nil,
			[]string{`F:1:17: overlay-prefix must be a list, e.g. overlay-prefix: [100.64.0.0/10,fd5e:6d65:7368::/48], got a string`}},
		{"null", "listen:\n", nil, nil,
			[]string{`F:1:9: listen has no value: give one (e.g. VALUE), or remove the key to keep the default`}},
		{"null list item", "overlay-prefix: [10.0.0.0/8, ~]\n", nil, nil,
			[]string{`F:1:30: overlay-prefix item has no value: give one (e.g. 100.64.0.0/10,fd5e:6d65:7368::/48), or remove the key to keep the default`}},
		{"mapping value", "listen:\n  host: a\n", nil, nil,
			[]string{`F:2:3: listen must be a single value, got a mapping`}},
		{"not a mapping", "- a\n- b\n", nil, nil,
			[]string{`F:1:1: a configuration file is a mapping of keys to values (e.g. "log-level: info"), got a list`}},
		{"duplicate key", "listen: a\nlisten: b\n", nil, nil,
			[]string{`F:2:1: invalid YAML: mapping key "listen" already defined at [1:1]`}},
		{"anchor", "listen: &a x\n", nil, nil,
			[]string{`F:1:9: YAML anchors and aliases are not supported in configuration files; write the value out`}},
		{"tag", "listen-port: !!str 7\n", nil, nil,
			[]string{`F:1:14: YAML tags are not supported in configuration files; remove !!str`}},
		{"two documents", "listen: a\n---\nlisten: b\n", nil, nil,
			[]string{`F:3:1: a configuration file holds one YAML document; remove the extra document`}},
		{"invalid YAML", "listen: \"a\n", nil, nil,
			[]string{`F:1:9: invalid YAML:`}},
		{"every problem, sorted", "resync: x\nlisten-port: y\nbogus: 1\n", nil, nil,
			[]string{`F:1:9: resync: invalid value "x"`, `F:2:14: listen-port: invalid value "y"`, `F:3:1: unknown key "bogus"`}},
		{"bad env value names the variable", "", map[string]string{"SEGMESH_LISTEN_PORT": "seven"}, nil,
			[]string{`$SEGMESH_LISTEN_PORT="seven": want an integer`}},
		{"bad env duration", "", map[string]string{"SEGMESH_RESYNC": "5"}, nil,
			[]string{`$SEGMESH_RESYNC="5": want a duration such as 30s, 5m or 1h30m`}},
		{"bad file value reported even when env overrides it", "listen-port: x\n", map[string]string{"SEGMESH_LISTEN_PORT": "7"}, nil,
			[]string{`F:1:14: listen-port: invalid value "x": want an integer`}},
		{"required", "", nil, []string{"listen"},
			[]string{`listen is required: give --listen, $SEGMESH_LISTEN or "listen:" in the --config file`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newTestFlags()
			f.listen = "" // so that "required" has no default
			f.fs.Lookup("listen").DefValue = ""
			path := writeConfig(t, tt.file)
			b := &Binder{EnvPrefix: "SEGMESH_", Required: tt.required, LookupEnv: envMap(tt.env)}
			_, err := b.Apply(f.fs, path)
			var list ErrorList
			if !errors.As(err, &list) {
				t.Fatalf("Apply error = %v, want an ErrorList", err)
			}
			if len(list) != len(tt.want) {
				t.Errorf("got %d errors, want %d:\n%v", len(list), len(tt.want), err)
			}
			for i, w := range tt.want {
				w = strings.ReplaceAll(w, "F:", path+":")
				if i >= len(list) || !strings.Contains(list[i].Error(), w) {
					t.Errorf("error %d: got\n%v\nwant it to contain\n%s", i, err, w)
				}
			}
		})
	}
}

func TestApplyFileErrors(t *testing.T) {
	f := newTestFlags()
	b := &Binder{LookupEnv: envMap(nil)}
	if _, err := b.Apply(f.fs, filepath.Join(t.TempDir(), "missing.yaml")); err == nil || !strings.Contains(err.Error(), "reading the --config file") || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	big := writeConfig(t, strings.Repeat("#", MaxFileBytes+1))
	if _, err := b.Apply(f.fs, big); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("large file: %v", err)
	}
}

func TestEffectiveWrite(t *testing.T) {
	f := newTestFlags()
	path := writeConfig(t, "# controller\nlisten: 0.0.0.0:8443\n")
	if err := f.fs.Parse([]string{"--listen-port", "1"}); err != nil {
		t.Fatal(err)
	}
	b := &Binder{EnvPrefix: "SEGMESH_", LookupEnv: envMap(map[string]string{"SEGMESH_RESYNC": "1m"})}
	eff, err := b.Apply(f.fs, path)
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	if err := eff.Write(&out); err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{
		"listen          0.0.0.0:8443 ",
		"(file " + path + ":2:9)\n",
		"(flag --listen-port)\n",
		"(env SEGMESH_RESYNC)\n",
		"userspace       false",
	} {
		if !strings.Contains(out.String(), w) {
			t.Errorf("output lacks %q:\n%s", w, out.String())
		}
	}
}

func FuzzApplyFile(f *testing.F) {
	for _, s := range []string{
		"listen: 0.0.0.0:8443\nlisten-port: 7000\n",
		"overlay-prefix: [10.0.0.0/8, \"fd00::/48\"]\n",
		"overlay-prefix:\n  - fd00::/48\n",
		"resync: 1m\nuserspace: true\ntoken: |\n  abc\n",
		"listen: &a x\nlisten-port: *a\n",
		"- a\n",
		"a: b: c\n",
		"{listen: [}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fl := newTestFlags()
		sources := map[string]Source{}
		errs := applyFile(fl.fs, "f.yaml", data, sources)
		for _, e := range errs {
			var pe *Error
			if !errors.As(e, &pe) || pe.Pos.File != "f.yaml" || pe.Pos.Line < 1 || pe.Pos.Col < 0 {
				t.Fatalf("error without a position: %v", e)
			}
		}
		for name, s := range sources {
			if fl.fs.Lookup(name) == nil || s.Kind != FromFile || s.Pos.Line < 1 {
				t.Fatalf("bad source %q: %+v", name, s)
			}
		}
	})
}

func TestEffectiveErrorf(t *testing.T) {
	f := newTestFlags()
	path := writeConfig(t, "listen: x\n")
	if err := f.fs.Parse([]string{"--resync", "1s"}); err != nil {
		t.Fatal(err)
	}
	b := &Binder{EnvPrefix: "SEGMESH_", LookupEnv: envMap(map[string]string{"SEGMESH_LISTEN_PORT": "7"})}
	eff, err := b.Apply(f.fs, path)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{
		"listen":      path + ":1:9: listen: bad 1",
		"listen-port": "$SEGMESH_LISTEN_PORT: bad 1",
		"resync":      "--resync: bad 1",
		"userspace":   "--userspace: bad 1",
	} {
		if got := eff.Errorf(name, "bad %d", 1).Error(); got != want {
			t.Errorf("Errorf(%s) = %q, want %q", name, got, want)
		}
	}
	var pe *Error
	if !errors.As(eff.Errorf("listen", "x"), &pe) || pe.Pos.Line != 1 {
		t.Errorf("a file value's error is not an *Error at its position: %v", pe)
	}
}
