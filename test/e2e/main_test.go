// Package e2e holds segmesh's end-to-end tests: real segmesh binaries in network
// namespaces (package segmesh/test/lab), real wireguard-go, real nftables and real
// packets. They need root; run them with `sudo go test ./test/e2e/`.
//
// Environment: SEGMESH_E2E_KEEP=1 keeps every lab directory (logs, state) and
// prints its path; SEGMESH_E2E_LOG_LEVEL sets the agents' --log-level.
package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"segmesh/test/lab"
)

// Timeouts of the end-to-end tests.
const (
	convergeTimeout = 60 * time.Second
	matrixTimeout   = 30 * time.Second
)

var (
	binDir     string // segmesh binaries built by TestMain
	moduleRoot string
	setupErr   error // why TestMain could not prepare; every test reports it
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if os.Geteuid() != 0 {
		setupErr = fmt.Errorf("the segmesh end-to-end tests need root (network namespaces, TUN, nftables): run `sudo go test ./test/e2e/` (as uid %d now)", os.Geteuid())
		return m.Run()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	root, err := lab.ModuleRoot(ctx)
	if err != nil {
		setupErr = err
		return m.Run()
	}
	moduleRoot = root
	dir, err := os.MkdirTemp("", "segmesh-e2e-bin-")
	if err != nil {
		setupErr = err
		return m.Run()
	}
	defer os.RemoveAll(dir)
	if err := lab.Build(ctx, root, dir); err != nil {
		setupErr = fmt.Errorf("building the segmesh binaries: %w", err)
		return m.Run()
	}
	binDir = dir
	return m.Run()
}

// examplePolicy is the path of examples/policy.yaml.
func examplePolicy() string { return filepath.Join(moduleRoot, "examples", "policy.yaml") }

// newMesh creates a mesh with nodes; at cleanup it logs the tail of every process
// log if the test failed, then removes the lab and fails the test if that fails.
func newMesh(t *testing.T, nodes []lab.NodeSpec) *lab.Mesh {
	t.Helper()
	return newMeshWith(t, nodes, nil)
}

// newMeshWith is newMesh with extra controller arguments.
func newMeshWith(t *testing.T, nodes []lab.NodeSpec, controllerArgs []string) *lab.Mesh {
	t.Helper()
	return newMeshArgs(t, nodes, controllerArgs, nil)
}

// newMeshArgs is newMesh with extra controller and agent arguments.
func newMeshArgs(t *testing.T, nodes []lab.NodeSpec, controllerArgs, agentArgs []string) *lab.Mesh {
	t.Helper()
	return newMeshOpts(t, lab.MeshOptions{Nodes: nodes, ControllerArgs: controllerArgs, AgentArgs: agentArgs})
}

// newMeshOpts is newMesh with opts (Dir and BinDir are set here).
func newMeshOpts(t *testing.T, opts lab.MeshOptions) *lab.Mesh {
	t.Helper()
	if setupErr != nil {
		t.Fatal(setupErr)
	}
	dir := t.TempDir()
	if os.Getenv("SEGMESH_E2E_KEEP") != "" {
		var err error
		if dir, err = os.MkdirTemp("", "segmesh-e2e-"+strings.ReplaceAll(t.Name(), "/", "_")+"-"); err != nil {
			t.Fatal(err)
		}
		t.Logf("lab directory (kept): %s", dir)
	}
	opts.Options.Dir = dir
	opts.BinDir = binDir
	if lvl := os.Getenv("SEGMESH_E2E_LOG_LEVEL"); lvl != "" {
		opts.AgentArgs = append(opts.AgentArgs, "--log-level", lvl)
	}
	m, err := lab.NewMesh(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		namespaces := m.Lab.Namespaces()
		if err := m.Close(); err != nil {
			t.Errorf("removing the lab: %v", err)
		}
		for _, ns := range namespaces {
			if _, err := os.Stat(filepath.Join("/run/netns", ns)); err == nil {
				t.Errorf("namespace %s left behind", ns)
			}
		}
	})
	t.Cleanup(func() {
		if t.Failed() {
			var sb strings.Builder
			m.Lab.DumpLogs(&sb, 60)
			t.Logf("process logs (last 60 lines each):\n%s", sb.String())
		}
	})
	return m
}

// upExample creates the five example hosts, enrolls them, applies the example
// policy and waits until every node enforces it.
func upExample(t *testing.T) (*lab.Mesh, *lab.Status, *lab.Policy) {
	t.Helper()
	m := newMesh(t, lab.ExampleNodes())
	pol, err := lab.LoadPolicy(examplePolicy())
	if err != nil {
		t.Fatal(err)
	}
	st, err := m.Up(context.Background(), examplePolicy(), convergeTimeout)
	if err != nil {
		t.Fatal(err)
	}
	return m, st, pol
}

// requireMatrix probes the matrix (re-probing mismatches for up to matrixTimeout)
// and fails the test with the table if any cell still mismatches.
func requireMatrix(t *testing.T, m *lab.Mesh, pol *lab.Policy, st *lab.Status, opts lab.MatrixOptions) []lab.Cell {
	t.Helper()
	cells, rounds, err := m.WaitMatrix(context.Background(), pol, st, matrixTimeout, opts)
	var sb strings.Builder
	if werr := lab.WriteMatrix(&sb, cells); werr != nil {
		t.Fatal(werr)
	}
	if err != nil {
		for _, c := range lab.Mismatches(cells) {
			fmt.Fprintf(&sb, "MISMATCH %s: want allowed=%v, reached=%v, err=%v, output %q\n", c.Key(), c.Want, c.Got, c.Err, c.Output)
		}
		t.Fatalf("matrix: %v\n%s", err, sb.String())
	}
	t.Logf("matrix matched after %d probing round(s):\n%s", rounds, sb.String())
	return cells
}
