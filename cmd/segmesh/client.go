package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/segmeshv1/segmeshv1connect"
)

// credentials is the operator credential file written by the controller (its
// operator.json) or by `segmesh operators create`.
type credentials struct {
	// Controller is a controller URL, https://HOST:PORT.
	Controller string `json:"controller"`
	// Controllers are more URLs of controller replicas sharing one store, tried
	// after Controller in this order (see controllerSet.call).
	Controllers []string `json:"controllers,omitempty"`
	CAPEM       string   `json:"ca_pem"`
	Token       string   `json:"token"`
}

// urls returns Controller, then Controllers, without empty entries or repeats.
func (c credentials) urls() []string {
	var out []string
	for _, u := range append([]string{c.Controller}, c.Controllers...) {
		if u != "" && !slices.Contains(out, u) {
			out = append(out, u)
		}
	}
	return out
}

// controllerServerName is the DNS name every controller certificate carries.
const controllerServerName = "segmesh-controller"

// requestTimeout bounds each operator call to one controller.
const requestTimeout = 30 * time.Second

// dialTimeout and tlsHandshakeTimeout bound connecting to one controller, so
// that an unreachable one (a host that drops packets) leaves time for the next.
const (
	dialTimeout         = 10 * time.Second
	tlsHandshakeTimeout = 10 * time.Second
)

// splitControllerFlag parses --controller (or $SEGMESH_CONTROLLER): one URL or
// several separated by commas, e.g.
// "https://10.0.0.1:7443,https://10.0.0.2:7443". Spaces around a URL are
// ignored; an empty entry is an error.
func splitControllerFlag(v string) ([]string, error) {
	parts := strings.Split(v, ",")
	out := make([]string, 0, len(parts))
	for _, p := range parts {
		p = strings.TrimSpace(p)
		if p == "" {
			return nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: --controller %q (or SEGMESH_CONTROLLER): empty entry; want https://HOST:PORT or several separated by commas", v)}
		}
		out = append(out, p)
	}
	return out, nil
}

// loadCredentials reads the credential file --credentials names. --controller,
// when given, replaces the file's controller URLs. Every URL must be
// https://HOST:PORT. Errors are exitErrors (code 2) that say what to fix.
func loadCredentials(g *globalFlags) (credentials, error) {
	var c credentials
	if g.credentials == "" {
		return c, &exitError{code: 2, msg: "segmesh: no credentials: pass --credentials FILE (the operator.json in the controller's data directory) or set SEGMESH_CREDENTIALS"}
	}
	b, err := os.ReadFile(g.credentials)
	if err != nil {
		return c, &exitError{code: 2, msg: fmt.Sprintf("segmesh: reading credentials: %v", err)}
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return c, &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s is not a credential file: %v", g.credentials, err)}
	}
	if g.controller != "" {
		urls, err := splitControllerFlag(g.controller)
		if err != nil {
			return c, err
		}
		c.Controller, c.Controllers = urls[0], urls[1:]
	}
	if len(c.urls()) == 0 || c.CAPEM == "" || c.Token == "" {
		var missing []string
		for _, f := range []struct {
			name string
			ok   bool
		}{{"controller (or controllers)", len(c.urls()) > 0}, {"ca_pem", c.CAPEM != ""}, {"token", c.Token != ""}} {
			if !f.ok {
				missing = append(missing, f.name)
			}
		}
		return c, &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s lacks %s (a credential file is the controller's operator.json or one written by `segmesh operators create`)", g.credentials, strings.Join(missing, " and "))}
	}
	// The bearer credential must never travel in clear text.
	for _, raw := range c.urls() {
		if u, err := url.Parse(raw); err != nil || u.Scheme != "https" || u.Host == "" {
			return c, &exitError{code: 2, msg: fmt.Sprintf("segmesh: controller URL %q: want https://HOST:PORT (the operator credential is only sent over TLS)", raw)}
		}
	}
	return c, nil
}

// controllerSet is the operator API of every controller URL the CLI was given,
// in order, over one HTTP client (the controller CA pinned, the bearer
// credential attached to every call). It is not safe for concurrent use.
type controllerSet struct {
	urls    []string
	clients []segmeshv1connect.OperatorServiceClient
	// timeout bounds each try (requestTimeout).
	timeout time.Duration
	// first is where call starts: the controller that answered last.
	first int
}

// dialControllers builds the controllerSet of the credential file and
// --controller. It connects to nothing yet; errors are loadCredentials's and a
// ca_pem without a certificate.
func dialControllers(g *globalFlags) (*controllerSet, error) {
	c, err := loadCredentials(g)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(c.CAPEM)) {
		return nil, &exitError{code: 2, msg: "segmesh: credential file's ca_pem holds no certificate"}
	}
	httpClient := &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     &tls.Config{RootCAs: pool, ServerName: controllerServerName, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout: tlsHandshakeTimeout,
		ForceAttemptHTTP2:   true,
	}}
	auth := connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			req.Header().Set("Authorization", "Bearer "+c.Token)
			return next(ctx, req)
		}
	})
	s := &controllerSet{urls: c.urls(), timeout: requestTimeout}
	for _, u := range s.urls {
		s.clients = append(s.clients, segmeshv1connect.NewOperatorServiceClient(httpClient, strings.TrimRight(u, "/"),
			connect.WithInterceptors(auth)))
	}
	return s, nil
}

