// Package packaging tests what make package builds: the .deb and .rpm of
// segmesh-agent and segmesh-controller (nfpm definitions in nfpm/, units in
// systemd/, maintainer scripts in scripts/). The tests build the packages once,
// run lintian on the .debs, run systemd-analyze verify and security on the units as
// installed, install both .debs into a scratch root with dpkg --root and check
// files, owners and modes, then remove them and check that state stays, and run
// the packaged agent with CAP_NET_ADMIN alone in a network namespace.
//
// They need root (dpkg chowns in the scratch root; a network namespace) and dpkg,
// lintian, rpm, systemd-analyze, ip, nft and setpriv, which hack/deps.sh installs; a
// missing tool fails the test.
package packaging

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// built is the result of the one make package run shared by the tests.
var built struct {
	once sync.Once
	dir  string // BIN of that run; the packages are in dir/packages
	err  error
}

// workDir holds every directory the tests create; TestMain removes it.
var workDir string

func TestMain(m *testing.M) {
	d, err := os.MkdirTemp("", "segmesh-packaging-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "creating work directory:", err)
		os.Exit(1)
	}
	workDir = d
	code := m.Run()
	os.RemoveAll(d)
	os.Exit(code)
}

// need fails the test when a tool is missing.
func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found in PATH: run hack/deps.sh (as root) to install it", tool)
		}
	}
}

// run runs name with args and returns its combined output; it fails the test on a
// non-zero exit.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// packages runs make package once (BIN in the work directory) and returns the path
// of the package of kind ("deb" or "rpm") for each of segmesh-agent and
// segmesh-controller.
func packages(t *testing.T, kind string) map[string]string {
	t.Helper()
	need(t, "make", "git")
	built.once.Do(func() {
		built.dir = filepath.Join(workDir, "bin")
		cmd := exec.Command("make", "package", "BIN="+built.dir)
		cmd.Dir = ".."
		// Not the settings of a make running this test (make unit BIN=...).
		for _, kv := range os.Environ() {
			if k, _, _ := strings.Cut(kv, "="); k != "MAKEFLAGS" && k != "MFLAGS" && k != "MAKELEVEL" {
				cmd.Env = append(cmd.Env, kv)
			}
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			built.err = fmt.Errorf("make package: %w\n%s", err, out)
		}
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	pkgs := map[string]string{}
	for _, name := range []string{"segmesh-agent", "segmesh-controller"} {
		pattern := map[string]string{"deb": name + "_*.deb", "rpm": name + "-[0-9]*.rpm"}[kind]
		m, err := filepath.Glob(filepath.Join(built.dir, "packages", pattern))
		if err != nil || len(m) != 1 {
			t.Fatalf("want one %s in %s/packages, found %v (err %v)", pattern, built.dir, m, err)
		}
		pkgs[name] = m[0]
	}
	return pkgs
}

func TestLintianReportsNoErrors(t *testing.T) {
	need(t, "lintian")
	for name, deb := range packages(t, "deb") {
		// lintian exits non-zero on errors; the E: lines say which.
		out, err := exec.Command("lintian", "--tag-display-limit", "0", deb).CombinedOutput()
		var errs []string
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, "E: ") {
				errs = append(errs, l)
			}
		}
		if err != nil || len(errs) > 0 {
			t.Errorf("lintian %s: %v, errors:\n%s\nfull output:\n%s", name, err, strings.Join(errs, "\n"), out)
		}
	}
}

// unitRoot returns a scratch root holding both .debs' files (dpkg-deb -x) and the
// host's systemd units (the targets ours depend on), for systemd-analyze --root.
func unitRoot(t *testing.T) string {
	t.Helper()
	need(t, "dpkg-deb", "cp")
	root := filepath.Join(t.TempDir(), "root")
	for _, deb := range packages(t, "deb") {
		run(t, "dpkg-deb", "-x", deb, root)
	}
	run(t, "cp", "-an", "/usr/lib/systemd/system/.", filepath.Join(root, "usr/lib/systemd/system"))
	return root
}

