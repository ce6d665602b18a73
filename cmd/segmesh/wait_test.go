package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// scriptedStatus is a fake statusSource: it answers the calls in order from
// script and repeats the last answer once the script is used up.
type scriptedStatus struct {
	mu     sync.Mutex
	script []scriptedAnswer
	calls  int
}

type scriptedAnswer struct {
	st  *segmeshv1.StatusResponse
	err error
}

func (s *scriptedStatus) source(context.Context) (*segmeshv1.StatusResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.script[min(s.calls, len(s.script)-1)]
	s.calls++
	return a.st, a.err
}

// node builds a NodeStatus: online or not, desired hash "want", applied hash
// applied (revisions follow the hashes' last character when it is a digit).
func node(name string, online bool, desired, applied string) *segmeshv1.NodeStatus {
	rev := func(h string) uint64 {
		if h == "" || h[len(h)-1] < '0' || h[len(h)-1] > '9' {
			return 0
		}
		return uint64(h[len(h)-1] - '0')
	}
	return &segmeshv1.NodeStatus{Name: name, State: nodeStateActive, Online: online, DesiredRevision: rev(desired), AppliedRevision: rev(applied),
		DesiredHash: desired, AppliedHash: applied}
}

func status(serving uint64, nodes ...*segmeshv1.NodeStatus) scriptedAnswer {
	return scriptedAnswer{st: &segmeshv1.StatusResponse{PolicyRevision: serving, ServingRevision: serving, Nodes: nodes}}
}

// fastPoller polls without pause worth mentioning, so that a test's timeout is
// many polls long.
var fastPoller = poller{min: time.Millisecond, max: 2 * time.Millisecond}

