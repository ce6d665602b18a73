package dataplane

import (
	"context"
	"net/netip"
)

// Directions of a denied flow.
const (
	// DirectionIn is traffic to this node, dropped by its ingress policy.
	DirectionIn = "in"
	// DirectionOut is traffic from this node, dropped by its egress policy.
	DirectionOut = "out"
)

// DeniedFlow is one flow the policy dropped, as the kernel recorded it: the
// counters run from when the kernel first recorded the flow (they restart from 0
// when the kernel forgot it after a quiet time, or the table was recreated).
type DeniedFlow struct {
	// Direction is DirectionIn or DirectionOut.
	Direction string
	Src, Dst  netip.Addr
	// Protocol is the IANA IP protocol number.
	Protocol uint8
	// Port is the destination port of TCP, UDP and SCTP; 0 for other protocols.
	Port uint16
	// Packets and Bytes (of the network header and payload) dropped.
	Packets, Bytes uint64
}

// DropCounter counts what one direction's policy dropped.
type DropCounter struct {
	Packets, Bytes uint64
	// Epoch changes whenever the kernel's counter restarted from 0 (its rule was
	// created again), so that a reader can tell a restart from a quiet time.
	Epoch uint64
}

// Denied is what the kernel recorded of the traffic the policy dropped.
type Denied struct {
	// Flows holds at most a few thousand flows per direction and family (the
	// kernel's sets are bounded), in no particular order.
	Flows []DeniedFlow
	// In and Out count every packet the ingress and egress policy dropped,
	// whether or not its flow is in Flows.
	In, Out DropCounter
	// Full is true when a kernel set of denied flows was full: flows dropped
	// meanwhile may be missing from Flows (their packets are in In and Out).
	Full bool
}

// DeniedReader is implemented by a Dataplane whose filter records the flows it drops.
type DeniedReader interface {
	// ReadDenied returns the denied flows the kernel holds now, and the drop
	// counters. Errors: the table cannot be read (e.g. it is missing: the
	// counters then restart with the next table).
	ReadDenied(ctx context.Context) (Denied, error)
}
