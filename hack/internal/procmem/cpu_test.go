package procmem

import (
	"os"
	"testing"
	"time"
)

func TestParseStatCPU(t *testing.T) {
	// Fields after the command name: state ppid pgrp session tty tpgid flags
	// minflt cminflt majflt cmajflt utime stime ...
	tail := " S 1 2 3 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0"
	tests := []struct {
		name    string
		in      string
		want    time.Duration
		wantErr bool
	}{
		{"plain", "1234 (segmesh-control)" + tail, 3 * time.Second, false},
		{"parens and spaces in the name", "1234 (a) (b c)" + tail, 3 * time.Second, false},
		{"no name", "1234 segmesh" + tail, 0, true},
		{"truncated", "1234 (x) S 1 2", 0, true},
		{"not a number", "1234 (x) S 1 2 3 0 -1 4194560 100 0 0 0 u s 0", 0, true},
	}
	for _, tt := range tests {
		got, err := ParseStatCPU([]byte(tt.in))
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("%s: ParseStatCPU = %v, %v; want %v, error %v", tt.name, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestCPUSelf(t *testing.T) {
	if _, err := CPU(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if _, err := CPU(-1); err == nil {
		t.Error("CPU(-1) succeeded, want an error")
	}
}
