package path

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"sync"
	"testing"
	"time"

	"segmesh/agent/dataplane"
	"segmesh/agent/netmap"
)

// world is a fake network and controller: which endpoints answer checks, the
// handshakes WireGuard saw, and the requests the selector made.
type world struct {
	mu         sync.Mutex
	now        time.Time
	answers    map[netip.AddrPort]bool
	handshakes map[dataplane.Key]time.Time
	devEP      map[dataplane.Key]netip.AddrPort
	punches    []string
	relays     []string
	punchErr   error
	relayErr   error
}

func newWorld() *world {
	return &world{now: time.Unix(1_800_000_000, 0), answers: map[netip.AddrPort]bool{}, handshakes: map[dataplane.Key]time.Time{}, devEP: map[dataplane.Key]netip.AddrPort{}}
}

func (w *world) clock() time.Time { w.mu.Lock(); defer w.mu.Unlock(); return w.now }
func (w *world) advance(d time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.now = w.now.Add(d)
}
func (w *world) answer(ep string, ok bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.answers[netip.MustParseAddrPort(ep)] = ok
}

// handshakeNow records a handshake with peer b now, at device endpoint ep.
func (w *world) handshakeNow(ep string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.handshakes[keyB] = w.now
	w.devEP[keyB] = netip.MustParseAddrPort(ep)
}

func (w *world) calls() (punches, relays []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.punches...), append([]string(nil), w.relays...)
}

var relayCand = netmap.Candidate{Endpoint: netip.MustParseAddrPort("192.0.2.5:40001"), Kind: netmap.CandidateRelay, Relay: "r1"}

func (w *world) options(probe bool) Options {
	o := Options{
		Now:          w.clock,
		ProbeTimeout: 20 * time.Millisecond,
		Logger:       slog.New(slog.DiscardHandler),
		Device: func() map[dataplane.Key]Device {
			w.mu.Lock()
			defer w.mu.Unlock()
			out := map[dataplane.Key]Device{}
			for k, v := range w.handshakes {
				out[k] = Device{LastHandshake: v, Endpoint: w.devEP[k]}
			}
			return out
		},
		RequestPunch: func(ctx context.Context, peer string) error {
			w.mu.Lock()
			defer w.mu.Unlock()
			w.punches = append(w.punches, peer)
			return w.punchErr
		},
		RequestRelay: func(ctx context.Context, peer string) (netmap.Candidate, time.Time, error) {
			w.mu.Lock()
			defer w.mu.Unlock()
			w.relays = append(w.relays, peer)
			return relayCand, w.now.Add(10 * time.Minute), w.relayErr
		},
	}
	if probe {
		o.Probe = func(ctx context.Context, dst netip.AddrPort) error {
			w.mu.Lock()
			ok := w.answers[dst]
			w.mu.Unlock()
			if ok {
				return nil
			}
			<-ctx.Done()
			return ctx.Err()
		}
	}
	return o
}

// settle runs one step and waits for its rounds and requests to finish.
func settle(t *testing.T, s *Selector) {
	t.Helper()
	s.step(context.Background())
	s.bg.Wait()
}

func cand(ep, kind string) netmap.Candidate {
	return netmap.Candidate{Endpoint: netip.MustParseAddrPort(ep), Kind: kind}
}

var keyB = dataplane.Key{2}

func peerB(cs ...netmap.Candidate) []Peer { return []Peer{{Key: keyB, Name: "b", Candidates: cs}} }

func pathOf(s *Selector) Path { return s.Paths()[keyB] }

func TestPrefersFirstAnsweringCandidate(t *testing.T) {
	for _, tc := range []struct {
		name    string
		answers []string
		want    string
	}{
		{"local wins", []string{"198.51.100.2:51820", "203.0.113.9:51820"}, "198.51.100.2:51820"},
		{"only stun answers", []string{"203.0.113.9:51820"}, "203.0.113.9:51820"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld()
			for _, a := range tc.answers {
				w.answer(a, true)
			}
			s := New(w.options(true))
			s.SetPeers(peerB(cand("198.51.100.2:51820", netmap.CandidateLocal), cand("203.0.113.9:51820", netmap.CandidateSTUN)))
			if got := pathOf(s); got.Kind != "" || got.Endpoint.String() != "198.51.100.2:51820" {
				t.Fatalf("before any check: %+v, want the first candidate, unproven", got)
			}
			settle(t, s)
			if got := pathOf(s); got.Kind != Direct || got.Endpoint.String() != tc.want {
				t.Fatalf("path %+v, want direct %s", got, tc.want)
			}
		})
	}
}

