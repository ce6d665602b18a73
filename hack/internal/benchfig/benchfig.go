// Package benchfig is the figure format that the benchmark drivers under hack/
// (loadgen, prefixes, throughput, agentmem) write with -json and that
// hack/benchreport reads to render BENCHMARKS.md.
package benchfig

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"
)

// Figure is one measured value.
type Figure struct {
	// Driver is the command under hack/ that measured it: "loadgen",
	// "prefixes", "throughput", "agentmem".
	Driver string `json:"driver"`
	// Scenario groups figures of one measurement, e.g. "policy", "join", "grow".
	Scenario string `json:"scenario"`
	// Figure names the value within the scenario, e.g. "delivery p99".
	Figure string  `json:"figure"`
	Value  float64 `json:"value"`
	// Unit is one of "ms", "s", "B", "Mbit/s", "ratio", "agents" (or another word,
	// printed after the value).
	Unit string `json:"unit"`
	// Agents is the number of simulated agents of a loadgen run; 0 for the other
	// drivers.
	Agents int `json:"agents,omitempty"`
	// Conditions describes the load and the machine in words.
	Conditions string `json:"conditions"`
	// Command is the command line that measured the figure.
	Command string `json:"command"`
	// Date is when the run started, RFC 3339 in UTC.
	Date string `json:"date"`
}

// Recorder collects the figures of one run; the zero value is not usable, use
// NewRecorder.
type Recorder struct {
	Driver     string
	Command    string
	Conditions string
	Date       string
	Figures    []Figure
}

// NewRecorder starts a run of the driver name with its arguments args (the
// command recorded with every figure is "go run ./hack/NAME ARGS...") and the
// conditions text for every figure.
func NewRecorder(name string, args []string, conditions string) *Recorder {
	return &Recorder{
		Driver:     name,
		Command:    strings.Join(append([]string{"go run ./hack/" + name}, args...), " "),
		Conditions: conditions,
		Date:       time.Now().UTC().Format(time.RFC3339),
	}
}

// Add records one figure.
func (r *Recorder) Add(scenario, figure string, value float64, unit string) {
	r.Figures = append(r.Figures, Figure{Driver: r.Driver, Scenario: scenario, Figure: figure, Value: value, Unit: unit,
		Conditions: r.Conditions, Command: r.Command, Date: r.Date})
}

// WriteFile writes the recorded figures to path as a JSON array (nothing when
// path is empty or nothing was recorded).
func (r *Recorder) WriteFile(path string) error {
	if path == "" || len(r.Figures) == 0 {
		return nil
	}
	return Write(path, r.Figures)
}

// Write writes figs to path as an indented JSON array.
func Write(path string, figs []Figure) error {
	raw, err := json.MarshalIndent(figs, "", "  ")
	if err == nil {
		err = os.WriteFile(path, append(raw, '\n'), 0o644)
	}
	if err != nil {
		return fmt.Errorf("writing the figures to %s: %w", path, err)
	}
	return nil
}

// Read reads a JSON array of figures written by Write. A missing file is an
// error that matches os.ErrNotExist.
func Read(path string) ([]Figure, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading figures: %w", err)
	}
	var figs []Figure
	if err := json.Unmarshal(raw, &figs); err != nil {
		return nil, fmt.Errorf("reading figures from %s: %w (want a JSON array of {scenario, figure, value, unit, ...})", path, err)
	}
	for i, f := range figs {
		if f.Scenario == "" || f.Figure == "" {
			return nil, fmt.Errorf("reading figures from %s: entry %d has no scenario or figure name", path, i)
		}
	}
	return figs, nil
}

// LabConditions is the conditions text of the netns lab drivers (prefixes,
// throughput, agentmem).
func LabConditions() string {
	return fmt.Sprintf("controller and agents in network namespaces on one %d-CPU machine", runtime.NumCPU())
}
