// Package daemonconfig binds the flags of a daemon (a pflag.FlagSet) to a YAML
// configuration file and to the environment, so that every flag is also a file key
// (the same name: "state-dir: /var/lib/segmesh") and an environment variable
// (SEGMESH_STATE_DIR). Precedence, highest first: a flag given on the command line,
// the environment, the file, the flag's default.
//
// The file is one YAML mapping of flag names to values. A scalar flag takes a
// scalar ("resync: 30s", "userspace: true", "listen-port: 51820"); a list flag
// (pflag's stringArray) takes a list ("san: [ctl.example.com, 192.0.2.1]"). Unknown
// keys, values of the wrong shape or type, empty values, YAML anchors, aliases and
// tags are errors positioned "file:line:col". In the environment, a list flag is
// comma-separated; an empty variable counts as unset.
package daemonconfig

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
	"github.com/spf13/pflag"

	"segmesh/policy/yamlpos"
)

// FlagName is the name of the flag that names the configuration file. It is not
// a key of the file itself.
const FlagName = "config"

// MaxFileBytes bounds the size of a configuration file: 1 MiB, far above any
// real one.
const MaxFileBytes = 1 << 20

// Kind is where a value came from.
type Kind int

// The sources of a value, lowest precedence first.
const (
	FromDefault Kind = iota
	FromFile
	FromEnv
	FromFlag
)

// Pos is a position in a configuration file; Line and Col count from 1.
type Pos struct {
	File      string
	Line, Col int
}

// String formats the position as "file:line:col".
func (p Pos) String() string { return fmt.Sprintf("%s:%d:%d", p.File, p.Line, p.Col) }

// Source says where the value of one flag came from: Pos for FromFile, Env (the
// variable's name) for FromEnv, Flag (the flag's name) for FromFlag.
type Source struct {
	Kind Kind
	Pos  Pos
	Env  string
	Flag string
}

// String formats the source as "default", "flag --NAME", "env NAME" or
// "file FILE:LINE:COL".
func (s Source) String() string {
	switch s.Kind {
	case FromFile:
		return "file " + s.Pos.String()
	case FromEnv:
		return "env " + s.Env
	case FromFlag:
		return "flag --" + s.Flag
	}
	return "default"
}

// Error is one problem found in a configuration file, at the offending key or
// value.
type Error struct {
	Pos Pos
	Msg string
}

// Error formats the problem as "file:line:col: message".
func (e *Error) Error() string { return e.Pos.String() + ": " + e.Msg }

// ErrorList is every problem of one file (and of the environment, as *EnvError),
// sorted by position. Apply returns a non-empty ErrorList as its error.
type ErrorList []error

