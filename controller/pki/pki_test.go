package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

func TestCreateThenReuse(t *testing.T) {
	dir := t.TempDir()
	a, err := LoadOrCreate(dir, []string{"192.0.2.10", "ctl.example"}, discard)
	if err != nil {
		t.Fatal(err)
	}
	for name, perm := range map[string]os.FileMode{CACertFile: 0o644, CAKeyFile: 0o600, ServerCertFile: 0o644, ServerKeyFile: 0o600} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != perm {
			t.Errorf("%s mode = %v, want %v", name, fi.Mode().Perm(), perm)
		}
	}
	ca := a.caCert
	if !ca.IsCA || ca.PublicKeyAlgorithm != x509.ECDSA || ca.NotAfter.Sub(ca.NotBefore) < 9*365*24*time.Hour {
		t.Errorf("CA: IsCA=%v alg=%v validity=%v", ca.IsCA, ca.PublicKeyAlgorithm, ca.NotAfter.Sub(ca.NotBefore))
	}
	srv, _ := a.GetCertificate(nil)

	// A second start reuses CA and server certificate.
	b, err := LoadOrCreate(dir, []string{"ctl.example"}, discard)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.CACertDER(), b.CACertDER()) {
		t.Error("CA changed on second start")
	}
	srv2, _ := b.GetCertificate(nil)
	// Both the freshly issued and the reloaded chain end in the CA, which new agents pin.
	for i, chain := range [][][]byte{srv.Certificate, srv2.Certificate} {
		if len(chain) != 2 || !bytes.Equal(chain[1], a.CACertDER()) {
			t.Errorf("start %d: served chain has %d certificates, want leaf + CA", i+1, len(chain))
		}
	}
	if !bytes.Equal(srv.Certificate[0], srv2.Certificate[0]) {
		t.Error("server certificate re-issued although its SANs still cover the request")
	}

	// A new SAN re-issues the server certificate, still under the same CA.
	c, err := LoadOrCreate(dir, []string{"198.51.100.7"}, discard)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.CACertDER(), c.CACertDER()) {
		t.Error("CA changed on third start")
	}
	srv3, _ := c.GetCertificate(nil)
	if bytes.Equal(srv.Certificate[0], srv3.Certificate[0]) {
		t.Error("server certificate not re-issued for a new SAN")
	}
	if !srv3.Leaf.IPAddresses[0].Equal(net.ParseIP("198.51.100.7")) {
		t.Errorf("IP SANs = %v", srv3.Leaf.IPAddresses)
	}
}

func TestServerCertVerifies(t *testing.T) {
	a, err := LoadOrCreate(t.TempDir(), []string{"10.1.2.3"}, discard)
	if err != nil {
		t.Fatal(err)
	}
	srv, _ := a.GetCertificate(nil)
	for _, name := range []string{ServerName, "10.1.2.3"} {
		if _, err := srv.Leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: a.CAPool()}); err != nil {
			t.Errorf("verify as %s: %v", name, err)
		}
	}
	if _, err := srv.Leaf.Verify(x509.VerifyOptions{DNSName: "other", Roots: a.CAPool()}); err == nil {
		t.Error("server certificate verified for a name it does not carry")
	}
}

func csrDER(t *testing.T, key any) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "ignored"}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestSignClient(t *testing.T) {
	a, err := LoadOrCreate(t.TempDir(), nil, discard)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := ParseCSR(csrDER(t, key))
	if err != nil {
		t.Fatal(err)
	}
	der, err := a.SignClient(csr, "db-1", time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if cert.Subject.CommonName != "db-1" {
		t.Errorf("CN = %q, want db-1 (the CSR's subject must be ignored)", cert.Subject.CommonName)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		t.Error("certificate key is not the CSR key")
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: a.CAPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("verify as client: %v", err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: a.CAPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Error("client certificate verified for server auth")
	}
	if d := time.Until(cert.NotAfter); d < 59*time.Minute || d > time.Hour {
		t.Errorf("client certificate valid for %v, want the hour asked for", d)
	}
	if skew := time.Until(cert.NotBefore); skew < -5*time.Minute-time.Second || skew > -4*time.Minute {
		t.Errorf("NotBefore %v from now, want a tenth of the lifetime (6 min) capped at 5 min in the past", skew)
	}
	if _, err := a.SignClient(csr, "db-1", time.Now().Add(-time.Second)); err == nil {
		t.Error("a certificate that expired before it was issued was signed")
	}
	long, err := a.SignClient(csr, "db-1", time.Now().Add(10*ClientValidity))
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := x509.ParseCertificate(long); time.Until(c.NotAfter) > ClientValidity {
		t.Errorf("lifetime %v exceeds ClientValidity", time.Until(c.NotAfter))
	}
}

func TestParseCSRRejects(t *testing.T) {
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	tampered := csrDER(t, p256)
	tampered[len(tampered)-3] ^= 0xff // break the signature
	tests := []struct {
		name    string
		der     []byte
		wantErr bool
	}{
		{"p256", csrDER(t, p256), false},
		{"p384", csrDER(t, p384), false},
		{"rsa", csrDER(t, rsaKey), true},
		{"tampered signature", tampered, true},
		{"garbage", []byte("not a csr"), true},
		{"empty", nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseCSR(tt.der)
			if (err != nil) != tt.wantErr {
				t.Errorf("err = %v, wantErr %v", err, tt.wantErr)
			}
		})
	}
}

func TestCAKeyMissingOrMismatched(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadOrCreate(dir, nil, discard); err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	if _, err := LoadOrCreate(other, nil, discard); err != nil {
		t.Fatal(err)
	}
	key, _ := os.ReadFile(filepath.Join(other, CAKeyFile))
	if err := os.WriteFile(filepath.Join(dir, CAKeyFile), key, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreate(dir, nil, discard); err == nil {
		t.Error("loaded a CA whose key does not match its certificate")
	}
	if err := os.Remove(filepath.Join(dir, CAKeyFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreate(dir, nil, discard); err == nil {
		t.Error("loaded a CA certificate without its key")
	}
}

func TestRenewal(t *testing.T) {
	a, err := LoadOrCreate(t.TempDir(), nil, discard)
	if err != nil {
		t.Fatal(err)
	}
	old, _ := a.GetCertificate(nil)
	a.now = func() time.Time { return time.Now().Add(ServerValidity - 10*24*time.Hour) }
	renewed, err := a.GetCertificate(nil)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(old.Certificate[0], renewed.Certificate[0]) {
		t.Fatal("server certificate not renewed 10 days before expiry")
	}
	if !renewed.Leaf.NotAfter.After(old.Leaf.NotAfter) {
		t.Errorf("renewed certificate expires %v, not after %v", renewed.Leaf.NotAfter, old.Leaf.NotAfter)
	}
}
