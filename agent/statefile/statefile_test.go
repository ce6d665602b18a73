package statefile

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"google.golang.org/protobuf/proto"

	"segmesh/agent/internal/testlog"
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

func TestWriteAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := writeAtomic(path, []byte("one")); err != nil {
		t.Fatal(err)
	}
	// Even over a file with a loose mode, the result is 0600.
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := writeAtomic(path, []byte("two")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); string(b) != "two" {
		t.Fatalf("content %q", b)
	}
	if m := mode(t, path); m != 0o600 {
		t.Fatalf("mode %v, want 0600", m)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("directory holds %d entries, want only f (temporary files left behind?)", len(entries))
	}
	if err := writeAtomic(filepath.Join(dir, "missing", "f"), []byte("x")); err == nil {
		t.Fatal("write into a missing directory succeeded")
	}
}

// Readers racing with writers see either the old or the new content, never a mix
// or an empty file.
func TestWriteAtomicConcurrentReaders(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	a, b := bytes.Repeat([]byte("a"), 1<<20), bytes.Repeat([]byte("b"), 1<<20)
	if err := writeAtomic(path, a); err != nil {
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
		if err := writeAtomic(path, content); err != nil {
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
	tc, err := d.ClientCertificate()
	if err != nil {
		t.Fatal(err)
	}
	pool, err := d.CAPool()
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

// populated returns a directory holding every state file, written by the package's
// own writers, and the logs of its Dir.
func populated(t *testing.T) (*Dir, *testlog.Buffer) {
	t.Helper()
	logs := &testlog.Buffer{}
	d, err := Open(filepath.Join(t.TempDir(), "state"), slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.WireGuardKey(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := d.NextWireGuardKey(); err != nil {
		t.Fatal(err)
	}
	key, err := d.TLSKey()
	if err != nil {
		t.Fatal(err)
	}
	ca := testpki.NewCA(t, "ca")
	id := Identity{NodeName: "web-1", Controller: "https://192.0.2.1:7443", Interface: "segmesh0", ListenPort: 51820}
	if err := d.SaveEnrollment(id, ca.DER, ca.ClientCert(t, "web-1", key)); err != nil {
		t.Fatal(err)
	}
	if err := d.SaveNetmap(&segmeshv1.Netmap{PolicyRevision: 1, Self: &segmeshv1.Node{Name: "web-1"}}); err != nil {
		t.Fatal(err)
	}
	next, err := d.NewNextTLSKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.CommitCertificate(ca.ClientCert(t, "web-1", next)); err != nil {
		t.Fatal(err)
	}
	if _, err := d.NewNextTLSKey(); err != nil { // a renewal in progress
		t.Fatal(err)
	}
	return d, logs
}

// TestEveryFileIs0600: whatever the umask, every file the package writes has mode
// 0600, including the certificates, the identity and the netmap (defect 6).
func TestEveryFileIs0600(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	d, _ := populated(t)
	entries, err := os.ReadDir(d.Path())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
		if m := mode(t, filepath.Join(d.Path(), e.Name())); m != 0o600 {
			t.Errorf("%s: mode %04o, want 0600", e.Name(), uint32(m))
		}
	}
	want := []string{CAFile, IdentityFile, NetmapFile, CertFile, TLSKeyFile, NextTLSKeyFile, WireGuardKeyFile, NextWireGuardKeyFile}
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Errorf("files %v, want %v", names, want)
	}
	if m := mode(t, d.Path()); m != 0o700 {
		t.Errorf("directory mode %04o, want 0700", uint32(m))
	}
}

// TestLooseFilesTightenedOnRead: a state file with a looser mode (restored from a
// backup, copied, edited by hand) is set to 0600 by the reader that reads it, and
// the change is logged with the file and its old mode. (tls.key.next is read only
// by RecoverRenewal, which removes or renames it; TestRenewalIsCrashSafe covers it.)
func TestLooseFilesTightenedOnRead(t *testing.T) {
	tests := []struct {
		file string
		read func(d *Dir) error
	}{
		{WireGuardKeyFile, func(d *Dir) error { _, err := d.WireGuardKey(); return err }},
		{NextWireGuardKeyFile, func(d *Dir) error { _, _, err := d.NextWireGuardKey(); return err }},
		{TLSKeyFile, func(d *Dir) error { _, err := d.TLSKey(); return err }},
		{CAFile, func(d *Dir) error { _, err := d.CAPool(); return err }},
		{CertFile, func(d *Dir) error { _, err := d.ClientCertificate(); return err }},
		{IdentityFile, func(d *Dir) error { _, err := d.Identity(); return err }},
		{NetmapFile, func(d *Dir) error { _, err := d.Netmap(); return err }},
	}
	for _, tt := range tests {
		for _, loose := range []os.FileMode{0o644, 0o666, 0o604, 0o640} {
			t.Run(fmt.Sprintf("%s %04o", tt.file, uint32(loose)), func(t *testing.T) {
				d, logs := populated(t)
				p := filepath.Join(d.Path(), tt.file)
				if err := os.Chmod(p, loose); err != nil {
					t.Fatal(err)
				}
				if err := tt.read(d); err != nil {
					t.Fatal(err)
				}
				if m := mode(t, p); m != 0o600 {
					t.Fatalf("mode %04o after reading, want 0600", uint32(m))
				}
				if !strings.Contains(logs.String(), "tightening its mode to 0600") || !strings.Contains(logs.String(), fmt.Sprintf("mode=%04o", uint32(loose))) ||
					!strings.Contains(logs.String(), tt.file) {
					t.Errorf("tightening not logged with file and mode:\n%s", logs.String())
				}
			})
		}
	}
}

// TestRenewalIsCrashSafe: after a crash at any point of a renewal (tls.key.next
// written; node.crt written; both and the rename), RecoverRenewal leaves a tls.key
// and a node.crt that belong together.
func TestRenewalIsCrashSafe(t *testing.T) {
	ca := testpki.NewCA(t, "ca")
	setup := func(t *testing.T) (*Dir, *ecdsa.PrivateKey) {
		d := open(t)
		key, err := d.TLSKey()
		if err != nil {
			t.Fatal(err)
		}
		if err := d.SaveEnrollment(Identity{NodeName: "web-1"}, ca.DER, ca.ClientCert(t, "web-1", key)); err != nil {
			t.Fatal(err)
		}
		return d, key
	}
	tests := []struct {
		name  string
		crash func(t *testing.T, d *Dir, old *ecdsa.PrivateKey) (want *ecdsa.PrivateKey)
	}{
		{"after tls.key.next", func(t *testing.T, d *Dir, old *ecdsa.PrivateKey) *ecdsa.PrivateKey {
			if _, err := d.NewNextTLSKey(); err != nil {
				t.Fatal(err)
			}
			return old
		}},
		{"after node.crt", func(t *testing.T, d *Dir, old *ecdsa.PrivateKey) *ecdsa.PrivateKey {
			next, err := d.NewNextTLSKey()
			if err != nil {
				t.Fatal(err)
			}
			if err := d.write(CertFile, pemCert(ca.ClientCert(t, "web-1", next))); err != nil {
				t.Fatal(err)
			}
			return next
		}},
		{"after the rename", func(t *testing.T, d *Dir, old *ecdsa.PrivateKey) *ecdsa.PrivateKey {
			next, err := d.NewNextTLSKey()
			if err != nil {
				t.Fatal(err)
			}
			if err := d.CommitCertificate(ca.ClientCert(t, "web-1", next)); err != nil {
				t.Fatal(err)
			}
			return next
		}},
		{"garbage tls.key.next", func(t *testing.T, d *Dir, old *ecdsa.PrivateKey) *ecdsa.PrivateKey {
			if err := d.write(NextTLSKeyFile, []byte("garbage")); err != nil {
				t.Fatal(err)
			}
			return old
		}},
		{"certificate for another key refused", func(t *testing.T, d *Dir, old *ecdsa.PrivateKey) *ecdsa.PrivateKey {
			if _, err := d.NewNextTLSKey(); err != nil {
				t.Fatal(err)
			}
			other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err := d.CommitCertificate(ca.ClientCert(t, "web-1", other)); err == nil || !strings.Contains(err.Error(), "not for the key") {
				t.Fatalf("CommitCertificate with a certificate for another key = %v", err)
			}
			return old
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, old := setup(t)
			want := tt.crash(t, d, old)
			d2, err := Open(d.Path(), d.log)
			if err != nil {
				t.Fatal(err)
			}
			if err := d2.RecoverRenewal(); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(filepath.Join(d.Path(), NextTLSKeyFile)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("tls.key.next left after RecoverRenewal: %v", err)
			}
			cert, err := d2.ClientCertificate() // fails when key and certificate do not match
			if err != nil {
				t.Fatal(err)
			}
			got, err := d2.TLSKey()
			if err != nil {
				t.Fatal(err)
			}
			if !got.Equal(want) || !cert.Leaf.PublicKey.(*ecdsa.PublicKey).Equal(&want.PublicKey) {
				t.Error("tls.key/node.crt are not the expected pair")
			}
		})
	}
	if err := open(t).CommitCertificate(ca.ClientCert(t, "x", ca.Key)); err == nil || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("CommitCertificate without tls.key.next = %v", err)
	}
}

func TestWireGuardKeyRotationFiles(t *testing.T) {
	d := open(t)
	cur, err := d.WireGuardKey()
	if err != nil {
		t.Fatal(err)
	}
	if has, err := d.HasNextWireGuardKey(); has || err != nil {
		t.Fatalf("HasNextWireGuardKey = %v, %v before a rotation", has, err)
	}
	next, created, err := d.NextWireGuardKey()
	if err != nil || !created || next == cur {
		t.Fatalf("NextWireGuardKey = %v, %v (created %v); want a new key", next, err, created)
	}
	again, created, err := d.NextWireGuardKey()
	if err != nil || created || again != next {
		t.Fatalf("second NextWireGuardKey = %v, created %v, %v; want the same pending key", again, created, err)
	}
	if k, err := d.WireGuardKey(); err != nil || k != cur {
		t.Fatal("the pending key replaced the key before the commit")
	}
	committed, err := d.CommitWireGuardKey()
	if err != nil || committed != next {
		t.Fatalf("CommitWireGuardKey = %v, %v", committed, err)
	}
	if k, err := d.WireGuardKey(); err != nil || k != next {
		t.Fatal("WireGuardKey after the commit is not the new key")
	}
	if has, _ := d.HasNextWireGuardKey(); has {
		t.Fatal("pending key left after the commit")
	}
	if _, err := d.CommitWireGuardKey(); err == nil {
		t.Fatal("commit without a pending key succeeded")
	}
}

// TestIdentityControllers: identity.json written by an older agent (only
// "controller") loads with that URL as the whole list; a "controller" that is
// not in "controllers" (a hand edit, or an older agent after a downgrade) goes
// first; the list round-trips.
func TestIdentityControllers(t *testing.T) {
	const a, b, c = "https://192.0.2.1:7443", "https://192.0.2.2:7443", "https://192.0.2.3:7443"
	tests := []struct {
		name     string
		file     string
		wantCur  string
		wantList []string
	}{
		{name: "old file: single controller", file: `{"node_name":"web-1","controller":"` + a + `"}`, wantCur: a, wantList: []string{a}},
		{name: "list with the current one", file: `{"node_name":"web-1","controller":"` + b + `","controllers":["` + a + `","` + b + `"]}`,
			wantCur: b, wantList: []string{a, b}},
		{name: "current one missing from the list goes first", file: `{"node_name":"web-1","controller":"` + c + `","controllers":["` + a + `","` + b + `"]}`,
			wantCur: c, wantList: []string{c, a, b}},
		{name: "no current one: the first", file: `{"node_name":"web-1","controllers":["` + a + `","` + b + `"]}`, wantCur: a, wantList: []string{a, b}},
		{name: "none at all", file: `{"node_name":"web-1"}`, wantCur: "", wantList: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := open(t)
			if err := os.WriteFile(filepath.Join(d.Path(), IdentityFile), []byte(tt.file), 0o600); err != nil {
				t.Fatal(err)
			}
			id, err := d.Identity()
			if err != nil {
				t.Fatal(err)
			}
			if id.Controller != tt.wantCur || !slices.Equal(id.Controllers, tt.wantList) {
				t.Fatalf("controller %q, controllers %q; want %q, %q", id.Controller, id.Controllers, tt.wantCur, tt.wantList)
			}
			if err := d.SaveIdentity(id); err != nil {
				t.Fatal(err)
			}
			again, err := d.Identity()
			if err != nil || again.Controller != tt.wantCur || !slices.Equal(again.Controllers, tt.wantList) {
				t.Fatalf("after a round trip: controller %q, controllers %q, %v", again.Controller, again.Controllers, err)
			}
		})
	}
}
