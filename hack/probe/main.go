// Command probe is the segmesh lab's traffic probe: a tiny server answering on TCP and
// UDP ports, and clients that report whether a flow got through.
//
// Usage:
//
//	probe serve --tcp 22,5432,8080 --udp 514
//	probe tcp ADDR:PORT [--timeout 2s]
//	probe udp ADDR:PORT [--timeout 2s]
//
// serve listens on every address of both families: a TCP connection is accepted and
// answered with one byte ('!'), then whatever the client sends is echoed back until
// the client closes the connection or stays idle for 10 minutes (so a test can hold
// a connection open and check that it still carries data); a UDP datagram is echoed
// to its sender.
// The clients exit 0 when the flow got through (TCP: connected and read the byte; UDP:
// the echo came back), 1 when it was blocked (timeout, refused, unreachable, EPERM from
// a local firewall), and 2 on a usage error. ADDR may be an IPv6 literal in brackets.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Exit codes of the client commands.
const (
	exitReached = 0
	exitBlocked = 1
	exitUsage   = 2
)

// reply is the byte a TCP server writes to every accepted connection.
const reply = '!'

// tcpIdleTimeout is how long the server keeps an idle TCP connection open.
const tcpIdleTimeout = 10 * time.Minute

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: probe serve --tcp PORTS --udp PORTS | probe tcp ADDR:PORT [--timeout D] | probe udp ADDR:PORT [--timeout D]")
		return exitUsage
	}
	switch args[0] {
	case "serve":
		return runServe(args[1:], stdout, stderr)
	case "tcp", "udp":
		return runClient(args[0], args[1:], stdout, stderr)
	default:
		fmt.Fprintf(stderr, "probe: unknown command %q (want serve, tcp or udp)\n", args[0])
		return exitUsage
	}
}

func runServe(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	tcpPorts := fs.String("tcp", "", "comma-separated TCP ports to accept on")
	udpPorts := fs.String("udp", "", "comma-separated UDP ports to echo on")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	tcps, err := parsePorts(*tcpPorts)
	if err != nil {
		fmt.Fprintf(stderr, "probe serve: --tcp: %v\n", err)
		return exitUsage
	}
	udps, err := parsePorts(*udpPorts)
	if err != nil {
		fmt.Fprintf(stderr, "probe serve: --udp: %v\n", err)
		return exitUsage
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	srv, err := serve(tcps, udps)
	if err != nil {
		fmt.Fprintf(stderr, "probe serve: %v\n", err)
		return exitBlocked
	}
	defer srv.Close()
	fmt.Fprintf(stdout, "probe: serving tcp %v udp %v\n", tcps, udps)
	<-ctx.Done()
	return exitReached
}

func runClient(proto string, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet(proto, flag.ContinueOnError)
	fs.SetOutput(stderr)
	timeout := fs.Duration("timeout", 2*time.Second, "how long to wait for the flow")
	// Accept the address before or after the flags.
	var addr string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		addr, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if addr == "" && fs.NArg() == 1 {
		addr = fs.Arg(0)
	} else if addr == "" || fs.NArg() != 0 {
		fmt.Fprintf(stderr, "usage: probe %s ADDR:PORT [--timeout D]\n", proto)
		return exitUsage
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		fmt.Fprintf(stderr, "probe %s: address %q: %v\n", proto, addr, err)
		return exitUsage
	}
	var err error
	if proto == "tcp" {
		err = probeTCP(addr, *timeout)
	} else {
		err = probeUDP(addr, *timeout)
	}
	if err != nil {
		fmt.Fprintf(stdout, "blocked: %s %s: %v\n", proto, addr, err)
		return exitBlocked
	}
	fmt.Fprintf(stdout, "reached: %s %s\n", proto, addr)
	return exitReached
}

// parsePorts parses "22,5432" into port numbers; the empty string is no ports.
func parsePorts(s string) ([]int, error) {
	if s == "" {
		return nil, nil
	}
	var ports []int
	for _, f := range strings.Split(s, ",") {
		p, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || p < 0 || p > 65535 {
			return nil, fmt.Errorf("port %q: want a number in 0-65535 (0: any free port)", f)
		}
		ports = append(ports, p)
	}
	return ports, nil
}

// server holds the listeners of serve.
type server struct {
	closers []io.Closer
	tcp     []net.Addr // bound TCP listener addresses, in argument order
	udp     []net.Addr // bound UDP socket addresses, in argument order
}

func (s *server) Close() {
	for _, c := range s.closers {
		c.Close()
	}
}

// serve starts dual-stack listeners on the given ports and answers until closed.
func serve(tcpPorts, udpPorts []int) (*server, error) {
	s := &server{}
	for _, p := range tcpPorts {
		ln, err := net.Listen("tcp", ":"+strconv.Itoa(p))
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("listening on tcp/%d: %w", p, err)
		}
		s.closers = append(s.closers, ln)
		s.tcp = append(s.tcp, ln.Addr())
		go acceptLoop(ln)
	}
	for _, p := range udpPorts {
		pc, err := net.ListenPacket("udp", ":"+strconv.Itoa(p))
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("listening on udp/%d: %w", p, err)
		}
		s.closers = append(s.closers, pc)
		s.udp = append(s.udp, pc.LocalAddr())
		go echoLoop(pc)
	}
	return s, nil
}

func acceptLoop(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		go serveTCP(c)
	}
}

// serveTCP writes the reply byte, then echoes what the client sends until it closes
// the connection or is idle for tcpIdleTimeout.
func serveTCP(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(tcpIdleTimeout))
	if _, err := c.Write([]byte{reply}); err != nil {
		return
	}
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(tcpIdleTimeout))
		}
		if err != nil {
			return
		}
	}
}

func echoLoop(pc net.PacketConn) {
	buf := make([]byte, 2048)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		_, _ = pc.WriteTo(buf[:n], from)
	}
}

// probeTCP connects to addr and reads the server's byte within timeout.
func probeTCP(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SetDeadline(deadline); err != nil {
		return err
	}
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil {
		return fmt.Errorf("reading reply: %w", err)
	}
	if b[0] != reply {
		return fmt.Errorf("unexpected reply %q", b[0])
	}
	return nil
}

// probeUDP sends a datagram to addr and waits up to timeout for its echo. The
// datagram is re-sent every 250 ms in case the first one was queued behind a
// WireGuard handshake.
func probeUDP(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	c, err := net.Dial("udp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	payload := []byte(fmt.Sprintf("segmesh-probe %d", time.Now().UnixNano()))
	buf := make([]byte, 2048)
	for time.Now().Before(deadline) {
		if _, err := c.Write(payload); err != nil {
			return fmt.Errorf("sending: %w", err)
		}
		next := time.Now().Add(250 * time.Millisecond)
		if next.After(deadline) {
			next = deadline
		}
		if err := c.SetReadDeadline(next); err != nil {
			return err
		}
		n, err := c.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("receiving: %w", err)
		}
		if string(buf[:n]) == string(payload) {
			return nil
		}
	}
	return fmt.Errorf("no echo within %s", timeout)
}
