#!/bin/sh
# segmesh-agent postinst (.deb "configure", .rpm %post): enables the service on a
# first install but does not start it, since it needs a controller and a join token
# first (/etc/segmesh/agent.yaml, /etc/segmesh/token). An upgrade restarts the
# service only if it was running. Works in a scratch root: dpkg --root DIR
# --force-script-chrootless sets DPKG_ROOT=DIR, and only offline systemctl --root
# calls are made there.
set -e
root="${DPKG_ROOT:-}"
case "$1" in
configure) first=; [ -z "$2" ] && first=1 ;; # deb: $2 is the old version on upgrade
1) first=1 ;;                                 # rpm: first install
2) first= ;;                                  # rpm: upgrade
*) exit 0 ;;
esac
command -v systemctl >/dev/null 2>&1 || exit 0
if [ -n "$root" ]; then
	[ -n "$first" ] && systemctl --root="$root" --quiet enable segmesh-agent.service
	exit 0
fi
[ -n "$first" ] && systemctl --quiet enable segmesh-agent.service
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload
	[ -z "$first" ] && systemctl try-restart segmesh-agent.service
fi
if [ -n "$first" ]; then
	echo "segmesh-agent: enabled but not started; set controller and token-file in /etc/segmesh/agent.yaml," >&2
	echo "  put the join token in /etc/segmesh/token (mode 0600), then: systemctl start segmesh-agent" >&2
fi
exit 0
