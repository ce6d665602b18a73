// Package relay is the agent-side relay forwarder for segmesh (issue 10): a
// TURN-like (RFC 8656 as the model) pair of UDP ports per pair of nodes the
// controller authorised (api/segmesh/v1 RelaySession), forwarding WireGuard
// packets between the two ends without any private key.
//
// Forwarding rules. A session has ports PortA and PortB. A packet arriving at
// PortA comes from end A and is sent to end B from PortB (so B's WireGuard
// roams its endpoint for A to relay:PortB); PortB is symmetric.
//
// The relay reads nothing but the WireGuard message header (WireGuard
// whitepaper section 5.4; wireguard-go device/noise-protocol.go and
// device/cookie.go):
//
//   - Handshake initiation (type 1, 148 bytes) and response (type 2, 92
//     bytes) carry mac1 = MAC(HASH("mac1----" || receiver public key),
//     msg[:len-32]) at msg[len-32:len-16] (section 5.4.4). A handshake message
//     arriving at PortA is accepted only if its mac1 is valid for KeyB (the
//     receiver), checked with wireguard-go's device.CookieChecker. The first
//     accepted message latches the sender's address for its side. mac1 proves
//     only knowledge of the receiver's public key, which every peer of the
//     receiver holds, so an accepted message from another address does not
//     move the latch by itself: it is forwarded and its sender index
//     remembered (the last 8 per side; not an index the latch or an earlier
//     roam uses, which anyone on the path could copy), and the latch moves
//     (the end roamed) only when the other end, from its latched address,
//     answers that index with a handshake response or transport data, which
//     it sends only for a handshake it authenticated. A message whose mac1 was already seen on
//     that side (the last 64 are kept) is a replay and is dropped.
//   - Cookie replies (type 3, 64 bytes) and transport data (type 4, at least
//     32 bytes) are forwarded only from the latched address of their side.
//   - Everything else (unlatched source, bad mac1, wrong size, unknown type,
//     STUN, garbage) is dropped and counted by reason in Stats.
//   - If the other end has not latched yet, the latest accepted handshake
//     message is kept for up to 5 s and delivered when the other end latches,
//     so the first handshake does not wait for WireGuard's 5 s retry; the
//     latching message itself is then not forwarded (crossing initiations
//     would make both ends refuse each other's response).
//   - Bytes are limited by a per-session and a total token bucket
//     (golang.org/x/time/rate); packets beyond are dropped and counted.
//   - An expired session stops forwarding at once, even before the next Set.
package relay

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"golang.zx2c4.com/wireguard/device"
)

// Session is one authorised pair: the WireGuard public keys of the two ends
// and the relay's UDP port for each end. Expires is when it stops forwarding.
type Session struct {
	ID           uint64
	KeyA, KeyB   [32]byte
	PortA, PortB uint16
	Expires      time.Time
}