var units = []string{"/usr/lib/systemd/system/segmesh-agent.service", "/usr/lib/systemd/system/segmesh-controller.service"}

// TestShippedConfigChecks runs the packaged daemons' check-config on the
// configuration files as installed, which the units pass with --config.
func TestShippedConfigChecks(t *testing.T) {
	root := unitRoot(t)
	for _, d := range []string{"segmesh-agent", "segmesh-controller"} {
		conf := filepath.Join(root, "etc/segmesh", strings.TrimPrefix(d, "segmesh-")+".yaml")
		run(t, filepath.Join(root, "usr/bin", d), "check-config", "--config", conf)
	}
}

func TestSystemdAnalyzeVerifyIsClean(t *testing.T) {
	need(t, "systemd-analyze")
	root := unitRoot(t)
	// verify exits 0 on warnings such as an unknown key; clean means no output.
	out, err := exec.Command("systemd-analyze", append([]string{"verify", "--root=" + root}, units...)...).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestSystemdAnalyzeSecurity logs the exposure of both units and fails when one
// regresses above the level the hardening reaches today (agent 2.0, controller 1.1,
// on systemd 252; 0 is best, 10 worst).
func TestSystemdAnalyzeSecurity(t *testing.T) {
	need(t, "systemd-analyze")
	root := unitRoot(t)
	limits := map[string]float64{units[0]: 2.0, units[1]: 1.1}
	level := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`)
	for _, u := range units {
		out := run(t, "systemd-analyze", "security", "--offline=yes", "--root="+root, u)
		m := level.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("systemd-analyze security %s: no overall exposure level in:\n%s", u, out)
		}
		got, _ := strconv.ParseFloat(m[1], 64)
		t.Logf("%s: exposure %.1f", filepath.Base(u), got)
		if got > limits[u] {
			t.Errorf("%s: exposure %.1f, want at most %.1f:\n%s", u, got, limits[u], out)
		}
	}
}

// TestUnitHardening checks the directives the security model asks for, so that a
// relaxed unit fails here and not only in a score.
func TestUnitHardening(t *testing.T) {
	tests := []struct {
		unit string
		want map[string]string // directive -> value (all values, space-joined)
	}{
		{"systemd/segmesh-controller.service", map[string]string{
			"User": "segmesh", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
			"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ReadWritePaths": "/var/lib/segmesh/controller",
			"RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "PrivateDevices": "yes", "ProtectHome": "yes",
			"ExecStart": "/usr/bin/segmesh-controller --config /etc/segmesh/controller.yaml",
		}},
		{"systemd/segmesh-agent.service", map[string]string{
			"User": "", "CapabilityBoundingSet": "CAP_NET_ADMIN", "AmbientCapabilities": "",
			"NoNewPrivileges": "yes", "ProtectSystem": "strict",
			"ReadWritePaths":          "/var/lib/segmesh-agent /run/segmesh /run/wireguard",
			"RestrictAddressFamilies": "AF_NETLINK AF_INET AF_INET6 AF_UNIX", "DeviceAllow": "/dev/net/tun rw",
			"ProtectHome": "yes", "ExecStart": "/usr/bin/segmesh-agent --config /etc/segmesh/agent.yaml",
		}},
	}
	for _, tt := range tests {
		got := readUnit(t, tt.unit)
		for k, v := range tt.want {
			if got[k] != v {
				t.Errorf("%s: %s=%q, want %q", tt.unit, k, got[k], v)
			}
		}
	}
}

// readUnit returns the [Service] directives of a unit file, the values of a
// repeated directive joined by spaces.
func readUnit(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m := map[string]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		switch {
		case l == "" || strings.HasPrefix(l, "#"):
		case strings.HasPrefix(l, "["):
			section = l
		case section == "[Service]":
			k, v, _ := strings.Cut(l, "=")
			if old, ok := m[k]; ok && old != "" {
				v = old + " " + v
			}
			m[k] = v
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return m
}

// entry is one expected path in the scratch root: mode (type and permissions),
// owner and group names (from the root's own /etc/passwd and /etc/group), and for
// a symbolic link its target.
type entry struct {
	path         string
	mode         os.FileMode
	owner, group string
	link         string
}

// scratchRoot makes an empty dpkg root: a database and an /etc with root only.
func scratchRoot(t *testing.T) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "root")
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, content := range map[string]string{
		"var/lib/dpkg/status": "", "var/lib/dpkg/available": "",
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n", "etc/group": "root:x:0:\n",
	} {
		if err := os.WriteFile(filepath.Join(root, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// dpkg runs dpkg on root. --force-script-chrootless runs the maintainer scripts
// with DPKG_ROOT=root instead of chrooting (the root has no shell);
// --force-depends because the root has no other package installed.
func dpkg(t *testing.T, root string, args ...string) string {
	t.Helper()
	base := []string{"--root=" + root, "--force-script-chrootless", "--force-not-root", "--force-depends", "--log=/dev/null"}
	return run(t, "dpkg", append(base, args...)...)
}

// ids reads id -> name from a passwd or group file of the scratch root.
func ids(t *testing.T, path string) map[uint32]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := map[uint32]string{}
	for _, l := range strings.Split(string(data), "\n") {
		f := strings.Split(l, ":")
		if len(f) < 3 {
			continue
		}
		id, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil {
			t.Fatalf("%s: bad id in %q", path, l)
		}
		m[uint32(id)] = f[0]
	}
	return m
}

// byName inverts an id -> name map.
func byName(m map[uint32]string) map[string]uint32 {
	r := make(map[string]uint32, len(m))
	for id, name := range m {
		r[name] = id
	}
	return r
}

// checkEntries compares each entry with what root holds; absent lists paths that
// must not exist.
func checkEntries(t *testing.T, root string, want []entry, absent []string) {
	t.Helper()
	users, groups := ids(t, filepath.Join(root, "etc/passwd")), ids(t, filepath.Join(root, "etc/group"))
	for _, e := range want {
		p := filepath.Join(root, e.path)
		fi, err := os.Lstat(p)
		if err != nil {
			t.Errorf("%s: %v", e.path, err)
			continue
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode() != e.mode || users[st.Uid] != e.owner || groups[st.Gid] != e.group {
			t.Errorf("%s: %v %s(%d):%s(%d), want %v %s:%s", e.path, fi.Mode(), users[st.Uid], st.Uid, groups[st.Gid], st.Gid, e.mode, e.owner, e.group)
		}
		if e.link != "" {
			if got, err := os.Readlink(p); err != nil || got != e.link {
				t.Errorf("%s: link to %q (%v), want %q", e.path, got, err, e.link)
			}
		}
	}
	for _, a := range absent {
		if _, err := os.Lstat(filepath.Join(root, a)); !os.IsNotExist(err) {
			t.Errorf("%s: still there after removal (%v)", a, err)
		}
	}
}

// TestDebInstallAndRemove installs both .debs into a scratch root, checks files,
// owners, modes, the controller's user and the enabled (not started) units, then
// removes both and checks that binaries and units go while state, edited
// configuration and the user stay.
func TestDebInstallAndRemove(t *testing.T) {
	need(t, "dpkg", "systemctl", "systemd-sysusers")
	if os.Geteuid() != 0 {
		t.Fatal("needs root: dpkg --root sets file owners in the scratch root; run the tests as root like make test")
	}
	debs := packages(t, "deb")
	root := scratchRoot(t)
	dpkg(t, root, "--install", debs["segmesh-agent"], debs["segmesh-controller"])

	const (
		dir    = os.ModeDir | 0o755
		exe    = os.FileMode(0o755)
		file   = os.FileMode(0o644)
		link   = os.ModeSymlink | 0o777
		wants  = "etc/systemd/system/multi-user.target.wants/"
		unitFs = "/usr/lib/systemd/system/"
	)
	installed := []entry{
		{path: "usr/bin/segmesh-agent", mode: exe, owner: "root", group: "root"},
		{path: "usr/bin/segmesh", mode: exe, owner: "root", group: "root"},
		{path: "usr/bin/segmesh-controller", mode: exe, owner: "root", group: "root"},
		{path: "usr/lib/systemd/system/segmesh-agent.service", mode: file, owner: "root", group: "root"},
		{path: "usr/lib/systemd/system/segmesh-controller.service", mode: file, owner: "root", group: "root"},
		{path: "usr/lib/sysusers.d/segmesh-controller.conf", mode: file, owner: "root", group: "root"},
		{path: "etc/segmesh", mode: dir, owner: "root", group: "root"},
		{path: "etc/segmesh/agent.yaml", mode: file, owner: "root", group: "root"},
		{path: "etc/segmesh/controller.yaml", mode: file, owner: "root", group: "root"},
		{path: "var/lib/segmesh-agent", mode: os.ModeDir | 0o700, owner: "root", group: "root"},
		{path: "var/lib/segmesh", mode: dir, owner: "root", group: "root"},
		{path: "var/lib/segmesh/controller", mode: os.ModeDir | 0o700, owner: "segmesh", group: "segmesh"},
		{path: "usr/share/doc/segmesh-agent/copyright", mode: file, owner: "root", group: "root"},
		{path: "usr/share/doc/segmesh-controller/changelog.Debian.gz", mode: file, owner: "root", group: "root"},
		// Enabled, not started (a chroot has no running systemd to start it in).
		{path: wants + "segmesh-agent.service", mode: link, owner: "root", group: "root", link: unitFs + "segmesh-agent.service"},
		{path: wants + "segmesh-controller.service", mode: link, owner: "root", group: "root", link: unitFs + "segmesh-controller.service"},
	}
	checkEntries(t, root, installed, nil)
	passwd, err := os.ReadFile(filepath.Join(root, "etc/passwd"))
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^segmesh:x:[1-9][0-9]*:[1-9][0-9]*:[^:]*:/var/lib/segmesh/controller:/usr/sbin/nologin$`).Match(passwd) {
		t.Errorf("no system user segmesh with home /var/lib/segmesh/controller and no login shell in etc/passwd:\n%s", passwd)
	}

	// What the daemons and the operator leave behind, which removal must keep.
	state := []entry{
		{path: "var/lib/segmesh-agent/node.key", mode: 0o600, owner: "root", group: "root"},
		{path: "var/lib/segmesh/controller/controller.db", mode: 0o600, owner: "segmesh", group: "segmesh"},
	}
	uid, gid := byName(ids(t, filepath.Join(root, "etc/passwd"))), byName(ids(t, filepath.Join(root, "etc/group")))
	for _, s := range state {
		p := filepath.Join(root, s.path)
		if err := os.WriteFile(p, []byte("state\n"), s.mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, int(uid[s.owner]), int(gid[s.group])); err != nil {
			t.Fatal(err)
		}
	}
	edited := filepath.Join(root, "etc/segmesh/agent.yaml")
	if err := os.WriteFile(edited, []byte("controller: https://ctl.example:7443\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	dpkg(t, root, "--remove", "segmesh-agent", "segmesh-controller")
	kept := append([]entry{
		{path: "etc/segmesh/agent.yaml", mode: file, owner: "root", group: "root"},
		{path: "var/lib/segmesh-agent", mode: os.ModeDir | 0o700, owner: "root", group: "root"},
		{path: "var/lib/segmesh/controller", mode: os.ModeDir | 0o700, owner: "segmesh", group: "segmesh"},
	}, state...)
	checkEntries(t, root, kept, []string{
		"usr/bin/segmesh-agent", "usr/bin/segmesh", "usr/bin/segmesh-controller",
		"usr/lib/systemd/system/segmesh-agent.service", "usr/lib/systemd/system/segmesh-controller.service",
		wants + "segmesh-agent.service", wants + "segmesh-controller.service",
	})
	if got, err := os.ReadFile(edited); err != nil || !strings.Contains(string(got), "ctl.example") {
		t.Errorf("edited agent.yaml not kept on remove: %q, %v", got, err)
	}
	if status := run(t, "dpkg-query", "--admindir="+filepath.Join(root, "var/lib/dpkg"), "-W", "-f=${Package} ${db:Status-Abbrev}\n"); !strings.Contains(status, "segmesh-agent rc") || !strings.Contains(status, "segmesh-controller rc") {
		t.Errorf("want both packages removed with their configuration kept (rc), dpkg-query says:\n%s", status)
	}
}

// TestRPMContents checks the .rpm of each package: its files with modes, its
// configuration files and its scripts (rpm cannot install into a scratch root
// without a populated rpm database and its own dependencies).
func TestRPMContents(t *testing.T) {
	need(t, "rpm")
	rpms := packages(t, "rpm")
	tests := []struct {
		name    string
		files   map[string]string // path -> octal mode as rpm prints it
		configs []string
	}{
		{"segmesh-agent", map[string]string{
			"/usr/bin/segmesh-agent": "100755", "/usr/bin/segmesh": "100755",
			"/usr/lib/systemd/system/segmesh-agent.service": "100644",
			"/etc/segmesh/agent.yaml":                       "100644", "/var/lib/segmesh-agent": "40700",
		}, []string{"/etc/segmesh/agent.yaml"}},
		{"segmesh-controller", map[string]string{
			"/usr/bin/segmesh-controller":                        "100755",
			"/usr/lib/systemd/system/segmesh-controller.service": "100644",
			"/usr/lib/sysusers.d/segmesh-controller.conf":        "100644",
			"/etc/segmesh/controller.yaml":                       "100644", "/var/lib/segmesh/controller": "40700",
		}, []string{"/etc/segmesh/controller.yaml"}},
	}
	for _, tt := range tests {
		out := run(t, "rpm", "-qp", "--queryformat", "[%{FILENAMES} %{FILEMODES:octal}\n]", rpms[tt.name])
		got := map[string]string{}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			if p, m, ok := strings.Cut(l, " "); ok {
				got[p] = m
			}
		}
		for p, m := range tt.files {
			if got[p] != m {
				t.Errorf("%s.rpm: %s mode %q, want %q (files: %v)", tt.name, p, got[p], m, got)
			}
		}
		configs := strings.Fields(run(t, "rpm", "-qpc", rpms[tt.name]))
		if strings.Join(configs, " ") != strings.Join(tt.configs, " ") {
			t.Errorf("%s.rpm: configuration files %v, want %v", tt.name, configs, tt.configs)
		}
		scripts := run(t, "rpm", "-qp", "--scripts", rpms[tt.name])
		for _, s := range []string{"postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet", "enable " + tt.name + ".service"} {
			if !strings.Contains(scripts, s) {
				t.Errorf("%s.rpm: scripts lack %q:\n%s", tt.name, s, scripts)
			}
		}
	}
}

// syncBuffer is an io.Writer safe for a process's output and the test reading it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// start runs a command in the background, its output in the returned buffer; the
// test's cleanup kills it by PID if it still runs.
func start(t *testing.T, name string, args ...string) (*exec.Cmd, *syncBuffer) {
	t.Helper()
	out := &syncBuffer{}
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		select {
		case <-done:
		default:
			_ = cmd.Process.Kill()
			<-done
		}
	})
	return cmd, out
}

