// Package statefile owns the agent's state directory: the WireGuard private key, the
// TLS client key and certificates, the enrolled identity and the last netmap.
//
// Layout of the directory (mode 0700; every file in it mode 0600):
//
//	wireguard.key       WireGuard private key, base64 as printed by `wg genkey`
//	wireguard.key.next  only during a key rotation: the new WireGuard key, same format,
//	                    until the controller confirmed it (then renamed over wireguard.key)
//	tls.key             ECDSA P-256 TLS client key, PEM "PRIVATE KEY" (PKCS #8); it also
//	                    signs the node's gossip endpoint claims
//	tls.key.next        only during a certificate renewal: the new TLS key, same format
//	ca.crt              controller CA certificate, PEM
//	node.crt            node client certificate, PEM
//	identity.json       Identity as JSON (the controller URLs: "controller", the one in
//	                    use, and "controllers", every one known; see Identity)
//	netmap.pb           last valid netmap, binary protobuf segmesh.v1.Netmap (a revoked
//	                    node keeps the revoked netmap here, so a restart stays at default deny)
//
// Every file is written atomically (temporary file with mode 0600, fsync, rename,
// fsync of the directory), so a crash leaves either the old or the new content,
// never a mix; no write path takes a mode, so none can write a looser one. Every
// read tightens a file whose mode is looser than 0600 (a file restored from a
// backup, copied, edited by hand or written by an older agent) and logs it.
//
// A certificate renewal writes tls.key.next, then node.crt, then renames tls.key.next
// over tls.key. RecoverRenewal (which the agent calls at start) finishes a renewal a
// crash interrupted: when node.crt is for the key in tls.key.next it completes the
// rename, otherwise it removes tls.key.next. So tls.key and node.crt always belong
// together.
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
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	"google.golang.org/protobuf/proto"

	"segmesh/api/segmeshv1"
)

// File names inside the state directory.
const (
	WireGuardKeyFile     = "wireguard.key"
	NextWireGuardKeyFile = "wireguard.key.next"
	TLSKeyFile           = "tls.key"
	NextTLSKeyFile       = "tls.key.next"
	CAFile               = "ca.crt"
	CertFile             = "node.crt"
	IdentityFile         = "identity.json"
	NetmapFile           = "netmap.pb"
)

// FileMode is the mode of every file in the state directory.
const FileMode fs.FileMode = 0o600

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
	// Controller is the controller URL in use: the one the agent last connected
	// to, e.g. "https://192.0.2.1:7443"; after a load it is one of Controllers.
	// Agents from before controller failover read and write only this field.
	Controller string `json:"controller"`
	// Controllers are every controller URL the agent knows (the replicas of one
	// fleet), in the order it tries them when the one in use fails; at most 16.
	// Absent in identity files of agents from before controller failover: a load
	// then makes it [Controller].
	Controllers []string `json:"controllers,omitempty"`
	// Interface is the overlay link name.
	Interface string `json:"interface"`
	// ListenPort is the WireGuard UDP port.
	ListenPort int `json:"listen_port"`
	// KeyGeneration is the last WireGuard key rotation generation (Netmap.key_rotation)
	// the agent completed; 0 for none.
	KeyGeneration uint64 `json:"key_generation,omitempty"`
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

// write stores data as name, atomically and with FileMode.
func (d *Dir) write(name string, data []byte) error {
	return writeAtomic(d.file(name), data)
}

// read returns the content of name, first tightening its mode to FileMode when it
// is looser (and logging that). A missing file is an error wrapping fs.ErrNotExist.
func (d *Dir) read(name string) ([]byte, error) {
	p := d.file(name)
	f, err := os.Open(p)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("reading %s: %w", p, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", p, err)
	}
	if perm := st.Mode().Perm(); perm&^FileMode != 0 {
		d.log.Warn("state file was accessible to other users; tightening its mode to 0600", "file", p, "mode", fmt.Sprintf("%04o", uint32(perm)))
		if err := f.Chmod(FileMode); err != nil {
			return nil, fmt.Errorf("setting mode of %s: %w", p, err)
		}
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", p, err)
	}
	return b, nil
}

