#!/usr/bin/env bash
# Idle tunnel pairs held (issue 6 target: as many as the fd limit allows, ~9,000 pairs under a
# 20,000-file cap, at most 16 KiB relay RSS per pair). Each run holds N idle pairs through a
# fresh plaintext release iotunnel server, then through the plain tokio-tungstenite baseline
# relay (iotunnel-baseline-relay, its soft fd limit raised to the hard one), alternating the
# order, and reads each relay's RSS and open files before and after from /proc.
# Usage, from the repo root after `cargo build --release -p iotunnel -p iotunnel-loadtest`:
#   loadtest/scripts/bench-idle.sh [RUNS=3] [OUT_DIR=loadtest/results/idle]
# Environment: BENCH_TUNNELS (9000), BENCH_HOLD (10s), BENCH_PROCS (2: the loadtest holds 2
# files per pair), BENCH_FAMILY (aws); see lib-bench.sh for the rest.
set -euo pipefail
RUNS=${1:-3}
OUT=${2:-loadtest/results/idle}
. "$(dirname "$0")/lib-bench.sh"
mkdir -p "$OUT"
W="--tunnels ${BENCH_TUNNELS:-9000} --duration ${BENCH_HOLD:-10s} --procs ${BENCH_PROCS:-2} --quiet"
relay() {
  start_server 18721 18723 "$OUT/server-run$1.log"
  # shellcheck disable=SC2086
  "$BIN/iotunnel-loadtest" idle --api http://127.0.0.1:18721 --api-key "$IOTUNNEL_ADMIN_KEY" \
    --plaintext --devices 8 --family "${BENCH_FAMILY:-aws}" --relay-pid "$SRV" $W \
    --json "$OUT/relay-run$1.json" > "$OUT/relay-run$1.txt" || { stop_server; return 1; }
  stop_server
}
baseline() {
  (ulimit -n "$(ulimit -Hn)"; exec "$BIN/iotunnel-baseline-relay" --listen 127.0.0.1:18725) \
    > "$OUT/baseline-run$1.log" 2>&1 &
  local b=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/18725) 2>/dev/null && break; sleep 0.1; done
  # shellcheck disable=SC2086
  "$BIN/iotunnel-loadtest" idle --baseline 127.0.0.1:18725 --relay-pid "$b" $W \
    --json "$OUT/baseline-run$1.json" > "$OUT/baseline-run$1.txt" || true
  kill "$b"; wait "$b" 2>/dev/null || true
}
for i in $(seq 1 "$RUNS"); do
  wait_quiet
  echo "== run $i"
  if [ $((i % 2)) -eq 1 ]; then relay "$i"; baseline "$i"; else baseline "$i"; relay "$i"; fi
  grep -h "^held\|^rss\|^fds" "$OUT/relay-run$i.txt" "$OUT/baseline-run$i.txt" || true
done
BASELINE=baseline summarize "$OUT" pairs_held rss_per_pair_bytes fds_per_pair setup_seconds
