#!/bin/sh
# segmesh-controller postinst (.deb "configure", .rpm %post): creates the system user
# segmesh (systemd-sysusers with the package's sysusers.d file, else useradd), gives
# it the data directory /var/lib/segmesh/controller (0700), and enables the service
# on a first install without starting it (review /etc/segmesh/controller.yaml
# first). An upgrade restarts the service only if it was running. Works in a
# scratch root: dpkg --root DIR --force-script-chrootless sets DPKG_ROOT=DIR; users
# are then created in DIR/etc/passwd and only offline systemctl --root calls are made.
set -e
root="${DPKG_ROOT:-}"
case "$1" in
configure) first=; [ -z "$2" ] && first=1 ;;
1) first=1 ;;
2) first= ;;
*) exit 0 ;;
esac

if command -v systemd-sysusers >/dev/null 2>&1; then
	systemd-sysusers --root="${root:-/}" segmesh-controller.conf
elif ! grep -q '^segmesh:' "$root/etc/passwd"; then
	if [ -n "$root" ]; then
		useradd --root "$root" --system --user-group --home-dir /var/lib/segmesh/controller --no-create-home --shell /usr/sbin/nologin --comment "segmesh controller" segmesh
	else
		useradd --system --user-group --home-dir /var/lib/segmesh/controller --no-create-home --shell /usr/sbin/nologin --comment "segmesh controller" segmesh
	fi
fi
# Numeric IDs from the target root's own user database, so that a scratch root is
# not resolved against the host's.
uid=$(awk -F: '$1 == "segmesh" { print $3 }' "$root/etc/passwd")
gid=$(awk -F: '$1 == "segmesh" { print $3 }' "$root/etc/group")
if [ -z "$uid" ] || [ -z "$gid" ]; then
	echo "segmesh-controller: user or group segmesh missing in $root/etc/passwd or $root/etc/group after creating it" >&2
	exit 1
fi
chown "$uid:$gid" "$root/var/lib/segmesh/controller"
chmod 0700 "$root/var/lib/segmesh/controller"

command -v systemctl >/dev/null 2>&1 || exit 0
if [ -n "$root" ]; then
	[ -n "$first" ] && systemctl --root="$root" --quiet enable segmesh-controller.service
	exit 0
fi
[ -n "$first" ] && systemctl --quiet enable segmesh-controller.service
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload
	[ -z "$first" ] && systemctl try-restart segmesh-controller.service
fi
if [ -n "$first" ]; then
	echo "segmesh-controller: enabled but not started; review /etc/segmesh/controller.yaml, then: systemctl start segmesh-controller" >&2
fi
exit 0
