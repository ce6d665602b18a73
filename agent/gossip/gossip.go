// Package gossip runs the agents' encrypted memberlist cluster (SWIM, via
// github.com/hashicorp/memberlist). Every member advertises its WireGuard public key
// and WireGuard endpoint as node metadata, in a claim signed with its identity key
// (the TLS client key the controller knows); the agent uses the members it sees for
// peer liveness and to learn new endpoints of peers its netmap already authorises.
// This package only reports what members say; it decides nothing about peers.
package gossip

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"segmesh/agent/dataplane"
)

// Meta is what a member says about itself.
type Meta struct {
	PublicKey dataplane.Key
	// Endpoint is the member's WireGuard underlay address.
	Endpoint netip.AddrPort
}

// Claim is a member's signed endpoint claim, the memberlist node metadata: the
// member's name and Meta, when it was signed, and an ECDSA signature by the
// member's identity key (its TLS client key) over ClaimDigest. Only the signature
// makes a claim trustworthy: anyone with the gossip key can send metadata.
type Claim struct {
	Name string
	Meta
	// Timestamp is when the claim was signed, in Unix nanoseconds; a receiver
	// accepts only claims newer than the last one it accepted from the member.
	Timestamp int64
	// Signature is the ASN.1 ECDSA signature over ClaimDigest.
	Signature []byte
}

// claimDomain separates endpoint-claim signatures from any other use of the key.
const claimDomain = "segmesh-endpoint-claim-v1\x00"

// ClaimDigest returns the SHA-256 that c.Signature signs: the domain string, then
// the name and the endpoint as 2-byte big-endian length plus bytes, the 32-byte
// WireGuard key and the timestamp as 8 bytes big-endian.
func (c Claim) ClaimDigest() [sha256.Size]byte {
	ep := ""
	if c.Endpoint.IsValid() {
		ep = c.Endpoint.String()
	}
	b := make([]byte, 0, len(claimDomain)+2+len(c.Name)+len(c.PublicKey)+2+len(ep)+8)
	b = append(b, claimDomain...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(c.Name)))
	b = append(b, c.Name...)
	b = append(b, c.PublicKey[:]...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(ep)))
	b = append(b, ep...)
	b = binary.BigEndian.AppendUint64(b, uint64(c.Timestamp))
	return sha256.Sum256(b)
}

// SignClaim returns the claim of member name advertising m at time ts, signed with
// key. Errors: a name longer than 255 bytes, a failed signature, or an encoding
// longer than memberlist's metadata limit (512 bytes).
func SignClaim(name string, m Meta, ts time.Time, key *ecdsa.PrivateKey) (Claim, error) {
	if len(name) > maxNameLen {
		return Claim{}, fmt.Errorf("signing endpoint claim: name of %d bytes, at most %d", len(name), maxNameLen)
	}
	c := Claim{Name: name, Meta: m, Timestamp: ts.UnixNano()}
	d := c.ClaimDigest()
	sig, err := ecdsa.SignASN1(rand.Reader, key, d[:])
	if err != nil {
		return Claim{}, fmt.Errorf("signing endpoint claim of %s: %w", name, err)
	}
	c.Signature = sig
	if n := len(c.Encode()); n > memberlist.MetaMaxSize {
		return Claim{}, fmt.Errorf("signing endpoint claim of %s: %d bytes encoded, at most %d", name, n, memberlist.MetaMaxSize)
	}
	return c, nil
}

// Verify reports whether c carries a valid signature by pub. A nil pub verifies
// nothing.
func (c Claim) Verify(pub *ecdsa.PublicKey) bool {
	if pub == nil || len(c.Signature) == 0 {
		return false
	}
	d := c.ClaimDigest()
	return ecdsa.VerifyASN1(pub, d[:], c.Signature)
}

// maxNameLen bounds the member name in a claim, so that the encoding stays within
// memberlist's 512-byte metadata limit.
const maxNameLen = 255

// claimJSON is Claim's encoding in memberlist node metadata (at most 512 bytes:
// name 255, key 44, endpoint 47, timestamp 20, signature at most 96 in base64,
// plus 80 bytes of field names and punctuation).
type claimJSON struct {
	Name      string `json:"n"`
	PublicKey []byte `json:"k"`
	Endpoint  string `json:"e,omitempty"`
	Timestamp int64  `json:"t"`
	Signature []byte `json:"s"`
}

