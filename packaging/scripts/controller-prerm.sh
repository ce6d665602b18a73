#!/bin/sh
# segmesh-controller prerm (.deb "remove", .rpm %preun with 0): stops and disables
# the service. The data directory /var/lib/segmesh/controller (CA, store, operator
# credential) is kept. An upgrade leaves the service alone.
set -e
root="${DPKG_ROOT:-}"
case "$1" in
remove | 0) ;;
*) exit 0 ;;
esac
command -v systemctl >/dev/null 2>&1 || exit 0
if [ -n "$root" ]; then
	systemctl --root="$root" --quiet disable segmesh-controller.service
	exit 0
fi
if [ -d /run/systemd/system ]; then
	systemctl stop segmesh-controller.service || true
fi
systemctl --quiet disable segmesh-controller.service || true
exit 0
