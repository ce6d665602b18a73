package nft

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os/exec"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	vnl "github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"segmesh/agent/dataplane/linux/internal/nstest"
	"segmesh/agent/firewall"
)

// Adversarial tests: kernel states that enforce more than Read reports.

// rawBatch commits msgs (nftables messages without their nfgenmsg header) as one
// batch of family family from a netlink socket of this process in ns, as another
// netlink client (a second library, or nft(8)) would.
func rawBatch(t *testing.T, ns nstest.NS, family byte, msgs ...netlink.Message) {
	t.Helper()
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: int(ns.Handle)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	hdr := func(fam byte) []byte { return []byte{fam, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES} }
	batch := []netlink.Message{{Header: netlink.Header{Type: unix.NFNL_MSG_BATCH_BEGIN, Flags: netlink.Request},
		Data: hdr(unix.AF_UNSPEC)}}
	for _, m := range msgs {
		m.Header.Flags |= netlink.Request | netlink.Acknowledge
		m.Data = append(hdr(family), m.Data...)
		batch = append(batch, m)
	}
	batch = append(batch, netlink.Message{Header: netlink.Header{Type: unix.NFNL_MSG_BATCH_END, Flags: netlink.Request},
		Data: hdr(unix.AF_UNSPEC)})
	if _, err := c.SendMessages(batch); err != nil {
		t.Fatalf("sending batch: %v", err)
	}
	for acks := 0; acks < len(msgs); {
		got, err := c.Receive()
		if err != nil {
			t.Fatalf("batch refused: %v", err)
		}
		acks += len(got)
	}
}

func nftType(msg int) netlink.HeaderType {
	return netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | msg)
}

