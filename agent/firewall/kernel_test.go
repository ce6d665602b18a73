package firewall_test

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netns"

	"segmesh/agent/dataplane/linux/nft"
	"segmesh/agent/firewall"
)

// anonNS creates an unnamed network namespace held only by the returned handle;
// t.Cleanup closes it, which lets the kernel free it with everything in it.
func anonNS(t *testing.T) netns.NsHandle {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root for network namespaces and nftables (run the tests as root, e.g. sudo make test)")
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatal("needs nft(8): run hack/deps.sh")
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	h, err := netns.New() // switches this thread into the new namespace
	if serr := netns.Set(orig); serr != nil {
		t.Fatalf("restoring netns: %v", serr) // the thread stays locked and is discarded
	}
	orig.Close()
	runtime.UnlockOSThread()
	if err != nil {
		t.Fatalf("creating netns: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// nftIn runs nft(8) with args inside namespace h, feeding it stdin.
func nftIn(t *testing.T, h netns.NsHandle, stdin string, args ...string) string {
	t.Helper()
	cmd := exec.Command("nsenter", append([]string{fmt.Sprintf("--net=/proc/%d/fd/%d", os.Getpid(), int(h)), "nft"}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("nft %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// TestStringMatchesKernel: for every case, the agent's firewall programs the table in
// one namespace and `nft list table inet segmesh` there prints exactly its String;
// loading that text with `nft -f` in a second namespace yields the same listing.
func TestStringMatchesKernel(t *testing.T) {
	for _, tc := range firewall.Cases() {
		t.Run(tc.Name, func(t *testing.T) {
			agentNS := anonNS(t)
			fw, err := nft.New(tc.Iface, int(agentNS), slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			defer fw.Close()
			tab, err := firewall.Build(tc.Iface, tc.F)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := fw.Apply(tab); err != nil {
				t.Fatalf("agent firewall Apply: %v", err)
			}
			kernel := firewall.ZeroKernelState(nftIn(t, agentNS, "", "list", "table", "inet", firewall.TableName))
			rendered := tab.String()
			if rendered != kernel {
				t.Errorf("String differs from the kernel's listing of the agent's table:\n--- String\n%s\n--- kernel\n%s", rendered, kernel)
			}

			// The listing must load again with nft -f (e.g. for firewall backups),
			// which needs every comment within nft's 128-character limit.
			loadNS := anonNS(t)
			nftIn(t, loadNS, rendered, "-f", "-")
			if loaded := firewall.ZeroKernelState(nftIn(t, loadNS, "", "list", "table", "inet", firewall.TableName)); loaded != kernel {
				t.Errorf("nft -f of String lists differently from the agent's table:\n--- loaded\n%s\n--- agent\n%s", loaded, kernel)
			}
		})
	}
}
