package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// Check is one kind of probe: a protocol ("tcp", "udp" or "icmp") and, for tcp
// and udp, a destination port.
type Check struct {
	Proto string
	Port  int
}

// String formats the check as "tcp/22" or "icmp".
func (c Check) String() string {
	if c.Proto == "icmp" {
		return "icmp"
	}
	return c.Proto + "/" + strconv.Itoa(c.Port)
}

// The checks of the example policy's matrix.
var (
	TCP22   = Check{"tcp", 22}
	TCP5432 = Check{"tcp", 5432}
	TCP8080 = Check{"tcp", 8080}
	UDP514  = Check{"udp", 514}
	ICMP    = Check{Proto: "icmp"}
)

// DefaultChecks4 are probed over IPv4 overlay addresses, DefaultChecks6 over IPv6:
// the same checks, since a node-to-node rule covers both families.
var (
	DefaultChecks4 = []Check{TCP22, TCP5432, TCP8080, UDP514, ICMP}
	DefaultChecks6 = DefaultChecks4
)

// MatrixOptions tune Matrix; the zero value probes every ordered pair of distinct
// started nodes with the default checks.
type MatrixOptions struct {
	// Checks4 and Checks6 default (when nil) to DefaultChecks4 and DefaultChecks6;
	// an empty non-nil slice probes nothing over that family.
	Checks4, Checks6 []Check
	// Timeout is how long one probe waits for its flow; default 1 s.
	Timeout time.Duration
	// Parallel bounds concurrent probes; default 12.
	Parallel int
	// Involving, when not empty, keeps only pairs with at least one of these nodes.
	Involving []string
}

// Cell is one probe of the connectivity matrix.
type Cell struct {
	Src, Dst string
	Family   int // 4 or 6
	Check    Check
	Addr     netip.Addr // destination overlay address
	// Want is the policy's verdict (true: allowed); Got what the probe observed.
	Want, Got bool
	// Err is set when the probe could not run (its verdict is then unknown).
	Err error
	// Output is the probe's output, for diagnosis.
	Output string
}

// OK reports whether the probe ran and observed what the policy says.
func (c Cell) OK() bool { return c.Err == nil && c.Want == c.Got }

// Key identifies the cell within a matrix.
func (c Cell) Key() string {
	return fmt.Sprintf("%s>%s/v%d/%s", c.Src, c.Dst, c.Family, c.Check)
}

// Cells lists the matrix for pol over the given status (overlay addresses come
// from status, labels from the lab's node specs): every ordered pair of distinct
// nodes with a started agent, every check, with the expected verdict filled in.
func (m *Mesh) Cells(pol *Policy, st *Status, opts MatrixOptions) ([]Cell, error) {
	checks4, checks6 := opts.Checks4, opts.Checks6
	if checks4 == nil {
		checks4 = DefaultChecks4
	}
	if checks6 == nil {
		checks6 = DefaultChecks6
	}
	var nodes []*Node
	for _, n := range m.nodes {
		if n.Agent != nil && !n.Revoked {
			nodes = append(nodes, n)
		}
	}
	involved := func(name string) bool {
		for _, x := range opts.Involving {
			if x == name {
				return true
			}
		}
		return len(opts.Involving) == 0
	}
	var cells []Cell
	for _, src := range nodes {
		for _, dst := range nodes {
			if src == dst || !involved(src.Name) && !involved(dst.Name) {
				continue
			}
			ds := st.Node(dst.Name)
			if ds == nil {
				return nil, fmt.Errorf("node %s is not in status", dst.Name)
			}
			for _, fam := range []struct {
				family int
				checks []Check
			}{{4, checks4}, {6, checks6}} {
				if len(fam.checks) == 0 {
					continue
				}
				addr, ok := ds.Addr(fam.family)
				if !ok {
					return nil, fmt.Errorf("node %s has no IPv%d overlay address in status (%v)", dst.Name, fam.family, ds.Addresses)
				}
				for _, c := range fam.checks {
					cells = append(cells, Cell{
						Src: src.Name, Dst: dst.Name, Family: fam.family, Check: c, Addr: addr,
						Want: pol.Allows(src.Info(), dst.Info(), c),
					})
				}
			}
		}
	}
	return cells, nil
}

// Probe runs the cells' probes (bounded parallelism) from each cell's source
// namespace and fills in Got, Err and Output. It returns ctx's error if ctx ended.
func (m *Mesh) Probe(ctx context.Context, cells []Cell, opts MatrixOptions) error {
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = time.Second
	}
	parallel := opts.Parallel
	if parallel <= 0 {
		parallel = 12
	}
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i := range cells {
		wg.Add(1)
		go func(c *Cell) {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				c.Err = ctx.Err()
				return
			}
			defer func() { <-sem }()
			c.Got, c.Output, c.Err = m.probe(ctx, c, timeout)
		}(&cells[i])
	}
	wg.Wait()
	return ctx.Err()
}