func attrs(t *testing.T, fn func(ae *netlink.AttributeEncoder)) []byte {
	t.Helper()
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	fn(ae)
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// vethPeer joins ns to a new namespace by a veth pair: ns's end is the overlay
// interface smdp0 (198.51.100.1/24), the peer's 198.51.100.2/24. It returns the peer.
func vethPeer(t *testing.T, ns nstest.NS) nstest.NS {
	t.Helper()
	peer := nstest.New(t)
	ns.Do(t, func() error {
		return vnl.LinkAdd(&vnl.Veth{LinkAttrs: vnl.LinkAttrs{Name: "smdp0"}, PeerName: "p0", PeerNamespace: vnl.NsFd(peer.Handle)})
	})
	for _, x := range []struct {
		ns         nstest.NS
		name, addr string
	}{{ns, "smdp0", "198.51.100.1/24"}, {peer, "p0", "198.51.100.2/24"}} {
		x.ns.MustExec(t, "ip", "addr", "add", x.addr, "dev", x.name)
		x.ns.MustExec(t, "ip", "link", "set", x.name, "up")
	}
	return peer
}

func pings(ns nstest.NS, addr string) bool {
	_, err := exec.Command("ip", "netns", "exec", ns.Name, "ping", "-c1", "-W1", addr).CombinedOutput()
	return err == nil
}

// freshRead reads the table with a new Firewall (a new agent process would).
func freshRead(t *testing.T, ns nstest.NS) *firewall.Table {
	t.Helper()
	fw, err := New("smdp0", int(ns.Handle), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer fw.Close()
	got, err := fw.Read()
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// TestAttackCatchallElementIsInvisible: a catch-all element (NFT_SET_ELEM_CATCHALL,
// kernel >= 5.13; `add element ... { * }`) makes every lookup in the set match. The
// element has no key, so the element parser drops it and Read shows the set as
// desired while the kernel lets every address through the set's rules.
func TestAttackCatchallElementIsInvisible(t *testing.T) {
	fw, ns := newFirewall(t)
	peer := vethPeer(t, ns)
	f := sampleFilter() // the web set's rule accepts ICMP echo; 198.51.100.2 is in no set
	mustApply(t, fw, f, Replaced)
	if pings(peer, "198.51.100.1") {
		t.Fatal("ping from a host in no set passed before the attack")
	}
	rawBatch(t, ns, unix.NFPROTO_INET, netlink.Message{
		Header: netlink.Header{Type: nftType(unix.NFT_MSG_NEWSETELEM), Flags: netlink.Create},
		Data: attrs(t, func(ae *netlink.AttributeEncoder) {
			ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, TableName)
			ae.String(unix.NFTA_SET_ELEM_LIST_SET, "web_v4")
			ae.Nested(unix.NFTA_SET_ELEM_LIST_ELEMENTS, func(ae *netlink.AttributeEncoder) error {
				ae.Nested(unix.NFTA_LIST_ELEM, func(ae *netlink.AttributeEncoder) error {
					ae.Uint32(unix.NFTA_SET_ELEM_FLAGS, 2) // NFT_SET_ELEM_CATCHALL
					return nil
				})
				return nil
			})
		}),
	})
	if !pings(peer, "198.51.100.1") {
		t.Fatal("the catch-all element did not open the table (the attack needs a newer kernel)")
	}
	if d := firewall.Compare(build(t, f), freshRead(t, ns)); d == nil {
		t.Errorf("the kernel accepts ICMP from every IPv4 address through set web_v4, but a fresh Read reports no drift:\n%s",
			ns.MustExec(t, "nft", "list", "set", "inet", TableName, "web_v4"))
	}
	if d := firewall.Compare(build(t, f), mustRead(t, fw)); d == nil {
		t.Errorf("the Firewall's own Read reports no drift either")
	}
	if out, err := fw.Apply(build(t, f)); err != nil || !out.Drifted || out.Result == Unchanged {
		t.Errorf("repairing Apply = %+v, %v; want a change of a drifted table", out, err)
	}
	if pings(peer, "198.51.100.1") {
		t.Error("the repaired table still lets the host in no set through")
	}
}

func mustRead(t *testing.T, fw *Firewall) *firewall.Table {
	t.Helper()
	got, err := fw.Read()
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// rawExpr is an expression the library cannot marshal, given by name and data.
type rawExpr struct {
	name string
	data func(ae *netlink.AttributeEncoder)
}

// TestAttackUnparsedExpressionIsInvisible: google/nftables silently skips
// expressions it has no type for (rt, socket, osf, xfrm, tproxy, dup, fwd, last,
// synproxy is known...), so decodeRule never sees them. Rewriting register 1 between
// the conntrack state mask and its comparison with `rt ip nexthop` (never zero)
// turns "ct state established,related accept" into "accept" for every IPv4 packet,
// while the rule decodes exactly as the one Build made.
func TestAttackUnparsedExpressionIsInvisible(t *testing.T) {
	fw, ns := newFirewall(t)
	peer := vethPeer(t, ns)
	f := sampleFilter()
	mustApply(t, fw, f, Replaced)
	if pings(peer, "198.51.100.1") {
		t.Fatal("ping from a host in no set passed before the attack")
	}
	handles, err := fw.RuleHandles(firewall.ChainIngress)
	if err != nil {
		t.Fatal(err)
	}
	exprs := []any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(uint32(firewall.CtEstablished | firewall.CtRelated)), Xor: make([]byte, 4)},
		rawExpr{"rt", func(ae *netlink.AttributeEncoder) {
			ae.Uint32(1, 1) // NFTA_RT_DREG: register 1
			ae.Uint32(2, 1) // NFTA_RT_KEY: NFT_RT_NEXTHOP4
		}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}
	rawBatch(t, ns, unix.NFPROTO_INET, netlink.Message{
		Header: netlink.Header{Type: nftType(unix.NFT_MSG_NEWRULE), Flags: netlink.Replace},
		Data: attrs(t, func(ae *netlink.AttributeEncoder) {
			ae.String(unix.NFTA_RULE_TABLE, TableName)
			ae.String(unix.NFTA_RULE_CHAIN, firewall.ChainIngress)
			ae.Uint64(unix.NFTA_RULE_HANDLE, handles[0])
			ae.Nested(unix.NFTA_RULE_EXPRESSIONS, func(ae *netlink.AttributeEncoder) error {
				for _, e := range exprs {
					switch e := e.(type) {
					case rawExpr:
						ae.Nested(unix.NFTA_LIST_ELEM, func(ae *netlink.AttributeEncoder) error {
							ae.String(unix.NFTA_EXPR_NAME, e.name)
							ae.Nested(unix.NFTA_EXPR_DATA, func(ae *netlink.AttributeEncoder) error { e.data(ae); return nil })
							return nil
						})
					case expr.Any:
						b, err := expr.Marshal(unix.NFPROTO_INET, e)
						if err != nil {
							return err
						}
						ae.Bytes(unix.NLA_F_NESTED|unix.NFTA_LIST_ELEM, b)
					}
				}
				return nil
			})
		}),
	})
	if !pings(peer, "198.51.100.1") {
		t.Fatal("the rewritten rule did not open the table")
	}
	if d := firewall.Compare(build(t, f), freshRead(t, ns)); d == nil {
		t.Errorf("the kernel accepts every IPv4 packet on the overlay, but a fresh Read reports no drift:\n%s",
			ns.MustExec(t, "nft", "list", "chain", "inet", TableName, firewall.ChainIngress))
	}
}

// TestAttackInProcessChangeIsIgnored: the tracker drops every generation committed
// by a thread of this process, not only the Firewall's own batches, so a change by
// any other nftables client in the agent's process (a second Firewall, a library)
// is never read back: Read keeps serving the cached table and Apply repairs nothing.
func TestAttackInProcessChangeIsIgnored(t *testing.T) {
	fw, ns := newFirewall(t)
	f := sampleFilter()
	mustApply(t, fw, f, Replaced)
	other, err := nftables.New(nftables.WithNetNSFd(int(ns.Handle)))
	if err != nil {
		t.Fatal(err)
	}
	table := &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
	if err := other.SetAddElements(&nftables.Set{Table: table, Name: "web_v4", KeyType: nftables.TypeIPAddr},
		intervalElements([]firewall.Interval{{First: netip.MustParseAddr("198.51.100.2"), Last: netip.MustParseAddr("198.51.100.2")}})); err != nil {
		t.Fatal(err)
	}
	if err := other.Flush(); err != nil {
		t.Fatal(err)
	}
	if d := firewall.Compare(build(t, f), freshRead(t, ns)); d == nil {
		t.Fatal("the element was not added")
	}
	if d := firewall.Compare(build(t, f), mustRead(t, fw)); d == nil {
		t.Errorf("set web_v4 gained 198.51.100.2 but Read reports no drift")
	}
	out, err := fw.Apply(build(t, f))
	if err != nil {
		t.Fatal(err)
	}
	if out.Result == Unchanged || !out.Drifted {
		t.Errorf("Apply = %+v; want the element removed and Drifted", out)
	}
}

// TestAttackBusyNeighbourForcesRepeatedReplaces: after a batch the Firewall trusts its
// cache only if the generation moved by exactly one, and with no cache every Apply
// replaces the whole table without reading it. A process that commits to its own
// table now and then (docker, kube-proxy, firewalld) therefore keeps the cache
// invalid while replaces overlap its commits: every such Apply, even of an
// unchanged filter, recreates the table with all its elements (for 200,000
// elements, seconds of kernel time per resync, and Outcome.Drifted, hence a
// conntrack sweep, every time).
func TestAttackBusyNeighbourForcesRepeatedReplaces(t *testing.T) {
	fw, ns := newFirewall(t)
	f := sampleFilter()
	for i := range 20000 {
		f.Sets[2].Prefixes = append(f.Sets[2].Prefixes, netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 16 + byte(i>>16), byte(i >> 8), byte(i)}), 32))
	}
	// The neighbour commits to its own table in a loop.
	cmd := exec.Command("ip", "netns", "exec", ns.Name, "sh", "-c",
		"while :; do nft add table inet neighbour; nft delete table inet neighbour; done")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	var results []string
	replaced := 0
	for range 10 {
		start := time.Now()
		out, err := fw.Apply(build(t, f))
		if err != nil {
			t.Fatal(err)
		}
		results = append(results, fmt.Sprintf("%v drifted=%v (%v)", out.Result, out.Drifted, time.Since(start).Round(time.Millisecond)))
		if out.Result == Replaced {
			replaced++
		}
	}
	if replaced > 1 {
		t.Fatalf("%d of 10 Applies of one unchanged filter replaced the table while another table changed: %q; want only the first",
			replaced, results)
	}
}
