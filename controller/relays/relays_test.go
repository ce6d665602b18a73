package relays

import (
	"errors"
	"go/build"
	"slices"
	"strings"
	"testing"
	"time"
)

// clock is a fake clock for Options.Now.
type clock struct{ t time.Time }

func (c *clock) now() time.Time          { return c.t }
func (c *clock) advance(d time.Duration) { c.t = c.t.Add(d) }

func newTest(t *testing.T, opts Options) (*Allocator, *clock) {
	t.Helper()
	c := &clock{t: time.Unix(1_700_000_000, 0)}
	opts.Now = c.now
	return New(opts), c
}

func party(name string) Party {
	p := Party{Name: name}
	copy(p.Key[:], name)
	return p
}

func mustAllocate(t *testing.T, a *Allocator, relay string, x, y Party) Session {
	t.Helper()
	s, err := a.Allocate(relay, x, y)
	if err != nil {
		t.Fatalf("Allocate(%s, %s, %s): %v", relay, x.Name, y.Name, err)
	}
	return s
}

func ids(ss []Session) []uint64 {
	out := make([]uint64, len(ss))
	for i, s := range ss {
		out[i] = s.ID
	}
	return out
}

func TestParsePorts(t *testing.T) {
	tests := []struct {
		in          string
		first, last uint16
		err         string // substring; empty = success
	}{
		{in: "40000-40999", first: 40000, last: 40999},
		{in: " 1024-1025 ", first: 1024, last: 1025},
		{in: "1024-65535", first: 1024, last: 65535},
		{in: "", err: "want first-last"},
		{in: "40000", err: "want first-last"},
		{in: "40000-", err: "last"},
		{in: "-40000", err: "first"},
		{in: "a-40000", err: "first"},
		{in: "40000-40000", err: "greater than first"},
		{in: "40999-40000", err: "greater than first"},
		{in: "1023-2000", err: "below 1024"},
		{in: "1024-65536", err: "last"},
		{in: "-1-2000", err: "first"},
		{in: "1024-2000-3000", err: "last"},
		{in: "+1024-2000", err: "first"},
	}
	for _, tt := range tests {
		f, l, err := ParsePorts(tt.in)
		if tt.err == "" {
			if err != nil || f != tt.first || l != tt.last {
				t.Errorf("ParsePorts(%q) = %d, %d, %v, want %d, %d", tt.in, f, l, err, tt.first, tt.last)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.err) {
			t.Errorf("ParsePorts(%q) error = %v, want one containing %q", tt.in, err, tt.err)
		}
	}
}

func FuzzParsePorts(f *testing.F) {
	for _, s := range []string{"40000-40999", "1024-1025", "", "x", "65535-1024", "1-2"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		first, last, err := ParsePorts(s)
		if err != nil {
			return
		}
		if first < MinPort || last <= first {
			t.Fatalf("ParsePorts(%q) = %d, %d without error", s, first, last)
		}
	})
}

func TestDefaults(t *testing.T) {
	a := New(Options{})
	if a.TTL() != DefaultTTL || a.opts.MaxPerNode != DefaultMaxPerNode || a.opts.MaxPerRelay != DefaultMaxPerRelay {
		t.Fatalf("defaults = %v %d %d", a.TTL(), a.opts.MaxPerNode, a.opts.MaxPerRelay)
	}
}

