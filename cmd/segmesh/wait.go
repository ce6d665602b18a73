package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// Waiting until a policy revision is enforced: `policy apply --wait` and `policy
// rollback --wait` poll Status after the controller stored the revision, until
// every online active node enforces the netmap the controller holds for it.
// Offline nodes are skipped (listed, not waited for); revoked nodes are ignored.

// Defaults and limits of --wait.
const (
	defaultWaitTimeout = 2 * time.Minute
	// The first poll follows the apply at once; the interval between polls then
	// doubles from minPollInterval up to maxPollInterval.
	minPollInterval = 100 * time.Millisecond
	maxPollInterval = 500 * time.Millisecond
)

// exitNotEnforced is the exit code of a --wait that timed out: the revision is
// stored and distributed, but some online node did not report enforcing it.
const exitNotEnforced = 3

// statusSource returns the controller's status; waitEnforced polls it.
type statusSource func(ctx context.Context) (*segmeshv1.StatusResponse, error)

// controllerStatus returns a statusSource calling the controller's Status over one
// controllerSet (built once for the whole wait), each call bounded by
// requestTimeout per controller.
func controllerStatus(g *globalFlags) (statusSource, error) {
	cs, err := dialControllers(g)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context) (*segmeshv1.StatusResponse, error) {
		var resp *connect.Response[segmeshv1.StatusResponse]
		err := cs.call(ctx, func(ctx context.Context, c segmeshv1connect.OperatorServiceClient) error {
			var err error
			resp, err = c.Status(ctx, connect.NewRequest(&segmeshv1.StatusRequest{UnconvergedOnly: true}))
			return err
		})
		if err != nil {
			return nil, err
		}
		return resp.Msg, nil
	}, nil
}

// waitNodeJSON is a node that does not enforce the revision waited for, in the
// output of --wait: what it should enforce and what its agent last reported.
type waitNodeJSON struct {
	Name            string `json:"name"`
	Online          bool   `json:"online"`
	DesiredRevision uint64 `json:"desired_revision"`
	AppliedRevision uint64 `json:"applied_revision"`
	DesiredHash     string `json:"desired_hash"`
	AppliedHash     string `json:"applied_hash"`
	Error           string `json:"error,omitempty"`
	LastSeen        string `json:"last_seen,omitempty"` // RFC 3339, UTC
}

// enforcement is how far the distribution of one revision got, as one Status
// answer shows it.
type enforcement struct {
	// Revision is the revision waited for; ServingRevision the one the controller
	// distributes (PolicyError says why when it is older).
	Revision        uint64 `json:"revision"`
	ServingRevision uint64 `json:"serving_revision"`
	PolicyError     string `json:"policy_error,omitempty"`
	NodesActive     int    `json:"nodes_active"`
	NodesOnline     int    `json:"nodes_online"`
	// NodesEnforcing counts the online active nodes whose agent reported the hash
	// of the netmap the controller holds for them.
	NodesEnforcing int `json:"nodes_enforcing"`
	// Pending are the online active nodes that do not enforce it (yet); Skipped
	// the offline active nodes, which are not waited for. Both sorted by name.
	Pending []waitNodeJSON `json:"pending"`
	Skipped []waitNodeJSON `json:"skipped"`
}