// Error formats the list one problem per line, without a trailing newline.
func (l ErrorList) Error() string {
	lines := make([]string, len(l))
	for i, e := range l {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// EnvError is a bad value in an environment variable.
type EnvError struct {
	Var, Value, Msg string
}

// Error formats the problem as "$VAR=\"value\": message".
func (e *EnvError) Error() string { return fmt.Sprintf("$%s=%q: %s", e.Var, e.Value, e.Msg) }

// Binder applies a configuration file and the environment to a FlagSet.
type Binder struct {
	// EnvPrefix is prepended to a flag's name in upper snake case to name its
	// environment variable: "SEGMESH_" makes --state-dir $SEGMESH_STATE_DIR.
	EnvPrefix string
	// NoEnv names flags not read from the environment (the command reads a
	// variable of that name itself, with its own rules).
	NoEnv []string
	// Secret names flags whose values Effective never prints.
	Secret []string
	// Required names flags that must get a value from some source.
	Required []string
	// LookupEnv reads the environment; nil means os.LookupEnv.
	LookupEnv func(string) (string, bool)
}

// EnvName returns the environment variable of flag name: EnvPrefix + NAME in
// upper snake case.
func (b *Binder) EnvName(name string) string {
	return b.EnvPrefix + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
}

// Effective is the configuration in force after Apply: one entry per key, sorted
// by name.
type Effective struct {
	// File is the configuration file read ("" for none).
	File    string
	Entries []Entry
}

// Entry is one key of the effective configuration.
type Entry struct {
	Name string
	// Value is the flag's value as pflag prints it ("[a,b]" for a list), or
	// "<redacted>" for a secret that is set.
	Value  string
	Source Source
}

// Source returns where the value of flag name came from.
func (e *Effective) Source(name string) Source {
	for _, en := range e.Entries {
		if en.Name == name {
			return en.Source
		}
	}
	return Source{}
}

// Errorf returns an error about the value of flag name, led by where the value
// came from: "FILE:LINE:COL: NAME: ..." (an *Error) for the file, "$VAR: ..."
// for the environment, "--NAME: ..." for a flag or the default.
func (e *Effective) Errorf(name, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	switch s := e.Source(name); s.Kind {
	case FromFile:
		return &Error{Pos: s.Pos, Msg: name + ": " + msg}
	case FromEnv:
		return fmt.Errorf("$%s: %s", s.Env, msg)
	}
	return fmt.Errorf("--%s: %s", name, msg)
}

// Write prints the effective configuration to w, one key a line:
// "NAME  VALUE  (SOURCE)", where VALUE is "" when empty and SOURCE is
// "default", "flag --NAME", "env VAR" or "file FILE:LINE:COL".
func (e *Effective) Write(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, en := range e.Entries {
		v := en.Value
		if v == "" {
			v = `""`
		}
		fmt.Fprintf(tw, "%s\t%s\t(%s)\n", en.Name, v, en.Source)
	}
	return tw.Flush()
}

// isKey reports whether flag f is a key of the file and the environment.
func isKey(f *pflag.Flag) bool {
	return f.Name != FlagName && f.Name != "help" && f.Deprecated == ""
}

// Apply reads the configuration file path (none when path is ""), then the
// environment, into the flags of fs that were not set on the command line
// (pflag's Changed), and marks the flags it sets as Changed. It returns the
// effective configuration. Errors: the file cannot be read or is larger than
// MaxFileBytes; an ErrorList of every problem in the file and the environment
// (unknown keys with a suggestion, values of the wrong shape or type, each at its
// file:line:col, bad environment values naming the variable) and of required
// flags without a value. On error the flags may hold partial values.
func (b *Binder) Apply(fs *pflag.FlagSet, path string) (*Effective, error) {
	lookup := b.LookupEnv
	if lookup == nil {
		lookup = os.LookupEnv
	}
	// Command-line values win: remember them and put them back after the file
	// and the environment, which are applied to every key so that a bad value is
	// reported even when a flag overrides it.
	type saved struct {
		str   string
		slice []string
	}
	cmdline := map[string]saved{}
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Changed && isKey(f) {
			s := saved{str: f.Value.String()}
			if sv, ok := f.Value.(pflag.SliceValue); ok {
				s.slice = slices.Clone(sv.GetSlice())
			}
			cmdline[f.Name] = s
		}
	})
	sources := map[string]Source{}
	var errs ErrorList
	if path != "" {
		data, err := readFile(path)
		if err != nil {
			return nil, err
		}
		fileErrs := applyFile(fs, path, data, sources)
		errs = append(errs, fileErrs...)
	}
	fs.VisitAll(func(f *pflag.Flag) {
		if !isKey(f) || slices.Contains(b.NoEnv, f.Name) {
			return
		}
		name := b.EnvName(f.Name)
		v, ok := lookup(name)
		if !ok || v == "" {
			return
		}
		var err error
		if sv, isSlice := f.Value.(pflag.SliceValue); isSlice {
			err = sv.Replace(strings.Split(v, ","))
		} else {
			err = f.Value.Set(v)
		}
		if err != nil {
			errs = append(errs, &EnvError{Var: name, Value: v, Msg: badValue(f, err)})
			return
		}
		sources[f.Name] = Source{Kind: FromEnv, Env: name}
	})
	for name, s := range cmdline {
		f := fs.Lookup(name)
		var err error
		if sv, ok := f.Value.(pflag.SliceValue); ok {
			err = sv.Replace(s.slice)
		} else {
			err = f.Value.Set(s.str)
		}
		if err != nil { // a value that pflag parsed once parses again; defensive
			return nil, fmt.Errorf("restoring --%s %q: %w", name, s.str, err)
		}
		sources[name] = Source{Kind: FromFlag, Flag: name}
	}
	for name := range sources {
		fs.Lookup(name).Changed = true
	}
	for _, name := range b.Required {
		if sources[name].Kind == FromDefault {
			errs = append(errs, fmt.Errorf("%s is required: give --%s, $%s or %q in the --config file", name, name, b.EnvName(name), name+":"))
		}
	}
	if len(errs) > 0 {
		return nil, errs
	}
	eff := &Effective{File: path}
	fs.VisitAll(func(f *pflag.Flag) {
		if !isKey(f) {
			return
		}
		v := f.Value.String()
		if slices.Contains(b.Secret, f.Name) && v != "" {
			v = "<redacted>"
		}
		eff.Entries = append(eff.Entries, Entry{Name: f.Name, Value: v, Source: sources[f.Name]})
	})
	return eff, nil
}

