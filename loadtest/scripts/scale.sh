#!/usr/bin/env bash
# Relay throughput against the shard count, for a many-core machine (written for 16 cores).
# Self-contained: no cargo, no python; needs bash, awk, coreutils (curl and taskset if present), and the release binaries
# `iotunnel` and `iotunnel-loadtest` (looked for in $SCALE_BIN_DIR, ./target/release,
# <this script>/../../target/release, then next to this script).
#
# For each shard count S in $SCALE_SHARDS (default "1 2 4 8 16") and each of $SCALE_REPS
# repetitions (default 3), it starts a fresh `iotunnel server --relay-plaintext --shards S` and
# runs `iotunnel-loadtest throughput --tunnels 64 --size 16384 --duration 10s --plaintext
# --relay-pid PID`. With taskset, the server is pinned to cores 0..S-1 and the loadtest to the
# others, so the load generator does not share cores with the relay; when S leaves fewer than
# $SCALE_MIN_LT_CORES (default 4) cores, both run unpinned on all cores (marked "shared").
# A deadline (SCALE_DEADLINE_S, default 420 s) skips the runs that would not finish in time,
# so the whole script ends in under 8 minutes.
#
# Usage: loadtest/scripts/scale.sh            (results in $OUT/scale.json when OUT is set,
#                                              and the raw runs in $OUT/scale-runs/)
# Other knobs: SCALE_TUNNELS (64), SCALE_SIZE (16384), SCALE_DURATION (10s), SCALE_WARMUP (1s).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SHARDS_LIST=${SCALE_SHARDS:-1 2 4 8 16}
REPS=${SCALE_REPS:-3}
TUNNELS=${SCALE_TUNNELS:-64}
SIZE=${SCALE_SIZE:-16384}
DURATION=${SCALE_DURATION:-10s}
WARMUP=${SCALE_WARMUP:-1s}
DEADLINE=${SCALE_DEADLINE_S:-420}
MIN_LT=${SCALE_MIN_LT_CORES:-4}
API=127.0.0.1:18381
METRICS=127.0.0.1:19391
RELAY=127.0.0.1:18643
export IOTUNNEL_ADMIN_KEY=${IOTUNNEL_ADMIN_KEY:-scale-admin-key-0123456789abcdef}

BIN=""
for d in "${SCALE_BIN_DIR:-}" ./target/release "$HERE/../../target/release" "$HERE"; do
  if [ -n "$d" ] && [ -x "$d/iotunnel" ] && [ -x "$d/iotunnel-loadtest" ]; then BIN=$(cd "$d" && pwd); break; fi
done
if [ -z "$BIN" ]; then
  echo "cannot find the iotunnel and iotunnel-loadtest binaries (set SCALE_BIN_DIR)" >&2
  exit 2
fi
NCPU=$(nproc)
HAVE_TASKSET=0
command -v taskset >/dev/null && HAVE_TASKSET=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/iotunnel-scale.XXXXXX")
RUNS_DIR=${OUT:+$OUT/scale-runs}
RUNS_DIR=${RUNS_DIR:-$WORK/runs}
mkdir -p "$RUNS_DIR"
SRV=""
cleanup() {
  if [ -n "$SRV" ]; then kill "$SRV" 2>/dev/null || true; wait "$SRV" 2>/dev/null || true; fi
  rm -rf "$WORK/data"
}
trap cleanup EXIT
START=$(date +%s)
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//; s/"/'"'"'/g')
echo "scale: $NCPU cores ($CPU_MODEL), kernel $(uname -r), taskset $HAVE_TASKSET, binaries $BIN"
echo "       --tunnels $TUNNELS --size $SIZE --duration $DURATION, shards: $SHARDS_LIST, reps $REPS"

