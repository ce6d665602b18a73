package linux

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"segmesh/agent/dataplane"
	"segmesh/agent/dataplane/linux/internal/nstest"
	"segmesh/agent/netmap"
	"segmesh/agent/reconcile"
	"segmesh/policy"
	"segmesh/test/lab"
)

// BenchmarkMembershipChange1000Peers measures one segment-membership change at
// 1,000 peers: one peer's two addresses join (or, every other iteration, leave) the
// set "web" of a node whose table already holds all 2,000 peer addresses. Each
// iteration is one Apply; nothing else changes.
func BenchmarkMembershipChange1000Peers(b *testing.B) {
	ns := nstest.New(b)
	iface := nstest.IfaceName(b)
	dp := newDataplane(b, ns, iface, nil)
	without := bigState(b, iface, 1000, reconcile.PersistentKeepalive)
	with := without
	with.Filter = cloneFilter(without.Filter)
	web := &with.Filter.Sets[1]
	if web.Name != "web" {
		b.Fatalf("bigState's second set is %q, want web", web.Name)
	}
	web.Prefixes = append(web.Prefixes, without.Peers[1].AllowedIPs...) // peer 1 is not in web
	ctx := context.Background()
	if err := dp.Apply(ctx, without); err != nil {
		b.Fatal(err)
	}
	states := []dataplane.State{with, without}
	b.ResetTimer()
	for i := range b.N {
		if err := dp.Apply(ctx, states[i%2]); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	checkRead(b, dp, states[(b.N-1)%2])
}

// cloneFilter returns a deep copy of f's sets (rules are shared; they are not
// modified).
func cloneFilter(f policy.Filter) policy.Filter {
	out := f
	out.Sets = make([]policy.AddressSet, len(f.Sets))
	for i, s := range f.Sets {
		out.Sets[i] = policy.AddressSet{Name: s.Name, Prefixes: slices.Clone(s.Prefixes)}
	}
	return out
}

// externalState is a node with 10 peers whose filter lets the external set "ext"
// of n IPv4 /32s (every other address from 10.0.0.0 up) reach tcp/9000, the shape
// of a policy with a large external segment. It returns the state and the last
// prefix of the set.
func externalState(b *testing.B, iface string, n int) (dataplane.State, netip.Prefix) {
	s := bigState(b, iface, 10, reconcile.PersistentKeepalive)
	ext := policy.AddressSet{Name: "ext", Prefixes: make([]netip.Prefix, n)}
	for i := range n {
		v := uint32(10<<24) + 2*uint32(i)
		ext.Prefixes[i] = netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), 32)
	}
	s.Filter = cloneFilter(s.Filter)
	s.Filter.Sets = append(s.Filter.Sets, ext)
	s.Filter.Ingress = append(slices.Clone(s.Filter.Ingress), policy.FilterRule{
		Set: "ext", Origin: "partners",
		Matches: []policy.PortMatch{{Protocol: policy.ProtoTCP, Ports: []policy.PortRange{{First: 9000, Last: 9000}}}},
	})
	return s, ext.Prefixes[n-1]
}

