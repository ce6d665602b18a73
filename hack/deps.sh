#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian/Ubuntu machine:
# iproute2 (ip netns, veth, bridge), nftables (nft, to inspect the table), wireguard-tools
# (wg show), iputils-ping (ICMP probes), procps, iperf3 (make bench: TCP throughput and
# agent memory under load), prometheus (promtool: the metrics test checks both daemons'
# /metrics with `promtool check metrics`); dpkg, lintian, rpm and systemd
# (systemd-analyze, systemd-sysusers) and util-linux (setpriv) for make package and its
# tests in packaging/; chromium (headless, driven by the status page test in test/e2e).
# WireGuard itself needs no install: the agent
# uses kernel WireGuard where present and embedded wireguard-go otherwise.
# Idempotent: does nothing when every tool is already there.
set -euo pipefail

need=()
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v ping >/dev/null || need+=(iputils-ping)
command -v sysctl >/dev/null || need+=(procps)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v promtool >/dev/null || need+=(prometheus)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v lintian >/dev/null || need+=(lintian)
command -v rpm >/dev/null || need+=(rpm)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v setpriv >/dev/null || need+=(util-linux)
command -v chromium >/dev/null || need+=(chromium)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "segmesh: missing ${need[*]}; run as root (sudo) so they can be installed" >&2
    exit 1
  fi
  echo "segmesh: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v go >/dev/null; then
  if [ -x /usr/local/go/bin/go ]; then
    echo "segmesh: Go is at /usr/local/go/bin; add it to PATH" >&2
  else
    echo "segmesh: Go 1.26 or newer is required (https://go.dev/doc/install)" >&2
  fi
  exit 1
fi
