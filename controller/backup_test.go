package controller

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/controller/store"
)

const backupPolicy = `version: 1
segments:
  - name: web
    selectors: [{role: web}]
rules:
  - name: web-to-web
    from: [web]
    to: [web]
    ports: [tcp/443]
`

func nodeNames(t *testing.T, tc *testController) []string {
	t.Helper()
	resp, err := tc.op().ListNodes(context.Background(), connect.NewRequest(&segmeshv1.ListNodesRequest{}))
	if err != nil {
		t.Fatalf("ListNodes: %v", err)
	}
	var names []string
	for _, n := range resp.Msg.Nodes {
		names = append(names, n.Name)
	}
	return names
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	raw, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, raw, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestBackupAndRestore: an online backup of a running controller, restored into
// its data directory after it stopped, brings back exactly the backed-up state
// (nodes, policy, audit chain) and the enrolled agents keep working.
func TestBackupAndRestore(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	tc := startController(t, dir)
	a := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	apply(t, tc, backupPolicy)

	file := filepath.Join(t.TempDir(), "segmesh.backup")
	res, err := Backup(ctx, BackupOptions{DataDir: dir, File: file})
	if err != nil {
		t.Fatalf("Backup: %v", err)
	}
	if !res.Online || res.File != file || res.Summary.Nodes != 1 || res.Summary.PolicyRevisions != 1 || res.Summary.AuditRecords < 3 {
		t.Errorf("online backup: %+v, want online, 1 node, 1 policy revision, >= 3 audit records", res)
	}
	fi, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != res.Bytes || fi.Mode().Perm() != 0o600 {
		t.Errorf("backup file: %d bytes mode %v, want %d bytes mode 0600", fi.Size(), fi.Mode().Perm(), res.Bytes)
	}
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(file), ".*tmp*")); len(left) > 0 {
		t.Errorf("temporary files left next to the backup: %v", left)
	}

	// A change after the backup, which the restore must undo.
	tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-2")
	if got := nodeNames(t, tc); !slices.Equal(got, []string{"web-1", "web-2"}) {
		t.Fatalf("nodes before restore = %v", got)
	}
	tc.stop()

	copyFile(t, file, filepath.Join(dir, StoreFile))
	tc2 := startController(t, dir)
	if got := nodeNames(t, tc2); !slices.Equal(got, []string{"web-1"}) {
		t.Errorf("nodes after restore = %v, want [web-1]", got)
	}
	pol, err := tc2.op().GetPolicy(ctx, connect.NewRequest(&segmeshv1.GetPolicyRequest{}))
	if err != nil || pol.Msg.Revision != 1 || string(pol.Msg.Content) != backupPolicy {
		t.Errorf("policy after restore: %v, %v; want revision 1 with the applied content", pol, err)
	}
	v, err := tc2.op().VerifyAudit(ctx, connect.NewRequest(&segmeshv1.VerifyAuditRequest{}))
	if err != nil || !v.Msg.Ok || v.Msg.Records != uint64(res.Summary.AuditRecords) {
		t.Errorf("audit after restore: %v, %v; want an intact chain of %d records", v, err, res.Summary.AuditRecords)
	}
	// The restored node's certificate still works: same CA, same node record.
	s := tc2.sync(a, &segmeshv1.SyncRequest{Endpoint: "192.0.2.1:51820"})
	if nm := s.next(t); nm.PolicyRevision != 1 {
		t.Errorf("restored node's netmap revision = %d, want 1", nm.PolicyRevision)
	}
	s.cancel()
	tc2.stop()

	// With no controller running, the backup reads the file directly.
	res, err = Backup(ctx, BackupOptions{DataDir: dir, File: file})
	if err != nil {
		t.Fatalf("offline Backup: %v", err)
	}
	if res.Online || res.Summary.Nodes != 1 || res.Summary.AuditRecords < 3 {
		t.Errorf("offline backup: %+v, want offline, 1 node", res)
	}
}