// eventually polls cond every 100 ms until it holds or the deadline passes.
func eventually(t *testing.T, what string, timeout time.Duration, cond func() bool, logs ...*syncBuffer) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			var tails []string
			for _, l := range logs {
				tails = append(tails, l.String())
			}
			t.Fatalf("%s: not after %s; logs:\n%s", what, timeout, strings.Join(tails, "\n---\n"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestAgentNeedsOnlyCapNetAdmin runs the packaged agent as its unit does (root with
// the bounding set reduced to CAP_NET_ADMIN, no new privileges; setpriv stands in
// for systemd, which is not PID 1 here) in a fresh network namespace with a
// controller: it enrolls and programs its interface and table with no permission
// error. Stopping it leaves the table (fail closed); segmesh-agent down, with the
// same single capability, removes it.
func TestAgentNeedsOnlyCapNetAdmin(t *testing.T) {
	need(t, "ip", "nft", "setpriv")
	if os.Geteuid() != 0 {
		t.Fatal("needs root: creates a network namespace; run the tests as root like make test")
	}
	packages(t, "deb")
	bin := filepath.Join(built.dir, "packages", "bin")
	id := os.Getpid() % 100000
	ns, iface := fmt.Sprintf("smpkg-%d", id), fmt.Sprintf("smpkg%d", id) // the UAPI socket path is global: a name of our own
	run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	inNS := func(args ...string) []string { return append([]string{"netns", "exec", ns}, args...) }
	asUnit := func(args ...string) []string {
		return inNS(append([]string{"setpriv", "--bounding-set=-all,+net_admin", "--inh-caps=-all", "--no-new-privs", "--"}, args...)...)
	}
	tableThere := func() bool {
		return exec.Command("ip", inNS("nft", "list", "table", "inet", "segmesh")...).Run() == nil
	}

	dir := t.TempDir()
	data, state, tokenFile := filepath.Join(dir, "controller"), filepath.Join(dir, "agent"), filepath.Join(dir, "token")
	// The shipped configuration files, with flags (which win over the file) for
	// what a test must change.
	_, ctlLog := start(t, "ip", inNS(filepath.Join(bin, "segmesh-controller"), "--config", "controller.yaml", "--data-dir", data, "--listen", "127.0.0.1:17443")...)
	var token []byte
	eventually(t, "join token from the controller", 30*time.Second, func() bool {
		var err error
		token, err = exec.Command("ip", inNS(filepath.Join(bin, "segmesh"), "--credentials", filepath.Join(data, "operator.json"), "token", "create")...).Output()
		return err == nil
	}, ctlLog)
	if err := os.WriteFile(tokenFile, token, 0o600); err != nil {
		t.Fatal(err)
	}

	agent, agentLog := start(t, "ip", asUnit(filepath.Join(bin, "segmesh-agent"), "--config", "agent.yaml", "--controller", "https://127.0.0.1:17443",
		"--token-file", tokenFile, "--state-dir", state, "--interface", iface, "--userspace",
		"--endpoint", "198.51.100.7:51820")...) // a documentation address: no peer dials it here
	exited := func() bool { return syscall.Kill(agent.Process.Pid, 0) != nil }
	eventually(t, "agent connected with its interface and table", 30*time.Second, func() bool {
		if exited() {
			t.Fatalf("agent exited:\n%s", agentLog.String())
		}
		return strings.Contains(agentLog.String(), "connected to controller") && tableThere() &&
			exec.Command("ip", "-n", ns, "link", "show", iface).Run() == nil
	}, agentLog, ctlLog)
	if l := agentLog.String(); strings.Contains(l, "not permitted") || strings.Contains(l, "level=ERROR") {
		t.Errorf("agent with only CAP_NET_ADMIN logged a failure:\n%s", l)
	}

	if err := agent.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	eventually(t, "agent stopped", 30*time.Second, exited, agentLog)
	if !tableThere() {
		t.Fatalf("table inet segmesh gone after the agent stopped; the host must fail closed:\n%s", agentLog.String())
	}
	out := run(t, "ip", asUnit(filepath.Join(bin, "segmesh-agent"), "down", "--state-dir", state)...)
	if tableThere() {
		t.Fatalf("table inet segmesh still there after segmesh-agent down:\n%s", out)
	}
}
