package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"segmesh/api/segmeshv1/segmeshv1connect"
)

// target is one procedure called without a valid credential.
type target struct {
	name string
	path string
	// wrongBearer sends "Authorization: Bearer <random token>"; otherwise no
	// Authorization header is sent.
	wrongBearer bool
}

// targets: two operator procedures (the policy one has the largest body limit),
// the enrollment procedure, which is unauthenticated by design, and an agent
// procedure called without a client certificate (TLS asks for one but does not
// require it; the handler checks it).
var targets = []target{
	{name: "ApplyPolicy/no-bearer", path: segmeshv1connect.OperatorServiceApplyPolicyProcedure},
	{name: "ApplyPolicy/wrong-bearer", path: segmeshv1connect.OperatorServiceApplyPolicyProcedure, wrongBearer: true},
	{name: "CreateToken/wrong-bearer", path: segmeshv1connect.OperatorServiceCreateTokenProcedure, wrongBearer: true},
	{name: "Enroll", path: segmeshv1connect.EnrollServiceEnrollProcedure},
	{name: "Report/no-client-cert", path: segmeshv1connect.AgentServiceReportProcedure},
}

// scenario is a target over one HTTP version, with the body length declared in
// Content-Length or not (HTTP/1.1 chunked, HTTP/2 without content-length).
type scenario struct {
	target
	proto   string // "h2" or "h1"
	chunked bool
}

func (s scenario) String() string {
	length := "declared"
	if s.chunked {
		length = "chunked"
	}
	return s.name + " " + s.proto + " " + length
}

// scenarios returns every target × {h2, h1} × {declared, chunked}.
func scenarios() []scenario {
	var out []scenario
	for _, t := range targets {
		for _, proto := range []string{"h2", "h1"} {
			for _, chunked := range []bool{false, true} {
				out = append(out, scenario{target: t, proto: proto, chunked: chunked})
			}
		}
	}
	return out
}

// loadConfig is how hard one scenario pushes.
type loadConfig struct {
	clients int   // concurrent clients, each with its own connection(s)
	streams int   // concurrent requests per client (HTTP/2: on one connection)
	rounds  int   // requests each stream sends, one after the other
	body    int64 // request body size in bytes
	// deadline stops the load: no request starts after it and requests still
	// running at it are cancelled.
	deadline time.Time
	// reqTimeout bounds one request.
	reqTimeout time.Duration
}

// loadStats sums up the answers of one scenario.
type loadStats struct {
	sent     int
	answered int
	codes    map[string]int // "401 unauthenticated" -> count
	errs     map[string]int // transport errors: "connection reset" -> count
	latency  []time.Duration
	uploaded int64 // body bytes the clients' transports consumed
	elapsed  time.Duration
}

// codeSummary lists the answer codes and transport errors, most frequent first:
// "401 unauthenticated ×180, error: connection reset ×3".
func (s *loadStats) codeSummary() string {
	type kv struct {
		k string
		n int
	}
	var all []kv
	for k, n := range s.codes {
		all = append(all, kv{k, n})
	}
	for k, n := range s.errs {
		all = append(all, kv{"error: " + k, n})
	}
	sort.Slice(all, func(i, j int) bool {
		if all[i].n != all[j].n {
			return all[i].n > all[j].n
		}
		return all[i].k < all[j].k
	})
	parts := make([]string, len(all))
	for i, e := range all {
		parts[i] = fmt.Sprintf("%s ×%d", e.k, e.n)
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ", ")
}

// percentile returns the p-th percentile (0 < p ≤ 100, nearest rank) of d, or 0
// for an empty slice. d is sorted in place.
func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	rank := int(p/100*float64(len(d)) + 0.999999)
	rank = min(max(rank, 1), len(d))
	return d[rank-1]
}

// patternReader yields n bytes of filler without holding them, and counts what
// was read in sent.
type patternReader struct {
	left int64
	sent *atomic.Int64
}

var filler = []byte(strings.Repeat("segmesh-unauthload-", 3449)) // ~64 KiB

