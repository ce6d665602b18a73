package agent

import (
	"context"
	"time"

	"segmesh/agent/dataplane"
	"segmesh/agent/flowlog"
	"segmesh/api/segmeshv1"
)

// flowLoop reads the flows the policy dropped every FlowInterval into a.flows, and
// asks for a report when a read found new ones. A failed read (no table yet, a
// table being replaced) is logged at debug level and retried at the next tick.
func (a *agent) flowLoop(ctx context.Context, r dataplane.DeniedReader) {
	t := time.NewTicker(a.opts.FlowInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d, err := r.ReadDenied(ctx)
		if err != nil {
			if ctx.Err() == nil {
				a.log.Debug("reading denied flows failed; retrying", "err", err, "in", a.opts.FlowInterval)
			}
			continue
		}
		if a.flows.Observe(time.Now(), d) > 0 {
			signal(a.reportC)
		}
	}
}

// deniedReport is the wire form of b (ReportRequest.denied_flows and
// denied_flows_more).
func deniedReport(b flowlog.Batch) ([]*segmeshv1.DeniedFlow, uint64) {
	out := make([]*segmeshv1.DeniedFlow, 0, len(b.Flows))
	for _, f := range b.Flows {
		out = append(out, &segmeshv1.DeniedFlow{
			Direction:     f.Direction,
			Source:        f.Src.String(),
			Destination:   f.Dst.String(),
			Protocol:      flowlog.ProtocolName(f.Protocol),
			Port:          uint32(f.Port),
			Packets:       f.Packets,
			Bytes:         f.Bytes,
			FirstSeenUnix: f.First.Unix(),
			LastSeenUnix:  f.Last.Unix(),
		})
	}
	return out, b.More
}
