package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Underlay addressing of every lab.
var (
	// UnderlayPrefix is the underlay subnet on the lab bridge (TEST-NET-1, RFC 5737).
	UnderlayPrefix = netip.MustParsePrefix("192.0.2.0/24")
	// ControllerAddr is the underlay address Mesh gives the controller host.
	ControllerAddr = netip.MustParseAddr("192.0.2.1")
	// FirstNodeAddr is the underlay address of the first node host; later ones count up.
	FirstNodeAddr = netip.MustParseAddr("192.0.2.11")
)

// nsPrefix starts every namespace name a lab creates.
const nsPrefix = "smlab-"

// DefaultStopTimeout is how long Close waits after SIGTERM before it sends SIGKILL.
const DefaultStopTimeout = 5 * time.Second

// Options configure a Lab. The zero value is usable.
type Options struct {
	// Dir receives logs and per-host state. Empty means a new temporary directory,
	// which Close removes unless KeepDir is set.
	Dir     string
	KeepDir bool
	// Logger receives progress messages; nil discards them.
	Logger *slog.Logger
	// StopTimeout is how long Close waits after SIGTERM before SIGKILL;
	// 0 means DefaultStopTimeout.
	StopTimeout time.Duration
}

// Lab is a set of network namespaces and processes; see the package doc.
// Its methods are safe for concurrent use.
type Lab struct {
	// ID is the random id in every namespace and interface name (4 lowercase
	// alphanumerics).
	ID string
	// Dir holds logs ("<host>/<process>.log") and per-host state.
	Dir string

	log         *slog.Logger
	removeDir   bool
	stopTimeout time.Duration
	underlayNS  string

	mu         sync.Mutex
	hosts      []*Host
	nats       []*NAT
	namespaces []string   // created, in creation order
	resources  []resource // links and nftables tables created, in creation order
	procs      []*Process
	hooks      []func(context.Context) error
	uapiNames  []string // interface names whose UAPI socket Close removes
	closing    bool

	closeOnce sync.Once
	closeErr  error
}

// Host is one network namespace attached to the lab's underlay: to the public
// bridge, or to the private side of a NAT router (see NAT).
type Host struct {
	// Name is the lab-local host name ("web-1").
	Name string
	// Namespace is the network namespace name ("smlab-<id>-web-1").
	Namespace string
	// Addr is the host's underlay address on eth0: a private address behind a
	// NAT. Renumber and MoveTo change it; code that runs concurrently with them
	// reads Underlay instead.
	Addr netip.Addr
	// Index numbers hosts from 1 in creation order.
	Index int
	// Dir is the host's directory under Lab.Dir.
	Dir string

	lab *Lab
	// nat is the NAT the host sits behind (nil: the public underlay) and public
	// its 1:1 public address; both guarded by lab.mu.
	nat    *NAT
	public netip.Addr
	// moveMu serialises Renumber and MoveTo of this host.
	moveMu sync.Mutex
}

// New creates an empty lab: its directory and the underlay namespace with its bridge.
// On error everything already created is removed.
func New(ctx context.Context, opts Options) (*Lab, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("the segmesh lab needs root (network namespaces, veth, TUN, nftables)")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l := &Lab{log: log, stopTimeout: opts.StopTimeout}
	if l.stopTimeout <= 0 {
		l.stopTimeout = DefaultStopTimeout
	}
	id, err := newID()
	if err != nil {
		return nil, err
	}
	l.ID = id
	l.Dir = opts.Dir
	if l.Dir == "" {
		d, err := os.MkdirTemp("", "segmesh-lab-"+id+"-")
		if err != nil {
			return nil, fmt.Errorf("creating lab directory: %w", err)
		}
		l.Dir = d
		l.removeDir = !opts.KeepDir
	} else if err := os.MkdirAll(l.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating lab directory: %w", err)
	}
	l.underlayNS = nsPrefix + id + "-ul"
	if err := l.addNamespace(ctx, l.underlayNS); err != nil {
		l.Close()
		return nil, err
	}
	if err := l.addLink(ctx, l.underlayNS, "br0", "type", "bridge"); err != nil {
		l.Close()
		return nil, err
	}
	if err := l.ip(ctx, "-n", l.underlayNS, "link", "set", "br0", "up"); err != nil {
		l.Close()
		return nil, err
	}
	log.Info("lab created", "id", id, "dir", l.Dir, "underlay", l.underlayNS)
	return l, nil
}

