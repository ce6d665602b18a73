package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/pflag"

	"segmesh/cmd/internal/daemonconfig"
	"segmesh/controller"
	"segmesh/controller/store/etcdstore"
)

// etcdFlags are the flags that select and configure the store: --store and the
// etcd connection (--etcd-*) with --secret-key-file. The daemon and migrate share them.
type etcdFlags struct {
	store         string
	endpoints     []string
	ca, cert, key string
	prefix        string
	secretKeyFile string
}

func (f *etcdFlags) register(fs *pflag.FlagSet, withStore bool) {
	if withStore {
		fs.StringVar(&f.store, "store", controller.StoreBolt, `where state lives: "bbolt" (DATA_DIR/controller.db, one controller) or "etcd" (several controllers sharing --etcd-endpoints)`)
	}
	fs.StringSliceVar(&f.endpoints, "etcd-endpoints", nil, "etcd client URLs, comma-separated, e.g. https://10.0.0.1:2379,https://10.0.0.2:2379,https://10.0.0.3:2379")
	fs.StringVar(&f.ca, "etcd-ca", "", "PEM file of the CA that signed the etcd servers' certificates (https endpoints; default: the system roots)")
	fs.StringVar(&f.cert, "etcd-cert", "", "PEM client certificate for etcd (with --etcd-key), when etcd requires client certificates")
	fs.StringVar(&f.key, "etcd-key", "", "PEM private key of --etcd-cert")
	fs.StringVar(&f.prefix, "etcd-prefix", etcdstore.DefaultPrefix, "key prefix of this fleet's state in etcd (several fleets may share one cluster)")
	fs.StringVar(&f.secretKeyFile, "secret-key-file", "", "file holding 64 hex digits (32 bytes; create with: openssl rand -hex 32 > FILE; chmod 600 FILE), the same on every controller: it seals the secrets kept in etcd (CA key, gossip key, admin token)")
}

// config checks the flags and returns the etcd store configuration; where names
// the flags in errors through eff.
func (f *etcdFlags) config(eff *daemonconfig.Effective) (etcdstore.Config, error) {
	cfg := etcdstore.Config{Prefix: f.prefix}
	if len(f.endpoints) == 0 {
		return cfg, eff.Errorf("etcd-endpoints", "the etcd store needs its client URLs, e.g. --etcd-endpoints https://10.0.0.1:2379,https://10.0.0.2:2379")
	}
	https := false
	for _, ep := range f.endpoints {
		switch {
		case strings.HasPrefix(ep, "https://"):
			https = true
		case strings.HasPrefix(ep, "http://"):
		default:
			return cfg, eff.Errorf("etcd-endpoints", "%q: want http://HOST:PORT or https://HOST:PORT", ep)
		}
	}
	cfg.Endpoints = f.endpoints
	if !strings.HasPrefix(f.prefix, "/") || !strings.HasSuffix(f.prefix, "/") {
		return cfg, eff.Errorf("etcd-prefix", "%q: want a key prefix that starts and ends with /, e.g. /segmesh/", f.prefix)
	}
	if (f.cert == "") != (f.key == "") {
		return cfg, eff.Errorf("etcd-cert", "--etcd-cert and --etcd-key go together")
	}
	if https || f.ca != "" || f.cert != "" {
		if !https {
			return cfg, eff.Errorf("etcd-endpoints", "--etcd-ca/--etcd-cert are set but no endpoint is https://")
		}
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if f.ca != "" {
			pem, err := os.ReadFile(f.ca)
			if err != nil {
				return cfg, eff.Errorf("etcd-ca", "%v", err)
			}
			tc.RootCAs = x509.NewCertPool()
			if !tc.RootCAs.AppendCertsFromPEM(pem) {
				return cfg, eff.Errorf("etcd-ca", "%s holds no PEM certificate", f.ca)
			}
		}
		if f.cert != "" {
			pair, err := tls.LoadX509KeyPair(f.cert, f.key)
			if err != nil {
				return cfg, eff.Errorf("etcd-cert", "loading the etcd client certificate: %v", err)
			}
			tc.Certificates = []tls.Certificate{pair}
		}
		cfg.TLS = tc
	}
	if f.secretKeyFile == "" {
		return cfg, eff.Errorf("secret-key-file", "the etcd store needs the fleet's secret key file (the same on every controller; create it once with: openssl rand -hex 32 > FILE)")
	}
	key, err := readSecretKey(f.secretKeyFile)
	if err != nil {
		return cfg, eff.Errorf("secret-key-file", "%v", err)
	}
	cfg.SecretKey = key
	return cfg, nil
}

// readSecretKey reads a file of 64 hex digits (surrounding white space allowed)
// and returns the 32 bytes.
func readSecretKey(path string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s is readable by other users (mode %v); chmod 600 it", path, fi.Mode().Perm())
	}
	s := strings.TrimSpace(string(raw))
	key, err := hex.DecodeString(s)
	if err != nil || len(key) != 32 {
		return nil, fmt.Errorf("%s: want 64 hex digits (32 bytes; create with: openssl rand -hex 32 > %s), got %d characters", path, path, len(s))
	}
	return key, nil
}
