package linux

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"segmesh/agent/dataplane/linux/internal/nstest"
	"segmesh/policy"
)

// lockPathOf returns the lock file path of ns and its description in errors.
func lockPathOf(t *testing.T, ns nstest.NS) (path, desc string) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(ns.Handle), &st); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(LockDir, fmt.Sprintf("netns-%d.lock", st.Ino)), fmt.Sprintf("%s net:[%d]", ns.Name, st.Ino)
}

// newIn calls New in ns.
func newIn(ns nstest.NS, iface string) (*Dataplane, error) {
	var dp *Dataplane
	err := ns.Run(func() (err error) {
		dp, err = New(Options{Interface: iface, ForceUserspace: true})
		return err
	})
	return dp, err
}

// wantBusy checks that err is the NamespaceBusyError naming pid and iface for ns.
func wantBusy(t *testing.T, err error, ns nstest.NS, pid int, iface string) {
	t.Helper()
	_, desc := lockPathOf(t, ns)
	want := fmt.Sprintf("another segmesh agent (pid %d) already manages network namespace %s (interface %s); stop it first", pid, desc, iface)
	var busy *NamespaceBusyError
	if !errors.As(err, &busy) || err.Error() != want {
		t.Fatalf("error = %v, want a *NamespaceBusyError %q", err, want)
	}
	if busy.PID != pid || busy.Interface != iface {
		t.Errorf("error fields = %+v, want pid %d interface %s", busy, pid, iface)
	}
}

// TestNamespaceLock checks that one Dataplane at a time manages a namespace, in one
// process, and that Down and Apply refuse once another holder took the lock file.
func TestNamespaceLock(t *testing.T) {
	ns := nstest.New(t)
	n := newNode(t, ns, netip.MustParseAddr("192.0.2.1"), 1)
	n.apply(t, n.state(policy.Filter{}))
	path, _ := lockPathOf(t, ns)
	if b, err := os.ReadFile(path); err != nil || string(b) != fmt.Sprintf("%d\n%s\n", os.Getpid(), n.iface) {
		t.Fatalf("lock file %s = %q, %v; want pid and interface", path, b, err)
	}

	t.Run("second New in the namespace fails", func(t *testing.T) {
		for _, iface := range []string{n.iface, nstest.IfaceName(t)} {
			dp, err := newIn(ns, iface)
			if err == nil {
				dp.Close()
			}
			wantBusy(t, err, ns, os.Getpid(), n.iface)
		}
	})

	t.Run("New in another namespace succeeds", func(t *testing.T) {
		other := nstest.New(t)
		dp, err := newIn(other, nstest.IfaceName(t))
		if err != nil {
			t.Fatal(err)
		}
		dp.Close()
	})

	// Someone removed the lock file and another agent locked a new one: this
	// Dataplane no longer owns the namespace and must not touch it.
	t.Run("Down and Apply refuse while another holder has the lock file", func(t *testing.T) {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		other, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer other.Close()
		if err := unix.Flock(int(other.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			t.Fatal(err)
		}
		if _, err := other.WriteString("4242\nother0\n"); err != nil {
			t.Fatal(err)
		}
		wantBusy(t, n.dp.Down(context.Background()), ns, 4242, "other0")
		wantBusy(t, n.dp.Apply(context.Background(), n.state(policy.Filter{})), ns, 4242, "other0")
		ns.MustExec(t, "ip", "link", "show", n.iface)
		ns.MustExec(t, "nft", "list", "table", "inet", "segmesh")

		// The other holder goes away (its file stays): Down takes the lock again.
		other.Close()
		if err := n.dp.Down(context.Background()); err != nil {
			t.Fatalf("Down after the other holder left: %v", err)
		}
		if b, err := os.ReadFile(path); err != nil || !strings.HasPrefix(string(b), fmt.Sprintf("%d\n", os.Getpid())) {
			t.Errorf("lock file after retaking = %q, %v; want this process's pid", b, err)
		}
	})

	t.Run("Close releases the lock", func(t *testing.T) {
		if err := n.dp.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Errorf("lock file after Close: %v", err)
		}
		dp, err := newIn(ns, n.iface)
		if err != nil {
			t.Fatalf("New after Close: %v", err)
		}
		if err := dp.Close(); err != nil {
			t.Fatal(err)
		}
	})
}

// lockHelperEnv names the interface TestLockHelperProcess locks its namespace for.
const lockHelperEnv = "SEGMESH_TEST_LOCK_HELPER_IFACE"

// TestLockHelperProcess is not a test: TestNamespaceLockAcrossProcesses runs the test
// binary with it as another agent process that holds the namespace until killed.
func TestLockHelperProcess(t *testing.T) {
	iface := os.Getenv(lockHelperEnv)
	if iface == "" {
		t.Skip("helper process of TestNamespaceLockAcrossProcesses")
	}
	dp, err := New(Options{Interface: iface, ForceUserspace: true})
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	defer dp.Close()
	fmt.Println("locked")
	_, _ = io.Copy(io.Discard, os.Stdin) // hold the lock until stdin closes or a signal kills us
}

// TestNamespaceLockAcrossProcesses runs another process holding a namespace: New
// there fails naming that process, and succeeds once it was killed with SIGKILL
// (the kernel releases the lock of a dead process).
func TestNamespaceLockAcrossProcesses(t *testing.T) {
	ns := nstest.New(t)
	iface := nstest.IfaceName(t)
	cmd := exec.Command("ip", "netns", "exec", ns.Name, os.Args[0], "-test.run=^TestLockHelperProcess$")
	cmd.Env = append(os.Environ(), lockHelperEnv+"="+iface)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid // `ip netns exec` execs the command: the helper's own pid
	firstLine := make(chan string, 1)
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		sc := bufio.NewScanner(stdout)
		line := ""
		if sc.Scan() {
			line = sc.Text()
		}
		firstLine <- line
		_, _ = io.Copy(io.Discard, stdout)
		_ = cmd.Wait()
	}()
	t.Cleanup(func() {
		stdin.Close()
		_ = cmd.Process.Kill() // by the pid it recorded; an error means it already exited
		<-exited
	})
	select {
	case l := <-firstLine:
		if l != "locked" {
			t.Fatalf("helper process said %q, want \"locked\"", l)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("helper process did not lock the namespace")
	}

	dp, err := newIn(ns, nstest.IfaceName(t))
	if err == nil {
		dp.Close()
	}
	wantBusy(t, err, ns, pid, iface)

	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-exited
	dp, err = newIn(ns, iface)
	if err != nil {
		t.Fatalf("New after the holder was killed: %v", err)
	}
	dp.Close()
}
