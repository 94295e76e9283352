#!/usr/bin/env bash
# Regenerates every benchmark table and chart of BENCHMARKS.md on one machine (issue 12, item 8):
# runs each bench-*.sh script and scale.sh in turn, each into its own folder under OUT_DIR, and
# collects what they made: every summary table (summary.md, scale.json) into OUT_DIR/index.md,
# every chart (the PNG the loadtest draws beside each JSON) into OUT_DIR/charts/.
#
# Usage (from anywhere; builds release once unless BENCH_NO_BUILD=1 or BENCH_BIN_DIR is set):
#   loadtest/scripts/bench-all.sh [RUNS=3] [OUT_DIR=/work/scratch/bench-all]
# Environment:
#   BENCH_ALL_SCRIPTS  which to run, in order (default: "relay metrics scrape latency idle churn
#                      create fleet e2e scale"; each NAME is bench-NAME.sh, `scale` is scale.sh)
#   BENCH_ALL_TIMEOUT  seconds one script may run before it is stopped (default 5400)
#   BENCH_BIN_DIR      prebuilt iotunnel, iotunnel-loadtest and iotunnel-baseline-relay (no cargo)
# Every other BENCH_* and SCALE_* variable passes through to the scripts (their own headers say
# what they take); the scripts' defaults are the sizes BENCHMARKS.md reports. A script that
# fails or times out is marked so in index.md and the others still run; the exit status is
# non-zero when any failed. Full defaults take hours on a 2-core machine: for a quick look, e.g.
#   BENCH_ALL_SCRIPTS="relay latency idle" BENCH_DURATION=2s BENCH_TUNNELS=100 \
#     loadtest/scripts/bench-all.sh 1 /tmp/bench-all
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${1:-3}
OUT=${2:-/work/scratch/bench-all}
SCRIPTS=${BENCH_ALL_SCRIPTS:-relay metrics scrape latency idle churn create fleet e2e scale}
STEP_TIMEOUT=${BENCH_ALL_TIMEOUT:-5400}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"

# One set of binaries for every script: built once, copied out of the target folder so that
# another build cannot swap them mid-run.
if [ -z "${BENCH_BIN_DIR:-}" ]; then
  if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    cargo build --release -p iotunnel -p iotunnel-loadtest
  fi
  target=${CARGO_TARGET_DIR:-$ROOT/target}
  mkdir -p "$OUT/bin"
  for b in iotunnel iotunnel-loadtest iotunnel-baseline-relay; do
    cp "$target/release/$b" "$OUT/bin/$b.new" && mv "$OUT/bin/$b.new" "$OUT/bin/$b"
  done
  export BENCH_BIN_DIR=$OUT/bin
fi
BENCH_BIN_DIR=$(cd "$BENCH_BIN_DIR" && pwd)
export BENCH_BIN_DIR BENCH_NO_BUILD=1 SCALE_BIN_DIR=${SCALE_BIN_DIR:-$BENCH_BIN_DIR}

STATUS=()
failed=0
for name in $SCRIPTS; do
  dir=$OUT/$name
  log=$OUT/$name.log
  mkdir -p "$dir"
  case $name in
    scale) cmd=(env OUT="$dir" "$ROOT/loadtest/scripts/scale.sh") ;;
    # bench-fleet.sh takes the part first.
    fleet) cmd=("$ROOT/loadtest/scripts/bench-fleet.sh" all "$RUNS" "$dir") ;;
    *)
      script=$ROOT/loadtest/scripts/bench-$name.sh
      [ -x "$script" ] || [ -f "$script" ] || { echo "no such script: $script" >&2; exit 2; }
      cmd=(bash "$script" "$RUNS" "$dir")
      ;;
  esac
  echo "== $name: ${cmd[*]}  (log: $log)"
  start=$(date +%s)
  rc=0
  timeout --kill-after=30 "$STEP_TIMEOUT" "${cmd[@]}" > "$log" 2>&1 || rc=$?
  secs=$(($(date +%s) - start))
  case $rc in
    0) st=ok ;;
    124 | 137) st="TIMED OUT after ${STEP_TIMEOUT}s"; failed=1 ;;
    *) st="FAILED (exit $rc)"; failed=1 ;;
  esac
  echo "   $st in ${secs}s"
  [ "$rc" = 0 ] || tail -5 "$log" | sed 's/^/   | /'
  STATUS+=("$name|$st|$secs")
done

# Charts: one folder, named after the script and the run.
mkdir -p "$OUT/charts"
find "$OUT" -path "$OUT/charts" -prune -o -name '*.png' -print | while read -r png; do
  rel=${png#"$OUT"/}
  cp "$png" "$OUT/charts/$(echo "$rel" | tr '/' '-')"
done

{
  echo "# Benchmarks, $(date -u +%FT%TZ)"
  echo
  echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'),"
  echo "kernel $(uname -r); git $(git rev-parse --short HEAD 2>/dev/null || echo '?'); runs $RUNS."
  echo
  echo "| script | status | seconds |"
  echo "|---|---|---:|"
  for s in "${STATUS[@]}"; do
    IFS='|' read -r n st secs <<< "$s"
    echo "| $n | $st | $secs |"
  done
  for s in "${STATUS[@]}"; do
    n=${s%%|*}
    echo
    echo "## $n"
    found=0
    for f in $(find "$OUT/$n" -name 'summary.md' | sort); do
      echo
      echo "From \`${f#"$OUT"/}\`:"
      echo
      cat "$f"
      found=1
    done
    if [ -f "$OUT/$n/scale.json" ]; then
      echo
      echo '```'
      sed -n '/^shards  bytes/,/^done in/p' "$OUT/$n.log"
      echo '```'
      found=1
    fi
    if [ "$found" = 0 ]; then
      echo
      echo "No summary table; the end of \`$n.log\`:"
      echo
      echo '```'
      tail -30 "$OUT/$n.log"
      echo '```'
    fi
    for png in $(find "$OUT/charts" -name "$n-*.png" | sort); do
      echo
      echo "![${png##*/}](charts/${png##*/})"
    done
  done
} > "$OUT/index.md"
echo "tables and charts: $OUT/index.md, $OUT/charts/ ($(find "$OUT/charts" -name '*.png' | wc -l) charts)"
exit "$failed"
