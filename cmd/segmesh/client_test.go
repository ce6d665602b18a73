package main

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseLabels(t *testing.T) {
	tests := []struct {
		in      []string
		want    map[string]string
		wantErr string
	}{
		{in: []string{"role=db", "env=prod"}, want: map[string]string{"role": "db", "env": "prod"}},
		{in: []string{"empty="}, want: map[string]string{"empty": ""}},
		{in: []string{"role"}, wantErr: "want key=value"},
		{in: []string{"=db"}, wantErr: "want key=value"},
		{in: []string{"role=web,env=prod"}, wantErr: "one label per flag"},
		{in: []string{"role=a", "role=b"}, wantErr: `key "role" given twice`},
	}
	for _, tt := range tests {
		got, err := parseLabels(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("parseLabels(%q) error = %v, want %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil || len(got) != len(tt.want) {
			t.Errorf("parseLabels(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
			continue
		}
		for k, v := range tt.want {
			if got[k] != v {
				t.Errorf("parseLabels(%q)[%q] = %q, want %q", tt.in, k, got[k], v)
			}
		}
	}
}

// The operator credential is a bearer secret: any URL that is not https is refused
// before a connection is made.
func TestLoadCredentialsRefusesCleartext(t *testing.T) {
	path := filepath.Join(t.TempDir(), "operator.json")
	raw, _ := json.Marshal(credentials{Controller: "https://192.0.2.1:7443", CAPEM: "x", Token: "secret"})
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		override string
		wantErr  bool
	}{
		{"", false},
		{"https://127.0.0.1:7443", false},
		{"http://127.0.0.1:7443", true},
		{"127.0.0.1:7443", true},
		{"https://", true},
	}
	for _, tt := range tests {
		_, err := loadCredentials(&globalFlags{credentials: path, controller: tt.override})
		var ee *exitError
		if tt.wantErr != (err != nil) || (err != nil && (!errors.As(err, &ee) || ee.code != 2 || !strings.Contains(ee.msg, "https://"))) {
			t.Errorf("--controller %q: error = %v, want error %v", tt.override, err, tt.wantErr)
		}
	}
}
