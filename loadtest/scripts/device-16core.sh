#!/usr/bin/env bash
# The 16-core check (issue 12, item 9), in one run sized for a lent machine's 9-minute command
# limit: given prebuilt (stripped) release binaries, it reruns on the machine
#   1. scale.sh        relay throughput and CPU per GiB against the shard count (64 tunnels);
#   2. fairness        per-tunnel min/max throughput of those same runs, by shard count (the
#                      issue's goal: >= 0.8 at 2-16 shards), from their JSON;
#   3. bench-relay.sh  the relay tables: direct, iotunnel ws, wss and the baseline relay at 1,
#                      8 and 64 tunnels (relay pinned to cores 0-1, the loadtest to the rest).
# Needs bash, coreutils (timeout), awk, grep; curl and taskset if present (a bash stand-in
# replaces a missing curl); python3 only for bench-relay's summary table (its JSON stays without).
#
# Usage: OUT=/path/to/results loadtest/scripts/device-16core.sh BIN_DIR
#   BIN_DIR holds iotunnel, iotunnel-loadtest and iotunnel-baseline-relay. OUT defaults to
#   ./device-16core. Results: $OUT/machine.txt, $OUT/scale/ (scale.json, scale-runs/ with every
#   run's JSON, log and chart), $OUT/fairness.md, $OUT/relay/ (summary.md, summary.json, every
#   run's JSON and chart), $OUT/steps.txt (each step's status and seconds) and $OUT/*.log.
# Every step has its own time limit inside a budget for the whole script; a step that fails or
# runs out of time leaves what it wrote, and the next step still runs.
# Environment (defaults fit 16 cores in about 6.5 minutes; the budget stops it before 9):
#   DEVICE_BUDGET_S (510)  seconds for the whole script
#   DEVICE_SCALE_SHARDS ("1 2 4 8 16"), DEVICE_SCALE_REPS (3), DEVICE_SCALE_DURATION (6s)
#   DEVICE_RELAY_RUNS (3), DEVICE_RELAY_DURATION (4s), DEVICE_RELAY_WORKLOADS ("single t8 t64"),
#   DEVICE_RELAY_CONFIGS ("direct plain tls baseline")
# A quick try on a small machine (about a minute):
#   DEVICE_SCALE_SHARDS="1 2" DEVICE_SCALE_REPS=1 DEVICE_SCALE_DURATION=1s DEVICE_RELAY_RUNS=1 \
#     DEVICE_RELAY_DURATION=1s DEVICE_RELAY_WORKLOADS=single OUT=/tmp/d16 \
#     loadtest/scripts/device-16core.sh "$CARGO_TARGET_DIR/release"
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
BIN=$(cd "$1" && pwd)
OUT=${OUT:-./device-16core}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${DEVICE_BUDGET_S:-510}
START=$(date +%s)
for b in iotunnel iotunnel-loadtest iotunnel-baseline-relay; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b" >&2; exit 2; }
done

# A stand-in for `curl -fs URL` (all the scripts ask of it) where curl is missing.
if ! command -v curl >/dev/null; then
  mkdir -p "$OUT/.shim"
  cat > "$OUT/.shim/curl" <<'SH'
#!/usr/bin/env bash
url=${*: -1}; url=${url#http://}; hp=${url%%/*}; path=/${url#*/}
exec 3<>"/dev/tcp/${hp%:*}/${hp#*:}" || exit 7
printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$hp" >&3
head -1 <&3 | grep -q ' 200 '
SH
  chmod +x "$OUT/.shim/curl"
  export PATH="$OUT/.shim:$PATH"
fi

NCPU=$(nproc)
{
  echo "date: $(date -u +%FT%TZ)"
  echo "nproc: $NCPU"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
  echo "taskset: $(command -v taskset >/dev/null && echo yes || echo no)"
  for b in iotunnel iotunnel-loadtest iotunnel-baseline-relay; do
    echo "binary: $b $(stat -c %s "$BIN/$b") bytes, $(sha256sum "$BIN/$b" | cut -c1-16)"
  done
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

left() { echo $((BUDGET - ($(date +%s) - START))); }
: > "$OUT/steps.txt"
# step NAME SECONDS CMD...: runs CMD under a limit of SECONDS (less if the budget has less),
# logging to $OUT/NAME.log; never fails the script.
step() {
  local name=$1 want=$2 t0 rc=0 limit
  shift 2
  limit=$(($(left) - 10))
  [ "$want" -lt "$limit" ] && limit=$want
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, ${limit}s left of the budget" | tee -a "$OUT/steps.txt"
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  local st=ok
  case $rc in 0) ;; 124 | 137) st="timed out" ;; *) st="failed ($rc)" ;; esac
  echo "$name: $st in $(($(date +%s) - t0)) s" | tee -a "$OUT/steps.txt"
  tail -12 "$OUT/$name.log" | sed 's/^/   | /'
  return 0
}