func TestSkipsOwnAndOtherSitesPrivateCandidates(t *testing.T) {
	w := newWorld()
	w.answer("10.1.0.2:51820", true) // this host itself, or a host on its own LAN
	w.answer("203.0.113.9:51820", true)
	s := New(w.options(true))
	s.SetSelf([]netip.AddrPort{netip.MustParseAddrPort("10.1.0.2:51820")}, netip.MustParseAddr("203.0.113.1"))
	s.SetPeers(peerB(cand("10.1.0.2:51820", netmap.CandidateLocal), cand("10.1.0.7:51820", netmap.CandidateLocal), cand("203.0.113.9:51820", netmap.CandidateSTUN)))
	settle(t, s)
	if got := pathOf(s); got.Kind != Direct || got.Endpoint.String() != "203.0.113.9:51820" {
		t.Fatalf("path %+v, want direct to the STUN candidate", got)
	}
	// Behind the same NAT (same public address) private local candidates count.
	w.answer("10.1.0.7:51820", true)
	s.SetSelf([]netip.AddrPort{netip.MustParseAddrPort("10.1.0.2:51820")}, netip.MustParseAddr("203.0.113.9"))
	settle(t, s)
	if got := pathOf(s); got.Endpoint.String() != "10.1.0.7:51820" {
		t.Fatalf("same site: path %+v, want the LAN address", got)
	}
}

func TestPunchThenRelayThenBackToDirect(t *testing.T) {
	w := newWorld()
	s := New(w.options(true))
	s.SetPeers(peerB(cand("203.0.113.9:51820", netmap.CandidateSTUN)))
	settle(t, s)
	punches, relays := w.calls()
	if len(punches) != 1 || len(relays) != 0 {
		t.Fatalf("after the first failed round: punches %v relays %v, want one punch and no relay", punches, relays)
	}
	if got := pathOf(s); got.Kind != "" {
		t.Fatalf("path %+v, want none chosen yet", got)
	}
	for i := 0; i < 5; i++ {
		w.advance(time.Second + time.Millisecond)
		settle(t, s)
	}
	_, relays = w.calls()
	if len(relays) != 1 {
		t.Fatalf("after FallbackAfter: relay requests %v, want one", relays)
	}
	if got := pathOf(s); got.Kind != Relay || got.Endpoint != relayCand.Endpoint || got.Relay != "r1" {
		t.Fatalf("path %+v, want the relay", got)
	}
	// The NAT opens: the next direct check (DirectRetry later) moves back.
	w.answer("203.0.113.9:51820", true)
	w.advance(DefaultDirectRetry)
	settle(t, s)
	if got := pathOf(s); got.Kind != Direct {
		t.Fatalf("path %+v, want direct again", got)
	}
}

func TestRelayRenewedAtHalfLife(t *testing.T) {
	w := newWorld()
	s := New(w.options(true))
	s.SetPeers(peerB(cand("203.0.113.9:51820", netmap.CandidateSTUN)))
	for i := 0; i < 8; i++ {
		settle(t, s)
		w.advance(time.Second)
	}
	if _, relays := w.calls(); len(relays) != 1 {
		t.Fatalf("relay requests %v, want one", relays)
	}
	for i := 0; i < 12; i++ { // 6 min of direct retries, the relay handshaking
		w.advance(DefaultDirectRetry)
		w.mu.Lock()
		w.handshakes[keyB] = w.now
		w.mu.Unlock()
		settle(t, s)
	}
	if _, relays := w.calls(); len(relays) != 2 {
		t.Fatalf("relay requests %v after 6 of 10 minutes, want a renewal", relays)
	}
	// The relay goes away: no handshakes for longer than handshakeFresh.
	for i := 0; i < 7; i++ {
		w.advance(DefaultDirectRetry)
		settle(t, s)
	}
	if _, relays := w.calls(); len(relays) != 3 {
		t.Fatalf("relay requests %v after the relay stopped carrying handshakes, want a new one", relays)
	}
}

func TestOfflinePeerGetsNoRelay(t *testing.T) {
	w := newWorld()
	w.punchErr = errors.Join(ErrOffline)
	s := New(w.options(true))
	s.SetPeers(peerB(cand("203.0.113.9:51820", netmap.CandidateSTUN)))
	for i := 0; i < 10; i++ {
		settle(t, s)
		w.advance(time.Second)
	}
	if _, relays := w.calls(); len(relays) != 0 {
		t.Fatalf("relay requests %v for an offline peer", relays)
	}
}

