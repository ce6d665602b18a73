package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// Process is a long-running command the lab started in a host's namespace, in its
// own process group, with standard output and error appended to LogPath.
type Process struct {
	// Name identifies the process in logs ("agent", "probe", "controller").
	Name string
	Host *Host
	// Args is the command line run inside the namespace.
	Args []string
	// LogPath is the file that receives the output of every run.
	LogPath string

	mu    sync.Mutex
	cmd   *exec.Cmd
	done  chan struct{}    // closed when the current run has been reaped
	err   error            // Wait's result for the current run
	state *os.ProcessState // the current run's state once reaped
	runs  int
	// registered is set once the lab lists the process for Close.
	registered bool
}

// Start runs args in the host's namespace as a Process called name (the log file
// is <host dir>/<name>.log). The process gets SIGKILL if the lab's own process
// dies, and Close stops it.
func (h *Host) Start(name string, args ...string) (*Process, error) {
	if len(args) == 0 {
		return nil, errors.New("starting process: no command")
	}
	p := &Process{
		Name:    name,
		Host:    h,
		Args:    args,
		LogPath: filepath.Join(h.Dir, name+".log"),
	}
	if err := p.start(); err != nil {
		return nil, err
	}
	return p, nil
}

// start starts a run. It holds the lab's lock across the start so that Close
// either sees the new run or refuses it.
func (p *Process) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done != nil {
		select {
		case <-p.done:
		default:
			return fmt.Errorf("starting %s on %s: already running as pid %d", p.Name, p.Host.Name, p.cmd.Process.Pid)
		}
	}
	logf, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("starting %s on %s: %w", p.Name, p.Host.Name, err)
	}
	defer logf.Close() // the child holds its own copy
	cmd := exec.Command("ip", append([]string{"netns", "exec", p.Host.Namespace}, p.Args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}

	l := p.Host.lab
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closing {
		return fmt.Errorf("starting %s on %s: lab is closed", p.Name, p.Host.Name)
	}
	p.runs++
	fmt.Fprintf(logf, "===== run %d at %s: %q\n", p.runs, time.Now().Format(time.RFC3339Nano), p.Args)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s on %s: %w", p.Name, p.Host.Name, err)
	}
	if !p.registered {
		l.procs = append(l.procs, p)
		p.registered = true
	}
	done := make(chan struct{})
	p.cmd, p.done, p.err, p.state = cmd, done, nil, nil
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.err, p.state = err, cmd.ProcessState
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

// PID is the process id of the current run (`ip netns exec` execs the command, so
// this is the command's own pid); it is also its process group id.
func (p *Process) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd.Process.Pid
}

// Done is closed when the current run has exited.
func (p *Process) Done() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.done
}

// Running reports whether the current run has not exited yet.
func (p *Process) Running() bool {
	select {
	case <-p.Done():
		return false
	default:
		return true
	}
}

// Err is the exit status of the current run once it has exited (nil for exit 0,
// an *exec.ExitError otherwise); nil while it runs.
func (p *Process) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// ExitCode is the exit code of the finished current run, or -1 while it runs or
// when a signal ended it.
func (p *Process) ExitCode() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state == nil {
		return -1
	}
	return p.state.ExitCode()
}

// Wait waits until the current run exits or ctx ends, and returns Err.
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.Done():
		return p.Err()
	case <-ctx.Done():
		return fmt.Errorf("waiting for %s on %s to exit: %w", p.Name, p.Host.Name, ctx.Err())
	}
}

// Signal sends sig to the process group of the current run if it is still running.
func (p *Process) Signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.done:
		return nil
	default:
	}
	if err := syscall.Kill(-p.cmd.Process.Pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("signalling %s on %s (pgid %d): %w", p.Name, p.Host.Name, p.cmd.Process.Pid, err)
	}
	return nil
}

// Kill sends SIGKILL to the process group and waits until the process is reaped.
func (p *Process) Kill() error {
	if err := p.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	<-p.Done()
	return nil
}

// Stop sends SIGTERM, waits up to timeout, then sends SIGKILL; it returns once the
// process is reaped.
func (p *Process) Stop(timeout time.Duration) error {
	if err := p.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case <-p.Done():
		return nil
	case <-time.After(timeout):
	}
	return p.Kill()
}

// Restart starts the process again with the same arguments; the previous run must
// have exited (use Kill or Stop first).
func (p *Process) Restart() error {
	return p.start()
}

// Log returns the process's log file content.
func (p *Process) Log() string { return ReadLog(p.LogPath) }

// stopAll sends SIGTERM to every running process, waits up to timeout for all of
// them, then SIGKILLs the rest and waits for them to be reaped.
func stopAll(procs []*Process, timeout time.Duration) {
	for _, p := range procs {
		_ = p.Signal(syscall.SIGTERM)
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	expired := false
	for _, p := range procs {
		if !expired {
			select {
			case <-p.Done():
				continue
			case <-timer.C:
				expired = true
			}
		}
		_ = p.Kill()
	}
}
