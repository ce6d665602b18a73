package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/goccy/go-yaml"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/policy"
)

const (
	t1 = 1796000000 // 2026-11-30T00:53:20Z
	t2 = 1796086400 // 2026-12-01T00:53:20Z
)

// repairUnix is when web-1's agent last repaired drift: 150 s before the tests
// started, so that status prints "2m ago" for it. handshakeUnix is its latest
// handshake with api-1, 12 s before; applyUnixMs its latest apply, 40 s before.
var (
	repairUnix    = time.Now().Add(-150 * time.Second).Unix()
	handshakeUnix = time.Now().Add(-12 * time.Second).Unix()
	applyUnixMs   = time.Now().Add(-40 * time.Second).UnixMilli()
)

// fixtureNodes: web-1 active, online and in sync after 3 drift repairs, with two
// WireGuard peers (api-1 handshaked, db-1 never); db-1 revoked by admin.
func fixtureNodes() []*segmeshv1.NodeStatus {
	return []*segmeshv1.NodeStatus{
		{Name: "web-1", State: "active", Labels: map[string]string{"role": "web", "env": "prod"}, Addresses: []string{"100.64.0.2/32", "fd5e:6d65:7368::2/128"},
			Online: true, DesiredRevision: 3, AppliedRevision: 3, DesiredHash: "h3", AppliedHash: "h3", Dataplane: "kernel", Endpoint: "192.0.2.10:51820", PublicKey: "a2V5",
			LastSeenUnix: t2, EnrolledUnix: t1, CertExpiresUnix: 1798678400, AlivePeers: []string{"db-1"},
			InSync: true, Drift: &segmeshv1.Drift{Repairs: 3, LastRepairUnix: repairUnix, LastRepairedMore: 1,
				LastRepaired: []*segmeshv1.DriftDifference{{Part: "route", Detail: "missing [100.64.0.0/10]"}}},
			Segments: []string{"prod", "web"}, Version: "v1.2.3", Interface: "segmesh0", LastApplyUnixMs: applyUnixMs, LastApplyDurationUs: 4200, LastReportUnix: t2,
			Controller: "10.0.0.1:7443",
			Peers: []*segmeshv1.PeerStatus{
				{Name: "db-1", PublicKey: "ZGI=", Endpoint: "192.0.2.30:51820"},
				{Name: "api-1", PublicKey: "YXBp", Endpoint: "192.0.2.20:51820", LastHandshakeUnix: handshakeUnix, RxBytes: 1536, TxBytes: 3 << 20, Path: "relay", Relay: "relay-1"},
			}},
		{Name: "db-1", State: "revoked", Labels: map[string]string{"role": "db"}, Addresses: []string{"100.64.0.3/32", "fd5e:6d65:7368::3/128"},
			DesiredRevision: 3, EnrolledUnix: t1, RevokedUnix: t2, RevokedBy: "admin"},
	}
}

// statusNodes are the fixture nodes as Status has them: without peers.
func statusNodes() []*segmeshv1.NodeStatus {
	nodes := fixtureNodes()
	for _, n := range nodes {
		n.Peers, n.PeersMore = nil, 0
	}
	return nodes
}

// fixtureStore is the store the fixture Status names.
const fixtureStore = "etcd http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379 (prefix /segmesh/)"

// withFixtures makes f answer every read call with a small, fixed mesh; GetNode
// says web-1's netmap lists api-1, db-1 and ops-1.
func withFixtures(f *fakeController) *fakeController {
	f.reply(segmeshv1connect.OperatorServiceStatusProcedure, connect.NewResponse(&segmeshv1.StatusResponse{
		PolicyRevision: 3, ServingRevision: 3, NodesActive: 1, NodesOnline: 1, NodesCurrent: 1, Nodes: statusNodes(),
		Store: fixtureStore, Controller: "10.0.0.1:7443", Controllers: []string{"https://10.0.0.1:7443", "https://10.0.0.2:7443"}}))
	f.handle(segmeshv1connect.OperatorServiceGetNodeProcedure, func(req proto.Message) (connect.AnyResponse, error) {
		name := req.(*segmeshv1.GetNodeRequest).GetName()
		for _, n := range fixtureNodes() {
			if n.GetName() == name {
				var desired []string
				if name == "web-1" {
					desired = []string{"api-1", "db-1", "ops-1"}
				}
				return connect.NewResponse(&segmeshv1.GetNodeResponse{Node: n, DesiredPeers: desired}), nil
			}
		}
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("node %q is not enrolled (see `segmesh nodes list`)", name))
	})
	f.reply(segmeshv1connect.OperatorServiceListNodesProcedure, connect.NewResponse(&segmeshv1.ListNodesResponse{Nodes: fixtureNodes()}))
	f.reply(segmeshv1connect.OperatorServiceListTokensProcedure, connect.NewResponse(&segmeshv1.ListTokensResponse{Tokens: []*segmeshv1.TokenInfo{
		{Id: "tok1", Labels: map[string]string{"role": "web"}, CreatedUnix: t1, ExpiresUnix: 4102444800, Uses: 1, UsedBy: "web-1", Creator: "admin"},
		{Id: "tok2", CreatedUnix: t1, ExpiresUnix: 4102444800, Reusable: true, Uses: 2, UsedBy: "db-1", Creator: "ci"},
		{Id: "tok3", CreatedUnix: t1, ExpiresUnix: 978307200, Creator: "admin"},
		{Id: "tok4", CreatedUnix: t1, ExpiresUnix: 4102444800, Creator: "admin", RevokedUnix: t2},
		{Id: "tok5", CreatedUnix: t1, ExpiresUnix: 4102444800, Creator: "admin"},
	}}))
	f.reply(segmeshv1connect.OperatorServiceListOperatorsProcedure, connect.NewResponse(&segmeshv1.ListOperatorsResponse{Operators: []*segmeshv1.OperatorInfo{
		{Name: "admin", Role: "admin", CreatedUnix: t1, CreatedBy: "controller"},
		{Name: "alice", Role: "viewer", CreatedUnix: t1, CreatedBy: "admin", RevokedUnix: t2},
	}}))
	f.reply(segmeshv1connect.OperatorServiceListAuditProcedure, connect.NewResponse(&segmeshv1.ListAuditResponse{Records: []*segmeshv1.AuditRecord{
		{Seq: 1, TimeUnixNano: t1*1e9 + 5, Actor: "admin", Action: "token.create", Object: "token:tok1", Result: "ok", Hash: "h1"},
		{Seq: 2, TimeUnixNano: t2 * 1e9, Actor: "admin", Action: "node.revoke", Object: "node:db-1", Result: "ok", Detail: "gossip-key-rotated", PrevHash: "h1", Hash: "h2"},
	}}))
	f.reply(segmeshv1connect.OperatorServiceVerifyAuditProcedure, connect.NewResponse(&segmeshv1.VerifyAuditResponse{Ok: true, Records: 2, HeadSeq: 2, HeadHash: "abababababababababababababababababababababababababababababababab"}))
	f.reply(segmeshv1connect.OperatorServiceListPolicyRevisionsProcedure, connect.NewResponse(&segmeshv1.ListPolicyRevisionsResponse{
		ServingRevision: 1, Revisions: []*segmeshv1.PolicyRevision{{Revision: 1, AppliedUnix: t1, AppliedBy: "admin", Filename: "p.yaml", Sha256: strings.Repeat("ab", 32)}}}))
	return f
}

