package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/vishvananda/netlink"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
)

// NATKind is the behaviour of a lab NAT router. Each kind is described with the
// terms of RFC 4787 (NAT Behavioral Requirements for Unicast UDP):
//
//   - mapping behaviour (§4.1): which internal endpoints (private address:port)
//     share one external endpoint (public address:port). Endpoint-independent
//     mapping (EIM) reuses the mapping for every remote endpoint; address and
//     port-dependent mapping (APDM, "symmetric") makes a new one per remote
//     address:port.
//   - filtering behaviour (§5): which inbound packets to an external endpoint are
//     let through. Endpoint-independent filtering (EIF) lets any remote send;
//     address and port-dependent filtering (APDF) only the exact remote
//     address:port the mapping was made for.
//
// Every kind is Linux conntrack NAT (nftables) in the router's namespace, so a
// mapping lives as long as its conntrack entry: for UDP 30 s without a reply and
// 120 s after replies in both directions (nf_conntrack_udp_timeout and
// nf_conntrack_udp_timeout_stream), refreshed by traffic. No kind supports
// hairpinning (RFC 4787 §6): a host that sends to its own NAT's public address
// reaches the router itself, whose input filter drops it.
type NATKind string

const (
	// NATPortPreserving models most home routers (Linux masquerade, as in
	// OpenWrt) and cloud NAT gateways with endpoint-independent mapping (such as
	// Google Cloud NAT's option of that name): every host behind it leaves from
	// the router's one public address (`snat to PUBLIC`, no `random`), and keeps
	// its source port when that port is free.
	//
	// Mapping: endpoint-independent (EIM) while no two hosts behind the NAT use
	// the same source port towards the same remote endpoint; on such a collision
	// Linux keeps conntrack tuples unique by giving the later flow another port,
	// for that remote only (as real Linux routers do). A host that renumbers
	// keeps no mapping: its new address gets new ones, on a new port wherever the
	// old mapping still holds the old port towards the same remote.
	//
	// Filtering: address and port-dependent (APDF, a "port-restricted cone" in
	// RFC 3489 terms): only replies from the exact remote address:port a mapping
	// was made for come in; anything else to the public address is dropped (and
	// counted by DroppedInbound). Two hosts behind two such NATs connect when
	// both send first (hole punching).
	NATPortPreserving NATKind = "port-preserving"

	// NATSymmetric models NATs that pick a new random source port for every
	// remote endpoint, such as many enterprise firewalls and carrier-grade NATs
	// (`snat to PUBLIC random`).
	//
	// Mapping: address and port-dependent (APDM, "symmetric"): a host's socket
	// that sends to two remotes appears from two different public ports, so the
	// port a STUN server observes is useless to anyone else. Two random ports
	// collide with probability about 1/64,000.
	//
	// Filtering: address and port-dependent (APDF): only the exact remote
	// address:port a mapping was made for can answer; everything else is dropped
	// and counted by DroppedInbound. Hole punching through it fails; relays are
	// the way.
	NATSymmetric NATKind = "symmetric"

	// NATOneToOne models a cloud VM's public IP (an AWS Elastic IP, an Azure or
	// Google Cloud external address): each host behind it gets its own public
	// address (Underlay.Public), translated to and from its private address in
	// both directions for all ports (`dnat to PRIVATE` for inbound, `snat to
	// PUBLIC` for outbound). The host sees only its private address.
	//
	// Mapping: endpoint-independent (EIM), ports unchanged. Filtering:
	// endpoint-independent (EIF): an unsolicited packet from anyone reaches the
	// host (a cloud security group would filter; the lab has none).
	NATOneToOne NATKind = "1:1"
)

// NATKinds lists every kind, in the order of the package documentation.
var NATKinds = []NATKind{NATPortPreserving, NATSymmetric, NATOneToOne}

func (k NATKind) valid() bool {
	for _, x := range NATKinds {
		if k == x {
			return true
		}
	}
	return false
}

// Addressing of NAT routers on the public underlay (UnderlayPrefix).
var (
	// FirstNATAddr is the public address AddNAT gives the first NAT router that
	// does not ask for one; later ones take the next free address.
	FirstNATAddr = netip.MustParseAddr("192.0.2.201")
	// FirstOneToOneAddr is the first public address a host behind a 1:1 NAT gets;
	// later ones take the next free address.
	FirstOneToOneAddr = netip.MustParseAddr("192.0.2.101")
)

