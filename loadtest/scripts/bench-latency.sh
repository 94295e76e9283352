#!/usr/bin/env bash
# Added latency at 1000 concurrent tunnels, 64 B at 10k msg/s in all (issue 6 target: p99 at
# most 200 µs over direct). Each run measures the direct pairing (the baseline) and the relay
# (fresh plaintext release server) back to back, alternating which goes first.
# Usage, from the repo root after `cargo build --release -p iotunnel -p iotunnel-loadtest`:
#   loadtest/scripts/bench-latency.sh [RUNS=3] [OUT_DIR=loadtest/results/latency]
# Environment: BENCH_TUNNELS (1000), BENCH_RATE (10000), BENCH_SIZE (64), BENCH_DURATION (10s),
# BENCH_WARMUP (2s), BENCH_FAMILY (aws), BENCH_PROCS (1); see lib-bench.sh for the rest.
set -euo pipefail
RUNS=${1:-3}
OUT=${2:-loadtest/results/latency}
. "$(dirname "$0")/lib-bench.sh"
mkdir -p "$OUT"
W="--tunnels ${BENCH_TUNNELS:-1000} --rate ${BENCH_RATE:-10000} --size ${BENCH_SIZE:-64}
   --duration ${BENCH_DURATION:-10s} --warmup ${BENCH_WARMUP:-2s} --family ${BENCH_FAMILY:-aws}
   --procs ${BENCH_PROCS:-1} --quiet"
direct() {
  # shellcheck disable=SC2086
  "$BIN/iotunnel-loadtest" latency --direct $W --json "$OUT/direct-run$1.json" > "$OUT/direct-run$1.txt"
}
relay() {
  start_server 18701 18703 "$OUT/server-run$1.log"
  # shellcheck disable=SC2086
  "$BIN/iotunnel-loadtest" latency --api http://127.0.0.1:18701 --api-key "$IOTUNNEL_ADMIN_KEY" \
    --plaintext --devices 4 --relay-pid "$SRV" $W --json "$OUT/relay-run$1.json" > "$OUT/relay-run$1.txt" \
    || { stop_server; return 1; }
  stop_server
}
for i in $(seq 1 "$RUNS"); do
  wait_quiet
  echo "== run $i"
  if [ $((i % 2)) -eq 1 ]; then direct "$i"; relay "$i"; else relay "$i"; direct "$i"; fi
  grep -h -A1 "rtt (us)" "$OUT/direct-run$i.txt" "$OUT/relay-run$i.txt" | grep -v rtt
done
BASELINE=direct summarize "$OUT" latency_us.p50 latency_us.p90 latency_us.p99 latency_us.p999 latency_us.max messages_per_sec
