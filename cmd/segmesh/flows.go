package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"segmesh/api/segmeshv1"
	"segmesh/api/segmeshv1/segmeshv1connect"
)

// flowsJSON is the JSON (and YAML) document of `segmesh flows --denied`.
type flowsJSON struct {
	Flows []deniedFlowJSON `json:"flows"`
	// Dropped counts the records the controller dropped (its bounded log was full,
	// a report was past its bounds, a flow was invalid) or nodes left out of their
	// reports, since the controller started.
	Dropped uint64 `json:"dropped"`
}

// deniedFlowJSON is one denied flow: what the node reported, explained against
// the policy revision in force.
type deniedFlowJSON struct {
	// LastSeen and FirstSeen are RFC 3339 times (UTC) of the flow's latest and
	// first dropped packet.
	LastSeen  string `json:"last_seen"`
	FirstSeen string `json:"first_seen"`
	// Node is the node whose filter dropped the flow; Direction is "in" (to it)
	// or "out" (from it).
	Node                string   `json:"node"`
	Direction           string   `json:"direction"`
	Source              string   `json:"source"`
	SourceNode          string   `json:"source_node,omitempty"`
	SourceSegments      []string `json:"source_segments"`
	Destination         string   `json:"destination"`
	DestinationNode     string   `json:"destination_node,omitempty"`
	DestinationSegments []string `json:"destination_segments"`
	// Protocol is "tcp", "udp", "icmp", "icmpv6", "sctp" or a number; Port is the
	// destination port (0 for protocols without one).
	Protocol string `json:"protocol"`
	Port     uint32 `json:"port"`
	Packets  uint64 `json:"packets"`
	Bytes    uint64 `json:"bytes"`
	// Closest are up to 3 rules that come closest to allowing the flow, best
	// first (as policy explain ranks them); Revision is the policy revision they
	// come from.
	Closest  []closestRuleJSON `json:"closest"`
	Revision uint64            `json:"revision"`
}

type closestRuleJSON struct {
	Rule       string   `json:"rule"`
	Position   string   `json:"position"` // file:line:col
	Matches    []string `json:"matches"`
	Mismatches []string `json:"mismatches"`
}

func newFlowsCmd(g *globalFlags) *cobra.Command {
	var denied bool
	var node, since string
	var limit uint32
	cmd := readCmd(&cobra.Command{
		Use:   "flows --denied [--node NAME] [--since D] [--limit N] [-o table|json|yaml]",
		Short: "List the flows nodes' policies dropped, with their segments and the rule that comes closest to allowing each",
		Long: `Flows --denied lists the flows the nodes' filters dropped, as their agents
reported them, the most recent first: when, which node dropped it and in which
direction (in: to the node, out: from it), source and destination (the node
holding the address, or the address, with the segments of the policy in force it
belongs to), protocol and port, packets, and the rule that comes closest to
allowing it (as "segmesh policy explain" ranks rules) with the first reason it
does not. -o json and -o yaml give every field and up to 3 closest rules.

The controller keeps denied flows in memory only (bounded: the oldest records go
first, and a restart forgets them); "dropped" in -o json counts what it did not
keep or nodes left out.

--since takes a duration back from now (10m, 24h) or an RFC 3339 time
(2026-12-01T00:00:00Z); --limit is at most 1000 (default 100).`,
		Args: cobra.NoArgs,
	}, func([]string) (any, func(io.Writer) error, error) {
		if !denied {
			return nil, nil, &exitError{code: 2, msg: "segmesh: flows lists denied flows only for now: add --denied"}
		}
		req := &segmeshv1.ListDeniedFlowsRequest{Node: node, Limit: limit}
		if since != "" {
			t, err := parseSince(since, time.Now())
			if err != nil {
				return nil, nil, err
			}
			req.SinceUnix = max(t.Unix(), 1)
		}
		if limit > 1000 {
			return nil, nil, &exitError{code: 2, msg: fmt.Sprintf("segmesh: --limit %d: at most 1000", limit)}
		}
		resp, err := invoke(g, "listing denied flows", segmeshv1connect.OperatorServiceClient.ListDeniedFlows, req)
		if err != nil {
			return nil, nil, err
		}
		doc := flowsJSON{Flows: make([]deniedFlowJSON, 0, len(resp.GetFlows())), Dropped: resp.GetDropped()}
		rows := make([][]string, 0, len(resp.GetFlows()))
		for _, r := range resp.GetFlows() {
			j := deniedFlowDoc(r)
			doc.Flows = append(doc.Flows, j)
			rows = append(rows, []string{j.LastSeen, j.Node, j.Direction,
				flowEnd(j.Source, j.SourceNode, j.SourceSegments), flowEnd(j.Destination, j.DestinationNode, j.DestinationSegments),
				protoPort(j.Protocol, j.Port), strconv.FormatUint(j.Packets, 10), closestCell(j.Closest)})
		}
		return doc, func(w io.Writer) error {
			return writeTable(w, []string{"LAST_SEEN", "NODE", "DIR", "SOURCE", "DESTINATION", "PROTO/PORT", "PACKETS", "CLOSEST_RULE"}, rows)
		}, nil
	})
	cmd.Flags().BoolVar(&denied, "denied", false, "list the flows the nodes' policies dropped (required)")
	cmd.Flags().StringVar(&node, "node", "", "only flows dropped by this node")
	cmd.Flags().StringVar(&since, "since", "", "only flows last seen from this time on: a duration back from now (10m) or an RFC 3339 time")
	cmd.Flags().Uint32Var(&limit, "limit", 0, "at most this many flows, the most recent first (default 100, at most 1000)")
	return cmd
}