// NATTable is the nftables table (family ip) of every NAT router namespace.
const NATTable = "smlab_nat"

// natCounter is the named counter of inbound packets the router dropped.
const natCounter = "inbound_dropped"

// NATSpec is a NAT router to create.
type NATSpec struct {
	// Name is the lab-local router name: 1 to 20 of [a-z0-9-], starting with a
	// letter or digit; the router namespace is "smlab-<id>-nat-<name>".
	Name string
	Kind NATKind
	// Prefix is the private subnet behind the router (IPv4, /8 to /30, not
	// overlapping UnderlayPrefix). Zero means 10.<n>.0.0/24 for the lab's n-th
	// NAT. Two NATs may use the same prefix, as two home networks do.
	Prefix netip.Prefix
	// PublicAddr is the router's address on the public underlay; zero means the
	// next free address from FirstNATAddr.
	PublicAddr netip.Addr
}

// NAT is a router namespace with eth0 on the public underlay bridge (PublicAddr)
// and a private bridge lan0 (Gateway on Prefix) to which the hosts behind it are
// attached; those hosts have a default route via Gateway. The router translates
// with one nftables table, NATTable, as its Kind says, and forwards IPv4 only.
type NAT struct {
	Name string
	Kind NATKind
	// Namespace is the router's network namespace ("smlab-<id>-nat-<name>").
	Namespace string
	// PublicAddr is the router's eth0 address on the public underlay: the source
	// address every host behind a port-preserving or symmetric NAT is seen with.
	PublicAddr netip.Addr
	// Prefix is the private subnet; Gateway (its first address) the router's
	// address on lan0.
	Prefix  netip.Prefix
	Gateway netip.Addr
	// Index numbers NATs from 1 in creation order.
	Index int
	// Dir holds the router's current ruleset ("ruleset.nft").
	Dir string

	lab *Lab
	// applyMu serialises ruleset updates; tableRecorded is set once Close knows
	// about the table (guarded by applyMu).
	applyMu       sync.Mutex
	tableRecorded bool
}

var natNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,19}$`)

// AddNAT creates a NAT router: its namespace, a veth pair r<n> (on the public
// bridge) / eth0 (in the router, PublicAddr/24), the private bridge lan0 with
// Gateway, IPv4 forwarding and the nftables table of its kind. Hosts join it with
// AddHostBehind or Host.MoveTo. On error, what was already created stays recorded
// and Close removes it.
func (l *Lab) AddNAT(ctx context.Context, spec NATSpec) (*NAT, error) {
	if !natNameRE.MatchString(spec.Name) {
		return nil, fmt.Errorf("adding NAT %q: the name must be 1 to 20 of [a-z0-9-], starting with a letter or digit", spec.Name)
	}
	if !spec.Kind.valid() {
		return nil, fmt.Errorf("adding NAT %s: unknown kind %q (want one of %v)", spec.Name, spec.Kind, NATKinds)
	}
	l.mu.Lock()
	n, err := l.newNATLocked(spec)
	if err != nil {
		l.mu.Unlock()
		return nil, fmt.Errorf("adding NAT %s: %w", spec.Name, err)
	}
	l.nats = append(l.nats, n)
	l.mu.Unlock()

	if err := n.create(ctx); err != nil {
		return nil, fmt.Errorf("adding NAT %s: %w", spec.Name, err)
	}
	l.log.Debug("NAT added", "nat", n.Name, "kind", n.Kind, "netns", n.Namespace, "public", n.PublicAddr, "prefix", n.Prefix)
	return n, nil
}

// newNATLocked validates spec, fills in its defaults and reserves its addresses.
func (l *Lab) newNATLocked(spec NATSpec) (*NAT, error) {
	if l.closing {
		return nil, errors.New("lab is closed")
	}
	for _, x := range l.nats {
		if x.Name == spec.Name {
			return nil, errors.New("a NAT of that name exists")
		}
	}
	index := len(l.nats) + 1
	prefix := spec.Prefix
	if !prefix.IsValid() {
		if index > 255 {
			return nil, errors.New("no default private prefix beyond the 255th NAT: set NATSpec.Prefix")
		}
		prefix = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(index), 0, 0}), 24)
	}
	switch {
	case !prefix.Addr().Is4() || prefix.Bits() < 8 || prefix.Bits() > 30:
		return nil, fmt.Errorf("private prefix %s: want an IPv4 prefix of length 8 to 30", prefix)
	case prefix.Masked() != prefix:
		return nil, fmt.Errorf("private prefix %s has host bits set: use %s", prefix, prefix.Masked())
	case prefix.Overlaps(UnderlayPrefix):
		return nil, fmt.Errorf("private prefix %s overlaps the public underlay %s", prefix, UnderlayPrefix)
	}
	public := spec.PublicAddr
	if public.IsValid() {
		if err := l.checkFreeLocked(nil, public, nil); err != nil {
			return nil, fmt.Errorf("public address: %w", err)
		}
	} else {
		var err error
		if public, err = l.nextFreeLocked(nil, FirstNATAddr, nil); err != nil {
			return nil, fmt.Errorf("public address: %w", err)
		}
	}
	return &NAT{
		Name:       spec.Name,
		Kind:       spec.Kind,
		Namespace:  nsPrefix + l.ID + "-nat-" + spec.Name,
		PublicAddr: public,
		Prefix:     prefix,
		Gateway:    prefix.Addr().Next(),
		Index:      index,
		Dir:        filepath.Join(l.Dir, "nat-"+spec.Name),
		lab:        l,
	}, nil
}

// create makes the router's namespace, links, forwarding and ruleset.
func (n *NAT) create(ctx context.Context) error {
	l := n.lab
	if err := os.MkdirAll(n.Dir, 0o755); err != nil {
		return err
	}
	if err := l.addNamespace(ctx, n.Namespace); err != nil {
		return err
	}
	uplink := fmt.Sprintf("r%d", n.Index)
	if err := l.addLink(ctx, l.underlayNS, uplink, "type", "veth", "peer", "name", "eth0", "netns", n.Namespace); err != nil {
		return err
	}
	if err := l.ip(ctx, "-n", l.underlayNS, "link", "set", uplink, "master", "br0", "up"); err != nil {
		return err
	}
	if err := l.addLink(ctx, n.Namespace, "lan0", "type", "bridge"); err != nil {
		return err
	}
	steps := [][]string{
		{"-n", n.Namespace, "addr", "add", netip.PrefixFrom(n.PublicAddr, UnderlayPrefix.Bits()).String(), "dev", "eth0"},
		{"-n", n.Namespace, "link", "set", "eth0", "up"},
		{"-n", n.Namespace, "addr", "add", netip.PrefixFrom(n.Gateway, n.Prefix.Bits()).String(), "dev", "lan0"},
		{"-n", n.Namespace, "link", "set", "lan0", "up"},
	}
	for _, args := range steps {
		if err := l.ip(ctx, args...); err != nil {
			return err
		}
	}
	if _, err := runCmd(ctx, "ip", "netns", "exec", n.Namespace, "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
		return fmt.Errorf("enabling IPv4 forwarding: %w", err)
	}
	return n.apply(ctx)
}

// NAT returns the NAT called name, or nil.
func (l *Lab) NAT(name string) *NAT {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, n := range l.nats {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// NATs returns the lab's NATs in creation order.
func (l *Lab) NATs() []*NAT {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*NAT(nil), l.nats...)
}

// AddHostBehind creates a host like AddHost, but attached to nat's private bridge
// with address addr (an invalid addr: the next free address of nat.Prefix after
// the gateway) and a default route via nat.Gateway. Behind a 1:1 NAT the host also
// gets a public address (the next free from FirstOneToOneAddr).
func (l *Lab) AddHostBehind(ctx context.Context, name string, nat *NAT, addr netip.Addr) (*Host, error) {
	if nat == nil || nat.lab != l {
		return nil, fmt.Errorf("adding host %s: no NAT of this lab given (use AddHost for the public underlay)", name)
	}
	return l.addHost(ctx, name, nat, addr)
}

// Hosts returns the hosts currently behind the NAT, in creation order.
func (n *NAT) Hosts() []*Host {
	l := n.lab
	l.mu.Lock()
	defer l.mu.Unlock()
	var hs []*Host
	for _, h := range l.hosts {
		if h.nat == n {
			hs = append(hs, h)
		}
	}
	return hs
}

// oneToOne is one 1:1 mapping: a host's public and private address.
type oneToOne struct{ public, private netip.Addr }

// Ruleset returns the nftables ruleset the router holds for its current hosts.
func (n *NAT) Ruleset() string {
	return natRuleset(n.Kind, n.PublicAddr, n.Prefix, n.mappings())
}

// mappings returns the 1:1 mappings of the hosts behind the NAT.
func (n *NAT) mappings() []oneToOne {
	l := n.lab
	l.mu.Lock()
	defer l.mu.Unlock()
	var maps []oneToOne
	for _, h := range l.hosts {
		if h.nat == n && h.public.IsValid() {
			maps = append(maps, oneToOne{h.public, h.Addr})
		}
	}
	return maps
}

// natRuleset is the table NATTable for a router of kind with public address
// public, private subnet prefix and, for a 1:1 NAT, the hosts' mappings. eth0 is
// the public side. Inbound packets on eth0 pass only as replies of a conntrack
// entry (established, related), as ICMP echo requests to the router, or (1:1)
// when dnat translated them; the rest is counted and dropped.
func natRuleset(kind NATKind, public netip.Addr, prefix netip.Prefix, maps []oneToOne) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	w("table ip %s {", NATTable)
	w("\tcounter %s {", natCounter)
	w("\t}")
	w("\tchain prerouting {")
	w("\t\ttype nat hook prerouting priority dstnat; policy accept;")
	for _, m := range maps {
		w("\t\tiifname \"eth0\" ip daddr %s dnat to %s", m.public, m.private)
	}
	w("\t}")
	w("\tchain postrouting {")
	w("\t\ttype nat hook postrouting priority srcnat; policy accept;")
	switch kind {
	case NATPortPreserving:
		w("\t\toifname \"eth0\" ip saddr %s snat to %s", prefix, public)
	case NATSymmetric:
		w("\t\toifname \"eth0\" ip saddr %s snat to %s random", prefix, public)
	case NATOneToOne:
		for _, m := range maps {
			w("\t\toifname \"eth0\" ip saddr %s snat to %s", m.private, m.public)
		}
	}
	w("\t}")
	w("\tchain forward {")
	w("\t\ttype filter hook forward priority filter; policy accept;")
	w("\t\tiifname \"eth0\" ct state established,related accept")
	if kind == NATOneToOne {
		w("\t\tiifname \"eth0\" ct status dnat accept")
	}
	w("\t\tiifname \"eth0\" counter name %q drop", natCounter)
	w("\t}")
	w("\tchain input {")
	w("\t\ttype filter hook input priority filter; policy accept;")
	w("\t\tiifname \"eth0\" ct state established,related accept")
	w("\t\tiifname \"eth0\" icmp type echo-request accept")
	w("\t\tiifname \"eth0\" counter name %q drop", natCounter)
	w("\t}")
	w("}")
	return b.String()
}

// apply replaces the router's table with Ruleset in one nftables transaction
// (conntrack entries, hence existing mappings, survive) and keeps the ruleset in
// Dir/ruleset.nft. A 1:1 router also holds each mapped public address on eth0 (as
// a /32), so that it answers ARP for it on the public bridge.
func (n *NAT) apply(ctx context.Context) error {
	n.applyMu.Lock()
	defer n.applyMu.Unlock()
	maps := n.mappings()
	if n.Kind == NATOneToOne {
		if err := n.syncPublicAddrs(ctx, maps); err != nil {
			return err
		}
	}
	// "table X" before "delete table X" makes the delete succeed on the first apply.
	text := fmt.Sprintf("table ip %s\ndelete table ip %s\n%s", NATTable, NATTable, natRuleset(n.Kind, n.PublicAddr, n.Prefix, maps))
	path := filepath.Join(n.Dir, "ruleset.nft")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		return fmt.Errorf("writing the ruleset of NAT %s: %w", n.Name, err)
	}
	if _, err := runCmd(ctx, "ip", "netns", "exec", n.Namespace, "nft", "-f", path); err != nil {
		return fmt.Errorf("loading the ruleset of NAT %s (%s): %w", n.Name, path, err)
	}
	if !n.tableRecorded {
		n.lab.record(resource{ns: n.Namespace, kind: resourceTable, name: "ip " + NATTable})
		n.tableRecorded = true
	}
	return nil
}

// SetKind changes the router's kind (what a NAT that an operator reconfigures,
// or a router that reboots with another firmware, does): it replaces the
// ruleset and flushes the router's conntrack table, so that no mapping of the
// old kind survives. Changing from or to NATOneToOne is refused (the hosts'
// public addresses would change).
func (n *NAT) SetKind(ctx context.Context, kind NATKind) error {
	if !kind.valid() || kind == NATOneToOne || n.Kind == NATOneToOne {
		return fmt.Errorf("NAT %s: cannot change kind %s to %q", n.Name, n.Kind, kind)
	}
	n.applyMu.Lock()
	n.Kind = kind
	n.applyMu.Unlock()
	if err := n.apply(ctx); err != nil {
		return err
	}
	if err := inNamespace(n.Namespace, func() error { return netlink.ConntrackTableFlush(netlink.ConntrackTable) }); err != nil {
		return fmt.Errorf("flushing the conntrack table of NAT %s: %w", n.Name, err)
	}
	n.lab.log.Debug("NAT kind changed", "nat", n.Name, "kind", kind)
	return nil
}

// syncPublicAddrs makes the /32 addresses on the router's eth0 the public
// addresses of maps.
func (n *NAT) syncPublicAddrs(ctx context.Context, maps []oneToOne) error {
	out, err := runCmd(ctx, "ip", "-j", "-n", n.Namespace, "-4", "addr", "show", "dev", "eth0")
	if err != nil {
		return fmt.Errorf("listing the public addresses of NAT %s: %w", n.Name, err)
	}
	var links []struct {
		AddrInfo []struct {
			Local     netip.Addr `json:"local"`
			PrefixLen int        `json:"prefixlen"`
		} `json:"addr_info"`
	}
	if err := json.Unmarshal([]byte(out), &links); err != nil {
		return fmt.Errorf("decoding the addresses of NAT %s (%q): %w", n.Name, out, err)
	}
	have := map[netip.Addr]bool{}
	for _, l := range links {
		for _, a := range l.AddrInfo {
			if a.PrefixLen == 32 {
				have[a.Local] = true
			}
		}
	}
	for _, m := range maps {
		if have[m.public] {
			delete(have, m.public)
			continue
		}
		if err := n.lab.ip(ctx, "-n", n.Namespace, "addr", "add", netip.PrefixFrom(m.public, 32).String(), "dev", "eth0"); err != nil {
			return fmt.Errorf("adding public address %s to NAT %s: %w", m.public, n.Name, err)
		}
	}
	for a := range have {
		if err := n.lab.ip(ctx, "-n", n.Namespace, "addr", "del", netip.PrefixFrom(a, 32).String(), "dev", "eth0"); err != nil {
			return fmt.Errorf("removing public address %s from NAT %s: %w", a, n.Name, err)
		}
	}
	return nil
}

// DroppedInbound returns how many inbound packets (on the public side) the router
// dropped since its ruleset was last loaded (at AddNAT, and for a 1:1 NAT each
// time a host joins, leaves or renumbers): unsolicited packets, and replies from
// a remote that no mapping was made for.
func (n *NAT) DroppedInbound(ctx context.Context) (uint64, error) {
	out, err := runCmd(ctx, "ip", "netns", "exec", n.Namespace, "nft", "-j", "list", "counter", "ip", NATTable, natCounter)
	if err != nil {
		return 0, fmt.Errorf("reading the drop counter of NAT %s: %w", n.Name, err)
	}
	return parseNFTCounter(out)
}

// parseNFTCounter returns the packets of the one counter in `nft -j list counter`
// output ({"nftables": [{"metainfo": ...}, {"counter": {"packets": N, ...}}]}).
func parseNFTCounter(out string) (uint64, error) {
	var doc struct {
		Nftables []struct {
			Counter *struct {
				Packets uint64 `json:"packets"`
			} `json:"counter"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		return 0, fmt.Errorf("decoding nft counter %q: %w", out, err)
	}
	for _, o := range doc.Nftables {
		if o.Counter != nil {
			return o.Counter.Packets, nil
		}
	}
	return 0, fmt.Errorf("no counter in nft output %q", out)
}

func natName(n *NAT) string {
	if n == nil {
		return ""
	}
	return n.Name
}
