#!/usr/bin/env bash
# What the relay's metrics cost the data plane (issue 5: "under 2% overhead"): relay throughput
# and relay CPU per GiB with the hot-path recording on (`--relay-metrics on`, the default:
# per-frame byte/frame counters and forwarding-latency histogram) against off, in the same run.
#
# For each round (RUNS, default 3) and workload, it starts a fresh
#   iotunnel server --relay-plaintext --shards $SHARDS --relay-metrics on|off
# and runs
#   iotunnel-loadtest throughput $WORKLOAD --plaintext --duration $DURATION --warmup $WARMUP
#     --relay-pid <server pid> --json ...
# on and off back to back, the order alternating from round to round (on,off / off,on / ...) so
# a drift in the machine's load does not favour one. After each run it reads
# iotunnel_relay_frames_total from /metrics, to show the knob really was on or off.
#
# Workloads: "bulk" (--tunnels 8 --size 65536: the usual throughput test) and "small"
# (--tunnels 8 --size 1024: 64x the frames per byte, where a per-frame cost shows most).
#
# Usage: loadtest/scripts/bench-metrics.sh [RUNS] [OUT_DIR]   (OUT_DIR default
#        /work/scratch/bench-metrics); builds release first unless BENCH_NO_BUILD=1.
# Environment: BENCH_DURATION (10s), BENCH_WARMUP (1s), BENCH_SHARDS (2), BENCH_WORKLOADS
# ("bulk small"), BENCH_BIN_DIR (use the binaries there, no cargo).
# Results: $OUT/<workload>-<on|off>-run<i>.json (the loadtest's JSON), $OUT/summary.md
# (medians, min-max, and the paired off/on ratios with the overhead in %), printed at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${1:-3}
OUT=${2:-/work/scratch/bench-metrics}
DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-1s}
SHARDS=${BENCH_SHARDS:-2}
WORKLOADS=${BENCH_WORKLOADS:-bulk small}
# Ports of their own, so this can run beside bench-relay.sh and scale.sh.
API=127.0.0.1:18481
METRICS=127.0.0.1:19491
RELAY=127.0.0.1:18743
export IOTUNNEL_ADMIN_KEY=${IOTUNNEL_ADMIN_KEY:-bench-metrics-admin-key-0123456789}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

. "$ROOT/loadtest/scripts/lib-binaries.sh"
bench_binaries "$ROOT" "$OUT" iotunnel iotunnel-loadtest

workload_flags() {
  case $1 in
    bulk) echo "--tunnels 8 --streams 1 --size 65536" ;;
    small) echo "--tunnels 8 --streams 1 --size 1024" ;;
    *) echo "unknown workload $1" >&2; exit 2 ;;
  esac
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "git: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?') (+ uncommitted changes: $(cd "$ROOT" && git status --porcelain 2>/dev/null | wc -l) paths)"
  echo "runs: $RUNS, duration $DURATION, warm-up $WARMUP, shards $SHARDS, workloads: $WORKLOADS"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

wait_http() { # URL
  for _ in $(seq 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "server did not come up: $1" >&2
  return 1
}
json_num() { # FILE KEY -> first numeric value of "KEY":
  grep -m1 "\"$2\":" "$1" | sed -E 's/.*: *([-0-9.eE+]+).*/\1/'
}

run_case() { # WORKLOAD MODE(on|off) RUN
  local w=$1 m=$2 i=$3
  local json="$OUT/$w-$m-run$i.json" log="$OUT/$w-$m-run$i.log" d srv frames
  d=$(mktemp -d -p "$OUT" data.XXXXXX)
  rm -f "$json"
  "$BIN/iotunnel" server --data-dir "$d" --api-addr "$API" --metrics-addr "$METRICS" \
    --relay-addr "$RELAY" --shards "$SHARDS" --max-open-tunnels-per-device 100000000 \
    --relay-plaintext --relay-metrics "$m" > "$OUT/$w-$m-run$i.server.log" 2>&1 &
  srv=$!
  wait_http "http://$API/healthz"
  # shellcheck disable=SC2046
  if ! "$BIN/iotunnel-loadtest" throughput $(workload_flags "$w") --duration "$DURATION" \
      --warmup "$WARMUP" --api "http://$API" --api-key "$IOTUNNEL_ADMIN_KEY" --plaintext \
      --relay-pid "$srv" --label "$w-$m" --json "$json" > "$log" 2>&1; then
    tail -5 "$log"
    kill "$srv"; wait "$srv" || true
    return 1
  fi
  frames=$(curl -fs "http://$METRICS/metrics" |
    awk '/^iotunnel_relay_frames_total\{/ { n += $2 } END { printf "%d", n }')
  kill "$srv"; wait "$srv" || true
  rm -rf "$d"
  echo "$frames" > "$OUT/$w-$m-run$i.frames"
  awk -v w="$w" -v m="$m" -v i="$i" -v b="$(json_num "$json" bytes_per_sec)" \
    -v g="$(json_num "$json" cpu_seconds_per_gib)" -v o="$(json_num "$json" other_cpu_seconds)" \
    -v f="$frames" 'BEGIN {
      printf "   %-5s metrics %-3s run %s: %8.1f MiB/s  relay %s CPU s/GiB  frames counted %s  (other procs %s CPU s)\n",
        w, m, i, b / 1048576, g, f, o }'
  # The knob must do what it says: frames counted with on, none with off.
  if [ "$m" = off ] && [ "$frames" != 0 ]; then echo "   --relay-metrics off still counted $frames frames" >&2; return 1; fi
  if [ "$m" = on ] && [ "$frames" = 0 ]; then echo "   --relay-metrics on counted no frames" >&2; return 1; fi
  return 0
}