// assessEnforcement reads st for the distribution of revision rev. A node
// enforces its desired netmap when its agent's reported hash is non-empty and
// equal to the desired hash; the controller serves rev's netmaps once
// serving_revision >= rev (it publishes them before it switches the revision).
func assessEnforcement(rev uint64, st *segmeshv1.StatusResponse) enforcement {
	e := enforcement{Revision: rev, ServingRevision: st.GetServingRevision(), PolicyError: st.GetPolicyError(),
		Pending: []waitNodeJSON{}, Skipped: []waitNodeJSON{}}
	for _, n := range st.GetNodes() {
		if n.GetState() == nodeStateRevoked {
			continue
		}
		e.NodesActive++
		w := waitNodeJSON{Name: n.GetName(), Online: n.GetOnline(), DesiredRevision: n.GetDesiredRevision(), AppliedRevision: n.GetAppliedRevision(),
			DesiredHash: n.GetDesiredHash(), AppliedHash: n.GetAppliedHash(), Error: n.GetError(), LastSeen: unixTime(n.GetLastSeenUnix())}
		switch {
		case !w.Online:
			e.Skipped = append(e.Skipped, w)
		case w.AppliedHash != "" && w.AppliedHash == w.DesiredHash:
			e.NodesOnline++
			e.NodesEnforcing++
		default:
			e.NodesOnline++
			e.Pending = append(e.Pending, w)
		}
	}
	if st.GetNodesActive() > 0 {
		// A controller that knows the counts may have listed only the nodes
		// that are offline or pending (unconverged_only): take the counts
		// from it. One that predates them lists every node.
		e.NodesActive, e.NodesOnline = int(st.GetNodesActive()), int(st.GetNodesOnline())
		e.NodesEnforcing = e.NodesOnline - len(e.Pending)
	}
	return e
}

// done says whether every online active node enforces the revision waited for
// (or a later one).
func (e enforcement) done() bool { return e.ServingRevision >= e.Revision && len(e.Pending) == 0 }

// summary is one line for people: "revision 7: 998/1000 online nodes enforce it
// (2 offline, skipped)", plus what the controller serves when it is older.
func (e enforcement) summary() string {
	s := fmt.Sprintf("revision %d: %d/%d online nodes enforce it", e.Revision, e.NodesEnforcing, e.NodesOnline)
	if n := len(e.Skipped); n > 0 {
		s += fmt.Sprintf(" (%d offline, skipped)", n)
	}
	if e.ServingRevision < e.Revision {
		s += fmt.Sprintf("; the controller still serves revision %d", e.ServingRevision)
	}
	return s
}

// poller polls a statusSource with an interval that doubles from min to max.
type poller struct {
	min, max time.Duration
}

// waitEnforced polls src until every online active node enforces revision rev
// (done), calling progress after each successful poll. It returns the last
// assessment and nil when done; when ctx ends first, that assessment (zero if no
// poll succeeded) and an error wrapping ctx's error and, if the last poll
// failed, why. A poll that fails because the controller is unreachable or busy
// is retried; any other failure ends the wait with the connect error.
func (p poller) waitEnforced(ctx context.Context, rev uint64, src statusSource, progress func(enforcement)) (enforcement, error) {
	interval := p.min
	var last enforcement
	var lastErr error
	for {
		st, err := src(ctx)
		switch {
		case err == nil:
			last, lastErr = assessEnforcement(rev, st), nil
			progress(last)
			if last.done() {
				return last, nil
			}
		case ctx.Err() != nil:
		case retryable(err):
			lastErr = err
		default:
			return last, err
		}
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			if lastErr != nil {
				return last, fmt.Errorf("%w (%w)", ctx.Err(), &lastPollError{lastErr})
			}
			return last, ctx.Err()
		case <-t.C:
		}
		interval = min(2*interval, p.max)
	}
}

// lastPollError is why the last poll of a wait that timed out failed.
type lastPollError struct{ err error }

func (e *lastPollError) Error() string { return "the last status call failed: " + e.err.Error() }
func (e *lastPollError) Unwrap() error { return e.err }

// retryable says whether a failed Status call is worth repeating while waiting.
func retryable(err error) bool {
	switch connect.CodeOf(err) {
	case connect.CodeUnavailable, connect.CodeResourceExhausted, connect.CodeDeadlineExceeded:
		return true
	}
	return false
}

// progressView shows waitEnforced's progress: on a terminal one line redrawn in
// place (a bar, the summary, the time waited), cut to the terminal's width so
// that it never wraps; elsewhere (a pipe, a log file) the summary on a line of
// its own each time it changes. A bar of our own rather than a progress-bar
// library: the figure is not monotonic (nodes come online, go offline, or get a
// newer netmap while the wait runs, so both the count and the total move), which
// the libraries' byte-transfer model (a growing count, finished once full) does
// not fit.
type progressView struct {
	w     io.Writer
	tty   bool
	width func() int // terminal columns; only with tty
	start time.Time
	now   func() time.Time

	last string // the last summary written
	drew bool   // a line is drawn and not ended (tty)
}

