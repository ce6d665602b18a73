package ipam

import (
	"errors"
	"net/netip"
	"testing"
)

func TestRange(t *testing.T) {
	tests := []struct {
		prefix      string
		first, last string
		wantErr     bool
	}{
		{"100.64.0.0/10", "100.64.0.2", "100.127.255.254", false},
		{"10.0.0.0/29", "10.0.0.2", "10.0.0.6", false},
		{"10.0.0.5/29", "10.0.0.2", "10.0.0.6", false}, // host bits ignored
		{"10.0.0.0/30", "10.0.0.2", "10.0.0.2", false},
		{"10.0.0.0/31", "", "", true},
		{"10.0.0.0/32", "", "", true},
		{"fd5e:6d65:7368::/48", "fd5e:6d65:7368::2", "fd5e:6d65:7368:ffff:ffff:ffff:ffff:ffff", false},
		{"fd00::/126", "fd00::2", "fd00::3", false},
		{"fd00::/127", "", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.prefix, func(t *testing.T) {
			first, last, err := Range(netip.MustParsePrefix(tt.prefix))
			if tt.wantErr {
				if err == nil {
					t.Fatalf("Range(%s) = %s, %s; want error", tt.prefix, first, last)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if first.String() != tt.first || last.String() != tt.last {
				t.Errorf("Range(%s) = %s, %s; want %s, %s", tt.prefix, first, last, tt.first, tt.last)
			}
		})
	}
}

func TestNext(t *testing.T) {
	set := func(ss ...string) map[netip.Addr]bool {
		m := map[netip.Addr]bool{}
		for _, s := range ss {
			m[netip.MustParseAddr(s)] = true
		}
		return m
	}
	tests := []struct {
		name    string
		prefix  string
		cursor  string
		used    map[netip.Addr]bool
		want    string
		wantErr error
	}{
		{"empty pool starts after reserved", "10.0.0.0/29", "", nil, "10.0.0.2", nil},
		{"after cursor", "10.0.0.0/29", "10.0.0.2", nil, "10.0.0.3", nil},
		{"skips used", "10.0.0.0/29", "10.0.0.2", set("10.0.0.3", "10.0.0.4"), "10.0.0.5", nil},
		{"wraps at end", "10.0.0.0/29", "10.0.0.6", set("10.0.0.2"), "10.0.0.3", nil},
		{"cursor outside prefix", "10.0.0.0/29", "192.0.2.1", nil, "10.0.0.2", nil},
		{"cursor of other family", "10.0.0.0/29", "fd00::5", nil, "10.0.0.2", nil},
		{"never broadcast", "10.0.0.0/30", "10.0.0.2", set(), "10.0.0.2", nil},
		{"exhausted", "10.0.0.0/29", "10.0.0.4", set("10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"), "", ErrExhausted},
		{"ipv6", "fd5e:6d65:7368::/48", "", set("fd5e:6d65:7368::2"), "fd5e:6d65:7368::3", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var cursor netip.Addr
			if tt.cursor != "" {
				cursor = netip.MustParseAddr(tt.cursor)
			}
			got, err := Next(netip.MustParsePrefix(tt.prefix), cursor, func(a netip.Addr) (bool, error) { return tt.used[a], nil })
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Next = %s, %v; want error %v", got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.String() != tt.want {
				t.Errorf("Next = %s, want %s", got, tt.want)
			}
		})
	}
}

// TestNextUnique allocates a whole small pool and checks that every allocation is
// distinct, allocatable, and that the pool then reports exhaustion.
func TestNextUnique(t *testing.T) {
	prefix := netip.MustParsePrefix("10.9.0.0/27")
	used := map[netip.Addr]bool{}
	var cursor netip.Addr
	for i := 0; i < 29; i++ { // 32 - network - first host - broadcast
		a, err := Next(prefix, cursor, func(a netip.Addr) (bool, error) { return used[a], nil })
		if err != nil {
			t.Fatalf("allocation %d: %v", i, err)
		}
		if used[a] || !prefix.Contains(a) || a == netip.MustParseAddr("10.9.0.0") || a == netip.MustParseAddr("10.9.0.1") || a == netip.MustParseAddr("10.9.0.31") {
			t.Fatalf("allocation %d: bad address %s", i, a)
		}
		used[a] = true
		cursor = a
	}
	if _, err := Next(prefix, cursor, func(a netip.Addr) (bool, error) { return used[a], nil }); !errors.Is(err, ErrExhausted) {
		t.Fatalf("full pool: err = %v, want ErrExhausted", err)
	}
	// Releasing one address makes exactly that one allocatable again.
	free := netip.MustParseAddr("10.9.0.7")
	delete(used, free)
	a, err := Next(prefix, cursor, func(a netip.Addr) (bool, error) { return used[a], nil })
	if err != nil || a != free {
		t.Fatalf("after release: %s, %v; want %s", a, err, free)
	}
}

func TestNextPropagatesError(t *testing.T) {
	boom := errors.New("boom")
	_, err := Next(netip.MustParsePrefix("10.0.0.0/24"), netip.Addr{}, func(netip.Addr) (bool, error) { return false, boom })
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v, want wrapping boom", err)
	}
}