// Options configure a Forwarder. Zero values take the defaults.
type Options struct {
	// ListenAddr is the address the ports are bound on; invalid = wildcard
	// (both families where the OS allows).
	ListenAddr netip.Addr
	// SessionRate and TotalRate are in bytes per second; defaults 64 MiB/s
	// per session and 256 MiB/s in total.
	SessionRate, TotalRate int
	// MaxSessions is the most sessions Set applies; default 1024.
	MaxSessions int
	Logger      *slog.Logger
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// DropReason says why a packet was not forwarded.
type DropReason int

// Drop reasons, the index of Stats.Dropped.
const (
	DropMalformed DropReason = iota // empty, unknown type, nonzero reserved bytes (STUN, garbage)
	DropSize                        // known type with the wrong length
	DropMAC1                        // handshake whose mac1 is not valid for the receiver's key
	DropReplay                      // handshake whose mac1 was already seen on that side
	DropUnlatched                   // cookie reply or data from an address that is not latched
	DropNoPeer                      // the other end has not latched yet
	DropRate                        // over the session or total byte rate
	DropExpired                     // session expired
	DropSendError                   // the write to the other end failed
	numDropReasons
)

var dropNames = [numDropReasons]string{"malformed", "size", "mac1", "replay", "unlatched", "no_peer", "rate", "expired", "send_error"}

// String returns the reason's metric label, e.g. "mac1".
func (r DropReason) String() string {
	if r < 0 || r >= numDropReasons {
		return fmt.Sprintf("DropReason(%d)", int(r))
	}
	return dropNames[r]
}

// Stats are the forwarder's counters since New.
type Stats struct {
	Sessions int    // sessions with open ports now
	Packets  uint64 // packets forwarded
	Bytes    uint64 // bytes forwarded (UDP payload)
	Dropped  map[string]uint64
}

const (
	defaultSessionRate = 64 << 20
	defaultTotalRate   = 256 << 20
	defaultMaxSessions = 1024
	pendingTTL         = 5 * time.Second
	replayWindow       = 64
	// roamCandidates is how many unconfirmed addresses (with their sender
	// index) a side remembers.
	roamCandidates = 8
	mac1Off        = 32 // mac1 starts this many bytes before the end of a handshake message
	maxPacket      = 65535
)

// Forwarder relays WireGuard packets for the sessions it was given. Safe
// for concurrent use.
type Forwarder struct {
	opts    Options
	log     *slog.Logger
	total   *rate.Limiter
	mu      sync.Mutex
	closed  bool
	sess    map[uint64]*session
	packets atomic.Uint64
	bytes   atomic.Uint64
	dropped [numDropReasons]atomic.Uint64
}

// New returns a Forwarder with no sessions.
func New(opts Options) *Forwarder {
	if opts.SessionRate <= 0 {
		opts.SessionRate = defaultSessionRate
	}
	if opts.TotalRate <= 0 {
		opts.TotalRate = defaultTotalRate
	}
	if opts.MaxSessions <= 0 {
		opts.MaxSessions = defaultMaxSessions
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Forwarder{
		opts:  opts,
		log:   opts.Logger,
		total: rate.NewLimiter(rate.Limit(opts.TotalRate), opts.TotalRate),
		sess:  make(map[uint64]*session),
	}
}

type pending struct {
	buf [device.MessageInitiationSize]byte
	n   int
	at  time.Time
}

// roam is an address a side's handshake came from that is not (yet) its
// latch, with the handshake's sender index.
type roam struct {
	addr  netip.AddrPort
	index [4]byte
}

type side struct {
	conn    *net.UDPConn
	checker device.CookieChecker // keyed by the receiver's (other end's) public key
	latch   netip.AddrPort
	seen    [replayWindow][16]byte
	seenN   int
	pend    pending
	roams   [roamCandidates]roam
	roamsN  int
	// latchIdx is the sender index of the latest handshake from the latch: the
	// index the other end's transport data names, visible on the path.
	latchIdx [4]byte
}

// addRoam remembers that a handshake with sender index idx came from addr,
// which is not the latch. An index already in use (the latch's, or that of an
// earlier roam) is not taken: whoever sees the traffic on the path sees the
// indices too, and a copy must not win the other end's answer to the
// original.
func (sd *side) addRoam(addr netip.AddrPort, idx [4]byte) {
	if idx == sd.latchIdx || slices.ContainsFunc(sd.roams[:min(sd.roamsN, roamCandidates)], func(r roam) bool { return r.index == idx }) {
		return
	}
	sd.roams[sd.roamsN%roamCandidates] = roam{addr: addr, index: idx}
	sd.roamsN++
}

// dest returns where a message for this side carrying receiver index idx
// (confirms: sent by the other end from its latch, and one it sends only for
// an authenticated handshake) goes: the address of the roam candidate with
// that index, which becomes the latch, else the latch.
func (sd *side) dest(idx [4]byte, confirms bool) netip.AddrPort {
	if confirms {
		for k := range min(sd.roamsN, roamCandidates) {
			if r := sd.roams[k]; r.addr.IsValid() && r.index == idx {
				sd.latch, sd.latchIdx = r.addr, r.index
				sd.roams, sd.roamsN = [roamCandidates]roam{}, 0
				break
			}
		}
	}
	return sd.latch
}

// index returns the 4 bytes of b at off (a WireGuard sender or receiver index).
func index(b []byte, off int) (idx [4]byte) {
	copy(idx[:], b[off:off+4])
	return idx
}

type session struct {
	Session
	f       *Forwarder
	limiter *rate.Limiter
	mu      sync.Mutex
	expires time.Time
	sides   [2]side
	wg      sync.WaitGroup
}

// Set replaces the whole set of sessions: it opens the ports of new
// sessions, closes those of sessions no longer listed or expired, and keeps
// the state (latched addresses) of sessions that stay with the same keys and
// ports (their Expires is updated). A session whose ports cannot be bound,
// and sessions beyond MaxSessions, are reported in the returned error (joined,
// each naming the session and port); the others still apply.
func (f *Forwarder) Set(sessions []Session) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return errors.New("relay: set on closed forwarder")
	}
	now := f.opts.Now()
	var errs []error
	want := make(map[uint64]Session, len(sessions))
	for _, s := range sessions {
		if !s.Expires.After(now) {
			continue
		}
		if _, dup := want[s.ID]; dup {
			errs = append(errs, fmt.Errorf("relay: session %d listed twice", s.ID))
			continue
		}
		if len(want) >= f.opts.MaxSessions {
			errs = append(errs, fmt.Errorf("relay: session %d refused: more than %d sessions", s.ID, f.opts.MaxSessions))
			continue
		}
		want[s.ID] = s
	}
	for id, old := range f.sess {
		s, ok := want[id]
		if ok && s.KeyA == old.KeyA && s.KeyB == old.KeyB && s.PortA == old.PortA && s.PortB == old.PortB {
			old.mu.Lock()
			old.expires = s.Expires
			old.Expires = s.Expires
			old.mu.Unlock()
			delete(want, id)
			continue
		}
		old.close()
		delete(f.sess, id)
	}
	for _, s := range sessions {
		if _, ok := want[s.ID]; !ok {
			continue
		}
		delete(want, s.ID)
		ns, err := f.open(s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		f.sess[s.ID] = ns
	}
	return errors.Join(errs...)
}

func (f *Forwarder) listen(port uint16) (*net.UDPConn, error) {
	addr := &net.UDPAddr{Port: int(port)}
	if f.opts.ListenAddr.IsValid() {
		addr.IP = f.opts.ListenAddr.AsSlice()
		addr.Zone = f.opts.ListenAddr.Zone()
	}
	return net.ListenUDP("udp", addr)
}

func (f *Forwarder) open(s Session) (*session, error) {
	ns := &session{
		Session: s,
		f:       f,
		limiter: rate.NewLimiter(rate.Limit(f.opts.SessionRate), f.opts.SessionRate),
		expires: s.Expires,
	}
	ns.sides[0].checker.Init(device.NoisePublicKey(s.KeyB))
	ns.sides[1].checker.Init(device.NoisePublicKey(s.KeyA))
	for i, port := range [2]uint16{s.PortA, s.PortB} {
		c, err := f.listen(port)
		if err != nil {
			if i == 1 {
				ns.sides[0].conn.Close()
			}
			return nil, fmt.Errorf("relay: session %d: bind port %d: %w", s.ID, port, err)
		}
		ns.sides[i].conn = c
	}
	for i := range ns.sides {
		ns.wg.Add(1)
		go ns.serve(i)
	}
	f.log.Info("relay session open", "id", s.ID, "port_a", s.PortA, "port_b", s.PortB, "expires", s.Expires)
	return ns, nil
}

func (s *session) close() {
	for i := range s.sides {
		s.sides[i].conn.Close()
	}
	s.wg.Wait()
	s.f.log.Info("relay session closed", "id", s.ID)
}

func (f *Forwarder) drop(r DropReason) { f.dropped[r].Add(1) }

func (s *session) serve(i int) {
	defer s.wg.Done()
	buf := make([]byte, maxPacket)
	conn := s.sides[i].conn
	for {
		n, src, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			s.f.log.Debug("relay read", "id", s.ID, "err", err)
			continue
		}
		s.f.handle(s, i, buf[:n], src)
	}
}

