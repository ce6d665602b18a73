package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Underlay is where a host sits on the lab's underlay, at one moment.
type Underlay struct {
	// Addr is the host's address on eth0 (private behind a NAT).
	Addr netip.Addr
	// Prefix is Addr with the length of its network, as on eth0 ("10.1.0.2/24").
	Prefix netip.Prefix
	// Gateway is the default route's next hop (the NAT's Gateway); invalid on the
	// public underlay, where a host has no default route.
	Gateway netip.Addr
	// NAT is the router the host sits behind; nil on the public underlay.
	NAT *NAT
	// Public is the address hosts on the public underlay see the host's packets
	// come from: Addr on the public underlay, the NAT's PublicAddr behind a
	// port-preserving or symmetric NAT, the host's own public address behind a
	// 1:1 NAT (the only one of them that also reaches the host unsolicited).
	Public netip.Addr
}

// Underlay returns where the host sits now; safe to call concurrently with
// Renumber and MoveTo.
func (h *Host) Underlay() Underlay {
	h.lab.mu.Lock()
	defer h.lab.mu.Unlock()
	return h.underlayLocked()
}

func (h *Host) underlayLocked() Underlay {
	u := Underlay{Addr: h.Addr, NAT: h.nat, Public: h.Addr, Prefix: netip.PrefixFrom(h.Addr, UnderlayPrefix.Bits())}
	if n := h.nat; n != nil {
		u.Prefix = netip.PrefixFrom(h.Addr, n.Prefix.Bits())
		u.Gateway = n.Gateway
		u.Public = n.PublicAddr
		if h.public.IsValid() {
			u.Public = h.public
		}
	}
	return u
}

// port is the name of the bridge end of the host's veth pair.
func (h *Host) port() string { return fmt.Sprintf("v%d", h.Index) }

// bridgeOf returns the namespace and bridge of a network: the public underlay's
// br0 for nil, a NAT's lan0 otherwise.
func (l *Lab) bridgeOf(n *NAT) (ns, bridge string) {
	if n == nil {
		return l.underlayNS, "br0"
	}
	return n.Namespace, "lan0"
}

// placeLocked checks that h may take addr in network n (nil: public) and sets
// h.nat, h.Addr and, behind a 1:1 NAT, h.public: kept when h stays behind the
// same 1:1 NAT, otherwise the next free from FirstOneToOneAddr. An invalid addr
// behind a NAT means its next free address. h itself does not count as a user of
// its current addresses.
func (l *Lab) placeLocked(h *Host, n *NAT, addr netip.Addr) error {
	if l.closing {
		return errors.New("lab is closed")
	}
	if n == nil {
		if !UnderlayPrefix.Contains(addr) {
			return fmt.Errorf("address %s outside the underlay %s", addr, UnderlayPrefix)
		}
	} else if !addr.IsValid() {
		var err error
		if addr, err = l.nextFreeLocked(n, n.Gateway.Next(), h); err != nil {
			return err
		}
	}
	if err := l.checkFreeLocked(n, addr, h); err != nil {
		return err
	}
	public := netip.Addr{}
	if n != nil && n.Kind == NATOneToOne {
		public = h.public
		if h.nat != n || !public.IsValid() {
			var err error
			if public, err = l.nextFreeLocked(nil, FirstOneToOneAddr, h); err != nil {
				return fmt.Errorf("1:1 public address: %w", err)
			}
		}
	}
	h.nat, h.Addr, h.public = n, addr, public
	return nil
}

// checkFreeLocked returns an error unless addr is a usable, unused host address
// of network n (nil: the public underlay). except is not counted as a user.
func (l *Lab) checkFreeLocked(n *NAT, addr netip.Addr, except *Host) error {
	prefix := UnderlayPrefix
	if n != nil {
		prefix = n.Prefix
	}
	if !prefix.Contains(addr) {
		return fmt.Errorf("address %s outside %s", addr, prefix)
	}
	if addr == prefix.Addr() || addr == lastAddr(prefix) {
		return fmt.Errorf("address %s is the network or broadcast address of %s", addr, prefix)
	}
	if user := l.userLocked(n, addr, except); user != "" {
		return fmt.Errorf("address %s already used by %s", addr, user)
	}
	return nil
}

// userLocked names what uses addr in network n, or returns "".
func (l *Lab) userLocked(n *NAT, addr netip.Addr, except *Host) string {
	for _, h := range l.hosts {
		if h == except {
			continue
		}
		if h.nat == n && h.Addr == addr {
			return "host " + h.Name
		}
		if n == nil && h.public == addr {
			return "host " + h.Name + " (1:1 public address)"
		}
	}
	for _, x := range l.nats {
		if n == nil && x.PublicAddr == addr {
			return "NAT " + x.Name
		}
		if n == x && x.Gateway == addr {
			return "the gateway of NAT " + x.Name
		}
	}
	return ""
}

