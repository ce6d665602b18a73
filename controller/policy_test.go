package controller

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"connectrpc.com/connect"
	bolt "go.etcd.io/bbolt"

	"segmesh/api/segmeshv1"
	"segmesh/controller/store"
)

const policyOpsSSH = policyWebDB + "  - name: ops-ssh\n    from: [ops]\n    to: [db]\n    ports: [tcp/22]\n"

func (tc *testController) status() *segmeshv1.StatusResponse {
	tc.t.Helper()
	resp, err := tc.op().Status(bg, connect.NewRequest(&segmeshv1.StatusRequest{}))
	if err != nil {
		tc.t.Fatalf("Status: %v", err)
	}
	return resp.Msg
}

func (tc *testController) history() []*segmeshv1.PolicyRevision {
	tc.t.Helper()
	resp, err := tc.op().ListPolicyRevisions(bg, connect.NewRequest(&segmeshv1.ListPolicyRevisionsRequest{}))
	if err != nil {
		tc.t.Fatalf("ListPolicyRevisions: %v", err)
	}
	return resp.Msg.Revisions
}

// auditActions returns the actions of the audit records that succeeded, in order.
func (tc *testController) auditActions() []string {
	tc.t.Helper()
	var actions []string
	err := tc.c.store.View(func(tx store.Tx) error {
		audit, err := tx.Audit()
		for _, e := range audit {
			if e.Result == "ok" || e.Result == "" {
				actions = append(actions, e.Action)
			}
		}
		return err
	})
	if err != nil {
		tc.t.Fatal(err)
	}
	return actions
}