func (f *Forwarder) allow(s *session, now time.Time, n int) bool {
	return s.limiter.AllowN(now, n) && f.total.AllowN(now, n)
}

func (f *Forwarder) send(conn *net.UDPConn, b []byte, dst netip.AddrPort) {
	if _, err := conn.WriteToUDPAddrPort(b, dst); err != nil {
		f.drop(DropSendError)
		return
	}
	f.packets.Add(1)
	f.bytes.Add(uint64(len(b)))
}

// handle applies the forwarding rules to packet b that arrived at side i
// from src.
func (f *Forwarder) handle(s *session, i int, b []byte, src netip.AddrPort) {
	now := f.opts.Now()
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	if len(b) < 4 || b[1] != 0 || b[2] != 0 || b[3] != 0 {
		f.drop(DropMalformed)
		return
	}
	me, other := &s.sides[i], &s.sides[1-i]
	switch b[0] {
	case device.MessageInitiationType, device.MessageResponseType:
		if (b[0] == device.MessageInitiationType && len(b) != device.MessageInitiationSize) ||
			(b[0] == device.MessageResponseType && len(b) != device.MessageResponseSize) {
			f.drop(DropSize)
			return
		}
		if !me.checker.CheckMAC1(b) {
			f.drop(DropMAC1)
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if !now.Before(s.expires) {
			f.drop(DropExpired)
			return
		}
		var mac [16]byte
		copy(mac[:], b[len(b)-mac1Off:])
		for k := 0; k < min(me.seenN, replayWindow); k++ {
			if me.seen[k] == mac {
				f.drop(DropReplay)
				return
			}
		}
		me.seen[me.seenN%replayWindow] = mac
		me.seenN++
		switch {
		case !me.latch.IsValid():
			f.log.Debug("relay latch", "id", s.ID, "side", i, "addr", src)
			me.latch, me.latchIdx = src, index(b, 4)
		case me.latch == src:
			me.latchIdx = index(b, 4)
		default:
			// Maybe the end roamed, maybe someone who knows the other end's
			// public key: the other end's answer will tell (side.dest).
			me.addRoam(src, index(b, 4))
		}
		// Deliver the other end's waiting handshake to the end that just
		// latched, instead of forwarding this one: two initiations crossing
		// would make both ends refuse each other's response.
		if me.latch == src {
			if other.pend.n > 0 && now.Sub(other.pend.at) < pendingTTL {
				n := other.pend.n
				other.pend.n = 0
				if f.allow(s, now, n) {
					f.send(me.conn, other.pend.buf[:n], src)
					return
				}
			}
			other.pend.n = 0
		}
		if !other.latch.IsValid() {
			me.pend.n = copy(me.pend.buf[:], b)
			me.pend.at = now
			return
		}
		// A response from the latched address answers the initiation with
		// that receiver index: it confirms a roam of the other side.
		dst := other.dest(index(b, 8), b[0] == device.MessageResponseType && me.latch == src)
		if !f.allow(s, now, len(b)) {
			f.drop(DropRate)
			return
		}
		f.send(other.conn, b, dst)
	case device.MessageCookieReplyType, device.MessageTransportType:
		if (b[0] == device.MessageCookieReplyType && len(b) != device.MessageCookieReplySize) ||
			(b[0] == device.MessageTransportType && len(b) < device.MessageTransportSize) {
			f.drop(DropSize)
			return
		}
		s.mu.Lock()
		expired := !now.Before(s.expires)
		latched := me.latch == src
		// Transport data from the latched address is for a handshake its
		// sender completed: it confirms a roam of the other side. Cookie
		// replies are sent before any authentication and confirm nothing.
		dst := other.latch
		if !expired && latched {
			dst = other.dest(index(b, 4), b[0] == device.MessageTransportType)
		}
		s.mu.Unlock()
		switch {
		case expired:
			f.drop(DropExpired)
		case !latched:
			f.drop(DropUnlatched)
		case !dst.IsValid():
			f.drop(DropNoPeer)
		case !f.allow(s, now, len(b)):
			f.drop(DropRate)
		default:
			f.send(other.conn, b, dst)
		}
	default:
		f.drop(DropMalformed)
	}
}

// Stats returns a snapshot of the counters; Dropped is keyed by
// DropReason.String() and lists every reason.
func (f *Forwarder) Stats() Stats {
	f.mu.Lock()
	n := len(f.sess)
	f.mu.Unlock()
	st := Stats{Sessions: n, Packets: f.packets.Load(), Bytes: f.bytes.Load(), Dropped: make(map[string]uint64, numDropReasons)}
	for r := DropReason(0); r < numDropReasons; r++ {
		st.Dropped[r.String()] = f.dropped[r].Load()
	}
	return st
}

// Close closes all sessions' ports and waits for their goroutines. Set
// after Close fails.
func (f *Forwarder) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	for id, s := range f.sess {
		s.close()
		delete(f.sess, id)
	}
	return nil
}