// nextFreeLocked returns the first free host address of network n at or after from.
func (l *Lab) nextFreeLocked(n *NAT, from netip.Addr, except *Host) (netip.Addr, error) {
	prefix := UnderlayPrefix
	if n != nil {
		prefix = n.Prefix
	}
	for a := from; prefix.Contains(a); a = a.Next() {
		if l.checkFreeLocked(n, a, except) == nil {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("no free address in %s from %s on", prefix, from)
}

// lastAddr is the highest address of an IPv4 prefix (its broadcast address).
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := (uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Renumber changes the host's eth0 address to addr within its current network
// (the public underlay or its NAT's private subnet), as a DHCP renumbering does:
// it adds addr, then deletes the old address (the kernel promotes addr, so the
// host is never without an address) and restores the default route. Processes
// keep running; sockets bound to the wildcard address keep working. Behind a 1:1
// NAT the host keeps its public address, the mapping follows the new private
// address and the router forgets the old address's conntrack entries. Behind the
// other NATs the old mappings stay until they time out, as on a real router, so
// the new address may get other public ports. It must not run concurrently with
// code reading h.Addr (use Underlay).
func (h *Host) Renumber(ctx context.Context, addr netip.Addr) error {
	h.moveMu.Lock()
	defer h.moveMu.Unlock()
	l := h.lab
	l.mu.Lock()
	old := h.underlayLocked()
	if addr == old.Addr || !addr.IsValid() {
		l.mu.Unlock()
		return fmt.Errorf("renumbering %s to %s: want a valid address other than the current one", h.Name, addr)
	}
	if err := l.placeLocked(h, old.NAT, addr); err != nil {
		l.mu.Unlock()
		return fmt.Errorf("renumbering %s: %w", h.Name, err)
	}
	now := h.underlayLocked()
	l.mu.Unlock()

	if _, err := h.Exec(ctx, "sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"); err != nil {
		return fmt.Errorf("renumbering %s: %w", h.Name, err)
	}
	steps := [][]string{
		{"-n", h.Namespace, "addr", "add", now.Prefix.String(), "dev", "eth0"},
		{"-n", h.Namespace, "addr", "del", old.Prefix.String(), "dev", "eth0"},
	}
	if now.Gateway.IsValid() {
		steps = append(steps, []string{"-n", h.Namespace, "route", "replace", "default", "via", now.Gateway.String(), "dev", "eth0"})
	}
	for _, args := range steps {
		if err := l.ip(ctx, args...); err != nil {
			return fmt.Errorf("renumbering %s: %w", h.Name, err)
		}
	}
	if n := old.NAT; n != nil && n.Kind == NATOneToOne {
		if err := n.forget(ctx, old.Addr); err != nil {
			return fmt.Errorf("renumbering %s: %w", h.Name, err)
		}
	}
	l.log.Debug("host renumbered", "host", h.Name, "from", old.Addr, "to", now.Addr, "public", now.Public)
	return nil
}

// MoveTo moves the host to another network, as a laptop moving between networks
// or a VM re-attached elsewhere: behind nat, or to the public underlay when nat is
// nil, with address addr (invalid behind a NAT: its next free address; required
// on the public underlay). The bridge end of the host's veth pair moves to the
// new bridge (eth0 loses carrier for a moment), eth0's IPv4 addresses are
// replaced by addr and the default route points to the new NAT's gateway (none on
// the public underlay). Processes keep running. Moving behind the same NAT is a
// hard renumbering. A 1:1 NAT left behind drops the host's mapping and its
// conntrack entries; the other NATs keep their old mappings until they time out.
// It must not run concurrently with code reading h.Addr (use Underlay).
func (h *Host) MoveTo(ctx context.Context, nat *NAT, addr netip.Addr) error {
	h.moveMu.Lock()
	defer h.moveMu.Unlock()
	l := h.lab
	if nat != nil && nat.lab != l {
		return fmt.Errorf("moving %s: the NAT belongs to another lab", h.Name)
	}
	l.mu.Lock()
	old := h.underlayLocked()
	if err := l.placeLocked(h, nat, addr); err != nil {
		l.mu.Unlock()
		return fmt.Errorf("moving %s: %w", h.Name, err)
	}
	now := h.underlayLocked()
	l.mu.Unlock()

	fromNS, _ := l.bridgeOf(old.NAT)
	toNS, bridge := l.bridgeOf(now.NAT)
	port := h.port()
	if fromNS != toNS {
		if err := l.ip(ctx, "-n", fromNS, "link", "set", port, "netns", toNS); err != nil {
			return fmt.Errorf("moving %s: %w", h.Name, err)
		}
		l.moveResource(port, fromNS, toNS)
	}
	steps := [][]string{
		{"-n", toNS, "link", "set", port, "master", bridge, "up"},
		{"-n", h.Namespace, "-4", "addr", "flush", "dev", "eth0"},
		{"-n", h.Namespace, "addr", "add", now.Prefix.String(), "dev", "eth0"},
	}
	if now.Gateway.IsValid() {
		steps = append(steps, []string{"-n", h.Namespace, "route", "replace", "default", "via", now.Gateway.String(), "dev", "eth0"})
	}
	for _, args := range steps {
		if err := l.ip(ctx, args...); err != nil {
			return fmt.Errorf("moving %s: %w", h.Name, err)
		}
	}
	if n := old.NAT; n != nil && n.Kind == NATOneToOne {
		if err := n.forget(ctx, old.Addr); err != nil {
			return fmt.Errorf("moving %s: %w", h.Name, err)
		}
	}
	if n := now.NAT; n != nil && n.Kind == NATOneToOne && n != old.NAT {
		if err := n.apply(ctx); err != nil {
			return fmt.Errorf("moving %s: %w", h.Name, err)
		}
	}
	l.log.Debug("host moved", "host", h.Name, "from", old.Addr, "nat", natName(now.NAT), "to", now.Addr, "public", now.Public)
	return nil
}

// forget reloads a 1:1 NAT's ruleset after a host left private address addr and
// deletes the conntrack entries of addr, so that no inbound packet follows an old
// mapping and the address's public ports are free again.
func (n *NAT) forget(ctx context.Context, addr netip.Addr) error {
	if err := n.apply(ctx); err != nil {
		return err
	}
	return flushConntrack(n.Namespace, addr)
}

// flushConntrack deletes the IPv4 conntrack entries of namespace ns whose
// original source or reply source is addr.
func flushConntrack(ns string, addr netip.Addr) error {
	nsh, err := netns.GetFromPath(filepath.Join("/run/netns", ns))
	if err != nil {
		return fmt.Errorf("opening network namespace %s: %w", ns, err)
	}
	defer nsh.Close()
	nh, err := netlink.NewHandleAt(nsh, unix.NETLINK_NETFILTER)
	if err != nil {
		return fmt.Errorf("opening a netfilter netlink socket in %s: %w", ns, err)
	}
	defer nh.Close()
	ip := net.IP(addr.AsSlice())
	orig, reply := &netlink.ConntrackFilter{}, &netlink.ConntrackFilter{}
	if err := orig.AddIP(netlink.ConntrackOrigSrcIP, ip); err != nil {
		return err
	}
	if err := reply.AddIP(netlink.ConntrackReplySrcIP, ip); err != nil {
		return err
	}
	if _, err := nh.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, orig, reply); err != nil {
		return fmt.Errorf("deleting conntrack entries of %s in %s: %w", addr, ns, err)
	}
	return nil
}

// Kinds of resource.
const (
	resourceLink  = "link"
	resourceTable = "nftables table"
)

// resource is a link or an nftables table ("ip smlab_nat") the lab created in a
// namespace, which Close deletes by name.
type resource struct{ ns, kind, name string }

func (r resource) String() string { return fmt.Sprintf("%s %s in %s", r.kind, r.name, r.ns) }

// record adds r to what Close deletes.
func (l *Lab) record(r resource) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.resources = append(l.resources, r)
}

// addLink runs `ip -n ns link add name args...` and records the link (for a veth
// pair the end called name; deleting it deletes both).
func (l *Lab) addLink(ctx context.Context, ns, name string, args ...string) error {
	if err := l.ip(ctx, append([]string{"-n", ns, "link", "add", name}, args...)...); err != nil {
		return err
	}
	l.record(resource{ns: ns, kind: resourceLink, name: name})
	return nil
}

// moveResource notes that link name moved from namespace from to namespace to.
func (l *Lab) moveResource(name, from, to string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, r := range l.resources {
		if r.kind == resourceLink && r.ns == from && r.name == name {
			l.resources[i].ns = to
		}
	}
}

// deleteResource deletes r by name and forgets it; one already gone (with its
// namespace, or as the peer of a deleted veth) is no error.
func (l *Lab) deleteResource(ctx context.Context, r resource) error {
	var err error
	switch r.kind {
	case resourceLink:
		err = l.ip(ctx, "-n", r.ns, "link", "del", r.name)
	case resourceTable:
		_, err = runCmd(ctx, "ip", append([]string{"netns", "exec", r.ns, "nft", "delete", "table"}, strings.Fields(r.name)...)...)
	default:
		err = fmt.Errorf("unknown resource kind %q", r.kind)
	}
	var xe *ExecError
	if errors.As(err, &xe) && gone(xe.Stderr) {
		err = nil
	}
	if err != nil {
		return fmt.Errorf("deleting %s: %w", r, err)
	}
	l.mu.Lock()
	out := l.resources[:0]
	for _, x := range l.resources {
		if x != r {
			out = append(out, x)
		}
	}
	l.resources = out
	l.mu.Unlock()
	return nil
}

// gone reports whether an ip or nft error says the object or its namespace does
// not exist.
func gone(stderr string) bool {
	for _, s := range []string{"Cannot find device", "No such file or directory", "Cannot open network namespace", "does not exist"} {
		if strings.Contains(stderr, s) {
			return true
		}
	}
	return false
}

// Resources lists what Close will delete by name before the namespaces, one
// "KIND NAME in NAMESPACE" per entry, in creation order.
func (l *Lab) Resources() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]string, len(l.resources))
	for i, r := range l.resources {
		out[i] = r.String()
	}
	return out
}
