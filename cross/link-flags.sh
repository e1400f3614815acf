#!/bin/sh
# Prints the cargo --config argument that packs a gateway build's relative relocations.
#
#   cargo build --profile gateway -p edge-agent --no-default-features \
#       --target T --config cross/config.toml $(sh cross/link-flags.sh T)
#
# The agent is position-independent, so the dynamic loader patches every pointer in its
# read-only data (vtables, operator and string tables) at start: one 24-byte relocation
# each, 0.63 MB of the aarch64 binary. Packed (DT_RELR, `-z pack-relative-relocs`) they
# take a few kilobytes. The gateway's glibc must be 2.36 or newer (Debian 12, Ubuntu
# 22.10); the binary names the need (GLIBC_ABI_DT_RELR), so an older loader refuses it by
# that name rather than starting it half relocated.
#
# Rust links x86_64 Linux with its own lld, which packs them. Debian 12's GNU ld packs them
# on x86_64 only, so the cross targets link with that same lld through the target's gcc
# (`-fuse-ld=lld`, found in the toolchain's gcc-ld folder). Other targets: prints nothing.
set -eu
target=$1
pack='"-Clink-arg=-Wl,-z,pack-relative-relocs"'
case "$target" in
    x86_64-unknown-linux-gnu)
        echo "--config=target.$target.rustflags=[$pack]"
        ;;
    aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf)
        host=$(rustc -vV | sed -n 's/^host: //p')
        lld_dir="$(rustc --print sysroot)/lib/rustlib/$host/bin/gcc-ld"
        [ -x "$lld_dir/ld.lld" ] || { echo "no ld.lld in $lld_dir" >&2; exit 1; }
        echo "--config=target.$target.rustflags=[\"-Clink-arg=-fuse-ld=lld\",\"-Clink-arg=-B$lld_dir\",$pack]"
        ;;
esac
