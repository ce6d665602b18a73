package policy

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImports enforces that the policy package stays pure: its build
// dependencies (transitively) are the standard library, goccy/go-yaml and
// segmesh/policy's own subpackages only.
func TestImports(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Fatal("the go tool is not in PATH; this test lists the package imports with `go list`")
	}
	out, err := exec.Command(goTool, "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var deps []string
	for _, dep := range strings.Fields(string(out)) {
		switch {
		case dep == "segmesh/policy", strings.HasPrefix(dep, "segmesh/policy/"):
		case dep == "github.com/goccy/go-yaml", strings.HasPrefix(dep, "github.com/goccy/go-yaml/"):
		default:
			t.Errorf("policy depends on %s; it may import only the standard library, github.com/goccy/go-yaml and segmesh/policy/...", dep)
		}
		deps = append(deps, dep)
	}
	if len(deps) == 0 {
		t.Fatalf("go list printed no dependencies at all; the check is not working")
	}
}
