package dataplane

import "context"

// Watcher is implemented by dataplanes that can signal kernel changes (netlink
// link/address/route events, nftables table changes) so the agent can repair drift
// quickly; each receive means "read back now". Bursts of changes are coalesced into
// one receive. The channel is closed when ctx is done or the dataplane is closed.
// Watch returns an error when it cannot subscribe to the kernel's notifications.
type Watcher interface {
	Watch(ctx context.Context) (<-chan struct{}, error)
}