// newProgressView writes to w, drawing in place when w is a terminal.
func newProgressView(w io.Writer) *progressView {
	v := &progressView{w: w, now: time.Now}
	v.start = v.now()
	if isTerminal(w) {
		f := w.(*os.File)
		v.tty = true
		v.width = func() int {
			if cols, _, err := term.GetSize(int(f.Fd())); err == nil && cols > 0 {
				return cols
			}
			return 80
		}
	}
	return v
}

// progressBarWidth is the number of cells of the bar between its brackets.
const progressBarWidth = 24

// update shows e.
func (v *progressView) update(e enforcement) {
	s := e.summary()
	if !v.tty {
		if s != v.last {
			fmt.Fprintf(v.w, "waiting: %s\n", s)
		}
		v.last = s
		return
	}
	v.last = s
	filled := progressBarWidth
	if e.NodesOnline > 0 {
		filled = progressBarWidth * e.NodesEnforcing / e.NodesOnline
	}
	line := fmt.Sprintf("[%s%s] %s, %s", strings.Repeat("#", filled), strings.Repeat(".", progressBarWidth-filled), s,
		v.now().Sub(v.start).Round(100*time.Millisecond))
	if cols := v.width(); len(line) >= cols {
		line = line[:max(0, cols-1)] // the summary is ASCII
	}
	fmt.Fprintf(v.w, "\r\x1b[K%s", line)
	v.drew = true
}

// finish ends a line drawn in place, so that what follows starts on a new line.
func (v *progressView) finish() {
	if v.drew {
		fmt.Fprintln(v.w)
		v.drew = false
	}
}

// waitJSON is what --wait adds to the output of apply and rollback.
type waitJSON struct {
	enforcement
	// Enforced says whether every online active node enforced the revision
	// before the timeout.
	Enforced      bool    `json:"enforced"`
	WaitedSeconds float64 `json:"waited_seconds"`
	// StatusError says why the last status call failed when the wait timed out
	// after it (the nodes are then as the call before it saw them).
	StatusError string `json:"status_error,omitempty"`
	// Interrupted says the wait ended on Ctrl-C (SIGINT) before the timeout.
	Interrupted bool `json:"interrupted,omitempty"`
}

// waitFlags are --wait and --timeout of a command that stores a revision.
type waitFlags struct {
	wait    bool
	timeout time.Duration
}

func addWaitFlags(cmd *cobra.Command) *waitFlags {
	f := &waitFlags{}
	cmd.Flags().BoolVar(&f.wait, "wait", false, "after storing, wait until every online node enforces the revision (offline nodes are skipped); exit 3 if some do not within --timeout")
	cmd.Flags().DurationVar(&f.timeout, "timeout", defaultWaitTimeout, "how long --wait waits")
	return f
}

// check refuses --timeout without --wait and a timeout that is not positive.
func (f *waitFlags) check(cmd *cobra.Command) error {
	if cmd.Flags().Changed("timeout") && !f.wait {
		return &exitError{code: 2, msg: "segmesh: --timeout only applies with --wait"}
	}
	if f.timeout <= 0 {
		return &exitError{code: 2, msg: fmt.Sprintf("segmesh: --timeout %v: want a positive duration such as 2m", f.timeout)}
	}
	return nil
}

// waitForRevision waits up to timeout until every online active node enforces
// rev, showing progress on progressOut. It returns what it saw; an error only when
// the controller refused the status call or was never reached (a timeout is
// waitJSON.Enforced false, with a nil error).
func waitForRevision(g *globalFlags, rev uint64, timeout time.Duration, progressOut io.Writer) (*waitJSON, error) {
	src, err := controllerStatus(g)
	if err != nil {
		return nil, err
	}
	// Ctrl-C ends the wait, not the command: it still says what is pending.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	return pollForRevision(ctx, src, poller{min: minPollInterval, max: maxPollInterval}, rev, timeout, newProgressView(progressOut))
}

