package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// serverName is the DNS name in every controller's server certificate.
const serverName = "segmesh-controller"

// controllerProc is one segmesh-controller process this program started, in a
// temporary data directory of its own, listening on a free loopback port.
type controllerProc struct {
	cmd     *exec.Cmd
	dir     string // temporary directory: data/ and controller.log
	logPath string
	url     *url.URL
	tls     *tls.Config
	token   string // the admin bearer token of operator.json
	exited  chan struct{}
	waitErr error
}

// startController starts bin with a fresh data directory on 127.0.0.1:0 and
// returns once the controller answers HTTP requests: operator.json (written at
// first start) holds its URL and CA. On any failure the process is stopped and
// the directory removed; the error includes the end of the controller's log.
func startController(ctx context.Context, bin string, extraArgs []string) (*controllerProc, error) {
	dir, err := os.MkdirTemp("", "unauthload-")
	if err != nil {
		return nil, fmt.Errorf("creating a temporary data directory: %w", err)
	}
	p := &controllerProc{dir: dir, logPath: filepath.Join(dir, "controller.log"), exited: make(chan struct{})}
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
		return nil, fmt.Errorf("starting %s (build it with `go build -o bin/ ./cmd/segmesh-controller`): %w", bin, err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		logf.Close()
		close(p.exited)
	}()
	if err := p.waitReady(ctx, 20*time.Second); err != nil {
		p.stop()
		return nil, err
	}
	return p, nil
}

// pid is the controller's process ID.
func (p *controllerProc) pid() int { return p.cmd.Process.Pid }

// logTail returns the last n lines of the controller's log.
func (p *controllerProc) logTail(n int) string {
	raw, _ := os.ReadFile(p.logPath)
	lines := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// logLines counts the lines the controller has logged so far.
func (p *controllerProc) logLines() int {
	raw, _ := os.ReadFile(p.logPath)
	return bytes.Count(raw, []byte("\n"))
}

// waitReady polls operator.json and then the listener until an HTTP request is
// answered, for at most timeout.
func (p *controllerProc) waitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	credPath := filepath.Join(p.dir, "data", "operator.json")
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var lastErr error
	for {
		select {
		case <-p.exited:
			return fmt.Errorf("controller exited before it was ready (%v); its log:\n%s", p.waitErr, p.logTail(20))
		case <-ctx.Done():
			return fmt.Errorf("controller not ready after %s (last problem: %v); its log:\n%s", timeout, lastErr, p.logTail(20))
		case <-tick.C:
		}
		if p.url == nil {
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
func (p *controllerProc) readCredential(path string) error {
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
	p.url = u
	p.token = cred.Token
	p.tls = &tls.Config{RootCAs: pool, ServerName: serverName, MinVersion: tls.VersionTLS12}
	return nil
}

// probe sends one unauthenticated request; any HTTP answer means ready.
func (p *controllerProc) probe(ctx context.Context) error {
	tr := &http.Transport{TLSClientConfig: p.tls.Clone()}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.url.JoinPath("/segmesh.v1.OperatorService/Status").String(), strings.NewReader("{}"))
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

// stop ends the controller with SIGTERM, then SIGKILL to the PID it started when
// it has not exited within 15 s (its graceful shutdown takes up to 10 s), and
// removes the temporary directory.
func (p *controllerProc) stop() {
	defer os.RemoveAll(p.dir)
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

// procMem is what /proc/PID/status says about a process's memory, in bytes.
type procMem struct {
	RSS int64 // VmRSS: resident now
	HWM int64 // VmHWM: peak resident since start or the last reset
}

// parseStatus extracts VmRSS and VmHWM from the text of /proc/PID/status
// ("VmRSS:\t  13568 kB").
func parseStatus(status []byte) (procMem, error) {
	var m procMem
	var seen int
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok || (key != "VmRSS" && key != "VmHWM") {
			continue
		}
		f := strings.Fields(val)
		if len(f) != 2 || f[1] != "kB" {
			return procMem{}, fmt.Errorf("%s: unexpected value %q (want \"N kB\")", key, val)
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return procMem{}, fmt.Errorf("%s: %w", key, err)
		}
		if key == "VmRSS" {
			m.RSS = kb << 10
		} else {
			m.HWM = kb << 10
		}
		seen++
	}
	if seen != 2 {
		return procMem{}, errors.New("VmRSS or VmHWM missing (a kernel thread, or the process exited)")
	}
	return m, nil
}

// readMem reads /proc/PID/status.
func readMem(pid int) (procMem, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return procMem{}, err
	}
	return parseStatus(raw)
}

// resetHWM sets the process's VmHWM to its current RSS (Linux ≥ 4.0,
// proc(5) "clear_refs": writing 5 resets the peak resident set size).
func resetHWM(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat; it is
// 100 on every Linux architecture Go supports.
const clockTicks = 100

// parseStatCPU returns utime+stime from the text of /proc/PID/stat (fields 14
// and 15, counted after the parenthesised command name, which may hold spaces).
func parseStatCPU(stat []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("no ')' after the command name")
	}
	f := strings.Fields(string(stat[i+1:]))
	// f[0] is field 3 (state), so field n is f[n-3].
	if len(f) < 13 {
		return 0, fmt.Errorf("%d fields after the command name, want at least 13", len(f))
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("utime/stime %q: %w", s, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}

// readCPU reads the process's CPU time (user+system) so far.
func readCPU(pid int) (time.Duration, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(raw)
}

// sampler records the largest VmRSS of a process, read every interval, until
// stopped.
type sampler struct {
	stopc   chan struct{}
	done    chan struct{}
	mu      sync.Mutex
	peak    int64
	samples int
}

func startSampler(pid int, interval time.Duration) *sampler {
	s := &sampler{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			if m, err := readMem(pid); err == nil {
				s.mu.Lock()
				s.peak = max(s.peak, m.RSS)
				s.samples++
				s.mu.Unlock()
			}
			select {
			case <-s.stopc:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// stop ends sampling and returns the peak VmRSS in bytes and the sample count.
func (s *sampler) stop() (peak int64, samples int) {
	close(s.stopc)
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak, s.samples
}
