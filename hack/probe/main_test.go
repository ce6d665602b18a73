package main

import (
	"bytes"
	"io"
	"net"
	"strconv"
	"testing"
	"time"
)

func port(a net.Addr) string {
	switch a := a.(type) {
	case *net.TCPAddr:
		return strconv.Itoa(a.Port)
	case *net.UDPAddr:
		return strconv.Itoa(a.Port)
	}
	return ""
}

// TestProbes runs the clients against a real server on loopback (both families)
// and against ports nothing listens on.
func TestProbes(t *testing.T) {
	srv, err := serve([]int{0}, []int{0})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	// A port that was free a moment ago: nothing listens there now.
	closedTCP, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedTCPPort := port(closedTCP.Addr())
	closedTCP.Close()
	closedUDP, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedUDPPort := port(closedUDP.LocalAddr())
	closedUDP.Close()

	// A listener that never accepts: the handshake completes but no byte ever comes.
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { silent.Close() })

	tcpPort, udpPort := port(srv.tcp[0]), port(srv.udp[0])
	tests := []struct {
		name string
		args []string
		want int
	}{
		{"tcp v4 reached", []string{"tcp", "127.0.0.1:" + tcpPort, "--timeout", "2s"}, exitReached},
		{"tcp v6 reached", []string{"tcp", "[::1]:" + tcpPort}, exitReached},
		{"tcp flags first", []string{"tcp", "--timeout", "2s", "127.0.0.1:" + tcpPort}, exitReached},
		{"udp v4 reached", []string{"udp", "127.0.0.1:" + udpPort, "--timeout", "2s"}, exitReached},
		{"udp v6 reached", []string{"udp", "[::1]:" + udpPort}, exitReached},
		{"tcp refused", []string{"tcp", "127.0.0.1:" + closedTCPPort, "--timeout", "1s"}, exitBlocked},
		{"udp refused", []string{"udp", "127.0.0.1:" + closedUDPPort, "--timeout", "1s"}, exitBlocked},
		{"tcp no reply", []string{"tcp", "127.0.0.1:" + port(silent.Addr()), "--timeout", "300ms"}, exitBlocked},
		{"no address", []string{"tcp"}, exitUsage},
		{"bad address", []string{"udp", "nope"}, exitUsage},
		{"unknown command", []string{"icmp", "127.0.0.1:1"}, exitUsage},
		{"no command", nil, exitUsage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			start := time.Now()
			got := run(tt.args, &out, &errb)
			if got != tt.want {
				t.Errorf("run(%q) = %d, want %d; stdout %q stderr %q", tt.args, got, tt.want, out.String(), errb.String())
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Errorf("run(%q) took %s, longer than its timeout allows", tt.args, d)
			}
		})
	}
}

func TestParsePorts(t *testing.T) {
	tests := []struct {
		in      string
		want    []int
		wantErr bool
	}{
		{"", nil, false},
		{"22", []int{22}, false},
		{"22, 5432,8080", []int{22, 5432, 8080}, false},
		{"x", nil, true},
		{"70000", nil, true},
		{"-1", nil, true},
	}
	for _, tt := range tests {
		got, err := parsePorts(tt.in)
		if (err != nil) != tt.wantErr {
			t.Errorf("parsePorts(%q) error = %v, wantErr %v", tt.in, err, tt.wantErr)
			continue
		}
		if len(got) != len(tt.want) {
			t.Errorf("parsePorts(%q) = %v, want %v", tt.in, got, tt.want)
			continue
		}
		for i := range got {
			if got[i] != tt.want[i] {
				t.Errorf("parsePorts(%q) = %v, want %v", tt.in, got, tt.want)
			}
		}
	}
}

// TestServeEchoesHeldConnection holds a TCP connection to the server: after the reply
// byte it echoes every message, so a test can tell whether the connection still works.
func TestServeEchoesHeldConnection(t *testing.T) {
	srv, err := serve([]int{0}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	c, err := net.Dial("tcp", "127.0.0.1:"+port(srv.tcp[0]))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	if _, err := io.ReadFull(c, buf[:1]); err != nil || buf[0] != reply {
		t.Fatalf("first byte %q, %v; want %q", buf[0], err, reply)
	}
	for _, msg := range []string{"hello\n", "still there?\n"} {
		if _, err := io.WriteString(c, msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf[:len(msg)]); err != nil || string(buf[:len(msg)]) != msg {
			t.Fatalf("echo %q, %v; want %q", buf[:len(msg)], err, msg)
		}
	}
}