// Encode returns c as memberlist node metadata.
func (c Claim) Encode() []byte {
	ep := ""
	if c.Endpoint.IsValid() {
		ep = c.Endpoint.String()
	}
	b, err := json.Marshal(claimJSON{Name: c.Name, PublicKey: c.PublicKey[:], Endpoint: ep, Timestamp: c.Timestamp, Signature: c.Signature})
	if err != nil {
		panic(fmt.Sprintf("gossip: encoding claim: %v", err)) // cannot happen for these types
	}
	return b
}

// DecodeClaim parses node metadata written by Encode. It checks the shape only,
// not the signature (see Claim.Verify).
func DecodeClaim(b []byte) (Claim, error) {
	var j claimJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return Claim{}, fmt.Errorf("decoding member claim: %w", err)
	}
	var c Claim
	if len(j.PublicKey) != len(c.PublicKey) {
		return Claim{}, fmt.Errorf("decoding member claim: public key of %d bytes", len(j.PublicKey))
	}
	if len(j.Name) > maxNameLen {
		return Claim{}, fmt.Errorf("decoding member claim: name of %d bytes", len(j.Name))
	}
	if len(j.Signature) == 0 {
		return Claim{}, errors.New("decoding member claim: no signature")
	}
	copy(c.PublicKey[:], j.PublicKey)
	if j.Endpoint != "" {
		ep, err := netip.ParseAddrPort(j.Endpoint)
		if err != nil {
			return Claim{}, fmt.Errorf("decoding member claim: endpoint: %w", err)
		}
		c.Endpoint = ep
	}
	c.Name, c.Timestamp, c.Signature = j.Name, j.Timestamp, j.Signature
	return c, nil
}

// Config configures one memberlist instance.
type Config struct {
	// NodeName is the member name (the segmesh node name); unique in the cluster.
	NodeName string
	// BindAddr is the underlay address to bind and advertise.
	BindAddr netip.Addr
	// Port is the UDP and TCP gossip port; 0 picks a free one (tests).
	Port int
	// Key is the AES key (16, 24 or 32 bytes) that encrypts and authenticates all
	// gossip; an empty key disables gossip.
	Key  []byte
	Meta Meta
	// IdentityKey signs the advertised claims (the agent's TLS client key); required
	// when Key is set.
	IdentityKey *ecdsa.PrivateKey
}

func (c Config) sameCluster(o Config) bool {
	return c.NodeName == o.NodeName && c.BindAddr == o.BindAddr && c.Port == o.Port && bytes.Equal(c.Key, o.Key) &&
		c.IdentityKey != nil && o.IdentityKey != nil && c.IdentityKey.Equal(o.IdentityKey)
}

// Member is another alive member of the cluster.
type Member struct {
	Name string
	// Addr is the member's gossip address.
	Addr netip.AddrPort
	// Claim is what the member advertises, its signature not yet verified.
	Claim Claim
}

// Manager owns at most one memberlist instance and restarts it when the cluster
// configuration (name, bind address, port or key) changes. Its methods are safe for
// concurrent use.
type Manager struct {
	log      *slog.Logger
	onChange func()

	mu       sync.Mutex
	cfg      Config
	ml       *memberlist.Memberlist
	delegate *delegate
	logs     *logWriter // the running instance's log sink
	lastTS   int64      // timestamp of the last signed claim, kept across restarts
}

// NewManager returns a stopped manager. onChange is called, from memberlist's
// goroutines, whenever a member joins, leaves or changes its metadata; it must not
// block. logger receives memberlist's log lines at their levels.
func NewManager(logger *slog.Logger, onChange func()) *Manager {
	if logger == nil {
		logger = slog.Default()
	}
	if onChange == nil {
		onChange = func() {}
	}
	return &Manager{log: logger, onChange: onChange}
}

