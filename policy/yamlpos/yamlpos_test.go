package yamlpos

import (
	"testing"

	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
)

func TestOf(t *testing.T) {
	f, err := parser.ParseBytes([]byte("a: 1\nb:\n  c: [x, y]\n"), 0)
	if err != nil {
		t.Fatal(err)
	}
	m := f.Docs[0].Body.(*ast.MappingNode)
	for _, tt := range []struct {
		n         ast.Node
		line, col int
	}{
		{m, 1, 1},                 // a mapping: its first key
		{m.Values[1], 2, 1},       // a key/value pair: its key
		{m.Values[1].Value, 3, 3}, // the nested mapping
		{m.Values[0].Value, 1, 4}, // a scalar
	} {
		if line, col, ok := Of(tt.n); !ok || line != tt.line || col != tt.col {
			t.Errorf("Of(%v) = %d:%d %v, want %d:%d", tt.n, line, col, ok, tt.line, tt.col)
		}
	}
	if _, _, ok := Of(nil); ok {
		t.Error("Of(nil) has a position")
	}
}