// newID returns 4 random lowercase alphanumerics that no existing lab uses.
func newID() (string, error) {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	for range 100 {
		var b [4]byte
		if _, err := rand.Read(b[:]); err != nil {
			return "", fmt.Errorf("generating lab id: %w", err)
		}
		for i := range b {
			b[i] = alphabet[int(b[i])%len(alphabet)]
		}
		id := string(b[:])
		// Neither a namespace nor a UAPI socket of another lab may use the id.
		nsUsed, _ := filepath.Glob("/run/netns/" + nsPrefix + id + "-*")
		sockUsed, _ := filepath.Glob("/var/run/wireguard/sm" + id + "w*.sock")
		if len(nsUsed) == 0 && len(sockUsed) == 0 {
			return id, nil
		}
	}
	return "", errors.New("generating lab id: no free id after 100 attempts")
}

// InterfaceName is the unique overlay interface name for the host with index n:
// "sm<id>w<n>".
func (l *Lab) InterfaceName(n int) string {
	return fmt.Sprintf("sm%sw%d", l.ID, n)
}

// ReserveInterface records an interface name whose wireguard-go UAPI socket
// (/var/run/wireguard/NAME.sock) Close removes if a killed process left it behind.
func (l *Lab) ReserveInterface(name string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.uapiNames = append(l.uapiNames, name)
}

// AddHost creates the namespace "smlab-<id>-<name>", connects its eth0 to the
// public underlay bridge with address addr/24, brings lo up and enables IPv6.
// The host has no default route: everything it reaches is on the bridge.
func (l *Lab) AddHost(ctx context.Context, name string, addr netip.Addr) (*Host, error) {
	return l.addHost(ctx, name, nil, addr)
}

// addHost creates a host on the public underlay (nat == nil) or behind nat; an
// invalid addr behind a NAT means the next free private address.
func (l *Lab) addHost(ctx context.Context, name string, nat *NAT, addr netip.Addr) (*Host, error) {
	l.mu.Lock()
	if l.closing {
		l.mu.Unlock()
		return nil, errors.New("adding host: lab is closed")
	}
	for _, h := range l.hosts {
		if h.Name == name {
			l.mu.Unlock()
			return nil, fmt.Errorf("adding host %s: name already used by host %s", name, h.Name)
		}
	}
	h := &Host{
		Name:      name,
		Namespace: nsPrefix + l.ID + "-" + name,
		Index:     len(l.hosts) + 1,
		Dir:       filepath.Join(l.Dir, name),
		lab:       l,
	}
	if err := l.placeLocked(h, nat, addr); err != nil {
		l.mu.Unlock()
		return nil, fmt.Errorf("adding host %s: %w", name, err)
	}
	l.hosts = append(l.hosts, h)
	under := h.underlayLocked()
	l.mu.Unlock()

	if err := os.MkdirAll(h.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("adding host %s: %w", name, err)
	}
	if err := l.addNamespace(ctx, h.Namespace); err != nil {
		return nil, fmt.Errorf("adding host %s: %w", name, err)
	}
	// The host's eth0 is one end of a veth pair; the other end, v<index>, is a
	// port of the bridge of the host's network (br0 in the underlay namespace,
	// lan0 in a NAT router's namespace). MoveTo moves that end.
	port := h.port()
	brNS, bridge := l.bridgeOf(nat)
	if err := l.addLink(ctx, brNS, port, "type", "veth", "peer", "name", "eth0", "netns", h.Namespace); err != nil {
		return nil, fmt.Errorf("adding host %s: %w", name, err)
	}
	steps := [][]string{
		{"-n", brNS, "link", "set", port, "master", bridge, "up"},
		{"-n", h.Namespace, "addr", "add", under.Prefix.String(), "dev", "eth0"},
		{"-n", h.Namespace, "link", "set", "eth0", "up"},
	}
	if under.Gateway.IsValid() {
		steps = append(steps, []string{"-n", h.Namespace, "route", "add", "default", "via", under.Gateway.String(), "dev", "eth0"})
	}
	for _, args := range steps {
		if err := l.ip(ctx, args...); err != nil {
			return nil, fmt.Errorf("adding host %s: %w", name, err)
		}
	}
	if nat != nil && nat.Kind == NATOneToOne {
		if err := nat.apply(ctx); err != nil {
			return nil, fmt.Errorf("adding host %s: %w", name, err)
		}
	}
	l.log.Debug("host added", "host", name, "netns", h.Namespace, "addr", under.Addr, "nat", natName(nat), "public", under.Public)
	return h, nil
}

