package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/goccy/go-yaml"
	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"

	"segmesh/agent/firewall"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/api/wire"
	"segmesh/controller"
	"segmesh/policy"
)

// remoteEnv is a real controller (TLS, bbolt) serving on 127.0.0.1 in this
// process, and the CLI pointed at it through its operator.json.
type remoteEnv struct {
	t     *testing.T
	dir   string
	creds string
	stop  func()
	keys  map[string][]byte // node -> WireGuard public key
}

func newRemoteEnv(t *testing.T, dir string) *remoteEnv {
	t.Helper()
	c, err := controller.New(controller.Options{DataDir: dir, Listen: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	e := &remoteEnv{t: t, dir: dir, creds: filepath.Join(dir, controller.OperatorFile), keys: map[string][]byte{}}
	stopped := false
	e.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("controller Run: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("controller did not stop within 20s")
		}
	}
	t.Cleanup(e.stop)
	return e
}

// run executes the CLI with args against the controller and returns stdout,
// stderr and the exit code main would use.
func (e *remoteEnv) run(args ...string) (string, string, int) {
	e.t.Helper()
	root := newRootCmd()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(append([]string{"--credentials", e.creds}, args...))
	err := root.Execute()
	code := 0
	if err != nil {
		code = 2
		var ee *exitError
		if errors.As(err, &ee) {
			code = ee.code
		}
		if err.Error() != "" {
			errOut.WriteString(err.Error() + "\n")
		}
	}
	return out.String(), errOut.String(), code
}

// ok runs the CLI and fails the test unless it exits 0.
func (e *remoteEnv) ok(args ...string) string {
	e.t.Helper()
	out, errOut, code := e.run(args...)
	if code != 0 {
		e.t.Fatalf("segmesh %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

func (e *remoteEnv) credentials() credentials {
	e.t.Helper()
	var c credentials
	raw, err := os.ReadFile(e.creds)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		e.t.Fatal(err)
	}
	return c
}

// enroll creates a join token binding labels (through the CLI) and enrolls a node
// with a fresh WireGuard key the way an agent does.
func (e *remoteEnv) enroll(name string, labels ...string) {
	e.t.Helper()
	args := []string{"token", "create"}
	for _, l := range labels {
		args = append(args, "--label", l)
	}
	token := strings.TrimSpace(e.ok(args...))
	cred := e.credentials()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM([]byte(cred.CAPEM))
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: controllerServerName, MinVersion: tls.VersionTLS12}, ForceAttemptHTTP2: true}
	defer tr.CloseIdleConnections()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		e.t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		e.t.Fatal(err)
	}
	pub := make([]byte, 32)
	if _, err := rand.Read(pub); err != nil {
		e.t.Fatal(err)
	}
	_, err = segmeshv1connect.NewEnrollServiceClient(&http.Client{Transport: tr}, cred.Controller).Enroll(context.Background(),
		connect.NewRequest(&segmeshv1.EnrollRequest{Token: token, Name: name, PublicKey: pub, CsrDer: csr, Endpoint: "192.0.2.10:51820"}))
	if err != nil {
		e.t.Fatalf("enrolling %s: %v", name, err)
	}
	e.keys[name] = pub
}

// writeFile writes content to name in a fresh directory and returns its path.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

const remotePolicy = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
  - name: db
    selectors: [{role: db}]
  - name: ops
    selectors: [{role: ops}]
rules:
  - name: web-to-db
    from: [web]
    to: [db]
    ports: [tcp/5432]
`

const remotePolicyOps = remotePolicy + `  - name: ops-ssh
    from: [ops]
    to: [db, web]
    ports: [tcp/22, icmp]