func TestAllocate(t *testing.T) {
	a, c := newTest(t, Options{TTL: time.Minute})
	a.SetRelay("r", 40000, 40009)
	x, y := party("x"), party("y")

	s1 := mustAllocate(t, a, "r", x, y)
	want := Session{ID: 1, Relay: "r", A: x, B: y, PortA: 40000, PortB: 40001, Expires: c.t.Add(time.Minute)}
	if s1 != want {
		t.Fatalf("first session = %+v, want %+v", s1, want)
	}
	if p, ok := s1.PortFor("x"); !ok || p != 40000 {
		t.Errorf("PortFor(x) = %d, %v", p, ok)
	}
	if p, ok := s1.PortFor("y"); !ok || p != 40001 {
		t.Errorf("PortFor(y) = %d, %v", p, ok)
	}
	if _, ok := s1.PortFor("z"); ok {
		t.Errorf("PortFor(z) found")
	}

	// The pair is unordered: y asking for x renews the same session.
	c.advance(30 * time.Second)
	s2 := mustAllocate(t, a, "r", y, x)
	if s2.ID != s1.ID || s2.A != x || s2.PortA != s1.PortA || s2.PortB != s1.PortB {
		t.Fatalf("reversed pair = %+v, want the session %+v", s2, s1)
	}
	if !s2.Expires.Equal(c.t.Add(time.Minute)) {
		t.Errorf("renewed Expires = %v, want %v", s2.Expires, c.t.Add(time.Minute))
	}
	if got := a.Sessions("r"); len(got) != 1 || got[0] != s2 {
		t.Errorf("Sessions = %+v, want [%+v]", got, s2)
	}

	// Another key for x (rotated, not yet dropped) is another pair.
	x2 := x
	x2.Key[31] = 1
	s3 := mustAllocate(t, a, "r", x2, y)
	if s3.ID != 2 || s3.PortA != 40002 || s3.PortB != 40003 {
		t.Errorf("new key session = %+v, want ID 2 ports 40002/40003", s3)
	}
	// The same pair on another relay is another session.
	a.SetRelay("q", 50000, 50001)
	s4 := mustAllocate(t, a, "q", x, y)
	if s4.ID != 3 || s4.Relay != "q" || s4.PortA != 50000 || s4.PortB != 50001 {
		t.Errorf("other relay session = %+v", s4)
	}
	if got := ids(a.Sessions("r")); !slices.Equal(got, []uint64{1, 2}) {
		t.Errorf("Sessions(r) IDs = %v, want [1 2]", got)
	}
	if a.Count("r") != 2 || a.Count("q") != 1 || a.Count("none") != 0 || a.Total() != 3 {
		t.Errorf("Count r=%d q=%d none=%d Total=%d", a.Count("r"), a.Count("q"), a.Count("none"), a.Total())
	}
	if got := a.Relays(); !slices.Equal(got, []string{"q", "r"}) {
		t.Errorf("Relays = %v", got)
	}
}

func TestAllocateErrors(t *testing.T) {
	a, _ := newTest(t, Options{})
	a.SetRelay("r", 40000, 40009)
	tests := []struct {
		relay string
		x, y  Party
		want  error
	}{
		{"none", party("x"), party("y"), ErrUnknownRelay},
		{"r", party("x"), party("x"), ErrInvalidPair},
		{"r", party("r"), party("y"), ErrInvalidPair},
		{"r", party("x"), party("r"), ErrInvalidPair},
	}
	for _, tt := range tests {
		if _, err := a.Allocate(tt.relay, tt.x, tt.y); !errors.Is(err, tt.want) {
			t.Errorf("Allocate(%s, %s, %s) = %v, want %v", tt.relay, tt.x.Name, tt.y.Name, err, tt.want)
		}
	}
	if a.Total() != 0 {
		t.Errorf("failed allocations left %d sessions", a.Total())
	}
}

func TestExhaustionAndReuseAfterExpiry(t *testing.T) {
	a, c := newTest(t, Options{TTL: time.Minute})
	a.SetRelay("r", 40000, 40004) // five ports: two sessions
	mustAllocate(t, a, "r", party("a"), party("b"))
	c.advance(30 * time.Second)
	mustAllocate(t, a, "r", party("c"), party("d"))
	if _, err := a.Allocate("r", party("e"), party("f")); !errors.Is(err, ErrNoPorts) {
		t.Fatalf("third session error = %v, want ErrNoPorts", err)
	}
	// Renewing an existing pair still works when full.
	mustAllocate(t, a, "r", party("b"), party("a"))

	// a-b was renewed at +30s; nothing expires at +60s.
	c.advance(30 * time.Second)
	if got := a.Expire(); got != nil {
		t.Fatalf("Expire at +60s = %v, want none", got)
	}
	// At +90s both expire (c-d at +90 exactly, a-b at +90).
	c.advance(30 * time.Second)
	if got := a.Sessions("r"); len(got) != 0 {
		t.Fatalf("Sessions after expiry = %+v, want none", got)
	}
	if got := a.Expire(); !slices.Equal(got, []string{"r"}) {
		t.Fatalf("Expire = %v, want [r]", got)
	}
	if got := a.Expire(); got != nil {
		t.Fatalf("second Expire = %v, want none", got)
	}
	// Freed ports are reused; the search goes on from the last port taken, so
	// the first new session gets the one never used before.
	s := mustAllocate(t, a, "r", party("e"), party("f"))
	if s.PortA != 40004 || s.PortB != 40000 {
		t.Errorf("after expiry ports = %d/%d, want 40004/40000", s.PortA, s.PortB)
	}
	s = mustAllocate(t, a, "r", party("g"), party("h"))
	if s.PortA != 40001 || s.PortB != 40002 {
		t.Errorf("second after expiry ports = %d/%d, want 40001/40002", s.PortA, s.PortB)
	}
}

