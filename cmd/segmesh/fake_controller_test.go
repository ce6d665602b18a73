package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1/segmeshv1connect"
)

// fakeController serves OperatorService over TLS (certificate for
// controllerServerName, as the real controller's) and answers every call from
// canned replies, recording each request. It sits above the controller: it checks
// the CLI's requests and output, not the controller's behaviour.
type fakeController struct {
	t     *testing.T
	url   string
	caPEM string
	creds string // path of an operator credential file for this server

	mu       sync.Mutex
	replies  map[string]connect.AnyResponse                                  // by procedure
	errs     map[string]error                                                // by procedure; wins over a reply
	handlers map[string]func(req proto.Message) (connect.AnyResponse, error) // by procedure; wins over both
	calls    []fakeCall
}

// fakeCall is one recorded request.
type fakeCall struct {
	procedure string
	bearer    string // Authorization header
	req       proto.Message
}

// fakeToken is the bearer token of the fake's credential file.
const fakeToken = "admin-secret"

func newFakeController(t *testing.T) *fakeController {
	t.Helper()
	cert, caPEM := selfSignedCert(t)
	return newFakeControllerWithCert(t, cert, caPEM)
}

// newFakeControllers starts n fake controllers with one CA (as replicas sharing
// a store have) and returns them with a credential file whose "controllers"
// lists their URLs in order.
func newFakeControllers(t *testing.T, n int) ([]*fakeController, string) {
	t.Helper()
	cert, caPEM := selfSignedCert(t)
	fs := make([]*fakeController, n)
	var urls []string
	for i := range fs {
		fs[i] = newFakeControllerWithCert(t, cert, caPEM)
		urls = append(urls, fs[i].url)
	}
	return fs, writeCredentialFile(t, credentials{Controllers: urls, CAPEM: caPEM, Token: fakeToken})
}

// writeCredentialFile writes c to a new credential file and returns its path.
func writeCredentialFile(t *testing.T, c credentials) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "operator.json")
	raw, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// closedURL returns an https URL on 127.0.0.1 where nothing listens (a port
// that was just closed): connecting to it is refused.
func closedURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	return "https://" + addr
}

// callCount returns how many requests for procedure the fake received.
func (f *fakeController) callCount(procedure string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		if c.procedure == procedure {
			n++
		}
	}
	return n
}

// newFakeControllerWithCert starts a fake controller serving cert, whose CA is
// caPEM.
func newFakeControllerWithCert(t *testing.T, cert tls.Certificate, caPEM string) *fakeController {
	t.Helper()
	f := &fakeController{t: t, replies: map[string]connect.AnyResponse{}, errs: map[string]error{},
		handlers: map[string]func(proto.Message) (connect.AnyResponse, error){}}
	f.caPEM = caPEM
	intercept := connect.UnaryInterceptorFunc(func(connect.UnaryFunc) connect.UnaryFunc {
		return func(_ context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			return f.answer(req)
		}
	})
	mux := http.NewServeMux()
	mux.Handle(segmeshv1connect.NewOperatorServiceHandler(segmeshv1connect.UnimplementedOperatorServiceHandler{},
		connect.WithInterceptors(intercept)))
	srv := httptest.NewUnstartedServer(mux)
	srv.EnableHTTP2 = true
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // TLS handshakes that tests make fail on purpose
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	f.url = srv.URL
	f.creds = writeCredentialFile(t, credentials{Controller: f.url, CAPEM: caPEM, Token: fakeToken})
	return f
}

// answer records req and answers it; a handler runs without f.mu held, so that
// it may block.
func (f *fakeController) answer(req connect.AnyRequest) (connect.AnyResponse, error) {
	f.mu.Lock()
	msg, _ := req.Any().(proto.Message)
	p := req.Spec().Procedure
	f.calls = append(f.calls, fakeCall{procedure: p, bearer: req.Header().Get("Authorization"), req: msg})
	if h := f.handlers[p]; h != nil {
		f.mu.Unlock()
		return h(msg)
	}
	defer f.mu.Unlock()
	if err := f.errs[p]; err != nil {
		return nil, err
	}
	if r, ok := f.replies[p]; ok {
		return r, nil
	}
	return nil, connect.NewError(connect.CodeUnimplemented, errors.New("fake controller: no reply for "+p))
}

// reply makes the fake answer procedure with resp, e.g.
// f.reply(segmeshv1connect.OperatorServiceStatusProcedure, connect.NewResponse(&segmeshv1.StatusResponse{})).
func (f *fakeController) reply(procedure string, resp connect.AnyResponse) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.replies[procedure] = resp
}

// handle makes the fake answer procedure with what h returns for the request.
func (f *fakeController) handle(procedure string, h func(req proto.Message) (connect.AnyResponse, error)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.handlers[procedure] = h
}

// fail makes the fake answer procedure with err.
func (f *fakeController) fail(procedure string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.errs[procedure] = err
}

// requests returns the requests recorded for procedure, in order, after checking
// that each carried the credential's bearer token.
func (f *fakeController) requests(procedure string) []proto.Message {
	f.t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []proto.Message
	for _, c := range f.calls {
		if c.procedure != procedure {
			continue
		}
		if c.bearer != "Bearer "+fakeToken {
			f.t.Errorf("%s: Authorization %q, want the credential's bearer token", procedure, c.bearer)
		}
		out = append(out, c.req)
	}
	return out
}

// run runs the CLI against the fake with its credential file.
func (f *fakeController) run(args ...string) (stdout, stderr string, code int) {
	f.t.Helper()
	return runCLI(f.t, append([]string{"--credentials", f.creds}, args...)...)
}

// selfSignedCert returns a TLS certificate for controllerServerName that is its
// own CA, and that CA as PEM.
func selfSignedCert(t *testing.T) (tls.Certificate, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{controllerServerName}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage:    x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}
