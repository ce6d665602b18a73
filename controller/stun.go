package controller

import (
	"errors"
	"net"
	"net/netip"
	"sync"

	"github.com/pion/stun/v3"
	"golang.org/x/time/rate"
)

// STUN responder limits: answers per second (and burst) for the whole
// controller and for one source (an IPv4 address or an IPv6 /64); stunSources
// bounds the per-source map, which starts over when full.
const (
	stunGlobalRate, stunGlobalBurst = 256, 512
	stunSourceRate, stunSourceBurst = 4, 16
	stunSources                     = 1 << 14
)

// Results of segmesh_controller_stun_requests_total.
const (
	stunAnswered = "answered"
	stunDropped  = "dropped"
	stunInvalid  = "invalid"
)

// stunServer answers STUN Binding requests (RFC 8489 section 3) on a UDP socket
// with a success response carrying XOR-MAPPED-ADDRESS of the request's source.
// Anything else is counted invalid and dropped; requests over the global or
// per-source budget are counted dropped.
type stunServer struct {
	conn   net.PacketConn
	count  func(result string)
	global *rate.Limiter
	mu     sync.Mutex
	bySrc  map[netip.Addr]*rate.Limiter
}

func newSTUNServer(conn net.PacketConn, count func(string)) *stunServer {
	return &stunServer{conn: conn, count: count, global: rate.NewLimiter(stunGlobalRate, stunGlobalBurst), bySrc: map[netip.Addr]*rate.Limiter{}}
}

func (s *stunServer) allow(src netip.Addr) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	key := sourceKey(src)
	l := s.bySrc[key]
	if l == nil {
		if len(s.bySrc) >= stunSources {
			clear(s.bySrc)
		}
		l = rate.NewLimiter(stunSourceRate, stunSourceBurst)
		s.bySrc[key] = l
	}
	return l.Allow() && s.global.Allow()
}

// serve answers until the socket is closed; it returns nil then.
func (s *stunServer) serve() error {
	buf := make([]byte, 1500)
	for {
		n, addr, err := s.conn.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		ua, ok := addr.(*net.UDPAddr)
		if !ok || !stun.IsMessage(buf[:n]) {
			s.count(stunInvalid)
			continue
		}
		req := &stun.Message{Raw: append([]byte(nil), buf[:n]...)}
		if err := req.Decode(); err != nil || req.Type != stun.BindingRequest {
			s.count(stunInvalid)
			continue
		}
		src := ua.AddrPort()
		if !s.allow(src.Addr().Unmap()) {
			s.count(stunDropped)
			continue
		}
		resp, err := stun.Build(stun.NewTransactionIDSetter(req.TransactionID), stun.BindingSuccess,
			&stun.XORMappedAddress{IP: src.Addr().Unmap().AsSlice(), Port: int(src.Port())}, stun.Fingerprint)
		if err != nil {
			s.count(stunInvalid)
			continue
		}
		if _, err := s.conn.WriteTo(resp.Raw, addr); err != nil {
			s.count(stunDropped)
			continue
		}
		s.count(stunAnswered)
	}
}
