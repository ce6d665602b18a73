package policy

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseEndpoint(t *testing.T) {
	a := netip.MustParseAddr
	tests := []struct {
		in   string
		want Endpoint
	}{
		{"web", Endpoint{Name: "web"}},
		{"db-1.example.com", Endpoint{Name: "db-1.example.com"}},
		{"db-1:5432", Endpoint{Name: "db-1", Port: 5432}},
		{"10.0.0", Endpoint{Name: "10.0.0"}}, // a valid node name, not an address
		{"100.64.0.4", Endpoint{Addr: a("100.64.0.4")}},
		{"100.64.0.4:5432", Endpoint{Addr: a("100.64.0.4"), Port: 5432}},
		{"255.255.255.255:65535", Endpoint{Addr: a("255.255.255.255"), Port: 65535}},
		{"fd5e:6d65:7368::4", Endpoint{Addr: a("fd5e:6d65:7368::4")}},
		{"2001:db8::", Endpoint{Addr: a("2001:db8::")}},
		{"::1", Endpoint{Addr: a("::1")}},
		{"2001:db8::1:abcd", Endpoint{Addr: a("2001:db8::1:abcd")}},    // last group is not decimal
		{"2001:db8:0:0:0:0:0:443", Endpoint{Addr: a("2001:db8::443")}}, // no "::": the head is no address
		{"2001:db8::1:0", Endpoint{Addr: a("2001:db8::1:0")}},          // 0 is no port
		{"[fd5e:6d65:7368::4]", Endpoint{Addr: a("fd5e:6d65:7368::4")}},
		{"[2001:db8::1:443]", Endpoint{Addr: a("2001:db8::1:443")}},
		{"[2001:db8::1]:443", Endpoint{Addr: a("2001:db8::1"), Port: 443}},
	}
	for _, tt := range tests {
		got, err := ParseEndpoint(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("ParseEndpoint(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
		if back, err := ParseEndpoint(got.String()); err != nil || back != got {
			t.Errorf("ParseEndpoint(String() = %q) = %+v, %v; want %+v", got.String(), back, err, got)
		}
	}
	bad := map[string]string{
		"":                                   `empty endpoint: want a segment or node name or an address`,
		"2001:db8::1:443":                    `ambiguous IPv6 address "2001:db8::1:443": write [2001:db8::1]:443 for port 443 of 2001:db8::1, or [2001:db8::1:443] for the address`,
		"fd5e:6d65:7368::4:22":               `ambiguous IPv6 address "fd5e:6d65:7368::4:22": write [fd5e:6d65:7368::4]:22 for port 22 of fd5e:6d65:7368::4, or [fd5e:6d65:7368::4:22] for the address`,
		"::1:2":                              `ambiguous IPv6 address "::1:2": write [::1]:2 for port 2 of ::1, or [::1:2] for the address`,
		"2001:db8:1:2:3:4:5:6:443":           `invalid address "2001:db8:1:2:3:4:5:6:443": write an IPv6 address with a port in brackets, [2001:db8:1:2:3:4:5:6]:443`,
		"2001:db8::1:65536":                  `invalid IPv6 address "2001:db8::1:65536": each group must have 4 or less digits (at "65536")`,
		"fe80::1%eth0":                       `address "fe80::1%eth0" has a zone; overlay and external addresses have none, write fe80::1`,
		"::ffff:10.0.0.1":                    `address "::ffff:10.0.0.1" is an IPv4-mapped IPv6 address; write it as IPv4: 10.0.0.1`,
		"0.0.0.0":                            `address "0.0.0.0" is unspecified; name one host`,
		"[::]:1":                             `address "::" is unspecified; name one host`,
		"[10.0.0.1]:80":                      `"[10.0.0.1]:80": brackets are for IPv6 addresses; write 10.0.0.1:80`,
		"[2001:db8::1":                       `"[2001:db8::1" lacks the closing bracket: write [IPV6] or [IPV6]:PORT`,
		"[2001:db8::1]443":                   `unexpected "443" after ] in "[2001:db8::1]443": want [IPV6]:PORT`,
		"[2001:db8::1]:0":                    `port 0 is out of range 1-65535 in "[2001:db8::1]:0"`,
		"10.0.0.1:65536":                     `port 65536 is out of range 1-65535 in "10.0.0.1:65536"`,
		"10.0.0.1:":                          `invalid port "": want a number 1-65535 or a range FIRST-LAST in "10.0.0.1:"`,
		"10.0.0.256":                         `invalid address "10.0.0.256": IPv4 field has value >255`,
		"Web":                                `invalid endpoint "Web": want a segment name ([a-z0-9][a-z0-9_-]{0,30}), a node name ([a-z0-9][a-z0-9.-]{0,62}), an IPv4 address or an IPv6 address, optionally with :PORT ([IPV6]:PORT)`,
		"web:http":                           `invalid port "http": want a number 1-65535 or a range FIRST-LAST in "web:http"`,
		"a_23456789012345678901234567890123": `invalid endpoint "a_23456789012345678901234567890123": want a segment name ([a-z0-9][a-z0-9_-]{0,30}), a node name ([a-z0-9][a-z0-9.-]{0,62}), an IPv4 address or an IPv6 address, optionally with :PORT ([IPV6]:PORT)`,
	}
	for in, want := range bad {
		if got, err := ParseEndpoint(in); err == nil || err.Error() != want {
			t.Errorf("ParseEndpoint(%q) = %+v, %v\nwant error %s", in, got, err, want)
		}
	}
}

// FuzzEndpoint checks that ParseEndpoint never panics, that what it accepts
// prints back to itself, and that it never accepts a bare IPv6 address that
// also reads as an address with a port.
func FuzzEndpoint(f *testing.F) {
	for _, s := range []string{"web", "db-1:5432", "100.64.0.4:22", "fd5e::4", "[fd5e::4]:22", "2001:db8::1:443", "[2001:db8::1:443]", "::1:2", "[::1]", "fe80::1%eth0", "[1.2.3.4]", ":", "[", "]:"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		e, err := ParseEndpoint(s)
		if err != nil {
			if err.Error() == "" {
				t.Fatalf("ParseEndpoint(%q): empty error", s)
			}
			return
		}
		if (e.Name == "") == !e.Addr.IsValid() {
			t.Fatalf("ParseEndpoint(%q) = %+v: want exactly one of name and address", s, e)
		}
		if e.Addr.IsValid() && (e.Addr.Zone() != "" || e.Addr.Is4In6() || e.Addr.IsUnspecified()) {
			t.Fatalf("ParseEndpoint(%q) accepted address %v", s, e.Addr)
		}
		if !strings.HasPrefix(s, "[") && e.Addr.Is6() {
			if _, _, amb := ambiguousIPv6(s); amb {
				t.Fatalf("ParseEndpoint(%q) accepted an ambiguous form", s)
			}
		}
		back, err := ParseEndpoint(e.String())
		if err != nil || back != e {
			t.Fatalf("ParseEndpoint(%q) = %+v; String %q reads back as %+v, %v", s, e, e.String(), back, err)
		}
	})
}

func TestValidNodeName(t *testing.T) {
	tests := []struct {
		name string
		want bool
	}{
		{"web-1", true},
		{"a", true},
		{"0", true},
		{"db-1.lan", true},
		{"a..b", true}, // the controller's syntax allows it
		{strings.Repeat("a", 63), true},
		{strings.Repeat("a", 64), false},
		{"", false},
		{"Ops-1", false},
		{"ops 2", false},
		{"ops_3", false},
		{"-x", false},
		{".x", false},
		{"wëb", false},
	}
	for _, tt := range tests {
		if got := ValidNodeName(tt.name); got != tt.want {
			t.Errorf("ValidNodeName(%q) = %v, want %v", tt.name, got, tt.want)
		}
	}
}
