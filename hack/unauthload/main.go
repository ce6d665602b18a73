// Command unauthload measures what unauthenticated clients cost the segmesh
// controller in memory (issue 6, defect 3).
//
// Usage (from the repository root):
//
//	go build -o bin/ ./cmd/segmesh-controller
//	go run ./hack/unauthload [-clients 60] [-body 15MiB] [-rounds 3] [-streams 1]
//	    [-scenarios REGEXP] [-controller-bin bin/segmesh-controller] [-goal 100MB]
//
// For every scenario it starts a fresh segmesh-controller in a temporary data
// directory on a free loopback port (127.0.0.1:0; its URL and CA come from the
// operator.json the controller writes), waits until it answers, records its idle
// resident set (the largest VmRSS of /proc/PID/status over 500 ms), resets VmHWM
// and then lets -clients clients, each with its own connection, send -rounds
// requests of -body bytes each, all at once, without a credential or with a wrong
// one. VmRSS is sampled every -sample; VmHWM is read at the end. Then the
// controller gets SIGTERM (SIGKILL to its PID after 15 s) and the directory is
// removed.
//
// Scenarios: ApplyPolicy without a bearer token, ApplyPolicy and CreateToken with
// a wrong one, EnrollService.Enroll (unauthenticated by design, 64 KiB limit)
// and AgentService.Report without a client certificate, each over HTTP/2 and
// HTTP/1.1, with the body length declared
// (Content-Length) or not (chunked). The table gives, per scenario: idle RSS,
// peak RSS (VmHWM after the reset, so a spike between samples counts), peak minus
// idle, the sampled peak, RSS after the load, requests sent and answered, the
// answer codes and transport errors, p50/p99 latency to the response headers,
// body bytes the clients got out, controller CPU time, controller log lines, and
// whether the controller still answers its admin credential.
//
// Memory figures are in MB (10^6 bytes). The exit status is 1 when a scenario's
// peak minus idle reaches -goal, when the controller stopped answering, or when
// a scenario could not run; 2 on a usage error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"segmesh/hack/internal/ctlproc"
	"segmesh/hack/internal/procmem"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// options are the command-line flags.
