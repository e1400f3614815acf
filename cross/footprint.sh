#!/bin/sh
# Builds what the footprint table measures.
#
#   cross/footprint.sh builds     edge-agent in the release, gateway and gateway-small profiles
#                                 for x86_64, aarch64 and armv7, and a static x86_64 musl gateway build
#                                 (targets whose toolchain is missing are skipped); gateway
#                                 builds leave ONNX out (--no-default-features: NNEF only)
#                                 and pack relocations (link-flags.sh);
#                                 then run target/release/bench-footprint
#   cross/footprint.sh settings [PATTERN]
#                                 what each setting of the gateway profile is worth: x86_64
#                                 gateway builds with one setting changed at a time, each in
#                                 its own target folder (target/settings/), and a table of
#                                 stripped sizes (10-25 minutes per build on two cores);
#                                 PATTERN (grep -E) picks the variants, e.g. 'lto|panic'
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

# Gateway builds read NNEF only (tract-onnx stays out of them) and pack their relative
# relocations (cross/link-flags.sh).
gateway_flags() {
    case "$1" in gateway*) echo --no-default-features "$(sh "$here/link-flags.sh" "$2")" ;; esac
}

case "${1:-}" in
builds)
    for target in x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
        if ! command -v "$(linker_for "$target")" >/dev/null 2>&1; then
            echo "$target skipped: no $(linker_for "$target")"
            continue
        fi
        rustup target add "$target" >/dev/null 2>&1 || true
        for profile in release gateway gateway-small; do
            if [ "$target" = x86_64-unknown-linux-gnu ] && [ "$profile" = release ]; then
                # The benchmarks' own build (bench-footprint included).
                cargo build -q --release --workspace --bins
            elif [ "$target" = x86_64-unknown-linux-gnu ]; then
                cargo build -q --profile "$profile" -p edge-agent --bin edge-agent \
                    $(gateway_flags "$profile" "$target")
            else
                cargo build -q --profile "$profile" -p edge-agent --bin edge-agent \
                    $(gateway_flags "$profile" "$target") --target "$target" --config "$here/config.toml"
            fi
            echo "built $target $profile"
        done
    done
    # A static build for gateways whose C library is old or missing (musl-tools).
    if command -v musl-gcc >/dev/null 2>&1 && rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1; then
        cargo build -q --profile gateway -p edge-agent --bin edge-agent --no-default-features \
            --target x86_64-unknown-linux-musl --config "$here/config.toml"
        echo "built x86_64-unknown-linux-musl gateway"
    else
        echo "x86_64-unknown-linux-musl skipped: no musl-gcc or no Rust target"
    fi
    ;;
settings)
    out=target/settings
    mkdir -p "$out"
    # name|--config values (none: the gateway profile as it is; -: relocations not packed)
    variants='gateway as it is|
relocations not packed|-
opt-level = 3|profile.gateway.opt-level=3
opt-level = "z"|profile.gateway.opt-level="z"
lto = false|profile.gateway.lto=false
codegen-units = 16|profile.gateway.codegen-units=16
panic = "unwind"|profile.gateway.panic="unwind"'
    base=""
    echo "| gateway profile with | stripped size | vs gateway | build time |"
    echo "| --- | --- | --- | --- |"
    # An optional pattern picks variants (the unchanged profile is always built, as the base).
    only=${2:-}
    echo "$variants" | while IFS='|' read -r name setting; do
        if [ -n "$only" ] && [ -n "$setting" ] && ! echo "$name" | grep -Eq -- "$only"; then
            continue
        fi
        dir="$out/$(echo "$name" | tr -c 'a-z0-9\n' '-')"
        set -- --profile gateway -p edge-agent --bin edge-agent --no-default-features \
            --target-dir "$dir"
        case "$setting" in
            -) ;;
            '') set -- "$@" "$(sh "$here/link-flags.sh" x86_64-unknown-linux-gnu)" ;;
            *) set -- "$@" "$(sh "$here/link-flags.sh" x86_64-unknown-linux-gnu)" --config "$setting" ;;
        esac
        start=$(date +%s)
        cargo build -q "$@"
        took=$(($(date +%s) - start))
        strip -o "$dir/edge-agent.stripped" "$dir/gateway/edge-agent"
        size=$(stat -c %s "$dir/edge-agent.stripped")
        [ -z "$base" ] && base=$size
        awk -v n="$name" -v s="$size" -v b="$base" -v t="$took" \
            'BEGIN { printf "| %s | %.2f MB | %+.1f %% | %d s |\n", n, s / 1e6, (s / b - 1) * 100, t }'
    done
    ;;
*)
    sed -n '2,15p' "$0" >&2
    exit 2
    ;;
esac
