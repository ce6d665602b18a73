package metricsserve

import (
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestHandler(t *testing.T) {
	reg := prometheus.NewRegistry()
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "segmesh_test", Help: "A test gauge."})
	g.Set(7)
	reg.MustRegister(g)
	srv := httptest.NewServer(Handler(reg, slog.New(slog.DiscardHandler)))
	defer srv.Close()
	for _, tc := range []struct {
		path   string
		status int
		body   string
	}{
		{"/metrics", http.StatusOK, "# HELP segmesh_test A test gauge.\n# TYPE segmesh_test gauge\nsegmesh_test 7\n"},
		{"/", http.StatusNotFound, ""},
	} {
		resp, err := http.Get(srv.URL + tc.path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || (tc.body != "" && string(body) != tc.body) {
			t.Errorf("GET %s: %s %q, want %d %q", tc.path, resp.Status, body, tc.status, tc.body)
		}
		if tc.status == http.StatusOK && !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
			t.Errorf("GET %s: Content-Type %q, want the text format", tc.path, resp.Header.Get("Content-Type"))
		}
	}
}

func TestServeRefusesBadAddress(t *testing.T) {
	if _, err := Serve("256.0.0.1:0", prometheus.NewRegistry(), slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "--metrics-listen") {
		t.Errorf("Serve on a bad address: %v, want an error naming --metrics-listen", err)
	}
}