// TestWaitEnforced runs the wait loop against scripted Status answers: it ends
// once every online active node reports its desired hash for the revision, skips
// offline nodes, ignores revoked ones, retries an unreachable controller, gives
// up on a refusal, and on timeout returns what it saw last.
func TestWaitEnforced(t *testing.T) {
	revoked := node("gone-1", false, "h7", "h5")
	revoked.State = nodeStateRevoked
	withError := node("db-1", true, "h7", "h6")
	withError.Error = "nftables: netlink: operation not permitted"
	unavailable := scriptedAnswer{err: connect.NewError(connect.CodeUnavailable, errors.New("connection refused"))}
	tests := []struct {
		name    string
		script  []scriptedAnswer
		timeout time.Duration
		// want: the summaries progress saw (consecutive duplicates dropped), the
		// error (substring, "" none), pending and skipped nodes at the end.
		wantProgress []string
		wantErr      string
		wantPending  []string
		wantSkipped  []string
	}{
		{
			name: "converges",
			script: []scriptedAnswer{
				status(6, node("web-1", true, "h6", "h6"), node("db-1", true, "h6", "h6")), // revision 7 not served yet
				status(7, node("web-1", true, "h7", "h6"), node("db-1", true, "h7", "h6")),
				status(7, node("web-1", true, "h7", "h7"), node("db-1", true, "h7", "h6")),
				status(7, node("web-1", true, "h7", "h7"), node("db-1", true, "h7", "h7")),
			},
			wantProgress: []string{
				"revision 7: 2/2 online nodes enforce it; the controller still serves revision 6",
				"revision 7: 0/2 online nodes enforce it",
				"revision 7: 1/2 online nodes enforce it",
				"revision 7: 2/2 online nodes enforce it",
			},
			wantPending: []string{}, wantSkipped: []string{},
		},
		{
			name: "offline nodes are skipped, revoked ones ignored",
			script: []scriptedAnswer{
				status(7, node("web-1", true, "h7", "h7"), node("db-1", false, "h7", "h6"), revoked),
			},
			wantProgress: []string{"revision 7: 1/1 online nodes enforce it (1 offline, skipped)"},
			wantPending:  []string{}, wantSkipped: []string{"db-1"},
		},
		{
			name: "a node that goes offline is no longer waited for",
			script: []scriptedAnswer{
				status(7, node("web-1", true, "h7", "h7"), node("db-1", true, "h7", "h6")),
				status(7, node("web-1", true, "h7", "h7"), node("db-1", false, "h7", "h6")),
			},
			wantProgress: []string{"revision 7: 1/2 online nodes enforce it", "revision 7: 1/1 online nodes enforce it (1 offline, skipped)"},
			wantPending:  []string{}, wantSkipped: []string{"db-1"},
		},
		{
			name: "a later revision counts",
			script: []scriptedAnswer{
				status(8, node("web-1", true, "h8", "h8")),
			},
			wantProgress: []string{"revision 7: 1/1 online nodes enforce it"},
			wantPending:  []string{}, wantSkipped: []string{},
		},
		{
			name:         "no node at all",
			script:       []scriptedAnswer{status(7)},
			wantProgress: []string{"revision 7: 0/0 online nodes enforce it"},
			wantPending:  []string{}, wantSkipped: []string{},
		},
		{
			name: "an unreachable controller is retried",
			script: []scriptedAnswer{
				unavailable,
				status(7, node("web-1", true, "h7", "h7")),
			},
			wantProgress: []string{"revision 7: 1/1 online nodes enforce it"},
			wantPending:  []string{}, wantSkipped: []string{},
		},
		{
			name: "an empty applied hash is not the desired netmap",
			script: []scriptedAnswer{
				status(7, node("web-1", true, "", "")),
			},
			timeout:      50 * time.Millisecond,
			wantProgress: []string{"revision 7: 0/1 online nodes enforce it"},
			wantErr:      context.DeadlineExceeded.Error(),
			wantPending:  []string{"web-1"}, wantSkipped: []string{},
		},
		{
			name: "timeout",
			script: []scriptedAnswer{
				status(7, node("web-1", true, "h7", "h7"), withError, node("ops-1", false, "h7", "h5")),
			},
			timeout:      50 * time.Millisecond,
			wantProgress: []string{"revision 7: 1/2 online nodes enforce it (1 offline, skipped)"},
			wantErr:      context.DeadlineExceeded.Error(),
			wantPending:  []string{"db-1"}, wantSkipped: []string{"ops-1"},
		},
		{
			name: "timeout while the controller serves an older revision",
			script: []scriptedAnswer{
				status(6, node("web-1", true, "h6", "h6")),
			},
			timeout:      50 * time.Millisecond,
			wantProgress: []string{"revision 7: 1/1 online nodes enforce it; the controller still serves revision 6"},
			wantErr:      context.DeadlineExceeded.Error(),
			wantPending:  []string{}, wantSkipped: []string{},
		},
		{
			name: "timeout with the controller unreachable at the end",
			script: []scriptedAnswer{
				status(7, node("web-1", true, "h7", "h6")),
				unavailable,
			},
			timeout:      50 * time.Millisecond,
			wantProgress: []string{"revision 7: 0/1 online nodes enforce it"},
			wantErr:      "the last status call failed: unavailable: connection refused",
			wantPending:  []string{"web-1"}, wantSkipped: []string{},
		},
		{
			name: "a refusal ends the wait",
			script: []scriptedAnswer{
				{err: connect.NewError(connect.CodePermissionDenied, errors.New("role viewer"))},
			},
			wantErr: "permission_denied: role viewer",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			timeout := cmpOr(tt.timeout, 10*time.Second)
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			src := &scriptedStatus{script: tt.script}
			var progress []string
			e, err := fastPoller.waitEnforced(ctx, 7, src.source, func(e enforcement) {
				if s := e.summary(); len(progress) == 0 || progress[len(progress)-1] != s {
					progress = append(progress, s)
				}
			})
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("error %v, want none", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
			}
			if !slices.Equal(progress, tt.wantProgress) {
				t.Errorf("progress:\n%s\nwant:\n%s", strings.Join(progress, "\n"), strings.Join(tt.wantProgress, "\n"))
			}
			if tt.wantPending == nil {
				return
			}
			names := func(ns []waitNodeJSON) []string {
				out := []string{}
				for _, n := range ns {
					out = append(out, n.Name)
				}
				return out
			}
			if got := names(e.Pending); !slices.Equal(got, tt.wantPending) {
				t.Errorf("pending %v, want %v", got, tt.wantPending)
			}
			if got := names(e.Skipped); !slices.Equal(got, tt.wantSkipped) {
				t.Errorf("skipped %v, want %v", got, tt.wantSkipped)
			}
			if done := err == nil; e.done() != done {
				t.Errorf("done() = %v with error %v", e.done(), err)
			}
		})
	}
}

