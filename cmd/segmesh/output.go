package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/goccy/go-yaml"
	"github.com/spf13/cobra"
	"golang.org/x/term"
)

// One output vocabulary for every read command: -o table (the default, for people),
// -o json and -o yaml (for programs). JSON and YAML carry the same document with the
// same snake_case field names (YAML is produced from the JSON encoding), so a script
// can switch between them. "text" is accepted as another name for table: the
// commands whose human output is prose rather than a table (policy render, policy
// explain) called it that.

// outFormat is the value of -o: formatTable, formatJSON or formatYAML. It is a
// pflag.Value, so an unknown format is refused while the flags are parsed (exit 2).
type outFormat string

const (
	formatTable outFormat = "table"
	formatJSON  outFormat = "json"
	formatYAML  outFormat = "yaml"
)

// parseOutputFormat validates an -o value; "text" means table.
func parseOutputFormat(s string) (outFormat, error) {
	switch s {
	case "table", "text":
		return formatTable, nil
	case "json":
		return formatJSON, nil
	case "yaml":
		return formatYAML, nil
	}
	return "", &exitError{code: 2, msg: fmt.Sprintf("segmesh: -o %q: want table, json or yaml", s)}
}

func (f *outFormat) String() string { return string(*f) }

// Set implements pflag.Value.
func (f *outFormat) Set(s string) error {
	v, err := parseOutputFormat(s)
	if err != nil {
		return fmt.Errorf("want table, json or yaml")
	}
	*f = v
	return nil
}

// Type implements pflag.Value; it names the value in --help.
func (f *outFormat) Type() string { return "format" }

// addOutputFlag registers -o/--output on cmd, default table. yamlNote, when not
// empty, replaces the generic description of what -o yaml prints.
func addOutputFlag(cmd *cobra.Command, yamlNote string) *outFormat {
	f := formatTable
	usage := "output format: table, json or yaml"
	if yamlNote != "" {
		usage += " (" + yamlNote + ")"
	}
	cmd.Flags().VarP(&f, "output", "o", usage)
	return &f
}

// write prints v in format f: as indented JSON (no HTML escaping, so "->" stays
// readable), as YAML with the same field names and order, or, for table, by
// calling table.
func (f outFormat) write(w io.Writer, v any, table func(io.Writer) error) error {
	switch f {
	case formatJSON:
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.SetEscapeHTML(false)
		return enc.Encode(v)
	case formatYAML:
		raw, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("encoding output: %w", err)
		}
		out, err := yaml.JSONToYAML(raw)
		if err != nil {
			return fmt.Errorf("encoding output as YAML: %w", err)
		}
		_, err = w.Write(out)
		return err
	}
	return table(w)
}

// writeTable prints an aligned table: the header, then one line per row. Empty
// cells print as "-" so that columns stay countable with awk or strings.Fields;
// control characters in a cell (which a table could only get from a value a
// node or an enrolling host chose) are escaped, so that no value can forge a
// row or move the terminal's cursor.
func writeTable(w io.Writer, header []string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, row := range rows {
		cells := make([]string, len(row))
		for i, c := range row {
			cells[i] = orDash(printable(c))
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	return tw.Flush()
}

// writeFields prints "key: value" lines with the values aligned, empty values as
// "-"; pairs holds key, value, key, value...
func writeFields(w io.Writer, pairs ...string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 1, ' ', 0)
	for i := 0; i+1 < len(pairs); i += 2 {
		fmt.Fprintf(tw, "%s:\t%s\n", pairs[i], orDash(pairs[i+1]))
	}
	return tw.Flush()
}

// unixTime formats Unix seconds as RFC 3339 in UTC; 0 (unknown, never) is "".
func unixTime(sec int64) string {
	if sec == 0 {
		return ""
	}
	return time.Unix(sec, 0).UTC().Format(time.RFC3339)
}

// isTerminal says whether w is a terminal (a program redraws in place there).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// readCmd completes cmd (Use, Short, Long, Args set) into a read command: it
// registers -o and, when run, prints in that format the document that doc returns
// along with the function that prints it as a table.
func readCmd(cmd *cobra.Command, doc func(args []string) (any, func(io.Writer) error, error)) *cobra.Command {
	output := addOutputFlag(cmd, "")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		v, table, err := doc(args)
		if err != nil {
			return err
		}
		return output.write(cmd.OutOrStdout(), v, table)
	}
	return cmd
}

// printable escapes the control characters of s (as strconv.Quote would) and
// leaves everything else as it is.
func printable(s string) string {
	if !strings.ContainsFunc(s, unicode.IsControl) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if unicode.IsControl(r) {
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}
