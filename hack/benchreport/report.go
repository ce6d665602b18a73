package main

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/perf/benchfmt"

	"segmesh/hack/internal/benchfig"
)

// section is one table of the report.
type section struct {
	title, intro string
	rows         []row
}

// row is one line of a section's table: a figure, its target (text) and the
// values that measure it.
type row struct {
	figure string
	target string
	parts  []part
}

// part is one value of a row: either a Go benchmark result (bench, unit) or a
// driver figure (driver, scenario, figure, agents).
type part struct {
	// label prefixes the value when it is not empty ("p99", "1,000 agents").
	label string

	// bench is the benchmark's name without "Benchmark" and -GOMAXPROCS, unit
	// the benchfmt unit of the value ("sec/op", "B/op", "allocs/op", a
	// b.ReportMetric unit).
	bench, unit string

	// driver, scenario and figure name a benchfig.Figure; agents is the
	// loadgen run's agent count (0 for the other drivers).
	driver, scenario, figure string
	agents                   int

	// max and min are limits in the value's base unit (seconds for time, bytes,
	// milliseconds for a figure in ms, the ratio itself); 0 is none.
	max, min float64

	// missing says why the value may not exist, shown after "not measured: ";
	// empty: a reason derived from what was and was not run.
	missing string
}

// benchResult is one Go benchmark's values, merged over every result of its name.
type benchResult struct {
	name    string
	pkg     string
	cpu     string
	command string
	date    string
	values  map[string][]float64 // benchfmt unit -> values (one per result)
	units   []string             // in the order first seen
}

// inputs is everything the report is rendered from.
type inputs struct {
	benches []*benchResult // in the order first seen
	figures []benchfig.Figure
	machine machine
	now     time.Time
}

// machine describes the computer the figures were measured on.
type machine struct {
	cpus    int
	cpu     string // model, from go test's "cpu:" line or /proc/cpuinfo
	kernel  string // e.g. "Linux 6.18.44"
	goVer   string // e.g. "go1.26.8"
	loadAvg string // /proc/loadavg's first three fields at the time of the report, or ""
}

func (m machine) String() string {
	s := fmt.Sprintf("%d CPUs", m.cpus)
	if m.cpu != "" {
		s += " (" + m.cpu + ")"
	}
	return s + ", " + m.kernel + ", " + m.goVer
}

var gomaxprocsSuffix = regexp.MustCompile(`-\d+$`)

// readGoTest adds the results of `go test -bench` output r (file name for
// errors) to in. File configuration lines "command: ..." and "date: ..." (RFC
// 3339), which hack/bench.sh writes before each go test invocation, give the
// command and date of the results that follow.
func (in *inputs) readGoTest(r io.Reader, name string) error {
	br := benchfmt.NewReader(r, name)
	byName := map[string]*benchResult{}
	for _, b := range in.benches {
		byName[b.name] = b
	}
	for br.Scan() {
		res, ok := br.Result().(*benchfmt.Result)
		if !ok {
			if se, ok := br.Result().(*benchfmt.SyntaxError); ok {
				return fmt.Errorf("reading go test output: %w", se)
			}
			continue
		}
		n := gomaxprocsSuffix.ReplaceAllString(res.Name.String(), "")
		b := byName[n]
		if b == nil {
			b = &benchResult{name: n, values: map[string][]float64{}}
			byName[n] = b
			in.benches = append(in.benches, b)
		}
		b.pkg, b.cpu = res.GetConfig("pkg"), res.GetConfig("cpu")
		b.command, b.date = res.GetConfig("command"), res.GetConfig("date")
		for _, v := range res.Values {
			if _, seen := b.values[v.Unit]; !seen {
				b.units = append(b.units, v.Unit)
			}
			b.values[v.Unit] = append(b.values[v.Unit], v.Value)
		}
	}
	if err := br.Err(); err != nil {
		return fmt.Errorf("reading go test output: %w", err)
	}
	return nil
}

