#!/usr/bin/env bash
# Relay throughput and relay CPU per GiB (issue 3, issue 6), all in one run:
#   (a) direct    : the loadtest's peers connected to each other, no relay (the baseline);
#   (b) plain     : iotunnel relay, ws (--relay-plaintext), --shards $BENCH_SHARDS (default 2);
#   (c) tls       : iotunnel relay, wss (the generated CA), same shards;
#   (d) baseline  : iotunnel-baseline-relay (tokio + tokio-tungstenite, ws);
#   (e) baseline-tls: the same with wss (tokio-rustls, the relay's TLS configuration); not in
#       the default BENCH_CONFIGS (add it: BENCH_CONFIGS="direct plain tls baseline baseline-tls").
# Each for two workloads: "single" (--tunnels 1 --streams 1 --size 65536) and "t8"
# (--tunnels 8 --streams 1 --size 65536); "t64" (--tunnels 64 --size 16384, scale.sh's load: CPU
# per GiB at many tunnels per shard) when named in BENCH_WORKLOADS. Every (workload, config) runs RUNS times (default 3),
# the configs of one round back to back in a rotating order, each on a fresh server or baseline
# relay. (b) to (e) record the relay's CPU with --relay-pid.
#
# Usage (from anywhere; it builds release first unless BENCH_NO_BUILD=1):
#   loadtest/scripts/bench-relay.sh [RUNS] [OUT_DIR]      (OUT_DIR default /work/scratch/bench-relay)
# Environment: BENCH_DURATION (10s), BENCH_WARMUP (1s), BENCH_SHARDS (2), BENCH_WORKLOADS
# ("single t8"), BENCH_CONFIGS ("direct plain tls baseline"), BENCH_MAX_OTHER (busy CPU seconds
# beyond the relay's, the loadtest's and ksoftirqd's during a run before it counts as disturbed
# and is rerun; default 1.0),
# BENCH_QUIET_WAIT (seconds to wait for builds, tests and other benchmarks to finish before each
# run; default 900), BENCH_DATA_BASE (parent of the server data dirs; default $OUT/data),
# BENCH_BIN_DIR (use the iotunnel, iotunnel-loadtest and iotunnel-baseline-relay binaries there:
# no cargo, no copy; for a machine without the toolchain), BENCH_SERVER_CPUS and
# BENCH_LOADTEST_CPUS (taskset CPU lists, e.g. 0-1 and 2-15, to keep the load generator off the
# relay's cores on a bigger machine; unset = no pinning).
# Results: $OUT/<workload>-<config>-run<i>.json (the loadtest's JSON), $OUT/summary.md and
# $OUT/summary.json (medians, min-max, paired ratios), printed at the end. A slot whose every try
# was disturbed keeps its least disturbed try (listed in $OUT/notes.txt).
# BENCH_SUMMARY_ONLY=1 only rebuilds the summary from the JSON files already in OUT_DIR.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${1:-3}
OUT=${2:-/work/scratch/bench-relay}
DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-1s}
SHARDS=${BENCH_SHARDS:-2}
WORKLOADS=${BENCH_WORKLOADS:-single t8}
CONFIGS=${BENCH_CONFIGS:-direct plain tls baseline}
MAX_OTHER=${BENCH_MAX_OTHER:-1.0}
QUIET_WAIT=${BENCH_QUIET_WAIT:-900}
# BENCH_PORT_OFFSET (default 0) moves every port, for two runs side by side on one machine.
PORT_OFFSET=${BENCH_PORT_OFFSET:-0}
API=127.0.0.1:$((18281 + PORT_OFFSET))
METRICS=127.0.0.1:$((19291 + PORT_OFFSET))
RELAY=127.0.0.1:$((18543 + PORT_OFFSET))
BASELINE=127.0.0.1:$((18600 + PORT_OFFSET))
export IOTUNNEL_ADMIN_KEY=${IOTUNNEL_ADMIN_KEY:-bench-relay-admin-key-0123456789}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DATA_BASE=${BENCH_DATA_BASE:-$OUT/data}
mkdir -p "$DATA_BASE"

SUMMARY_ONLY=${BENCH_SUMMARY_ONLY:-0}
if [ "$SUMMARY_ONLY" = 1 ]; then
  BIN=/nonexistent