# 1. Shard scaling. scale.sh stops starting runs past its own deadline; ours is the hard stop.
SCALE_LIMIT=200
step scale "$SCALE_LIMIT" env OUT="$OUT/scale" SCALE_BIN_DIR="$BIN" \
  SCALE_SHARDS="${DEVICE_SCALE_SHARDS:-1 2 4 8 16}" SCALE_REPS="${DEVICE_SCALE_REPS:-3}" \
  SCALE_DURATION="${DEVICE_SCALE_DURATION:-6s}" SCALE_DEADLINE_S=$((SCALE_LIMIT - 20)) \
  bash "$HERE/scale.sh"

# 2. Fairness of the scale runs: per-tunnel min/max throughput, by shard count.
fairness() {
  local f s min max
  echo "| shards | rep | per-tunnel min MiB/s | max MiB/s | min/max |"
  echo "|---:|---:|---:|---:|---:|"
  for f in $(ls "$OUT"/scale/scale-runs/throughput-s*-rep*.json 2>/dev/null | sort -V); do
    s=$(basename "$f" .json)
    min=$(grep -A3 '"per_tunnel_bytes_per_sec"' "$f" | awk -F: '/"min"/ {gsub(/[ ,]/, "", $2); print $2}')
    max=$(grep -A3 '"per_tunnel_bytes_per_sec"' "$f" | awk -F: '/"max"/ {gsub(/[ ,]/, "", $2); print $2}')
    [ -n "$min" ] && [ -n "$max" ] || continue
    awk -v n="$s" -v a="$min" -v b="$max" 'BEGIN {
      split(n, p, /-s|-rep/)
      printf "| %s | %s | %.1f | %.1f | %.2f |\n", p[2], p[3], a / 1048576, b / 1048576, (b > 0 ? a / b : 0) }'
  done
}
step fairness 30 bash -c "$(declare -f fairness); OUT='$OUT' fairness > '$OUT/fairness.md'"
cat "$OUT/fairness.md" 2>/dev/null || true

# 3. The relay tables. Relay on 2 pinned cores, loadtest on the rest, as BENCHMARKS.md's
# 16-core tables were measured; unpinned on a machine too small for that.
pin=()
if [ "$NCPU" -ge 8 ] && command -v taskset >/dev/null; then
  pin=(BENCH_SERVER_CPUS=0-1 "BENCH_LOADTEST_CPUS=2-$((NCPU - 1))")
fi
step relay 330 env "${pin[@]}" BENCH_BIN_DIR="$BIN" BENCH_NO_BUILD=1 BENCH_QUIET_WAIT=0 \
  BENCH_MAX_OTHER=2 BENCH_DURATION="${DEVICE_RELAY_DURATION:-4s}" BENCH_WARMUP=1s \
  BENCH_WORKLOADS="${DEVICE_RELAY_WORKLOADS:-single t8 t64}" \
  BENCH_CONFIGS="${DEVICE_RELAY_CONFIGS:-direct plain tls baseline}" \
  bash "$HERE/bench-relay.sh" "${DEVICE_RELAY_RUNS:-3}" "$OUT/relay"
# A relay step cut short still gets its summary from the runs it finished.
if [ ! -s "$OUT/relay/summary.md" ] && command -v python3 >/dev/null; then
  step relay-summary 30 env BENCH_SUMMARY_ONLY=1 \
    BENCH_WORKLOADS="${DEVICE_RELAY_WORKLOADS:-single t8 t64}" \
    BENCH_CONFIGS="${DEVICE_RELAY_CONFIGS:-direct plain tls baseline}" \
    bash "$HERE/bench-relay.sh" "${DEVICE_RELAY_RUNS:-3}" "$OUT/relay"
fi
rm -rf "$OUT/relay/data" "$OUT/.shim"

echo
cat "$OUT/steps.txt"
echo "charts: $(find "$OUT" -name '*.png' | wc -l); done in $(($(date +%s) - START)) s; results in $OUT"