// pollForRevision is waitForRevision with its source, poll intervals and view.
// The wait ends early, as if timed out, when parent is cancelled (interrupted).
func pollForRevision(parent context.Context, src statusSource, p poller, rev uint64, timeout time.Duration, view *progressView) (*waitJSON, error) {
	ctx, cancel := context.WithTimeout(parent, timeout)
	defer cancel()
	start := time.Now()
	e, err := p.waitEnforced(ctx, rev, src, view.update)
	view.finish()
	waited := time.Since(start)
	interrupted := errors.Is(err, context.Canceled) && parent.Err() != nil
	switch {
	case err == nil:
	case (errors.Is(err, context.DeadlineExceeded) || interrupted) && e.Revision != 0:
	case interrupted:
		return nil, &exitError{code: exitNotEnforced, msg: fmt.Sprintf("segmesh: revision %d is stored; the wait was interrupted before status answered", rev)}
	default:
		what := fmt.Sprintf("revision %d is stored; waiting until nodes enforce it: reading status", rev)
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: %s: no answer within %v: %v", what, timeout, err)}
		}
		return nil, callError(what, err)
	}
	w := &waitJSON{enforcement: e, Enforced: err == nil, WaitedSeconds: waited.Seconds(), Interrupted: interrupted}
	var lastErr *lastPollError
	if errors.As(err, &lastErr) {
		w.StatusError = lastErr.err.Error()
	}
	return w, nil
}

// writeTable prints the outcome for people: the summary, then the nodes that do
// not enforce the revision, pending ones first.
func (w *waitJSON) writeTable(out io.Writer) error {
	waited := (time.Duration(w.WaitedSeconds * float64(time.Second))).Round(100 * time.Millisecond)
	if w.Enforced {
		fmt.Fprintf(out, "%s (after %v)\n", w.summary(), waited)
	} else {
		how := ""
		if w.Interrupted {
			how = " (interrupted)"
		}
		fmt.Fprintf(out, "NOT ENFORCED after %v%s: %s\n", waited, how, w.summary())
	}
	if w.StatusError != "" {
		fmt.Fprintf(out, "the last status call failed (nodes as the call before saw them): %s\n", w.StatusError)
	}
	if w.PolicyError != "" {
		fmt.Fprintf(out, "policy error:\n  %s\n", strings.ReplaceAll(w.PolicyError, "\n", "\n  "))
	}
	if len(w.Pending)+len(w.Skipped) == 0 {
		return nil
	}
	rows := make([][]string, 0, len(w.Pending)+len(w.Skipped))
	add := func(nodes []waitNodeJSON, wait string) {
		for _, n := range nodes {
			rows = append(rows, []string{n.Name, wait, fmt.Sprint(n.DesiredRevision), fmt.Sprint(n.AppliedRevision),
				n.DesiredHash[:min(len(n.DesiredHash), shortHashLen)], n.AppliedHash[:min(len(n.AppliedHash), shortHashLen)], n.LastSeen, n.Error})
		}
	}
	add(w.Pending, "pending")
	add(w.Skipped, "skipped (offline)")
	return writeTable(out, []string{"NODE", "WAIT", "DESIRED", "APPLIED", "DESIRED_HASH", "APPLIED_HASH", "LAST_SEEN", "ERROR"}, rows)
}

// notEnforcedError is the exit of a --wait that timed out.
func (w *waitJSON) notEnforcedError(timeout time.Duration) error {
	msg := fmt.Sprintf("segmesh: revision %d is stored, but %d of %d online nodes did not report enforcing it within %v; they are listed above (see also `segmesh status`)",
		w.Revision, len(w.Pending), w.NodesOnline, timeout)
	switch {
	case w.Interrupted:
		msg = fmt.Sprintf("segmesh: revision %d is stored; the wait was interrupted with %d of %d online nodes not enforcing it (listed above)",
			w.Revision, len(w.Pending), w.NodesOnline)
	case w.ServingRevision < w.Revision:
		msg = fmt.Sprintf("segmesh: revision %d is stored, but the controller still serves revision %d after %v (policy error above; see `segmesh status`)",
			w.Revision, w.ServingRevision, timeout)
	}
	return &exitError{code: exitNotEnforced, msg: msg}
}
