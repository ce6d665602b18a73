package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
)

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	tests := []struct {
		data string
		perm os.FileMode
	}{
		{"first", 0o600},
		{"second, replacing", 0o644},
	}
	for _, tt := range tests {
		if err := Write(path, []byte(tt.data), tt.perm); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(path)
		if err != nil || string(got) != tt.data {
			t.Fatalf("content = %q, %v; want %q", got, err, tt.data)
		}
		fi, _ := os.Stat(path)
		if fi.Mode().Perm() != tt.perm {
			t.Errorf("mode = %v, want %v", fi.Mode().Perm(), tt.perm)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want 1 (temporary files left behind?)", len(entries))
	}
	if err := Write(filepath.Join(dir, "missing", "f"), nil, 0o600); err == nil {
		t.Error("Write into a missing directory succeeded")
	}
}