// TestReadCommandTables checks the columns and cells of each read command's table.
func TestReadCommandTables(t *testing.T) {
	f := withFixtures(newFakeController(t))
	tests := []struct {
		args []string
		want [][]string // strings.Fields of each line
	}{
		{[]string{"nodes", "list"}, [][]string{
			{"NODE", "STATE", "LABELS", "ADDRESSES", "ENDPOINT", "ONLINE"},
			{"web-1", "active", "env=prod,role=web", "100.64.0.2/32,fd5e:6d65:7368::2/128", "192.0.2.10:51820", "true"},
			{"db-1", "revoked", "role=db", "100.64.0.3/32,fd5e:6d65:7368::3/128", "-", "false"},
		}},
		{[]string{"status"}, [][]string{
			{"policy", "revision:", "3"},
			{"revision", "3:", "1/1", "active", "nodes", "enforce", "it", "(1", "online)"},
			{"store:", "etcd", "http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379", "(prefix", "/segmesh/)"},
			{"controller:", "10.0.0.1:7443", "(2", "replicas:", "https://10.0.0.1:7443,", "https://10.0.0.2:7443)"},
			{"NODE", "STATE", "ONLINE", "DESIRED", "APPLIED", "SYNC", "DRIFT", "DATAPLANE", "ADDRESSES", "ENDPOINT", "ALIVE_PEERS", "ERROR"},
			{"web-1", "active", "true", "3", "3", "in", "sync", "3", "(2m", "ago)", "kernel", "100.64.0.2/32,fd5e:6d65:7368::2/128", "192.0.2.10:51820", "1", "-"},
			{"db-1", "revoked", "false", "3", "0", "-", "-", "-", "100.64.0.3/32,fd5e:6d65:7368::3/128", "-", "0", "-"},
		}},
		{[]string{"token", "list"}, [][]string{
			{"ID", "NAME", "LABELS", "CREATED", "EXPIRES", "USES", "USED_BY", "CREATOR", "STATE"},
			{"tok1", "-", "role=web", "2026-11-30T00:53:20Z", "2100-01-01T00:00:00Z", "1/1", "web-1", "admin", "used"},
			{"tok2", "-", "-", "2026-11-30T00:53:20Z", "2100-01-01T00:00:00Z", "2", "db-1", "ci", "valid"},
			{"tok3", "-", "-", "2026-11-30T00:53:20Z", "2001-01-01T00:00:00Z", "0/1", "-", "admin", "expired"},
			{"tok4", "-", "-", "2026-11-30T00:53:20Z", "2100-01-01T00:00:00Z", "0/1", "-", "admin", "revoked"},
			{"tok5", "-", "-", "2026-11-30T00:53:20Z", "2100-01-01T00:00:00Z", "0/1", "-", "admin", "valid"},
		}},
		{[]string{"operators", "list"}, [][]string{
			{"NAME", "ROLE", "CREATED", "CREATED_BY", "STATE", "REVOKED"},
			{"admin", "admin", "2026-11-30T00:53:20Z", "controller", "active", "-"},
			{"alice", "viewer", "2026-11-30T00:53:20Z", "admin", "revoked", "2026-12-01T00:53:20Z"},
		}},
		{[]string{"audit"}, [][]string{
			{"SEQ", "TIME", "ACTOR", "ACTION", "OBJECT", "RESULT", "DETAIL"},
			{"1", "2026-11-30T00:53:20Z", "admin", "token.create", "token:tok1", "ok", "-"},
			{"2", "2026-12-01T00:53:20Z", "admin", "node.revoke", "node:db-1", "ok", "gossip-key-rotated"},
		}},
		{[]string{"audit", "verify"}, [][]string{
			{"audit", "log", "verified:", "2", "records,", "chain", "intact"},
			{"head:", "2:abababababababababababababababababababababababababababababababab", "(keep", "it", "outside", "the", "controller;", "check", "against", "it", "later", "with", "--expect-head)"},
		}},
		{[]string{"policy", "history"}, [][]string{
			{"REVISION", "APPLIED", "BY", "FILE", "SHA256", "NOTE"},
			{"1", "2026-11-30T00:53:20Z", "admin", "p.yaml", "abababababab", "in", "force"},
		}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, errOut, code := f.run(tt.args...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, errOut)
			}
			var got [][]string
			for _, l := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
				got = append(got, strings.Fields(l))
			}
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Errorf("table (-want +got):\n%s\n%s", d, out)
			}
		})
	}
}