// WireGuardKey loads the WireGuard private key, generating and storing one on
// first use.
func (d *Dir) WireGuardKey() (wgtypes.Key, error) {
	k, err := d.loadWireGuardKey(WireGuardKeyFile)
	if errors.Is(err, fs.ErrNotExist) {
		if k, err = d.newWireGuardKey(WireGuardKeyFile); err != nil {
			return k, err
		}
		d.log.Info("generated WireGuard key", "public_key", k.PublicKey().String())
	}
	return k, err
}

// NextWireGuardKey returns the pending WireGuard key of a rotation (wireguard.key.next),
// generating and storing one when there is none. created says whether it was just
// generated.
func (d *Dir) NextWireGuardKey() (k wgtypes.Key, created bool, err error) {
	k, err = d.loadWireGuardKey(NextWireGuardKeyFile)
	if errors.Is(err, fs.ErrNotExist) {
		k, err = d.newWireGuardKey(NextWireGuardKeyFile)
		return k, err == nil, err
	}
	return k, false, err
}

// HasNextWireGuardKey reports whether a rotation left a pending WireGuard key.
func (d *Dir) HasNextWireGuardKey() (bool, error) {
	_, err := os.Lstat(d.file(NextWireGuardKeyFile))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("checking %s: %w", d.file(NextWireGuardKeyFile), err)
	}
	return true, nil
}

// CommitWireGuardKey makes the pending key the WireGuard key: it renames
// wireguard.key.next over wireguard.key (and fsyncs the directory) and returns it.
// Errors: no pending key, or a failed rename.
func (d *Dir) CommitWireGuardKey() (wgtypes.Key, error) {
	k, err := d.loadWireGuardKey(NextWireGuardKeyFile)
	if err != nil {
		return k, fmt.Errorf("committing the new WireGuard key: %w", err)
	}
	if err := d.rename(NextWireGuardKeyFile, WireGuardKeyFile); err != nil {
		return k, fmt.Errorf("committing the new WireGuard key: %w", err)
	}
	return k, nil
}

func (d *Dir) loadWireGuardKey(name string) (wgtypes.Key, error) {
	b, err := d.read(name)
	if err != nil {
		return wgtypes.Key{}, err
	}
	k, err := wgtypes.ParseKey(strings.TrimSpace(string(b)))
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("parsing %s: %w", d.file(name), err)
	}
	return k, nil
}

func (d *Dir) newWireGuardKey(name string) (wgtypes.Key, error) {
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("generating WireGuard key: %w", err)
	}
	if err := d.write(name, []byte(k.String()+"\n")); err != nil {
		return wgtypes.Key{}, fmt.Errorf("storing WireGuard key: %w", err)
	}
	return k, nil
}

// TLSKey loads the ECDSA P-256 TLS client key, generating and storing one on first
// use.
func (d *Dir) TLSKey() (*ecdsa.PrivateKey, error) {
	k, err := d.loadTLSKey(TLSKeyFile)
	if errors.Is(err, fs.ErrNotExist) {
		return d.newTLSKey(TLSKeyFile)
	}
	return k, err
}

// NewNextTLSKey generates a fresh ECDSA P-256 key for a certificate renewal and
// stores it as tls.key.next (replacing any earlier one). Finish the renewal with
// CommitCertificate.
func (d *Dir) NewNextTLSKey() (*ecdsa.PrivateKey, error) {
	return d.newTLSKey(NextTLSKeyFile)
}

