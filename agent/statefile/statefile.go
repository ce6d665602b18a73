// Package statefile owns the agent's state directory: the WireGuard private key, the
// TLS client key and certificates, the enrolled identity and the last netmap.
//
// Layout of the directory (mode 0700):
//
//	wireguard.key   WireGuard private key, base64 as printed by `wg genkey` (0600)
//	tls.key         ECDSA P-256 TLS client key, PEM "PRIVATE KEY" (PKCS #8) (0600)
//	ca.crt          controller CA certificate, PEM (0644)
//	node.crt        node client certificate, PEM (0644)
//	identity.json   Identity as JSON (0600)
//	netmap.pb       last valid netmap, binary protobuf segmesh.v1.Netmap (0600)
//
// Every file is written atomically (temporary file, fsync, rename, fsync of the
// directory), so a crash leaves either the old or the new content, never a mix.
package statefile

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
)

// File names inside the state directory.
const (
	WireGuardKeyFile = "wireguard.key"
	TLSKeyFile       = "tls.key"
	CAFile           = "ca.crt"
	CertFile         = "node.crt"
	IdentityFile     = "identity.json"
	NetmapFile       = "netmap.pb"
)

// ErrNotEnrolled is returned (wrapped) by Dir.Identity when no identity is stored.
var ErrNotEnrolled = errors.New("not enrolled")

// ErrNoNetmap is returned (wrapped) by Dir.Netmap when no netmap is stored.
var ErrNoNetmap = errors.New("no stored netmap")

// Identity is what enrollment established, stored as identity.json.
type Identity struct {
	NodeName string `json:"node_name"`
	// Addresses are the node's overlay addresses as single-address prefixes.
	Addresses []string          `json:"addresses"`
	Labels    map[string]string `json:"labels,omitempty"`
	// OverlayPrefixes are routed into the overlay interface.
	OverlayPrefixes []string `json:"overlay_prefixes"`
	// Controller is the controller URL, e.g. "https://192.0.2.1:7443".
	Controller string `json:"controller"`
	// Interface is the overlay link name.
	Interface string `json:"interface"`
	// ListenPort is the WireGuard UDP port.
	ListenPort int `json:"listen_port"`
}

// Dir is an agent state directory.
type Dir struct {
	path string
	log  *slog.Logger
}

// Open creates the directory if needed and makes sure its mode is 0700.
func Open(path string, logger *slog.Logger) (*Dir, error) {
	if path == "" {
		return nil, errors.New("state directory: empty path")
	}
	if logger == nil {
		logger = slog.Default()
	}
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	if err := os.Chmod(path, 0o700); err != nil {
		return nil, fmt.Errorf("setting mode of state directory: %w", err)
	}
	return &Dir{path: path, log: logger}, nil
}

// Path returns the directory's path.
func (d *Dir) Path() string { return d.path }

func (d *Dir) file(name string) string { return filepath.Join(d.path, name) }

// WireGuardKey loads the WireGuard private key, generating and storing one (mode
// 0600) on first use. A key file with a looser mode is tightened and logged.
func (d *Dir) WireGuardKey() (wgtypes.Key, error) {
	b, err := d.readSecret(WireGuardKeyFile)
	if errors.Is(err, fs.ErrNotExist) {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			return wgtypes.Key{}, fmt.Errorf("generating WireGuard key: %w", err)
		}
		if err := WriteFileAtomic(d.file(WireGuardKeyFile), []byte(k.String()+"\n"), 0o600); err != nil {
			return wgtypes.Key{}, fmt.Errorf("storing WireGuard key: %w", err)
		}
		d.log.Info("generated WireGuard key", "public_key", k.PublicKey().String())
		return k, nil
	}
	if err != nil {
		return wgtypes.Key{}, err
	}
	k, err := wgtypes.ParseKey(strings.TrimSpace(string(b)))
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("parsing %s: %w", d.file(WireGuardKeyFile), err)
	}
	return k, nil
}

// TLSKey loads the ECDSA P-256 TLS client key, generating and storing one (mode
// 0600) on first use.
func (d *Dir) TLSKey() (*ecdsa.PrivateKey, error) {
	b, err := d.readSecret(TLSKeyFile)
	if errors.Is(err, fs.ErrNotExist) {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("generating TLS key: %w", err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			return nil, fmt.Errorf("encoding TLS key: %w", err)
		}
		if err := WriteFileAtomic(d.file(TLSKeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return nil, fmt.Errorf("storing TLS key: %w", err)
		}
		return k, nil
	}
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("parsing %s: no PEM PRIVATE KEY block", d.file(TLSKeyFile))
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", d.file(TLSKeyFile), err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, fmt.Errorf("parsing %s: want an ECDSA P-256 key, got %T", d.file(TLSKeyFile), k)
	}
	return ek, nil
}