// deniedFlowDoc converts a record of the wire to the output document.
func deniedFlowDoc(r *segmeshv1.DeniedFlowRecord) deniedFlowJSON {
	f := r.GetFlow()
	j := deniedFlowJSON{
		LastSeen: unixTime(f.GetLastSeenUnix()), FirstSeen: unixTime(f.GetFirstSeenUnix()),
		Node: r.GetNode(), Direction: f.GetDirection(),
		Source: f.GetSource(), SourceNode: r.GetSourceNode(), SourceSegments: orEmpty(r.GetSourceSegments()),
		Destination: f.GetDestination(), DestinationNode: r.GetDestinationNode(), DestinationSegments: orEmpty(r.GetDestinationSegments()),
		Protocol: f.GetProtocol(), Port: f.GetPort(), Packets: f.GetPackets(), Bytes: f.GetBytes(),
		Closest: []closestRuleJSON{}, Revision: r.GetRevision(),
	}
	for _, c := range r.GetClosest() {
		j.Closest = append(j.Closest, closestRuleJSON{Rule: c.GetRule(), Position: c.GetPosition(),
			Matches: orEmpty(c.GetMatches()), Mismatches: orEmpty(c.GetMismatches())})
	}
	return j
}

func orEmpty(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// flowEnd writes one end of a flow for the table: the node holding the address
// (else the address) and its segments, e.g. "web-1[web,prod]", "192.0.2.7[partner]".
func flowEnd(addr, node string, segments []string) string {
	s := addr
	if node != "" {
		s = node
	}
	if len(segments) > 0 {
		s += "[" + strings.Join(segments, ",") + "]"
	}
	return s
}

// protoPort writes "tcp/22", or the protocol alone when it has no port.
func protoPort(proto string, port uint32) string {
	switch proto {
	case "tcp", "udp", "sctp":
		return fmt.Sprintf("%s/%d", proto, port)
	}
	return proto
}

// closestCell writes the best closest rule and its first mismatch, e.g.
// "web-to-db at policy.yaml:8:5: packet: tcp/22 is not in tcp/5432"; "" when
// no rule comes close.
func closestCell(cs []closestRuleJSON) string {
	if len(cs) == 0 {
		return ""
	}
	s := cs[0].Rule + " at " + cs[0].Position
	if len(cs[0].Mismatches) > 0 {
		s += ": " + cs[0].Mismatches[0]
	}
	return s
}