func (r *patternReader) Read(p []byte) (int, error) {
	if r.left <= 0 {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), r.left))
	for i := 0; i < n; {
		i += copy(p[i:n], filler)
	}
	r.left -= int64(n)
	r.sent.Add(int64(n))
	return n, nil
}

// newTransport returns a transport that speaks only proto ("h2" or "h1") to the
// controller.
func newTransport(proto string, tlsConf *tls.Config) *http.Transport {
	var protos http.Protocols
	if proto == "h2" {
		protos.SetHTTP2(true)
	} else {
		protos.SetHTTP1(true)
	}
	return &http.Transport{
		TLSClientConfig:    tlsConf.Clone(),
		Protocols:          &protos,
		DisableCompression: true,
		// Bound what this program holds too.
		MaxResponseHeaderBytes: 64 << 10,
	}
}

// randomToken returns a bearer token that no controller knows.
func randomToken() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return "smop1_" + base64.RawURLEncoding.EncodeToString(b)
}

// answer is the outcome of one request.
type answer struct {
	code    string // "401 unauthenticated"; empty when err != nil
	err     error
	latency time.Duration // until the response headers (or the error)
}

// runLoad runs sc against base with cfg: clients×streams goroutines start at
// once and each sends cfg.rounds requests in sequence.
func runLoad(ctx context.Context, sc scenario, base *url.URL, tlsConf *tls.Config, cfg loadConfig) *loadStats {
	ctx, cancel := context.WithDeadline(ctx, cfg.deadline)
	defer cancel()
	endpoint := base.JoinPath(sc.path).String()
	var (
		mu       sync.Mutex
		answers  []answer
		uploaded atomic.Int64
		wg       sync.WaitGroup
	)
	start := make(chan struct{})
	for range cfg.clients {
		tr := newTransport(sc.proto, tlsConf)
		client := &http.Client{Transport: tr}
		var bearer string
		if sc.wrongBearer {
			bearer = randomToken()
		}
		var clientWG sync.WaitGroup
		for range cfg.streams {
			clientWG.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer clientWG.Done()
				<-start
				for range cfg.rounds {
					if ctx.Err() != nil {
						return
					}
					a := call(ctx, client, endpoint, bearer, sc.chunked, cfg, &uploaded)
					mu.Lock()
					answers = append(answers, a)
					mu.Unlock()
				}
			}()
		}
		go func() {
			clientWG.Wait()
			tr.CloseIdleConnections()
		}()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	st := &loadStats{codes: map[string]int{}, errs: map[string]int{}, uploaded: uploaded.Load(), elapsed: time.Since(t0)}
	for _, a := range answers {
		st.sent++
		if a.err != nil {
			st.errs[errKind(a.err)]++
			continue
		}
		st.answered++
		st.codes[a.code]++
		st.latency = append(st.latency, a.latency)
	}
	return st
}

// call sends one request with a cfg.body-byte body and reads at most 64 KiB of
// the answer.
func call(ctx context.Context, client *http.Client, endpoint, bearer string, chunked bool, cfg loadConfig, uploaded *atomic.Int64) answer {
	ctx, cancel := context.WithTimeout(ctx, cfg.reqTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, &patternReader{left: cfg.body, sent: uploaded})
	if err != nil {
		return answer{err: err}
	}
	req.ContentLength = cfg.body
	if chunked {
		req.ContentLength = -1
	}
	req.Header.Set("Content-Type", "application/proto")
	req.Header.Set("Connect-Protocol-Version", "1")
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	t0 := time.Now()
	resp, err := client.Do(req)
	lat := time.Since(t0)
	if err != nil {
		return answer{err: err, latency: lat}
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var e struct {
		Code string `json:"code"`
	}
	_ = json.Unmarshal(raw, &e)
	code := fmt.Sprint(resp.StatusCode)
	if e.Code != "" {
		code += " " + e.Code
	}
	return answer{code: code, latency: lat}
}

// errKind names a transport error briefly, for counting.
func errKind(err error) string {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "cancelled"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, syscall.EPIPE):
		return "broken pipe"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "EOF"
	}
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = msg[i+2:]
	}
	if len(msg) > 60 {
		msg = msg[:60] + "…"
	}
	return msg
}
