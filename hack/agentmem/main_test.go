package main

import (
	"io"
	"slices"
	"testing"
	"time"
)

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantErr bool
		check   func(t *testing.T, o options)
	}{
		{name: "defaults", check: func(t *testing.T, o options) {
			if !o.scenarios["load"] || !o.scenarios["idle"] || o.load != 60*time.Second || o.after != 90*time.Second || o.idlePeers != 100 {
				t.Errorf("defaults = %+v", o)
			}
			if o.goalLoad != 64e6 || o.goalIdle != 40e6 {
				t.Errorf("goals = %d, %d bytes", o.goalLoad, o.goalIdle)
			}
		}},
		{name: "profile adds the debug listener", args: []string{"-profile", "/tmp/x", "-agent-arg=--memory-limit=off"}, check: func(t *testing.T, o options) {
			want := []string{"--memory-limit=off", "--debug-listen", debugAddr}
			if !slices.Equal(o.agentArgs, want) {
				t.Errorf("agentArgs = %q, want %q", o.agentArgs, want)
			}
		}},
		{name: "one scenario", args: []string{"-scenarios", "idle"}, check: func(t *testing.T, o options) {
			if o.scenarios["load"] || !o.scenarios["idle"] {
				t.Errorf("scenarios = %v", o.scenarios)
			}
		}},
		{name: "unknown scenario", args: []string{"-scenarios", "load,burst"}, wantErr: true},
		{name: "too many peers", args: []string{"-idle-peers", "151"}, wantErr: true},
		{name: "no peers", args: []string{"-idle-peers", "0"}, wantErr: true},
		{name: "zero load", args: []string{"-load", "0s"}, wantErr: true},
		{name: "stray argument", args: []string{"x"}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := parseFlags(tt.args, io.Discard)
			if (err != nil) != tt.wantErr {
				t.Fatalf("parseFlags(%q) error = %v, want error %v", tt.args, err, tt.wantErr)
			}
			if err == nil && tt.check != nil {
				tt.check(t, o)
			}
		})
	}
}
