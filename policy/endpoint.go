package policy

import (
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
)

// ipv4RE matches what can only have been meant as an IPv4 address.
var ipv4RE = regexp.MustCompile(`^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$`)

// Endpoint is one side of a flow as tests and tools write it: a segment or node
// name, or an overlay or external address, optionally followed by a destination
// port. Exactly one of Name and Addr is set.
type Endpoint struct {
	// Name is a segment or node name; a defined segment (or "all") wins over a
	// node of the same name.
	Name string
	// Addr is an IPv4 or IPv6 address (unzoned, not IPv4-mapped, not unspecified).
	Addr netip.Addr
	// Port is the destination port written after the name or address, 0 for none.
	Port uint16
}

// ParseEndpoint parses NAME, NAME:PORT, IPV4, IPV4:PORT, IPV6, [IPV6] or
// [IPV6]:PORT, with PORT in 1-65535. An IPv6 address with a port must be written
// in brackets: a bare IPv6 address whose last group is a decimal port number and
// whose other groups form an address themselves, such as 2001:db8::1:443, is
// ambiguous and an error whose message shows both bracketed readings.
func ParseEndpoint(s string) (Endpoint, error) {
	if s == "" {
		return Endpoint{}, fmt.Errorf("empty endpoint: want a segment or node name or an address")
	}
	if strings.HasPrefix(s, "[") {
		inner, rest, ok := strings.Cut(s[1:], "]")
		if !ok {
			return Endpoint{}, fmt.Errorf("%q lacks the closing bracket: write [IPV6] or [IPV6]:PORT", s)
		}
		a, err := parseEndpointAddr(inner)
		if err != nil {
			return Endpoint{}, err
		}
		if !a.Is6() {
			return Endpoint{}, fmt.Errorf("%q: brackets are for IPv6 addresses; write %s", s, strings.Replace(s, "["+inner+"]", inner, 1))
		}
		e := Endpoint{Addr: a}
		switch {
		case rest == "":
		case strings.HasPrefix(rest, ":"):
			if e.Port, err = parseEndpointPort(rest[1:], s); err != nil {
				return Endpoint{}, err
			}
		default:
			return Endpoint{}, fmt.Errorf("unexpected %q after ] in %q: want [IPV6]:PORT", rest, s)
		}
		return e, nil
	}
	if strings.Count(s, ":") >= 2 {
		a, err := netip.ParseAddr(s)
		if err != nil {
			if i := strings.LastIndexByte(s, ':'); i > 0 {
				if h, herr := netip.ParseAddr(s[:i]); herr == nil && h.Is6() && allDigits(s[i+1:]) && validPort(s[i+1:]) {
					return Endpoint{}, fmt.Errorf("invalid address %q: write an IPv6 address with a port in brackets, [%s]:%s", s, s[:i], s[i+1:])
				}
			}
			return Endpoint{}, fmt.Errorf("invalid IPv6 address %q: %v", s, stripQuoted(err))
		}
		if _, err := parseEndpointAddr(s); err != nil {
			return Endpoint{}, err
		}
		if head, port, ok := ambiguousIPv6(s); ok {
			return Endpoint{}, fmt.Errorf("ambiguous IPv6 address %q: write [%s]:%s for port %s of %s, or [%s] for the address", s, head, port, port, head, s)
		}
		return Endpoint{Addr: a}, nil
	}
	host, port, hasPort := strings.Cut(s, ":")
	var e Endpoint
	if hasPort {
		p, err := parseEndpointPort(port, s)
		if err != nil {
			return Endpoint{}, err
		}
		e.Port = p
	}
	switch {
	case ipv4RE.MatchString(host):
		a, err := parseEndpointAddr(host)
		if err != nil {
			return Endpoint{}, err
		}
		e.Addr = a
	case ValidNodeName(host) || nameRE.MatchString(host):
		e.Name = host
	default:
		return Endpoint{}, fmt.Errorf("invalid endpoint %q: want a segment name (%s), a node name (%s), an IPv4 address or an IPv6 address, optionally with :PORT ([IPV6]:PORT)", s, nameSyntax, NodeNameSyntax)
	}
	return e, nil
}

// parseEndpointAddr parses an address an endpoint may hold.
func parseEndpointAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	switch {
	case err != nil:
		return netip.Addr{}, fmt.Errorf("invalid address %q: %v", s, stripQuoted(err))
	case a.Zone() != "":
		return netip.Addr{}, fmt.Errorf("address %q has a zone; overlay and external addresses have none, write %s", s, a.WithZone(""))
	case a.Is4In6():
		return netip.Addr{}, fmt.Errorf("address %q is an IPv4-mapped IPv6 address; write it as IPv4: %s", s, a.Unmap())
	case a.IsUnspecified():
		return netip.Addr{}, fmt.Errorf("address %q is unspecified; name one host", s)
	}
	return a, nil
}

func parseEndpointPort(s, whole string) (uint16, error) {
	p, err := parsePortNumber(s)
	if err != nil {
		return 0, fmt.Errorf("%w in %q", err, whole)
	}
	return p, nil
}

// ambiguousIPv6 reports whether the valid IPv6 address s also reads as an IPv6
// address followed by ":PORT"; it returns that reading.
func ambiguousIPv6(s string) (head, port string, ok bool) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 || !allDigits(s[i+1:]) {
		return "", "", false
	}
	n, err := strconv.ParseUint(s[i+1:], 10, 64)
	if err != nil || n < 1 || n > 65535 {
		return "", "", false
	}
	h, err := netip.ParseAddr(s[:i])
	if err != nil || !h.Is6() || h.Zone() != "" {
		return "", "", false
	}
	return s[:i], s[i+1:], true
}

func validPort(s string) bool {
	_, err := parsePortNumber(s)
	return err == nil
}

// stripQuoted shortens netip's parse errors, which repeat the input.
func stripQuoted(err error) string {
	msg := err.Error()
	if i := strings.LastIndex(msg, "): "); i >= 0 {
		return msg[i+3:]
	}
	return msg
}

// String writes e so that ParseEndpoint reads it back: NAME[:PORT], IPV4[:PORT],
// IPV6 or [IPV6]:PORT; an IPv6 address that would read as ambiguous is bracketed.
func (e Endpoint) String() string {
	var s string
	switch {
	case e.Name != "":
		s = e.Name
	case e.Addr.Is6() && (e.Port != 0 || isAmbiguous(e.Addr)):
		s = "[" + e.Addr.String() + "]"
	default:
		s = e.Addr.String()
	}
	if e.Port != 0 {
		s += ":" + strconv.Itoa(int(e.Port))
	}
	return s
}

func isAmbiguous(a netip.Addr) bool {
	_, _, ok := ambiguousIPv6(a.String())
	return ok
}
