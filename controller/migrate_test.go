package controller

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/controller/internal/etcdtest"
	"segmesh/controller/store/etcdstore"
)

// TestMigrate: a bbolt controller with nodes, a policy and an audit log is
// migrated into etcd (refused while it runs); a replica with a fresh data
// directory on that etcd then serves the same nodes, policy revision and audit
// log, has the same CA, and accepts the old operator.json token; a prefix an
// interrupted migrate left marked is refused by controllers.
func TestMigrate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "old")
	old := startController(t, dir)
	web := old.enroll(old.createToken(map[string]string{"role": "web"}, false), "web-1")
	old.enroll(old.createToken(map[string]string{"role": "db"}, false), "db-1")
	old.enroll(old.createToken(map[string]string{"role": "db"}, false), "db-2")
	if _, err := old.op().RevokeNode(bg, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: "db-2"})); err != nil {
		t.Fatal(err)
	}
	rev := apply(t, old, policyWebDB).Revision
	status, err := old.op().Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	auditBefore, err := old.op().ListAudit(bg, connect.NewRequest(&segmeshv1.ListAuditRequest{}))
	if err != nil {
		t.Fatal(err)
	}

	ep := etcdtest.New(t).URL()
	key := bytes.Repeat([]byte{0x5e}, 32)
	etcdCfg := etcdstore.Config{Endpoints: []string{ep}, SecretKey: key}
	quiet := slog.New(slog.DiscardHandler)
	if _, err := Migrate(bg, MigrateOptions{DataDir: dir, Etcd: etcdCfg, Logger: quiet}); err == nil || !strings.Contains(err.Error(), "stop the controller") {
		t.Fatalf("Migrate while the controller runs = %v, want a refusal saying to stop it", err)
	}
	old.stop()
	res, err := Migrate(bg, MigrateOptions{DataDir: dir, Etcd: etcdCfg, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if res.Stats.Records["nodes"] != 3 || res.Stats.Records["policies"] != 1 || res.Stats.Records["audit"] != len(auditBefore.Msg.Records) ||
		res.AdminOperator != AdminOperator || res.Prefix != etcdstore.DefaultPrefix || len(res.CAFingerprint) != 64 {
		t.Errorf("Migrate = %+v", res)
	}
	if _, err := Migrate(bg, MigrateOptions{DataDir: dir, Etcd: etcdCfg, Logger: quiet}); err == nil || !strings.Contains(err.Error(), "only fills an empty prefix") {
		t.Errorf("a second Migrate = %v, want a refusal of the filled prefix", err)
	}

	r := startControllerWith(t, filepath.Join(t.TempDir(), "fresh"), func(o *Options) {
		o.Store = StoreEtcd
		o.Etcd = etcdCfg
	})
	if r.cred.CAPEM != old.cred.CAPEM || r.cred.Token != old.cred.Token {
		t.Error("the replica's operator.json has another CA or token than the migrated controller's")
	}
	viaOld := r.operator(old.cred.Token) // the old credential file's token, against the replica
	got, err := viaOld.Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{}))
	if err != nil {
		t.Fatalf("Status on the replica with the old token: %v", err)
	}
	if got.Msg.PolicyRevision != rev {
		t.Errorf("replica policy revision %d, want %d", got.Msg.PolicyRevision, rev)
	}
	type nodeFacts struct {
		Name    string
		Addrs   []string
		Revoked int64
	}
	facts := func(ns []*segmeshv1.NodeStatus) []nodeFacts {
		var out []nodeFacts
		for _, n := range ns {
			out = append(out, nodeFacts{n.GetName(), n.GetAddresses(), n.GetRevokedUnix()})
		}
		return out
	}
	if a, b := facts(got.Msg.Nodes), facts(status.Msg.Nodes); !reflect.DeepEqual(a, b) || len(a) != 3 {
		t.Errorf("replica nodes %+v, want %+v", a, b)
	}
	auditAfter, err := viaOld.ListAudit(bg, connect.NewRequest(&segmeshv1.ListAuditRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	n := len(auditBefore.Msg.Records)
	if len(auditAfter.Msg.Records) < n {
		t.Fatalf("replica audit log has %d records, want at least the %d migrated", len(auditAfter.Msg.Records), n)
	}
	for i, want := range auditBefore.Msg.Records {
		if g := auditAfter.Msg.Records[i]; g.GetHash() != want.GetHash() || g.GetSeq() != want.GetSeq() {
			t.Errorf("audit record %d: replica %d %s, want %d %s", i, g.GetSeq(), g.GetHash(), want.GetSeq(), want.GetHash())
		}
	}
	v, err := viaOld.VerifyAudit(bg, connect.NewRequest(&segmeshv1.VerifyAuditRequest{}))
	if err != nil || !v.Msg.GetOk() {
		t.Errorf("VerifyAudit on the replica = %v, %v", v, err)
	}
	// The enrolled agent's identity is valid on the replica (same CA).
	s := r.sync(web, &segmeshv1.SyncRequest{Endpoint: "192.0.2.1:51820"})
	if nm := s.next(t); nm.GetSelf().GetName() != "web-1" || nm.GetPolicyRevision() != rev {
		t.Errorf("web-1's netmap from the replica: self %q revision %d, want web-1 at %d", nm.GetSelf().GetName(), nm.GetPolicyRevision(), rev)
	}

	// A prefix left marked by an interrupted migrate is refused at start.
	marked := etcdCfg
	marked.Prefix = "/interrupted/"
	st, err := etcdstore.Open(bg, marked)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Import(func(func(string, []byte, []byte) error) error { return nil }); err != nil {
		t.Fatal(err)
	}
	_ = st.Close()
	_, err = New(Options{DataDir: filepath.Join(t.TempDir(), "other"), Listen: "127.0.0.1:0", Logger: quiet, Store: StoreEtcd, Etcd: marked})
	if err == nil || !strings.Contains(err.Error(), "an interrupted migrate left /interrupted/ incomplete") {
		t.Errorf("New on a marked prefix = %v, want a refusal", err)
	}
}

// TestMigrateNeedsCA: a directory without a controller CA is refused before
// etcd is touched.
func TestMigrateNeedsCA(t *testing.T) {
	dir := t.TempDir()
	raw, _ := json.Marshal(OperatorCredential{Token: "x"})
	if err := os.WriteFile(filepath.Join(dir, OperatorFile), raw, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	_, err := Migrate(ctx, MigrateOptions{DataDir: dir, Etcd: etcdstore.Config{Endpoints: []string{"http://127.0.0.1:1"}}})
	if err == nil || !strings.Contains(err.Error(), "controller CA") {
		t.Errorf("Migrate without ca.crt = %v", err)
	}
}