// readSecret reads a key file, tightening its mode to 0600 when it is looser.
func (d *Dir) readSecret(name string) ([]byte, error) {
	p := d.file(name)
	st, err := os.Stat(p)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("reading %s: %w", p, err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		d.log.Warn("key file was readable by others; tightening its mode to 0600", "file", p, "mode", st.Mode().Perm().String())
		if err := os.Chmod(p, 0o600); err != nil {
			return nil, fmt.Errorf("setting mode of %s: %w", p, err)
		}
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", p, err)
	}
	return b, nil
}

// SaveEnrollment stores the CA and node certificates (DER in, PEM on disk) and then
// the identity, each atomically. The identity is written last, so its presence means
// the enrollment is complete.
func (d *Dir) SaveEnrollment(id Identity, caDER, certDER []byte) error {
	if err := WriteFileAtomic(d.file(CAFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644); err != nil {
		return fmt.Errorf("storing CA certificate: %w", err)
	}
	if err := WriteFileAtomic(d.file(CertFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER}), 0o644); err != nil {
		return fmt.Errorf("storing node certificate: %w", err)
	}
	return d.SaveIdentity(id)
}

// SaveIdentity stores id atomically as identity.json.
func (d *Dir) SaveIdentity(id Identity) error {
	b, err := json.MarshalIndent(id, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding identity: %w", err)
	}
	if err := WriteFileAtomic(d.file(IdentityFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("storing identity: %w", err)
	}
	return nil
}

// Identity loads identity.json. It returns an error wrapping ErrNotEnrolled when the
// file does not exist.
func (d *Dir) Identity() (Identity, error) {
	var id Identity
	b, err := os.ReadFile(d.file(IdentityFile))
	if errors.Is(err, fs.ErrNotExist) {
		return id, fmt.Errorf("%w: no %s in %s", ErrNotEnrolled, IdentityFile, d.path)
	}
	if err != nil {
		return id, fmt.Errorf("reading identity: %w", err)
	}
	if err := json.Unmarshal(b, &id); err != nil {
		return id, fmt.Errorf("parsing %s: %w", d.file(IdentityFile), err)
	}
	if id.NodeName == "" {
		return id, fmt.Errorf("parsing %s: empty node_name", d.file(IdentityFile))
	}
	return id, nil
}

// ClientCertificate loads the node certificate with the TLS key, for mutual TLS,
// and the CA certificate as a pool, for verifying the controller.
func (d *Dir) ClientCertificate() (tls.Certificate, *x509.CertPool, error) {
	cert, err := tls.LoadX509KeyPair(d.file(CertFile), d.file(TLSKeyFile))
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("loading node certificate: %w", err)
	}
	caPEM, err := os.ReadFile(d.file(CAFile))
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("loading CA certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return tls.Certificate{}, nil, fmt.Errorf("loading CA certificate: no certificate in %s", d.file(CAFile))
	}
	return cert, pool, nil
}

// SaveNetmap stores nm atomically (deterministic protobuf encoding, fsync, rename).
func (d *Dir) SaveNetmap(nm *segmeshv1.Netmap) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(nm)
	if err != nil {
		return fmt.Errorf("encoding netmap: %w", err)
	}
	if err := WriteFileAtomic(d.file(NetmapFile), b, 0o600); err != nil {
		return fmt.Errorf("storing netmap: %w", err)
	}
	return nil
}

// Netmap loads the stored netmap. It returns an error wrapping ErrNoNetmap when
// there is none, and a decoding error when the file is corrupt; it does not verify
// the netmap's hash or contents.
func (d *Dir) Netmap() (*segmeshv1.Netmap, error) {
	b, err := os.ReadFile(d.file(NetmapFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrNoNetmap
	}
	if err != nil {
		return nil, fmt.Errorf("reading stored netmap: %w", err)
	}
	nm := &segmeshv1.Netmap{}
	if err := proto.Unmarshal(b, nm); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", d.file(NetmapFile), err)
	}
	return nm, nil
}

// WriteFileAtomic replaces path with data: it writes a temporary file in the same
// directory with the given mode, fsyncs it, renames it over path and fsyncs the
// directory. Readers see either the old or the new content.
func WriteFileAtomic(path string, data []byte, mode fs.FileMode) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = f.Chmod(mode); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("renaming %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	defer d.Close()
	if err = d.Sync(); err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	return nil
}
