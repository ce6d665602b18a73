// Package enroll is the agent's first contact with the controller: it pins the
// controller's CA by the fingerprint in the join token (in the manner of kubeadm's
// discovery-token-ca-cert-hash), calls EnrollService.Enroll and checks what comes back.
//
// It also builds the HTTP/2 client used for every controller connection.
package enroll

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"connectrpc.com/connect"

	"segmesh/api/jointoken"
	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
	"segmesh/api/wire"
)

// ServerName is the DNS name in the controller's server certificate; clients verify
// it whatever address they dial.
const ServerName = "segmesh-controller"

// ErrCAMismatch is returned (wrapped) when the controller does not present the CA
// the join token pins, or its certificate does not verify against that CA.
var ErrCAMismatch = errors.New("controller CA does not match the join token")

// pinError says why pinning failed; it matches ErrCAMismatch with errors.Is.
type pinError struct{ reason string }

func (e *pinError) Error() string        { return ErrCAMismatch.Error() + ": " + e.reason }
func (e *pinError) Is(target error) bool { return target == ErrCAMismatch }

func pinErrorf(format string, args ...any) error {
	return &pinError{reason: fmt.Sprintf(format, args...)}
}

// Request is what the agent sends to enroll.
type Request struct {
	// Controller is the controller URL, e.g. "https://192.0.2.1:7443".
	Controller string
	Token      jointoken.Token
	// Name is the requested node name; empty lets the controller derive one.
	Name     string
	Hostname string
	// PublicKey is the WireGuard public key (32 bytes).
	PublicKey []byte
	// Endpoint is the underlay "ip:port" WireGuard listens on.
	Endpoint string
	// TLSKey is the node's TLS client key; enrollment certifies its public half.
	TLSKey *ecdsa.PrivateKey
}

// Result is a verified enrollment.
type Result struct {
	NodeName        string
	Addresses       []string
	Labels          map[string]string
	OverlayPrefixes []string
	// CADER is the controller CA certificate (DER); it matches the token's pin.
	CADER []byte
	// CertDER is the node client certificate (DER) for TLSKey, signed by the CA.
	CertDER []byte
}

// RefusedError is a refusal by the controller (any code Retryable rejects): a bad,
// expired or used join token, a name or key already taken, an invalid request.
type RefusedError struct {
	// Controller is the URL the request went to.
	Controller string
	// Err is the controller's error; connect.CodeOf and errors.As see it through
	// Unwrap.
	Err *connect.Error
}

// Error gives the controller's message once, without the code, e.g. "enrollment
// refused: join token expired at 2025-01-01T00:00:00Z".
func (e *RefusedError) Error() string {
	if msg := e.Err.Message(); msg != "" {
		return "enrollment refused: " + msg
	}
	return "enrollment refused (" + e.Err.Code().String() + ")"
}

func (e *RefusedError) Unwrap() error { return e.Err }

// Enroll makes one enrollment attempt. A refusal by the controller is a
// *RefusedError; other controller errors are wrapped with their connect code (see
// connect.CodeOf and Retryable); a CA that does not match the token is
// ErrCAMismatch.
func Enroll(ctx context.Context, req Request) (*Result, error) {
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: commonName(req)},
	}, req.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("creating certificate request: %w", err)
	}
	hc := NewHTTPClient(PinnedTLSConfig(req.Token))
	defer hc.CloseIdleConnections()
	client := segmeshv1connect.NewEnrollServiceClient(hc, req.Controller)
	resp, err := client.Enroll(ctx, connect.NewRequest(&segmeshv1.EnrollRequest{
		Token:     req.Token.String(),
		Name:      req.Name,
		Hostname:  req.Hostname,
		PublicKey: req.PublicKey,
		Endpoint:  req.Endpoint,
		CsrDer:    csr,
	}))
	if err != nil {
		var pe *pinError
		if errors.As(err, &pe) {
			return nil, fmt.Errorf("enrolling with %s: %w", req.Controller, pe)
		}
		var ce *connect.Error
		if errors.As(err, &ce) && !Retryable(err) {
			return nil, &RefusedError{Controller: req.Controller, Err: ce}
		}
		return nil, fmt.Errorf("enrolling with %s: %w", req.Controller, err)
	}
	return checkResponse(req, resp.Msg)
}

func commonName(req Request) string {
	if req.Name != "" {
		return req.Name
	}
	return req.Hostname
}

// Retryable reports whether an Enroll error is transient (controller unreachable,
// overloaded or timing out). Refusals (permission denied, unauthenticated, already
// exists, invalid argument, ...) and CA mismatches are not.
func Retryable(err error) bool {
	if err == nil || errors.Is(err, ErrCAMismatch) {
		return false
	}
	switch connect.CodeOf(err) {
	case connect.CodeUnavailable, connect.CodeDeadlineExceeded, connect.CodeResourceExhausted, connect.CodeAborted:
		return true
	}
	return false
}

