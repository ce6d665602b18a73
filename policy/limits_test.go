package policy

import (
	"strings"
	"testing"
)

// TestInputLimits checks the checks made before YAML parsing: CRLF line ends
// keep positions right, and oversized or too deeply nested files are refused
// with a positioned error, while brackets in quoted scalars, comments and block
// scalars do not count as nesting.
func TestInputLimits(t *testing.T) {
	deepFlow := func(n int) string {
		return "version: 1\nsegments: " + strings.Repeat("[", n) + strings.Repeat("]", n) + "\n"
	}
	deepBlock := func(n int) string {
		var b strings.Builder
		b.WriteString("version: 1\n")
		for i := range n {
			b.WriteString(strings.Repeat(" ", i) + "k:\n")
		}
		return b.String()
	}
	const notFlow = "version: 1\nsegments:\n  - name: web # [[[[ {{{{\n    selectors: [{role: \"[[[[\"}, {role: '{{{{'}]\n  - name: db\n    selectors:\n      - role: |-\n          [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n"
	tests := []struct {
		name string
		src  string
		want string // the first error; "" for a valid file
	}{
		{"crlf comments", "# c\r\n# c\r\nversion: 1\r\nsegments:\r\n  - name: web\r\n    selectors: [{role: web}]\r\nrules:\r\n  - name: r\r\n    from: [wbe]\r\n    to: [web]\r\n    ports: [tcp/80]\r\n",
			`p.yaml:9:12: undefined segment "wbe" (did you mean "web"?)`},
		{"byte order mark", "\uFEFF# c\nversion: 1\nsegments:\n  - {name: web, nodes: [Web]}\n", `p.yaml:4:25: invalid node name "Web"`},
		{"flow at the limit", deepFlow(MaxNesting), `p.yaml:2:12: segment must be a mapping, got a list`},
		{"flow past the limit", deepFlow(MaxNesting + 1), `p.yaml:2:75: flow collections ([ and {) nested deeper than 64 levels; policy and inventory files need far fewer`},
		{"flow very deep", deepFlow(50000), `p.yaml:2:75: flow collections ([ and {) nested deeper than 64 levels; policy and inventory files need far fewer`},
		{"flow past the limit across lines", "version: 1\nsegments:\n" + strings.Repeat("  [\n", MaxNesting+1), `p.yaml:67:3: flow collections ([ and {) nested deeper than 64 levels; policy and inventory files need far fewer`},
		{"block past the limit", deepBlock(MaxNesting + 1), `p.yaml:66:65: block collections nested deeper than 64 levels; policy and inventory files need far fewer`},
		{"block sequences past the limit", "version: 1\nsegments:\n  " + strings.Repeat("- ", MaxNesting) + "x\n", `p.yaml:3:131: block collections nested deeper than 64 levels`},
		// Not refused for nesting: the first error is the label syntax's.
		{"brackets in quotes, comments and block scalars", notFlow, `p.yaml:4:24: value "[[[[" of label "role" is not valid: it holds '['`},
		{"too large", "version: 1\n" + strings.Repeat("#\n", MaxFileSize/2), `p.yaml:1:1: file is 4194315 bytes; policy and inventory files are limited to 4194304 bytes (4 MiB)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("p.yaml", []byte(tt.src))
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Parse succeeded, want %s", tt.want)
			}
			if first := strings.Split(err.Error(), "\n")[0]; !strings.HasPrefix(first, tt.want) {
				t.Errorf("first error %s\nwant %s", first, tt.want)
			}
		})
	}
}

// TestInventoryCRLF checks inventory positions in a file with CRLF line ends.
func TestInventoryCRLF(t *testing.T) {
	src := "# inventory\r\n# second comment\r\nnodes:\r\n  - name: a\r\n    addresses: [100.64.0.1]\r\n  - name: b\r\n    addresses: [100.64.0.1]\r\n"
	_, err := ParseInventory("n.yaml", []byte(src))
	want := `n.yaml:7:17: nodes "a" and "b" both hold overlay address 100.64.0.1`
	if err == nil || err.Error() != want {
		t.Errorf("ParseInventory error = %v, want %s", err, want)
	}
}
