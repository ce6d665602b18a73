package policy

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"unicode/utf8"
)

// Label syntax, the one definition shared by policy selectors, inventory files,
// join tokens and node labels on the controller. A selector whose labels no node
// can carry would silently select nothing, so every place that accepts labels
// checks them with CheckLabels (or CheckLabelKey and CheckLabelValue).
const (
	// LabelKeySyntax is the syntax of label keys as a regular expression without
	// anchors: 1 to 63 ASCII letters, digits, '.', '_', '/' and '-', starting and
	// ending with a letter or digit.
	LabelKeySyntax = `[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?`
	// LabelValueSyntax is the syntax of label values as a regular expression
	// without anchors: empty, or 1 to 63 ASCII letters, digits, '.', '_' and '-',
	// starting and ending with a letter or digit.
	LabelValueSyntax = `([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?`
	// LabelSyntax describes both in words, for messages and help texts.
	LabelSyntax = "label keys are 1-63 characters of letters, digits, '.', '_', '/' and '-', " +
		"starting and ending with a letter or digit; values are empty or up to 63 characters of " +
		"letters, digits, '.', '_' and '-', starting and ending with a letter or digit"
)

// MaxLabelLength is the longest label key or value accepted, in bytes (all
// accepted characters are ASCII, so also in characters).
const MaxLabelLength = 63

// CheckLabelKey reports whether key matches LabelKeySyntax. The error says
// which character or rule is at fault and, when the key only has surrounding
// spaces, which key was probably meant.
func CheckLabelKey(key string) error {
	if key == "" {
		return errors.New("label key is empty; " + keyRules)
	}
	if why := labelProblem(key, true); why != "" {
		return fmt.Errorf("label key %q is not valid: %s; %s%s", key, why, keyRules, trimHint(key, true))
	}
	return nil
}

// CheckLabelValue reports whether value (of the label key, which only names it
// in the message) matches LabelValueSyntax.
func CheckLabelValue(key, value string) error {
	if value == "" {
		return nil
	}
	if why := labelProblem(value, false); why != "" {
		return fmt.Errorf("value %q of label %q is not valid: %s; %s%s", value, key, why, valueRules, trimHint(value, false))
	}
	return nil
}

// CheckLabel checks one label, key then value: CheckLabelKey, then CheckLabelValue.
func CheckLabel(key, value string) error {
	return errors.Join(CheckLabelKey(key), CheckLabelValue(key, value))
}

// CheckLabels checks every label of labels (CheckLabel) and returns nil or the
// problems of all of them, in key order, one per line (errors.Join).
func CheckLabels(labels map[string]string) error {
	var errs []error
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		if err := CheckLabel(k, labels[k]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

const (
	keyRules   = "label keys are 1-63 letters, digits, '.', '_', '/' and '-', starting and ending with a letter or digit"
	valueRules = "label values are empty or up to 63 letters, digits, '.', '_' and '-', starting and ending with a letter or digit"
)

// labelProblem returns why the non-empty s is not a valid label key (key) or
// value, or "" when it is valid.
func labelProblem(s string, key bool) string {
	if !utf8.ValidString(s) {
		return "it is not valid UTF-8"
	}
	for i, r := range s {
		if labelChar(r, key) {
			continue
		}
		switch {
		case r == ' ':
			return fmt.Sprintf("it holds a space at character %d", utf8.RuneCountInString(s[:i])+1)
		case r == '\t':
			return fmt.Sprintf("it holds a tab at character %d", utf8.RuneCountInString(s[:i])+1)
		case r >= utf8.RuneSelf:
			return fmt.Sprintf("it holds the non-ASCII character %q", r)
		default:
			return fmt.Sprintf("it holds %q", r)
		}
	}
	if len(s) > MaxLabelLength {
		return fmt.Sprintf("it is %d characters long, more than %d", len(s), MaxLabelLength)
	}
	if !alnum(rune(s[0])) || !alnum(rune(s[len(s)-1])) {
		return "it does not start and end with a letter or digit"
	}
	return ""
}

// trimHint suggests s without surrounding spaces when that is valid.
func trimHint(s string, key bool) string {
	t := strings.TrimSpace(s)
	if t == s || t == "" || labelProblem(t, key) != "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", t)
}

func labelChar(r rune, key bool) bool {
	return alnum(r) || r == '.' || r == '_' || r == '-' || key && r == '/'
}

func alnum(r rune) bool {
	return 'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9'
}
