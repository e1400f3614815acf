#!/bin/sh
# Packages a built edge-agent for gateways: a .deb (dpkg) and a tarball with install.sh.
#
#   cross/package.sh BINARY DEB_ARCH [OUT_DIR]
#   e.g. cross/package.sh target/aarch64-unknown-linux-gnu/gateway/edge-agent arm64 target/packages
#
# DEB_ARCH is Debian's name: amd64, arm64 or armhf. The package holds /usr/bin/edge-agent,
# the systemd unit spillway-agent.service (dedicated user, hardening, restart on failure),
# the default /etc/spillway/agent.toml (a conffile: upgrades keep local edits) and creates
# /var/lib/spillway for the agent's state.
set -eu
binary=$1
arch=$2
out=${3:-target/packages}
here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -n 1)
[ -n "$version" ] || { echo "no version in Cargo.toml" >&2; exit 1; }
[ -x "$binary" ] || { echo "$binary is not an executable" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

root="$work/deb"
install -D -m 0755 "$binary" "$root/usr/bin/edge-agent"
install -D -m 0644 "$here/package/spillway-agent.service" "$root/lib/systemd/system/spillway-agent.service"
install -D -m 0644 "$here/package/agent.toml" "$root/etc/spillway/agent.toml"
install -d "$root/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$here/package/$script" "$root/DEBIAN/$script"
done
echo /etc/spillway/agent.toml > "$root/DEBIAN/conffiles"
size=$(du -sk "$root" | cut -f1)
# The newest glibc the binary needs: its newest GLIBC_x.y symbol version, and 2.36 when it
# packs its relocations (GLIBC_ABI_DT_RELR, see link-flags.sh).
glibc=$(readelf -V "$binary" | sed -n 's/.*Name: GLIBC_\([0-9.]*\|ABI_DT_RELR\) .*/\1/p' |
    sed 's/^ABI_DT_RELR$/2.36/' | sort -uV | tail -n 1)
[ -n "$glibc" ] || { echo "$binary names no glibc version (readelf -V)" >&2; exit 1; }
cat > "$root/DEBIAN/control" <<CONTROL
Package: spillway-agent
Version: $version
Architecture: $arch
Maintainer: Spillway <spillway@localhost>
Installed-Size: $size
Depends: libc6 (>= $glibc), adduser | passwd
Section: net
Priority: optional
Description: Spillway edge agent
 Windows MQTT sensor streams, runs ONNX models locally with tract, publishes the
 results, and spills work to cloud replicas over QUIC before its queue overflows.
CONTROL
deb="$out/spillway-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null

tarname="spillway-agent-$version-$arch"
mkdir -p "$work/$tarname"
cp "$binary" "$work/$tarname/edge-agent"
cp "$here/package/spillway-agent.service" "$here/package/agent.toml" "$here/package/install.sh" "$work/$tarname/"
tar -C "$work" -czf "$out/$tarname.tar.gz" "$tarname"
echo "$deb"
echo "$out/$tarname.tar.gz"
