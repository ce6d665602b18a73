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
	"math/big"
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
	f := &fakeController{t: t, replies: map[string]connect.AnyResponse{}, errs: map[string]error{},
		handlers: map[string]func(proto.Message) (connect.AnyResponse, error){}}
	cert, caPEM := selfSignedCert(t)
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
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	f.url = srv.URL
	f.creds = filepath.Join(t.TempDir(), "operator.json")
	raw, err := json.Marshal(credentials{Controller: f.url, CAPEM: caPEM, Token: fakeToken})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.creds, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fakeController) answer(req connect.AnyRequest) (connect.AnyResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	msg, _ := req.Any().(proto.Message)
	p := req.Spec().Procedure
	f.calls = append(f.calls, fakeCall{procedure: p, bearer: req.Header().Get("Authorization"), req: msg})
	if h := f.handlers[p]; h != nil {
		return h(msg)
	}
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
