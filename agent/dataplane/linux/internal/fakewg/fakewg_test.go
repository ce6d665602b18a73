package fakewg

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func key(b byte) wgtypes.Key { return wgtypes.Key{0: b} }

func nets(ps ...string) []net.IPNet {
	var out []net.IPNet
	for _, s := range ps {
		p := netip.MustParsePrefix(s)
		out = append(out, net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())})
	}
	return out
}

func dur(d time.Duration) *time.Duration { return &d }

func TestConfigureDevice(t *testing.T) {
	priv := wgtypes.Key{1: 1}
	port := 51820
	start := wgtypes.Config{PrivateKey: &priv, ListenPort: &port, Peers: []wgtypes.PeerConfig{
		{PublicKey: key(1), Endpoint: net.UDPAddrFromAddrPort(netip.MustParseAddrPort("192.0.2.1:1")), AllowedIPs: nets("10.0.0.1/32", "fd00::1/128"), PersistentKeepaliveInterval: dur(25 * time.Second)},
		{PublicKey: key(2), AllowedIPs: nets("10.0.0.2/32")},
	}}
	pub := priv.PublicKey().String()
	startDump := "device wg0 public-key " + pub + " listen-port 51820\n" +
		"  peer " + key(1).String() + " endpoint 192.0.2.1:1 keepalive 25s allowed-ips 10.0.0.1/32,fd00::1/128\n" +
		"  peer " + key(2).String() + " endpoint - keepalive 0s allowed-ips 10.0.0.2/32\n"
	tests := []struct {
		name string
		cfg  wgtypes.Config
		want string // the dump after cfg, or the error's text
		err  bool
	}{
		{name: "nothing", cfg: wgtypes.Config{}, want: startDump},
		{name: "allowed IP moves to the peer that adds it", cfg: wgtypes.Config{Peers: []wgtypes.PeerConfig{
			{PublicKey: key(2), AllowedIPs: nets("10.0.0.1/32")}}},
			want: "device wg0 public-key " + pub + " listen-port 51820\n" +
				"  peer " + key(1).String() + " endpoint 192.0.2.1:1 keepalive 25s allowed-ips fd00::1/128\n" +
				"  peer " + key(2).String() + " endpoint - keepalive 0s allowed-ips 10.0.0.1/32,10.0.0.2/32\n"},
		{name: "replace allowed IPs, remove, update-only of a missing peer", cfg: wgtypes.Config{Peers: []wgtypes.PeerConfig{
			{PublicKey: key(1), ReplaceAllowedIPs: true, AllowedIPs: nets("10.1.0.0/16"), PresharedKey: &wgtypes.Key{9}},
			{PublicKey: key(2), Remove: true},
			{PublicKey: key(3), UpdateOnly: true, AllowedIPs: nets("10.3.0.0/16")},
			{PublicKey: key(4), Remove: true}}},
			want: "device wg0 public-key " + pub + " listen-port 51820\n" +
				"  peer " + key(1).String() + " endpoint 192.0.2.1:1 keepalive 25s allowed-ips 10.1.0.0/16 preshared-key set\n"},
		{name: "own public key is ignored; a new private key removes its peer", cfg: func() wgtypes.Config {
			k2 := wgtypes.Key{2: 2}
			return wgtypes.Config{PrivateKey: &k2, Peers: []wgtypes.PeerConfig{{PublicKey: k2.PublicKey(), AllowedIPs: nets("10.9.0.0/16")}}}
		}(), want: "device wg0 public-key " + wgtypes.Key{2: 2}.PublicKey().String() + " listen-port 51820\n" +
			"  peer " + key(1).String() + " endpoint 192.0.2.1:1 keepalive 25s allowed-ips 10.0.0.1/32,fd00::1/128\n" +
			"  peer " + key(2).String() + " endpoint - keepalive 0s allowed-ips 10.0.0.2/32\n"},
		{name: "replace peers", cfg: wgtypes.Config{ReplacePeers: true, Peers: []wgtypes.PeerConfig{{PublicKey: key(5)}}},
			want: "device wg0 public-key " + pub + " listen-port 51820\n" +
				"  peer " + key(5).String() + " endpoint - keepalive 0s allowed-ips -\n"},
		{name: "unmasked allowed IP", cfg: wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key(1), AllowedIPs: nets("10.0.0.1/8")}}},
			err: true, want: "host bits set"},
		{name: "peer twice", cfg: wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key(1)}, {PublicKey: key(1)}}},
			err: true, want: "listed twice"},
		{name: "keepalive not in seconds", cfg: wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key(1), PersistentKeepaliveInterval: dur(1500 * time.Millisecond)}}},
			err: true, want: "whole number of seconds"},
		{name: "listen port", cfg: wgtypes.Config{ListenPort: func() *int { p := 70000; return &p }()}, err: true, want: "listen port 70000"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := New()
			if err := c.AddDevice("wg0"); err != nil {
				t.Fatal(err)
			}
			sets := 0
			c.OnSet(func(string) { sets++ })
			if err := c.ConfigureDevice("wg0", start); err != nil {
				t.Fatal(err)
			}
			err := c.ConfigureDevice("wg0", tt.cfg)
			if tt.err {
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("ConfigureDevice = %v, want an error containing %q", err, tt.want)
				}
				if got := c.String(); got != startDump || sets != 1 || c.Sets() != 1 {
					t.Fatalf("a refused configuration changed the device (sets %d):\n%s", sets, got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := c.String(); got != tt.want {
				t.Fatalf("dump:\n%s\nwant:\n%s", got, tt.want)
			}
			if sets != 2 || c.Sets() != 2 {
				t.Errorf("OnSet called %d times, Sets %d; want 2", sets, c.Sets())
			}
		})
	}
}

func TestDevice(t *testing.T) {
	c := New()
	if _, err := c.Device("wg0"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Device of a missing device = %v, want os.ErrNotExist", err)
	}
	if err := c.ConfigureDevice("wg0", wgtypes.Config{}); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("ConfigureDevice of a missing device = %v, want os.ErrNotExist", err)
	}
	if err := c.AddDevice("wg0"); err != nil {
		t.Fatal(err)
	}
	if err := c.AddDevice("wg0"); err == nil {
		t.Fatal("AddDevice twice succeeded")
	}
	if err := c.ConfigureDevice("wg0", wgtypes.Config{Peers: []wgtypes.PeerConfig{
		{PublicKey: key(2), AllowedIPs: nets("10.0.0.2/32")}, {PublicKey: key(1), AllowedIPs: nets("fd00::/64", "10.0.0.0/24")}}}); err != nil {
		t.Fatal(err)
	}
	dev, err := c.Device("wg0")
	if err != nil {
		t.Fatal(err)
	}
	// Creation order, as the kernel lists them; IPv4 in 4-byte form.
	if len(dev.Peers) != 2 || dev.Peers[0].PublicKey != key(2) || len(dev.Peers[1].AllowedIPs) != 2 || len(dev.Peers[1].AllowedIPs[1].IP) != 4 {
		t.Fatalf("Device = %+v", dev)
	}
	dev.Peers[0].AllowedIPs[0].IP[0] = 99 // the snapshot is a copy
	if !strings.Contains(c.DeviceString("wg0"), "10.0.0.2/32") {
		t.Fatal("modifying a snapshot changed the device")
	}
	c.RemoveDevice("wg0")
	if c.String() != "" || c.DeviceString("wg0") != "" {
		t.Fatal("device still there after RemoveDevice")
	}
}