json_num() { # FILE KEY -> first numeric value of "KEY":
  grep -m1 "\"$2\":" "$1" 2>/dev/null | sed -E 's/.*: *([-0-9.eE+]+).*/\1/'
}
wait_http() { # URL (curl), else just the port (bash /dev/tcp)
  local hp=${1#http://}; hp=${hp%%/*}
  for _ in $(seq 100); do
    if command -v curl >/dev/null; then
      curl -fs "$1" >/dev/null 2>&1 && return 0
    else
      (exec 3<>"/dev/tcp/${hp%:*}/${hp#*:}") 2>/dev/null && sleep 0.3 && return 0
    fi
    sleep 0.1
  done
  return 1
}
median() { sort -g | awk '{v[NR]=$1} END {m = NR == 0 ? 0 : (NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2); printf "%.3f\n", m}'; }

RESULTS=()   # "shards rep pinned bytes_per_sec cpu_s_per_gib relay_cores lt_cpu"
for rep in $(seq 1 "$REPS"); do
  for s in $SHARDS_LIST; do
    now=$(date +%s)
    if [ $((now - START + 25)) -gt "$DEADLINE" ]; then
      echo "   skipping shards $s rep $rep: deadline ${DEADLINE}s"
      continue
    fi
    srv_pin=(); lt_pin=(); pinned=shared
    if [ "$HAVE_TASKSET" = 1 ] && [ $((NCPU - s)) -ge "$MIN_LT" ]; then
      srv_pin=(taskset -c "0-$((s - 1))")
      lt_pin=(taskset -c "$s-$((NCPU - 1))")
      pinned="server 0-$((s - 1)), loadtest $s-$((NCPU - 1))"
    fi
    mkdir -p "$WORK/data"
    d=$(mktemp -d "$WORK/data/s$s.XXXXXX")
    "${srv_pin[@]}" "$BIN/iotunnel" server --data-dir "$d" --api-addr "$API" \
      --metrics-addr "$METRICS" --relay-addr "$RELAY" --relay-plaintext --shards "$s" \
      --max-open-tunnels-per-device 100000000 > "$RUNS_DIR/server-s$s-rep$rep.log" 2>&1 &
    SRV=$!
    if ! wait_http "http://$API/healthz"; then
      echo "   shards $s: the server did not come up (see $RUNS_DIR/server-s$s-rep$rep.log)" >&2
      kill "$SRV" 2>/dev/null || true; wait "$SRV" 2>/dev/null || true; SRV=""
      continue
    fi
    json="$RUNS_DIR/throughput-s$s-rep$rep.json"
    if timeout 60 "${lt_pin[@]}" "$BIN/iotunnel-loadtest" throughput --api "http://$API" \
      --api-key "$IOTUNNEL_ADMIN_KEY" --plaintext --tunnels "$TUNNELS" --size "$SIZE" \
      --duration "$DURATION" --warmup "$WARMUP" --relay-pid "$SRV" --label "shards-$s" \
      --json "$json" > "$RUNS_DIR/throughput-s$s-rep$rep.log" 2>&1; then
      bps=$(json_num "$json" bytes_per_sec)
      cpg=$(json_num "$json" cpu_seconds_per_gib)
      cores=$(json_num "$json" cores_busy)
      ltcpu=$(json_num "$json" loadtest_cpu_seconds)
      RESULTS+=("$s $rep $bps $cpg $cores $ltcpu $(echo "$pinned" | tr ' ' '_')")
      awk -v s="$s" -v r="$rep" -v b="$bps" -v c="$cpg" -v k="$cores" -v p="$pinned" 'BEGIN {
        printf "   shards %2d rep %d: %9.1f MiB/s  relay %.2f cores, %.3f CPU s/GiB  (%s)\n",
          s, r, b / 1048576, k, c, p }'
    else
      echo "   shards $s rep $rep: the loadtest failed:"; tail -3 "$RUNS_DIR/throughput-s$s-rep$rep.log"
    fi
    kill "$SRV" 2>/dev/null || true; wait "$SRV" 2>/dev/null || true; SRV=""
    rm -rf "$d"
  done
done

echo
echo "shards  bytes/s (median)   MiB/s   x 1 shard  relay cores  CPU s/GiB  runs"
base=""
summary_json=""
for s in $SHARDS_LIST; do
  rows=$(printf '%s\n' "${RESULTS[@]:-}" | awk -v s="$s" '$1 == s')
  n=$(printf '%s' "$rows" | grep -c . || true)
  [ "$n" = 0 ] && { printf '%6s  %s\n' "$s" "no runs"; continue; }
  bps=$(printf '%s\n' "$rows" | awk '{print $3}' | median)
  cpg=$(printf '%s\n' "$rows" | awk '{print $4}' | median)
  cores=$(printf '%s\n' "$rows" | awk '{print $5}' | median)
  [ -z "$base" ] && base=$bps
  awk -v s="$s" -v b="$bps" -v base="$base" -v c="$cpg" -v k="$cores" -v n="$n" 'BEGIN {
    printf "%6d  %16.0f  %7.1f  %9.2f  %11.2f  %9.3f  %4d\n", s, b, b / 1048576, b / base, k, c, n }'
  summary_json+="${summary_json:+, }\"$s\": {\"median_bytes_per_sec\": $bps, \"median_relay_cpu_s_per_gib\": $cpg, \"median_relay_cores_busy\": $cores, \"runs\": $n}"
done

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  {
    echo "{"
    echo "  \"scenario\": \"scale\","
    echo "  \"machine\": {\"nproc\": $NCPU, \"cpu\": \"$CPU_MODEL\", \"kernel\": \"$(uname -r)\", \"taskset\": $HAVE_TASKSET},"
    echo "  \"params\": {\"tunnels\": $TUNNELS, \"size\": $SIZE, \"duration\": \"$DURATION\", \"warmup\": \"$WARMUP\", \"reps\": $REPS, \"plaintext\": true},"
    echo "  \"by_shards\": {$summary_json},"
    echo "  \"runs\": ["
    first=1
    for r in "${RESULTS[@]:-}"; do
      [ -z "$r" ] && continue
      read -r s rep bps cpg cores ltcpu pinned <<< "$r"
      [ $first = 1 ] || echo ","
      first=0
      printf '    {"shards": %s, "rep": %s, "bytes_per_sec": %s, "relay_cpu_s_per_gib": %s, "relay_cores_busy": %s, "loadtest_cpu_seconds": %s, "pinning": "%s"}' \
        "$s" "$rep" "$bps" "$cpg" "$cores" "$ltcpu" "$(echo "$pinned" | tr '_' ' ')"
    done
    echo
    echo "  ],"
    echo "  \"seconds\": $(( $(date +%s) - START ))"
    echo "}"
  } > "$OUT/scale.json"
  echo "wrote $OUT/scale.json"
fi
echo "done in $(( $(date +%s) - START )) s"
