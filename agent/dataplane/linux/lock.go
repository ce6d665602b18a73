package linux

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// LockDir holds one lock file per network namespace a Dataplane manages:
// netns-<inode>.lock, where <inode> is the namespace's inode (the number in
// `readlink /proc/self/ns/net`). The holder writes its PID on the first line and
// its interface name on the second.
const LockDir = "/run/segmesh"

// NamespaceBusyError is returned by New, Apply and Down when another Dataplane (in
// this or another process) holds the lock of the network namespace.
type NamespaceBusyError struct {
	// PID of the holder as it wrote it into the lock file; 0 when unknown.
	PID int
	// Namespace describes the network namespace: "NAME net:[INODE]" when it has a
	// name under /run/netns (`ip netns add`), "net:[INODE]" otherwise.
	Namespace string
	// Interface is the holder's overlay interface; "" when unknown.
	Interface string
}

func (e *NamespaceBusyError) Error() string {
	pid, iface := "unknown", e.Interface
	if e.PID > 0 {
		pid = strconv.Itoa(e.PID)
	}
	if iface == "" {
		iface = "unknown"
	}
	return fmt.Sprintf("another segmesh agent (pid %s) already manages network namespace %s (interface %s); stop it first",
		pid, e.Namespace, iface)
}

// nsLock is an exclusive flock(2) on the lock file of one network namespace. The
// kernel releases it when the process dies, so a killed agent leaves no stale lock.
type nsLock struct {
	path  string
	ns    string // description of the namespace for errors
	iface string
	f     *os.File
}

// lockNetNS takes the lock of network namespace ns without blocking and writes this
// process's PID and iface into it. Errors: *NamespaceBusyError when another holder
// has it, or an error creating or locking the file.
func lockNetNS(ns netns.NsHandle, iface string) (*nsLock, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(ns), &st); err != nil {
		return nil, fmt.Errorf("reading network namespace inode: %w", err)
	}
	l := &nsLock{
		path:  filepath.Join(LockDir, fmt.Sprintf("netns-%d.lock", st.Ino)),
		ns:    describeNetNS(st.Dev, st.Ino),
		iface: iface,
	}
	if err := os.MkdirAll(LockDir, 0o755); err != nil {
		return nil, fmt.Errorf("creating lock directory: %w", err)
	}
	f, err := l.acquire()
	if err != nil {
		return nil, err
	}
	l.f = f
	return l, nil
}

// acquire opens, locks and fills the lock file. The file a holder locked must still
// be the one at path (a releasing holder removes it), otherwise it tries again.
func (l *nsLock) acquire() (*os.File, error) {
	for range 10 {
		f, err := os.OpenFile(l.path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("opening lock file: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, l.busy()
			}
			return nil, fmt.Errorf("locking %s: %w", l.path, err)
		}
		if !l.holds(f) {
			f.Close() // removed by a releasing holder after we opened it
			continue
		}
		content := fmt.Sprintf("%d\n%s\n", os.Getpid(), l.iface)
		werr := f.Truncate(0)
		if werr == nil {
			_, werr = f.WriteAt([]byte(content), 0)
		}
		if werr != nil {
			f.Close()
			return nil, fmt.Errorf("writing lock file %s: %w", l.path, werr)
		}
		return f, nil
	}
	return nil, fmt.Errorf("locking %s: the file keeps being replaced", l.path)
}

// holds reports whether f is the file now at l.path.
func (l *nsLock) holds(f *os.File) bool {
	fi, err := f.Stat()
	if err != nil {
		return false
	}
	pi, err := os.Stat(l.path)
	return err == nil && os.SameFile(fi, pi)
}

// busy returns the error naming the holder recorded in the lock file.
func (l *nsLock) busy() error {
	e := &NamespaceBusyError{Namespace: l.ns}
	if b, err := os.ReadFile(l.path); err == nil {
		lines := strings.Split(string(b), "\n")
		e.PID, _ = strconv.Atoi(strings.TrimSpace(lines[0]))
		if len(lines) > 1 {
			e.Interface = strings.TrimSpace(lines[1])
		}
	}
	return e
}

// check verifies that l still holds the namespace's lock: if the lock file was
// removed or replaced behind its back, it takes the lock on the current file again,
// which fails with *NamespaceBusyError when another holder has it.
func (l *nsLock) check() error {
	if l.holds(l.f) {
		return nil
	}
	f, err := l.acquire()
	if err != nil {
		return err
	}
	l.f.Close()
	l.f = f
	return nil
}

// release removes the lock file (if it is still ours) and unlocks it.
func (l *nsLock) release() {
	if l.holds(l.f) {
		_ = os.Remove(l.path)
	}
	_ = l.f.Close()
}

// describeNetNS returns "NAME net:[INODE]" for a namespace named under /run/netns
// (by `ip netns add`), and "net:[INODE]" otherwise.
func describeNetNS(dev, ino uint64) string {
	id := fmt.Sprintf("net:[%d]", ino)
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		return id
	}
	for _, e := range entries {
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/run/netns", e.Name()), &st) == nil && st.Dev == dev && st.Ino == ino {
			return e.Name() + " " + id
		}
	}
	return id
}