// median of v (not empty).
func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// value is a part's measured value or the reason it has none.
type value struct {
	ok         bool
	v          float64 // in the part's unit
	unit       string  // benchfmt unit or benchfig unit
	reason     string  // when !ok
	conditions string
	command    string
	date       string
}

func (in *inputs) lookup(p part) value {
	if p.bench != "" {
		for _, b := range in.benches {
			if b.name != p.bench {
				continue
			}
			vs, ok := b.values[p.unit]
			if !ok {
				return value{reason: fmt.Sprintf("Benchmark%s reported no %s", p.bench, p.unit)}
			}
			cond := "Go benchmark"
			if b.pkg != "" {
				cond += " in " + b.pkg
			}
			if len(vs) > 1 {
				cond += fmt.Sprintf(", median of %d runs", len(vs))
			}
			return value{ok: true, v: median(vs), unit: p.unit, conditions: cond, command: b.command, date: b.date}
		}
		if p.missing != "" {
			return value{reason: p.missing}
		}
		return value{reason: fmt.Sprintf("no result for Benchmark%s in the go test output (it failed or was not run)", p.bench)}
	}
	runs := false // figures of this driver (at this size) exist
	for _, f := range in.figures {
		if f.Driver != p.driver || f.Agents != p.agents {
			continue
		}
		runs = true
		if f.Scenario == p.scenario && f.Figure == p.figure {
			return value{ok: true, v: f.Value, unit: f.Unit, conditions: f.Conditions, command: f.Command, date: f.Date}
		}
	}
	if p.missing != "" {
		return value{reason: p.missing}
	}
	what := "hack/" + p.driver
	if p.agents > 0 {
		what = fmt.Sprintf("a %s-agent run of hack/loadgen", count(p.agents))
	}
	if !runs {
		hint := "the step failed or was skipped"
		switch {
		case p.driver == "loadgen" && p.agents == 1000:
			hint = "make bench runs it with LOADGEN_AGENTS=1000, the default; the step failed, was skipped or ran at another size"
		case p.driver == "loadgen":
			hint = fmt.Sprintf("make bench runs it with LOADGEN_LARGE_AGENTS=%d", p.agents)
		}
		return value{reason: fmt.Sprintf("no figures from %s (%s)", what, hint)}
	}
	return value{reason: fmt.Sprintf("%s has no figure %q of scenario %s (the scenario failed or was not run)", what, p.figure, p.scenario)}
}

// base converts v in unit to seconds (time units), bytes (B, B/op) or leaves it.
func base(v float64, unit string) (float64, string) {
	switch unit {
	case "sec/op", "s", "gone-s", "sec":
		return v, "s"
	case "ms":
		return v / 1000, "s"
	case "B", "B/op":
		return v, "B"
	}
	return v, unit
}

// limitBase converts a part's limit to the base unit of its value.
func limitBase(limit float64, unit string) float64 {
	if unit == "ms" {
		return limit / 1000
	}
	return limit
}

// format prints v in unit readably: durations in ns, µs, ms or s with three
// significant digits, bytes in B, KB, MB, GB (10^3), others as they are.
func format(v float64, unit string) string {
	b, bu := base(v, unit)
	switch bu {
	case "s":
		switch {
		case b == 0:
			return "0 s"
		case b < 1e-6:
			return sig(b*1e9) + " ns"
		case b < 1e-3:
			return sig(b*1e6) + " µs"
		case b < 1:
			return sig(b*1e3) + " ms"
		}
		return sig(b) + " s"
	case "B":
		switch {
		case b >= 1e9:
			return sig(b/1e9) + " GB"
		case b >= 1e6:
			return sig(b/1e6) + " MB"
		case b >= 1e3:
			return sig(b/1e3) + " KB"
		}
		return fmt.Sprintf("%.0f B", b)
	case "ratio":
		return fmt.Sprintf("%.2f", b)
	case "allocs/op":
		return sig(b) + " allocs"
	case "agents":
		return fmt.Sprintf("%.0f agents", b)
	}
	return sig(b) + " " + unit
}