// Configure starts memberlist with cfg, restarts it when the cluster configuration
// changed, updates the advertised metadata when only that changed, and stops it when
// cfg.Key is empty. Every new advertisement is a claim signed with cfg.IdentityKey
// at the current time (strictly later than the previous one).
//
// Memberlist binds the wildcard address of cfg.BindAddr's family and advertises
// cfg.BindAddr (which may be an address behind NAT that cannot be bound). So when
// the host's address changes (it roamed), the restart's leave goes out from the
// new address, the old one being gone: the other members mark the old entry left
// and take the new address at once, instead of calling it a conflict until the
// old entry is dead plus DeadNodeReclaimTime.
func (m *Manager) Configure(cfg Config) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(cfg.Key) == 0 {
		m.stopLocked()
		return nil
	}
	if cfg.IdentityKey == nil {
		return errors.New("starting gossip: no identity key to sign endpoint claims with")
	}
	if m.ml != nil && m.cfg.sameCluster(cfg) {
		if m.cfg.Meta == cfg.Meta {
			return nil
		}
		meta, err := m.signLocked(cfg)
		if err != nil {
			return err
		}
		m.delegate.setMeta(meta)
		m.cfg.Meta = cfg.Meta
		if err := m.ml.UpdateNode(5 * time.Second); err != nil {
			return fmt.Errorf("advertising new gossip metadata: %w", err)
		}
		return nil
	}
	m.stopLocked()
	meta, err := m.signLocked(cfg)
	if err != nil {
		return err
	}
	d := &delegate{onChange: m.onChange, meta: meta, self: cfg.NodeName}
	lw := &logWriter{log: m.log}
	wild := netip.IPv4Unspecified()
	if cfg.BindAddr.Is6() {
		wild = netip.IPv6Unspecified()
	}
	ml, err := memberlist.Create(m.memberlistConfig(cfg, wild, d, lw))
	if err != nil {
		return fmt.Errorf("starting gossip on %s (advertising %s): %w", net.JoinHostPort(wild.String(), strconv.Itoa(cfg.Port)), cfg.BindAddr, err)
	}
	m.ml, m.cfg, m.delegate, m.logs = ml, cfg, d, lw
	ln := ml.LocalNode()
	m.log.Info("gossip started", "name", cfg.NodeName, "addr", ln.Address())
	return nil
}

func (m *Manager) memberlistConfig(cfg Config, bind netip.Addr, d *delegate, lw *logWriter) *memberlist.Config {
	c := memberlist.DefaultLANConfig()
	c.Name = cfg.NodeName
	c.BindAddr = bind.String()
	c.BindPort = cfg.Port
	c.AdvertiseAddr = cfg.BindAddr.String()
	c.AdvertisePort = cfg.Port
	c.SecretKey = slices.Clone(cfg.Key)
	c.GossipVerifyIncoming = true
	c.GossipVerifyOutgoing = true
	c.Delegate = d
	c.Events = d
	c.Conflict = d
	// A restarted agent may come back with a new address under the same name.
	c.DeadNodeReclaimTime = 10 * time.Second
	c.Logger = log.New(lw, "", 0)
	return c
}

// signLocked returns cfg's claim, signed now (strictly after the previous claim),
// encoded as node metadata.
func (m *Manager) signLocked(cfg Config) ([]byte, error) {
	ts := time.Now()
	if ts.UnixNano() <= m.lastTS {
		ts = time.Unix(0, m.lastTS+1)
	}
	c, err := SignClaim(cfg.NodeName, cfg.Meta, ts, cfg.IdentityKey)
	if err != nil {
		return nil, err
	}
	m.lastTS = c.Timestamp
	return c.Encode(), nil
}

// Join contacts the given gossip addresses that are not alive members already and
// returns how many were reached. Joining nothing is not an error.
func (m *Manager) Join(addrs []netip.AddrPort) (int, error) {
	m.mu.Lock()
	ml, d := m.ml, m.delegate
	m.mu.Unlock()
	if ml == nil {
		return 0, errors.New("joining gossip: not running")
	}
	known := map[netip.AddrPort]bool{}
	for _, n := range d.current() {
		known[n.addr] = true
	}
	var todo []string
	for _, a := range addrs {
		if a.IsValid() && !known[a] {
			todo = append(todo, a.String())
		}
	}
	if len(todo) == 0 {
		return 0, nil
	}
	n, err := ml.Join(todo)
	if err != nil && n == 0 {
		return 0, fmt.Errorf("joining gossip via %s: %w", strings.Join(todo, ", "), err)
	}
	return n, nil
}

