package policy

import (
	"cmp"
	"slices"
	"strings"
)

// Error is one problem found in a policy file, at the position of the offending
// key or value.
type Error struct {
	Pos Pos
	Msg string
}

// Error formats the problem as "file:line:col: message".
func (e *Error) Error() string { return e.Pos.String() + ": " + e.Msg }

// ErrorList is every problem of one file, sorted by position. Parse returns a
// non-empty ErrorList as its error.
type ErrorList []*Error

// Error formats the list one problem per line, without a trailing newline.
func (l ErrorList) Error() string {
	lines := make([]string, len(l))
	for i, e := range l {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// sort orders the list by file, line, column and message and drops exact duplicates.
func (l ErrorList) sort() ErrorList {
	slices.SortStableFunc(l, func(a, b *Error) int {
		return cmp.Or(
			cmp.Compare(a.Pos.File, b.Pos.File),
			cmp.Compare(a.Pos.Line, b.Pos.Line),
			cmp.Compare(a.Pos.Col, b.Pos.Col),
			cmp.Compare(a.Msg, b.Msg),
		)
	})
	return slices.CompactFunc(l, func(a, b *Error) bool { return *a == *b })
}