func checkResponse(req Request, msg *segmeshv1.EnrollResponse) (*Result, error) {
	if !req.Token.MatchesCA(msg.GetCaDer()) {
		return nil, fmt.Errorf("checking enrollment response: %w", pinErrorf("returned CA has a different fingerprint"))
	}
	ca, err := x509.ParseCertificate(msg.GetCaDer())
	if err != nil {
		return nil, fmt.Errorf("checking enrollment response: parsing CA: %w", err)
	}
	cert, err := x509.ParseCertificate(msg.GetCertificateDer())
	if err != nil {
		return nil, fmt.Errorf("checking enrollment response: parsing node certificate: %w", err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return nil, fmt.Errorf("checking enrollment response: node certificate: %w", err)
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(&req.TLSKey.PublicKey) {
		return nil, errors.New("checking enrollment response: node certificate is not for this node's TLS key")
	}
	if msg.GetNodeName() == "" || cert.Subject.CommonName != msg.GetNodeName() {
		return nil, fmt.Errorf("checking enrollment response: node name %q, certificate common name %q", msg.GetNodeName(), cert.Subject.CommonName)
	}
	if req.Name != "" && msg.GetNodeName() != req.Name {
		return nil, fmt.Errorf("checking enrollment response: asked for node name %q, got %q", req.Name, msg.GetNodeName())
	}
	if _, err := wire.ParsePrefixes(msg.GetAddresses()); err != nil {
		return nil, fmt.Errorf("checking enrollment response: addresses: %w", err)
	}
	if _, err := wire.ParsePrefixes(msg.GetOverlayPrefixes()); err != nil {
		return nil, fmt.Errorf("checking enrollment response: overlay prefixes: %w", err)
	}
	return &Result{
		NodeName:        msg.GetNodeName(),
		Addresses:       msg.GetAddresses(),
		Labels:          msg.GetLabels(),
		OverlayPrefixes: msg.GetOverlayPrefixes(),
		CADER:           msg.GetCaDer(),
		CertDER:         msg.GetCertificateDer(),
	}, nil
}

// PinnedTLSConfig returns a client TLS configuration that accepts the controller only
// when its certificate chain contains a CA certificate whose SHA-256 (of the DER)
// equals the token's fingerprint, and the leaf verifies against that CA for
// ServerName. No system roots are consulted.
func PinnedTLSConfig(tok jointoken.Token) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: ServerName,
		// Chain verification is replaced, not skipped: VerifyConnection below checks the
		// chain against the pinned CA only.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyPinned(tok, cs.PeerCertificates)
		},
	}
}

func verifyPinned(tok jointoken.Token, chain []*x509.Certificate) error {
	if len(chain) == 0 {
		return pinErrorf("the controller presented no certificate")
	}
	var ca *x509.Certificate
	inter := x509.NewCertPool()
	for _, c := range chain {
		if ca == nil && tok.MatchesCA(c.Raw) {
			ca = c
			continue
		}
		inter.AddCert(c)
	}
	if ca == nil {
		return pinErrorf("no certificate in the controller's chain has fingerprint %x", tok.CAFingerprint)
	}
	if !ca.BasicConstraintsValid || !ca.IsCA {
		return pinErrorf("the pinned certificate is not a CA")
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := chain[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		DNSName:       ServerName,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return pinErrorf("server certificate does not verify against the pinned CA: %v", err)
	}
	return nil
}

// Health checks and timeouts of the controller connections NewHTTPClient makes.
// A connection on which nothing arrived for PingAfter gets an HTTP/2 PING; no
// answer within PingTimeout closes it, which ends every call on it (the netmap
// stream too). So a controller that vanished without closing the connection (a
// host that died, a network partition: no FIN, no RST) is noticed within
// PingAfter+PingTimeout (4 s) even on a quiet stream: the controller sends
// netmaps only when they change, so idle streams are normal. The cost is one
// PING frame and its answer (a few dozen bytes each way, with TLS) per idle
// connection every PingAfter.
const (
	PingAfter   = 2 * time.Second
	PingTimeout = 2 * time.Second
	// DialTimeout bounds the TCP connect, so that an unreachable controller
	// replica costs at most this long before the agent tries the next one.
	DialTimeout = 5 * time.Second
)

// NewHTTPClient returns an HTTP/2 client for the controller with the given TLS
// configuration. Connections are health-checked with HTTP/2 pings (see
// PingAfter); connections idle for 5 minutes are closed.
func NewHTTPClient(tlsConf *tls.Config) *http.Client {
	t := &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: DialTimeout, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     tlsConf,
		TLSHandshakeTimeout: 10 * time.Second,
		// A connection left idle (one with a replaced certificate) goes away.
		IdleConnTimeout:   5 * time.Minute,
		ForceAttemptHTTP2: true,
		// SendPingTimeout and PingTimeout are x/net/http2's ReadIdleTimeout and
		// PingTimeout.
		HTTP2: &http.HTTP2Config{
			SendPingTimeout: PingAfter,
			PingTimeout:     PingTimeout,
		},
	}
	t.Protocols = new(http.Protocols)
	t.Protocols.SetHTTP2(true)
	return &http.Client{Transport: t}
}