func TestAllocateRemovesExpiredOfRelay(t *testing.T) {
	a, c := newTest(t, Options{TTL: time.Minute})
	a.SetRelay("r", 40000, 40001)
	old := mustAllocate(t, a, "r", party("a"), party("b"))
	c.advance(time.Minute)
	// An expired session of the same pair is not renewed: a new one replaces it.
	s := mustAllocate(t, a, "r", party("a"), party("b"))
	if s.ID == old.ID {
		t.Fatalf("expired session %d was renewed", old.ID)
	}
	if got := ids(a.Sessions("r")); !slices.Equal(got, []uint64{s.ID}) {
		t.Errorf("Sessions = %v, want [%d]", got, s.ID)
	}
}

func TestMaxPerRelay(t *testing.T) {
	a, _ := newTest(t, Options{MaxPerRelay: 1})
	a.SetRelay("r", 40000, 40999)
	mustAllocate(t, a, "r", party("a"), party("b"))
	if _, err := a.Allocate("r", party("c"), party("d")); !errors.Is(err, ErrNoPorts) {
		t.Fatalf("second session error = %v, want ErrNoPorts", err)
	}
}

func TestNodeCap(t *testing.T) {
	a, c := newTest(t, Options{MaxPerNode: 2, TTL: time.Minute})
	a.SetRelay("r", 40000, 40999)
	a.SetRelay("q", 50000, 50999)
	mustAllocate(t, a, "r", party("x"), party("a"))
	c.advance(30 * time.Second)
	mustAllocate(t, a, "q", party("b"), party("x")) // cap counts across relays
	for _, pair := range [][2]Party{{party("x"), party("c")}, {party("c"), party("x")}} {
		if _, err := a.Allocate("r", pair[0], pair[1]); !errors.Is(err, ErrNodeCap) {
			t.Errorf("Allocate(%s, %s) at cap = %v, want ErrNodeCap", pair[0].Name, pair[1].Name, err)
		}
	}
	// Renewal is not a new session.
	mustAllocate(t, a, "q", party("x"), party("b"))
	// Others are not limited by x.
	mustAllocate(t, a, "r", party("a"), party("c"))
	// An expired session does not count, even before Expire.
	c.advance(30 * time.Second) // x-a on r expires
	mustAllocate(t, a, "r", party("x"), party("c"))
}

func TestDropNode(t *testing.T) {
	a, _ := newTest(t, Options{})
	a.SetRelay("r", 40000, 40999)
	a.SetRelay("q", 50000, 50999)
	a.SetRelay("p", 60000, 60999)
	mustAllocate(t, a, "r", party("x"), party("y"))
	mustAllocate(t, a, "q", party("z"), party("x"))
	keep := mustAllocate(t, a, "r", party("y"), party("z"))
	mustAllocate(t, a, "p", party("y"), party("z"))

	if got := a.DropNode("x"); !slices.Equal(got, []string{"q", "r"}) {
		t.Fatalf("DropNode(x) = %v, want [q r]", got)
	}
	if got := ids(a.Sessions("r")); !slices.Equal(got, []uint64{keep.ID}) {
		t.Errorf("Sessions(r) = %v, want [%d]", got, keep.ID)
	}
	if got := a.Sessions("q"); len(got) != 0 {
		t.Errorf("Sessions(q) = %+v, want none", got)
	}
	if got := a.DropNode("x"); got != nil {
		t.Errorf("second DropNode(x) = %v, want none", got)
	}
	// x's ports are free again: a new x session on q takes fresh ports.
	s := mustAllocate(t, a, "q", party("x"), party("y"))
	if s.PortA != 50002 {
		t.Errorf("new q session PortA = %d, want 50002", s.PortA)
	}
	if a.live("x", time.Unix(1_700_000_000, 0)) != 1 {
		t.Errorf("x has %d live sessions, want 1", a.live("x", time.Unix(1_700_000_000, 0)))
	}
}