// showFields runs `nodes show NAME` against f and returns its "key: value"
// lines as a map, their keys in order, and the lines after them (the peers
// table), each as strings.Fields; it checks that the values are aligned.
func showFields(t *testing.T, f *fakeController, name string) (map[string]string, []string, [][]string) {
	t.Helper()
	out, errOut, code := f.run("nodes", "show", name)
	if code != 0 {
		t.Fatalf("nodes show %s: exit %d: %s", name, code, errOut)
	}
	head, tail, _ := strings.Cut(strings.TrimSuffix(out, "\n"), "\n\n")
	fields := map[string]string{}
	var keys []string
	for _, l := range strings.Split(head, "\n") {
		k, v, _ := strings.Cut(l, ":")
		keys = append(keys, k)
		fields[k] = strings.TrimSpace(v)
		if !strings.HasPrefix(v, " ") || strings.Index(l, fields[k]) != len("desired revision: ") {
			t.Errorf("value of %q not aligned after the longest key: %q", k, l)
		}
	}
	var table [][]string
	if tail != "" {
		for _, l := range strings.Split(tail, "\n") {
			table = append(table, strings.Fields(l))
		}
	}
	return fields, keys, table
}

func TestNodesShowTable(t *testing.T) {
	f := withFixtures(newFakeController(t))
	fields, keys, table := showFields(t, f, "db-1")
	wantKeys := []string{"name", "state", "labels", "segments", "addresses", "endpoint", "public key", "dataplane", "interface", "agent version",
		"online", "controller", "last seen", "last report", "desired revision", "applied revision", "sync", "last apply", "last error",
		"drift repairs", "last repaired", "unrepaired drift", "enrolled", "cert expires", "revoked at", "revoked by", "alive peers",
		"desired peers", "peers", "missing peers"}
	if !slices.Equal(keys, wantKeys) {
		t.Errorf("keys %q, want %q", keys, wantKeys)
	}
	for k, want := range map[string]string{"name": "db-1", "state": "revoked", "labels": "role=db", "addresses": "100.64.0.3/32, fd5e:6d65:7368::3/128",
		"endpoint": "-", "online": "false", "controller": "-", "enrolled": "2026-11-30T00:53:20Z", "revoked at": "2026-12-01T00:53:20Z", "revoked by": "admin",
		"cert expires": "-", "desired revision": "3", "applied revision": "0", "segments": "-", "last apply": "-",
		"peers": "-", "desired peers": "none", "missing peers": "-"} {
		if fields[k] != want {
			t.Errorf("db-1 %s: %q, want %q", k, fields[k], want)
		}
	}
	if table != nil {
		t.Errorf("db-1 has no peers, yet a table: %q", table)
	}

	fields, _, table = showFields(t, f, "web-1")
	for k, want := range map[string]string{"segments": "prod, web", "interface": "segmesh0", "agent version": "v1.2.3", "controller": "10.0.0.1:7443",
		"applied revision": "3 (current)", "sync": "in sync", "desired peers": "api-1, db-1, ops-1",
		"peers": "2 in the kernel, 1 with a handshake in the last 3 minutes", "missing peers": "ops-1", "last error": "-"} {
		if fields[k] != want {
			t.Errorf("web-1 %s: %q, want %q", k, fields[k], want)
		}
	}
	if want := regexp.MustCompile(`^` + regexp.QuoteMeta(unixMilliTime(applyUnixMs)) + ` \(4[0-9]s ago\), took 4\.2ms$`); !want.MatchString(fields["last apply"]) {
		t.Errorf("web-1 last apply %q, want %s", fields["last apply"], want)
	}
	if want := regexp.MustCompile(`^2026-12-01T00:53:20Z \([0-9]+h ago\)$`); !want.MatchString(fields["last report"]) {
		t.Errorf("web-1 last report %q, want %s", fields["last report"], want)
	}
	wantTable := [][]string{
		{"NAME", "ENDPOINT", "PATH", "LAST", "HANDSHAKE", "RX", "TX"},
		{"db-1", "192.0.2.30:51820", "-", "never", "0", "B", "0", "B"},
		{"api-1", "192.0.2.20:51820", "relay", "via", "relay-1", "HS", "ago", "1.5", "KiB", "3.0", "MiB"},
	}
	if len(table) == 3 && len(table[2]) > 5 && regexp.MustCompile(`^1[2-9]s$`).MatchString(table[2][5]) {
		wantTable[2][5] = table[2][5]
	}
	if d := cmp.Diff(wantTable, table); d != "" {
		t.Errorf("web-1 peers table (-want +got):\n%s", d)
	}

	_, errOut, code := f.run("nodes", "show", "ghost")
	if code != 1 || !strings.Contains(errOut, `node "ghost" is not enrolled`) {
		t.Errorf("nodes show ghost: exit %d %q, want exit 1 naming the node", code, errOut)
	}
}

