package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// TestLifecycleAgainstController runs the operator commands against a real
// controller: the wire contract the fake of operator_cli_test.go stands in for.
func TestLifecycleAgainstController(t *testing.T) {
	e := newMesh(t)
	e.ok("policy", "apply", writeFile(t, "policy.yaml", remotePolicy+`tests:
  - name: web-reaches-db
    from: web-1
    to: db-1
    allow: [tcp/5432]
`))

	// A viewer reads and is refused every change, with exit code 1.
	viewer := filepath.Join(t.TempDir(), "viewer.json")
	if out := e.ok("operators", "create", "alice", "--role", "viewer", "--out", viewer); !strings.Contains(out, "operator alice (role viewer) created") {
		t.Errorf("operators create = %q", out)
	}
	asViewer := &remoteEnv{t: t, creds: viewer}
	asViewer.ok("status")
	asViewer.ok("nodes", "list")
	for _, args := range [][]string{{"nodes", "revoke", "web-1"}, {"nodes", "label", "web-1", "tier=1"}, {"token", "create"}, {"operators", "create", "bob", "--role", "admin", "--out", filepath.Join(t.TempDir(), "bob.json")}} {
		_, errOut, code := asViewer.run(args...)
		if code != 1 || !strings.Contains(errOut, "does not allow it") {
			t.Errorf("viewer %v: exit %d %q, want exit 1 saying the role does not allow it", args, code, errOut)
		}
	}

	// A relabel that breaks a policy test is refused with the controller's message,
	// exit 1, and changes nothing.
	_, errOut, code := e.run("nodes", "label", "db-1", "role=cache")
	if code != 1 || !strings.Contains(errOut, "web-reaches-db") || !strings.Contains(errOut, "the labels of db-1 are unchanged") {
		t.Errorf("breaking relabel: exit %d %q, want exit 1 naming the test", code, errOut)
	}
	var db nodeJSON
	if err := json.Unmarshal([]byte(e.ok("nodes", "show", "db-1", "-o", "json")), &db); err != nil || db.Labels["role"] != "db" {
		t.Errorf("db-1 after the refused relabel: %+v, %v", db.Labels, err)
	}

	// Relabel: the result is printed; ops-1 keeps its label.
	if out := e.ok("nodes", "label", "ops-1", "tier=1"); out != "node ops-1 labels: role=ops,tier=1\n" {
		t.Errorf("nodes label = %q", out)
	}

	// Revoke: the node stays listed as revoked, out of the inventory.
	if out := e.ok("nodes", "revoke", "web-1"); !strings.HasPrefix(out, "node web-1 revoked:") {
		t.Errorf("nodes revoke = %q", out)
	}
	var web nodeJSON
	if err := json.Unmarshal([]byte(e.ok("nodes", "show", "web-1", "-o", "json")), &web); err != nil {
		t.Fatal(err)
	}
	if web.State != nodeStateRevoked || web.RevokedAt == "" || web.RevokedBy != "admin" {
		t.Errorf("nodes show after revoke = %+v", web)
	}
	if inv := e.ok("nodes", "list", "-o", "yaml"); strings.Contains(inv, "web-1") {
		t.Errorf("the inventory holds the revoked node:\n%s", inv)
	}
	if out := e.ok("nodes", "delete", "web-1"); !strings.Contains(out, "quarantined until") {
		t.Errorf("nodes delete = %q", out)
	}

	// Tokens: listed without their secrets.
	var tokens []tokenJSON
	if err := json.Unmarshal([]byte(e.ok("token", "list", "-o", "json")), &tokens); err != nil {
		t.Fatal(err)
	}
	if len(tokens) != 3 || tokens[0].State != "used" || tokens[0].Creator != "admin" {
		t.Errorf("token list = %+v", tokens)
	}
	e.ok("token", "revoke", tokens[0].ID)

	// The audit log holds the changes and the refusals, and its chain is intact.
	var records []auditJSON
	if err := json.Unmarshal([]byte(e.ok("audit", "-o", "json")), &records); err != nil {
		t.Fatal(err)
	}
	actions := map[string]bool{}
	for _, r := range records {
		actions[r.Action] = true
	}
	for _, a := range []string{"node.revoke", "node.delete", "node.label", "token.revoke", "operator.create"} {
		if !actions[a] {
			t.Errorf("audit log lacks %s: %v", a, actions)
		}
	}
	if out := e.ok("audit", "verify"); !strings.HasPrefix(out, "audit log verified: ") || !strings.Contains(out, " records, chain intact\nhead: ") {
		t.Errorf("audit verify = %q", out)
	}
}
