#!/usr/bin/env bash
# Fuzzes iotunnel's parsers of outside input with libFuzzer (cargo fuzz), each target for a
# bounded time, and prints the executions per target. Long campaigns run this directly; CI runs
# it through fuzz/ci.sh.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: $FUZZ_SECONDS or 60 s, all targets)
#
# FUZZ_JOBS targets run at once (default 1: each gets a whole core). Stable Rust runs cargo fuzz
# with RUSTC_BOOTSTRAP=1 (libFuzzer's coverage flags are stable -C options; only the sanitizer
# flag is not). The code is safe Rust, so no AddressSanitizer: `--sanitizer none`; the build
# keeps debug assertions, so overflows panic. Inputs start from the checked-in seeds in
# corpus/<target>/ (written by make_corpus.py); what libFuzzer finds goes to grown/<target>/
# (ignored by git). A crash fails the run; its input lands in artifacts/<target>/: replay it
# with `RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none <target> <file>`, fix the code, and
# keep the input as a #[test] next to the code it broke.
#
# Vendor API parsers (issue 14: AWS and Alibaba control-plane request bodies) get a target each
# here once they exist on main: add them to ALL_TARGETS and a seed set to make_corpus.py.
set -euo pipefail
cd "$(dirname "$0")"

ALL_TARGETS=(ws_frame aws_stream aliyun_frame mesh_preamble upgrade_request device_channel api_json)

seconds="${1:-${FUZZ_SECONDS:-60}}"
shift || true
targets=("$@")
[ "${#targets[@]}" -eq 0 ] && targets=("${ALL_TARGETS[@]}")
jobs="${FUZZ_JOBS:-1}"

export RUSTC_BOOTSTRAP=1
# Next to the main build's target directory when there is one (CI reuses it across runs).
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
    export CARGO_TARGET_DIR="$FUZZ_TARGET_DIR"
elif [ -n "${CARGO_TARGET_DIR:-}" ]; then
    export CARGO_TARGET_DIR="$CARGO_TARGET_DIR/fuzz"
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)" >&2
    cargo install cargo-fuzz --locked
fi
# The fuzz crate is its own workspace: start from the main lockfile, so it builds the
# dependency versions the tests ran with.
[ -f Cargo.lock ] || cp ../Cargo.lock Cargo.lock

# Longest useful input per target: a few WebSocket headers; an AWS message past the 64512-byte
# payload limit; an Alibaba frame past its 2 + 2048 + 4096-byte limit; an upgrade request past
# its 4 KiB; a tunnel body past its 4096-byte custom_info.
max_len() {
    case "$1" in
        aws_stream) echo 70000 ;;
        aliyun_frame | api_json) echo 8192 ;;
        upgrade_request) echo 5000 ;;
        *) echo 4096 ;;
    esac
}

echo "fuzz/run.sh: building the targets" >&2
cargo fuzz build --sanitizer none >&2

mkdir -p logs
run_one() {
    local target="$1" log="logs/$1.log"
    mkdir -p "grown/$target" "corpus/$target" "artifacts/$target"
    if cargo fuzz run --sanitizer none "$target" "grown/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$target")" -timeout=10 \
        -print_final_stats=1 >"$log" 2>&1; then
        local execs
        execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
        printf 'fuzz/run.sh: %-16s ok     %12s executions in %ss\n' "$target" "${execs:-?}" "$seconds"
    else
        printf 'fuzz/run.sh: %-16s FAILED (inputs in fuzz/artifacts/%s); last lines of its log:\n' \
            "$target" "$target"
        tail -n 40 "$log"
        return 1
    fi
}

failed=0
running=0
for target in "${targets[@]}"; do
    echo "fuzz/run.sh: $target for ${seconds}s" >&2
    run_one "$target" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || failed=1
        running=$((running - 1))
    fi
done
while [ "$running" -gt 0 ]; do
    wait -n || failed=1
    running=$((running - 1))
done
exit "$failed"
