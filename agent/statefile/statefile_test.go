package statefile

import (
	"bytes"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"google.golang.org/protobuf/proto"

	"segmesh/agent/internal/testpki"
	"segmesh/api/segmeshv1"
)

func open(t *testing.T) *Dir {
	t.Helper()
	d, err := Open(filepath.Join(t.TempDir(), "state"), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func TestOpenTightensDirectoryMode(t *testing.T) {
	p := filepath.Join(t.TempDir(), "state")
	if err := os.Mkdir(p, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(p, nil); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, p); m != 0o700 {
		t.Fatalf("state directory mode %v, want 0700", m)
	}
}

func TestKeys(t *testing.T) {
	tests := []struct {
		name string
		file string
		load func(d *Dir) (string, error) // returns a stable rendering of the key
	}{
		{name: "wireguard", file: WireGuardKeyFile, load: func(d *Dir) (string, error) {
			k, err := d.WireGuardKey()
			return k.String(), err
		}},
		{name: "tls", file: TLSKeyFile, load: func(d *Dir) (string, error) {
			k, err := d.TLSKey()
			if err != nil {
				return "", err
			}
			if k.Curve.Params().Name != "P-256" {
				t.Errorf("curve %s, want P-256", k.Curve.Params().Name)
			}
			der, err := x509.MarshalPKCS8PrivateKey(k)
			return string(der), err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := open(t)
			first, err := tt.load(d)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(d.Path(), tt.file)
			if m := mode(t, path); m != 0o600 {
				t.Fatalf("new key file mode %v, want 0600", m)
			}
			again, err := tt.load(d)
			if err != nil || again != first {
				t.Fatalf("second load returned another key (err %v)", err)
			}
			if err := os.Chmod(path, 0o644); err != nil {
				t.Fatal(err)
			}
			loose, err := tt.load(d)
			if err != nil || loose != first {
				t.Fatalf("load after chmod: other key or %v", err)
			}
			if m := mode(t, path); m != 0o600 {
				t.Fatalf("loose key file mode %v not tightened to 0600", m)
			}
			if err := os.WriteFile(path, []byte("garbage"), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := tt.load(d); err == nil || !strings.Contains(err.Error(), tt.file) {
				t.Fatalf("corrupt key: err = %v, want one naming %s", err, tt.file)
			}
		})
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := WriteFileAtomic(path, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(path, []byte("two"), 0o640); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); string(b) != "two" {
		t.Fatalf("content %q", b)
	}
	if m := mode(t, path); m != 0o640 {
		t.Fatalf("mode %v, want 0640", m)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("directory holds %d entries, want only f (temporary files left behind?)", len(entries))
	}
	if err := WriteFileAtomic(filepath.Join(dir, "missing", "f"), []byte("x"), 0o600); err == nil {
		t.Fatal("write into a missing directory succeeded")
	}
}

// Readers racing with writers see either the old or the new content, never a mix
// or an empty file.
func TestWriteFileAtomicConcurrentReaders(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	a, b := bytes.Repeat([]byte("a"), 1<<20), bytes.Repeat([]byte("b"), 1<<20)
	if err := WriteFileAtomic(path, a, 0o600); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var bad error
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			got, err := os.ReadFile(path)
			if err != nil || !(bytes.Equal(got, a) || bytes.Equal(got, b)) {
				bad = errors.New("reader saw a partial or missing file")
				return
			}
		}
	})
	for i := range 20 {
		content := a
		if i%2 == 0 {
			content = b
		}
		if err := WriteFileAtomic(path, content, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	if bad != nil {
		t.Fatal(bad)
	}
}

func TestNetmap(t *testing.T) {
	d := open(t)
	if _, err := d.Netmap(); !errors.Is(err, ErrNoNetmap) {
		t.Fatalf("empty dir: err = %v, want ErrNoNetmap", err)
	}
	nm := &segmeshv1.Netmap{PolicyRevision: 4, Self: &segmeshv1.Node{Name: "a"}, Hash: "x"}
	if err := d.SaveNetmap(nm); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, filepath.Join(d.Path(), NetmapFile)); m != 0o600 {
		t.Fatalf("netmap mode %v", m)
	}
	got, err := d.Netmap()
	if err != nil || !proto.Equal(got, nm) {
		t.Fatalf("round trip = %v, %v", got, err)
	}
	if err := os.WriteFile(filepath.Join(d.Path(), NetmapFile), []byte{0xff, 0xff, 0xff}, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Netmap(); err == nil || errors.Is(err, ErrNoNetmap) {
		t.Fatalf("corrupt netmap: err = %v, want a decoding error", err)
	}
}

func TestEnrollmentRoundTrip(t *testing.T) {
	d := open(t)
	if _, err := d.Identity(); !errors.Is(err, ErrNotEnrolled) {
		t.Fatalf("err = %v, want ErrNotEnrolled", err)
	}
	key, err := d.TLSKey()
	if err != nil {
		t.Fatal(err)
	}
	ca := testpki.NewCA(t, "ca")
	cert := ca.ClientCert(t, "web-1", key)
	id := Identity{NodeName: "web-1", Addresses: []string{"100.64.0.1/32"}, Labels: map[string]string{"role": "web"},
		OverlayPrefixes: []string{"100.64.0.0/10"}, Controller: "https://192.0.2.1:7443", Interface: "segmesh0", ListenPort: 51820}
	if err := d.SaveEnrollment(id, ca.DER, cert); err != nil {
		t.Fatal(err)
	}
	got, err := d.Identity()
	if err != nil || got.NodeName != "web-1" || got.Labels["role"] != "web" || got.ListenPort != 51820 || got.Controller != id.Controller {
		t.Fatalf("identity = %+v, %v", got, err)
	}
	tc, pool, err := d.ClientCertificate()
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(tc.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("stored certificate does not verify against the stored CA: %v", err)
	}
	if err := os.WriteFile(filepath.Join(d.Path(), IdentityFile), []byte(`{"node_name":""}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Identity(); err == nil {
		t.Fatal("identity without a node name accepted")
	}
}
