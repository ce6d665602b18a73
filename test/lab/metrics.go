package lab

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"time"
)

// MetricsPort is where the lab's daemons serve --metrics-listen when a test or the
// demo turns it on (":9464", each daemon in its own network namespace).
const MetricsPort = 9464

// Scrape fetches http://addr/metrics (Prometheus text format) from inside h's
// network namespace, within 10 s. It returns the body, or an error naming the host
// and the status when the daemon does not answer 200.
func (h *Host) Scrape(ctx context.Context, addr netip.AddrPort) (string, error) {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return h.DialTCP(ctx, addr) },
	}}
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr.String()+"/metrics", nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("scraping %s on %s: %w", addr, h.Name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("scraping %s on %s: %w", addr, h.Name, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("scraping %s on %s: %s: %s", addr, h.Name, resp.Status, body)
	}
	return string(body), nil
}