// BenchmarkExternalPrefixes200k measures Apply of a policy whose external segment
// holds 200,000 prefixes: grow (from 100 prefixes to 200,000) and shrink (back to
// 100), each one Apply. For shrink it also reports gone-s: the seconds from the
// start of that Apply until the kernel's set no longer holds the last prefix (the
// access the narrower revision removes), polled with one netlink request every 20 ms.
// Run with -benchtime=1x or a few x: one iteration takes seconds.
func BenchmarkExternalPrefixes200k(b *testing.B) {
	const big, small = 200_000, 100
	ns := nstest.New(b)
	iface := nstest.IfaceName(b)
	dp := newDataplane(b, ns, iface, nil)
	large, removed := externalState(b, iface, big)
	narrow, _ := externalState(b, iface, small)
	ctx := context.Background()

	b.Run("grow", func(b *testing.B) {
		for range b.N {
			b.StopTimer()
			if err := dp.Apply(ctx, narrow); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if err := dp.Apply(ctx, large); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("shrink", func(b *testing.B) {
		var gone time.Duration
		for range b.N {
			b.StopTimer()
			if err := dp.Apply(ctx, large); err != nil {
				b.Fatal(err)
			}
			if !setHolds(b, ns, "ext_v4", removed.Addr()) {
				b.Fatalf("set ext_v4 of table inet segmesh does not hold %s after the large apply; if the sets were renamed, update the name here (nft list sets)", removed.Addr())
			}
			start := time.Now()
			goneAt := make(chan time.Duration, 1)
			pollCtx, stop := context.WithCancel(ctx)
			go func() {
				defer close(goneAt)
				for pollCtx.Err() == nil {
					if !setHolds(b, ns, "ext_v4", removed.Addr()) {
						goneAt <- time.Since(start)
						return
					}
					time.Sleep(20 * time.Millisecond)
				}
			}()
			b.StartTimer()
			if err := dp.Apply(ctx, narrow); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			d, ok := <-goneAt // the set no longer holds it once Apply returned
			stop()
			if !ok {
				d = time.Since(start)
			}
			gone += d
		}
		b.ReportMetric(gone.Seconds()/float64(b.N), "gone-s")
	})
}

// setHolds reports whether set of table inet segmesh holds addr, with one netlink
// request for that element (lab.HasElement; `nft get element` would dump the whole
// set first, 9 s for 200,000 prefixes, and compete with the Apply being timed).
func setHolds(b *testing.B, ns nstest.NS, set string, addr netip.Addr) bool {
	var holds bool
	err := ns.Run(func() (err error) {
		holds, err = lab.HasElement("segmesh", set, addr)
		return err
	})
	if err != nil {
		b.Errorf("probing set %s for %s: %v", set, addr, err)
	}
	return holds
}

// BenchmarkDriftRestore measures how long a running reconcile.Reconciler over the
// Linux dataplane (resync 10 s, the agent's default, plus the dataplane's kernel
// watch) takes to undo an external change, per kind: a rule deleted from the
// nftables table with nft(8), the overlay route deleted with ip(8), a WireGuard
// peer removed with `wg set`. One iteration is the time from the change (the
// command has returned) until Read reports no drift; the node has 10 peers.
func BenchmarkDriftRestore(b *testing.B) {
	ns := nstest.New(b)
	iface := nstest.IfaceName(b)
	dp := newDataplane(b, ns, iface, nil)
	s := bigState(b, iface, 10, reconcile.PersistentKeepalive)
	local := reconcile.Local{Interface: iface, PrivateKey: s.PrivateKey, ListenPort: s.ListenPort, MTU: s.MTU}
	nm := &netmap.Netmap{Revision: 1, Hash: "bench", Self: netmap.Node{Name: "self", Addresses: s.Addresses},
		Filter: s.Filter, OverlayPrefixes: s.Routes}
	for i, p := range s.Peers {
		nm.Peers = append(nm.Peers, netmap.Peer{Name: fmt.Sprintf("peer-%d", i), PublicKey: p.PublicKey, Endpoint: p.Endpoint, AllowedIPs: p.AllowedIPs})
	}
	r := reconcile.New(dp, local, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); r.Run(ctx, 10*time.Second) }()
	b.Cleanup(func() { cancel(); <-done })
	waitCtx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	st, err := r.Wait(waitCtx, r.SetNetmap(nm))
	wcancel()
	if err != nil || st.Err != nil {
		b.Fatalf("first reconcile: %v / %v", err, st.Err)
	}
	peerKey := wgtypes.Key(s.Peers[0].PublicKey).String()
	kinds := []struct {
		name   string
		change func(b *testing.B)
	}{
		{"nftables-rule", func(b *testing.B) {
			out := ns.MustExec(b, "nft", "-a", "list", "table", "inet", "segmesh")
			chain, h := firstRule(out)
			if h == "" {
				b.Fatalf("no rule with a handle in:\n%s", out)
			}
			ns.MustExec(b, "nft", "delete", "rule", "inet", "segmesh", chain, "handle", h)
		}},
		{"route", func(b *testing.B) {
			ns.MustExec(b, "ip", "route", "del", overlay4.String(), "dev", iface)
		}},
		{"wireguard-peer", func(b *testing.B) {
			ns.MustExec(b, "wg", "set", iface, "peer", peerKey, "remove")
		}},
	}
	for _, k := range kinds {
		b.Run(k.name, func(b *testing.B) {
			for range b.N {
				b.StopTimer()
				k.change(b)
				start := time.Now()
				b.StartTimer()
				for {
					obs, err := dp.Read(ctx)
					if err != nil {
						b.Fatal(err)
					}
					if len(obs.Drift) == 0 {
						break
					}
					if time.Since(start) > 60*time.Second {
						b.Fatalf("drift not restored after 60 s: %v", obs.Drift)
					}
					time.Sleep(5 * time.Millisecond)
				}
				b.StopTimer()
			}
		})
	}
}

var (
	chainLine  = regexp.MustCompile(`^\s*chain (\S+) \{`)
	ruleHandle = regexp.MustCompile(`(accept|drop|jump \S+) .*# handle (\d+)$`)
)

// firstRule returns the chain and handle of the first accepting, dropping or
// jumping rule in the output of `nft -a list table`, or "" when there is none.
func firstRule(listing string) (chain, handle string) {
	cur := ""
	for _, line := range strings.Split(listing, "\n") {
		if m := chainLine.FindStringSubmatch(line); m != nil {
			cur = m[1]
		}
		if m := ruleHandle.FindStringSubmatch(line); m != nil && cur != "" {
			return cur, m[2]
		}
	}
	return "", ""
}
