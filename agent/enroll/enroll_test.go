package enroll

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"segmesh/agent/internal/testpki"
	"segmesh/api/jointoken"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// enrollServer is a tiny EnrollService: it signs the CSR with ca unless refuse is set.
type enrollServer struct {
	ca      *testpki.CA
	refuse  *connect.Error
	mangle  func(*segmeshv1.EnrollResponse)
	calls   atomic.Int32
	lastReq atomic.Pointer[segmeshv1.EnrollRequest]
}

func (s *enrollServer) Enroll(_ context.Context, req *connect.Request[segmeshv1.EnrollRequest]) (*connect.Response[segmeshv1.EnrollResponse], error) {
	s.calls.Add(1)
	s.lastReq.Store(req.Msg)
	if s.refuse != nil {
		return nil, s.refuse
	}
	name := req.Msg.GetName()
	if name == "" {
		name = req.Msg.GetHostname()
	}
	cert, err := s.ca.SignCSR(req.Msg.GetCsrDer(), name)
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	resp := &segmeshv1.EnrollResponse{
		NodeName:        name,
		Addresses:       []string{"100.64.0.2/32", "fd5e:6d65:7368::2/128"},
		CertificateDer:  cert,
		CaDer:           s.ca.DER,
		Labels:          map[string]string{"role": "web"},
		OverlayPrefixes: []string{"100.64.0.0/10", "fd5e:6d65:7368::/48"},
	}
	if s.mangle != nil {
		s.mangle(resp)
	}
	return connect.NewResponse(resp), nil
}

// serve starts a real TLS (HTTP/2) server presenting chain and returns its URL.
func serve(t *testing.T, svc *enrollServer, chain tls.Certificate) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle(segmeshv1connect.NewEnrollServiceHandler(svc))
	srv := httptest.NewUnstartedServer(mux)
	srv.EnableHTTP2 = true
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // handshake failures are expected
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{chain}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv.URL
}