func TestPunchWithRelayCandidate(t *testing.T) {
	w := newWorld()
	s := New(w.options(true))
	s.SetPeers(peerB(cand("203.0.113.9:51820", netmap.CandidateSTUN)))
	s.Punch(dataplane.Key{9}, []netmap.Candidate{relayCand}) // not a peer: ignored
	if got := pathOf(s); got.Kind != "" {
		t.Fatalf("a punch for another key changed the path: %+v", got)
	}
	s.Punch(keyB, []netmap.Candidate{relayCand})
	if got := pathOf(s); got.Kind != Relay || got.Endpoint != relayCand.Endpoint {
		t.Fatalf("path %+v, want the offered relay at once", got)
	}
	w.answer("203.0.113.9:51820", true)
	settle(t, s)
	if got := pathOf(s); got.Kind != Direct {
		t.Fatalf("path %+v, want direct once it answers", got)
	}
}

func TestCandidatesChangeRechecks(t *testing.T) {
	w := newWorld()
	w.answer("203.0.113.9:51820", true)
	w.answer("203.0.113.10:51820", true)
	s := New(w.options(true))
	s.SetPeers(peerB(cand("203.0.113.9:51820", netmap.CandidateLocal)))
	settle(t, s)
	w.handshakes[keyB] = w.clock()
	// The peer roamed: its new address comes first (gossip), the old one is gone.
	s.SetPeers(peerB(cand("203.0.113.10:51820", netmap.CandidateLocal)))
	if got := pathOf(s); got.Endpoint.String() != "203.0.113.10:51820" {
		t.Fatalf("path %+v: the old endpoint must not outlive its candidate", got)
	}
	settle(t, s)
	if got := pathOf(s); got.Kind != Direct || got.Endpoint.String() != "203.0.113.10:51820" {
		t.Fatalf("path %+v, want direct to the new address", got)
	}
}

func TestKernelTrialsByHandshake(t *testing.T) {
	w := newWorld()
	s := New(w.options(false))
	s.SetPeers(peerB(cand("198.51.100.2:51820", netmap.CandidateLocal), cand("203.0.113.9:51820", netmap.CandidateSTUN)))
	settle(t, s)
	if got := pathOf(s); got.Endpoint.String() != "198.51.100.2:51820" {
		t.Fatalf("path %+v, want the first candidate on trial", got)
	}
	w.advance(DefaultHandshakeTrial)
	settle(t, s)
	if got := pathOf(s); got.Endpoint.String() != "203.0.113.9:51820" {
		t.Fatalf("path %+v, want the second candidate after a trial without handshake", got)
	}
	w.advance(DefaultHandshakeTrial)
	settle(t, s)
	if got := pathOf(s); got.Kind != Relay {
		t.Fatalf("path %+v, want the relay after every candidate failed", got)
	}
	w.mu.Lock()
	w.handshakes[keyB] = w.now
	w.mu.Unlock()
	w.advance(DefaultDirectRetry)
	settle(t, s)
	if got := pathOf(s); got.Kind != Relay {
		t.Fatalf("path %+v, want the handshaking relay kept", got)
	}
}

func TestKernelKeepsHandshakingCandidate(t *testing.T) {
	w := newWorld()
	s := New(w.options(false))
	s.SetPeers(peerB(cand("198.51.100.2:51820", netmap.CandidateLocal)))
	w.handshakes[keyB] = w.clock()
	settle(t, s)
	if got := pathOf(s); got.Kind != Direct || got.Endpoint.String() != "198.51.100.2:51820" {
		t.Fatalf("path %+v, want direct to the handshaking candidate", got)
	}
}

func TestKeepsWhatWireGuardProves(t *testing.T) {
	w := newWorld()
	s := New(w.options(true))
	s.SetPeers(peerB(cand("203.0.113.9:51820", netmap.CandidateObserved)))
	// The peer is behind a NAT that maps per destination: no check answers, but
	// its handshakes arrive from the mapping it made towards this host.
	w.mu.Lock()
	w.handshakes[keyB] = w.now
	w.devEP[keyB] = netip.MustParseAddrPort("203.0.113.9:61002")
	w.mu.Unlock()
	settle(t, s)
	got := pathOf(s)
	if got.Kind != Direct || got.Endpoint.String() != "203.0.113.9:61002" || got.Candidate != CandidateHandshake {
		t.Fatalf("path %+v, want direct to the endpoint WireGuard handshakes at", got)
	}
	if _, relays := w.calls(); len(relays) != 0 {
		t.Fatalf("asked for a relay (%v) although WireGuard handshakes directly", relays)
	}
	// A handshake through the relay proves nothing about direct paths.
	s.Punch(keyB, []netmap.Candidate{relayCand})
	w.mu.Lock()
	w.devEP[keyB] = relayCand.Endpoint
	w.handshakes[keyB] = time.Time{}
	w.mu.Unlock()
	for i := 0; i < 8; i++ {
		w.advance(DefaultDirectRetry)
		settle(t, s)
	}
	if got := pathOf(s); got.Kind != Relay {
		t.Fatalf("path %+v, want the relay once the direct handshakes stopped", got)
	}
}