// TestNodesShowOlderController: against a controller without GetNode, nodes show
// prints what ListNodes has, without the desired peers.
func TestNodesShowOlderController(t *testing.T) {
	f := newFakeController(t)
	f.reply(segmeshv1connect.OperatorServiceListNodesProcedure, connect.NewResponse(&segmeshv1.ListNodesResponse{Nodes: fixtureNodes()}))
	fields, _, table := showFields(t, f, "web-1")
	if fields["segments"] != "prod, web" || fields["desired peers"] != "-" || fields["missing peers"] != "-" || len(table) != 3 {
		t.Errorf("nodes show web-1: %q, peers %q", fields, table)
	}
	if _, errOut, code := f.run("nodes", "show", "ghost"); code != 1 || !strings.Contains(errOut, `node "ghost" is not enrolled`) {
		t.Errorf("nodes show ghost: exit %d %q, want exit 1 naming the node", code, errOut)
	}
}

// TestReadCommandJSONAndYAML: -o json and -o yaml print the same document with
// the same snake_case field names; both decode to what the fixtures hold.
func TestReadCommandJSONAndYAML(t *testing.T) {
	f := withFixtures(newFakeController(t))
	web := nodeJSON{Name: "web-1", State: "active", Labels: map[string]string{"role": "web", "env": "prod"},
		Addresses: []string{"100.64.0.2/32", "fd5e:6d65:7368::2/128"}, Online: true, DesiredRevision: 3, AppliedRevision: 3,
		Dataplane: "kernel", Endpoint: "192.0.2.10:51820", PublicKey: "a2V5", LastSeen: "2026-12-01T00:53:20Z",
		EnrolledAt: "2026-11-30T00:53:20Z", CertExpiresAt: "2026-12-31T00:53:20Z", AlivePeers: []string{"db-1"},
		Sync: "in sync", InSync: true, Drift: driftJSON{Repairs: 3, LastRepairAt: unixTime(repairUnix), LastRepairedMore: 1,
			LastRepaired: []differenceJSON{{Part: "route", Detail: "missing [100.64.0.0/10]"}}, Unrepaired: []differenceJSON{}},
		DesiredHash: "h3", AppliedHash: "h3", Segments: []string{"prod", "web"}, Version: "v1.2.3", Interface: "segmesh0",
		LastApplyAt: unixMilliTime(applyUnixMs), LastApplyDurationUs: 4200, LastReportAt: "2026-12-01T00:53:20Z", Controller: "10.0.0.1:7443"}
	webWithPeers := web
	webWithPeers.Peers = []wgPeerJSON{{Name: "db-1", PublicKey: "ZGI=", Endpoint: "192.0.2.30:51820"},
		{Name: "api-1", PublicKey: "YXBp", Endpoint: "192.0.2.20:51820", LastHandshakeAt: unixTime(handshakeUnix), RxBytes: 1536, TxBytes: 3 << 20, Path: "relay", Relay: "relay-1"}}
	db := nodeJSON{Name: "db-1", State: "revoked", Labels: map[string]string{"role": "db"}, Addresses: []string{"100.64.0.3/32", "fd5e:6d65:7368::3/128"},
		DesiredRevision: 3, EnrolledAt: "2026-11-30T00:53:20Z", RevokedAt: "2026-12-01T00:53:20Z", RevokedBy: "admin", AlivePeers: []string{},
		Drift: driftJSON{LastRepaired: []differenceJSON{}, Unrepaired: []differenceJSON{}}, Segments: []string{}}
	tests := []struct {
		args []string
		want any
		// keys holds JSON keys the document must spell exactly so (scripts read them).
		keys []string
	}{
		{[]string{"status"}, statusJSON{PolicyRevision: 3, ServingRevision: 3, NodesActive: 1, NodesOnline: 1, NodesCurrent: 1, Nodes: []nodeJSON{web, db},
			Store: fixtureStore, Controller: "10.0.0.1:7443", Controllers: []string{"https://10.0.0.1:7443", "https://10.0.0.2:7443"}},
			[]string{`"policy_revision"`, `"serving_revision"`, `"store": "etcd http://10.0.0.1:2379,`, `"controller": "10.0.0.1:7443"`, `"controllers": [`, `"state": "revoked"`, `"revoked_by": "admin"`, `"cert_expires_at"`, `"alive_peers"`,
				`"sync": "in sync"`, `"in_sync": true`, `"repairs": 3`, `"last_repair_at"`, `"last_repaired": [`, `"last_repaired_more": 1`, `"unrepaired": []`,
				`"segments": [`, `"version": "v1.2.3"`, `"interface": "segmesh0"`, `"last_apply_at"`, `"last_apply_duration_us": 4200`, `"last_report_at"`}},
		{[]string{"nodes", "list"}, []nodeJSON{webWithPeers, db}, []string{`"desired_revision"`, `"revoked_at"`, `"enrolled_at"`, `"peers": [`}},
		{[]string{"nodes", "show", "web-1"}, nodeDetailJSON{nodeJSON: webWithPeers, Current: true, DesiredPeers: []string{"api-1", "db-1", "ops-1"}, MissingPeers: []string{"ops-1"}},
			[]string{`"name": "web-1"`, `"last_seen"`, `"last_handshake_at"`, `"rx_bytes": 1536`, `"tx_bytes"`, `"endpoint": "192.0.2.20:51820"`,
				`"path": "relay"`, `"relay": "relay-1"`, `"desired_peers": [`, `"missing_peers": [`, `"current": true`}},
		{[]string{"token", "list"}, []tokenJSON{
			{ID: "tok1", Labels: map[string]string{"role": "web"}, CreatedAt: "2026-11-30T00:53:20Z", ExpiresAt: "2100-01-01T00:00:00Z", Uses: 1, UsedBy: "web-1", Creator: "admin", State: "used"},
			{ID: "tok2", Labels: map[string]string{}, CreatedAt: "2026-11-30T00:53:20Z", ExpiresAt: "2100-01-01T00:00:00Z", Reusable: true, Uses: 2, UsedBy: "db-1", Creator: "ci", State: "valid"},
			{ID: "tok3", Labels: map[string]string{}, CreatedAt: "2026-11-30T00:53:20Z", ExpiresAt: "2001-01-01T00:00:00Z", Creator: "admin", State: "expired"},
			{ID: "tok4", Labels: map[string]string{}, CreatedAt: "2026-11-30T00:53:20Z", ExpiresAt: "2100-01-01T00:00:00Z", Creator: "admin", RevokedAt: "2026-12-01T00:53:20Z", State: "revoked"},
			{ID: "tok5", Labels: map[string]string{}, CreatedAt: "2026-11-30T00:53:20Z", ExpiresAt: "2100-01-01T00:00:00Z", Creator: "admin", State: "valid"},
		}, []string{`"used_by"`, `"expires_at"`, `"created_at"`}},
		{[]string{"operators", "list"}, []operatorJSON{
			{Name: "admin", Role: "admin", CreatedAt: "2026-11-30T00:53:20Z", CreatedBy: "controller", State: "active"},
			{Name: "alice", Role: "viewer", CreatedAt: "2026-11-30T00:53:20Z", CreatedBy: "admin", RevokedAt: "2026-12-01T00:53:20Z", State: "revoked"},
		}, []string{`"created_by"`, `"role": "viewer"`}},
		{[]string{"audit"}, []auditJSON{
			{Seq: 1, Time: "2026-11-30T00:53:20.000000005Z", Actor: "admin", Action: "token.create", Object: "token:tok1", Result: "ok", Hash: "h1"},
			{Seq: 2, Time: "2026-12-01T00:53:20Z", Actor: "admin", Action: "node.revoke", Object: "node:db-1", Result: "ok", Detail: "gossip-key-rotated", PrevHash: "h1", Hash: "h2"},
		}, []string{`"prev_hash"`, `"seq"`}},
		{[]string{"audit", "verify"}, verifyJSON{OK: true, Records: 2, Head: "2:abababababababababababababababababababababababababababababababab"}, []string{`"first_bad_seq": 0`}},
		{[]string{"policy", "history"}, historyJSON{ServingRevision: 1, Revisions: []revisionJSON{
			{Revision: 1, Applied: "2026-11-30T00:53:20Z", AppliedBy: "admin", Filename: "p.yaml", SHA256: strings.Repeat("ab", 32), InForce: true}}},
			[]string{`"serving_revision"`, `"in_force": true`}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			jsonOut, errOut, code := f.run(append(tt.args, "-o", "json")...)
			if code != 0 {
				t.Fatalf("-o json: exit %d: %s", code, errOut)
			}
			for _, k := range tt.keys {
				if !strings.Contains(jsonOut, k) {
					t.Errorf("-o json lacks %s:\n%s", k, jsonOut)
				}
			}
			got := reflect.New(reflect.TypeOf(tt.want))
			if err := json.Unmarshal([]byte(jsonOut), got.Interface()); err != nil {
				t.Fatalf("-o json does not decode: %v\n%s", err, jsonOut)
			}
			if d := cmp.Diff(tt.want, got.Elem().Interface(), cmp.AllowUnexported(nodeDetailJSON{})); d != "" {
				t.Errorf("-o json (-want +got):\n%s", d)
			}
			if tt.args[0] == "nodes" && tt.args[1] == "list" {
				return // -o yaml is the inventory format (TestNodesListYAMLIsAnInventory)
			}
			yamlOut, errOut, code := f.run(append(tt.args, "-o", "yaml")...)
			if code != 0 {
				t.Fatalf("-o yaml: exit %d: %s", code, errOut)
			}
			// Decoded through JSON: a YAML decoder cannot fill the unexported
			// embedded nodeJSON of nodes show.
			asJSON, err := yaml.YAMLToJSON([]byte(yamlOut))
			if err != nil {
				t.Fatalf("-o yaml does not decode: %v\n%s", err, yamlOut)
			}
			fromYAML := reflect.New(reflect.TypeOf(tt.want))
			if err := json.Unmarshal(asJSON, fromYAML.Interface()); err != nil {
				t.Fatalf("-o yaml does not decode: %v\n%s", err, yamlOut)
			}
			if d := cmp.Diff(tt.want, fromYAML.Elem().Interface(), cmp.AllowUnexported(nodeDetailJSON{})); d != "" {
				t.Errorf("-o yaml (-want +got):\n%s\n%s", d, yamlOut)
			}
		})
	}
}