// call makes one operator call: fn calls one RPC on the client it is given,
// under the context it is given (ctx bounded by s.timeout per try, traced). call
// tries the controllers in order, from the one that answered last, and moves to
// the next only when the failure proves that the request was not processed:
//   - its headers were never written to a connection (DNS, dial, connection
//     refused, no route, TLS handshake failure, a connect or handshake timeout),
//     or
//   - the controller answered CodeUnavailable itself (connect.IsWireError): a
//     controller says so only when it does not serve (it lost its store, it is
//     shutting down) and did nothing.
//
// Any other failure, above all one after the request may have reached a
// controller (a timeout or reset mid-call), ends the call, so that a change is
// never made twice. It stops too when ctx ends. It returns nil when a
// controller answered fn successfully, else a *controllersError naming every
// controller tried and why it failed (it unwraps to the last error, so
// connect.CodeOf sees that; callError prints it).
func (s *controllerSet) call(ctx context.Context, fn func(context.Context, segmeshv1connect.OperatorServiceClient) error) error {
	e := &controllersError{total: len(s.urls)}
	for i := range s.urls {
		k := (s.first + i) % len(s.urls)
		sent, err := s.try(ctx, k, fn)
		if err == nil {
			s.first = k
			return nil
		}
		t := controllerTry{url: s.urls[k], err: err, notProcessed: !sent || notServing(err)}
		e.tries = append(e.tries, t)
		if !t.notProcessed {
			if connect.IsWireError(err) {
				s.first = k // it answered
			}
			break
		}
		if ctx.Err() != nil {
			break
		}
	}
	return e
}

// try runs fn against controller k and says whether the request's headers were
// written to a connection (the request may have reached the controller).
func (s *controllerSet) try(ctx context.Context, k int, fn func(context.Context, segmeshv1connect.OperatorServiceClient) error) (sent bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var wrote atomic.Bool
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{WroteHeaders: func() { wrote.Store(true) }})
	err = fn(ctx, s.clients[k])
	return wrote.Load(), err
}

// notServing says whether err is the controller's own CodeUnavailable answer.
func notServing(err error) bool {
	return connect.IsWireError(err) && connect.CodeOf(err) == connect.CodeUnavailable
}

// controllerTry is one controller call tried: its URL, why it failed, and
// whether that proves it was not processed (so the next controller was tried).
type controllerTry struct {
	url          string
	err          error
	notProcessed bool
}

// controllersError is a call that no controller answered successfully: the
// controllers tried in order (at least one) out of total.
type controllersError struct {
	tries []controllerTry
	total int
}

func (e *controllersError) last() controllerTry { return e.tries[len(e.tries)-1] }

// Error is the last try's error with one URL; "URL: error; URL: error" with
// several.
func (e *controllersError) Error() string {
	if e.total == 1 {
		return e.last().err.Error()
	}
	parts := make([]string, 0, len(e.tries))
	for _, t := range e.tries {
		parts = append(parts, t.url+": "+t.err.Error())
	}
	return strings.Join(parts, "; ")
}

