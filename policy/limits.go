package policy

import (
	"bytes"
	"regexp"
)

// Limits on the input Parse and ParseInventory accept, checked before the YAML
// parser sees the file: its memory use grows steeply with nesting.
const (
	// MaxFileSize is the largest policy or inventory file accepted, in bytes.
	MaxFileSize = 4 << 20
	// MaxNesting is the deepest nesting accepted: of flow collections ([ and {),
	// and separately of block collections (by indentation and "- " entries).
	MaxNesting = 64
)

// blockScalarRE matches the end of a line that starts a block scalar (| or >
// with optional indentation and chomping indicators), comment removed.
var blockScalarRE = regexp.MustCompile(`(^|[ \t])[|>][0-9+-]*[ \t]*$`)

// prepare checks the size and nesting limits of a file and returns its bytes
// without a UTF-8 byte order mark and with CRLF line ends turned into LF, so
// that positions count lines as editors do. On a violated limit it records a positioned error and returns false.
func (p *fileParser) prepare(data []byte) ([]byte, bool) {
	if len(data) > MaxFileSize {
		p.errorf(Pos{File: p.file, Line: 1, Col: 1}, "file is %d bytes; policy and inventory files are limited to %d bytes (%d MiB)", len(data), MaxFileSize, MaxFileSize>>20)
		return nil, false
	}
	data = bytes.TrimPrefix(data, []byte("\uFEFF")) // a UTF-8 byte order mark
	data = bytes.ReplaceAll(data, []byte("\r\n"), []byte("\n"))
	if line, col, kind, deep := tooDeep(data); deep {
		p.errorf(Pos{File: p.file, Line: line, Col: col}, "%s nested deeper than %d levels; policy and inventory files need far fewer", kind, MaxNesting)
		return nil, false
	}
	return data, true
}

// tooDeep scans YAML text for nesting beyond MaxNesting without parsing it: flow
// collections ([ and { outside quoted scalars, comments and block scalars), and
// block collections (a stack of indentation columns, each "- " entry opening a
// level). It over-approximates only for brackets inside plain scalars. It returns
// the 1-based line and byte column of the first opening past the limit and which
// kind it is.
func tooDeep(data []byte) (line, col int, kind string, deep bool) {
	var (
		flow            int
		inSingle        bool
		inDouble        bool
		block           []int      // indentation columns of the open block collections
		scalarIndent          = -1 // indentation of the line that opened a block scalar, -1 outside one
		prevSignificant byte  = '\n'
	)
	for n, ln := range bytes.Split(data, []byte("\n")) {
		line = n + 1
		indent := 0
		for indent < len(ln) && ln[indent] == ' ' {
			indent++
		}
		blank := indent == len(ln)
		if scalarIndent >= 0 {
			if blank || indent > scalarIndent {
				continue
			}
			scalarIndent = -1
		}
		if flow == 0 && !inSingle && !inDouble && !blank && ln[indent] != '#' {
			cols := []int{indent}
			for i := indent; i+1 < len(ln) && (ln[i] == '-' || ln[i] == '?') && (ln[i+1] == ' ' || ln[i+1] == '\t'); {
				i += 2
				for i < len(ln) && ln[i] == ' ' {
					i++
				}
				cols = append(cols, i)
			}
			for len(block) > 0 && block[len(block)-1] >= indent {
				block = block[:len(block)-1]
			}
			block = append(block, cols...)
			if len(block) > MaxNesting {
				return line, cols[len(cols)-1] + 1, "block collections", true
			}
		}
		comment := len(ln)
		for i := 0; i < len(ln); i++ {
			c := ln[i]
			switch {
			case inDouble:
				if c == '\\' {
					i++
				} else if c == '"' {
					inDouble = false
				}
			case inSingle:
				if c == '\'' {
					if i+1 < len(ln) && ln[i+1] == '\'' {
						i++
					} else {
						inSingle = false
					}
				}
			case c == '#' && (i == 0 || ln[i-1] == ' ' || ln[i-1] == '\t'):
				comment = i
				i = len(ln)
			case (c == '"' || c == '\'') && bytes.IndexByte([]byte(" \t\n-[{,:?"), prevSignificant) >= 0:
				inDouble, inSingle = c == '"', c == '\''
			case c == '[' || c == '{':
				flow++
				if flow > MaxNesting {
					return line, i + 1, "flow collections ([ and {)", true
				}
			case (c == ']' || c == '}') && flow > 0:
				flow--
			}
			prevSignificant = c
		}
		prevSignificant = '\n'
		if flow == 0 && !inSingle && !inDouble && blockScalarRE.Match(ln[:comment]) {
			scalarIndent = indent
		}
	}
	return 0, 0, "", false
}
