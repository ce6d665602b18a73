package controller

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/stun/v3"
)

func TestSTUNServerBinding(t *testing.T) {
	srv, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	counts := make(chan string, 16)
	s := newSTUNServer(srv, func(r string) { counts <- r })
	done := make(chan error, 1)
	go func() { done <- s.serve() }()
	defer func() {
		_ = srv.Close()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	cl, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	tests := []struct {
		name   string
		msg    []byte
		result string
	}{
		{"garbage", []byte("hello, not stun"), stunInvalid},
		{"indication", stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodBinding, stun.ClassIndication)).Raw, stunInvalid},
		{"binding", stun.MustBuild(stun.TransactionID, stun.BindingRequest).Raw, stunAnswered},
	}
	for _, tt := range tests {
		if _, err := cl.WriteTo(tt.msg, srv.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		select {
		case r := <-counts:
			if r != tt.result {
				t.Errorf("%s: result %q, want %q", tt.name, r, tt.result)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: no result", tt.name)
		}
		if tt.result != stunAnswered {
			continue
		}
		buf := make([]byte, 1500)
		_ = cl.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := cl.Read(buf)
		if err != nil {
			t.Fatalf("%s: reading response: %v", tt.name, err)
		}
		resp := &stun.Message{Raw: buf[:n]}
		if err := resp.Decode(); err != nil || resp.Type != stun.BindingSuccess {
			t.Fatalf("%s: response %v (%v), want a Binding success", tt.name, resp.Type, err)
		}
		var xor stun.XORMappedAddress
		if err := xor.GetFrom(resp); err != nil {
			t.Fatalf("%s: XOR-MAPPED-ADDRESS: %v", tt.name, err)
		}
		ip, _ := netip.AddrFromSlice(xor.IP)
		got := netip.AddrPortFrom(ip.Unmap(), uint16(xor.Port))
		if want := cl.LocalAddr().(*net.UDPAddr).AddrPort(); got != want {
			t.Errorf("%s: mapped %v, want %v", tt.name, got, want)
		}
	}
}

func TestSTUNServerSourceLimit(t *testing.T) {
	s := newSTUNServer(nil, func(string) {})
	src := netip.MustParseAddr("192.0.2.1")
	allowed := 0
	for range 100 {
		if s.allow(src) {
			allowed++
		}
	}
	if allowed < stunSourceBurst || allowed > stunSourceBurst+2 {
		t.Errorf("allowed %d of 100 at once from one source, want about %d", allowed, stunSourceBurst)
	}
	if !s.allow(netip.MustParseAddr("192.0.2.2")) {
		t.Error("another source refused")
	}
}