else
  . "$ROOT/loadtest/scripts/lib-binaries.sh"
  bench_binaries "$ROOT" "$OUT" iotunnel iotunnel-loadtest iotunnel-baseline-relay
fi
SRV_PIN=()
LT_PIN=()
[ -n "${BENCH_SERVER_CPUS:-}" ] && SRV_PIN=(taskset -c "$BENCH_SERVER_CPUS")
[ -n "${BENCH_LOADTEST_CPUS:-}" ] && LT_PIN=(taskset -c "$BENCH_LOADTEST_CPUS")

workload_flags() {
  case $1 in
    single) echo "--tunnels 1 --streams 1 --size 65536" ;;
    t8) echo "--tunnels 8 --streams 1 --size 65536" ;;
    t64) echo "--tunnels 64 --streams 1 --size 16384" ;;
    *) echo "unknown workload $1" >&2; exit 2 ;;
  esac
}

[ "$SUMMARY_ONLY" = 1 ] || {
  echo "date: $(date -u +%FT%TZ)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "rustc: $(rustc --version 2>/dev/null || echo '?')"
  echo "git: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?') (+ uncommitted changes: $(cd "$ROOT" && git status --porcelain 2>/dev/null | wc -l) paths)"
  echo "runs: $RUNS, duration $DURATION, warm-up $WARMUP, shards $SHARDS"
  echo "pinning: server ${BENCH_SERVER_CPUS:-none}, loadtest ${BENCH_LOADTEST_CPUS:-none}"
} > "$OUT/machine.txt"
[ "$SUMMARY_ONLY" = 1 ] || cat "$OUT/machine.txt"

others_busy() {
  pgrep -x cargo >/dev/null || pgrep -x rustc >/dev/null ||
    pgrep -f 'target/(debug|release)/deps/' >/dev/null ||
    pgrep -f 'bench-create.sh' >/dev/null ||
    { pgrep -f 'iotunnel-loadtest' | grep -vx "$$" | grep -q .; }
}
wait_quiet() {
  local waited=0
  while others_busy; do
    if [ "$waited" -ge "$QUIET_WAIT" ]; then
      echo "   (machine still busy after ${QUIET_WAIT}s; running anyway)"
      return
    fi
    sleep 5
    waited=$((waited + 5))
  done
  if [ "$waited" -gt 0 ]; then echo "   (waited ${waited}s for other builds/tests/benchmarks)"; fi
  return 0
}
wait_http() { # URL
  for _ in $(seq 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "server did not come up: $1" >&2
  return 1
}
wait_port() { # host:port
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on $1" >&2
  return 1
}
json_num() { # FILE KEY -> first numeric value of "KEY":
  grep -m1 "\"$2\":" "$1" | sed -E 's/.*: *([-0-9.eE+]+).*/\1/'
}

run_case() { # WORKLOAD CONFIG RUN -> 0 ok, 3 disturbed, 1 failed
  local w=$1 c=$2 i=$3 json="$OUT/$1-$2-run$3.json" log="$OUT/$1-$2-run$3.log"
  local flags d srv=""
  flags=$(workload_flags "$w")
  local lt=("${LT_PIN[@]}" "$BIN/iotunnel-loadtest" throughput $flags --duration "$DURATION" --warmup "$WARMUP"
    --json "$json" --label "$w-$c")
  rm -f "$json"
  case $c in
    direct)
      "${lt[@]}" --direct > "$log" 2>&1 || { tail -3 "$log"; return 1; }
      ;;
    plain | tls)
      d=$(mktemp -d -p "$DATA_BASE" server.XXXXXX)
      local plain=()
      [ "$c" = plain ] && plain=(--relay-plaintext)
      "${SRV_PIN[@]}" "$BIN/iotunnel" server --data-dir "$d" --api-addr "$API" --metrics-addr "$METRICS" \
        --relay-addr "$RELAY" --shards "$SHARDS" --max-open-tunnels-per-device 100000000 \
        "${plain[@]}" > "$OUT/$w-$c-run$i.server.log" 2>&1 &
      srv=$!
      wait_http "http://$API/healthz"
      local tlsflags=(--plaintext)
      [ "$c" = tls ] && tlsflags=(--ca-file "$d/tls/ca.pem")
      "${lt[@]}" --api "http://$API" --api-key "$IOTUNNEL_ADMIN_KEY" "${tlsflags[@]}" \
        --relay-pid "$srv" > "$log" 2>&1 || { tail -3 "$log"; kill "$srv"; wait "$srv" || true; return 1; }
      kill "$srv"; wait "$srv" || true
      rm -rf "$d"
      ;;
    baseline | baseline-tls)
      local btls=() ltls=()
      if [ "$c" = baseline-tls ]; then
        btls=(--tls-dir "$DATA_BASE/baseline-tls")
        ltls=(--baseline-tls --ca-file "$DATA_BASE/baseline-tls/tls/ca.pem")
      fi
      "${SRV_PIN[@]}" "$BIN/iotunnel-baseline-relay" --listen "$BASELINE" "${btls[@]}" > "$OUT/$w-$c-run$i.server.log" 2>&1 &
      srv=$!
      wait_port "$BASELINE"
      "${lt[@]}" --baseline "$BASELINE" "${ltls[@]}" --relay-pid "$srv" > "$log" 2>&1 ||
        { tail -3 "$log"; kill "$srv"; wait "$srv" || true; return 1; }
      kill "$srv"; wait "$srv" || true
      ;;
  esac
  local bps cpg other
  bps=$(json_num "$json" bytes_per_sec)
  cpg=$(json_num "$json" cpu_seconds_per_gib || true)
  other=$(json_num "$json" other_cpu_seconds)
  awk -v w="$w" -v c="$c" -v i="$i" -v b="$bps" -v g="${cpg:--}" -v o="$other" 'BEGIN {
    printf "   %-6s %-8s run %s: %8.1f MiB/s  relay %s CPU s/GiB  (other procs %s CPU s)\n",
      w, c, i, b / 1048576, g, o }'
  if awk -v o="$other" -v m="$MAX_OTHER" 'BEGIN { exit !(o > m) }'; then return 3; fi
  return 0
}

