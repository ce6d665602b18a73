#!/usr/bin/env bash
# demo.sh: the segmesh demo. Builds the binaries into a temporary directory, then
# runs the lab driver (hack/lab), which creates a controller host and five hosts as
# network namespaces on a shared underlay bridge, enrolls one agent per host,
# applies examples/policy.yaml, waits until every node enforces it, prints
# `segmesh status` and the connectivity matrix (policy vs real TCP/UDP/ICMP probes
# over the WireGuard overlay), and removes every namespace, interface and process it
# made, also on Ctrl-C or SIGTERM.
#
# Usage: sudo hack/demo.sh [-keep] [-v] [-nat] [-ha] [-policy FILE]   (flags go to
# hack/lab; -nat puts nodes behind NAT routers, -ha runs three controllers on a
# three-member etcd cluster and kills one, see hack/lab)
# Needs root, Go, iproute2, nftables, wireguard-tools (wg) and iputils-ping; it
# installs nothing. Exit status: 0 when every matrix cell matches, non-zero otherwise.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $(id -u) -ne 0 ]]; then
	echo "demo.sh: needs root (network namespaces, TUN, nftables); run: sudo $0" >&2
	exit 1
fi
missing=()
for tool in go ip nft wg ping sysctl; do
	command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
	echo "demo.sh: missing tools: ${missing[*]} (install golang, iproute2, nftables, wireguard-tools, iputils-ping, procps)" >&2
	exit 1
fi

bin=$(mktemp -d "${TMPDIR:-/tmp}/segmesh-demo-bin.XXXXXX")
pid=
cleanup() {
	if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	fi
	rm -rf "$bin"
}
trap cleanup EXIT

echo "==> building segmesh-controller, segmesh-agent, segmesh, probe, etcd and the lab driver into $bin"
go build -o "$bin/" ./cmd/segmesh-controller ./cmd/segmesh-agent ./cmd/segmesh ./hack/probe ./hack/etcd ./hack/lab

# Run the driver in the background so that a SIGTERM to this script reaches it
# (bash defers traps while a foreground child runs); the driver removes the lab
# on SIGINT/SIGTERM and exits 130.
"$bin/lab" -bin "$bin" "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM
status=0
while :; do
	wait "$pid" && status=0 || status=$?
	kill -0 "$pid" 2>/dev/null || break
done
pid=
exit "$status"
