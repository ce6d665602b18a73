package agent

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"segmesh/agent/internal/testpki"
	"segmesh/agent/statefile"
	"segmesh/api/segmeshv1"
)

// replicas starts n test controllers sharing one CA (one fleet), each serving
// netmap pb.
func replicas(t *testing.T, n int, pb *segmeshv1.Netmap) []*controller {
	t.Helper()
	ca := testpki.NewCA(t, "segmesh fleet CA")
	out := make([]*controller, n)
	for i := range out {
		out[i] = newReplica(t, ca)
		out[i].setNetmap(pb)
	}
	return out
}

func controllerSet(urls ...string) *segmeshv1.NetmapUpdate {
	return &segmeshv1.NetmapUpdate{Update: &segmeshv1.NetmapUpdate_Controllers{Controllers: &segmeshv1.ControllerSet{Urls: urls}}}
}

// reportsAt returns how many reports c received.
func (c *controller) reportsAt() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.reports)
}

// downURL returns an https URL on which nothing listens.
func downURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := "https://" + ln.Addr().String()
	ln.Close()
	return u
}

func storedIdentity(t *testing.T, dir string) statefile.Identity {
	t.Helper()
	id, err := stateDir(t, dir).Identity()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestFailoverToNextReplica: when the controller the agent streams from dies,
// the agent streams from the next replica, sends its reports there, and leaves
// the dataplane exactly as it was (no apply, no teardown) meanwhile.
func TestFailoverToNextReplica(t *testing.T) {
	pb := wireNetmap(3, 0)
	cs := replicas(t, 3, pb)
	a, b, c := cs[0], cs[1], cs[2]
	dir := filepath.Join(t.TempDir(), "state")
	reg := prometheus.NewRegistry()
	r := start(t, Options{Controllers: []string{a.url, b.url, c.url}, Token: a.token(), StateDir: dir, Name: "web-1", Interface: "smt0", Metrics: reg})
	eventually(t, "report at the first replica", func() bool { return a.lastReport().GetAppliedHash() == pb.GetHash() })
	a.mu.Lock()
	features := a.syncs[0].GetFeatures()
	a.mu.Unlock()
	if !slices.Contains(features, featureControllers) {
		t.Errorf("SyncRequest.features = %q, want %q in it", features, featureControllers)
	}
	want := expected(t, dir, pb, nil)
	applies := len(r.dp.History())

	a.kill()
	eventually(t, "stream and report at the second replica", func() bool {
		_, syncs := b.counts()
		return syncs > 0 && b.lastReport().GetAppliedHash() == pb.GetHash()
	})
	if !holds(r.dp, want) || len(r.dp.History()) != applies || r.dp.Stats().Downs != 0 {
		t.Fatalf("the dataplane changed across the failover: holds %v, applies %d -> %d, downs %d",
			holds(r.dp, want), applies, len(r.dp.History()), r.dp.Stats().Downs)
	}
	if logs := r.logs.String(); !strings.Contains(logs, "switching to the next controller") {
		t.Errorf("no log of the switch:\n%s", logs)
	}
	if n, _ := c.counts(); n != 0 || c.reportsAt() != 0 {
		t.Errorf("the third replica got calls before the second failed")
	}

	b.kill()
	eventually(t, "stream at the third replica", func() bool { return c.lastReport().GetAppliedHash() == pb.GetHash() })
	if !holds(r.dp, want) || len(r.dp.History()) != applies {
		t.Fatal("the dataplane changed across the second failover")
	}
	metrics := fmt.Sprintf(`
# HELP segmesh_agent_controller_info The controller URL the agent uses for its stream and every call: always 1, with the URL as label.
# TYPE segmesh_agent_controller_info gauge
segmesh_agent_controller_info{url=%q} 1
# HELP segmesh_agent_controller_switches_total Moves of the agent to another controller URL (failover after its stream was lost, or re-enrollment at another replica).
# TYPE segmesh_agent_controller_switches_total counter
segmesh_agent_controller_switches_total 2
# HELP segmesh_agent_controllers Controller URLs the agent knows (from --controller and from the controllers).
# TYPE segmesh_agent_controllers gauge
segmesh_agent_controllers 3
`, c.url)
	if err := testutil.GatherAndCompare(reg, strings.NewReader(metrics), "segmesh_agent_controller_info", "segmesh_agent_controller_switches_total", "segmesh_agent_controllers"); err != nil {
		t.Error(err)
	}
	// The replica in use is stored once its stream delivered, so that a restart
	// starts there.
	eventually(t, "the third replica stored as in use", func() bool {
		id := storedIdentity(t, dir)
		return id.Controller == c.url && slices.Equal(id.Controllers, []string{a.url, b.url, c.url})
	})
}

// frozenProxy forwards TCP to target until frozen; then it forwards nothing in
// either direction and closes nothing, as a network partition does (no FIN, no
// RST).
type frozenProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	frozen chan struct{} // closed once frozen
	conns  []net.Conn
}