// sig prints v with three significant digits (no exponent, no trailing zeros).
func sig(v float64) string {
	if v == 0 {
		return "0"
	}
	d := 3 - int(math.Floor(math.Log10(math.Abs(v)))) - 1
	if d < 0 {
		return strconv.FormatFloat(math.Round(v), 'f', 0, 64)
	}
	return strconv.FormatFloat(v, 'f', d, 64)
}

// count prints n with thousands separators: 1000 -> "1,000".
func count(n int) string {
	s := strconv.Itoa(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

func sprintf(format string, a ...any) string { return fmt.Sprintf(format, a...) }

// verdicts of a row.
const (
	verdictNone    = ""
	verdictMet     = "met"
	verdictMissed  = "missed"
	verdictPartial = "not judged: not every value was measured"
	// verdictNotMeasured: none of the values with a limit was measured.
	verdictNotMeasured = "not measured"
)

// rendered is a row ready to print.
type rendered struct {
	figure, value, target, conditions, command, date string
	verdict                                          string
}

func (in *inputs) renderRow(r row) rendered {
	out := rendered{figure: r.figure, target: r.target}
	var values, conds, cmds, dates []string
	var missingLabels []string // labels of the consecutive unmeasured parts with reason lastReason
	lastReason := ""
	flushMissing := func() {
		if lastReason == "" {
			return
		}
		text := "not measured: " + lastReason
		// Every part of the row missing for one reason: no labels needed.
		whole := len(values) == 0 && len(missingLabels) == len(r.parts)
		if l := strings.Join(missingLabels, " and "); l != "" && !whole {
			text = l + ": " + text
		}
		values = append(values, text)
		missingLabels, lastReason = nil, ""
	}
	limited, measured, missed := 0, 0, 0
	addUnique := func(list *[]string, s string) {
		if s != "" && !slices.Contains(*list, s) {
			*list = append(*list, s)
		}
	}
	for _, p := range r.parts {
		v := in.lookup(p)
		hasLimit := p.max != 0 || p.min != 0
		if hasLimit {
			limited++
		}
		if !v.ok {
			if v.reason != lastReason {
				flushMissing()
			}
			lastReason = v.reason
			if p.label != "" {
				missingLabels = append(missingLabels, p.label)
			}
			continue
		}
		flushMissing()
		text := format(v.v, v.unit)
		if hasLimit {
			measured++
			b, _ := base(v.v, v.unit)
			if (p.max != 0 && b > limitBase(p.max, v.unit)) || (p.min != 0 && b < limitBase(p.min, v.unit)) {
				missed++
				text = "**" + text + "**"
			}
		}
		addUnique(&conds, v.conditions)
		addUnique(&cmds, v.command)
		addUnique(&dates, shortDate(v.date))
		if p.label != "" {
			text = p.label + ": " + text
		}
		values = append(values, text)
	}
	flushMissing()
	switch {
	case limited == 0:
		out.verdict = verdictNone
	case missed > 0:
		out.verdict = verdictMissed
	case measured == 0:
		out.verdict = verdictNotMeasured
	case measured < limited:
		out.verdict = verdictPartial
	default:
		out.verdict = verdictMet
	}
	out.value = strings.Join(values, "; ")
	out.conditions = in.machine.String()
	if len(conds) > 0 {
		out.conditions += "; " + strings.Join(conds, "; ")
	}
	for i, c := range cmds {
		cmds[i] = "`" + c + "`"
	}
	out.command = strings.Join(cmds, "<br>")
	out.date = strings.Join(dates, ", ")
	return out
}

// shortDate prints an RFC 3339 date as "2006-01-02 15:04 UTC" (or as it is when
// it does not parse).
func shortDate(s string) string {
	if s == "" {
		return ""
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return s
	}
	return t.UTC().Format("2006-01-02 15:04 UTC")
}

// cell escapes s for a markdown table cell.
func cell(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "|", `\|`), "\n", " ")
}

