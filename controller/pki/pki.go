// Package pki is the controller's certificate authority: it creates or loads the
// CA (ECDSA P-256, self-signed, 10 years), keeps the controller's TLS server
// certificate (DNS SAN ServerName plus configured names and addresses) current,
// and signs node client certificates from PKCS#10 requests.
//
// Files in the data directory: ca.crt (0644), ca.key (0600), server.crt (0644),
// server.key (0600), all PEM; keys are PKCS#8.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"segmesh/controller/internal/atomicfile"
)

// ServerName is the DNS SAN every controller server certificate carries; clients
// verify the controller against the CA with this name whatever address they dial.
const ServerName = "segmesh-controller"

// Validity periods.
const (
	CAValidity     = 10 * 365 * 24 * time.Hour
	ServerValidity = 365 * 24 * time.Hour
	ClientValidity = 365 * 24 * time.Hour
	// renewBefore is how long before expiry the server certificate is re-issued.
	renewBefore = 30 * 24 * time.Hour
)

// File names inside the data directory.
const (
	CACertFile     = "ca.crt"
	CAKeyFile      = "ca.key"
	ServerCertFile = "server.crt"
	ServerKeyFile  = "server.key"
)

// Authority holds the CA key and the current server certificate. It is safe for
// concurrent use.
type Authority struct {
	dir    string
	sans   []string
	logger *slog.Logger
	now    func() time.Time

	caCert *x509.Certificate
	caKey  crypto.Signer
	caPool *x509.CertPool

	mu     sync.Mutex
	server *tls.Certificate
}

// LoadOrCreate loads the CA and server certificate from dir, creating what is
// missing. sans are extra host names or IP addresses for the server certificate
// (ServerName is always included). An existing server certificate is re-issued
// when it lacks one of sans, was not signed by the CA, or expires within 30 days.
// It fails when the CA certificate exists without its key or a file does not parse.
func LoadOrCreate(dir string, sans []string, logger *slog.Logger) (*Authority, error) {
	a := &Authority{dir: dir, logger: logger, now: time.Now}
	seen := map[string]bool{ServerName: true}
	a.sans = []string{ServerName}
	for _, s := range sans {
		if s != "" && !seen[s] {
			seen[s] = true
			a.sans = append(a.sans, s)
		}
	}
	if err := a.loadOrCreateCA(); err != nil {
		return nil, err
	}
	if err := a.loadOrCreateServer(); err != nil {
		return nil, err
	}
	return a, nil
}

func (a *Authority) path(name string) string { return filepath.Join(a.dir, name) }

func (a *Authority) loadOrCreateCA() error {
	certPEM, certErr := os.ReadFile(a.path(CACertFile))
	keyPEM, keyErr := os.ReadFile(a.path(CAKeyFile))
	switch {
	case errors.Is(certErr, os.ErrNotExist) && errors.Is(keyErr, os.ErrNotExist):
		return a.createCA()
	case certErr != nil:
		return fmt.Errorf("reading CA certificate: %w", certErr)
	case keyErr != nil:
		return fmt.Errorf("reading CA key (the CA certificate exists, so the key is required; put back ca.key from a copy of this data directory, see docs/operations.md): %w", keyErr)
	}
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return fmt.Errorf("parsing %s: %w", a.path(CACertFile), err)
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return fmt.Errorf("parsing %s: %w", a.path(CAKeyFile), err)
	}
	if !publicKeysEqual(cert.PublicKey, key.Public()) {
		return fmt.Errorf("%s does not match %s", a.path(CAKeyFile), a.path(CACertFile))
	}
	a.setCA(cert, key)
	return nil
}

func (a *Authority) createCA() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating CA key: %w", err)
	}
	now := a.now()
	tmpl := &x509.Certificate{
		SerialNumber:          mustSerial(),
		Subject:               pkix.Name{CommonName: "segmesh controller CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(CAValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return fmt.Errorf("creating CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("parsing new CA certificate: %w", err)
	}
	// Key first: a certificate without its key is an error at the next start,
	// a key without its certificate is simply replaced.
	if err := writeKey(a.path(CAKeyFile), key); err != nil {
		return err
	}
	if err := atomicfile.Write(a.path(CACertFile), pemCert(der), 0o644); err != nil {
		return err
	}
	a.logger.Info("created controller CA", "file", a.path(CACertFile))
	a.setCA(cert, key)
	return nil
}

func (a *Authority) setCA(cert *x509.Certificate, key crypto.Signer) {
	a.caCert, a.caKey = cert, key
	a.caPool = x509.NewCertPool()
	a.caPool.AddCert(cert)
}

func (a *Authority) loadOrCreateServer() error {
	certPEM, certErr := os.ReadFile(a.path(ServerCertFile))
	keyPEM, keyErr := os.ReadFile(a.path(ServerKeyFile))
	if certErr == nil && keyErr == nil {
		tc, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return fmt.Errorf("loading server certificate %s: %w", a.path(ServerCertFile), err)
		}
		if reason := a.serverStale(tc.Leaf); reason != "" {
			a.logger.Info("re-issuing server certificate", "reason", reason)
			return a.issueServer()
		}
		// Serve the CA after the leaf so that a new agent can pin it by fingerprint.
		tc.Certificate = append(tc.Certificate, a.caCert.Raw)
		a.server = &tc
		return nil
	}
	return a.issueServer()
}

