package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// TestSyncAndDriftColumns: SYNC says "in sync" only when the node enforces its
// latest netmap and its agent's latest read-back found exactly that; DRIFT counts
// repairs and says how long ago the latest was.
func TestSyncAndDriftColumns(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	at := func(d time.Duration) int64 { return now.Add(-d).Unix() }
	inSync := func(edit func(n *segmeshv1.NodeStatus)) *segmeshv1.NodeStatus {
		n := &segmeshv1.NodeStatus{Name: "web-1", State: "active", Online: true, DesiredRevision: 4, AppliedRevision: 4,
			DesiredHash: "h4", AppliedHash: "h4", InSync: true}
		if edit != nil {
			edit(n)
		}
		return n
	}
	tests := []struct {
		name      string
		node      *segmeshv1.NodeStatus
		wantSync  string
		wantDrift string
	}{
		{name: "in sync, never repaired", node: inSync(nil), wantSync: "in sync", wantDrift: "0"},
		{name: "in sync after repairs", node: inSync(func(n *segmeshv1.NodeStatus) {
			n.Drift = &segmeshv1.Drift{Repairs: 3, LastRepairUnix: at(2*time.Minute + 5*time.Second)}
		}), wantSync: "in sync", wantDrift: "3 (2m ago)"},
		{name: "seconds", node: inSync(func(n *segmeshv1.NodeStatus) {
			n.Drift = &segmeshv1.Drift{Repairs: 1, LastRepairUnix: at(7 * time.Second)}
		}), wantSync: "in sync", wantDrift: "1 (7s ago)"},
		{name: "hours", node: inSync(func(n *segmeshv1.NodeStatus) {
			n.Drift = &segmeshv1.Drift{Repairs: 12, LastRepairUnix: at(5 * time.Hour)}
		}),
			wantSync: "in sync", wantDrift: "12 (5h ago)"},
		{name: "days", node: inSync(func(n *segmeshv1.NodeStatus) {
			n.Drift = &segmeshv1.Drift{Repairs: 2, LastRepairUnix: at(75 * time.Hour)}
		}),
			wantSync: "in sync", wantDrift: "2 (3d ago)"},
		{name: "the agent's clock is ahead", node: inSync(func(n *segmeshv1.NodeStatus) {
			n.Drift = &segmeshv1.Drift{Repairs: 1, LastRepairUnix: now.Add(time.Minute).Unix()}
		}), wantSync: "in sync", wantDrift: "1 (0s ago)"},
		{name: "drift not repaired yet", node: inSync(func(n *segmeshv1.NodeStatus) {
			n.InSync = false
			n.Drift = &segmeshv1.Drift{Repairs: 1, LastRepairUnix: at(time.Hour), Unrepaired: []*segmeshv1.DriftDifference{{Part: "route", Detail: "missing [100.64.0.0/10]"}}, UnrepairedMore: 2}
		}), wantSync: "drift", wantDrift: "1 (1h ago) +3 unrepaired"},
		{name: "an agent that does not say it read back", node: inSync(func(n *segmeshv1.NodeStatus) { n.InSync = false }), wantSync: "drift", wantDrift: "0"},
		{name: "error", node: inSync(func(n *segmeshv1.NodeStatus) { n.InSync, n.Error = false, "nftables: boom" }), wantSync: "error", wantDrift: "0"},
		{name: "older revision", node: inSync(func(n *segmeshv1.NodeStatus) { n.AppliedRevision, n.AppliedHash = 3, "h3" }), wantSync: "pending", wantDrift: "0"},
		{name: "same revision, newer netmap", node: inSync(func(n *segmeshv1.NodeStatus) { n.AppliedHash = "h4-before-enroll" }), wantSync: "pending", wantDrift: "0"},
		{name: "offline", node: inSync(func(n *segmeshv1.NodeStatus) { n.Online = false }), wantSync: "offline", wantDrift: "0"},
		{name: "revoked", node: inSync(func(n *segmeshv1.NodeStatus) { n.State, n.Online = "revoked", false }), wantSync: "", wantDrift: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := toNodeJSON(tt.node)
			if n.Sync != tt.wantSync {
				t.Errorf("SYNC %q, want %q", n.Sync, tt.wantSync)
			}
			if got := n.driftCell(now); got != tt.wantDrift {
				t.Errorf("DRIFT %q, want %q", got, tt.wantDrift)
			}
			var out strings.Builder
			if err := (statusJSON{Nodes: []nodeJSON{n}}).writeTable(&out, now); err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(strings.TrimSpace(out.String()), "\n")
			header, row := lines[len(lines)-2], lines[len(lines)-1]
			col := strings.Index(header, "DRIFT")
			if want := orDash(tt.wantDrift); !strings.HasPrefix(row[col:], want+"  ") {
				t.Errorf("DRIFT column of %q is not %q:\n%s", row, want, out.String())
			}
		})
	}
}