func cmpOr(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// TestWaitPollBackoff: the interval between polls doubles from the minimum up to
// the maximum.
func TestWaitPollBackoff(t *testing.T) {
	var at []time.Time
	src := func(context.Context) (*segmeshv1.StatusResponse, error) {
		at = append(at, time.Now())
		if len(at) == 6 {
			return status(7).st, nil
		}
		return status(6).st, nil
	}
	p := poller{min: 10 * time.Millisecond, max: 40 * time.Millisecond}
	if _, err := p.waitEnforced(context.Background(), 7, src, func(enforcement) {}); err != nil {
		t.Fatal(err)
	}
	// Timers never fire early: gap i is at least the interval in force.
	for i, want := range []time.Duration{10, 20, 40, 40, 40} {
		if gap := at[i+1].Sub(at[i]); gap < want*time.Millisecond {
			t.Errorf("gap %d: %v, want >= %v", i, gap, want*time.Millisecond)
		}
	}
}

// TestProgressView: on a terminal one line redrawn in place, never wider than
// the terminal; elsewhere a line per change.
func TestProgressView(t *testing.T) {
	e := enforcement{Revision: 7, ServingRevision: 7, NodesOnline: 4, NodesEnforcing: 1, Skipped: []waitNodeJSON{{Name: "ops-1"}}}
	later := e
	later.NodesEnforcing = 4

	var plain bytes.Buffer
	v := newProgressView(&plain)
	if v.tty {
		t.Fatal("a buffer is not a terminal")
	}
	v.update(e)
	v.update(e)
	v.update(later)
	v.finish()
	want := "waiting: revision 7: 1/4 online nodes enforce it (1 offline, skipped)\nwaiting: revision 7: 4/4 online nodes enforce it (1 offline, skipped)\n"
	if plain.String() != want {
		t.Errorf("plain progress:\n%q\nwant:\n%q", plain.String(), want)
	}

	for _, cols := range []int{200, 40} {
		var tty bytes.Buffer
		now := time.Date(2026, 12, 2, 3, 0, 0, 0, time.UTC)
		v := &progressView{w: &tty, tty: true, width: func() int { return cols }, start: now, now: func() time.Time { now = now.Add(1500 * time.Millisecond); return now }}
		v.update(e)
		v.update(later)
		v.finish()
		draws := strings.Split(strings.TrimSuffix(tty.String(), "\n"), "\r\x1b[K")
		if len(draws) != 3 || draws[0] != "" || !strings.HasSuffix(tty.String(), "\n") {
			t.Fatalf("%d columns: want two draws in place and a final newline, got %q", cols, tty.String())
		}
		for _, d := range draws[1:] {
			if len(d) >= cols {
				t.Errorf("%d columns: line %q is %d wide", cols, d, len(d))
			}
		}
		if cols == 200 {
			if want := "[######..................] revision 7: 1/4 online nodes enforce it (1 offline, skipped), 1.5s"; draws[1] != want {
				t.Errorf("first draw %q, want %q", draws[1], want)
			}
			if !strings.HasPrefix(draws[2], "[########################] revision 7: 4/4") || !strings.HasSuffix(draws[2], ", 3s") {
				t.Errorf("second draw %q", draws[2])
			}
		}
	}
}

// TestPolicyApplyWaitCLI: `policy apply --wait` prints the outcome in the -o
// format and exits 0 when every online node enforces the revision, 3 listing the
// nodes that do not after --timeout; the flags are checked before any call.
func TestPolicyApplyWaitCLI(t *testing.T) {
	setupFiles(t)
	f := newFakeController(t)
	f.reply(segmeshv1connect.OperatorServiceApplyPolicyProcedure, connect.NewResponse(&segmeshv1.ApplyPolicyResponse{Revision: 7}))

	offline := node("ops-1", false, "h7", "h5")
	offline.LastSeenUnix = t2
	f.reply(segmeshv1connect.OperatorServiceStatusProcedure, connect.NewResponse(&segmeshv1.StatusResponse{PolicyRevision: 7, ServingRevision: 7,
		Nodes: []*segmeshv1.NodeStatus{node("web-1", true, "h7", "h7"), offline}}))
	out, errOut, code := f.run("policy", "apply", "--wait", "-o", "json", "policy.yaml")
	if code != 0 {
		t.Fatalf("exit %d, want 0:\n%s%s", code, out, errOut)
	}
	var doc applyJSON
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("-o json: %v\n%s", err, out)
	}
	w := doc.Wait
	if doc.Revision != 7 || w == nil || !w.Enforced || w.NodesOnline != 1 || w.NodesEnforcing != 1 || len(w.Pending) != 0 ||
		len(w.Skipped) != 1 || w.Skipped[0].Name != "ops-1" || w.Skipped[0].AppliedRevision != 5 || w.Skipped[0].LastSeen == "" {
		t.Errorf("apply --wait -o json:\n%s", out)
	}
	if want := "waiting: revision 7: 1/1 online nodes enforce it (1 offline, skipped)\n"; errOut != want {
		t.Errorf("stderr %q, want the progress line %q", errOut, want)
	}

	pending := node("db-1", true, "h7", "h6")
	pending.Error = "nftables: boom"
	f.reply(segmeshv1connect.OperatorServiceStatusProcedure, connect.NewResponse(&segmeshv1.StatusResponse{PolicyRevision: 7, ServingRevision: 7,
		Nodes: []*segmeshv1.NodeStatus{node("web-1", true, "h7", "h7"), pending, offline}}))
	out, errOut, code = f.run("policy", "apply", "--wait", "--timeout", "300ms", "policy.yaml")
	if code != exitNotEnforced || !strings.Contains(errOut, "revision 7 is stored, but 1 of 2 online nodes did not report enforcing it within 300ms") {
		t.Errorf("exit %d, want %d and a message on the timeout:\n%s", code, exitNotEnforced, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 5 || lines[0] != "applied revision 7" ||
		!strings.HasPrefix(lines[1], "NOT ENFORCED after ") || !strings.HasSuffix(lines[1], ": revision 7: 1/2 online nodes enforce it (1 offline, skipped)") ||
		strings.Join(strings.Fields(lines[2]), " ") != "NODE WAIT DESIRED APPLIED DESIRED_HASH APPLIED_HASH LAST_SEEN ERROR" ||
		strings.Join(strings.Fields(lines[3]), " ") != "db-1 pending 7 6 h7 h6 - nftables: boom" ||
		strings.Join(strings.Fields(lines[4]), " ") != "ops-1 skipped (offline) 7 5 h7 h5 "+unixTime(t2)+" -" {
		t.Errorf("apply --wait timeout table:\n%s", out)
	}

	applies := len(f.requests(segmeshv1connect.OperatorServiceApplyPolicyProcedure))
	for _, args := range [][]string{
		{"policy", "apply", "--timeout", "1m", "policy.yaml"},
		{"policy", "apply", "--wait", "--timeout", "0s", "policy.yaml"},
		{"policy", "rollback", "--timeout", "1m", "3"},
	} {
		if _, errOut, code := f.run(args...); code != 2 || !strings.Contains(errOut, "--timeout") {
			t.Errorf("%v: exit %d %q, want a usage error on --timeout", args, code, errOut)
		}
	}
	if n := len(f.requests(segmeshv1connect.OperatorServiceApplyPolicyProcedure)); n != applies {
		t.Errorf("a bad --timeout still applied the policy")
	}
}

// TestPolicyRollbackWaitCLI: rollback --wait waits like apply.
func TestPolicyRollbackWaitCLI(t *testing.T) {
	f := newFakeController(t)
	f.reply(segmeshv1connect.OperatorServiceRollbackPolicyProcedure, connect.NewResponse(&segmeshv1.RollbackPolicyResponse{Revision: 8}))
	f.reply(segmeshv1connect.OperatorServiceStatusProcedure, connect.NewResponse(&segmeshv1.StatusResponse{PolicyRevision: 8, ServingRevision: 8,
		Nodes: []*segmeshv1.NodeStatus{node("web-1", true, "h8", "h8")}}))
	out, errOut, code := f.run("policy", "rollback", "--wait", "3")
	if code != 0 || !strings.HasPrefix(out, "applied revision 8 (the policy of revision 3)\nrevision 8: 1/1 online nodes enforce it (after ") {
		t.Errorf("rollback --wait: exit %d\n%s%s", code, out, errOut)
	}
}

// TestPollForRevisionOutcome: a wait that timed out says why its last status call
// failed; one that never reached the controller is a connection problem (exit 2).
func TestPollForRevisionOutcome(t *testing.T) {
	unavailable := scriptedAnswer{err: connect.NewError(connect.CodeUnavailable, errors.New("connection refused"))}
	src := &scriptedStatus{script: []scriptedAnswer{status(7, node("web-1", true, "h7", "h6")), unavailable}}
	var progress bytes.Buffer
	w, err := pollForRevision(context.Background(), src.source, fastPoller, 7, 50*time.Millisecond, newProgressView(&progress))
	if err != nil {
		t.Fatal(err)
	}
	if w.Enforced || w.StatusError != "unavailable: connection refused" || len(w.Pending) != 1 {
		t.Errorf("outcome %+v, want not enforced, web-1 pending, the status error", w)
	}
	var table strings.Builder
	if err := w.writeTable(&table); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table.String(), "the last status call failed (nodes as the call before saw them): unavailable: connection refused\n") {
		t.Errorf("table does not say the last call failed:\n%s", table.String())
	}

	src = &scriptedStatus{script: []scriptedAnswer{unavailable}}
	_, err = pollForRevision(context.Background(), src.source, fastPoller, 7, 50*time.Millisecond, newProgressView(&progress))
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != 2 || !strings.Contains(ee.msg, "revision 7 is stored") || !strings.Contains(ee.msg, "no answer within 50ms") {
		t.Errorf("never reached: %v, want exit 2 saying the revision is stored and no answer came", err)
	}
}

// TestPollForRevisionInterrupted: an interrupt ends the wait like a timeout,
// with what the last poll saw.
func TestPollForRevisionInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	src := &scriptedStatus{script: []scriptedAnswer{status(7, node("web-1", true, "h7", "h6"))}}
	polls := 0
	counting := func(ctx context.Context) (*segmeshv1.StatusResponse, error) {
		if polls++; polls == 3 {
			cancel()
		}
		return src.source(ctx)
	}
	var progress bytes.Buffer
	w, err := pollForRevision(ctx, counting, fastPoller, 7, time.Minute, newProgressView(&progress))
	if err != nil {
		t.Fatal(err)
	}
	if w.Enforced || !w.Interrupted || len(w.Pending) != 1 {
		t.Errorf("outcome %+v, want interrupted with web-1 pending", w)
	}
	var ee *exitError
	if !errors.As(w.notEnforcedError(time.Minute), &ee) || ee.code != exitNotEnforced || !strings.Contains(ee.msg, "interrupted with 1 of 1 online nodes not enforcing it") {
		t.Errorf("exit %v", w.notEnforcedError(time.Minute))
	}
}

// TestAssessEnforcementUnconvergedOnly: a controller answering unconverged_only
// lists the pending and offline nodes alone; the counts come from its totals.
func TestAssessEnforcementUnconvergedOnly(t *testing.T) {
	st := &segmeshv1.StatusResponse{ServingRevision: 7, NodesActive: 1000, NodesOnline: 998, NodesCurrent: 997,
		Nodes: []*segmeshv1.NodeStatus{node("a", true, "h7", "h6"), node("b", false, "h7", "h6"), node("c", false, "h7", "h6")}}
	e := assessEnforcement(7, st)
	if e.NodesActive != 1000 || e.NodesOnline != 998 || e.NodesEnforcing != 997 || len(e.Pending) != 1 || len(e.Skipped) != 2 || e.done() {
		t.Fatalf("assessEnforcement = active %d online %d enforcing %d pending %d skipped %d done %v; want 1000 998 997 1 2 false",
			e.NodesActive, e.NodesOnline, e.NodesEnforcing, len(e.Pending), len(e.Skipped), e.done())
	}
}
