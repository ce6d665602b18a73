package linux

import (
	"context"
	"fmt"

	"segmesh/agent/dataplane"
)

// applyInterface makes the overlay interface hold want: the WireGuard device, its
// configuration, then MTU, addresses, link up and routes. want is canonical and valid;
// mtu is want.MTU with the default filled in. d.mu must be held.
func (d *Dataplane) applyInterface(ctx context.Context, want dataplane.State, mtu int) error {
	name := d.opts.Interface
	if err := ctx.Err(); err != nil {
		return err
	}
	link, err := d.ensureDevice(mtu)
	if err != nil {
		return fmt.Errorf("creating interface %s: %w", name, err)
	}
	if err := d.configureWireGuard(want); err != nil {
		return fmt.Errorf("configuring WireGuard on %s: %w", name, err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := d.configureLink(link, want, mtu); err != nil {
		return fmt.Errorf("configuring interface %s: %w", name, err)
	}
	return nil
}

// readInterface fills the interface fields of s (see Read): nothing when the link is
// missing. d.mu must be held.
func (d *Dataplane) readInterface(s *dataplane.State) error {
	return d.readInterfaceStats(s, nil)
}

// readInterfaceStats is readInterface that also records each peer's counters
// (latest handshake, bytes) in stats when stats is not nil.
func (d *Dataplane) readInterfaceStats(s *dataplane.State, stats map[dataplane.Key]dataplane.PeerStats) error {
	snap, err := d.linkState()
	if err != nil || snap.link == nil {
		return err
	}
	s.Interface = d.opts.Interface
	s.MTU = snap.link.Attrs().MTU
	if d.applied != nil && d.applied.MTU == 0 && s.MTU == DefaultMTU {
		s.MTU = 0
	}
	s.Addresses = snap.addresses()
	s.Routes = snap.routeDsts()
	if err := d.readWireGuard(s, stats); err != nil {
		return fmt.Errorf("reading WireGuard device %s: %w", d.opts.Interface, err)
	}
	return nil
}