type options struct {
	bin        string
	ctlArgs    []string
	clients    int
	streams    int
	rounds     int
	body       int64
	bodyFlag   string
	goal       int64
	duration   time.Duration
	reqTimeout time.Duration
	sample     time.Duration
	filter     *regexp.Regexp
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("unauthload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.bin, "controller-bin", "bin/segmesh-controller", "segmesh-controller binary (build it with `go build -o bin/ ./cmd/segmesh-controller`)")
	ctlArgs := fs.String("controller-args", "", "extra controller flags, space separated (e.g. \"--max-connections 100\")")
	fs.IntVar(&o.clients, "clients", 60, "concurrent unauthenticated clients, each with its own connection")
	fs.IntVar(&o.streams, "streams", 1, "concurrent requests per client (HTTP/2: streams on its one connection; HTTP/1.1: one connection each)")
	fs.IntVar(&o.rounds, "rounds", 3, "requests each client stream sends one after the other")
	body := fs.String("body", "15MiB", "request body size (B, KiB, MiB, GiB, KB, MB, GB)")
	goal := fs.String("goal", "100MB", "fail when peak RSS minus idle RSS reaches this")
	fs.DurationVar(&o.duration, "duration", time.Minute, "longest load phase of one scenario; running requests are cancelled then")
	fs.DurationVar(&o.reqTimeout, "request-timeout", 30*time.Second, "longest single request")
	fs.DurationVar(&o.sample, "sample", 10*time.Millisecond, "VmRSS sampling interval")
	filter := fs.String("scenarios", "", "run only scenarios whose name matches this regular expression (names: "+scenarioNames()+")")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var err error
	o.bodyFlag = *body
	if o.body, err = parseSize(*body); err != nil {
		return o, fmt.Errorf("-body: %w", err)
	}
	if o.goal, err = parseSize(*goal); err != nil {
		return o, fmt.Errorf("-goal: %w", err)
	}
	if o.filter, err = regexp.Compile(*filter); err != nil {
		return o, fmt.Errorf("-scenarios: %w", err)
	}
	if o.clients < 1 || o.streams < 1 || o.rounds < 1 {
		return o, errors.New("-clients, -streams and -rounds must be at least 1")
	}
	if o.duration <= 0 || o.reqTimeout <= 0 || o.sample <= 0 {
		return o, errors.New("-duration, -request-timeout and -sample must be positive")
	}
	o.ctlArgs = strings.Fields(*ctlArgs)
	return o, nil
}

func scenarioNames() string {
	var names []string
	for _, s := range scenarios() {
		names = append(names, "\""+s.String()+"\"")
	}
	return strings.Join(names, ", ")
}

// parseSize parses "15MiB", "64KiB", "100MB", "1GB" or a plain byte count.
func parseSize(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
		{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1},
	}
	num, mult := strings.TrimSpace(s), int64(1)
	for _, u := range units {
		if n, ok := strings.CutSuffix(num, u.suffix); ok {
			num, mult = strings.TrimSpace(n), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("size %q: want a non-negative integer with an optional unit (B, KiB, MiB, GiB, KB, MB, GB)", s)
	}
	if n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return n * mult, nil
}

// row is one scenario's measurement.
type row struct {
	sc           scenario
	idle         int64 // bytes
	hwm          int64 // VmHWM after the reset
	sampled      int64 // largest sampled VmRSS
	samples      int
	after        int64 // VmRSS after the load
	stats        *loadStats
	cpu          time.Duration
	logLines     int
	alive        bool
	hwmResetNote string
}

func (r row) growth() int64 { return max(r.hwm, r.sampled) - r.idle }

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(stderr, "unauthload:", err)
		}
		return 2
	}
	var selected []scenario
	for _, s := range scenarios() {
		if o.filter.MatchString(s.String()) {
			selected = append(selected, s)
		}
	}
	if len(selected) == 0 {
		fmt.Fprintf(stderr, "unauthload: no scenario matches -scenarios %q; names: %s\n", o.filter, scenarioNames())
		return 2
	}
	fmt.Fprintf(stdout, "unauthload: %d clients × %d streams × %d rounds, %s (%d bytes) bodies, %d scenarios, controller %s\n",
		o.clients, o.streams, o.rounds, o.bodyFlag, o.body, len(selected), o.bin)
	var rows []row
	failed := false
	for _, sc := range selected {
		if ctx.Err() != nil {
			fmt.Fprintln(stderr, "unauthload: interrupted")
			return 1
		}
		r, err := measure(ctx, sc, o)
		if err != nil {
			fmt.Fprintf(stderr, "unauthload: %s: %v\n", sc, err)
			failed = true
			continue
		}
		fmt.Fprintf(stdout, "  %-40s peak-idle %8s  answered %d/%d  %s\n", sc, formatBytes(r.growth()), r.stats.answered, r.stats.sent, r.stats.codeSummary())
		rows = append(rows, r)
	}
	printTable(stdout, rows, o.goal)
	for _, r := range rows {
		if r.growth() >= o.goal || !r.alive {
			failed = true
		}
	}
	if failed {
		return 1
	}
	return 0
}