// Members returns the other members that joined and did not leave or die (alive
// or suspect) whose metadata decodes, sorted by name. A member that announced
// itself from a new address while memberlist still holds its old one (see
// delegate.NotifyConflict) is listed with the new address and claim when that
// claim is newer.
func (m *Manager) Members() []Member {
	m.mu.Lock()
	d, self := m.delegate, m.cfg.NodeName
	m.mu.Unlock()
	if d == nil {
		return nil
	}
	var out []Member
	for _, n := range d.current() {
		if n.name == self {
			continue
		}
		claim, err := DecodeClaim(n.meta)
		if err != nil {
			m.log.Debug("ignoring gossip member with bad metadata", "member", n.name, "err", err)
			continue
		}
		out = append(out, Member{Name: n.name, Addr: n.addr, Claim: claim})
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// LocalAddr returns the gossip address this member advertises, or the zero value
// when gossip is not running.
func (m *Manager) LocalAddr() netip.AddrPort {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ml == nil {
		return netip.AddrPort{}
	}
	ln := m.ml.LocalNode()
	a, _ := netip.AddrFromSlice(ln.Addr)
	return netip.AddrPortFrom(a.Unmap(), ln.Port)
}

// Stop leaves the cluster (waiting at most one second for the broadcast) and shuts
// memberlist down. It is safe to call when stopped.
func (m *Manager) Stop() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.stopLocked()
}

func (m *Manager) stopLocked() {
	if m.ml == nil {
		return
	}
	if err := m.ml.Leave(time.Second); err != nil {
		m.log.Debug("leaving gossip", "err", err)
	}
	// memberlist's Shutdown closes its sockets before it stops its probe and gossip
	// timers, so a probe in flight fails with "use of closed network connection";
	// from here on that is expected and logged at debug level.
	m.logs.stopping.Store(true)
	if err := m.ml.Shutdown(); err != nil {
		m.log.Warn("stopping gossip", "err", err)
	}
	m.log.Info("gossip stopped", "name", m.cfg.NodeName)
	m.ml, m.delegate, m.cfg, m.logs = nil, nil, Config{}, nil
	m.onChange()
}

// delegate serves our metadata, keeps a copy of the members and forwards
// membership events.
//
// The copy exists because memberlist.Members returns pointers to nodes that its
// packet handlers keep updating; the event callbacks, by contrast, run under
// memberlist's node lock, so copying the node there is race-free.
type delegate struct {
	onChange func()
	self     string // our member name
	mu       sync.Mutex
	meta     []byte
	members  map[string]member
	// moved holds, by name, the latest announcement of a known member from
	// another address than the one memberlist holds for it (NotifyConflict); it
	// is dropped when memberlist takes that address or the member is updated.
	moved map[string]member
}

// member is a copy of what memberlist knows about a node.
type member struct {
	name string
	addr netip.AddrPort
	meta []byte
	at   time.Time // when it was announced; only for moved
}

// movedTTL bounds how long an announcement from a new address (delegate.moved)
// counts without being repeated: memberlist takes the new address itself once
// the old entry is dead plus DeadNodeReclaimTime (about 20 s on a LAN), and a
// member that died meanwhile must not stay listed.
const movedTTL = time.Minute

func (d *delegate) put(n *memberlist.Node) {
	a, _ := netip.AddrFromSlice(n.Addr)
	m := member{name: n.Name, addr: netip.AddrPortFrom(a.Unmap(), n.Port), meta: slices.Clone(n.Meta)}
	d.mu.Lock()
	if d.members == nil {
		d.members = map[string]member{}
	}
	if mv, ok := d.moved[n.Name]; ok && (mv.addr == m.addr || !newerClaim(mv.meta, m.meta)) {
		delete(d.moved, n.Name)
	}
	d.members[n.Name] = m
	d.mu.Unlock()
	d.onChange()
}

// current returns the members, each replaced by its announcement from a new
// address (moved) when that carries a newer claim. A moved member whose old
// entry left or died is listed too: it announced itself alive.
func (d *delegate) current() []member {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := time.Now()
	for name, mv := range d.moved {
		if now.Sub(mv.at) > movedTTL {
			delete(d.moved, name)
		}
	}
	out := make([]member, 0, len(d.members)+len(d.moved))
	for name, m := range d.members {
		if mv, ok := d.moved[name]; ok && newerClaim(mv.meta, m.meta) {
			m = mv
		}
		out = append(out, m)
	}
	for name, mv := range d.moved {
		if _, ok := d.members[name]; !ok {
			out = append(out, mv)
		}
	}
	return out
}

// newerClaim reports whether metadata a decodes to a claim newer than b's (or b
// does not decode). Signatures are checked by the receiver of Members.
func newerClaim(a, b []byte) bool {
	ca, err := DecodeClaim(a)
	if err != nil {
		return false
	}
	cb, err := DecodeClaim(b)
	return err != nil || ca.Timestamp > cb.Timestamp
}

func (d *delegate) NotifyJoin(n *memberlist.Node)   { d.put(n) }
func (d *delegate) NotifyUpdate(n *memberlist.Node) { d.put(n) }
func (d *delegate) NotifyLeave(n *memberlist.Node) {
	d.mu.Lock()
	delete(d.members, n.Name)
	d.mu.Unlock()
	d.onChange()
}

// NotifyConflict is memberlist telling that other announced itself alive under
// the name of existing from another address. Memberlist keeps existing until it
// is dead plus DeadNodeReclaimTime; a member that roamed without its leave
// reaching us (it restarted, or its leave was lost) would be unreachable through
// gossip meanwhile. The announcement is kept (moved) so that Members can offer
// its claim, which the receiver verifies like any other; announcements about
// ourselves are ignored; memberlist reports conflicts only for names in its node
// map, so moved stays bounded by it (and entries expire after movedTTL).
func (d *delegate) NotifyConflict(existing, other *memberlist.Node) {
	if other.Name == d.self || existing.Name != other.Name {
		return
	}
	a, _ := netip.AddrFromSlice(other.Addr)
	m := member{name: other.Name, addr: netip.AddrPortFrom(a.Unmap(), other.Port), meta: slices.Clone(other.Meta), at: time.Now()}
	d.mu.Lock()
	prev, had := d.moved[other.Name]
	changed := !had || prev.addr != m.addr || !bytes.Equal(prev.meta, m.meta)
	if d.moved == nil {
		d.moved = map[string]member{}
	}
	d.moved[other.Name] = m
	d.mu.Unlock()
	if changed {
		d.onChange()
	}
}

func (d *delegate) setMeta(b []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.meta = b
}

func (d *delegate) NodeMeta(limit int) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.meta) > limit {
		return nil
	}
	return slices.Clone(d.meta)
}

