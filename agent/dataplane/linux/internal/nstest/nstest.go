// Package nstest creates throwaway network namespaces for kernel tests of the Linux
// dataplane. Namespaces are named "smdp-<random>", interfaces "smdp<random4>", and
// everything is removed in t.Cleanup.
package nstest

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"segmesh/agent/dataplane/linux/internal/nsutil"
)

// NS is a named network namespace created for one test.
type NS struct {
	Name   string
	Handle netns.NsHandle
}

// RequireRoot skips t unless the test runs as root (netns, TUN and nftables need it).
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces, TUN and nftables")
	}
}

func random(n int) string {
	b := make([]byte, (n+1)/2)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)[:n]
}

// IfaceName returns a machine-wide unique-enough interface name "smdp<4 hex>" whose
// WireGuard UAPI socket does not exist yet.
func IfaceName(t testing.TB) string {
	t.Helper()
	for range 100 {
		name := "smdp" + random(4)
		if _, err := os.Stat("/var/run/wireguard/" + name + ".sock"); os.IsNotExist(err) {
			if _, err := netlink.LinkByName(name); err != nil {
				return name
			}
		}
	}
	t.Fatal("no free interface name")
	return ""
}

// New creates namespace "smdp-<random>" with loopback up; t.Cleanup deletes it.
func New(t testing.TB) NS {
	t.Helper()
	RequireRoot(t)
	name := "smdp-" + random(8)
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("getting current netns: %v", err)
	}
	h, err := netns.NewNamed(name) // switches this thread into the new namespace
	if serr := netns.Set(orig); serr != nil {
		t.Fatalf("restoring netns: %v", serr) // thread stays locked and is discarded
	}
	orig.Close()
	runtime.UnlockOSThread()
	if err != nil {
		t.Fatalf("creating netns %s: %v", name, err)
	}
	ns := NS{Name: name, Handle: h}
	t.Cleanup(func() {
		h.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("deleting netns %s: %v", name, err)
		}
	})
	ns.Do(t, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	return ns
}

// Do runs fn in the namespace and fails t on error.
func (n NS) Do(t testing.TB, fn func() error) {
	t.Helper()
	if err := nsutil.Do(n.Handle, fn); err != nil {
		t.Fatalf("in netns %s: %v", n.Name, err)
	}
}

// Run runs fn in the namespace and returns its error.
func (n NS) Run(fn func() error) error { return nsutil.Do(n.Handle, fn) }

// Exec runs a command inside the namespace (ip netns exec) and returns its combined output.
func (n NS) Exec(args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// MustExec is Exec that fails t on error.
func (n NS) MustExec(t testing.TB, args ...string) string {
	t.Helper()
	out, err := n.Exec(args...)
	if err != nil {
		t.Fatalf("%s in %s: %v: %s", strings.Join(args, " "), n.Name, err, out)
	}
	return out
}
