// Package metricsserve serves a Prometheus registry for the segmesh daemons'
// --metrics-listen flag.
package metricsserve

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// FlagUsage is the help text of --metrics-listen on both daemons.
const FlagUsage = "serve Prometheus metrics (plain HTTP, /metrics) on this address, e.g. 127.0.0.1:9464; off when empty (see docs/metrics.md)"

// Serve serves g in the Prometheus text format on http://addr/metrics until the
// process ends. It returns the bound address once the listener is open, or the
// listen error.
func Serve(addr string, g prometheus.Gatherer, log *slog.Logger) (net.Addr, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics-listen: %w", err)
	}
	srv := &http.Server{Handler: Handler(g, log), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("metrics listener stopped", "addr", addr, "err", err)
		}
	}()
	log.Info("serving metrics", "url", "http://"+l.Addr().String()+"/metrics")
	return l.Addr(), nil
}

// Handler serves g on /metrics (and answers 404 elsewhere). A collector that
// fails is logged and left out of the scrape; the others are still served.
func Handler(g prometheus.Gatherer, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorLog:            slogPrinter{log},
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	}))
	return mux
}

// slogPrinter adapts an slog.Logger to promhttp.Logger.
type slogPrinter struct{ log *slog.Logger }

func (p slogPrinter) Println(v ...any) { p.log.Warn("serving metrics: " + fmt.Sprint(v...)) }