func TestBackupRefusals(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	tc := startController(t, dir)

	// Online: only an admin credential may take a backup (it holds every secret).
	// The header is set on the request: tc.operator's interceptor is unary only.
	viewer, err := tc.op().CreateOperator(ctx, connect.NewRequest(&segmeshv1.CreateOperatorRequest{Name: "auditor", Role: store.RoleViewer}))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		token string
		want  connect.Code
	}{{"", connect.CodeUnauthenticated}, {"wrong", connect.CodeUnauthenticated}, {viewer.Msg.Token, connect.CodePermissionDenied}} {
		req := connect.NewRequest(&segmeshv1.BackupRequest{})
		if c.token != "" {
			req.Header().Set("Authorization", "Bearer "+c.token)
		}
		stream, err := tc.operator("").Backup(ctx, req)
		if err == nil {
			for stream.Receive() {
				t.Fatalf("token %q received backup data", c.token)
			}
			err = stream.Err()
		}
		wantCode(t, err, c.want)
	}

	if _, err := Backup(ctx, BackupOptions{DataDir: dir, File: filepath.Join(dir, ".", StoreFile)}); err == nil || !strings.Contains(err.Error(), "is the store itself") {
		t.Errorf("backup onto the store: err = %v", err)
	}
	tc.stop()

	// Offline, a damaged store is refused and nothing is written.
	if err := os.Truncate(filepath.Join(dir, StoreFile), 8192+100); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "b")
	if _, err := Backup(ctx, BackupOptions{DataDir: dir, File: file}); !errors.Is(err, store.ErrDamaged) {
		t.Errorf("backup of a damaged store: err = %v, want ErrDamaged", err)
	}
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("backup file written after a failure: %v", err)
	}
	if _, err := Backup(ctx, BackupOptions{DataDir: t.TempDir(), File: file}); err == nil || !strings.Contains(err.Error(), "no store in") {
		t.Errorf("backup of an empty directory: err = %v", err)
	}
}

// TestNewRefusesLostOrForeignStore: a controller whose store was emptied, or
// replaced by another controller's store, refuses to start, says why and what
// to do, and writes nothing.
func TestNewRefusesLostOrForeignStore(t *testing.T) {
	other := t.TempDir()
	startController(t, other).stop()
	tests := []struct {
		name    string
		damage  func(t *testing.T, db string)
		want    error
		wantMsg string
	}{
		{"zero-length store", func(t *testing.T, db string) {
			if err := os.Truncate(db, 0); err != nil {
				t.Fatal(err)
			}
		}, store.ErrLost, "restore controller.db from a backup"},
		{"store removed", func(t *testing.T, db string) {
			if err := os.Remove(db); err != nil {
				t.Fatal(err)
			}
		}, store.ErrLost, "docs/operations.md"},
		{"store of another controller", func(t *testing.T, db string) {
			copyFile(t, filepath.Join(other, StoreFile), db)
		}, store.ErrNotOwner, "copy its whole data directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			startController(t, dir).stop()
			db := filepath.Join(dir, StoreFile)
			tt.damage(t, db)
			before := dirContents(t, dir)
			_, err := New(Options{DataDir: dir, Listen: "127.0.0.1:0", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("New: err = %v, want %v saying %q", err, tt.want, tt.wantMsg)
			}
			if after := dirContents(t, dir); !maps.Equal(before, after) {
				t.Errorf("the refused start changed the data directory: file sizes before %v, after %v", sizes(before), sizes(after))
			}
		})
	}
}

// dirContents maps each file name in dir to its content.
func dirContents(t *testing.T, dir string) map[string]string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, e := range entries {
		raw, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = string(raw)
	}
	return out
}

// sizes maps each file name to its length, for a failure message.
func sizes(m map[string]string) map[string]int {
	out := map[string]int{}
	for k, v := range m {
		out[k] = len(v)
	}
	return out
}
