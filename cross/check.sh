#!/bin/sh
# Builds the agent for a gateway target as gateways get it (NNEF only, no ONNX, packed
# relocations) and runs it under qemu-user-static: the unit tests of the agent and of `models`,
# then a smoke run (load the sample models, run each on a window, exit 0).
#
#   cross/check.sh aarch64-unknown-linux-gnu     (or armv7-unknown-linux-gnueabihf)
#
# Needs the Rust target (rustup target add …), Debian's cross linker
# (gcc-aarch64-linux-gnu / gcc-arm-linux-gnueabihf) and qemu-user-static. Says what is
# missing and exits 2 when it cannot run.
set -eu
target=$1
here=$(cd "$(dirname "$0")" && pwd)
case "$target" in
    aarch64-*) gcc=aarch64-linux-gnu-gcc qemu=qemu-aarch64-static sysroot=/usr/aarch64-linux-gnu ;;
    armv7-*) gcc=arm-linux-gnueabihf-gcc qemu=qemu-arm-static sysroot=/usr/arm-linux-gnueabihf ;;
    *) echo "unknown gateway target $target" >&2; exit 2 ;;
esac
for tool in "$gcc" "$qemu"; do
    command -v "$tool" >/dev/null 2>&1 || { echo "cross check of $target skipped: no $tool"; exit 2; }
done
rustup target list --installed 2>/dev/null | grep -qx "$target" ||
    rustup target add "$target" >/dev/null 2>&1 ||
    { echo "cross check of $target skipped: the Rust target cannot be added"; exit 2; }

cd "$here/.."
# Plain debug builds: no debug info, nothing kept for incremental rebuilds. The dev profile
# optimises tract and the crypto crates so that tests run at speed; this check is about
# building and running on the target, and leaving them unoptimised makes it take 1.5 minutes
# instead of 4 on two cores.
export CARGO_INCREMENTAL=0 CARGO_PROFILE_DEV_DEBUG=0 QEMU_LD_PREFIX="$sysroot"
link=$(sh "$here/link-flags.sh" "$target")
unoptimised=""
for crate in tract-core tract-linalg tract-nnef tract-data ndarray ring rustls quinn-proto; do
    unoptimised="$unoptimised --config profile.dev.package.$crate.opt-level=0"
done
build() {
    # shellcheck disable=SC2086 # $unoptimised is a list of arguments
    cargo "$@" -p edge-agent --no-default-features --target "$target" --config "$here/config.toml" \
        "$link" $unoptimised
}
# The agent's unit tests and those of `models`, whose queue and runner the agent's threads
# share on the gateway.
tests=$(build test -p spillway-models --lib --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
[ "$(echo "$tests" | grep -c .)" = 2 ] || { build test -p spillway-models --lib --no-run; exit 1; }
for t in $tests; do "$qemu" "$t" -q; done
build build --bin edge-agent
agent="target/$target/debug/edge-agent"
config=$(mktemp)
trap 'rm -f "$config"' EXIT
cat >"$config" <<CONFIG
[agent]
site = "cross"
gateway = "smoke"
[[models]]
name = "vibration-ae"
zoo = "vibration-ae"
[[models]]
name = "bearing-cnn"
zoo = "bearing-cnn"
[sensors]
default_model = "vibration-ae"
CONFIG
version=$("$qemu" "$agent" --version)
echo "$version"
echo "$version" | grep -q "reads NNEF)" ||
    { echo "the gateway build should read NNEF only" >&2; exit 1; }
"$qemu" "$agent" --config "$config" --check-config
echo "cross check of $target passed"
