package controller

import (
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"regexp"
	"strings"
	"testing"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/controller/store"
)

// get sends method path to the controller, without credential, following no
// redirect, and returns the response with its body read.
func (tc *testController) get(method, path string) (*http.Response, string) {
	tc.t.Helper()
	req, err := http.NewRequest(method, tc.url+path, nil)
	if err != nil {
		tc.t.Fatal(err)
	}
	client := tc.httpClient(nil)
	client.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	resp, err := client.Do(req)
	if err != nil {
		tc.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		tc.t.Fatalf("%s %s: reading the body: %v", method, path, err)
	}
	return resp, string(body)
}

// TestStatusPageServed: the page and each asset are served with their content
// type and every security header, / redirects to the page, and the page is
// read-only.
func TestStatusPageServed(t *testing.T) {
	tc := startController(t, t.TempDir())
	tests := []struct {
		method, path string
		status       int
		contentType  string // prefix
		location     string
		body         string // substring
	}{
		{"GET", "/", http.StatusFound, "", UIPath, ""},
		{"GET", "/ui/", http.StatusOK, "text/html", "", `<script src="app.js" defer></script>`},
		{"GET", "/ui/app.js", http.StatusOK, "text/javascript", "", "sessionStorage"},
		{"GET", "/ui/style.css", http.StatusOK, "text/css", "", "#graph"},
		{"GET", "/ui/favicon.svg", http.StatusOK, "image/svg+xml", "", "<svg"},
		{"HEAD", "/ui/", http.StatusOK, "text/html", "", ""},
		{"GET", "/ui/missing.js", http.StatusNotFound, "", "", ""},
		{"GET", "/elsewhere", http.StatusNotFound, "", "", ""},
		{"POST", "/ui/", http.StatusMethodNotAllowed, "", "", "read-only"},
		{"PUT", "/ui/app.js", http.StatusMethodNotAllowed, "", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			resp, body := tc.get(tt.method, tt.path)
			if resp.StatusCode != tt.status {
				t.Fatalf("HTTP %d, want %d; body %q", resp.StatusCode, tt.status, body)
			}
			if tt.path != "/elsewhere" {
				for k, v := range uiSecurityHeaders {
					if k == "Cache-Control" && resp.StatusCode != http.StatusOK {
						continue // net/http drops it from errors
					}
					if got := resp.Header.Get(k); got != v {
						t.Errorf("header %s = %q, want %q", k, got, v)
					}
				}
			}
			if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, tt.contentType) {
				t.Errorf("Content-Type %q, want %s...", ct, tt.contentType)
			}
			if got := resp.Header.Get("Location"); got != tt.location {
				t.Errorf("Location %q, want %q", got, tt.location)
			}
			if !strings.Contains(body, tt.body) {
				t.Errorf("body does not contain %q:\n%s", tt.body, body)
			}
			if resp.Header.Get("Set-Cookie") != "" {
				t.Errorf("Set-Cookie %q: the page keeps no state in cookies", resp.Header.Get("Set-Cookie"))
			}
		})
	}
	csp := uiSecurityHeaders["Content-Security-Policy"]
	for _, d := range []string{"default-src 'self'", "script-src 'self'", "frame-ancestors 'none'", "object-src 'none'"} {
		if !strings.Contains(csp, d) {
			t.Errorf("Content-Security-Policy %q lacks %q", csp, d)
		}
	}
	if strings.Contains(csp, "unsafe-") {
		t.Errorf("Content-Security-Policy %q allows something unsafe", csp)
	}
}

