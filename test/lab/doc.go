// Package lab is segmesh's network-namespace testbed, shared by the end-to-end tests
// (test/e2e) and the demo driver (hack/lab).
//
// A Lab is a set of network namespaces it creates and owns: one underlay namespace
// holding a bridge, and one namespace per host attached to the bridge by a veth pair
// (interface eth0 in the host, 192.0.2.0/24 underlay). Nothing is created in the root
// namespace. Every name carries a short random lab id: namespaces are
// "smlab-<id>-<host>" and overlay interface names "sm<id>w<n>" (at most 15 bytes and
// unique machine-wide, because wireguard-go's UAPI socket path
// /var/run/wireguard/NAME.sock is global across namespaces).
//
// Processes run with `ip netns exec NS ...` in their own process group; the lab
// records their PIDs and writes their output to log files in the lab directory.
// Close stops every process it started (SIGTERM, then SIGKILL after a deadline),
// runs registered cleanup hooks (such as `segmesh-agent down`) and deletes the
// namespaces it created; it is idempotent and safe to call from a signal handler
// goroutine while other code still uses the lab.
//
// Mesh builds on Lab: a controller host and one host per segmesh node, running the
// real segmesh binaries, plus a probe server (hack/probe) on every node. Policy is a
// deliberately small, independent evaluator of the policy file format, used to
// compute the expected verdict of every cell of the connectivity Matrix, which real
// TCP, UDP and ICMP probes then observe.
//
// Everything here needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
package lab