// readFile reads a configuration file of at most MaxFileBytes.
func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading the --config file: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("reading the --config file %s: %w", path, err)
	}
	if len(data) > MaxFileBytes {
		return nil, fmt.Errorf("the --config file %s is larger than %d bytes; a configuration file is a few dozen lines", path, MaxFileBytes)
	}
	return data, nil
}

// applyFile sets the flags of fs from the YAML data of file, recording each
// value's position in sources, and returns every problem, sorted by position.
func applyFile(fs *pflag.FlagSet, file string, data []byte, sources map[string]Source) ErrorList {
	p := &fileParser{file: file}
	for _, mv := range p.entries(data) {
		key, ok := p.key(mv.Key)
		if !ok {
			continue
		}
		f := fs.Lookup(key)
		if f == nil || !isKey(f) {
			msg := fmt.Sprintf("unknown key %q", key)
			if key == FlagName {
				msg = fmt.Sprintf("%q names the configuration file; it cannot be set inside one", key)
			} else if c := closest(key, keys(fs)); c != "" {
				msg += fmt.Sprintf(" (did you mean %q?)", c)
			} else {
				msg += "; the keys are the flags of the command (see --help)"
			}
			p.errorf(p.pos(mv.Key), "%s", msg)
			continue
		}
		if pos, ok := p.set(f, mv.Value); ok {
			sources[key] = Source{Kind: FromFile, Pos: pos}
		}
	}
	slices.SortStableFunc(p.errs, func(a, b *Error) int {
		return cmp.Or(cmp.Compare(a.Pos.Line, b.Pos.Line), cmp.Compare(a.Pos.Col, b.Pos.Col), cmp.Compare(a.Msg, b.Msg))
	})
	out := make(ErrorList, len(p.errs))
	for i, e := range p.errs {
		out[i] = e
	}
	return out
}

// keys returns the names of the keys of fs.
func keys(fs *pflag.FlagSet) []string {
	var out []string
	fs.VisitAll(func(f *pflag.Flag) {
		if isKey(f) {
			out = append(out, f.Name)
		}
	})
	return out
}

// fileParser walks the YAML AST of one configuration file and collects errors.
type fileParser struct {
	file string
	errs []*Error
}

func (p *fileParser) errorf(pos Pos, format string, args ...any) {
	p.errs = append(p.errs, &Error{Pos: pos, Msg: fmt.Sprintf(format, args...)})
}

// pos returns where n starts; for a mapping, its first key (1:1 when n has no
// position).
func (p *fileParser) pos(n ast.Node) Pos {
	if line, col, ok := yamlpos.Of(n); ok {
		return Pos{File: p.file, Line: line, Col: col}
	}
	return Pos{File: p.file, Line: 1, Col: 1}
}

// entries parses data and returns the entries of its top-level mapping; an
// empty file has none.
func (p *fileParser) entries(data []byte) (out []*ast.MappingValueNode) {
	defer func() {
		if r := recover(); r != nil {
			p.errorf(Pos{File: p.file, Line: 1, Col: 1}, "YAML parser failed: %v", r)
			out = nil
		}
	}()
	f, err := parser.ParseBytes(data, 0)
	if err != nil {
		pos := Pos{File: p.file, Line: 1, Col: 1}
		msg := err.Error()
		var yerr yaml.Error
		if errors.As(err, &yerr) {
			if tk := yerr.GetToken(); tk != nil && tk.Position != nil {
				pos.Line, pos.Col = tk.Position.Line, tk.Position.Column
			}
			msg = yerr.GetMessage()
		}
		p.errorf(pos, "invalid YAML: %s", msg)
		return nil
	}
	var body ast.Node
	for _, doc := range f.Docs {
		if doc == nil || doc.Body == nil {
			continue
		}
		if body != nil {
			p.errorf(p.pos(doc.Body), "a configuration file holds one YAML document; remove the extra document")
			break
		}
		body = doc.Body
	}
	if body == nil {
		return nil
	}
	if body = p.value(body); body == nil {
		return nil
	}
	switch v := body.(type) {
	case *ast.MappingNode:
		return v.Values
	case *ast.MappingValueNode:
		return []*ast.MappingValueNode{v}
	}
	p.errorf(p.pos(body), "a configuration file is a mapping of keys to values (e.g. \"log-level: info\"), got %s", yamlpos.Kind(body))
	return nil
}