// syncBuffer is a bytes.Buffer safe for a writer and a reader in two goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitFor polls cond every 10ms until it holds or 10s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestStatusWatchCLI: status --watch, its output not a terminal, prints the
// status every --interval, each refresh after a blank line, until its context
// ends (as at Ctrl-C), and then exits 0.
func TestStatusWatchCLI(t *testing.T) {
	f := withFixtures(newFakeController(t))
	root := newRootCmd()
	var out, errOut syncBuffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs([]string{"--credentials", f.creds, "status", "--watch", "--interval", "500ms"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	waitFor(t, "three refreshes", func() bool { return strings.Count(out.String(), "policy revision: 3\n") >= 3 })
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("status --watch after an interrupt: %v, want a clean exit", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("status --watch did not end with its context")
	}
	frames := strings.Split(out.String(), "\n\npolicy revision: ")
	if len(frames) < 3 || strings.Contains(out.String(), "\x1b") {
		t.Fatalf("want refreshes separated by a blank line, without terminal escapes:\n%q", out.String())
	}
	for _, fr := range frames[1 : len(frames)-1] {
		if !strings.HasPrefix(fr, "3\nrevision 3: 1/1 active nodes enforce it") || !strings.Contains(fr, "\nweb-1 ") {
			t.Errorf("refresh %q is not a whole status", fr)
		}
	}
	if n := len(f.requests(segmeshv1connect.OperatorServiceStatusProcedure)); n < 3 {
		t.Errorf("%d Status calls, want one per refresh", n)
	}
}

// TestStatusWatchFlags: --interval needs --watch, and is not too short.
func TestStatusWatchFlags(t *testing.T) {
	f := withFixtures(newFakeController(t))
	for _, args := range [][]string{{"status", "--interval", "5s"}, {"status", "--watch", "--interval", "100ms"}, {"status", "--watch", "--interval", "-1s"}} {
		if _, errOut, code := f.run(args...); code != 2 || !strings.Contains(errOut, "--interval") {
			t.Errorf("%q: exit %d %q, want exit 2 about --interval", args, code, errOut)
		}
	}
}

// TestStatusWatchView: on a terminal every refresh redraws in place (cursor home,
// each line cleared to its end, the rest of the screen cleared) under a header;
// elsewhere refreshes follow each other after a separator. A refresh the
// controller could not answer shows the error and the watch goes on; a refused
// one ends it.
func TestStatusWatchView(t *testing.T) {
	now := time.Date(2026, 12, 2, 5, 0, 0, 0, time.UTC)
	st := statusJSON{PolicyRevision: 3, ServingRevision: 3, NodesActive: 1, NodesOnline: 1, NodesCurrent: 1, Nodes: toNodesJSON(statusNodes())}
	unavailable := connect.NewError(connect.CodeUnavailable, errors.New("dial tcp: connection refused"))
	tests := []struct {
		name    string
		tty     bool
		format  outFormat
		results []error // of the fetches in order; the watch ends after the last
		check   func(t *testing.T, out, errOut string)
		wantErr string
	}{
		{name: "terminal", tty: true, format: formatTable, results: []error{nil, nil}, check: func(t *testing.T, out, errOut string) {
			if !strings.HasPrefix(out, "\x1b[H\x1b[2J\x1b[HEvery 1ms: segmesh status    2026-12-02T05:00:00Z\x1b[K\n\x1b[K\npolicy revision: 3\x1b[K\n") {
				t.Errorf("first frame: %q", out)
			}
			frames := strings.Split(out, "\x1b[J")
			if len(frames) != 3 || frames[2] != "" || !strings.HasPrefix(frames[1], "\x1b[HEvery 1ms") || strings.Contains(frames[1], "\x1b[2J") {
				t.Errorf("want two frames, the second redrawn from the cursor home without clearing the screen first: %q", out)
			}
			for _, l := range strings.Split(strings.TrimSuffix(frames[0], "\n"), "\n") {
				if !strings.HasSuffix(l, "\x1b[K") {
					t.Errorf("line %q is not cleared to its end", l)
				}
			}
		}},
		{name: "terminal, controller unreachable once", tty: true, format: formatTable, results: []error{unavailable, nil}, check: func(t *testing.T, out, errOut string) {
			frames := strings.Split(out, "\x1b[J")
			if len(frames) != 3 || !strings.Contains(frames[0], "controller unreachable") || !strings.Contains(frames[0], "retrying every 1ms") || !strings.Contains(frames[1], "policy revision: 3") {
				t.Errorf("want the error, then the status: %q", out)
			}
		}},
		{name: "pipe, json", format: formatJSON, results: []error{nil, unavailable, nil}, check: func(t *testing.T, out, errOut string) {
			dec := json.NewDecoder(strings.NewReader(out))
			for i := range 2 {
				var got statusJSON
				if err := dec.Decode(&got); err != nil || got.PolicyRevision != 3 {
					t.Fatalf("document %d: %v %+v in %q", i, err, got, out)
				}
			}
			if !strings.Contains(out, "}\n\n{") {
				t.Errorf("documents not separated by a blank line: %q", out)
			}
			if !strings.Contains(errOut, "controller unreachable") {
				t.Errorf("stderr %q, want the failed refresh", errOut)
			}
		}},
		{name: "pipe, yaml", format: formatYAML, results: []error{nil, nil}, check: func(t *testing.T, out, errOut string) {
			if docs := strings.Split(out, "\n---\n"); len(docs) != 2 || !strings.HasPrefix(docs[1], "policy_revision: 3\n") {
				t.Errorf("want two YAML documents separated by ---: %q", out)
			}
		}},
		{name: "refused", format: formatTable, results: []error{nil, connect.NewError(connect.CodeUnauthenticated, errors.New("unknown credential"))},
			wantErr: "unknown credential"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var out, errOut bytes.Buffer
			calls := 0
			v := statusWatch{out: &out, errOut: &errOut, tty: tt.tty, interval: time.Millisecond, format: tt.format, now: func() time.Time { return now },
				fetch: func(context.Context) (statusJSON, error) {
					if calls == len(tt.results) {
						// Interrupted during the call: the watch ends
						// without drawing it.
						cancel()
						return st, nil
					}
					calls++
					return st, tt.results[calls-1]
				}}
			err := v.run(ctx)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("run: %v, want an error with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("run: %v", err)
			}
			tt.check(t, out.String(), errOut.String())
		})
	}
}

// TestWatchContextEndsAtSIGTERM: status --watch ends cleanly at SIGTERM (and
// Ctrl-C, SIGINT) instead of being killed.
func TestWatchContextEndsAtSIGTERM(t *testing.T) {
	ctx, stop := watchContext(context.Background())
	defer stop()
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ctx.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the watch context did not end at SIGTERM")
	}
}