// CommitCertificate stores certDER (the renewed node certificate, for the key in
// tls.key.next) as node.crt and then renames tls.key.next over tls.key, so that a
// crash at any point leaves a matching key and certificate once RecoverRenewal ran. Errors:
// no tls.key.next, a certificate that is not for its key, or a failed write.
func (d *Dir) CommitCertificate(certDER []byte) error {
	next, err := d.loadTLSKey(NextTLSKeyFile)
	if err != nil {
		return fmt.Errorf("storing renewed certificate: %w", err)
	}
	if ok, err := certForKey(certDER, next); err != nil || !ok {
		return fmt.Errorf("storing renewed certificate: it is not for the key in %s (%v)", d.file(NextTLSKeyFile), err)
	}
	if err := d.write(CertFile, pemCert(certDER)); err != nil {
		return fmt.Errorf("storing renewed certificate: %w", err)
	}
	if err := d.rename(NextTLSKeyFile, TLSKeyFile); err != nil {
		return fmt.Errorf("storing renewed certificate: %w", err)
	}
	return nil
}

// DiscardNextTLSKey removes tls.key.next (a renewal that failed); it is not an
// error when there is none.
func (d *Dir) DiscardNextTLSKey() error {
	if err := os.Remove(d.file(NextTLSKeyFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing %s: %w", d.file(NextTLSKeyFile), err)
	}
	return nil
}

// RecoverRenewal finishes a certificate renewal a crash interrupted, or discards
// it: when tls.key.next exists and node.crt is for its key, it renames tls.key.next
// over tls.key; otherwise (also when tls.key.next is unreadable) it removes
// tls.key.next. Call it only while no renewal runs, i.e. when the agent starts.
func (d *Dir) RecoverRenewal() error {
	next, err := d.loadTLSKey(NextTLSKeyFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	discard := func(reason string) error {
		d.log.Warn("discarding the key of an interrupted certificate renewal", "file", d.file(NextTLSKeyFile), "reason", reason)
		return d.DiscardNextTLSKey()
	}
	if err != nil {
		return discard(err.Error())
	}
	certDER, err := d.certificateDER()
	if err != nil {
		return discard("no usable node certificate: " + err.Error())
	}
	if ok, _ := certForKey(certDER, next); !ok {
		return discard("the renewed certificate was not stored; node.crt still belongs to tls.key")
	}
	if err := d.rename(NextTLSKeyFile, TLSKeyFile); err != nil {
		return fmt.Errorf("finishing an interrupted certificate renewal: %w", err)
	}
	d.log.Info("finished an interrupted certificate renewal: node.crt is for the new key", "file", d.file(TLSKeyFile))
	return nil
}

func (d *Dir) loadTLSKey(name string) (*ecdsa.PrivateKey, error) {
	b, err := d.read(name)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("parsing %s: no PEM PRIVATE KEY block", d.file(name))
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", d.file(name), err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, fmt.Errorf("parsing %s: want an ECDSA P-256 key, got %T", d.file(name), k)
	}
	return ek, nil
}

func (d *Dir) newTLSKey(name string) (*ecdsa.PrivateKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating TLS key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("encoding TLS key: %w", err)
	}
	if err := d.write(name, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})); err != nil {
		return nil, fmt.Errorf("storing TLS key: %w", err)
	}
	return k, nil
}

