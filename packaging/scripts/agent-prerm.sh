#!/bin/sh
# segmesh-agent prerm (.deb "remove", .rpm %preun with 0): stops and disables the
# service. Stopping leaves the nftables table inet segmesh in place (the host fails
# closed); "segmesh-agent down --state-dir /var/lib/segmesh-agent" before removing
# the package takes the host off the overlay. An upgrade leaves the service alone.
set -e
root="${DPKG_ROOT:-}"
case "$1" in
remove | 0) ;;
*) exit 0 ;;
esac
command -v systemctl >/dev/null 2>&1 || exit 0
if [ -n "$root" ]; then
	systemctl --root="$root" --quiet disable segmesh-agent.service
	exit 0
fi
if [ -d /run/systemd/system ]; then
	systemctl stop segmesh-agent.service || true
fi
systemctl --quiet disable segmesh-agent.service || true
echo "segmesh-agent: stopped; the nftables table inet segmesh stays (fail closed)." >&2
echo "  Run 'segmesh-agent down --state-dir /var/lib/segmesh-agent' before removing the package to remove it," >&2
echo "  or 'nft delete table inet segmesh' afterwards. The state directory /var/lib/segmesh-agent is kept." >&2
exit 0
