package lab

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
)

// Packages are the main packages Build compiles, relative to the module root:
// the segmesh binaries, the probe and the real etcd server (hack/etcd, binary
// EtcdBin) for MeshOptions.HA.
var Packages = []string{"./cmd/segmesh-controller", "./cmd/segmesh-agent", "./cmd/segmesh", "./hack/probe", "./hack/etcd"}

// Build compiles Packages into binDir with `go build -o binDir`, running in the
// module at moduleDir.
func Build(ctx context.Context, moduleDir, binDir string) error {
	return buildPackages(ctx, moduleDir, binDir, Packages...)
}

func buildPackages(ctx context.Context, moduleDir, binDir string, pkgs ...string) error {
	args := append([]string{"build", "-o", binDir + string(filepath.Separator)}, pkgs...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = moduleDir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// ModuleRoot returns the directory of the main module's go.mod as seen from the
// current directory.
func ModuleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("finding the module root: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == "/dev/null" {
		return "", fmt.Errorf("finding the module root: not inside a Go module")
	}
	return filepath.Dir(gomod), nil
}
