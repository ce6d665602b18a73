package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux"
	"segmesh/agent/statefile"
)

// newNetns creates network namespace "smag-<random>"; t.Cleanup deletes it.
func newNetns(t *testing.T) netns.NsHandle {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces, TUN and nftables")
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := "smag-" + hex.EncodeToString(b)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	h, err := netns.NewNamed(name) // switches this thread into it
	if serr := netns.Set(orig); serr != nil {
		panic("restoring the network namespace: " + serr.Error()) // the thread is unusable
	}
	if err != nil {
		t.Fatalf("creating netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		h.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("deleting netns %s: %v", name, err)
		}
	})
	return h
}

// openIn opens a userspace Linux dataplane for iface inside ns.
func openIn(t *testing.T, ns netns.NsHandle, iface string) *linux.Dataplane {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		t.Fatal(err)
	}
	dp, err := linux.New(linux.Options{Interface: iface, ForceUserspace: true, Logger: slog.New(slog.DiscardHandler)})
	if serr := netns.Set(orig); serr != nil {
		panic("restoring the network namespace: " + serr.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = dp.Down(context.Background())
		dp.Close()
	})
	return dp
}

// TestDownKernel runs `segmesh-agent down` against the real Linux dataplane in a
// throwaway network namespace: it must say what existed and removed it.
func TestDownKernel(t *testing.T) {
	ns := newNetns(t)
	b := make([]byte, 2)
	_, _ = rand.Read(b)
	iface := "smag" + hex.EncodeToString(b)
	dir := filepath.Join(t.TempDir(), "state")
	d, err := statefile.Open(dir, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.SaveIdentity(statefile.Identity{NodeName: "web-1", Controller: "https://127.0.0.1:7443", Interface: iface, ListenPort: 51820}); err != nil {
		t.Fatal(err)
	}
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	state := dataplane.State{
		Interface: iface, PrivateKey: dataplane.Key(key), MTU: 1420,
		Addresses: []netip.Prefix{netip.MustParsePrefix("100.64.0.1/32")},
		Routes:    []netip.Prefix{netip.MustParsePrefix("100.64.0.0/10")},
	}
	down := func(dp dataplane.Dataplane) string {
		t.Helper()
		var stdout, stderr bytes.Buffer
		if code := run([]string{"down", "--state-dir", dir}, nil, &stdout, &stderr, factory(dp)); code != 0 {
			t.Fatalf("down: exit %d: %s", code, stderr.String())
		}
		return stdout.String()
	}

	// Interface and table: down through the dataplane that owns the wireguard-go device.
	dp := openIn(t, ns, iface)
	if err := dp.Apply(context.Background(), state); err != nil {
		t.Fatal(err)
	}
	if got, want := down(dp), "removed interface "+iface+" and table inet segmesh\n"; got != want {
		t.Errorf("down with both = %q, want %q", got, want)
	}

	// Table only: what a stopped agent with userspace WireGuard leaves behind.
	dp = openIn(t, ns, iface)
	if err := dp.Apply(context.Background(), state); err != nil {
		t.Fatal(err)
	}
	dp.Close() // the userspace interface goes away; the table stays
	if got, want := down(openIn(t, ns, iface)), "removed table inet segmesh (interface "+iface+" did not exist)\n"; got != want {
		t.Errorf("down with the table only = %q, want %q", got, want)
	}

	if got, want := down(openIn(t, ns, iface)), "nothing to remove: neither interface "+iface+" nor table inet segmesh exists\n"; got != want {
		t.Errorf("down with nothing = %q, want %q", got, want)
	}
}
