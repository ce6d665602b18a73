// Package procmem reads the memory figures of a Linux process from /proc, for the
// benchmark drivers under hack/.
package procmem

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Mem is the resident memory of a process in bytes, from /proc/PID/status.
type Mem struct {
	RSS     int64 // VmRSS: resident now (RssAnon + RssFile + RssShmem)
	HWM     int64 // VmHWM: peak resident since start or the last reset
	RSSAnon int64 // RssAnon: anonymous pages (heap, stacks): what the program allocated
	RSSFile int64 // RssFile: file-backed pages (the binary's text and data)
}

// Read returns the memory of process pid. A process that exited (or a kernel
// thread) is an error.
func Read(pid int) (Mem, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Mem{}, fmt.Errorf("reading memory of pid %d: %w", pid, err)
	}
	m, err := Parse(string(b))
	if err != nil {
		return Mem{}, fmt.Errorf("reading memory of pid %d: %w", pid, err)
	}
	return m, nil
}

// Parse extracts Mem from the text of /proc/PID/status, whose lines look like
// "VmRSS:\t  13568 kB". VmRSS must be present; the other fields are 0 when absent.
func Parse(status string) (Mem, error) {
	var m Mem
	found := false
	sc := bufio.NewScanner(strings.NewReader(status))
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		var dst *int64
		switch key {
		case "VmRSS":
			dst, found = &m.RSS, true
		case "VmHWM":
			dst = &m.HWM
		case "RssAnon":
			dst = &m.RSSAnon
		case "RssFile":
			dst = &m.RSSFile
		default:
			continue
		}
		f := strings.Fields(val)
		if len(f) != 2 || f[1] != "kB" {
			return Mem{}, fmt.Errorf("%s: want \"N kB\", got %q", key, strings.TrimSpace(val))
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return Mem{}, fmt.Errorf("%s: %w", key, err)
		}
		*dst = kb * 1024
	}
	if !found {
		return Mem{}, errors.New("VmRSS missing (a kernel thread, or the process exited)")
	}
	return m, nil
}

// ResetHWM resets the peak resident set of pid (VmHWM) to its current resident
// set by writing "5" to /proc/PID/clear_refs (Linux >= 4.0).
func ResetHWM(pid int) error {
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		return fmt.Errorf("resetting VmHWM of pid %d: %w", pid, err)
	}
	return nil
}

// MB formats n bytes in MB (10^6 bytes) with one decimal.
func MB(n int64) string { return strconv.FormatFloat(float64(n)/1e6, 'f', 1, 64) + " MB" }
