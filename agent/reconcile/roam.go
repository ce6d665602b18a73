package reconcile

import (
	"net/netip"
	"time"

	"segmesh/agent/dataplane"
)

// RoamFresh is how recent a peer's latest handshake must be for the endpoint the
// device learned from it to count as the peer roaming (see roaming): WireGuard
// renews a session's keys every 2 minutes while traffic flows (persistent
// keepalives keep it flowing), and rejects a session after 3 minutes
// (REKEY_AFTER_TIME and REJECT_AFTER_TIME in the WireGuard paper, section 6.1).
const RoamFresh = 3 * time.Minute

// roaming tells WireGuard's own roaming from drift. WireGuard moves a peer's
// endpoint to the source address of every authenticated packet from it, so when
// a peer's underlay address changes the device follows before the controller or
// gossip can tell; repairing that endpoint back would cut the peer off.
//
// A device endpoint that differs from the desired one (netmap or gossip) is
// adopted — it becomes the desired endpoint — only while the peer's latest
// handshake is fresher than RoamFresh and newer than the moment the desired
// endpoint was set: the handshake authenticates the peer, and a desired endpoint
// set after it is newer information. An adoption follows the device (WireGuard
// itself moves on to the next authenticated source, so an endpoint an on-path
// attacker injected does not stick either) and ends when the handshakes stop or
// the desired endpoint changes; then the desired endpoint applies again. A peer
// without device statistics is never adopted.
//
// roaming is owned by the Run goroutine.
type roaming struct {
	set     map[dataplane.Key]desiredEndpoint
	adopted map[dataplane.Key]netip.AddrPort
}

// desiredEndpoint is a peer's desired endpoint and when it became desired.
type desiredEndpoint struct {
	ep netip.AddrPort
	at time.Time
}

// track records the desired endpoints of base (before adoption) at now: a peer
// whose desired endpoint changed loses its adoption, a peer that left is
// forgotten.
func (r *roaming) track(base dataplane.State, now time.Time) {
	seen := make(map[dataplane.Key]desiredEndpoint, len(base.Peers))
	for _, p := range base.Peers {
		d, ok := r.set[p.PublicKey]
		if !ok || d.ep != p.Endpoint {
			d = desiredEndpoint{ep: p.Endpoint, at: now}
			delete(r.adopted, p.PublicKey)
		}
		seen[p.PublicKey] = d
	}
	for k := range r.adopted {
		if _, ok := seen[k]; !ok {
			delete(r.adopted, k)
		}
	}
	r.set = seen
}

// apply returns base with the adopted endpoints (base is not modified).
func (r *roaming) apply(base dataplane.State) dataplane.State {
	if len(r.adopted) == 0 {
		return base
	}
	s := base
	s.Peers = make([]dataplane.Peer, len(base.Peers))
	for i, p := range base.Peers {
		if ep, ok := r.adopted[p.PublicKey]; ok {
			p.Endpoint = ep
		}
		s.Peers[i] = p
	}
	return s
}

// observe updates the adoptions from a read-back at now and reports whether they
// changed.
func (r *roaming) observe(o dataplane.Observed, now time.Time) bool {
	changed := false
	for _, p := range o.State.Peers {
		d, ok := r.set[p.PublicKey]
		if !ok || !d.ep.IsValid() {
			continue // not desired, or no desired endpoint (any endpoint is fine)
		}
		st, known := o.PeerStats[p.PublicKey]
		hs := st.LastHandshake
		proven := known && !hs.IsZero() && hs.After(d.at) && now.Sub(hs) < RoamFresh
		cur, adopted := r.adopted[p.PublicKey]
		switch {
		case proven && p.Endpoint.IsValid() && p.Endpoint != d.ep:
			if !adopted || cur != p.Endpoint {
				if r.adopted == nil {
					r.adopted = map[dataplane.Key]netip.AddrPort{}
				}
				r.adopted[p.PublicKey] = p.Endpoint
				changed = true
			}
		case adopted:
			delete(r.adopted, p.PublicKey)
			changed = true
		}
	}
	return changed
}

// adoptedDrift drops from ds the endpoint differences of peers whose device
// endpoint is adopted.
func (r *roaming) adoptedDrift(ds []dataplane.Difference, o dataplane.Observed) []dataplane.Difference {
	if len(r.adopted) == 0 {
		return ds
	}
	out := ds[:0:0]
	for _, d := range ds {
		k, ok := dataplane.EndpointDifferenceKey(d)
		if ep, adopted := r.adopted[k]; ok && adopted && deviceEndpoint(o.State, k) == ep {
			continue
		}
		out = append(out, d)
	}
	return out
}

func deviceEndpoint(s dataplane.State, k dataplane.Key) netip.AddrPort {
	for _, p := range s.Peers {
		if p.PublicKey == k {
			return p.Endpoint
		}
	}
	return netip.AddrPort{}
}
