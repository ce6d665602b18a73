package benchfig

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestRecorderRoundTrip(t *testing.T) {
	dir := t.TempDir()
	r := NewRecorder("prefixes", []string{"-prefixes", "1000"}, "lab")
	if r.Command != "go run ./hack/prefixes -prefixes 1000" {
		t.Errorf("command = %q", r.Command)
	}
	if _, err := time.Parse(time.RFC3339, r.Date); err != nil {
		t.Errorf("date %q is not RFC 3339: %v", r.Date, err)
	}
	empty := filepath.Join(dir, "empty.json")
	if err := r.WriteFile(empty); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(empty); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("WriteFile with no figures created %s (err %v)", empty, err)
	}
	r.Add("grow", "kernel set changed", 1.5, "s")
	r.Add("shrink", "kernel set changed", 0.02, "s")
	path := filepath.Join(dir, "f.json")
	if err := r.WriteFile(path); err != nil {
		t.Fatal(err)
	}
	got, err := Read(path)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, r.Figures) {
		t.Errorf("Read = %+v, want %+v", got, r.Figures)
	}
	if got[1].Driver != "prefixes" || got[1].Conditions != "lab" || got[1].Command != r.Command || got[1].Date != r.Date {
		t.Errorf("figure lacks the recorder's conditions, command or date: %+v", got[1])
	}
}

func TestReadErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name, path, want string
	}{
		{"missing file", filepath.Join(dir, "none.json"), "no such file"},
		{"not JSON", write("bad.json", "figures"), "want a JSON array"},
		{"no figure name", write("noname.json", `[{"scenario":"a","value":1}]`), "entry 0 has no scenario or figure"},
	}
	for _, tt := range tests {
		_, err := Read(tt.path)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: Read error = %v, want one containing %q", tt.name, err, tt.want)
		}
	}
}