`

// newMesh starts a controller with web-1, db-1 and ops-1 enrolled.
func newMesh(t *testing.T) *remoteEnv {
	e := newRemoteEnv(t, t.TempDir())
	e.enroll("web-1", "role=web")
	e.enroll("db-1", "role=db")
	e.enroll("ops-1", "role=ops")
	return e
}

func shortSHA(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])[:shortHashLen]
}

func TestPolicyHistoryAndRollback(t *testing.T) {
	e := newMesh(t)
	if out := e.ok("policy", "history"); !strings.Contains(out, "no policy has been applied yet") {
		t.Errorf("empty history = %q", out)
	}
	v1 := writeFile(t, "policy.yaml", remotePolicy)
	v2 := filepath.Join(filepath.Dir(v1), "policy-v2.yaml")
	if err := os.WriteFile(v2, []byte(remotePolicyOps), 0o644); err != nil {
		t.Fatal(err)
	}
	if out := e.ok("policy", "apply", v1); out != "applied revision 1\n" {
		t.Errorf("apply = %q", out)
	}
	e.ok("policy", "apply", v2)
	if out := e.ok("policy", "rollback", "1"); out != "applied revision 3 (the policy of revision 1)\n" {
		t.Errorf("rollback = %q", out)
	}
	if out := e.ok("policy", "rollback", "1"); out != "unchanged: revision 3 in force already holds the policy of revision 1\n" {
		t.Errorf("second rollback = %q", out)
	}
	if shown := e.ok("policy", "show"); shown != remotePolicy {
		t.Errorf("policy show after rollback = %q", shown)
	}

	// Table: one row per revision with the short content hash.
	table := e.ok("policy", "history")
	lines := strings.Split(strings.TrimSpace(table), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "REVISION") {
		t.Fatalf("history table:\n%s", table)
	}
	for i, want := range []struct{ rev, file, sha, note string }{
		{"1", v1, shortSHA(remotePolicy), "-"},
		{"2", v2, shortSHA(remotePolicyOps), "-"},
		{"3", v1, shortSHA(remotePolicy), "in force; rollback to 1"},
	} {
		f := strings.Fields(lines[i+1])
		if f[0] != want.rev || f[2] != "admin" || f[3] != want.file || f[4] != want.sha || strings.Join(f[5:], " ") != want.note {
			t.Errorf("history row %d = %q, want revision %s file %s sha %s note %q", i+1, lines[i+1], want.rev, want.file, want.sha, want.note)
		}
		if _, err := time.Parse(time.RFC3339, f[1]); err != nil {
			t.Errorf("history row %d applied time %q: %v", i+1, f[1], err)
		}
	}

	var h historyJSON
	if err := json.Unmarshal([]byte(e.ok("policy", "history", "-o", "json")), &h); err != nil {
		t.Fatal(err)
	}
	if h.ServingRevision != 3 || len(h.Revisions) != 3 || h.Revisions[2].RestoredFrom != 1 || !h.Revisions[2].InForce || h.Revisions[0].InForce ||
		h.Revisions[0].SHA256 != h.Revisions[2].SHA256 || len(h.Revisions[0].SHA256) != 64 {
		t.Errorf("history json = %+v", h)
	}

	tests := []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"missing revision", []string{"policy", "rollback", "9"}, 1, "policy revision 9 does not exist"},
		{"not a number", []string{"policy", "rollback", "two"}, 2, "want a revision number"},
		{"zero", []string{"policy", "rollback", "0"}, 2, "want a revision number"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, errOut, code := e.run(tt.args...)
			if code != tt.code || !strings.Contains(errOut, tt.msg) {
				t.Errorf("exit %d stderr %q; want exit %d with %q", code, errOut, tt.code, tt.msg)
			}
		})
	}
}

func TestPolicyRender(t *testing.T) {
	e := newMesh(t)
	file := writeFile(t, "policy.yaml", remotePolicy)
	e.ok("policy", "apply", file)

	var cur renderJSON
	if err := json.Unmarshal([]byte(e.ok("policy", "render", "--node", "web-1", "-o", "json")), &cur); err != nil {
		t.Fatal(err)
	}
	wantPeer := []peerJSON{{Name: "db-1", PublicKey: base64.StdEncoding.EncodeToString(e.keys["db-1"]), Endpoint: "192.0.2.10:51820",
		AllowedIPs: []string{"100.64.0.3/32", "fd5e:6d65:7368::3/128"}}}
	if d := cmp.Diff(wantPeer, cur.Peers); d != "" {
		t.Errorf("web-1 peers (-want +got):\n%s", d)
	}
	if cur.Revision != 1 || cur.NetmapRevision != 1 || cur.Changed != nil || len(cur.Hash) != 64 {
		t.Errorf("render = revision %d netmap revision %d changed %v hash %q", cur.Revision, cur.NetmapRevision, cur.Changed, cur.Hash)
	}
	// The ruleset is the agent firewall's table for web-1's compiled filter.
	want := policy.Filter{
		Sets: []policy.AddressSet{{Name: "db", Prefixes: mustPrefixes(t, "100.64.0.3/32", "fd5e:6d65:7368::3/128")}},
		Egress: []policy.FilterRule{{Set: "db", Origin: "web-to-db (" + file + ":10:5)",
			Matches: []policy.PortMatch{{Protocol: policy.ProtoTCP, Ports: []policy.PortRange{{First: 5432, Last: 5432}}}}}},
	}
	table, err := firewall.Build("segmesh0", want)
	if err != nil {
		t.Fatal(err)
	}
	if cur.Ruleset != table.String() {
		t.Errorf("ruleset:\n%s\nwant:\n%s", cur.Ruleset, table.String())
	}

	// Text output carries the same peer and ruleset.
	text := e.ok("policy", "render", "--node", "web-1", "--interface", "wg-x")
	for _, w := range []string{"node web-1 at policy revision 1", "WireGuard peers (1):", wantPeer[0].PublicKey, "192.0.2.10:51820",
		"100.64.0.3/32,fd5e:6d65:7368::3/128", `oifname "wg-x" jump egress`, "ip daddr @db_v4 tcp dport 5432 accept"} {
		if !strings.Contains(text, w) {
			t.Errorf("render text lacks %q:\n%s", w, text)
		}
	}

	// --file previews without storing.
	next := filepath.Join(filepath.Dir(file), "next.yaml")
	if err := os.WriteFile(next, []byte(remotePolicyOps), 0o644); err != nil {
		t.Fatal(err)
	}
	var prev renderJSON
	if err := json.Unmarshal([]byte(e.ok("policy", "render", "--node", "web-1", "--file", next, "-o", "json")), &prev); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range prev.Peers {
		names = append(names, p.Name)
	}
	if prev.Revision != 2 || prev.Changed == nil || !*prev.Changed || !slices.Equal(names, []string{"db-1", "ops-1"}) ||
		!strings.Contains(prev.Ruleset, "ip saddr @ops_v4 tcp dport 22 accept") || !strings.Contains(prev.Ruleset, "ip6 saddr @ops_v6 icmpv6 type echo-request accept") {
		t.Errorf("preview = revision %d changed %v peers %v ruleset:\n%s", prev.Revision, prev.Changed, names, prev.Ruleset)
	}
	if out := e.ok("policy", "history", "-o", "json"); strings.Count(out, `"revision"`) != 1 {
		t.Errorf("render --file stored a revision:\n%s", out)
	}

	tests := []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"unknown node", []string{"policy", "render", "--node", "ghost"}, 1, `node "ghost" is not enrolled`},
		{"invalid file", []string{"policy", "render", "--node", "web-1", "--file", writeFile(t, "bad.yaml", strings.Replace(remotePolicy, "to: [db]", "to: [dbx]", 1))}, 1, "bad.yaml:12:10:"},
		{"no node", []string{"policy", "render"}, 2, `"node" not set`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, errOut, code := e.run(tt.args...)
			if code != tt.code || !strings.Contains(errOut, tt.msg) {
				t.Errorf("exit %d stderr %q; want exit %d with %q", code, errOut, tt.code, tt.msg)
			}
		})
	}
}

func mustPrefixes(t *testing.T, ss ...string) []netip.Prefix {
	t.Helper()
	ps, err := wire.ParsePrefixes(ss)
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

// TestNodesListYAMLAndRemoteExplain: `nodes list -o yaml` writes an inventory the
// offline tools read, and `policy explain` without FILE and --inventory prints
// exactly what the offline command prints for the controller's policy and nodes.
func TestNodesListYAMLAndRemoteExplain(t *testing.T) {
	e := newMesh(t)
	file := writeFile(t, "policy.yaml", remotePolicyOps)
	e.ok("policy", "apply", file)

	inv := e.ok("nodes", "list", "-o", "yaml")
	nodes, err := policy.ParseInventory("nodes.yaml", []byte(inv))
	if err != nil {
		t.Fatalf("nodes list -o yaml does not parse as an inventory: %v\n%s", err, inv)
	}
	var names []string
	for _, n := range nodes {
		names = append(names, n.Name)
		if len(n.Addresses) != 2 || len(n.Labels) != 1 {
			t.Errorf("inventory node %+v", n)
		}
	}
	if !slices.Equal(names, []string{"db-1", "ops-1", "web-1"}) {
		t.Errorf("inventory nodes %v", names)
	}
	invFile := writeFile(t, "nodes.yaml", inv)

	queries := [][]string{
		{"--from", "web", "--to", "db", "--port", "tcp/5432"},
		{"--from", "web-1", "--to", "db-1", "--port", "tcp/22"},
		{"--from", "ops", "--to", "web-1", "--port", "icmp"},
		{"--from", "db", "--to", "100.64.0.2:5432", "--port", "tcp"},
	}
	for _, q := range queries {
		t.Run(strings.Join(q, " "), func(t *testing.T) {
			for _, format := range []string{"text", "json"} {
				offline := e.ok(append([]string{"policy", "explain", file, "--inventory", invFile, "-o", format}, q...)...)
				remote, errOut, code := e.run(append([]string{"policy", "explain", "-o", format}, q...)...)
				if code != 0 {
					t.Fatalf("remote explain: exit %d: %s", code, errOut)
				}
				if remote != offline {
					t.Errorf("remote explain (%s) differs from offline:\n--- remote\n%s\n--- offline\n%s", format, remote, offline)
				}
				if !strings.Contains(errOut, "policy revision 1 ("+file+") in force, 3 nodes") {
					t.Errorf("stderr %q does not name the fetched revision and nodes", errOut)
				}
			}
			// Against the controller, -o yaml is the JSON document as YAML (YAML
			// reads JSON too, so both decode to the same value).
			var fromJSON, fromYAML any
			if err := yaml.Unmarshal([]byte(e.ok(append([]string{"policy", "explain", "-o", "json"}, q...)...)), &fromJSON); err != nil {
				t.Fatal(err)
			}
			if err := yaml.Unmarshal([]byte(e.ok(append([]string{"policy", "explain", "-o", "yaml"}, q...)...)), &fromYAML); err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(fromJSON, fromYAML); d != "" || fromJSON == nil {
				t.Errorf("explain -o yaml differs from -o json (-json +yaml):\n%s", d)
			}
			// FILE against the controller's nodes is the same as well.
			if got, want := e.ok(append([]string{"policy", "explain", file}, q...)...),
				e.ok(append([]string{"policy", "explain", file, "--inventory", invFile}, q...)...); got != want {
				t.Errorf("explain FILE with the controller's nodes:\n%s\nwant\n%s", got, want)
			}
		})
	}
	if out := e.ok("policy", "explain", "--from", "web", "--to", "db", "--port", "tcp/5432"); !strings.Contains(out, "allowed") {
		t.Errorf("explain web -> db tcp/5432 = %q", out)
	}
}

// TestStatusShowsPolicyError: after the stored latest revision was edited by hand
// into an invalid policy, status says which revision is in force and why.
func TestStatusShowsPolicyError(t *testing.T) {
	dir := t.TempDir()
	e := newRemoteEnv(t, dir)
	e.enroll("web-1", "role=web")
	e.ok("policy", "apply", writeFile(t, "policy.yaml", remotePolicy))
	e.ok("policy", "apply", writeFile(t, "policy.yaml", remotePolicyOps))
	e.stop()

	db, err := bolt.Open(filepath.Join(dir, controller.StoreFile), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("policies")).Put(binary.BigEndian.AppendUint64(nil, 2), []byte(`{"revision": 2, "content": "not base64!"}`))
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}

	e = newRemoteEnv(t, dir)
	var st statusJSON
	if err := json.Unmarshal([]byte(e.ok("status", "-o", "json")), &st); err != nil {
		t.Fatal(err)
	}
	if st.PolicyRevision != 2 || st.ServingRevision != 1 || !strings.Contains(st.PolicyError, "revision 2 is unreadable") ||
		len(st.Nodes) != 1 || st.Nodes[0].DesiredRevision != 1 {
		t.Errorf("status json = %+v", st)
	}
	table := e.ok("status")
	for _, w := range []string{"policy revision: 2 (NOT IN FORCE: serving revision 1)", "policy error:\n  stored policy revision 2 is unreadable", "serving revision 1, the newest valid one"} {
		if !strings.Contains(table, w) {
			t.Errorf("status table lacks %q:\n%s", w, table)
		}
	}
	if out := e.ok("policy", "show"); out != remotePolicy {
		t.Errorf("policy show = %q, want revision 1 (in force)", out)
	}
	if out := e.ok("policy", "history"); !strings.Contains(out, "unreadable: ") {
		t.Errorf("history does not flag the unreadable revision:\n%s", out)
	}
}

// TestStatusNamesTheStoreOfARealController: against a real controller (bbolt),
// status names its store file and the controller that answered, which is also
// the only replica; a closed port before its URL is skipped.
func TestStatusNamesTheStoreOfARealController(t *testing.T) {
	dir := t.TempDir()
	e := newRemoteEnv(t, dir)
	var st statusJSON
	if err := json.Unmarshal([]byte(e.ok("status", "-o", "json")), &st); err != nil {
		t.Fatal(err)
	}
	if want := "bbolt " + filepath.Join(dir, controller.StoreFile); st.Store != want || st.Controller == "" || len(st.Controllers) != 1 {
		t.Fatalf("status: store %q controller %q controllers %q; want store %q, a controller and one replica", st.Store, st.Controller, st.Controllers, want)
	}
	table := e.ok("--controller", closedURL(t)+","+st.Controllers[0], "status")
	for _, w := range []string{"\nstore: bbolt " + filepath.Join(dir, controller.StoreFile) + "\n", "\ncontroller: " + st.Controller + "\n"} {
		if !strings.Contains(table, w) {
			t.Errorf("status table lacks %q:\n%s", w, table)
		}
	}
}
