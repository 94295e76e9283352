#!/usr/bin/env bash
# Tunnel churn (issue 6 target: at least 2000 create+pair+close cycles/s). Each run starts a
# fresh plaintext release server twice: once for `create` alone (the API's create rate with as
# many clients: the baseline, since a cycle's create step can go no faster), once for `churn`.
# Usage, from the repo root after `cargo build --release -p iotunnel -p iotunnel-loadtest`:
#   loadtest/scripts/bench-churn.sh [RUNS=3] [OUT_DIR=loadtest/results/churn]
# Environment: BENCH_CONCURRENCY (32), BENCH_DEVICES (8), BENCH_DURATION (10s),
# BENCH_FAMILY (aws), BENCH_PROCS (1); see lib-bench.sh for the rest.
set -euo pipefail
RUNS=${1:-3}
OUT=${2:-loadtest/results/churn}
. "$(dirname "$0")/lib-bench.sh"
mkdir -p "$OUT"
C=${BENCH_CONCURRENCY:-32}
DEV=${BENCH_DEVICES:-8}
DUR=${BENCH_DURATION:-10s}
API="--api http://127.0.0.1:18711 --api-key $IOTUNNEL_ADMIN_KEY"
create() {
  start_server 18711 18713 "$OUT/server-create-run$1.log"
  # shellcheck disable=SC2086
  "$BIN/iotunnel-loadtest" create $API --clients "$C" --devices "$DEV" --duration "$DUR" \
    --json "$OUT/create-run$1.json" > "$OUT/create-run$1.txt" || { stop_server; return 1; }
  stop_server
}
churn() {
  start_server 18711 18713 "$OUT/server-churn-run$1.log"
  # shellcheck disable=SC2086
  "$BIN/iotunnel-loadtest" churn $API --plaintext --concurrency "$C" --devices "$DEV" \
    --duration "$DUR" --family "${BENCH_FAMILY:-aws}" --procs "${BENCH_PROCS:-1}" --quiet \
    --relay-pid "$SRV" --json "$OUT/churn-run$1.json" > "$OUT/churn-run$1.txt" || { stop_server; return 1; }
  stop_server
}
for i in $(seq 1 "$RUNS"); do
  wait_quiet
  echo "== run $i"
  if [ $((i % 2)) -eq 1 ]; then create "$i"; churn "$i"; else churn "$i"; create "$i"; fi
  grep -h "cycles \|^create " "$OUT/churn-run$i.txt" "$OUT/create-run$i.txt" || true
done
# `create` reports ops_per_sec, `churn` cycles_per_sec: put both under one name for the table.
python3 - "$OUT" <<'PY'
import glob, json, sys
for f in glob.glob(f"{sys.argv[1]}/*-run*.json"):
    v = json.load(open(f))
    v["per_sec"] = v.get("cycles_per_sec", v.get("ops_per_sec"))
    json.dump(v, open(f, "w"), indent=1)
PY
BASELINE=create summarize "$OUT" per_sec latency_us.p50 latency_us.p99