// Unwrap returns the last try's error.
func (e *controllersError) Unwrap() error { return e.last().err }

// tryReason is why one try failed, for people: the connect message without its
// code ("dial tcp 10.0.0.1:7443: connect: connection refused"), or "not
// serving: MESSAGE" for the controller's own CodeUnavailable.
func tryReason(err error) string {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return err.Error()
	}
	if notServing(err) {
		return "not serving: " + ce.Message()
	}
	return ce.Message()
}

// callError turns an RPC error into an exitError. A refusal (the input is invalid,
// the object does not exist or is in the wrong state, the credential's role does
// not allow the change) exits 1; a connection or credential problem (unreachable
// controller, unknown or revoked credential) exits 2.
//
// With several controller URLs (a *controllersError from controllerSet.call), a
// controller's own answer is mapped the same way; a failure after the request
// may have reached a controller names that controller and says it was not sent
// to another; and when every controller failed before processing the request,
// the message lists each URL tried and why, one line each.
func callError(what string, err error) error {
	var cse *controllersError
	if errors.As(err, &cse) && cse.total > 1 {
		last := cse.last()
		switch {
		case !last.notProcessed && connect.IsWireError(last.err):
			// The controller answered: as with one controller.
			err = last.err
		case !last.notProcessed:
			return &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s: controller %s: %s (the request may have reached it, so it was not sent to another controller; "+
				"before repeating a change, check whether it took effect)", what, last.url, tryReason(last.err))}
		default:
			var b strings.Builder
			fmt.Fprintf(&b, "segmesh: %s: no controller answered (check --controller and that segmesh-controller runs there):", what)
			for _, t := range cse.tries {
				fmt.Fprintf(&b, "\n  %s: %s", t.url, tryReason(t.err))
			}
			if n := cse.total - len(cse.tries); n > 0 {
				fmt.Fprintf(&b, "\n  (%d more not tried: interrupted)", n)
			}
			return &exitError{code: 2, msg: b.String()}
		}
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		switch ce.Code() {
		case connect.CodeInvalidArgument:
			// Policy and input errors: "file:line:col: message" lines, printed as they are.
			return &exitError{code: 1, msg: ce.Message()}
		case connect.CodeFailedPrecondition, connect.CodeAlreadyExists, connect.CodeNotFound:
			return &exitError{code: 1, msg: fmt.Sprintf("segmesh: %s: %s", what, ce.Message())}
		case connect.CodePermissionDenied:
			return &exitError{code: 1, msg: fmt.Sprintf("segmesh: %s: refused, the role of this operator credential does not allow it: %s", what, ce.Message())}
		case connect.CodeUnauthenticated:
			return &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s: %s (check --credentials: the credential may be unknown to this controller or revoked)", what, ce.Message())}
		case connect.CodeUnavailable:
			return &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s: controller unreachable: %v (check --controller and that segmesh-controller runs)", what, ce.Unwrap())}
		case connect.CodeResourceExhausted:
			return &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s: the controller is busy: %s (try again shortly)", what, ce.Message())}
		}
	}
	return &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s: %v", what, err)}
}

// invoke makes one unary operator call: it loads the credential, calls method (a method expression such as
// segmeshv1connect.OperatorServiceClient.RevokeNode) with req under
// requestTimeout on the controllers in turn (controllerSet.call), and maps an error with callError(what, err). what says what was
// being done, e.g. "revoking node web-1".
func invoke[Req, Resp any](g *globalFlags, what string,
	method func(segmeshv1connect.OperatorServiceClient, context.Context, *connect.Request[Req]) (*connect.Response[Resp], error),
	req *Req) (*Resp, error) {
	cs, err := dialControllers(g)
	if err != nil {
		return nil, err
	}
	var resp *connect.Response[Resp]
	err = cs.call(context.Background(), func(ctx context.Context, c segmeshv1connect.OperatorServiceClient) error {
		var err error
		resp, err = method(c, ctx, connect.NewRequest(req))
		return err
	})
	if err != nil {
		return nil, callError(what, err)
	}
	return resp.Msg, nil
}
