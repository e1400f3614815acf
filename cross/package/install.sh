#!/bin/sh
# Installs the Spillway edge agent from this folder on a gateway without dpkg.
#   sudo ./install.sh            (DESTDIR=/some/root ./install.sh installs under a root)
# Then: systemctl daemon-reload && systemctl enable --now spillway-agent
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=${DESTDIR:-}
# On the gateway itself, find out now whether this build runs here (architecture, C library).
if [ -z "$root" ] && ! out=$("$here/edge-agent" --version 2>&1); then
    echo "this edge-agent does not run on this machine, nothing installed:" >&2
    echo "$out" >&2
    exit 1
fi
install -D -m 0755 "$here/edge-agent" "$root/usr/bin/edge-agent"
install -D -m 0644 "$here/spillway-agent.service" "$root/lib/systemd/system/spillway-agent.service"
if [ -e "$root/etc/spillway/agent.toml" ]; then
    echo "keeping the existing $root/etc/spillway/agent.toml"
else
    install -D -m 0644 "$here/agent.toml" "$root/etc/spillway/agent.toml"
fi
install -d -m 0750 "$root/var/lib/spillway"
if [ -z "$root" ]; then
    getent passwd spillway >/dev/null ||
        useradd --system --home-dir /var/lib/spillway --shell /usr/sbin/nologin spillway
    chown spillway:spillway /var/lib/spillway
fi
echo "installed; start with: systemctl daemon-reload && systemctl enable --now spillway-agent"
