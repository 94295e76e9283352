#!/usr/bin/env bash
# Runs each fuzz target of iotunnel's protocol codecs for a bounded time.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s each, all targets)
#
# cargo-fuzz drives libFuzzer, whose coverage instrumentation needs a nightly toolchain. With no
# nightly the script says so and exits 0 (set FUZZ_REQUIRED=1 to make that a failure). Findings
# land in fuzz/artifacts/<target>/; rerun one with `cargo +nightly fuzz run <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-${FUZZ_SECONDS:-60}}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(ws_frame aws_stream aliyun_frame mesh_preamble)
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: SKIPPED: cargo fuzz needs a nightly toolchain and none is installed" >&2
    echo "fuzz/run.sh: install one with 'rustup toolchain install nightly', then rerun" >&2
    [ "${FUZZ_REQUIRED:-0}" = 1 ] && exit 1
    exit 0
fi

if ! cargo fuzz --help >/dev/null 2>&1; then
    echo "fuzz/run.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)" >&2
    cargo install cargo-fuzz --locked
fi

# Longest useful input per target: a few WebSocket headers; an AWS message past the 64512-byte
# payload limit; an Alibaba frame past its 2 + 2048 + 4096-byte limit.
max_len() {
    case "$1" in
        aws_stream) echo 70000 ;;
        aliyun_frame) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

for target in "${targets[@]}"; do
    echo "fuzz/run.sh: $target for ${seconds}s" >&2
    mkdir -p "corpus/$target"
    # The codecs are safe Rust, so AddressSanitizer adds cost and finds nothing: run without it.
    cargo +nightly fuzz run --sanitizer none "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$target")" -print_final_stats=1
done