// probe runs one cell's probe; reached reports whether the flow got through.
func (m *Mesh) probe(ctx context.Context, c *Cell, timeout time.Duration) (reached bool, output string, err error) {
	src := m.Node(c.Src)
	if src == nil {
		return false, "", fmt.Errorf("no node %s", c.Src)
	}
	// The probe's own timeout bounds it; the context only guards against a hang.
	ctx, cancel := context.WithTimeout(ctx, timeout+10*time.Second)
	defer cancel()
	var args []string
	blockedCodes := []int{1}
	switch c.Check.Proto {
	case "tcp", "udp":
		addr := netip.AddrPortFrom(c.Addr, uint16(c.Check.Port)).String()
		args = []string{m.Bin(ProbeBin), c.Check.Proto, addr, "--timeout", timeout.String()}
	case "icmp":
		secs := strconv.Itoa(max(1, int((timeout+time.Second-1)/time.Second)))
		args = []string{"ping", "-c", "1", "-W", secs, "-n", "-q", c.Addr.String()}
		if c.Family == 6 {
			args = []string{"ping", "-6", "-c", "1", "-W", secs, "-n", "-q", c.Addr.String()}
		}
		// ping exits 2 for local send errors such as EPERM from the firewall.
		blockedCodes = []int{1, 2}
	default:
		return false, "", fmt.Errorf("unknown protocol %q", c.Check.Proto)
	}
	out, err := src.Host.Exec(ctx, args...)
	if err == nil {
		return true, strings.TrimSpace(out), nil
	}
	var xe *ExecError
	if errors.As(err, &xe) {
		output = strings.TrimSpace(xe.Stdout + " " + xe.Stderr)
		for _, code := range blockedCodes {
			if xe.ExitCode == code {
				return false, output, nil
			}
		}
	}
	return false, output, err
}

// WaitMatrix probes the whole matrix, then re-probes the cells whose allowed flow
// did not get through (or whose probe failed to run) until every cell matches or
// timeout passes: the first packets of a flow may wait for a WireGuard handshake
// or an endpoint update. A flow the policy denies that gets through is never
// re-probed: it ends the wait at once with an error. It returns the cells (each
// with its latest observation) and the number of probing rounds; the error is set
// on a leak, on timeout with cells still mismatching, or if ctx ended.
func (m *Mesh) WaitMatrix(ctx context.Context, pol *Policy, st *Status, timeout time.Duration, opts MatrixOptions) (cells []Cell, rounds int, err error) {
	cells, err = m.Cells(pol, st, opts)
	if err != nil {
		return nil, 0, err
	}
	deadline := time.Now().Add(timeout)
	pending := make([]int, len(cells))
	for i := range cells {
		pending[i] = i
	}
	for {
		rounds++
		batch := make([]Cell, len(pending))
		for j, i := range pending {
			batch[j] = cells[i]
		}
		if err := m.Probe(ctx, batch, opts); err != nil {
			return cells, rounds, err
		}
		var next []int
		var leaks []string
		for j, i := range pending {
			cells[i] = batch[j]
			c := batch[j]
			switch {
			case c.OK():
			case c.Err == nil && c.Got && !c.Want:
				leaks = append(leaks, fmt.Sprintf("%s -> %s %s (%s)", c.Src, c.Dst, c.Check, c.Addr))
			default:
				next = append(next, i)
			}
		}
		if len(leaks) > 0 {
			return cells, rounds, fmt.Errorf("%d flow(s) the policy denies got through: %s", len(leaks), strings.Join(leaks, ", "))
		}
		pending = next
		if len(pending) == 0 {
			return cells, rounds, nil
		}
		if time.Now().After(deadline) {
			return cells, rounds, fmt.Errorf("%d of %d matrix cells still mismatch after %s (%d rounds)", len(pending), len(cells), timeout, rounds)
		}
		select {
		case <-ctx.Done():
			return cells, rounds, ctx.Err()
		case <-time.After(PollInterval):
		}
	}
}

// Mismatches returns the cells that are not OK.
func Mismatches(cells []Cell) []Cell {
	var out []Cell
	for _, c := range cells {
		if !c.OK() {
			out = append(out, c)
		}
	}
	return out
}

func verdict(allowed bool) string {
	if allowed {
		return "allow"
	}
	return "deny"
}

// WriteMatrix prints the cells as a table
// "SRC  DST  ADDRESS  PROTO/PORT  POLICY  OBSERVED  OK" and a summary line.
func WriteMatrix(w io.Writer, cells []Cell) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SRC\tDST\tADDRESS\tPROTO/PORT\tPOLICY\tOBSERVED\tOK")
	bad := 0
	for _, c := range cells {
		observed := "blocked"
		if c.Got {
			observed = "reached"
		}
		if c.Err != nil {
			observed = "error: " + c.Err.Error()
		}
		ok := "ok"
		if !c.OK() {
			ok = "MISMATCH"
			bad++
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", c.Src, c.Dst, c.Addr, c.Check, verdict(c.Want), observed, ok)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	allowed := 0
	for _, c := range cells {
		if c.Want {
			allowed++
		}
	}
	_, err := fmt.Fprintf(w, "%d cells (%d allowed, %d denied by policy): %d match, %d mismatch\n",
		len(cells), allowed, len(cells)-allowed, len(cells)-bad, bad)
	return err
}
