package stunbind

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/stun/v3"
	"golang.zx2c4.com/wireguard/conn"
)

// open opens a wrapped default bind and returns it, its port and a channel of the
// packets its receive functions pass on.
func open(t *testing.T) (*Bind, uint16, chan []byte) {
	t.Helper()
	b := New(conn.NewDefaultBind(), nil)
	fns, port, err := b.Open(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	out := make(chan []byte, 64)
	for _, fn := range fns {
		go func() {
			bs := b.BatchSize()
			bufs := make([][]byte, bs)
			for i := range bufs {
				bufs[i] = make([]byte, 2048)
			}
			sizes, eps := make([]int, bs), make([]conn.Endpoint, bs)
			for {
				n, err := fn(bufs, sizes, eps)
				if err != nil {
					return
				}
				for i := 0; i < n; i++ {
					out <- append([]byte(nil), bufs[i][:sizes[i]]...)
				}
			}
		}()
	}
	return b, port, out
}

func udp(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestBindingAgainstServer(t *testing.T) {
	b, port, _ := open(t)
	srv := udp(t)
	go func() {
		buf := make([]byte, 1500)
		for first := true; ; first = false {
			n, from, err := srv.ReadFromUDP(buf)
			if err != nil {
				return
			}
			if first {
				continue // force a retransmission
			}
			m := &stun.Message{Raw: append([]byte(nil), buf[:n]...)}
			if m.Decode() != nil {
				continue
			}
			r := stun.MustBuild(stun.NewTransactionIDSetter(m.TransactionID), stun.BindingSuccess,
				&stun.XORMappedAddress{IP: from.IP, Port: from.Port})
			srv.WriteToUDP(r.Raw, from)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := b.Binding(ctx, srv.LocalAddr().(*net.UDPAddr).AddrPort())
	if err != nil {
		t.Fatal(err)
	}
	if want := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port); got != want {
		t.Fatalf("Binding = %v, want %v", got, want)
	}
	// No answer: the context's error.
	silent := udp(t)
	ctx2, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	if _, err := b.Binding(ctx2, silent.LocalAddr().(*net.UDPAddr).AddrPort()); err == nil {
		t.Fatal("Binding with a silent server succeeded")
	}
}

func TestAnswerAndPassThrough(t *testing.T) {
	b, port, out := open(t)
	c := udp(t)
	to := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(port)}
	wg := append([]byte{4, 0, 0, 0}, bytes.Repeat([]byte{0xAB}, 28)...)
	garbage := [][]byte{{}, {1}, bytes.Repeat([]byte{0}, 20),
		{0, 0x11, 0, 4, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 0, 0, 0}}
	for _, g := range garbage {
		c.WriteToUDP(g, to)
	}
	req := stun.MustBuild(stun.TransactionID, stun.BindingRequest)
	c.WriteToUDP(req.Raw, to)
	c.WriteToUDP(wg, to)
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 1500)
	n, _, err := c.ReadFromUDP(buf)
	if err != nil {
		t.Fatal(err)
	}
	if n > len(req.Raw)+maxGrowth {
		t.Fatalf("response %d bytes for a %d-byte request", n, len(req.Raw))
	}
	m := &stun.Message{Raw: buf[:n]}
	var xa stun.XORMappedAddress
	if err := m.Decode(); err != nil || m.Type != stun.BindingSuccess || m.TransactionID != req.TransactionID {
		t.Fatalf("bad response %v %v", m, err)
	}
	if err := xa.GetFrom(m); err != nil || xa.Port != c.LocalAddr().(*net.UDPAddr).Port {
		t.Fatalf("XOR-MAPPED-ADDRESS %v, %v", xa, err)
	}
	for {
		select {
		case p := <-out:
			if IsSTUN(p) {
				t.Fatalf("STUN reached WireGuard: %x", p)
			}
			if bytes.Equal(p, wg) {
				if s := b.Stats(); s.RequestsAnswered != 1 {
					t.Fatalf("stats %+v", s)
				}
				return
			}
		case <-time.After(3 * time.Second):
			t.Fatal("WireGuard packet did not pass")
		}
	}
}

func TestRateLimit(t *testing.T) {
	b, port, _ := open(t)
	c := udp(t)
	to := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(port)}
	const sent = 400
	for i := 0; i < sent; i++ {
		c.WriteToUDP(stun.MustBuild(stun.TransactionID, stun.BindingRequest).Raw, to)
	}
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		s := b.Stats()
		if s.RequestsAnswered+s.RequestsDropped >= sent {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	s := b.Stats()
	if s.RequestsAnswered > sourceBurst+sourceRate*4 || s.RequestsDropped == 0 {
		t.Fatalf("rate limit did not hold: %+v", s)
	}
}

func TestBindingClosed(t *testing.T) {
	b := New(conn.NewDefaultBind(), nil)
	if _, err := b.Binding(context.Background(), netip.MustParseAddrPort("127.0.0.1:3478")); err != ErrClosed {
		t.Fatalf("err = %v, want ErrClosed", err)
	}
}

func FuzzIsSTUN(f *testing.F) {
	f.Add(stun.MustBuild(stun.TransactionID, stun.BindingRequest).Raw)
	f.Add(append([]byte{1, 0, 0, 0, 0x21, 0x12, 0xA4, 0x42}, make([]byte, 140)...))
	f.Fuzz(func(t *testing.T, p []byte) {
		if IsSTUN(p) && len(p) >= 4 && p[0] >= 1 && p[0] <= 4 && p[1]|p[2]|p[3] == 0 {
			t.Fatalf("WireGuard message classified as STUN: %x", p)
		}
		b := New(nil, nil)
		if IsSTUN(p) {
			b.handle(p, nil)
		}
	})
}

// TestFloodFromOneSourceLeavesOthersAnswered: a stranger who floods the
// WireGuard port with Binding requests must not use up the answers peers'
// connectivity checks need (they would all fall back to relays).
func TestFloodFromOneSourceLeavesOthersAnswered(t *testing.T) {
	b, port, _ := open(t)
	flooder := udp(t)
	to := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(port)}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		// 2000 requests per second: far over the budget, not so many that
		// the socket's receive buffer overflows.
		req := stun.MustBuild(stun.TransactionID, stun.BindingRequest).Raw
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				flooder.WriteToUDP(req, to)
				flooder.WriteToUDP(req, to)
			}
		}
	}()
	defer func() { close(stop); <-done }()
	deadline := time.Now().Add(3 * time.Second)
	for b.Stats().RequestsDropped < 500 {
		if time.Now().After(deadline) {
			t.Fatalf("flood not under way: %+v", b.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
	peer, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)})
	if err != nil {
		t.Skipf("no second loopback address: %v", err)
	}
	defer peer.Close()
	buf := make([]byte, 1500)
	for range 3 { // a check retransmits; one answer is enough
		req := stun.MustBuild(stun.TransactionID, stun.BindingRequest)
		peer.WriteToUDP(req.Raw, to)
		peer.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if n, _, err := peer.ReadFromUDP(buf); err == nil {
			m := &stun.Message{Raw: buf[:n]}
			if m.Decode() == nil && m.TransactionID == req.TransactionID {
				return
			}
		}
	}
	t.Fatalf("no answer for another source during a flood: %+v", b.Stats())
}