// TestNodesListYAMLIsAnInventory: nodes list -o yaml keeps printing the inventory
// that the offline policy tools read, without revoked nodes.
func TestNodesListYAMLIsAnInventory(t *testing.T) {
	f := withFixtures(newFakeController(t))
	out, errOut, code := f.run("nodes", "list", "-o", "yaml")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	nodes, err := policy.ParseInventory("nodes.yaml", []byte(out))
	if err != nil {
		t.Fatalf("not an inventory: %v\n%s", err, out)
	}
	if len(nodes) != 1 || nodes[0].Name != "web-1" || nodes[0].Labels["env"] != "prod" || len(nodes[0].Addresses) != 2 {
		t.Errorf("inventory = %+v, want web-1 alone (db-1 is revoked)", nodes)
	}
}

func TestOutputFlagRefusesUnknownFormat(t *testing.T) {
	f := withFixtures(newFakeController(t))
	for _, args := range [][]string{{"status"}, {"nodes", "list"}, {"token", "list"}, {"audit"}, {"policy", "render", "--node", "x"}} {
		_, errOut, code := f.run(append(args, "-o", "xml")...)
		if code != 2 || !strings.Contains(errOut, "want table, json or yaml") {
			t.Errorf("%v -o xml: exit %d %q, want exit 2 naming the formats", args, code, errOut)
		}
	}
	if n := len(f.requests(segmeshv1connect.OperatorServiceStatusProcedure)); n != 0 {
		t.Errorf("a bad -o still called the controller %d times", n)
	}
	// "text" is another name for table.
	if out, _, code := f.run("status", "-o", "text"); code != 0 || !strings.HasPrefix(out, "policy revision: 3") {
		t.Errorf("status -o text: exit %d:\n%s", code, out)
	}
}

