package policy

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// FuzzParse checks that Parse never panics, that it returns either a policy or a
// sorted, positioned ErrorList, and that every policy it accepts compiles.
func FuzzParse(f *testing.F) {
	seeds := []string{"", "version: 1\n", "version: 1\nsegments: [{name: a, nodes: [x]}]\nrules: [{name: r, from: [a], to: [all], ports: [tcp/1-2, icmp]}]\n"}
	files, _ := filepath.Glob("testdata/policies/*.yaml")
	files = append(files, "../examples/policy.yaml")
	for _, p := range files {
		data, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		seeds = append(seeds, string(data))
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	inv := loadInventory(f, "testdata/inventory.json")
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse("f.yaml", data)
		if err != nil {
			if p != nil {
				t.Fatalf("Parse returned a policy and an error")
			}
			var list ErrorList
			if !errors.As(err, &list) || len(list) == 0 {
				t.Fatalf("Parse error %T %v is not a non-empty ErrorList", err, err)
			}
			// YAML breaks lines at CR LF, CR and LF.
			lines := strings.Count(strings.ReplaceAll(strings.ReplaceAll(string(data), "\r\n", "\n"), "\r", "\n"), "\n") + 1
			for _, e := range list {
				if e.Pos.File != "f.yaml" || e.Pos.Line < 1 || e.Pos.Col < 1 || e.Pos.Line > lines+1 || e.Msg == "" {
					t.Fatalf("bad error %q (%+v) for a %d-line input", e.Error(), e.Pos, lines)
				}
			}
			if !slices.IsSortedFunc(list, func(a, b *Error) int {
				if a.Pos.Line != b.Pos.Line {
					return a.Pos.Line - b.Pos.Line
				}
				return a.Pos.Col - b.Pos.Col
			}) {
				t.Fatalf("errors not sorted:\n%v", err)
			}
			return
		}
		if p.Version != 1 {
			t.Fatalf("accepted version %d", p.Version)
		}
		c, err := Compile(p, inv)
		if err != nil {
			t.Fatalf("Compile of an accepted policy: %v", err)
		}
		for _, n := range c.Nodes() {
			v, _ := c.Node(n)
			for _, rules := range [][]FilterRule{v.Filter.Ingress, v.Filter.Egress} {
				for _, fr := range rules {
					if !slices.ContainsFunc(v.Filter.Sets, func(s AddressSet) bool { return s.Name == fr.Set }) {
						t.Fatalf("%s: rule references missing set %q", n, fr.Set)
					}
					if len(fr.Matches) == 0 || !reflect.DeepEqual(fr.Matches, mergeMatches(fr.Matches)) {
						t.Fatalf("%s: matches not canonical: %+v", n, fr.Matches)
					}
				}
			}
		}
	})
}