keep_least_disturbed() { # WORKLOAD CONFIG RUN
  local best="" best_other="" f o
  for f in "$OUT/$1-$2-run$3".disturbed*.json; do
    [ -e "$f" ] || continue
    o=$(json_num "$f" other_cpu_seconds)
    if [ -z "$best" ] || awk -v a="$o" -v b="$best_other" 'BEGIN { exit !(a < b) }'; then
      best=$f; best_other=$o
    fi
  done
  if [ -n "$best" ]; then
    cp "$best" "$OUT/$1-$2-run$3.json"
    echo "$1 $2 run $3: every try disturbed; kept $(basename "$best") (other $best_other CPU s)" |
      tee -a "$OUT/notes.txt"
  fi
}

read -r -a CFG <<< "$CONFIGS"
[ "$SUMMARY_ONLY" = 1 ] && RUNS_TO_DO=0 || RUNS_TO_DO=$RUNS
for i in $(seq 1 "$RUNS_TO_DO"); do
  for w in $WORKLOADS; do
    echo "== round $i, workload $w"
    n=${#CFG[@]}
    for k in $(seq 0 $((n - 1))); do
      c=${CFG[$(((k + i - 1) % n))]}
      for attempt in 1 2 3 4; do
        wait_quiet
        rc=0
        run_case "$w" "$c" "$i" || rc=$?
        if [ "$rc" = 0 ]; then break; fi
        if [ "$rc" = 3 ]; then
          echo "   (disturbed: other processes used > $MAX_OTHER CPU s; kept as .disturbed$attempt, rerunning)"
          mv "$OUT/$w-$c-run$i.json" "$OUT/$w-$c-run$i.disturbed$attempt.json"
        else
          echo "   (failed; rerunning)"
        fi
        if [ "$attempt" = 4 ]; then
          echo "   giving up on $w $c run $i"
          keep_least_disturbed "$w" "$c" "$i"
        fi
      done
    done
  done
done

python3 - "$OUT" "$RUNS" "$WORKLOADS" "$CONFIGS" <<'PY'
import json, os, statistics, sys
out, runs, workloads, configs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
def load(w, c, i):
    p = os.path.join(out, f"{w}-{c}-run{i}.json")
    return json.load(open(p)) if os.path.exists(p) else None
def spread(xs):
    xs = [x for x in xs if x is not None]
    if not xs: return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
def fmt(s, unit="", scale=1.0, prec=1):
    if not s: return "-"
    return f"{s['median']/scale:.{prec}f}{unit} ({s['min']/scale:.{prec}f}-{s['max']/scale:.{prec}f})"
summary = {"runs": runs, "workloads": {}}
lines = []
MiB = 1 << 20
for w in workloads:
    rows = {c: [load(w, c, i) for i in range(1, runs + 1)] for c in configs}
    res = {}
    for c, rs in rows.items():
        res[c] = {
            "bytes_per_sec": spread([r["bytes_per_sec"] for r in rs if r]),
            "relay_cpu_s_per_gib": spread([r["relay_cpu"]["cpu_seconds_per_gib"] for r in rs if r and r.get("relay_cpu")]),
            "relay_cores_busy": spread([r["relay_cpu"]["cores_busy"] for r in rs if r and r.get("relay_cpu")]),
            "loadtest_cpu_s_per_gib": spread([r["loadtest_cpu_seconds"] / (r["bytes"] / 2**30) for r in rs if r and r["bytes"]]),
            "per_tunnel_min_over_max": spread([r["per_tunnel_bytes_per_sec"]["min"] / r["per_tunnel_bytes_per_sec"]["max"] for r in rs if r and r["per_tunnel_bytes_per_sec"]["max"]]),
        }
    def paired(f, a, b):
        xs = []
        for i in range(runs):
            ra, rb = rows.get(a, [None]*runs)[i], rows.get(b, [None]*runs)[i]
            if ra and rb:
                va, vb = f(ra), f(rb)
                if va is not None and vb:
                    xs.append(va / vb)
        return spread(xs)
    bps = lambda r: r["bytes_per_sec"]
    cpu = lambda r: r["relay_cpu"]["cpu_seconds_per_gib"] if r.get("relay_cpu") else None
    ratios = {
        "plain_over_direct": paired(bps, "plain", "direct"),
        "tls_over_direct": paired(bps, "tls", "direct"),
        "baseline_over_direct": paired(bps, "baseline", "direct"),
        "plain_over_baseline_throughput": paired(bps, "plain", "baseline"),
        "tls_over_plain_throughput": paired(bps, "tls", "plain"),
        "cpu_per_gib_plain_over_baseline": paired(cpu, "plain", "baseline"),
        "cpu_per_gib_tls_over_baseline": paired(cpu, "tls", "baseline"),
        "cpu_per_gib_tls_over_plain": paired(cpu, "tls", "plain"),
        "tls_over_baseline_tls_throughput": paired(bps, "tls", "baseline-tls"),
        "cpu_per_gib_tls_over_baseline_tls": paired(cpu, "tls", "baseline-tls"),
        "cpu_per_gib_baseline_tls_over_baseline": paired(cpu, "baseline-tls", "baseline"),
    }
    summary["workloads"][w] = {"configs": res, "paired_ratios": ratios}
    lines.append(f"\n### workload {w}\n")
    lines.append("| config | MiB/s, median (min-max) | relay CPU s/GiB | relay cores busy | loadtest CPU s/GiB | per-tunnel min/max |")
    lines.append("|---|---|---|---|---|---|")
    for c in configs:
        r = res[c]
        lines.append(f"| {c} | {fmt(r['bytes_per_sec'], '', MiB)} | {fmt(r['relay_cpu_s_per_gib'], '', 1, 3)} | {fmt(r['relay_cores_busy'], '', 1, 2)} | {fmt(r['loadtest_cpu_s_per_gib'], '', 1, 3)} | {fmt(r['per_tunnel_min_over_max'], '', 1, 2)} |")
    lines.append("\n| paired ratio (same round) | median (min-max) |")
    lines.append("|---|---|")
    for k, v in ratios.items():
        if v: lines.append(f"| {k} | {fmt(v, '', 1, 3)} |")
text = "\n".join(lines) + "\n"
open(os.path.join(out, "summary.md"), "w").write(open(os.path.join(out, "machine.txt")).read() + text)
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(text)
PY
echo "results: $OUT/summary.md, $OUT/summary.json"
