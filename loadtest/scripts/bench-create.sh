#!/usr/bin/env bash
# Runs the `create` scenario against a fresh release server (fresh data dir per run),
# alternating 8 clients and the 1-client baseline. Usage (from the repo root, after
# `cargo build --release -p iotunnel -p iotunnel-loadtest`):
#   loadtest/scripts/bench-create.sh [RUNS] [OUT_DIR]
# Environment: BENCH_DATA_BASE (parent of the data dirs; must be a real disk, not tmpfs),
# BENCH_BIN_DIR (default target/release), BENCH_CLIENTS (default "8 1"), BENCH_DURATION
# (default 10s), BENCH_DEVICES (default 8), BENCH_QUIET_WAIT (seconds to wait for other
# cargo/rustc/test processes to finish before each run, default 600).
# Per run it prints the CPU seconds used by the server, by the load generator and by everything
# else on the machine; a run where "everything else" used more than BENCH_MAX_OTHER CPU seconds
# (default 0.5) was disturbed by a neighbour: it is kept as *.disturbedN.json and run again.
set -euo pipefail
RUNS=${1:-3}
OUT=${2:-loadtest/results}
BASE=${BENCH_DATA_BASE:-${TMPDIR:-/tmp}}
CLIENTS=${BENCH_CLIENTS:-8 1}
DURATION=${BENCH_DURATION:-10s}
DEVICES=${BENCH_DEVICES:-8}
QUIET_WAIT=${BENCH_QUIET_WAIT:-600}
MAX_OTHER=${BENCH_MAX_OTHER:-0.5}
API=127.0.0.1:18181
BIN=${BENCH_BIN_DIR:-target/release}
mkdir -p "$OUT" "$BASE"
export IOTUNNEL_ADMIN_KEY=${IOTUNNEL_ADMIN_KEY:-bench-admin-key-0123456789abcdef}
hz=$(getconf CLK_TCK)
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
proc_cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
wait_quiet() {
  local waited=0
  while pgrep -x cargo >/dev/null || pgrep -x rustc >/dev/null || pgrep -f 'target/(debug|release)/deps/' >/dev/null; do
    [ "$waited" -ge "$QUIET_WAIT" ] && { echo "   (machine still busy after ${QUIET_WAIT}s; running anyway)"; return; }
    sleep 2; waited=$((waited + 2))
  done
  [ "$waited" -gt 0 ] && echo "   (waited ${waited}s for other builds/tests to finish)"
  return 0
}
run_once() { # CLIENTS RUN -> prints results; returns 3 if the run was disturbed
  local c=$1 i=$2 d srv b0 b1 s0 s1
  wait_quiet
  d=$(mktemp -d -p "$BASE" iotunnel-bench.XXXXXX)
  "$BIN/iotunnel" server --data-dir "$d" --api-addr "$API" \
    --metrics-addr 127.0.0.1:19191 --relay-addr 127.0.0.1:18443 \
    --max-open-tunnels-per-device 100000000 > "$OUT/server-c$c-run$i.log" 2>&1 &
  srv=$!
  for _ in $(seq 50); do curl -fs "http://$API/healthz" >/dev/null && break; sleep 0.1; done
  echo "== run $i clients $c"
  b0=$(busy); s0=$(proc_cpu "$srv")
  /usr/bin/time -f '%U %S' -o "$OUT/lt-time" "$BIN/iotunnel-loadtest" create \
    --api "http://$API" --api-key "$IOTUNNEL_ADMIN_KEY" --clients "$c" --devices "$DEVICES" \
    --duration "$DURATION" --json "$OUT/create-c$c-run$i.json" || echo "run failed: $?"
  b1=$(busy); s1=$(proc_cpu "$srv")
  kill "$srv"; wait "$srv" || true
  rm -rf "$d"
  awk -v b="$((b1 - b0))" -v s="$((s1 - s0))" -v hz="$hz" -v max="$MAX_OTHER" '{
    lt = $1 + $2; tot = b / hz; srv = s / hz; other = tot - srv - lt; if (other < 0) other = 0;
    printf "cpu_s       server %.2f  loadtest %.2f  other %.2f\n", srv, lt, other;
    exit (other > max) ? 3 : 0 }' "$OUT/lt-time" | tee "$OUT/cpu-c$c-run$i.txt"
  return "${PIPESTATUS[0]}"
}
for i in $(seq 1 "$RUNS"); do
  for c in $CLIENTS; do
    for attempt in 1 2 3 4 5 6; do
      if run_once "$c" "$i"; then break; fi
      echo "   (disturbed: other processes used > ${MAX_OTHER} CPU s; kept as *.disturbed$attempt, rerunning)"
      mv "$OUT/create-c$c-run$i.json" "$OUT/create-c$c-run$i.disturbed$attempt.json" 2>/dev/null || true
    done
  done
done
