// Package ctlproc starts a real segmesh-controller process on loopback for the
// benchmark drivers under hack/: a temporary data directory, a free port, and the
// admin operator credential (operator.json) the controller writes at first start.
package ctlproc

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// ServerName is the DNS name in every controller's server certificate.
const ServerName = "segmesh-controller"

// Proc is one segmesh-controller process started by Start, in a temporary data
// directory of its own, listening on a free loopback port.
type Proc struct {
	// URL is the controller's https URL, from operator.json.
	URL *url.URL
	// TLS verifies the controller's server certificate (its CA, ServerName).
	TLS *tls.Config
	// CAPEM is the controller CA certificate, PEM.
	CAPEM []byte
	// Token is the admin bearer token of operator.json.
	Token string
	// Dir is the temporary directory: data/ and controller.log.
	Dir string

	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	waitErr error
}

// Start starts bin with a fresh data directory on 127.0.0.1:0 (plus extraArgs)
// and returns once the controller answers HTTP requests. prefix names the
// temporary directory. On any failure the process is stopped and the directory
// removed; the error includes the end of the controller's log.
func Start(ctx context.Context, bin, prefix string, extraArgs []string) (*Proc, error) {
	dir, err := os.MkdirTemp("", prefix+"-")
	if err != nil {
		return nil, fmt.Errorf("creating a temporary data directory: %w", err)
	}
	p := &Proc{Dir: dir, logPath: filepath.Join(dir, "controller.log"), exited: make(chan struct{})}
	logf, err := os.Create(p.logPath)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("creating the controller log: %w", err)
	}
	args := append([]string{"--data-dir", filepath.Join(dir, "data"), "--listen", "127.0.0.1:0"}, extraArgs...)
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	// The controller dies with this program even when it is killed.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		logf.Close()
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("starting %s (build it with `make build`): %w", bin, err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		logf.Close()
		close(p.exited)
	}()
	if err := p.waitReady(ctx, 20*time.Second); err != nil {
		p.Stop()
		return nil, err
	}
	return p, nil
}

// PID is the controller's process ID.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// LogTail returns the last n lines of the controller's log.
func (p *Proc) LogTail(n int) string {
	raw, _ := os.ReadFile(p.logPath)
	lines := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// LogLines counts the lines the controller has logged so far.
func (p *Proc) LogLines() int {
	raw, _ := os.ReadFile(p.logPath)
	return bytes.Count(raw, []byte("\n"))
}

// Exited is closed when the process has exited.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// waitReady polls operator.json and then the listener until an HTTP request is
// answered, for at most timeout.
func (p *Proc) waitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	credPath := filepath.Join(p.Dir, "data", "operator.json")
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var lastErr error
	for {
		select {
		case <-p.exited:
			return fmt.Errorf("controller exited before it was ready (%v); its log:\n%s", p.waitErr, p.LogTail(20))
		case <-ctx.Done():
			return fmt.Errorf("controller not ready after %s (last problem: %v); its log:\n%s", timeout, lastErr, p.LogTail(20))
		case <-tick.C:
		}
		if p.URL == nil {
			if lastErr = p.readCredential(credPath); lastErr != nil {
				continue
			}
		}
		lastErr = p.probe(ctx)
		if lastErr == nil {
			return nil
		}
	}
}

// readCredential loads the controller URL, CA and admin token from operator.json
// and checks that the URL is on loopback.
func (p *Proc) readCredential(path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var cred struct {
		Controller string `json:"controller"`
		CAPEM      string `json:"ca_pem"`
		Token      string `json:"token"`
	}
	if err := json.Unmarshal(raw, &cred); err != nil {
		return fmt.Errorf("reading %s: %w", path, err) // maybe half written
	}
	u, err := url.Parse(cred.Controller)
	if err != nil {
		return fmt.Errorf("controller URL %q in %s: %w", cred.Controller, path, err)
	}
	if ip := net.ParseIP(u.Hostname()); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("controller URL %q in %s is not on loopback", cred.Controller, path)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(cred.CAPEM)) {
		return fmt.Errorf("ca_pem in %s holds no certificate", path)
	}
	p.URL = u
	p.Token = cred.Token
	p.CAPEM = []byte(cred.CAPEM)
	p.TLS = &tls.Config{RootCAs: pool, ServerName: ServerName, MinVersion: tls.VersionTLS12}
	return nil
}

// probe sends one unauthenticated request; any HTTP answer means ready.
func (p *Proc) probe(ctx context.Context) error {
	tr := &http.Transport{TLSClientConfig: p.TLS.Clone()}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.URL.JoinPath("/segmesh.v1.OperatorService/Status").String(), strings.NewReader("{}"))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Transport: tr, Timeout: time.Second}).Do(req)
	if err != nil {
		return err
	}
	return resp.Body.Close()
}

// Stop ends the controller with SIGTERM, then SIGKILL to the PID it started when
// it has not exited within 15 s (its graceful shutdown takes up to 10 s), and
// removes the temporary directory.
func (p *Proc) Stop() {
	defer os.RemoveAll(p.Dir)
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}