// value unwraps n, reporting YAML features configuration files do not accept.
// It returns nil after reporting.
func (p *fileParser) value(n ast.Node) ast.Node {
	switch n.(type) {
	case *ast.AnchorNode, *ast.AliasNode:
		p.errorf(p.pos(n), "YAML anchors and aliases are not supported in configuration files; write the value out")
		return nil
	case *ast.TagNode:
		p.errorf(p.pos(n), "YAML tags are not supported in configuration files; remove %s", n.GetToken().Value)
		return nil
	}
	return n
}

// key returns a mapping key's text; keys must be plain strings.
func (p *fileParser) key(k ast.MapKeyNode) (string, bool) {
	if s, ok := k.(*ast.StringNode); ok {
		return s.Value, true
	}
	if _, ok := k.(*ast.MergeKeyNode); ok {
		p.errorf(p.pos(k), "YAML merge keys are not supported in configuration files")
		return "", false
	}
	p.errorf(p.pos(k), "keys must be plain strings, the names of flags")
	return "", false
}

// set sets flag f from the YAML value n and returns the value's position; ok is
// false after reporting a problem.
func (p *fileParser) set(f *pflag.Flag, n ast.Node) (Pos, bool) {
	if n = p.value(n); n == nil {
		return Pos{}, false
	}
	pos := p.pos(n)
	if sv, isSlice := f.Value.(pflag.SliceValue); isSlice {
		seq, ok := n.(*ast.SequenceNode)
		if !ok {
			p.errorf(pos, "%s must be a list, e.g. %s: [%s], got %s", f.Name, f.Name, example(f), yamlpos.Kind(n))
			return Pos{}, false
		}
		items := make([]string, 0, len(seq.Values))
		ok = true
		for _, item := range seq.Values {
			s, itemOK := p.scalar(f, item, f.Name+" item")
			ok = ok && itemOK
			items = append(items, s)
		}
		if !ok {
			return Pos{}, false
		}
		if err := sv.Replace(items); err != nil {
			p.errorf(pos, "%s: %s", f.Name, badValue(f, err))
			return Pos{}, false
		}
		return pos, true
	}
	s, ok := p.scalar(f, n, f.Name)
	if !ok {
		return Pos{}, false
	}
	if err := f.Value.Set(s); err != nil {
		p.errorf(pos, "%s: invalid value %q: %s", f.Name, s, badValue(f, err))
		return Pos{}, false
	}
	return pos, true
}

// scalar returns the text of a scalar value as written (a quoted string without
// its quotes); what names it in errors.
func (p *fileParser) scalar(f *pflag.Flag, n ast.Node, what string) (string, bool) {
	if n = p.value(n); n == nil {
		return "", false
	}
	switch v := n.(type) {
	case *ast.StringNode:
		return v.Value, true
	case *ast.LiteralNode: // a block scalar (| or >)
		return v.Value.Value, true
	case *ast.IntegerNode, *ast.FloatNode, *ast.BoolNode, *ast.InfinityNode, *ast.NanNode:
		return v.GetToken().Value, true
	case *ast.NullNode:
		p.errorf(p.pos(n), "%s has no value: give one (e.g. %s), or remove the key to keep the default", what, example(f))
		return "", false
	}
	p.errorf(p.pos(n), "%s must be a single value, got %s", what, yamlpos.Kind(n))
	return "", false
}

// badValue explains why f rejected a value: what its type wants, or the
// value's own error for types pflag does not define.
func badValue(f *pflag.Flag, err error) string {
	switch f.Value.Type() {
	case "bool":
		return "want true or false"
	case "int", "int8", "int16", "int32", "int64", "uint", "uint8", "uint16", "uint32", "uint64":
		if errors.Is(err, strconv.ErrRange) {
			return "out of range"
		}
		return "want an integer"
	case "duration":
		return "want a duration such as 30s, 5m or 1h30m"
	}
	return err.Error()
}

// example returns an example value for f: its default, else one by type.
func example(f *pflag.Flag) string {
	if d := f.DefValue; d != "" && d != "[]" {
		return strings.Trim(d, "[]")
	}
	switch f.Value.Type() {
	case "bool":
		return "true"
	case "int":
		return "1"
	case "duration":
		return "30s"
	}
	return "VALUE"
}

// closest returns the candidate within edit distance 2 of s (the nearest), or "".
func closest(s string, candidates []string) string {
	best, bestD := "", 3
	for _, c := range candidates {
		if d := distance(s, c); d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

// distance is the Levenshtein edit distance between a and b.
func distance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