func TestParseLabelChanges(t *testing.T) {
	tests := []struct {
		args       []string
		set        map[string]string
		remove     []string
		wantErr    string
		wantNoCall bool
	}{
		{args: []string{"role=db"}, set: map[string]string{"role": "db"}},
		{args: []string{"role=db", "env-", "tier="}, set: map[string]string{"role": "db", "tier": ""}, remove: []string{"env"}},
		{args: []string{"env-", "zone-"}, set: map[string]string{}, remove: []string{"env", "zone"}},
		{args: []string{"k-=v"}, set: map[string]string{"k-": "v"}}, // '=' decides; the controller refuses the key
		{args: []string{"role"}, wantErr: "want KEY=VALUE to set a label or KEY- to remove one"},
		{args: []string{"-"}, wantErr: "the key is empty"},
		{args: []string{"=db"}, wantErr: "the key is empty"},
		{args: []string{"role=db", "role-"}, wantErr: `key "role" given twice`},
		{args: []string{"role=db", "role=web"}, wantErr: `key "role" given twice`},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			set, remove, err := parseLabelChanges(tt.args)
			if tt.wantErr != "" {
				var ee *exitError
				if !errors.As(err, &ee) || ee.code != 2 || !strings.Contains(ee.msg, tt.wantErr) {
					t.Errorf("error = %v, want exit 2 with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || !cmp.Equal(set, tt.set) || !slices.Equal(remove, tt.remove) {
				t.Errorf("= %v, %v, %v; want %v, %v", set, remove, err, tt.set, tt.remove)
			}
		})
	}
}

// TestChangeCommands: each change sends the request its arguments say and prints
// what happened.
func TestChangeCommands(t *testing.T) {
	f := newFakeController(t)
	f.reply(segmeshv1connect.OperatorServiceRevokeNodeProcedure, connect.NewResponse(&segmeshv1.RevokeNodeResponse{}))
	f.reply(segmeshv1connect.OperatorServiceDeleteNodeProcedure, connect.NewResponse(&segmeshv1.DeleteNodeResponse{
		Addresses: []string{"100.64.0.2/32", "fd5e:6d65:7368::2/128"}, QuarantinedUntilUnix: 1796700000}))
	f.reply(segmeshv1connect.OperatorServiceLabelNodeProcedure, connect.NewResponse(&segmeshv1.LabelNodeResponse{
		Labels: map[string]string{"role": "db", "tier": "1"}}))
	f.reply(segmeshv1connect.OperatorServiceRotateNodeKeyProcedure, connect.NewResponse(&segmeshv1.RotateNodeKeyResponse{Generation: 4}))
	f.reply(segmeshv1connect.OperatorServiceRevokeTokenProcedure, connect.NewResponse(&segmeshv1.RevokeTokenResponse{}))
	f.reply(segmeshv1connect.OperatorServiceRevokeOperatorProcedure, connect.NewResponse(&segmeshv1.RevokeOperatorResponse{}))
	tests := []struct {
		args      []string
		procedure string
		req       proto.Message
		out       string
	}{
		{[]string{"nodes", "revoke", "web-1"}, segmeshv1connect.OperatorServiceRevokeNodeProcedure, &segmeshv1.RevokeNodeRequest{Name: "web-1"},
			"node web-1 revoked: removed from every netmap; its name and key cannot enroll again until `segmesh nodes delete web-1`\n"},
		{[]string{"nodes", "delete", "web-1"}, segmeshv1connect.OperatorServiceDeleteNodeProcedure, &segmeshv1.DeleteNodeRequest{Name: "web-1"},
			"node web-1 deleted: removed from every netmap and from the inventory\n" +
				"addresses 100.64.0.2/32, fd5e:6d65:7368::2/128 quarantined until 2026-12-08T03:20:00Z (not given to another node before then)\n"},
		{[]string{"nodes", "label", "web-1", "role=db", "tier=1", "env-"}, segmeshv1connect.OperatorServiceLabelNodeProcedure,
			&segmeshv1.LabelNodeRequest{Name: "web-1", Set: map[string]string{"role": "db", "tier": "1"}, Remove: []string{"env"}},
			"node web-1 labels: role=db,tier=1\n"},
		{[]string{"nodes", "rotate-key", "web-1"}, segmeshv1connect.OperatorServiceRotateNodeKeyProcedure, &segmeshv1.RotateNodeKeyRequest{Name: "web-1"},
			"node web-1: key rotation 4 requested; its agent generates a new WireGuard key and its peers switch over when it reports it (see `segmesh nodes show web-1`)\n"},
		{[]string{"token", "revoke", "tok1"}, segmeshv1connect.OperatorServiceRevokeTokenProcedure, &segmeshv1.RevokeTokenRequest{Id: "tok1"},
			"token tok1 revoked: it enrolls no further node; nodes already enrolled with it stay\n"},
		{[]string{"operators", "revoke", "alice"}, segmeshv1connect.OperatorServiceRevokeOperatorProcedure, &segmeshv1.RevokeOperatorRequest{Name: "alice"},
			"operator alice revoked: the controller refuses its credential from now on\n"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, errOut, code := f.run(tt.args...)
			if code != 0 || out != tt.out {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit 0 and %q", code, out, errOut, tt.out)
			}
			reqs := f.requests(tt.procedure)
			if len(reqs) == 0 {
				t.Fatalf("no %s request", tt.procedure)
			}
			if d := cmp.Diff(tt.req, reqs[len(reqs)-1], protocmp.Transform()); d != "" {
				t.Errorf("request (-want +got):\n%s", d)
			}
		})
	}
}