// TestStatusPageAssetsSelfContained: the embedded files load nothing from
// elsewhere and hold no inline script, event handler or style attribute, so
// that the Content-Security-Policy can forbid them.
func TestStatusPageAssetsSelfContained(t *testing.T) {
	url := regexp.MustCompile(`(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}`)
	// In markup: a script element without src or with content, an event
	// handler attribute, a style attribute or element, a javascript: URL.
	markup := regexp.MustCompile(`(?i)<script(?:\s[^>]*)?>[^<]|<script(?:\s(?:[^>s]|s[^r])*)?>|\son[a-z]+\s*=|\sstyle\s*=|<style|javascript:`)
	// In script: whatever parses strings as markup or code, or sets a style attribute.
	script := regexp.MustCompile(`innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function|setAttribute\("style"|"style":`)
	err := fs.WalkDir(uiFiles, "ui", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		raw, err := fs.ReadFile(uiFiles, path)
		if err != nil {
			return err
		}
		text := strings.ReplaceAll(string(raw), "http://www.w3.org/2000/svg", "") // the SVG namespace is a name, not a load
		if m := url.FindString(text); m != "" {
			t.Errorf("%s refers to another origin: %q", path, m)
		}
		inline := markup
		if strings.HasSuffix(path, ".js") {
			inline = script
		}
		if m := inline.FindString(text); m != "" {
			t.Errorf("%s holds inline code, styles or markup injection: %q", path, m)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestStatusPageAPIAuth: a call as the page makes it (Connect JSON, same
// origin) is refused without a credential, as every operator call, and is
// answered to a viewer; no response allows another origin to read it.
func TestStatusPageAPIAuth(t *testing.T) {
	tc := startController(t, t.TempDir())
	resp, err := tc.op().CreateOperator(bg, connect.NewRequest(&segmeshv1.CreateOperatorRequest{Name: "page", Role: store.RoleViewer}))
	if err != nil {
		t.Fatal(err)
	}
	viewer := resp.Msg.Token
	call := func(token, procedure, origin string) (*http.Response, map[string]any) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, tc.url+procedure, strings.NewReader("{}"))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Connect-Protocol-Version", "1")
		req.Header.Set("Origin", origin)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := tc.httpClient(nil).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
			t.Fatalf("%s: decoding the JSON answer: %v", procedure, err)
		}
		return resp, body
	}
	tests := []struct {
		name, token, procedure, origin string
		status                         int
		code                           string // of a refusal
	}{
		{"page origin, no token", "", segmeshv1connect.OperatorServiceStatusProcedure, tc.url, http.StatusUnauthorized, "unauthenticated"},
		{"page origin, unknown token", "not-a-token", segmeshv1connect.OperatorServiceStatusProcedure, tc.url, http.StatusUnauthorized, "unauthenticated"},
		{"other origin, no token", "", segmeshv1connect.OperatorServiceGetSegmentGraphProcedure, "https://evil.example", http.StatusUnauthorized, "unauthenticated"},
		{"viewer: status", viewer, segmeshv1connect.OperatorServiceStatusProcedure, tc.url, http.StatusOK, ""},
		{"viewer: graph", viewer, segmeshv1connect.OperatorServiceGetSegmentGraphProcedure, tc.url, http.StatusOK, ""},
		{"viewer: no change", viewer, segmeshv1connect.OperatorServiceCreateTokenProcedure, tc.url, http.StatusForbidden, "permission_denied"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := call(tt.token, tt.procedure, tt.origin)
			if resp.StatusCode != tt.status || fmt.Sprint(body["code"]) != tt.code && tt.code != "" {
				t.Errorf("HTTP %d %v, want %d %s", resp.StatusCode, body, tt.status, tt.code)
			}
			if h := resp.Header.Get("Access-Control-Allow-Origin"); h != "" {
				t.Errorf("Access-Control-Allow-Origin %q: no other origin may read operator answers", h)
			}
		})
	}
}

// TestGetSegmentGraph: the graph of the policy in force, with member counts on
// the inventory without revoked nodes; default deny has none.
func TestGetSegmentGraph(t *testing.T) {
	tc := startController(t, t.TempDir())
	op := tc.op()
	graph := func() string {
		t.Helper()
		resp, err := op.GetSegmentGraph(bg, connect.NewRequest(&segmeshv1.GetSegmentGraphRequest{}))
		if err != nil {
			t.Fatalf("GetSegmentGraph: %v", err)
		}
		var b strings.Builder
		fmt.Fprintf(&b, "revision %d\n", resp.Msg.GetRevision())
		for _, s := range resp.Msg.GetSegments() {
			fmt.Fprintf(&b, "segment %s %s %d\n", s.GetSegment(), s.GetKind(), s.GetMembers())
		}
		for _, e := range resp.Msg.GetEdges() {
			fmt.Fprintf(&b, "edge %s->%s %s %s\n", e.GetFrom(), e.GetTo(), strings.Join(e.GetPorts(), ","), strings.Join(e.GetRules(), ","))
		}
		return b.String()
	}
	if got, want := graph(), "revision 0\n"; got != want {
		t.Errorf("default deny:\n%s\nwant:\n%s", got, want)
	}
	const pol = `version: 1
segments:
  - {name: web, selectors: [{role: web}]}
  - {name: db, selectors: [{role: db}]}
  - {name: partners, cidrs: [198.51.100.0/24]}
rules:
  - {name: web-db, from: [web], to: [db], ports: [tcp/5432, icmp]}
  - {name: web-web, from: [web], to: [web], ports: [tcp/7946]}
  - {name: out, from: [db, web], to: [partners], ports: [tcp/443]}
`
	if _, err := op.ApplyPolicy(bg, connect.NewRequest(&segmeshv1.ApplyPolicyRequest{Filename: "p.yaml", Content: []byte(pol)})); err != nil {
		t.Fatal(err)
	}
	tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-1")
	tc.enroll(tc.createToken(map[string]string{"role": "web"}, false), "web-2")
	tc.enroll(tc.createToken(map[string]string{"role": "db"}, false), "db-1")
	if _, err := op.RevokeNode(bg, connect.NewRequest(&segmeshv1.RevokeNodeRequest{Name: "web-2"})); err != nil {
		t.Fatal(err)
	}
	want := `revision 1
segment web nodes 1
segment db nodes 1
segment partners external 0
edge db->partners tcp/443 out
edge web->db icmp,tcp/5432 web-db
edge web->partners tcp/443 out
edge web->web tcp/7946 web-web
`
	if got := graph(); got != want {
		t.Errorf("graph:\n%s\nwant:\n%s", got, want)
	}
}
