package main

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// TestControllerURLs: --controller takes one URL or several separated by commas
// and wins over the credential file, which may name them under "controller",
// "controllers" or both (controller first, repeats dropped); every URL must be
// https.
func TestControllerURLs(t *testing.T) {
	const a, b, c = "https://10.0.0.1:7443", "https://10.0.0.2:7443", "https://10.0.0.3:7443"
	tests := []struct {
		name    string
		file    credentials
		flag    string
		want    []string
		wantErr string
	}{
		{name: "controller", file: credentials{Controller: a}, want: []string{a}},
		{name: "controllers", file: credentials{Controllers: []string{a, b, c}}, want: []string{a, b, c}},
		{name: "both", file: credentials{Controller: b, Controllers: []string{a, b, c}}, want: []string{b, a, c}},
		{name: "flag wins", file: credentials{Controllers: []string{a, b}}, flag: c, want: []string{c}},
		{name: "flag list", file: credentials{Controller: a}, flag: b + ", " + c + "," + b, want: []string{b, c}},
		{name: "empty flag entry", file: credentials{Controller: a}, flag: b + ",,", wantErr: "empty entry"},
		{name: "cleartext in a list", file: credentials{Controllers: []string{a, "http://10.0.0.2:7443"}}, wantErr: `"http://10.0.0.2:7443": want https://HOST:PORT`},
		{name: "cleartext in the flag", file: credentials{Controller: a}, flag: a + ",10.0.0.2:7443", wantErr: `"10.0.0.2:7443": want https://HOST:PORT`},
		{name: "none", file: credentials{}, wantErr: "lacks controller (or controllers)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.file.CAPEM, tt.file.Token = "x", "secret"
			path := writeCredentialFile(t, tt.file)
			c, err := loadCredentials(&globalFlags{credentials: path, controller: tt.flag})
			if tt.wantErr != "" {
				var ee *exitError
				if !errors.As(err, &ee) || ee.code != 2 || !strings.Contains(ee.msg, tt.wantErr) {
					t.Fatalf("error %v, want exit 2 with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tt.want, c.urls()); d != "" {
				t.Errorf("URLs (-want +got):\n%s", d)
			}
		})
	}
}

// TestFailoverToTheNextController: a controller that is unreachable (a closed
// port, a certificate of another CA) or says it is not serving
// (CodeUnavailable) did not process the request, so the next one gets it, and
// the output is as with one controller.
func TestFailoverToTheNextController(t *testing.T) {
	otherCA := newFakeController(t) // its certificate is not of the credential's CA
	tests := []struct {
		name string
		// first returns the URL of the first controller; it may configure
		// same, a fake of the credential's CA.
		first func(t *testing.T, same *fakeController, procedure string) string
	}{
		{name: "connection refused", first: func(t *testing.T, _ *fakeController, _ string) string { return closedURL(t) }},
		{name: "TLS handshake fails", first: func(t *testing.T, _ *fakeController, _ string) string { return otherCA.url }},
		{name: "not serving", first: func(t *testing.T, same *fakeController, procedure string) string {
			same.fail(procedure, connect.NewError(connect.CodeUnavailable, errors.New("store unavailable: etcd: context deadline exceeded")))
			return same.url
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A write (revoke) and a read (status): both go to the second.
			for _, c := range []struct {
				procedure string
				args      []string
				wantOut   string
			}{
				{segmeshv1connect.OperatorServiceRevokeNodeProcedure, []string{"nodes", "revoke", "web-1"}, ""},
				{segmeshv1connect.OperatorServiceStatusProcedure, []string{"status"}, "policy revision: 3\n"},
			} {
				fs, _ := newFakeControllers(t, 2)
				second := withFixtures(fs[1])
				second.reply(segmeshv1connect.OperatorServiceRevokeNodeProcedure, connect.NewResponse(&segmeshv1.RevokeNodeResponse{}))
				url := tt.first(t, fs[0], c.procedure)
				creds := writeCredentialFile(t, credentials{Controllers: []string{url, second.url}, CAPEM: second.caPEM, Token: fakeToken})
				out, errOut, code := runCLIStderr(t, append([]string{"--credentials", creds}, c.args...)...)
				if code != 0 || errOut != "" || !strings.HasPrefix(out, c.wantOut) {
					t.Errorf("%q: exit %d, stdout %q, stderr %q; want success from the second controller and nothing extra", c.args, code, out, errOut)
				}
				if n := second.callCount(c.procedure); n != 1 {
					t.Errorf("%q: the second controller got %d calls, want 1", c.args, n)
				}
				if n := fs[0].callCount(c.procedure) + otherCA.callCount(c.procedure); n > 1 {
					t.Errorf("%q: the first controller got %d calls, want at most 1", c.args, n)
				}
			}
		})
	}
}

// TestNoFailoverOnceTheRequestMayHaveBeenProcessed: a controller's refusal or
// internal error, or a failure after the request reached it (the stream reset
// mid-call), ends the call: the request is never sent to the next controller,
// and the message says which controller was tried.
func TestNoFailoverOnceTheRequestMayHaveBeenProcessed(t *testing.T) {
	const revoke = segmeshv1connect.OperatorServiceRevokeNodeProcedure
	tests := []struct {
		name     string
		first    func(f *fakeController)
		wantCode int
		wantMsg  []string
	}{
		{name: "refused", first: func(f *fakeController) {
			f.fail(revoke, connect.NewError(connect.CodeFailedPrecondition, errors.New("node web-1 is already revoked")))
		}, wantCode: 1, wantMsg: []string{"revoking node web-1: node web-1 is already revoked"}},
		{name: "store error", first: func(f *fakeController) {
			f.fail(revoke, connect.NewError(connect.CodeInternal, errors.New("committing: etcdserver: request timed out")))
		}, wantCode: 2, wantMsg: []string{"request timed out"}},
		{name: "busy", first: func(f *fakeController) {
			f.fail(revoke, connect.NewError(connect.CodeResourceExhausted, errors.New("too many calls")))
		}, wantCode: 2, wantMsg: []string{"busy"}},
		{name: "reset mid-call", first: func(f *fakeController) {
			f.handle(revoke, func(proto.Message) (connect.AnyResponse, error) { panic(http.ErrAbortHandler) })
		}, wantCode: 2, wantMsg: []string{"may have reached it, so it was not sent to another controller"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs, creds := newFakeControllers(t, 2)
			tt.first(fs[0])
			fs[1].reply(revoke, connect.NewResponse(&segmeshv1.RevokeNodeResponse{}))
			_, errOut, code := runCLI(t, "--credentials", creds, "nodes", "revoke", "web-1")
			if code != tt.wantCode {
				t.Errorf("exit %d, want %d: %s", code, tt.wantCode, errOut)
			}
			for _, w := range tt.wantMsg {
				if !strings.Contains(errOut, w) {
					t.Errorf("stderr %q lacks %q", errOut, w)
				}
			}
			if tt.name == "reset mid-call" && !strings.Contains(errOut, "controller "+fs[0].url+": ") {
				t.Errorf("stderr %q does not name the controller tried, %s", errOut, fs[0].url)
			}
			if n := fs[0].callCount(revoke); n != 1 {
				t.Errorf("the first controller got %d calls, want 1", n)
			}
			if n := fs[1].callCount(revoke); n != 0 {
				t.Errorf("the second controller got %d calls: the write was sent twice", n)
			}
		})
	}
}

// TestNoFailoverAfterATimeoutMidCall: a call that times out after the request
// was sent may have been processed; it is not repeated elsewhere.
func TestNoFailoverAfterATimeoutMidCall(t *testing.T) {
	const revoke = segmeshv1connect.OperatorServiceRevokeNodeProcedure
	fs, creds := newFakeControllers(t, 2)
	release := make(chan struct{})
	fs[0].handle(revoke, func(proto.Message) (connect.AnyResponse, error) {
		<-release
		return connect.NewResponse(&segmeshv1.RevokeNodeResponse{}), nil
	})
	defer close(release) // before the servers close (t.Cleanup), which waits for their handlers
	fs[1].reply(revoke, connect.NewResponse(&segmeshv1.RevokeNodeResponse{}))
	cs, err := dialControllers(&globalFlags{credentials: creds})
	if err != nil {
		t.Fatal(err)
	}
	cs.timeout = 200 * time.Millisecond
	err = cs.call(context.Background(), func(ctx context.Context, c segmeshv1connect.OperatorServiceClient) error {
		_, err := c.RevokeNode(ctx, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: "web-1"}))
		return err
	})
	if connect.CodeOf(err) != connect.CodeDeadlineExceeded {
		t.Fatalf("call: %v, want the deadline of the first controller", err)
	}
	if n := fs[1].callCount(revoke); n != 0 {
		t.Errorf("the second controller got %d calls after the first timed out mid-call", n)
	}
	var ee *exitError
	if !errors.As(callError("revoking node web-1", err), &ee) || ee.code != 2 || !strings.Contains(ee.msg, "controller "+fs[0].url+": ") ||
		!strings.Contains(ee.msg, "may have reached it") {
		t.Errorf("callError: %v, want exit 2 naming %s", ee, fs[0].url)
	}
}