func TestRelayOnlineOffline(t *testing.T) {
	a, _ := newTest(t, Options{})
	if a.SetRelay("r", 40000, 40009) {
		t.Errorf("SetRelay of a new relay reported a change")
	}
	mustAllocate(t, a, "r", party("a"), party("b")) // 40000/40001
	mustAllocate(t, a, "r", party("c"), party("d")) // 40002/40003
	if !a.Online("r") || a.Online("q") {
		t.Fatalf("Online r=%v q=%v", a.Online("r"), a.Online("q"))
	}
	// Same range: nothing changes.
	if a.SetRelay("r", 40000, 40009) || a.Count("r") != 2 {
		t.Fatalf("SetRelay with the same range changed sessions (%d left)", a.Count("r"))
	}
	// A narrower range drops the sessions outside it.
	if !a.SetRelay("r", 40002, 40009) {
		t.Errorf("SetRelay narrowing reported no change")
	}
	if got := a.Sessions("r"); len(got) != 1 || got[0].A.Name != "c" {
		t.Fatalf("after narrowing Sessions = %+v, want only c-d", got)
	}
	s := mustAllocate(t, a, "r", party("a"), party("b"))
	if s.PortA < 40004 || s.PortB < 40004 {
		t.Errorf("after narrowing new ports = %d/%d, want within 40004-40009", s.PortA, s.PortB)
	}

	if !a.RemoveRelay("r") || a.RemoveRelay("r") {
		t.Fatalf("RemoveRelay twice did not report true, false")
	}
	if a.Online("r") || a.Sessions("r") != nil || a.Total() != 0 {
		t.Fatalf("after RemoveRelay: online %v sessions %v total %d", a.Online("r"), a.Sessions("r"), a.Total())
	}
	if _, err := a.Allocate("r", party("a"), party("b")); !errors.Is(err, ErrUnknownRelay) {
		t.Errorf("Allocate on removed relay = %v, want ErrUnknownRelay", err)
	}
	// The nodes' cap counts forgot the dropped sessions.
	if len(a.byNode) != 0 {
		t.Errorf("node index not empty: %v", a.byNode)
	}
	// Back online: starts empty, IDs keep increasing.
	a.SetRelay("r", 40000, 40009)
	if s2 := mustAllocate(t, a, "r", party("a"), party("b")); s2.ID <= s.ID {
		t.Errorf("ID after re-adding = %d, want > %d", s2.ID, s.ID)
	}
}

// TestWrapAround fills the range up to its last port so that the search wraps.
func TestWrapAround(t *testing.T) {
	a, _ := newTest(t, Options{})
	a.SetRelay("r", 65532, 65535)
	mustAllocate(t, a, "r", party("a"), party("b")) // 65532/65533
	mustAllocate(t, a, "r", party("c"), party("d")) // 65534/65535
	a.DropNode("a")
	s := mustAllocate(t, a, "r", party("e"), party("f"))
	if s.PortA != 65532 || s.PortB != 65533 {
		t.Errorf("after wrap ports = %d/%d, want 65532/65533", s.PortA, s.PortB)
	}
}

// TestImports keeps the package stdlib only.
func TestImports(t *testing.T) {
	pkg, err := build.ImportDir(".", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, imp := range pkg.Imports {
		if strings.Contains(strings.SplitN(imp, "/", 2)[0], ".") || strings.HasPrefix(imp, "segmesh") {
			t.Errorf("import %q: controller/relays is stdlib only", imp)
		}
	}
}

func TestOfDropTotal(t *testing.T) {
	a, c := newTest(t, Options{TTL: time.Minute})
	a.SetRelay("r", 40000, 40999)
	a.SetRelay("q", 50000, 50999)
	s1 := mustAllocate(t, a, "r", party("x"), party("y"))
	c.advance(30 * time.Second)
	s2 := mustAllocate(t, a, "q", party("z"), party("x"))
	s3 := mustAllocate(t, a, "r", party("y"), party("z"))
	if got := ids(a.Of("x")); !slices.Equal(got, []uint64{s1.ID, s2.ID}) {
		t.Errorf("Of(x) = %v, want [%d %d]", got, s1.ID, s2.ID)
	}
	if got := a.Of("nobody"); len(got) != 0 {
		t.Errorf("Of(nobody) = %v", got)
	}
	if a.Total() != 3 {
		t.Errorf("Total = %d, want 3", a.Total())
	}
	c.advance(30 * time.Second) // s1 expires, not yet removed
	if a.Total() != 2 || len(a.Of("x")) != 1 {
		t.Errorf("after s1 expired: Total %d, Of(x) %v", a.Total(), a.Of("x"))
	}
	if r, ok := a.Drop(s2.ID); !ok || r != "q" {
		t.Errorf("Drop(%d) = %q, %v, want q, true", s2.ID, r, ok)
	}
	if _, ok := a.Drop(s2.ID); ok {
		t.Errorf("second Drop(%d) found it", s2.ID)
	}
	if got := ids(a.Sessions("r")); !slices.Equal(got, []uint64{s3.ID}) {
		t.Errorf("Sessions(r) = %v, want [%d]", got, s3.ID)
	}
	if a.Count("q") != 0 || len(a.Of("x")) != 0 {
		t.Errorf("after Drop: Count(q) %d, Of(x) %v", a.Count("q"), a.Of("x"))
	}
}
