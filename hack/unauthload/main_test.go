package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"segmesh/hack/internal/ctlproc"
	"segmesh/hack/internal/procmem"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in      string
		want    int64
		wantErr bool
	}{
		{"15MiB", 15 << 20, false},
		{"64KiB", 64 << 10, false},
		{"1GiB", 1 << 30, false},
		{"100MB", 100e6, false},
		{"2KB", 2000, false},
		{"1GB", 1e9, false},
		{"512B", 512, false},
		{"4096", 4096, false},
		{" 15 MiB ", 15 << 20, false},
		{"", 0, true},
		{"MiB", 0, true},
		{"-1MiB", 0, true},
		{"1.5MiB", 0, true},
		{"15mib", 0, true},
		{"9999999999999GiB", 0, true},
	}
	for _, tt := range tests {
		got, err := parseSize(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestPercentile(t *testing.T) {
	ms := func(ns ...int) []time.Duration {
		var d []time.Duration
		for _, n := range ns {
			d = append(d, time.Duration(n)*time.Millisecond)
		}
		return d
	}
	tests := []struct {
		in   []time.Duration
		p    float64
		want time.Duration
	}{
		{nil, 50, 0},
		{ms(7), 99, 7 * time.Millisecond},
		{ms(5, 1, 4, 2, 3), 50, 3 * time.Millisecond},
		{ms(5, 1, 4, 2, 3), 99, 5 * time.Millisecond},
		{ms(10, 20, 30, 40, 50, 60, 70, 80, 90, 100), 90, 90 * time.Millisecond},
		{ms(10, 20, 30, 40, 50, 60, 70, 80, 90, 100), 1, 10 * time.Millisecond},
	}
	for _, tt := range tests {
		if got := percentile(tt.in, tt.p); got != tt.want {
			t.Errorf("percentile(%v, %v) = %v, want %v", tt.in, tt.p, got, tt.want)
		}
	}
}

// TestRunLoad drives a stand-in for the controller that refuses every call
// from its headers, as withOperatorAuth does, over both HTTP versions and both
// ways of sending the body, and checks what runLoad counts.
func TestRunLoad(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "" && !strings.HasPrefix(r.Header.Get("Authorization"), "Bearer smop1_") {
			http.Error(w, "bad bearer shape", http.StatusBadRequest)
			return
		}
		if r.ProtoMajor == 1 {
			w.Header().Set("Connection", "close")
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = io.WriteString(w, `{"code":"unauthenticated","message":"no"}`)
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	tlsConf := &tls.Config{RootCAs: pool, ServerName: "example.com"}
	base, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	for _, sc := range scenarios() {
		t.Run(sc.String(), func(t *testing.T) {
			cfg := loadConfig{clients: 3, streams: 2, rounds: 2, body: 4 << 20, deadline: time.Now().Add(time.Minute), reqTimeout: 20 * time.Second}
			st := runLoad(context.Background(), sc, base, tlsConf, cfg)
			want := cfg.clients * cfg.streams * cfg.rounds
			if st.sent != want || st.answered != want || st.codes["401 unauthenticated"] != want {
				t.Errorf("sent %d, answered %d, codes %s; want %d answered with 401 unauthenticated", st.sent, st.answered, st.codeSummary(), want)
			}
			if len(st.latency) != want {
				t.Errorf("%d latencies, want %d", len(st.latency), want)
			}
			if st.uploaded <= 0 || st.uploaded > int64(want)*cfg.body {
				t.Errorf("uploaded %d bytes, want between 1 and %d", st.uploaded, int64(want)*cfg.body)
			}
		})
	}
}

func TestRunLoadCountsTransportErrors(t *testing.T) {
	// Nothing answers TLS here: every request ends in a transport error.
	srv := httptest.NewServer(http.NotFoundHandler())
	t.Cleanup(srv.Close)
	base, _ := url.Parse(strings.Replace(srv.URL, "http://", "https://", 1))
	sc := scenarios()[0]
	cfg := loadConfig{clients: 2, streams: 1, rounds: 2, body: 1024, deadline: time.Now().Add(time.Minute), reqTimeout: 10 * time.Second}
	st := runLoad(context.Background(), sc, base, &tls.Config{ServerName: ctlproc.ServerName}, cfg)
	if st.sent != 4 || st.answered != 0 || len(st.errs) == 0 {
		t.Errorf("sent %d, answered %d, errors %v; want 4 sent, none answered, errors counted", st.sent, st.answered, st.errs)
	}
}

func TestSamplerReadsOwnProcess(t *testing.T) {
	s := startSampler(os.Getpid(), time.Millisecond)
	deadline := time.Now().Add(5 * time.Second)
	for {
		s.mu.Lock()
		n := s.samples
		s.mu.Unlock()
		if n >= 3 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	peak, samples := s.stop()
	m, err := procmem.Read(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if samples < 3 || peak <= 0 || peak > m.HWM {
		t.Errorf("sampler: %d samples, peak %d; want ≥ 3 samples and 0 < peak ≤ VmHWM %d", samples, peak, m.HWM)
	}
}

func TestParseFlags(t *testing.T) {
	tests := []struct {
		args    []string
		wantErr bool
	}{
		{nil, false},
		{[]string{"-clients", "60", "-body", "15MiB", "-rounds", "2", "-scenarios", "h2"}, false},
		{[]string{"-clients", "0"}, true},
		{[]string{"-body", "lots"}, true},
		{[]string{"-scenarios", "("}, true},
		{[]string{"extra"}, true},
	}
	for _, tt := range tests {
		_, err := parseFlags(tt.args, io.Discard)
		if (err != nil) != tt.wantErr {
			t.Errorf("parseFlags(%q) error %v, want error %v", tt.args, err, tt.wantErr)
		}
	}
}
