package linux

import (
	"bytes"
	"maps"
	"slices"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Turning a peer's persistent keepalive on (from 0) makes WireGuard send a handshake
// initiation to it at once; wireguard-go computes it inside the configuration call
// (device/uapi.go: pkaOn, Peer.SendKeepalive). For a full apply of many peers that is
// a handshake storm that makes Apply slow and sends a burst of packets. So Apply adds
// peers without keepalive and a goroutine turns keepalives on afterwards, at most
// keepaliveBatch peers every keepaliveInterval (1,000 peers in about a second),
// under the dataplane's lock. Until then Read reports the pending keepalive as set,
// and Apply neither sends it nor reports it as a change.
const (
	keepaliveBatch    = 100
	keepaliveInterval = 100 * time.Millisecond
)

// setPending replaces the pending keepalives and wakes the goroutine when there are
// any. d.mu must be held.
func (d *Dataplane) setPending(p map[wgtypes.Key]int) {
	if len(p) == 0 {
		d.pending = nil
		return
	}
	d.pending = p
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// keepaliveLoop turns pending keepalives on in batches until Close.
func (d *Dataplane) keepaliveLoop() {
	t := time.NewTimer(0)
	t.Stop()
	defer t.Stop()
	for {
		select {
		case <-d.closing.Done():
			return
		case <-d.kick:
		}
		for more := true; more; {
			t.Reset(keepaliveInterval)
			select {
			case <-d.closing.Done():
				return
			case <-t.C:
			}
			more = d.enableKeepalives(keepaliveBatch)
		}
	}
}

// enableKeepalives turns on the keepalives of up to n pending peers (in key order) in
// one configuration call and reports whether some remain pending. After a failed call
// none remain; a peer that is gone is skipped (update-only).
func (d *Dataplane) enableKeepalives(n int) (more bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed || len(d.pending) == 0 {
		return false
	}
	keys := slices.SortedFunc(maps.Keys(d.pending), func(a, b wgtypes.Key) int { return bytes.Compare(a[:], b[:]) })
	keys = keys[:min(n, len(keys))]
	cfg := wgtypes.Config{Peers: make([]wgtypes.PeerConfig, 0, len(keys))}
	for _, k := range keys {
		ka := time.Duration(d.pending[k]) * time.Second
		cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: k, UpdateOnly: true, PersistentKeepaliveInterval: &ka})
	}
	if err := d.configureDevice(cfg); err != nil {
		// Forget them all: Read then shows the keepalives as off, which is drift,
		// and the Apply that repairs it makes them pending again.
		d.log.Warn("turning on persistent keepalives failed", "interface", d.opts.Interface, "peers", len(d.pending), "err", err)
		d.pending = nil
		return false
	}
	for _, k := range keys {
		delete(d.pending, k)
	}
	d.log.Debug("turned on persistent keepalives", "interface", d.opts.Interface, "peers", len(keys), "pending", len(d.pending))
	return len(d.pending) > 0
}