// addNamespace creates a namespace, records it for Close, brings lo up and enables IPv6.
func (l *Lab) addNamespace(ctx context.Context, ns string) error {
	l.mu.Lock()
	if slices.Contains(l.namespaces, ns) {
		l.mu.Unlock()
		return fmt.Errorf("creating namespace %s: the lab already has it (choose another host or NAT name)", ns)
	}
	l.mu.Unlock()
	if err := l.ip(ctx, "netns", "add", ns); err != nil {
		return err
	}
	l.mu.Lock()
	l.namespaces = append(l.namespaces, ns)
	l.mu.Unlock()
	if err := l.ip(ctx, "-n", ns, "link", "set", "lo", "up"); err != nil {
		return err
	}
	_, err := runCmd(ctx, "ip", "netns", "exec", ns, "sysctl", "-qw",
		"net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0")
	if err != nil {
		return fmt.Errorf("enabling IPv6 in %s: %w", ns, err)
	}
	return nil
}

// Host returns the host called name, or nil.
func (l *Lab) Host(name string) *Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, h := range l.hosts {
		if h.Name == name {
			return h
		}
	}
	return nil
}

// Namespaces returns the names of the namespaces the lab created and still owns.
func (l *Lab) Namespaces() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.namespaces...)
}

// OnClose registers fn to run during Close after every process has stopped and
// before the namespaces are deleted. Hooks run in reverse registration order;
// their errors are joined into Close's error.
func (l *Lab) OnClose(fn func(ctx context.Context) error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.hooks = append(l.hooks, fn)
}

// Exec runs args in the named host's namespace and returns its standard output;
// see Host.Exec.
func (l *Lab) Exec(ctx context.Context, host string, args ...string) (string, error) {
	h := l.Host(host)
	if h == nil {
		return "", fmt.Errorf("exec in host %s: no such host", host)
	}
	return h.Exec(ctx, args...)
}

// Close stops every process the lab started (SIGTERM to its process group, SIGKILL
// after Options.StopTimeout), runs the OnClose hooks, deletes by name every link
// (bridges, veths) and nftables table it created (newest first; one already gone
// is no error), then every namespace it created,
// removes leftover UAPI sockets of its interfaces and, for a temporary directory,
// the directory. It returns every error it met, joined. Calling it again (also
// concurrently) waits for the first call and returns the same error.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() { l.closeErr = l.close() })
	return l.closeErr
}