// TestExitCodes: refusals exit 1 with the controller's message; credential and
// connection problems exit 2; usage errors exit 2 before any call.
func TestExitCodes(t *testing.T) {
	tests := []struct {
		name  string
		setup func(f *fakeController)
		args  []string
		code  int
		msg   []string
	}{
		{"test refuses relabel", func(f *fakeController) {
			f.fail(segmeshv1connect.OperatorServiceLabelNodeProcedure, connect.NewError(connect.CodeFailedPrecondition,
				errors.New(`p.yaml:20:5: test "web-reaches-db" fails on the new labels: web-1 -> db-1 tcp/5432 is denied`)))
		}, []string{"nodes", "label", "web-1", "role=db"}, 1, []string{
			`segmesh: labelling node web-1: p.yaml:20:5: test "web-reaches-db" fails on the new labels: web-1 -> db-1 tcp/5432 is denied`,
			"relabel refused; the labels of web-1 are unchanged"}},
		{"viewer refused", func(f *fakeController) {
			f.fail(segmeshv1connect.OperatorServiceRevokeNodeProcedure, connect.NewError(connect.CodePermissionDenied, errors.New("operator alice has role viewer")))
		}, []string{"nodes", "revoke", "web-1"}, 1, []string{"revoking node web-1: refused, the role of this operator credential does not allow it: operator alice has role viewer"}},
		{"unknown node", func(f *fakeController) {
			f.fail(segmeshv1connect.OperatorServiceDeleteNodeProcedure, connect.NewError(connect.CodeNotFound, errors.New(`node "ghost" is not enrolled`)))
		}, []string{"nodes", "delete", "ghost"}, 1, []string{`deleting node ghost: node "ghost" is not enrolled`}},
		{"revoked credential", func(f *fakeController) {
			f.fail(segmeshv1connect.OperatorServiceListTokensProcedure, connect.NewError(connect.CodeUnauthenticated, errors.New("unknown or revoked credential")))
		}, []string{"token", "list"}, 2, []string{"listing tokens: unknown or revoked credential (check --credentials"}},
		{"label without change", nil, []string{"nodes", "label", "web-1"}, 2, []string{"nodes label takes a node NAME and at least one KEY=VALUE or KEY-"}},
		{"label bad syntax", nil, []string{"nodes", "label", "web-1", "role"}, 2, []string{"want KEY=VALUE"}},
		{"revoke without name", nil, []string{"nodes", "revoke"}, 2, []string{"segmesh nodes revoke takes one argument, NAME"}},
		{"two names", nil, []string{"token", "revoke", "a", "b"}, 2, []string{"segmesh token revoke takes one argument, ID"}},
		{"bad since", nil, []string{"audit", "--since", "yesterday"}, 2, []string{`--since "yesterday": want a duration`}},
		{"bad role", nil, []string{"operators", "create", "bob", "--role", "root"}, 2, []string{`--role "root": want admin or viewer`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeController(t)
			if tt.setup != nil {
				tt.setup(f)
			}
			out, errOut, code := f.run(tt.args...)
			if code != tt.code {
				t.Errorf("exit %d, want %d (stdout %q stderr %q)", code, tt.code, out, errOut)
			}
			for _, m := range tt.msg {
				if !strings.Contains(errOut, m) {
					t.Errorf("stderr %q lacks %q", errOut, m)
				}
			}
			if tt.setup == nil {
				f.mu.Lock()
				if len(f.calls) != 0 {
					t.Errorf("a usage error still called the controller: %v", f.calls)
				}
				f.mu.Unlock()
			}
		})
	}

	// An unreachable controller is a connection problem.
	f := newFakeController(t)
	_, errOut, code := runCLI(t, "--credentials", f.creds, "--controller", "https://127.0.0.1:1", "status")
	if code != 2 || !strings.Contains(errOut, "controller unreachable") {
		t.Errorf("unreachable controller: exit %d %q, want exit 2", code, errOut)
	}
}

