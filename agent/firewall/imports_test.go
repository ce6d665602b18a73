package firewall

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImports enforces that the package stays pure: its only non-standard direct
// import is segmesh/policy.
func TestImports(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Fatal("the go tool is not in PATH; this test lists the package imports with `go list`")
	}
	out, err := exec.Command(goTool, "list", "-f", `{{join .Imports "\n"}}`, ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	imports := strings.Fields(string(out))
	if len(imports) == 0 {
		t.Fatal("go list printed no imports at all; the check is not working")
	}
	for _, imp := range imports {
		if imp == "segmesh/policy" {
			continue
		}
		if strings.Contains(strings.Split(imp, "/")[0], ".") || strings.HasPrefix(imp, "segmesh/") {
			t.Errorf("firewall imports %s; it may import only the standard library and segmesh/policy", imp)
		}
	}
}
