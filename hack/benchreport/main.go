// Command benchreport renders BENCHMARKS.md from the output of `go test -bench`
// and the JSON figures of the benchmark drivers (hack/loadgen, hack/prefixes,
// hack/throughput, hack/agentmem; package hack/internal/benchfig). hack/bench.sh
// runs it at the end of `make bench`.
//
// Usage (from the repository root):
//
//	go run ./hack/benchreport [-gotest FILE]... [-figures FILE]... [-out BENCHMARKS.md]
//
// The report has one table per issue (8: controller at scale, 7: dataplane and
// agent) with every row of that target table: figure, value, target (and
// whether it is met), conditions (machine: CPUs, kernel, Go version; the driver's
// conditions), command and date; then every Go benchmark result and every driver
// figure. A value the inputs lack is printed as "not measured" with the reason
// (a benchmark not written yet, a step that failed or was skipped), never
// guessed. Which benchmark or figure each row reads is in catalog.go.
//
// -gotest and -figures may be repeated; a file that does not exist is skipped
// with a warning (a failed step writes none). The figures of several runs of
// the load generator are told apart by their agent count. Exit status 1 when an
// input cannot be read or the report cannot be written, 2 on a usage error; a
// missed target is not an error (hack/bench.sh's exit status says that).
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"

	"segmesh/hack/internal/benchfig"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// files is a repeatable file flag.
type files []string

func (f *files) String() string     { return strings.Join(*f, ",") }
func (f *files) Set(s string) error { *f = append(*f, s); return nil }

func run(args []string, stdout, stderr io.Writer) int {
	var goTest, figs files
	fs := flag.NewFlagSet("benchreport", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Var(&goTest, "gotest", "output of `go test -bench` (repeatable)")
	fs.Var(&figs, "figures", "JSON figures of a benchmark driver's -json (repeatable)")
	out := fs.String("out", "BENCHMARKS.md", "the report to write")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "benchreport: unexpected arguments %q\n", fs.Args())
		return 2
	}
	in := &inputs{machine: thisMachine(), now: time.Now()}
	if err := in.read(goTest, figs, stderr); err != nil {
		fmt.Fprintf(stderr, "benchreport: %v\n", err)
		return 1
	}
	var buf bytes.Buffer
	t, _ := in.render(&buf, catalog())
	if err := os.WriteFile(*out, buf.Bytes(), 0o644); err != nil {
		fmt.Fprintf(stderr, "benchreport: writing the report: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "benchreport: wrote %s: %d rows met their target, %d missed, %d not measured in full, %d judged by hand\n",
		*out, t.met, t.missed, t.partial, t.unjudged)
	return 0
}

// read loads the input files into in; files that do not exist are skipped with
// a warning on stderr.
func (in *inputs) read(goTest, figs []string, stderr io.Writer) error {
	for _, path := range goTest {
		f, err := os.Open(path)
		if errors.Is(err, os.ErrNotExist) {
			fmt.Fprintf(stderr, "benchreport: skipping %s: it does not exist\n", path)
			continue
		}
		if err != nil {
			return fmt.Errorf("opening go test output: %w", err)
		}
		err = in.readGoTest(f, path)
		f.Close()
		if err != nil {
			return err
		}
		if in.machine.cpu == "" {
			for _, b := range in.benches {
				if b.cpu != "" {
					in.machine.cpu = b.cpu
					break
				}
			}
		}
	}
	for _, path := range figs {
		fs, err := benchfig.Read(path)
		if errors.Is(err, os.ErrNotExist) {
			fmt.Fprintf(stderr, "benchreport: skipping %s: it does not exist\n", path)
			continue
		}
		if err != nil {
			return err
		}
		in.figures = append(in.figures, fs...)
	}
	return nil
}

// thisMachine describes the machine the report is written on (the one that
// measured, since make bench writes it right after).
func thisMachine() machine {
	m := machine{cpus: runtime.NumCPU(), kernel: runtime.GOOS, goVer: runtime.Version()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.kernel = "Linux " + strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) >= 3 {
			m.loadAvg = strings.Join(f[:3], " ")
		}
	}
	return m
}