func (l *Lab) close() error {
	l.mu.Lock()
	l.closing = true
	procs := append([]*Process(nil), l.procs...)
	hooks := append([]func(context.Context) error(nil), l.hooks...)
	namespaces := append([]string(nil), l.namespaces...)
	resources := append([]resource(nil), l.resources...)
	uapi := append([]string(nil), l.uapiNames...)
	l.mu.Unlock()

	var errs []error
	stopAll(procs, l.stopTimeout)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := len(hooks) - 1; i >= 0; i-- {
		if err := hooks[i](ctx); err != nil {
			errs = append(errs, err)
		}
	}
	for i := len(resources) - 1; i >= 0; i-- {
		if err := l.deleteResource(ctx, resources[i]); err != nil {
			errs = append(errs, err)
		}
	}
	// Host namespaces first (which also removes their veth peers), the underlay last.
	for i := len(namespaces) - 1; i >= 0; i-- {
		if err := l.ip(ctx, "netns", "del", namespaces[i]); err != nil {
			errs = append(errs, err)
			continue
		}
		l.mu.Lock()
		l.namespaces = remove(l.namespaces, namespaces[i])
		l.mu.Unlock()
	}
	for _, name := range uapi {
		p := filepath.Join("/var/run/wireguard", name+".sock")
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("removing UAPI socket: %w", err))
		}
	}
	if l.removeDir {
		if err := os.RemoveAll(l.Dir); err != nil {
			errs = append(errs, fmt.Errorf("removing lab directory: %w", err))
		}
	}
	l.log.Info("lab removed", "id", l.ID, "errors", len(errs))
	return errors.Join(errs...)
}

func remove(list []string, s string) []string {
	out := list[:0]
	for _, x := range list {
		if x != s {
			out = append(out, x)
		}
	}
	return out
}

// ip runs the ip(8) command with args.
func (l *Lab) ip(ctx context.Context, args ...string) error {
	_, err := runCmd(ctx, "ip", args...)
	return err
}

// ExecError is returned when a command exits non-zero or cannot run.
type ExecError struct {
	Args     []string
	ExitCode int // -1 when the command did not run or was killed
	Stdout   string
	Stderr   string
	Err      error
}

func (e *ExecError) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if msg == "" {
		msg = strings.TrimSpace(e.Stdout)
	}
	if msg != "" {
		msg = ": " + msg
	}
	return fmt.Sprintf("running %s: %v%s", strings.Join(e.Args, " "), e.Err, msg)
}

func (e *ExecError) Unwrap() error { return e.Err }

// runCmd runs name with args in its own process group (killed as a group when ctx
// ends) and returns its standard output, or an *ExecError.
func runCmd(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	err := cmd.Run()
	if err != nil {
		e := &ExecError{Args: append([]string{name}, args...), ExitCode: -1, Stdout: stdout.String(), Stderr: stderr.String(), Err: err}
		var xe *exec.ExitError
		if errors.As(err, &xe) && xe.Exited() {
			e.ExitCode = xe.ExitCode()
		}
		if ctx.Err() != nil {
			e.Err = fmt.Errorf("%w (%w)", err, ctx.Err())
		}
		return stdout.String(), e
	}
	return stdout.String(), nil
}

// Exec runs args in the host's namespace (`ip netns exec NS args...`) and returns
// its standard output. A non-zero exit is an *ExecError carrying the exit code and
// both outputs.
func (h *Host) Exec(ctx context.Context, args ...string) (string, error) {
	if len(args) == 0 {
		return "", errors.New("exec: no command")
	}
	return runCmd(ctx, "ip", append([]string{"netns", "exec", h.Namespace}, args...)...)
}

// ReadLog returns the content of a log file of the lab, or a note why it can't.
func ReadLog(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", path, err)
	}
	return string(b)
}

// DumpLogs writes the last lines lines (0: all) of every process log of the lab
// to w, each under a header line naming the host, process and log file.
func (l *Lab) DumpLogs(w io.Writer, lines int) {
	l.mu.Lock()
	procs := append([]*Process(nil), l.procs...)
	l.mu.Unlock()
	for _, p := range procs {
		text := ReadLog(p.LogPath)
		if lines > 0 {
			text = tail(text, lines)
		}
		fmt.Fprintf(w, "----- %s on %s (%s) -----\n%s\n", p.Name, p.Host.Name, p.LogPath, strings.TrimRight(text, "\n"))
	}
}