func TestAuditVerifyTampered(t *testing.T) {
	f := newFakeController(t)
	f.reply(segmeshv1connect.OperatorServiceVerifyAuditProcedure, connect.NewResponse(&segmeshv1.VerifyAuditResponse{
		Ok: false, Records: 7, FirstBadSeq: 5, Problem: "hash does not match its content (edited)"}))
	out, _, code := f.run("audit", "verify")
	if code != 1 || out != "audit log tampered: record 5: hash does not match its content (edited)\n" {
		t.Errorf("exit %d stdout %q; want exit 1 naming record 5", code, out)
	}
	out, _, code = f.run("audit", "verify", "-o", "json")
	var v verifyJSON
	if err := json.Unmarshal([]byte(out), &v); err != nil || code != 1 || v.OK || v.FirstBadSeq != 5 {
		t.Errorf("-o json: exit %d %+v %v; want exit 1 with first_bad_seq 5", code, v, err)
	}
}

func TestAuditFilters(t *testing.T) {
	f := withFixtures(newFakeController(t))
	before := time.Now()
	tests := []struct {
		args      []string
		node      string
		sinceFrom int64 // SinceUnix must lie in [sinceFrom, sinceTo]
		sinceTo   int64
	}{
		{[]string{"audit"}, "", 0, 0},
		{[]string{"audit", "--node", "web-1"}, "web-1", 0, 0},
		{[]string{"audit", "--since", "24h"}, "", before.Add(-24 * time.Hour).Unix(), time.Now().Add(-24*time.Hour).Unix() + 1},
		{[]string{"audit", "--since", "2026-12-01T00:53:20Z", "--node", "db-1"}, "db-1", t2, t2},
		{[]string{"audit", "--since", "2026-12-01T02:53:20+02:00"}, "", t2, t2},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			if _, errOut, code := f.run(tt.args...); code != 0 {
				t.Fatalf("exit %d: %s", code, errOut)
			}
			reqs := f.requests(segmeshv1connect.OperatorServiceListAuditProcedure)
			got := reqs[len(reqs)-1].(*segmeshv1.ListAuditRequest)
			if got.GetNode() != tt.node || got.GetSinceUnix() < tt.sinceFrom || got.GetSinceUnix() > tt.sinceTo {
				t.Errorf("request node %q since %d; want node %q since in [%d, %d]", got.GetNode(), got.GetSinceUnix(), tt.node, tt.sinceFrom, tt.sinceTo)
			}
		})
	}
}

// TestOperatorsCreate: the credential file holds the caller's controller URL and
// CA and the new token, has mode 0600, and an existing file is never replaced
// (nor is a credential created for it).
func TestOperatorsCreate(t *testing.T) {
	f := newFakeController(t)
	f.reply(segmeshv1connect.OperatorServiceCreateOperatorProcedure, connect.NewResponse(&segmeshv1.CreateOperatorResponse{
		Operator: &segmeshv1.OperatorInfo{Name: "alice", Role: "viewer"}, Token: "alice-secret"}))
	dir := t.TempDir()
	path := filepath.Join(dir, "alice.json")

	out, errOut, code := f.run("operators", "create", "alice", "--role", "viewer", "--out", path)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	if want := "operator alice (role viewer) created; credential written to " + path + " (mode 0600): use it with --credentials " + path + "\n"; out != want {
		t.Errorf("stdout %q, want %q", out, want)
	}
	if strings.Contains(out, "alice-secret") {
		t.Error("the token was printed")
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", st.Mode().Perm())
	}
	raw, _ := os.ReadFile(path)
	var c credentials
	if err := json.Unmarshal(raw, &c); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(credentials{Controller: f.url, CAPEM: f.caPEM, Token: "alice-secret"}, c); d != "" {
		t.Errorf("credential file (-want +got):\n%s", d)
	}
	if d := cmp.Diff([]proto.Message{&segmeshv1.CreateOperatorRequest{Name: "alice", Role: "viewer"}},
		f.requests(segmeshv1connect.OperatorServiceCreateOperatorProcedure), protocmp.Transform()); d != "" {
		t.Errorf("requests (-want +got):\n%s", d)
	}
	// The written file is a working credential for the CLI, with the new token.
	f.reply(segmeshv1connect.OperatorServiceListOperatorsProcedure, connect.NewResponse(&segmeshv1.ListOperatorsResponse{}))
	if _, errOut, code := runCLI(t, "--credentials", path, "operators", "list"); code != 0 {
		t.Errorf("using the new credential: exit %d %q", code, errOut)
	}
	f.mu.Lock()
	if last := f.calls[len(f.calls)-1]; last.bearer != "Bearer alice-secret" {
		t.Errorf("the new credential sent Authorization %q", last.bearer)
	}
	f.mu.Unlock()

	// An existing file is refused before any credential is created.
	_, errOut, code = f.run("operators", "create", "alice2", "--role", "admin", "--out", path)
	if code != 2 || !strings.Contains(errOut, path+" exists; not overwriting it") {
		t.Errorf("existing file: exit %d %q", code, errOut)
	}
	if after, _ := os.ReadFile(path); string(after) != string(raw) {
		t.Error("the existing credential file was changed")
	}
	if n := len(f.requests(segmeshv1connect.OperatorServiceCreateOperatorProcedure)); n != 1 {
		t.Errorf("%d CreateOperator calls, want 1 (none for the refused file)", n)
	}

	// A refused creation leaves no file behind.
	f.fail(segmeshv1connect.OperatorServiceCreateOperatorProcedure, connect.NewError(connect.CodeAlreadyExists, errors.New(`operator "alice" exists`)))
	other := filepath.Join(dir, "again.json")
	_, errOut, code = f.run("operators", "create", "alice", "--role", "viewer", "--out", other)
	if code != 1 || !strings.Contains(errOut, `creating operator alice: operator "alice" exists`) {
		t.Errorf("refused creation: exit %d %q", code, errOut)
	}
	if _, err := os.Stat(other); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("refused creation left %s: %v", other, err)
	}
}