func (d *delegate) NotifyMsg([]byte)                           {}
func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (d *delegate) LocalState(join bool) []byte                { return nil }
func (d *delegate) MergeRemoteState(buf []byte, join bool)     {}

// logWriter turns memberlist's "[LEVEL] memberlist: message" lines into slog records.
// Once stopping is set, errors about closed sockets are demoted to debug: they come
// from memberlist's own shutdown order, not from a fault.
type logWriter struct {
	log      *slog.Logger
	stopping atomic.Bool
}

func (w *logWriter) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	level := slog.LevelInfo
	for prefix, l := range map[string]slog.Level{
		"[DEBUG]": slog.LevelDebug, "[INFO]": slog.LevelInfo, "[WARN]": slog.LevelWarn,
		"[ERR]": slog.LevelError, "[ERROR]": slog.LevelError,
	} {
		if rest, ok := strings.CutPrefix(line, prefix); ok {
			level, line = l, strings.TrimSpace(rest)
			break
		}
	}
	line = strings.TrimPrefix(line, "memberlist: ")
	if level > slog.LevelDebug && w.stopping.Load() && strings.Contains(line, net.ErrClosed.Error()) {
		level = slog.LevelDebug
	}
	w.log.Log(context.Background(), level, line)
	return len(p), nil
}
