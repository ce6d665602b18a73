package agent

import (
	"context"
	"errors"
	"time"
)

// endpointPoll is how often the agent looks for a new local endpoint (the local
// address the kernel routes to the controller from; a route lookup, no packet),
// so that a host whose underlay address changed tells gossip and the controller
// within about a second.
const endpointPoll = time.Second

// errEndpointMoved ends the netmap stream when the local endpoint changed: its
// connection left from the old address, which may be gone. The loop reconnects
// at once, over a new connection from the new address.
var errEndpointMoved = errors.New("the local endpoint changed; reconnecting from the new address")

// discover is discoverEndpoint; tests replace it to move the host.
var discover = discoverEndpoint

// endpointLoop rediscovers the local endpoint every endpointPoll until ctx ends;
// currentEndpoint tells the rest of the agent when it changed (endpointMoved).
func (a *agent) endpointLoop(ctx context.Context) {
	t := time.NewTicker(endpointPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			_, _ = a.currentEndpoint()
		}
	}
}

// advertisedEndpoint is the latest local endpoint as "ip:port", "" before the
// first discovery.
func (a *agent) advertisedEndpoint() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.endpoint.IsValid() {
		return ""
	}
	return a.endpoint.String()
}

// endpointMoved is called when the local endpoint changed: gossip re-advertises
// it (a new signed claim from the new address), and the syncer reconnects and
// reports it to the controller at once (ReportRequest.endpoint), without
// waiting for the old stream's connection to time out.
func (a *agent) endpointMoved() {
	signal(a.gossipC)
	signal(a.movedC)
	signal(a.stunC)
}