// measure runs one scenario against a fresh controller.
func measure(ctx context.Context, sc scenario, o options) (row, error) {
	p, err := ctlproc.Start(ctx, o.bin, "unauthload", o.ctlArgs)
	if err != nil {
		return row{}, err
	}
	defer p.Stop()
	r := row{sc: sc}
	pid := p.PID()

	// Idle: the largest VmRSS over 500 ms after the controller answered.
	s := startSampler(pid, o.sample)
	time.Sleep(500 * time.Millisecond)
	r.idle, _ = s.stop()
	if r.idle == 0 {
		return row{}, fmt.Errorf("could not read /proc/%d/status", pid)
	}
	if err := procmem.ResetHWM(pid); err != nil {
		// VmHWM then includes start-up; the sampled peak still counts.
		r.hwmResetNote = fmt.Sprintf("VmHWM not reset (%v)", err)
	}
	cpu0, err := procmem.CPU(pid)
	if err != nil {
		return row{}, fmt.Errorf("reading the controller's CPU time: %w", err)
	}
	logs0 := p.LogLines()

	s = startSampler(pid, o.sample)
	r.stats = runLoad(ctx, sc, p.URL, p.TLS, loadConfig{
		clients: o.clients, streams: o.streams, rounds: o.rounds, body: o.body,
		deadline: time.Now().Add(o.duration), reqTimeout: o.reqTimeout,
	})
	// Memory a refused body makes the controller hold may show up only once
	// the connections are gone; keep sampling for a moment.
	time.Sleep(200 * time.Millisecond)
	r.sampled, r.samples = s.stop()
	mem, err := procmem.Read(pid)
	if err != nil {
		return row{}, fmt.Errorf("controller gone after the load (%v); its log:\n%s", err, p.LogTail(20))
	}
	r.hwm, r.after = mem.HWM, mem.RSS
	cpu1, err := procmem.CPU(pid)
	if err != nil {
		return row{}, fmt.Errorf("reading the controller's CPU time: %w", err)
	}
	r.cpu = cpu1 - cpu0
	r.logLines = p.LogLines() - logs0
	r.alive = adminStatusOK(ctx, p)
	return r, nil
}

// adminStatusOK reports whether the controller answers OperatorService.Status
// with the admin credential of its operator.json.
func adminStatusOK(ctx context.Context, p *ctlproc.Proc) bool {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	tr := newTransport("h2", p.TLS)
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.URL.JoinPath("/segmesh.v1.OperatorService/Status").String(), strings.NewReader("{}"))
	if err != nil {
		return false
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+p.Token)
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func printTable(w io.Writer, rows []row, goal int64) {
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\tidle RSS\tpeak RSS\tpeak-idle\tsampled peak\tafter\tanswered/sent\tp50\tp99\tuploaded\tCPU\tlog lines\tstill serving\tanswer codes")
	worst := row{}
	for _, r := range rows {
		alive := "yes"
		if !r.alive {
			alive = "NO"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d/%d\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n",
			r.sc, formatBytes(r.idle), formatBytes(max(r.hwm, r.sampled)), formatBytes(r.growth()), formatBytes(r.sampled), formatBytes(r.after),
			r.stats.answered, r.stats.sent, formatDuration(percentile(r.stats.latency, 50)), formatDuration(percentile(r.stats.latency, 99)),
			formatBytes(r.stats.uploaded), formatDuration(r.cpu), r.logLines, alive, r.stats.codeSummary())
		if r.stats != nil && (worst.stats == nil || r.growth() > worst.growth()) {
			worst = r
		}
	}
	_ = tw.Flush()
	for _, r := range rows {
		if r.hwmResetNote != "" {
			fmt.Fprintf(w, "note: %s: %s\n", r.sc, r.hwmResetNote)
		}
	}
	if worst.stats != nil {
		verdict := "under"
		if worst.growth() >= goal {
			verdict = "NOT under"
		}
		fmt.Fprintf(w, "\nworst peak-idle: %s (%s); %s the goal of %s. MB = 10^6 bytes; peak RSS = max(VmHWM after reset, sampled VmRSS).\n",
			formatBytes(worst.growth()), worst.sc, verdict, formatBytes(goal))
	}
}

// formatBytes prints n in MB (10^6 bytes) with one decimal.
func formatBytes(n int64) string {
	return fmt.Sprintf("%.1f MB", float64(n)/1e6)
}

func formatDuration(d time.Duration) string {
	switch {
	case d == 0:
		return "-"
	case d < time.Millisecond:
		return fmt.Sprintf("%dµs", d.Microseconds())
	case d < time.Second:
		return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2fs", d.Seconds())
}