// TestStatusStoreAndControllerLines: the table names the store and the replica
// that answered, with every replica when there are several; a controller that
// predates them (fields empty) gets neither line.
func TestStatusStoreAndControllerLines(t *testing.T) {
	tests := []struct {
		name string
		resp *segmeshv1.StatusResponse
		want []string // the lines between the revision lines and the node table
	}{
		{name: "bbolt", resp: &segmeshv1.StatusResponse{Store: "bbolt /var/lib/segmesh/controller.db", Controller: "ctl.example:7443",
			Controllers: []string{"https://ctl.example:7443"}},
			want: []string{"store: bbolt /var/lib/segmesh/controller.db", "controller: ctl.example:7443"}},
		{name: "etcd", resp: &segmeshv1.StatusResponse{Store: "etcd http://10.0.0.1:2379,http://10.0.0.2:2379 (prefix /segmesh/)", Controller: "10.0.0.2:7443",
			Controllers: []string{"https://10.0.0.2:7443", "https://10.0.0.1:7443", "https://10.0.0.3:7443"}},
			want: []string{"store: etcd http://10.0.0.1:2379,http://10.0.0.2:2379 (prefix /segmesh/)",
				"controller: 10.0.0.2:7443 (3 replicas: https://10.0.0.2:7443, https://10.0.0.1:7443, https://10.0.0.3:7443)"}},
		{name: "replicas without a name", resp: &segmeshv1.StatusResponse{Controllers: []string{"https://10.0.0.2:7443", "https://10.0.0.1:7443"}},
			want: []string{"controller: https://10.0.0.2:7443, https://10.0.0.1:7443"}},
		{name: "older controller", resp: &segmeshv1.StatusResponse{}, want: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out strings.Builder
			if err := toStatusJSON(tt.resp).writeTable(&out, time.Now()); err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(out.String(), "\n")
			var got []string
			for _, l := range lines[2:] {
				if strings.HasPrefix(l, "NODE") {
					break
				}
				got = append(got, l)
			}
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Errorf("lines (-want +got):\n%s\n%s", d, out.String())
			}
		})
	}
}