// tally counts the verdicts of the catalog's rows.
type tally struct{ met, missed, partial, unjudged int }

// render writes the report in markdown and returns the verdict counts.
func (in *inputs) render(w io.Writer, sections []section) (tally, error) {
	var t tally
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "# Benchmarks\n\n")
	fmt.Fprintf(&buf, "Generated by `make bench` (hack/bench.sh, hack/benchreport) on %s; do not edit by hand. "+
		"[docs/benchmarks.md](docs/benchmarks.md) says how each figure is measured and what the profiles show.\n\n",
		in.now.UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(&buf, "Machine: %s", in.machine)
	if in.machine.loadAvg != "" {
		fmt.Fprintf(&buf, "; load average %s when the report was written", in.machine.loadAvg)
	}
	fmt.Fprintf(&buf, ". The machine may be shared: figures from single runs vary (up to 2x for the load generator). "+
		"A value in **bold** misses its target; \"not measured\" says why a value is missing.\n")
	for _, s := range sections {
		fmt.Fprintf(&buf, "\n## %s\n\n%s\n\n", s.title, s.intro)
		fmt.Fprintf(&buf, "| figure | value | target | conditions | command | date |\n|---|---|---|---|---|---|\n")
		for _, r := range s.rows {
			rr := in.renderRow(r)
			target := rr.target
			switch rr.verdict {
			case verdictNone:
				t.unjudged++
			case verdictMet:
				t.met++
			case verdictMissed:
				t.missed++
			case verdictPartial, verdictNotMeasured:
				t.partial++
			}
			if rr.verdict != verdictNone {
				target += " — " + rr.verdict
			}
			fmt.Fprintf(&buf, "| %s | %s | %s | %s | %s | %s |\n", cell(rr.figure), cell(rr.value), cell(target), cell(rr.conditions), cell(rr.command), cell(rr.date))
		}
	}
	in.renderBenches(&buf)
	in.renderFigures(&buf)
	_, err := w.Write(buf.Bytes())
	return t, err
}

// renderBenches lists every Go benchmark result.
func (in *inputs) renderBenches(buf *bytes.Buffer) {
	fmt.Fprintf(buf, "\n## Every Go benchmark\n\n")
	if len(in.benches) == 0 {
		fmt.Fprintf(buf, "No go test output was given.\n")
		return
	}
	fmt.Fprintf(buf, "| benchmark | package | values per operation | date |\n|---|---|---|---|\n")
	for _, b := range in.benches {
		var vs []string
		for _, u := range b.units {
			vs = append(vs, format(median(b.values[u]), u))
		}
		fmt.Fprintf(buf, "| %s | %s | %s | %s |\n", cell("Benchmark"+b.name), cell(b.pkg), cell(strings.Join(vs, ", ")), cell(shortDate(b.date)))
	}
}

// renderFigures lists every driver figure, grouped by driver and run size.
func (in *inputs) renderFigures(buf *bytes.Buffer) {
	fmt.Fprintf(buf, "\n## Every driver figure\n\n")
	if len(in.figures) == 0 {
		fmt.Fprintf(buf, "No driver figures were given.\n")
		return
	}
	figs := slices.Clone(in.figures)
	sort.SliceStable(figs, func(i, j int) bool {
		if figs[i].Driver != figs[j].Driver {
			return figs[i].Driver < figs[j].Driver
		}
		return figs[i].Agents < figs[j].Agents
	})
	fmt.Fprintf(buf, "| driver | agents | scenario | figure | value |\n|---|---|---|---|---|\n")
	for _, f := range figs {
		agents := ""
		if f.Agents > 0 {
			agents = count(f.Agents)
		}
		fmt.Fprintf(buf, "| %s | %s | %s | %s | %s |\n", cell(f.Driver), agents, cell(f.Scenario), cell(f.Figure), cell(format(f.Value, f.Unit)))
	}
}