// certForKey reports whether the certificate certDER certifies k's public key.
func certForKey(certDER []byte, k *ecdsa.PrivateKey) (bool, error) {
	c, err := x509.ParseCertificate(certDER)
	if err != nil {
		return false, err
	}
	pub, ok := c.PublicKey.(*ecdsa.PublicKey)
	return ok && pub.Equal(&k.PublicKey), nil
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// rename renames from over to inside the directory and fsyncs the directory.
func (d *Dir) rename(from, to string) error {
	if err := os.Rename(d.file(from), d.file(to)); err != nil {
		return err
	}
	return syncDir(d.path)
}

// SaveEnrollment stores the CA and node certificates (DER in, PEM on disk) and then
// the identity, each atomically. The identity is written last, so its presence means
// the enrollment is complete.
func (d *Dir) SaveEnrollment(id Identity, caDER, certDER []byte) error {
	if err := d.write(CAFile, pemCert(caDER)); err != nil {
		return fmt.Errorf("storing CA certificate: %w", err)
	}
	if err := d.write(CertFile, pemCert(certDER)); err != nil {
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
	if err := d.write(IdentityFile, append(b, '\n')); err != nil {
		return fmt.Errorf("storing identity: %w", err)
	}
	return nil
}

// Identity loads identity.json. It returns an error wrapping ErrNotEnrolled when the
// file does not exist.
func (d *Dir) Identity() (Identity, error) {
	var id Identity
	b, err := d.read(IdentityFile)
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
	id.migrateControllers()
	return id, nil
}

// migrateControllers makes Controller one of Controllers, as Identity documents:
// a file without "controllers" (an older agent's) gets [Controller]; a Controller
// missing from Controllers (set by hand, or by an older agent after a downgrade)
// goes first, as the one to use; an empty Controller becomes Controllers[0]. It
// does not check the URLs.
func (id *Identity) migrateControllers() {
	switch {
	case id.Controller == "" && len(id.Controllers) > 0:
		id.Controller = id.Controllers[0]
	case id.Controller != "" && !slices.Contains(id.Controllers, id.Controller):
		id.Controllers = append([]string{id.Controller}, id.Controllers...)
	}
}

// certificateDER returns the DER of the certificate in node.crt.
func (d *Dir) certificateDER() ([]byte, error) {
	b, err := d.read(CertFile)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("parsing %s: no PEM CERTIFICATE block", d.file(CertFile))
	}
	return blk.Bytes, nil
}

// ClientCertificate loads the node certificate with the TLS key, for mutual TLS;
// its Leaf is set. Errors: a missing or unreadable file, or a key that does not
// belong to the certificate.
func (d *Dir) ClientCertificate() (tls.Certificate, error) {
	certPEM, err := d.read(CertFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("loading node certificate: %w", err)
	}
	keyPEM, err := d.read(TLSKeyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("loading node certificate: %w", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("loading node certificate %s with key %s: %w", d.file(CertFile), d.file(TLSKeyFile), err)
	}
	return cert, nil
}

// CAPool returns the stored controller CA certificate as a pool, for verifying the
// controller and renewed node certificates.
func (d *Dir) CAPool() (*x509.CertPool, error) {
	caPEM, err := d.read(CAFile)
	if err != nil {
		return nil, fmt.Errorf("loading CA certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("loading CA certificate: no certificate in %s", d.file(CAFile))
	}
	return pool, nil
}

// SaveNetmap stores nm atomically (deterministic protobuf encoding).
func (d *Dir) SaveNetmap(nm *segmeshv1.Netmap) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(nm)
	if err != nil {
		return fmt.Errorf("encoding netmap: %w", err)
	}
	if err := d.write(NetmapFile, b); err != nil {
		return fmt.Errorf("storing netmap: %w", err)
	}
	return nil
}

// RemoveNetmap removes the stored netmap; it is not an error when there is none.
func (d *Dir) RemoveNetmap() error {
	if err := os.Remove(d.file(NetmapFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing stored netmap: %w", err)
	}
	return syncDir(d.path)
}

// Netmap loads the stored netmap. It returns an error wrapping ErrNoNetmap when
// there is none, and a decoding error when the file is corrupt; it does not verify
// the netmap's hash or contents.
func (d *Dir) Netmap() (*segmeshv1.Netmap, error) {
	b, err := d.read(NetmapFile)
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

// writeAtomic replaces path with data: it writes a temporary file in the same
// directory with mode FileMode, fsyncs it, renames it over path and fsyncs the
// directory. Readers see either the old or the new content.
func writeAtomic(path string, data []byte) (err error) {
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
	// CreateTemp already uses 0600; set it explicitly so that the mode never
	// depends on that detail.
	if err = f.Chmod(FileMode); err != nil {
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
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	return nil
}
