#!/bin/sh
# Builds what the footprint table measures.
#
#   cross/footprint.sh builds     edge-agent in the release and gateway profiles for x86_64,
#                                 aarch64 and armv7, and a static x86_64 musl gateway build
#                                 (targets whose toolchain is missing are skipped); then run
#                                 target/release/bench-footprint
#
# Each gateway build takes several minutes on two cores (fat LTO, one codegen unit).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
export CARGO_INCREMENTAL=0

linker_for() {
    case "$1" in
        aarch64-*) echo aarch64-linux-gnu-gcc ;;
        armv7-*) echo arm-linux-gnueabihf-gcc ;;
        *) echo cc ;;
    esac
}

case "${1:-}" in
builds)
    for target in x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
        if ! command -v "$(linker_for "$target")" >/dev/null 2>&1; then
            echo "$target skipped: no $(linker_for "$target")"
            continue
        fi
        rustup target add "$target" >/dev/null 2>&1 || true
        for profile in release gateway; do
            if [ "$target" = x86_64-unknown-linux-gnu ] && [ "$profile" = release ]; then
                # The benchmarks' own build (bench-footprint included).
                cargo build -q --release --workspace --bins
            elif [ "$target" = x86_64-unknown-linux-gnu ]; then
                cargo build -q --profile "$profile" -p edge-agent --bin edge-agent
            else
                cargo build -q --profile "$profile" -p edge-agent --bin edge-agent \
                    --target "$target" --config "$here/config.toml"
            fi
            echo "built $target $profile"
        done
    done
    # A static build for gateways whose C library is old or missing (musl-tools).
    if command -v musl-gcc >/dev/null 2>&1 && rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1; then
        cargo build -q --profile gateway -p edge-agent --bin edge-agent \
            --target x86_64-unknown-linux-musl --config "$here/config.toml"
        echo "built x86_64-unknown-linux-musl gateway"
    else
        echo "x86_64-unknown-linux-musl skipped: no musl-gcc or no Rust target"
    fi
    ;;
*)
    sed -n '2,10p' "$0" >&2
    exit 2
    ;;
esac