func TestNewCandidateCheckedDespiteFreshHandshake(t *testing.T) {
	w := newWorld()
	w.answer("198.51.100.2:51820", true)
	s := New(w.options(true))
	s.SetPeers(peerB(cand("198.51.100.2:51820", netmap.CandidateLocal)))
	settle(t, s)
	// WireGuard handshakes on the chosen path: no more checks needed...
	w.mu.Lock()
	w.handshakes[keyB] = w.now
	w.devEP[keyB] = netip.MustParseAddrPort("198.51.100.2:51820")
	w.mu.Unlock()
	w.advance(DefaultDirectRetry)
	settle(t, s)
	// ...until the peer moves: gossip brings its new address first, the netmap
	// (controller down) still lists the old one, and WireGuard still shows a
	// fresh handshake on the old one.
	w.answer("198.51.100.9:51820", true)
	w.answer("198.51.100.2:51820", false)
	s.SetPeers(peerB(cand("198.51.100.9:51820", netmap.CandidateLocal), cand("198.51.100.2:51820", netmap.CandidateLocal)))
	w.advance(time.Second)
	settle(t, s)
	if got := pathOf(s); got.Endpoint.String() != "198.51.100.9:51820" {
		t.Fatalf("path %+v, want the new address checked at once", got)
	}
}

// TestAnsweringCandidateWithoutHandshakeIsDropped: a check proves only that
// something at the candidate speaks STUN (any STUN server, another host that
// took over the address, another segmesh node), not that the peer is there. A
// direct path WireGuard never handshakes on must not be kept forever.
func TestAnsweringCandidateWithoutHandshakeIsDropped(t *testing.T) {
	const dud, good = "198.51.100.2:51820", "203.0.113.9:51820"
	for _, tc := range []struct {
		name string
		// handshakeAt, when set, is where WireGuard handshakes with the peer
		// all along (the device's endpoint).
		handshakeAt string
		// goodAnswers: the later candidate answers, and WireGuard handshakes
		// there once it is the path.
		goodAnswers bool
		want        Path
	}{
		{name: "only the dud answers: relay", want: Path{Endpoint: relayCand.Endpoint, Kind: Relay, Candidate: netmap.CandidateRelay, Relay: "r1"}},
		{name: "a later candidate answers", goodAnswers: true, want: Path{Endpoint: netip.MustParseAddrPort(good), Kind: Direct, Candidate: netmap.CandidateSTUN}},
		{name: "WireGuard handshakes elsewhere", handshakeAt: "203.0.113.9:61002", want: Path{Endpoint: netip.MustParseAddrPort("203.0.113.9:61002"), Kind: Direct, Candidate: CandidateHandshake}},
		{name: "WireGuard handshakes at it: kept", handshakeAt: dud, want: Path{Endpoint: netip.MustParseAddrPort(dud), Kind: Direct, Candidate: netmap.CandidateLocal}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld()
			w.answer(dud, true)
			s := New(w.options(true))
			s.SetPeers(peerB(cand(dud, netmap.CandidateLocal), cand(good, netmap.CandidateSTUN)))
			settle(t, s)
			if got := pathOf(s); got.Endpoint.String() != dud || got.Kind != Direct {
				t.Fatalf("first round: path %+v, want direct to the first answering candidate", got)
			}
			w.answer(good, tc.goodAnswers)
			for range 2 * int(handshakeFresh/DefaultDirectRetry) {
				w.advance(DefaultDirectRetry)
				if tc.handshakeAt != "" {
					w.handshakeNow(tc.handshakeAt)
				}
				for range 8 { // the rounds of a failing peer, a second apart
					settle(t, s)
					if tc.goodAnswers && pathOf(s).Endpoint.String() == good {
						w.handshakeNow(good)
					}
					w.advance(time.Second)
				}
			}
			if got := pathOf(s); got != tc.want {
				t.Fatalf("path %+v, want %+v", got, tc.want)
			}
		})
	}
}