func tokenFor(t *testing.T, caDER []byte) jointoken.Token {
	t.Helper()
	tok, err := jointoken.New(caDER)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func tlsKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestEnroll(t *testing.T) {
	ca := testpki.NewCA(t, "segmesh CA")
	otherCA := testpki.NewCA(t, "impostor CA")
	good := ca.ServerCert(t, ServerName)
	tests := []struct {
		name      string
		chain     tls.Certificate
		token     jointoken.Token
		refuse    *connect.Error
		mangle    func(*segmeshv1.EnrollResponse)
		wantErr   string // substring; "" means success
		wantExact string // the whole message, when set
		wantCode  connect.Code
		wantIs    error
		retryable bool
		reached   bool // the handler must (not) be called
	}{
		{name: "pinned CA accepted", chain: good, token: tokenFor(t, ca.DER), reached: true},
		{
			name: "wrong fingerprint refused", chain: good, token: tokenFor(t, otherCA.DER),
			wantErr: "no certificate in the controller's chain has fingerprint", wantIs: ErrCAMismatch,
		},
		{
			name: "impostor server with the token's CA fingerprint but its own chain", chain: otherCA.ServerCert(t, ServerName),
			token: tokenFor(t, ca.DER), wantErr: "no certificate in the controller's chain", wantIs: ErrCAMismatch,
		},
		{
			name: "leaf without the segmesh-controller name refused", chain: ca.ServerCert(t, "example.com"),
			token: tokenFor(t, ca.DER), wantErr: "does not verify against the pinned CA", wantIs: ErrCAMismatch,
		},
		{
			name: "chain without the CA certificate refused",
			chain: func() tls.Certificate {
				c := ca.ServerCert(t, ServerName)
				c.Certificate = c.Certificate[:1]
				return c
			}(),
			token: tokenFor(t, ca.DER), wantErr: "no certificate in the controller's chain", wantIs: ErrCAMismatch,
		},
		{
			name: "leaf signed by another CA next to the pinned CA refused",
			chain: func() tls.Certificate {
				c := otherCA.ServerCert(t, ServerName)
				c.Certificate = [][]byte{c.Certificate[0], ca.DER}
				return c
			}(),
			token: tokenFor(t, ca.DER), wantErr: "does not verify against the pinned CA", wantIs: ErrCAMismatch,
		},
		{
			name: "reused token refused with the controller's message", chain: good, token: tokenFor(t, ca.DER),
			refuse:  connect.NewError(connect.CodePermissionDenied, errors.New("join token already used")),
			wantErr: "join token already used", reached: true,
			wantExact: "enrollment refused: join token already used", wantCode: connect.CodePermissionDenied,
		},
		{
			name: "expired token: the controller's message once, no code", chain: good, token: tokenFor(t, ca.DER),
			refuse:  connect.NewError(connect.CodePermissionDenied, errors.New("join token expired at 2025-01-01T00:00:00Z")),
			wantErr: "expired", reached: true,
			wantExact: "enrollment refused: join token expired at 2025-01-01T00:00:00Z", wantCode: connect.CodePermissionDenied,
		},
		{
			name: "refusal without a message names the code", chain: good, token: tokenFor(t, ca.DER),
			refuse:  connect.NewError(connect.CodeUnauthenticated, nil),
			wantErr: "refused", reached: true,
			wantExact: "enrollment refused (unauthenticated)", wantCode: connect.CodeUnauthenticated,
		},
		{
			name: "unavailable is retryable", chain: good, token: tokenFor(t, ca.DER),
			refuse:  connect.NewError(connect.CodeUnavailable, errors.New("store busy")),
			wantErr: "store busy", retryable: true, reached: true,
		},
		{
			name: "response with another CA refused", chain: good, token: tokenFor(t, ca.DER),
			mangle:  func(r *segmeshv1.EnrollResponse) { r.CaDer = otherCA.DER },
			wantErr: "returned CA has a different fingerprint", wantIs: ErrCAMismatch, reached: true,
		},
		{
			name: "certificate for another key refused", chain: good, token: tokenFor(t, ca.DER),
			mangle: func(r *segmeshv1.EnrollResponse) {
				r.CertificateDer = ca.ClientCert(t, r.NodeName, tlsKey(t))
			},
			wantErr: "not for this node's TLS key", reached: true,
		},
		{
			name: "certificate from another CA refused", chain: good, token: tokenFor(t, ca.DER),
			mangle: func(r *segmeshv1.EnrollResponse) {
				r.CertificateDer = otherCA.ClientCert(t, r.NodeName, tlsKey(t))
			},
			wantErr: "node certificate", reached: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			svc := &enrollServer{ca: ca, refuse: tt.refuse, mangle: tt.mangle}
			url := serve(t, svc, tt.chain)
			key := tlsKey(t)
			pub := make([]byte, 32)
			pub[0] = 1
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			res, err := Enroll(ctx, Request{
				Controller: url, Token: tt.token, Name: "web-1", Hostname: "host1",
				PublicKey: pub, Endpoint: "192.0.2.10:51820", TLSKey: key,
			})
			if got := svc.calls.Load() > 0; got != tt.reached {
				t.Errorf("handler reached = %v, want %v", got, tt.reached)
			}
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("Enroll succeeded, want error containing %q", tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("error %q does not contain %q", err, tt.wantErr)
				}
				if tt.wantExact != "" && err.Error() != tt.wantExact {
					t.Errorf("error %q, want exactly %q", err, tt.wantExact)
				}
				if tt.wantCode != 0 && connect.CodeOf(err) != tt.wantCode {
					t.Errorf("code %v, want %v", connect.CodeOf(err), tt.wantCode)
				}
				if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
					t.Errorf("error %v is not %v", err, tt.wantIs)
				}
				if Retryable(err) != tt.retryable {
					t.Errorf("Retryable(%v) = %v, want %v", err, !tt.retryable, tt.retryable)
				}
				return
			}
			if err != nil {
				t.Fatalf("Enroll: %v", err)
			}
			if res.NodeName != "web-1" || res.Labels["role"] != "web" || len(res.Addresses) != 2 || string(res.CADER) != string(ca.DER) {
				t.Errorf("result = %+v", res)
			}
			req := svc.lastReq.Load()
			if req.GetToken() != tt.token.String() || req.GetEndpoint() != "192.0.2.10:51820" || req.GetHostname() != "host1" || req.GetPublicKey()[0] != 1 {
				t.Errorf("request = %v", req)
			}
		})
	}
}

func TestRetryableConnectionRefused(t *testing.T) {
	ca := testpki.NewCA(t, "segmesh CA")
	srv := httptest.NewTLSServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close() // nothing listens there now
	_, err := Enroll(context.Background(), Request{Controller: url, Token: tokenFor(t, ca.DER), Name: "n", TLSKey: tlsKey(t), PublicKey: make([]byte, 32)})
	if err == nil || !Retryable(err) {
		t.Fatalf("Enroll against a closed port: err = %v, want a retryable error", err)
	}
}