// serverStale says why the server certificate leaf must be re-issued, or "".
func (a *Authority) serverStale(leaf *x509.Certificate) string {
	if err := leaf.CheckSignatureFrom(a.caCert); err != nil {
		return "not signed by the current CA"
	}
	if a.now().Add(renewBefore).After(leaf.NotAfter) {
		return "expires at " + leaf.NotAfter.UTC().Format(time.RFC3339)
	}
	for _, s := range a.sans {
		if ip := net.ParseIP(s); ip != nil {
			if !slices.ContainsFunc(leaf.IPAddresses, ip.Equal) {
				return "missing IP SAN " + s
			}
		} else if !slices.Contains(leaf.DNSNames, s) {
			return "missing DNS SAN " + s
		}
	}
	return ""
}

func (a *Authority) issueServer() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating server key: %w", err)
	}
	now := a.now()
	tmpl := &x509.Certificate{
		SerialNumber: mustSerial(),
		Subject:      pkix.Name{CommonName: ServerName},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(ServerValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, s := range a.sans {
		if ip := net.ParseIP(s); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, s)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.caCert, key.Public(), a.caKey)
	if err != nil {
		return fmt.Errorf("creating server certificate: %w", err)
	}
	if err := writeKey(a.path(ServerKeyFile), key); err != nil {
		return err
	}
	if err := atomicfile.Write(a.path(ServerCertFile), pemCert(der), 0o644); err != nil {
		return err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("parsing new server certificate: %w", err)
	}
	a.server = &tls.Certificate{Certificate: [][]byte{der, a.caCert.Raw}, PrivateKey: key, Leaf: leaf}
	a.logger.Info("issued server certificate", "dns", tmpl.DNSNames, "ips", tmpl.IPAddresses, "not_after", leaf.NotAfter.UTC())
	return nil
}

// CACertDER returns the CA certificate in DER.
func (a *Authority) CACertDER() []byte { return a.caCert.Raw }

// CACertPEM returns the CA certificate in PEM.
func (a *Authority) CACertPEM() []byte { return pemCert(a.caCert.Raw) }

// CAPool returns a pool holding only the CA, for tls.Config.ClientCAs/RootCAs.
func (a *Authority) CAPool() *x509.CertPool { return a.caPool }

// GetCertificate returns the server certificate for tls.Config.GetCertificate,
// re-issuing it first when it expires within 30 days.
func (a *Authority) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.now().Add(renewBefore).After(a.server.Leaf.NotAfter) {
		if err := a.issueServer(); err != nil {
			a.logger.Error("renewing server certificate", "err", err)
			// Keep serving the old certificate while it is still valid.
		}
	}
	return a.server, nil
}

// ParseCSR parses a DER PKCS#10 request and checks its self-signature. Accepted
// keys: ECDSA P-256/P-384 and Ed25519; any other key is refused before its
// signature is checked (an RSA-8192 signature costs milliseconds).
func ParseCSR(der []byte) (*x509.CertificateRequest, error) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("parsing certificate signing request: %w", err)
	}
	if err := checkCSRKey(csr); err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("certificate signing request signature: %w", err)
	}
	return csr, nil
}

// checkCSRKey refuses key types and curves ParseCSR does not accept.
func checkCSRKey(csr *x509.CertificateRequest) error {
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("certificate signing request: ECDSA curve %s not accepted (use P-256)", k.Curve.Params().Name)
		}
	case ed25519.PublicKey:
	default:
		return fmt.Errorf("certificate signing request: key type %T not accepted (use ECDSA P-256)", csr.PublicKey)
	}
	return nil
}

// SignClient issues a TLS client certificate (DER) for the key in csr with
// CommonName commonName and ExtKeyUsage ClientAuth, valid until notAfter (at most
// ClientValidity from now). NotBefore lies a tenth of the lifetime, at most five
// minutes, in the past, to tolerate clock skew. The request's own subject and
// extensions are ignored. csr must come from ParseCSR.
func (a *Authority) SignClient(csr *x509.CertificateRequest, commonName string, notAfter time.Time) ([]byte, error) {
	now := a.now()
	if notAfter.After(now.Add(ClientValidity)) {
		notAfter = now.Add(ClientValidity)
	}
	if !notAfter.After(now) {
		return nil, fmt.Errorf("signing client certificate for %s: expiry %s is not in the future", commonName, notAfter.UTC().Format(time.RFC3339))
	}
	skew := min(5*time.Minute, notAfter.Sub(now)/10)
	tmpl := &x509.Certificate{
		SerialNumber: mustSerial(),
		Subject:      pkix.Name{CommonName: commonName},
		NotBefore:    now.Add(-skew),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.caCert, csr.PublicKey, a.caKey)
	if err != nil {
		return nil, fmt.Errorf("signing client certificate for %s: %w", commonName, err)
	}
	return der, nil
}

func mustSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(fmt.Sprintf("pki: reading random serial: %v", err)) // crypto/rand does not fail on Linux
	}
	return n.Add(n, big.NewInt(1))
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func parseCertPEM(b []byte) (*x509.Certificate, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, errors.New("no PEM CERTIFICATE block")
	}
	return x509.ParseCertificate(blk.Bytes)
}

func parseKeyPEM(b []byte) (crypto.Signer, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, errors.New("no PEM PRIVATE KEY block")
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, err
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key type %T cannot sign", k)
	}
	return s, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ea, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ea.Equal(b)
}

func writeKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encoding key %s: %w", path, err)
	}
	return atomicfile.Write(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}
