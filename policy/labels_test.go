package policy

import (
	"regexp"
	"strings"
	"testing"
)

// The controller's label syntax before it moved here (controller/operator.go,
// labelKeyRE and labelValueRE): the check must accept exactly what they accept.
var (
	oldLabelKeyRE   = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$`)
	oldLabelValueRE = regexp.MustCompile(`^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$`)
)

func TestLabelSyntax(t *testing.T) {
	long := strings.Repeat("a", 63)
	tests := []struct {
		key, value string
		want       string // "" for valid
	}{
		{"role", "web", ""},
		{"example.com/role", "web-1.a_b", ""},
		{"a", "", ""},
		{"A9", "Z", ""},
		{long, long, ""},
		{"", "x", "label key is empty; " + keyRules},
		{" role", "web", `label key " role" is not valid: it holds a space at character 1; ` + keyRules + ` (did you mean "role"?)`},
		{"my key", "x", `label key "my key" is not valid: it holds a space at character 3; ` + keyRules},
		{"role", " web", `value " web" of label "role" is not valid: it holds a space at character 1; ` + valueRules + ` (did you mean "web"?)`},
		{"role", "web\t", `value "web\t" of label "role" is not valid: it holds a tab at character 4; ` + valueRules + ` (did you mean "web"?)`},
		{"rôle", "x", `label key "rôle" is not valid: it holds the non-ASCII character 'ô'; ` + keyRules},
		{"role", "\xffweb", `value "\xffweb" of label "role" is not valid: it is not valid UTF-8; ` + valueRules},
		{"role", strings.Repeat("v", 300), `value "` + strings.Repeat("v", 300) + `" of label "role" is not valid: it is 300 characters long, more than 63; ` + valueRules},
		{long + "b", "x", `label key "` + long + `b" is not valid: it is 64 characters long, more than 63; ` + keyRules},
		{"a/", "x", `label key "a/" is not valid: it does not start and end with a letter or digit; ` + keyRules},
		{"_a", "x", `label key "_a" is not valid: it does not start and end with a letter or digit; ` + keyRules},
		{"a", "b/c", `value "b/c" of label "a" is not valid: it holds '/'; ` + valueRules},
		{"a", "x.", `value "x." of label "a" is not valid: it does not start and end with a letter or digit; ` + valueRules},
		{"a=b", "x", `label key "a=b" is not valid: it holds '='; ` + keyRules},
		{"a\nb", "x", `label key "a\nb" is not valid: it holds '\n'; ` + keyRules},
		// A trimmed value that is still invalid earns no hint.
		{"role", " a b ", `value " a b " of label "role" is not valid: it holds a space at character 1; ` + valueRules},
		// Both problems of one label.
		{" k", " v", `label key " k" is not valid: it holds a space at character 1; ` + keyRules + ` (did you mean "k"?)` + "\n" +
			`value " v" of label " k" is not valid: it holds a space at character 1; ` + valueRules + ` (did you mean "v"?)`},
	}
	for _, tt := range tests {
		err := CheckLabel(tt.key, tt.value)
		got := ""
		if err != nil {
			got = err.Error()
		}
		if got != tt.want {
			t.Errorf("CheckLabel(%q, %q) = %q\nwant %q", tt.key, tt.value, got, tt.want)
		}
	}
}

func TestCheckLabels(t *testing.T) {
	if err := CheckLabels(nil); err != nil {
		t.Errorf("CheckLabels(nil) = %v", err)
	}
	if err := CheckLabels(map[string]string{"role": "web", "env": ""}); err != nil {
		t.Errorf("CheckLabels(valid) = %v", err)
	}
	err := CheckLabels(map[string]string{"z z": "a", "role": "web", "a": "-"})
	want := `value "-" of label "a" is not valid: it does not start and end with a letter or digit; ` + valueRules + "\n" +
		`label key "z z" is not valid: it holds a space at character 2; ` + keyRules
	if err == nil || err.Error() != want {
		t.Errorf("CheckLabels = %v\nwant %s", err, want)
	}
}

// FuzzLabelSyntax checks CheckLabelKey and CheckLabelValue against the
// regular expressions LabelKeySyntax and LabelValueSyntax and the controller's
// former ones, and that every "did you mean" hint is itself accepted.
func FuzzLabelSyntax(f *testing.F) {
	for _, s := range []string{"", "a", "role", " role", "a b", "rôle", "\xff", "a/b", "-a", "a-", "a.b_c-d", strings.Repeat("x", 63), strings.Repeat("x", 64), " web ", "A/"} {
		f.Add(s)
	}
	keyRE := regexp.MustCompile("^" + LabelKeySyntax + "$")
	valueRE := regexp.MustCompile("^" + LabelValueSyntax + "$")
	hint := regexp.MustCompile(`did you mean "([^"]*)"\?`)
	f.Fuzz(func(t *testing.T, s string) {
		keyErr, valueErr := CheckLabelKey(s), CheckLabelValue("k", s)
		if ok := keyErr == nil; ok != keyRE.MatchString(s) || ok != oldLabelKeyRE.MatchString(s) {
			t.Fatalf("CheckLabelKey(%q) = %v; LabelKeySyntax matches: %v", s, keyErr, keyRE.MatchString(s))
		}
		if ok := valueErr == nil; ok != valueRE.MatchString(s) || ok != oldLabelValueRE.MatchString(s) {
			t.Fatalf("CheckLabelValue(%q) = %v; LabelValueSyntax matches: %v", s, valueErr, valueRE.MatchString(s))
		}
		if keyErr != nil {
			if m := hint.FindStringSubmatch(keyErr.Error()); m != nil && CheckLabelKey(m[1]) != nil {
				t.Fatalf("CheckLabelKey(%q) hints %q, which is refused", s, m[1])
			}
		}
		if valueErr != nil {
			if m := hint.FindStringSubmatch(valueErr.Error()); m != nil && CheckLabelValue("k", m[1]) != nil {
				t.Fatalf("CheckLabelValue(%q) hints %q, which is refused", s, m[1])
			}
		}
	})
}