for i in $(seq 1 "$RUNS"); do
  for w in $WORKLOADS; do
    echo "== round $i, workload $w"
    if [ $((i % 2)) = 1 ]; then order="on off"; else order="off on"; fi
    for m in $order; do
      run_case "$w" "$m" "$i" || { echo "   (failed; retrying once)"; run_case "$w" "$m" "$i"; }
    done
  done
done

python3 - "$OUT" "$RUNS" "$WORKLOADS" <<'PY'
import json, os, statistics, sys
out, runs, workloads = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
MiB = 1 << 20
def load(w, m, i):
    p = os.path.join(out, f"{w}-{m}-run{i}.json")
    return json.load(open(p)) if os.path.exists(p) else None
def spread(xs):
    xs = [x for x in xs if x is not None]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None
def fmt(s, scale=1.0, prec=1):
    return "-" if not s else f"{s['median']/scale:.{prec}f} ({s['min']/scale:.{prec}f}-{s['max']/scale:.{prec}f})"
lines, summary = [], {}
for w in workloads:
    rows = {m: [load(w, m, i) for i in range(1, runs + 1)] for m in ("on", "off")}
    bps = lambda r: r["bytes_per_sec"]
    cpg = lambda r: (r.get("relay_cpu") or {}).get("cpu_seconds_per_gib")
    def paired(f, a, b):
        xs = []
        for ra, rb in zip(rows[a], rows[b]):
            if ra and rb and f(ra) is not None and f(rb):
                xs.append(f(ra) / f(rb))
        return spread(xs)
    tput = paired(bps, "off", "on")     # > 1: metrics cost throughput
    cpu = paired(cpg, "on", "off")      # > 1: metrics cost relay CPU per GiB
    summary[w] = {"throughput_off_over_on": tput, "relay_cpu_per_gib_on_over_off": cpu}
    lines.append(f"\n### workload {w}: {rows['on'][0]['size'] if rows['on'][0] else '?'} B frames, {rows['on'][0]['tunnels'] if rows['on'][0] else '?'} tunnels\n")
    lines.append("| --relay-metrics | MiB/s, median (min-max) | relay CPU s/GiB | per-run MiB/s |")
    lines.append("|---|---|---|---|")
    for m in ("on", "off"):
        rs = rows[m]
        per_run = ", ".join(f"{r['bytes_per_sec']/MiB:.0f}" if r else "-" for r in rs)
        lines.append(f"| {m} | {fmt(spread([bps(r) for r in rs if r]), MiB)} | {fmt(spread([cpg(r) for r in rs if r]), 1, 3)} | {per_run} |")
    if tput:
        lines.append(f"\nthroughput off/on (paired by round): {fmt(tput, 1, 4)}: overhead {100*(tput['median']-1):+.2f}% "
                     f"(rounds: {100*(tput['min']-1):+.2f}% to {100*(tput['max']-1):+.2f}%)")
    if cpu:
        lines.append(f"relay CPU per GiB on/off (paired by round): {fmt(cpu, 1, 4)}: {100*(cpu['median']-1):+.2f}% CPU")
text = "\n".join(lines) + "\n"
open(os.path.join(out, "summary.md"), "w").write(open(os.path.join(out, "machine.txt")).read() + text)
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(text)
PY
echo "results: $OUT/summary.md, $OUT/summary.json"