// TestEveryControllerUnreachable: when no controller could be reached, the
// message says every URL tried and why, one line each (exit 2).
func TestEveryControllerUnreachable(t *testing.T) {
	f := newFakeController(t)
	a, b := closedURL(t), closedURL(t)
	_, errOut, code := runCLI(t, "--credentials", f.creds, "--controller", a+","+b, "status")
	lines := strings.Split(errOut, "\n")
	if code != 2 || len(lines) != 3 || !strings.Contains(lines[0], "reading status: no controller answered") ||
		!strings.HasPrefix(lines[1], "  "+a+": ") || !strings.HasPrefix(lines[2], "  "+b+": ") ||
		!strings.Contains(lines[1], "connection refused") || !strings.Contains(lines[2], "connection refused") {
		t.Errorf("exit %d, stderr:\n%s\nwant exit 2 and one line per controller", code, errOut)
	}
	// One controller: the message is as it always was.
	_, errOut, code = runCLI(t, "--credentials", f.creds, "--controller", a, "status")
	if code != 2 || !strings.Contains(errOut, "controller unreachable") || strings.Contains(errOut, "no controller answered") {
		t.Errorf("one controller: exit %d %q", code, errOut)
	}
}

// TestFailoverStartsAtTheLastAnswer: over several calls (status --watch,
// --wait), a controllerSet starts where the last answer came from instead of
// asking a controller that is not serving every time.
func TestFailoverStartsAtTheLastAnswer(t *testing.T) {
	const status = segmeshv1connect.OperatorServiceStatusProcedure
	fs, creds := newFakeControllers(t, 3)
	fs[0].fail(status, connect.NewError(connect.CodeUnavailable, errors.New("not serving: lost the store")))
	fs[1].fail(status, connect.NewError(connect.CodeUnavailable, errors.New("not serving: lost the store")))
	withFixtures(fs[2])
	cs, err := dialControllers(&globalFlags{credentials: creds})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := fetchStatus(context.Background(), cs); err != nil {
			t.Fatalf("status %d: %v", i, err)
		}
	}
	if got := []int{fs[0].callCount(status), fs[1].callCount(status), fs[2].callCount(status)}; !cmp.Equal(got, []int{1, 1, 3}) {
		t.Errorf("Status calls per controller %v, want [1 1 3]", got)
	}
}

// TestOperatorsCreateKeepsTheControllers: a credential written by `operators
// create` names every controller URL the CLI used.
func TestOperatorsCreateKeepsTheControllers(t *testing.T) {
	fs, creds := newFakeControllers(t, 2)
	fs[0].reply(segmeshv1connect.OperatorServiceCreateOperatorProcedure, connect.NewResponse(&segmeshv1.CreateOperatorResponse{
		Operator: &segmeshv1.OperatorInfo{Name: "alice", Role: "viewer"}, Token: "alice-secret"}))
	out := t.TempDir() + "/alice.json"
	if _, errOut, code := runCLI(t, "--credentials", creds, "operators", "create", "alice", "--role", "viewer", "--out", out); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var c credentials
	if err := json.Unmarshal(raw, &c); err != nil {
		t.Fatal(err)
	}
	want := credentials{Controller: fs[0].url, Controllers: []string{fs[0].url, fs[1].url}, CAPEM: fs[0].caPEM, Token: "alice-secret"}
	if d := cmp.Diff(want, c); d != "" {
		t.Errorf("written credential (-want +got):\n%s", d)
	}
}
