#!/bin/sh
# postrm of both packages (.deb "remove"/"purge", .rpm %postun with 0): reloads
# systemd after the unit file went away. State directories, the configuration the
# operator edited (until purge, for .deb) and the segmesh user stay: they hold keys,
# the CA and the store, which an uninstall must not destroy.
set -e
case "$1" in
remove | purge | 0) ;;
*) exit 0 ;;
esac
if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
	systemctl daemon-reload || true
fi
exit 0
