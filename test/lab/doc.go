// Package lab is segmesh's network-namespace testbed, shared by the end-to-end tests
// (test/e2e) and the demo driver (hack/lab).
//
// A Lab is a set of network namespaces it creates and owns: one underlay namespace
// holding the public bridge br0 (192.0.2.0/24), and one namespace per host with
// eth0, one end of a veth pair whose other end (v<n>) is a port of a bridge.
// Public hosts (the controller, public nodes) sit on br0 and reach each other
// directly. A NAT (AddNAT) is a router namespace "smlab-<id>-nat-<name>" with
// eth0 on br0 (its public address) and a private bridge lan0 (a private subnet,
// 10.<n>.0.0/24 by default); hosts behind it (AddHostBehind) sit on lan0 with a
// private address and a default route via the router, which translates with
// nftables as its kind says: port-preserving, symmetric or 1:1 (see NATKind for
// the real devices each models and their RFC 4787 mapping and filtering
// behaviour). Host.Renumber and Host.MoveTo change a host's underlay address or
// network while its processes run (roaming). The underlay is IPv4 only. Nothing
// is created in the root namespace.
//
// Every name carries a short random lab id: namespaces are "smlab-<id>-<host>"
// and overlay interface names "sm<id>w<n>" (at most 15 bytes and unique
// machine-wide, because wireguard-go's UAPI socket path
// /var/run/wireguard/NAME.sock is global across namespaces).
//
// Processes run with `ip netns exec NS ...` in their own process group; the lab
// records their PIDs and writes their output to log files in the lab directory.
// Close stops every process it started (SIGTERM, then SIGKILL after a deadline),
// runs registered cleanup hooks (such as `segmesh-agent down`), deletes by name
// every link and nftables table it recorded, then the namespaces it created; it
// is idempotent and safe to call from a signal handler goroutine while other code
// still uses the lab.
//
// Mesh builds on Lab: a controller host and one host per segmesh node (on the
// public underlay, or behind a NAT of MeshOptions.NATs), running the real
// segmesh binaries, plus a probe server (hack/probe) on every node. With
// MeshOptions.HA (ha.go) the controller hosts are controller-1..N, each running
// a member of one real etcd cluster (hack/etcd) and a controller replica with
// --store etcd; the mesh kills and restarts replicas, stops and restarts etcd
// members, partitions a controller host from the others with nftables, and
// tells which replica each agent streams from. Policy is a
// deliberately small, independent evaluator of the policy file format, used to
// compute the expected verdict of every cell of the connectivity Matrix, which real
// TCP, UDP and ICMP probes then observe.
//
// Everything here needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
package lab