func (tc *testController) netmapOf(node string, cand *segmeshv1.PolicyFile) (*segmeshv1.GetNetmapResponse, error) {
	resp, err := tc.op().GetNetmap(bg, connect.NewRequest(&segmeshv1.GetNetmapRequest{Node: node, Candidate: cand}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

func peerNames(nm *segmeshv1.Netmap) []string {
	var out []string
	for _, p := range nm.GetPeers() {
		out = append(out, p.GetName())
	}
	return out
}

func sha(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// TestApplyRefusesInventoryConflicts: a policy that does not compile against the
// inventory (two nodes hold one overlay address) is refused with a message naming
// both nodes; nothing is stored or pushed and the previous revision stays in
// force. The same conflict met by a recompute keeps the previous netmaps and is
// shown in Status.
func TestApplyRefusesInventoryConflicts(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	apply(t, tc, policyWebDB)
	stream := tc.sync(web, &segmeshv1.SyncRequest{})
	before := stream.next(t)

	// A node record that claims db-1's address, as a hand edit or a buggy
	// importer could leave it (enrollment never allocates it twice).
	err := tc.c.store.Update(func(tx store.Tx) error {
		db, _, err := tx.Node("db-1")
		if err != nil {
			return err
		}
		return tx.PutNode(store.Node{Name: "rogue", Labels: map[string]string{"role": "db"}, Addresses: db.Addresses, PublicKey: []byte{9, 31: 9}})
	})
	if err != nil {
		t.Fatal(err)
	}
	_, err = tc.op().ApplyPolicy(bg, connect.NewRequest(&segmeshv1.ApplyPolicyRequest{Filename: "p.yaml", Content: []byte(policyOpsSSH)}))
	ce := wantCode(t, err, connect.CodeInvalidArgument)
	if !strings.Contains(ce.Message(), `"db-1"`) || !strings.Contains(ce.Message(), `"rogue"`) || !strings.Contains(ce.Message(), "100.64.0.3") {
		t.Errorf("message %q does not name both nodes and the address", ce.Message())
	}
	if h := tc.history(); len(h) != 1 {
		t.Errorf("history after a refused apply has %d revisions, want 1", len(h))
	}
	if st := tc.status(); st.PolicyRevision != 1 || st.ServingRevision != 1 {
		t.Errorf("status after a refused apply: revision %d serving %d", st.PolicyRevision, st.ServingRevision)
	}
	applies := 0
	for _, a := range tc.auditActions() {
		if a == "policy.apply" {
			applies++
		}
	}
	if applies != 1 {
		t.Errorf("%d policy.apply audit entries, want 1", applies)
	}

	// A recompute (as after an enrollment) meets the same conflict: the previous
	// netmaps stay published, and Status says why.
	tc.c.nodesChanged("rogue")
	eventually(t, "policy error in status", func() bool { return strings.Contains(tc.status().PolicyError, `"rogue"`) })
	if nm, err := tc.netmapOf("web-1", nil); err != nil || nm.Netmap.GetHash() != before.GetHash() {
		t.Errorf("published netmap of web-1 changed after a failed recompute: %v", err)
	}
	stream.none(t)
}

func TestHistoryAndRollback(t *testing.T) {
	tc := startController(t, t.TempDir())
	tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	ops := tc.enroll(tc.createToken(map[string]string{"role": "ops"}, false), "ops-1")
	apply(t, tc, policyWebDB)
	apply(t, tc, policyOpsSSH)
	opsStream := tc.sync(ops, &segmeshv1.SyncRequest{})
	if nm := opsStream.next(t); !slices.Equal(peerNames(nm), []string{"db-1"}) {
		t.Fatalf("ops-1 peers at revision 2: %v", peerNames(nm))
	}

	resp, err := tc.op().RollbackPolicy(bg, connect.NewRequest(&segmeshv1.RollbackPolicyRequest{Revision: 1}))
	if err != nil {
		t.Fatal(err)
	}
	if resp.Msg.Revision != 3 || resp.Msg.Unchanged {
		t.Fatalf("rollback to 1 = %+v, want new revision 3", resp.Msg)
	}
	// Revision 3 is revision 1's content: ops-1 loses its peer at once.
	if nm := opsStream.next(t); nm.PolicyRevision != 3 || len(nm.Peers) != 0 {
		t.Errorf("ops-1 after the rollback: revision %d peers %v", nm.PolicyRevision, peerNames(nm))
	}
	got, err := tc.op().GetPolicy(bg, connect.NewRequest(&segmeshv1.GetPolicyRequest{}))
	if err != nil || got.Msg.Revision != 3 || string(got.Msg.Content) != policyWebDB || got.Msg.Filename != "policy.yaml" {
		t.Fatalf("GetPolicy after rollback = %v, %v", got, err)
	}

	h := tc.history()
	type row struct {
		rev, restored uint64
		sha, file     string
	}
	var rows []row
	for _, r := range h {
		rows = append(rows, row{r.Revision, r.RestoredFrom, r.Sha256, r.Filename})
		if r.AppliedUnix == 0 || r.AppliedBy != AdminOperator || r.Error != "" {
			t.Errorf("revision %d: applied %d by %q error %q", r.Revision, r.AppliedUnix, r.AppliedBy, r.Error)
		}
	}
	want := []row{{1, 0, sha(policyWebDB), "policy.yaml"}, {2, 0, sha(policyOpsSSH), "policy.yaml"}, {3, 1, sha(policyWebDB), "policy.yaml"}}
	if !slices.Equal(rows, want) {
		t.Errorf("history = %+v, want %+v", rows, want)
	}
	// (A rollback that isolates a node is followed by a gossip key rotation.)
	actions := slices.DeleteFunc(tc.auditActions(), func(a string) bool { return !strings.HasPrefix(a, "policy.") })
	if actions[len(actions)-1] != "policy.rollback" {
		t.Errorf("last policy audit action %q, want policy.rollback", actions[len(actions)-1])
	}

	tests := []struct {
		name      string
		rev       uint64
		code      connect.Code
		wantRev   uint64
		unchanged bool
	}{
		{"to the content in force", 1, 0, 3, true},
		{"forward again", 2, 0, 4, false},
		{"missing revision", 99, connect.CodeNotFound, 0, false},
		{"no revision", 0, connect.CodeInvalidArgument, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := tc.op().RollbackPolicy(bg, connect.NewRequest(&segmeshv1.RollbackPolicyRequest{Revision: tt.rev}))
			if tt.code != 0 {
				wantCode(t, err, tt.code)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if resp.Msg.Revision != tt.wantRev || resp.Msg.Unchanged != tt.unchanged {
				t.Errorf("rollback to %d = %+v, want revision %d unchanged %v", tt.rev, resp.Msg, tt.wantRev, tt.unchanged)
			}
		})
	}
	if n := len(tc.history()); n != 4 {
		t.Errorf("%d revisions after the table, want 4", n)
	}
}

func TestGetNetmap(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	db := tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	tc.enroll(tc.createToken(map[string]string{"role": "ops"}, false), "ops-1")
	apply(t, tc, policyWebDB)
	stream := tc.sync(web, &segmeshv1.SyncRequest{})
	pushed := stream.next(t)

	cur, err := tc.netmapOf("web-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if cur.Revision != 1 || cur.Netmap.GetHash() != pushed.GetHash() || !slices.Equal(peerNames(cur.Netmap), []string{"db-1"}) {
		t.Errorf("GetNetmap(web-1) = revision %d hash %s peers %v; want what the stream pushed (%s)", cur.Revision, cur.Netmap.GetHash(), peerNames(cur.Netmap), pushed.GetHash())
	}
	if len(cur.Netmap.GetGossip().GetKey()) != 0 || len(pushed.GetGossip().GetKey()) != 32 {
		t.Error("GetNetmap returned the gossip key")
	}
	p := cur.Netmap.GetPeers()[0]
	if string(p.PublicKey) != string(db.id.publicKey) || !slices.Equal(p.AllowedIps, db.resp.Addresses) || p.Endpoint != "192.0.2.1:51820" {
		t.Errorf("peer db-1 = %v", p)
	}

	widen := policyWebDB + "  - name: ops-ssh\n    from: [ops]\n    to: [web]\n    ports: [tcp/22]\n"
	tests := []struct {
		name      string
		node      string
		file      string
		code      connect.Code
		changed   bool
		peers     []string
		wantInMsg string
	}{
		{"candidate adds a peer", "web-1", widen, 0, true, []string{"db-1", "ops-1"}, ""},
		{"candidate leaves the node alone", "web-1", policyOpsSSH, 0, false, []string{"db-1"}, ""},
		{"candidate that does not parse", "web-1", strings.Replace(policyWebDB, "to: [db]", "to: [nope]", 1), connect.CodeInvalidArgument, false, nil, "policy.yaml:12:10:"},
		{"unknown node", "ghost", widen, connect.CodeNotFound, false, nil, `"ghost"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The file name is part of the netmap (rule origins): use the
			// stored one so that only the content differs.
			got, err := tc.netmapOf(tt.node, &segmeshv1.PolicyFile{Filename: "policy.yaml", Content: []byte(tt.file)})
			if tt.code != 0 {
				if ce := wantCode(t, err, tt.code); !strings.Contains(ce.Message(), tt.wantInMsg) {
					t.Errorf("message %q lacks %q", ce.Message(), tt.wantInMsg)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Revision != 2 || got.Changed != tt.changed || !slices.Equal(peerNames(got.Netmap), tt.peers) {
				t.Errorf("candidate netmap: revision %d changed %v peers %v; want 2 %v %v", got.Revision, got.Changed, peerNames(got.Netmap), tt.changed, tt.peers)
			}
			if !tt.changed && got.Netmap.GetHash() != pushed.GetHash() {
				t.Errorf("unchanged candidate netmap hash %s, want %s", got.Netmap.GetHash(), pushed.GetHash())
			}
		})
	}
	// Nothing was stored or pushed.
	if h := tc.history(); len(h) != 1 {
		t.Errorf("%d revisions after previews, want 1", len(h))
	}
	if _, err := tc.netmapOf("ghost", nil); err == nil {
		t.Error("GetNetmap of an unknown node succeeded")
	} else {
		wantCode(t, err, connect.CodeNotFound)
	}
	stream.none(t)
}

// corruptRevision rewrites policy revision rev in the stopped controller's store
// with edit applied to its JSON record, as an operator editing the file by hand.
func corruptRevision(t *testing.T, dir string, rev uint64, edit func(raw []byte) []byte) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dir, StoreFile), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("policies"))
		key := binary.BigEndian.AppendUint64(nil, rev)
		return b.Put(key, edit(b.Get(key)))
	})
	if err != nil {
		t.Fatal(err)
	}
}

// withContent returns an edit that replaces the record's policy content.
func withContent(t *testing.T, content string) func([]byte) []byte {
	return func(raw []byte) []byte {
		var p store.Policy
		if err := json.Unmarshal(raw, &p); err != nil {
			t.Fatal(err)
		}
		p.Content = []byte(content)
		out, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
}

// TestStartWithInvalidStoredPolicy: when stored revisions are unreadable or
// invalid at start, the controller starts, serves the newest valid revision (or
// default deny when none is valid, never the invalid one) and Status says why; a
// new apply clears the condition.
func TestStartWithInvalidStoredPolicy(t *testing.T) {
	garbage := func([]byte) []byte { return []byte("{not json") }
	tests := []struct {
		name        string
		corrupt     map[uint64]func(t *testing.T) func([]byte) []byte
		serving     uint64
		wantPeers   []string // of ops-1
		wantInError []string
	}{
		{"unreadable record", map[uint64]func(*testing.T) func([]byte) []byte{
			2: func(*testing.T) func([]byte) []byte { return garbage },
		}, 1, nil, []string{"revision 2 is unreadable", "serving revision 1"}},
		{"content edited into an invalid policy", map[uint64]func(*testing.T) func([]byte) []byte{
			2: func(t *testing.T) func([]byte) []byte {
				return withContent(t, strings.Replace(policyOpsSSH, "from: [ops]", "from: [opz]", 1))
			},
		}, 1, nil, []string{"revision 2 is invalid", "policy.yaml:15:12:", "serving revision 1"}},
		{"content edited into a policy whose tests fail", map[uint64]func(*testing.T) func([]byte) []byte{
			2: func(t *testing.T) func([]byte) []byte { return withContent(t, policyWithTests) },
		}, 1, nil, []string{"revision 2 is invalid", `policy.yaml:23:5: test "ops-kept-out"`, "serving revision 1"}},
		{"edited into allow-all syntax error", map[uint64]func(*testing.T) func([]byte) []byte{
			2: func(t *testing.T) func([]byte) []byte {
				return withContent(t, "version: 1\nrules: [{from: [all], to: [all], ports: [any]}\n")
			},
		}, 1, nil, []string{"revision 2 is invalid", "serving revision 1"}},
		{"every revision invalid", map[uint64]func(*testing.T) func([]byte) []byte{
			1: func(*testing.T) func([]byte) []byte { return garbage },
			2: func(*testing.T) func([]byte) []byte { return garbage },
		}, 0, nil, []string{"revision 2 is unreadable", "revision 1 is unreadable", "default deny"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			tc := startController(t, dir)
			ops := tc.enroll(tc.createToken(map[string]string{"role": "ops"}, false), "ops-1")
			tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
			apply(t, tc, policyWebDB)
			apply(t, tc, policyOpsSSH)
			tc.stop()
			for rev, edit := range tt.corrupt {
				corruptRevision(t, dir, rev, edit(t))
			}

			tc = startController(t, dir)
			st := tc.status()
			if st.PolicyRevision != 2 || st.ServingRevision != tt.serving {
				t.Errorf("status: policy_revision %d serving_revision %d; want 2 and %d", st.PolicyRevision, st.ServingRevision, tt.serving)
			}
			for _, w := range tt.wantInError {
				if !strings.Contains(st.PolicyError, w) {
					t.Errorf("policy_error %q lacks %q", st.PolicyError, w)
				}
			}
			for _, n := range st.Nodes {
				if n.DesiredRevision != tt.serving {
					t.Errorf("%s desired revision %d, want %d", n.Name, n.DesiredRevision, tt.serving)
				}
			}
			// ops-1 gets the netmap of the revision in force: revision 2 gave it
			// db-1 as a peer, the revisions served here do not.
			nm := tc.sync(ops, &segmeshv1.SyncRequest{}).next(t)
			if nm.PolicyRevision > tt.serving || !slices.Equal(peerNames(nm), tt.wantPeers) {
				t.Errorf("ops-1 netmap: revision %d peers %v; want <= %d with %v", nm.PolicyRevision, peerNames(nm), tt.serving, tt.wantPeers)
			}
			got, err := tc.op().GetPolicy(bg, connect.NewRequest(&segmeshv1.GetPolicyRequest{}))
			if tt.serving == 0 {
				if ce := wantCode(t, err, connect.CodeNotFound); !strings.Contains(ce.Message(), "default deny") {
					t.Errorf("GetPolicy message %q", ce.Message())
				}
			} else if err != nil || got.Msg.Revision != tt.serving {
				t.Errorf("GetPolicy(in force) = %v, %v; want revision %d", got, err, tt.serving)
			}

			// Applying revision 1's content again stores revision 3 (revision 2
			// is not in force, so it is not "unchanged") and clears the error.
			if r := apply(t, tc, policyWebDB); r.Revision != 3 || r.Unchanged {
				t.Errorf("apply after start = %+v, want revision 3", r)
			}
			if st := tc.status(); st.PolicyRevision != 3 || st.ServingRevision != 3 || st.PolicyError != "" {
				t.Errorf("status after apply: %d %d %q", st.PolicyRevision, st.ServingRevision, st.PolicyError)
			}
		})
	}
}

// TestHistoryListsUnreadableRevision: history keeps listing a revision whose
// record does not decode, with its error, and rollback to it is refused.
func TestHistoryListsUnreadableRevision(t *testing.T) {
	dir := t.TempDir()
	tc := startController(t, dir)
	apply(t, tc, policyWebDB)
	apply(t, tc, policyOpsSSH)
	tc.stop()
	corruptRevision(t, dir, 1, func([]byte) []byte { return []byte("][") })
	tc = startController(t, dir)
	h := tc.history()
	if len(h) != 2 || h[0].Error == "" || h[0].Sha256 != "" || h[1].Error != "" || h[1].Sha256 != sha(policyOpsSSH) {
		t.Fatalf("history = %v", h)
	}
	_, err := tc.op().RollbackPolicy(bg, connect.NewRequest(&segmeshv1.RollbackPolicyRequest{Revision: 1}))
	wantCode(t, err, connect.CodeFailedPrecondition)
	if st := tc.status(); st.ServingRevision != 2 || st.PolicyError != "" {
		t.Errorf("an unreadable old revision disturbed status: serving %d error %q", st.ServingRevision, st.PolicyError)
	}
}

// policyWithTests is policyOpsSSH plus a tests section; its two last tests fail
// (ops-1 reaches db-1 on tcp/22, web-1 does not).
const policyWithTests = policyOpsSSH + `tests:
  - name: web-reaches-db
    from: web
    to: db
    allow: [tcp/5432]
  - name: ops-kept-out
    from: ops
    to: db
    deny: [tcp/22]
  - name: web-ssh
    from: web
    to: db
    allow: [tcp/22]
`

// TestApplyRunsPolicyTests: a policy whose tests fail is refused with one
// file:line:col line per failing test; nothing is stored or pushed and the
// previous revision stays in force. A test that can pass only vacuously on the
// current inventory (it names a node that has not enrolled) is a warning.
func TestApplyRunsPolicyTests(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	tc.enroll(tc.createToken(map[string]string{"role": "ops"}, false), "ops-1")
	apply(t, tc, policyWebDB)
	stream := tc.sync(web, &segmeshv1.SyncRequest{})
	stream.next(t)

	_, err := tc.op().ApplyPolicy(bg, connect.NewRequest(&segmeshv1.ApplyPolicyRequest{Filename: "policy.yaml", Content: []byte(policyWithTests)}))
	ce := wantCode(t, err, connect.CodeInvalidArgument)
	lines := strings.Split(ce.Message(), "\n")
	// Each test fails on the prototype inventory and on the real one.
	wantPrefixes := []string{
		`policy.yaml:23:5: test "ops-kept-out": role=ops#1 -> role=db#1 tcp/22 is allowed`,
		`policy.yaml:27:5: test "web-ssh": role=web#1 -> role=db#1 tcp/22 is denied`,
		`policy.yaml:23:5: test "ops-kept-out": ops-1 -> db-1 tcp/22 is allowed`,
		`policy.yaml:27:5: test "web-ssh": web-1 -> db-1 tcp/22 is denied`,
	}
	if len(lines) != len(wantPrefixes) {
		t.Fatalf("refusal has %d lines, want one per failing test:\n%s", len(lines), ce.Message())
	}
	for _, w := range wantPrefixes {
		if n := len(slices.DeleteFunc(slices.Clone(lines), func(l string) bool { return !strings.HasPrefix(l, w) })); n != 1 {
			t.Errorf("%d lines start with %q, want 1:\n%s", n, w, ce.Message())
		}
	}
	if h := tc.history(); len(h) != 1 {
		t.Errorf("%d revisions after a refused apply, want 1", len(h))
	}
	if st := tc.status(); st.PolicyRevision != 1 || st.ServingRevision != 1 || st.PolicyError != "" {
		t.Errorf("status after a refused apply: %d %d %q", st.PolicyRevision, st.ServingRevision, st.PolicyError)
	}
	stream.none(t)

	// Without the failing tests it is stored; a test naming a node that has not
	// enrolled is reported, not refused.
	passing := policyWithTests[:strings.Index(policyWithTests, "  - name: ops-kept-out")] + `  - name: db-9-later
    from: web-1
    to: db-9
    allow: [tcp/5432]
`
	resp, err := tc.op().ApplyPolicy(bg, connect.NewRequest(&segmeshv1.ApplyPolicyRequest{Filename: "policy.yaml", Content: []byte(passing)}))
	if err != nil {
		t.Fatalf("apply with passing tests: %v", err)
	}
	if resp.Msg.Revision != 2 || len(resp.Msg.Warnings) != 1 || !strings.HasPrefix(resp.Msg.Warnings[0], `policy.yaml:23:5: warning: test "db-9-later": `) {
		t.Errorf("apply = revision %d warnings %q", resp.Msg.Revision, resp.Msg.Warnings)
	}
	// A rule whose segment selects no enrolled node is a warning with its position;
	// the policy still applies.
	empty := strings.Replace(passing, "tests:\n", `  - name: nobody
    from: [ghosts]
    to: [db]
    ports: [tcp/1]
tests:
`, 1)
	empty = strings.Replace(empty, "segments:\n", "segments:\n  - name: ghosts\n    selectors: [{role: ghost}]\n", 1)
	resp, err = tc.op().ApplyPolicy(bg, connect.NewRequest(&segmeshv1.ApplyPolicyRequest{Filename: "policy.yaml", Content: []byte(empty)}))
	if err != nil {
		t.Fatalf("apply with an empty segment: %v", err)
	}
	var segWarn, ruleWarn bool
	for _, w := range resp.Msg.Warnings {
		segWarn = segWarn || strings.Contains(w, `: warning: segment "ghosts" selects no node`)
		ruleWarn = ruleWarn || strings.Contains(w, `: warning: rule "nobody" allows nothing`)
	}
	if resp.Msg.Revision != 3 || !segWarn || !ruleWarn {
		t.Errorf("apply = revision %d warnings %q", resp.Msg.Revision, resp.Msg.Warnings)
	}
}

// policyOnlyKnown lets ops-1 reach every node over SSH and asserts that it
// reaches only db-1 and web-1: true until another node enrolls.
const policyOnlyKnown = `version: 1
segments:
  - name: ops
    selectors: [{role: ops}]
rules:
  - name: ops-everywhere
    from: [ops]
    to: [all]
    ports: [tcp/22]
tests:
  - name: ops-reaches-known-hosts
    from: ops-1
    only: [db-1, web-1]
`

// TestRollbackRunsTestsAgainstCurrentInventory: a revision that was valid when it
// was applied but whose tests fail on today's inventory is not rolled back to.
func TestRollbackRunsTestsAgainstCurrentInventory(t *testing.T) {
	tc := startController(t, t.TempDir())
	tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	tc.enroll(tc.createToken(map[string]string{"role": "ops"}, false), "ops-1")
	apply(t, tc, policyOnlyKnown)
	apply(t, tc, policyWebDB)
	tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-2")

	_, err := tc.op().RollbackPolicy(bg, connect.NewRequest(&segmeshv1.RollbackPolicyRequest{Revision: 1}))
	ce := wantCode(t, err, connect.CodeInvalidArgument)
	if !strings.Contains(ce.Message(), "policy revision 1 is not valid") || !strings.Contains(ce.Message(), `policy.yaml:11:5: test "ops-reaches-known-hosts"`) ||
		!strings.Contains(ce.Message(), "web-2") {
		t.Errorf("refusal %q does not name the revision, the failing test and web-2", ce.Message())
	}
	if st := tc.status(); st.PolicyRevision != 2 || st.ServingRevision != 2 {
		t.Errorf("status after a refused rollback: %d %d", st.PolicyRevision, st.ServingRevision)
	}
	if h := tc.history(); len(h) != 2 {
		t.Errorf("%d revisions after a refused rollback, want 2", len(h))
	}
}

// GetNetmap carries the overlay interface the node's agent reported on its stream,
// so that `segmesh policy render` shows the ruleset exactly as the node holds it.
func TestGetNetmapReportsAgentInterface(t *testing.T) {
	tc := startController(t, t.TempDir())
	web := tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	got, err := tc.netmapOf("web-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if got.GetInterface() != "" {
		t.Errorf("interface before any stream = %q, want empty", got.GetInterface())
	}
	stream := tc.sync(web, &segmeshv1.SyncRequest{Endpoint: "192.0.2.11:51820", Dataplane: "userspace", Interface: "smx0"})
	stream.next(t) // the stream is registered once the first netmap arrives
	if got, err = tc.netmapOf("web-1", nil); err != nil || got.GetInterface() != "smx0" {
		t.Errorf("interface after the stream = %q, %v; want smx0", got.GetInterface(), err)
	}
}