func newFrozenProxy(t *testing.T, target string) *frozenProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &frozenProxy{ln: ln, target: target, frozen: make(chan struct{})}
	t.Cleanup(p.close)
	go p.serve()
	return p
}

func (p *frozenProxy) url() string { return "https://" + p.ln.Addr().String() }

func (p *frozenProxy) freeze() { close(p.frozen) }

func (p *frozenProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

func (p *frozenProxy) serve() {
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			in.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, in, out)
		p.mu.Unlock()
		go p.pipe(in, out)
		go p.pipe(out, in)
	}
}

// pipe copies from src to dst until an error, holding everything once frozen.
func (p *frozenProxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-p.frozen:
			return // drop the data; leave both connections open
		default:
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// TestFailoverOnSilentConnection: a controller that stops answering without
// closing the connection (a partition) is given up on through HTTP/2 pings
// (enroll.PingAfter, PingTimeout), although the stream is idle: the agent moves
// to the next replica.
func TestFailoverOnSilentConnection(t *testing.T) {
	pb := wireNetmap(3, 0)
	cs := replicas(t, 2, pb)
	a, b := cs[0], cs[1]
	proxy := newFrozenProxy(t, strings.TrimPrefix(a.url, "https://"))
	dir := filepath.Join(t.TempDir(), "state")
	// Reports every 50 ms: some are stuck on the silent connection when the
	// stream is lost, and must not delay the move.
	r := start(t, Options{Controllers: []string{proxy.url(), b.url}, Token: a.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
	eventually(t, "report through the proxy", func() bool { return a.lastReport().GetAppliedHash() == pb.GetHash() })
	want := expected(t, dir, pb, nil)
	applies := len(r.dp.History())

	proxy.freeze()
	eventually(t, "stream at the second replica", func() bool {
		_, syncs := b.counts()
		return syncs > 0 && b.lastReport().GetAppliedHash() == pb.GetHash()
	})
	if !holds(r.dp, want) || len(r.dp.History()) != applies {
		t.Fatal("the dataplane changed across the failover")
	}
}

// TestControllerSetStoredAndUsedAfterRestart: the URLs of a ControllerSet
// (checked: bad ones dropped with a warning) are stored in identity.json and
// logged once; a restart without --controller uses them when the enrolled
// controller is gone.
func TestControllerSetStoredAndUsedAfterRestart(t *testing.T) {
	pb := wireNetmap(3, 0)
	cs := replicas(t, 2, pb)
	a, b := cs[0], cs[1]
	dir := filepath.Join(t.TempDir(), "state")
	r := start(t, Options{Controllers: []string{a.url}, Token: a.token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
	eventually(t, "report", func() bool { return a.lastReport().GetAppliedHash() == pb.GetHash() })
	set := controllerSet(a.url, b.url, "http://192.0.2.9:7443", "https://", a.url)
	a.push <- set
	eventually(t, "the set stored", func() bool {
		return slices.Equal(storedIdentity(t, dir).Controllers, []string{a.url, b.url})
	})
	// The same set again (every reconnect sends it): no new log, no new warning.
	// The same URLs in another order (each replica sends itself first): stored,
	// but no log either. A netmap of a new revision after each marks it handled.
	a.push <- set
	a.push <- controllerSet(b.url, a.url)
	pb4 := wireNetmap(4, 0)
	a.push <- fullUpdate(pb4)
	eventually(t, "revision 4 reported", func() bool { return a.lastReport().GetAppliedHash() == pb4.GetHash() })
	if got := storedIdentity(t, dir).Controllers; !slices.Equal(got, []string{b.url, a.url}) {
		t.Errorf("stored controllers %q after the reordered set, want %q", got, []string{b.url, a.url})
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	logs := r.logs.String()
	if n := strings.Count(logs, "controller replicas changed"); n != 1 {
		t.Errorf("%d logs of the change, want 1:\n%s", n, logs)
	}
	if n := strings.Count(logs, "ignoring a controller URL the controller sent"); n != 2 {
		t.Errorf("%d warnings about bad URLs, want 2 (one per bad URL):\n%s", n, logs)
	}
	if id := storedIdentity(t, dir); id.Controller != a.url {
		t.Errorf("stored controller in use %q, want %q", id.Controller, a.url)
	}

	a.kill()
	r = start(t, Options{StateDir: dir})
	eventually(t, "stream and report at the stored second replica", func() bool { _, syncs := b.counts(); return syncs > 0 && b.reportsAt() > 0 })
	if logs := r.logs.String(); !strings.Contains(logs, "switching to the next controller") {
		t.Errorf("the restart did not move from the dead replica to the stored one:\n%s", logs)
	}
}

// TestControllersReplace: a ControllerSet replaces the list but keeps the URL in
// use (first when the set lacks it), without duplicates, at most MaxControllers.
func TestControllersReplace(t *testing.T) {
	u := func(i int) string { return fmt.Sprintf("https://10.0.0.%d:7443", i) }
	many := make([]string, 20)
	for i := range many {
		many[i] = u(i + 1)
	}
	tests := []struct {
		name    string
		urls    []string
		current string
		set     []string
		want    []string
		changed bool
		cut     int
	}{
		{name: "same", urls: []string{u(1), u(2)}, current: u(1), set: []string{u(1), u(2)}, want: []string{u(1), u(2)}},
		{name: "new order and member", urls: []string{u(1)}, current: u(1), set: []string{u(2), u(1), u(3)}, want: []string{u(2), u(1), u(3)}, changed: true},
		{name: "current kept first when missing", urls: []string{u(1), u(9)}, current: u(9), set: []string{u(2), u(3)}, want: []string{u(9), u(2), u(3)}, changed: true},
		{name: "cut to the maximum", urls: []string{u(1)}, current: u(1), set: many, want: many[:MaxControllers], changed: true, cut: 4},
		{name: "current past the maximum goes first", urls: []string{u(20)}, current: u(20), set: many,
			want: append([]string{u(20)}, many[:MaxControllers-1]...), changed: true, cut: 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newControllers(tt.urls, tt.current)
			_, now, changed, cut := c.replace(tt.set)
			if !slices.Equal(now, tt.want) || changed != tt.changed || cut != tt.cut {
				t.Fatalf("replace = %q, changed %v, cut %d; want %q, %v, %d", now, changed, cut, tt.want, tt.changed, tt.cut)
			}
			if c.current() != tt.current {
				t.Errorf("in use %q after replace, want %q", c.current(), tt.current)
			}
		})
	}

	good, bad := checkControllerURLs("controller URL", []string{u(1), "http://10.0.0.2:7443", u(1), "https://10.0.0.3:7443/?x", "https://" + strings.Repeat("a", maxControllerURL) + ":1", u(4)})
	if !slices.Equal(good, []string{u(1), u(4)}) || len(bad) != 3 {
		t.Errorf("checkControllerURLs = %q, %v; want %q and 3 errors", good, bad, []string{u(1), u(4)})
	}

	c := newControllers([]string{u(1), u(2), u(3)}, u(2))
	if got := c.inTurn(); !slices.Equal(got, []string{u(2), u(3), u(1)}) {
		t.Errorf("inTurn = %q", got)
	}
	for _, want := range []string{u(3), u(1), u(2)} {
		if _, to := c.advance(); to != want {
			t.Fatalf("advance to %q, want %q", to, want)
		}
	}
	if c.switchCount() != 3 {
		t.Errorf("switches = %d, want 3", c.switchCount())
	}
	if got := mergeControllers([]string{u(3), u(5)}, []string{u(1), u(3)}); !slices.Equal(got, []string{u(3), u(5), u(1)}) {
		t.Errorf("mergeControllers = %q", got)
	}
}

// TestFailoverPolicy: switching to another URL costs no wait; the backoff comes
// only after every URL failed in turn; a stable stream starts a new round.
func TestFailoverPolicy(t *testing.T) {
	type step struct {
		received, stable bool
		wait             bool // a backoff, not 0
	}
	tests := []struct {
		name  string
		n     int
		steps []step
	}{
		{name: "one URL: backoff after every failure", n: 1, steps: []step{{wait: true}, {received: true, stable: true, wait: true}, {wait: true}}},
		{name: "three URLs: a round, then backoff", n: 3, steps: []step{
			{received: true, stable: true}, // the healthy stream ends: next URL at once
			{},                             // the second fails: the third at once
			{wait: true},                   // the third fails: round over
			{}, {}, {wait: true},           // the next round
		}},
		{name: "flapping replicas still back off", n: 2, steps: []step{
			{received: true}, {received: true, wait: true}, {received: true}, {received: true, wait: true},
		}},
		{name: "a stable stream starts a new round", n: 2, steps: []step{{}, {received: true, stable: true}, {wait: true}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := failover{bo: newBackoff(time.Second, maxBackoff)}
			for i, s := range tt.steps {
				if d := f.next(s.received, s.stable, tt.n); (d > 0) != s.wait {
					t.Fatalf("step %d: wait %v, want a wait: %v", i, d, s.wait)
				}
			}
		})
	}
}

// TestEnrollTriesReplicas: enrollment moves past a controller that is
// unreachable or unavailable, and stops at a refusal (the replicas share one
// store: another one would refuse as well).
func TestEnrollTriesReplicas(t *testing.T) {
	tests := []struct {
		name      string
		first     func(t *testing.T, c *controller) string // the first URL
		wantErr   string
		wantAt    int // index of the replica that enrolls (1: the second)
		secondHit bool
	}{
		{name: "unreachable first", first: func(t *testing.T, _ *controller) string { return downURL(t) }, wantAt: 1, secondHit: true},
		{name: "unavailable first", first: func(_ *testing.T, c *controller) string {
			c.enrollErrs = []*connect.Error{unavailable()}
			return c.url
		}, wantAt: 1, secondHit: true},
		{name: "refusal is final", first: func(_ *testing.T, c *controller) string {
			c.enrollErrs = []*connect.Error{connect.NewError(connect.CodePermissionDenied, errors.New("join token already used"))}
			return c.url
		}, wantErr: "enrollment refused: join token already used"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pb := wireNetmap(1, 0)
			cs := replicas(t, 2, pb)
			first := tt.first(t, cs[0])
			dir := filepath.Join(t.TempDir(), "state")
			r := start(t, Options{Controllers: []string{first, cs[1].url}, Token: cs[0].token(), StateDir: dir, Name: "web-1", Interface: "smt0"})
			if tt.wantErr != "" {
				if err := r.wait(t); err == nil || err.Error() != tt.wantErr {
					t.Fatalf("Run = %v, want %q", err, tt.wantErr)
				}
			} else {
				eventually(t, "report at the second replica", func() bool { return cs[1].lastReport().GetAppliedHash() == pb.GetHash() })
				if id := storedIdentity(t, dir); id.Controller != cs[1].url || !slices.Equal(id.Controllers, []string{first, cs[1].url}) {
					t.Errorf("stored controller %q, controllers %q", id.Controller, id.Controllers)
				}
				if !strings.Contains(r.logs.String(), "enrollment failed; trying the next controller") {
					t.Errorf("no log of the move:\n%s", r.logs.String())
				}
			}
			if n, _ := cs[1].counts(); (n > 0) != tt.secondHit {
				t.Errorf("enrollments at the second replica: %d, want some: %v", n, tt.secondHit)
			}
		})
	}
}

// TestControllerFlagMergesWithStored: --controller on a later start goes first;
// the stored URLs stay after it, and bad stored ones are dropped.
func TestControllerFlagMergesWithStored(t *testing.T) {
	pb := wireNetmap(1, 0)
	cs := replicas(t, 2, pb)
	a, b := cs[0], cs[1]
	dir := enrolled(t, a, pb)
	d := stateDir(t, dir)
	id, err := d.Identity()
	if err != nil {
		t.Fatal(err)
	}
	id.Controllers = append(id.Controllers, "http://192.0.2.7:7443")
	if err := d.SaveIdentity(id); err != nil {
		t.Fatal(err)
	}
	r := start(t, Options{StateDir: dir, Controllers: []string{b.url}})
	eventually(t, "report at the flag's replica", func() bool { return b.lastReport().GetAppliedHash() == pb.GetHash() })
	if id := storedIdentity(t, dir); id.Controller != b.url || !slices.Equal(id.Controllers, []string{b.url, a.url}) {
		t.Errorf("stored controller %q, controllers %q; want %q, then %q", id.Controller, id.Controllers, b.url, a.url)
	}
	if !strings.Contains(r.logs.String(), "dropping a stored controller URL") {
		t.Errorf("no warning about the bad stored URL:\n%s", r.logs.String())
	}
}
