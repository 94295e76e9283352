#!/usr/bin/env bash
# Fleet benchmarks (issue 11), each part in rotating order of its configurations per run:
#   create: durable creates/s over BENCH_CREATE_DURATION (60s), 8 clients, 8 devices, all
#           tunnels kept OPEN: SQLite one node (the baseline) vs PostgreSQL one node vs
#           PostgreSQL three nodes, the last two behind HAProxy (tests/fleet/haproxy.cfg: TCP,
#           leastconn per connection; one node fills all three server lines); with BENCH_OLD_BIN_DIR also SQLite on the binaries found there (the
#           code before the per-device counter). Each JSON gets first10/last10: the mean
#           creates/s of the first and last 10 whole seconds of extra.ops_per_second.
#   mesh:   a two-node fleet; latency (64 B ping-pong) and throughput with both peers on the
#           tunnel's owner (the baseline) vs the client peer on the other node
#           (--client-relay: forwarded over the mesh).
#   churn:  create, pair, exchange, close cycles: PostgreSQL one node (the baseline) vs three
#           nodes, both behind HAProxy; each peer dials its tunnel's owner.
# Usage, from the repo root after `cargo build --release -p iotunnel -p iotunnel-loadtest`:
#   loadtest/scripts/bench-fleet.sh create|mesh|churn|all [RUNS=3] [OUT_DIR=loadtest/results/fleet]
# Needs PostgreSQL where `psql $BENCH_PG_ADMIN` reaches it (default -h 127.0.0.1 -U postgres
# -d test, trust auth: a fresh database per run), haproxy and jq. Environment:
# BENCH_CREATE_DURATION (60s), BENCH_SHORT_DURATION (8s, mesh and churn), BENCH_CLIENTS (8),
# BENCH_DEVICES (8), BENCH_LAT_TUNNELS (200), BENCH_LAT_RATE (4000), BENCH_TP_TUNNELS (4),
# BENCH_CHURN_CONCURRENCY (32); see lib-bench.sh for the rest.
set -euo pipefail
PART=${1:-all}
RUNS=${2:-3}
OUT=${3:-loadtest/results/fleet}
. "$(dirname "$0")/lib-bench.sh"
LT="$BIN/iotunnel-loadtest"
K=$IOTUNNEL_ADMIN_KEY
LONG=${BENCH_CREATE_DURATION:-60s}
SHORT=${BENCH_SHORT_DURATION:-8s}
CLIENTS=${BENCH_CLIENTS:-8}
DEV=${BENCH_DEVICES:-8}
DB=iotunnel_bench_fleet
HAP_PORT=18800
# Node k (1..3): API 18810+10k, metrics +1, relay +3, mesh +4.
api_port() { echo $((18810 + 10 * $1)); }

# fleet N LOGPREFIX: a fresh database and N nodes; every node sees all N before it returns.
fleet() {
  local url k
  url=$(fresh_db "$DB")
  for k in $(seq 1 "$1"); do
    start_node "$url" "n$k" "$(api_port "$k")" $(($(api_port "$k") + 3)) \
      $(($(api_port "$k") + 4)) "$2-n$k.log"
  done
  for k in $(seq 1 "$1"); do wait_nodes "$(api_port "$k")" "$1"; done
}
fleet_down() { stop_nodes; drop_db "$DB"; }

# --- create ---------------------------------------------------------------------------------
create_run() { # API_URL JSON
  "$LT" create --api "$1" --api-key "$K" --clients "$CLIENTS" --devices "$DEV" \
    --duration "$LONG" --json "$2" > "${2%.json}.txt" 2>&1 || echo "   run failed: see ${2%.json}.txt"
}
create_cfg() { # CFG RUN
  local o="$OUT/create" cfg=$1 i=$2
  wait_quiet
  echo "   $cfg"
  case $cfg in
    sqlite|sqlite-old)
      local bin=$BIN
      [ "$cfg" = sqlite-old ] && bin=$BENCH_OLD_BIN_DIR
      BIN=$bin start_server 18850 18853 "$o/server-$cfg-run$i.log"
      create_run http://127.0.0.1:18850 "$o/$cfg-run$i.json"
      stop_server ;;
    pg1|pg3)
      local n=${cfg#pg} ports=() k
      fleet "$n" "$o/server-$cfg-run$i"
      for k in $(seq 1 "$n"); do ports+=("$(api_port "$k")"); done
      start_haproxy "$HAP_PORT" $((HAP_PORT + 3)) "$o/haproxy-$cfg-run$i.log" "${ports[@]}"
      create_run "http://127.0.0.1:$HAP_PORT" "$o/$cfg-run$i.json"
      stop_haproxy; fleet_down ;;
  esac
}
part_create() {
  local o="$OUT/create" cfgs=(sqlite pg1 pg3) i j n
  mkdir -p "$o"
  [ -n "${BENCH_OLD_BIN_DIR:-}" ] && cfgs=(sqlite sqlite-old pg1 pg3)
  n=${#cfgs[@]}
  for i in $(seq 1 "$RUNS"); do
    echo "== create run $i"
    for j in $(seq 0 $((n - 1))); do create_cfg "${cfgs[$(((i - 1 + j) % n))]}" "$i"; done
  done
  python3 - "$o" <<'PY'
import glob, json, sys
for f in glob.glob(f"{sys.argv[1]}/*-run*.json"):
    v = json.load(open(f))
    s = v["extra"]["ops_per_second"][:-1]  # the last entry is a partial second
    v["first10"] = sum(s[:10]) / 10
    v["last10"] = sum(s[-10:]) / 10
    v["last10_over_first10"] = v["last10"] / v["first10"]
    v["open_tunnels"] = sum(v["extra"]["ops_per_second"])
    json.dump(v, open(f, "w"), indent=1)
PY
  BASELINE=sqlite summarize "$o" ops_per_sec first10 last10 last10_over_first10 \
    latency_us.p50 latency_us.p99
}

# --- mesh -----------------------------------------------------------------------------------
mesh_lat() { # CFG RUN
  local o="$OUT/mesh" extra=()
  [ "$1" = mesh ] && extra=(--client-relay "127.0.0.1:$(($(api_port 1) + 3)),127.0.0.1:$(($(api_port 2) + 3))")
  "$LT" latency --api "http://127.0.0.1:$(api_port 1)" --api-key "$K" --plaintext --devices 4 \
    --tunnels "${BENCH_LAT_TUNNELS:-200}" --rate "${BENCH_LAT_RATE:-4000}" --size 64 \
    --duration "$SHORT" --warmup 1s --quiet "${extra[@]}" --json "$o/lat-$1-run$2.json" \
    > "$o/lat-$1-run$2.txt" 2>&1 || echo "   latency $1 failed: see $o/lat-$1-run$2.txt"
}
mesh_tp() { # CFG RUN
  local o="$OUT/mesh" extra=()
  [ "$1" = mesh ] && extra=(--client-relay "127.0.0.1:$(($(api_port 1) + 3)),127.0.0.1:$(($(api_port 2) + 3))")
  "$LT" throughput --api "http://127.0.0.1:$(api_port 1)" --api-key "$K" --plaintext \
    --devices 4 --tunnels "${BENCH_TP_TUNNELS:-4}" --size 65536 --duration "$SHORT" \
    --warmup 1s --quiet "${extra[@]}" --json "$o/tp-$1-run$2.json" \
    > "$o/tp-$1-run$2.txt" 2>&1 || echo "   throughput $1 failed: see $o/tp-$1-run$2.txt"
}
part_mesh() {
  local o="$OUT/mesh" i
  mkdir -p "$o/lat" "$o/tp"
  for i in $(seq 1 "$RUNS"); do
    wait_quiet
    echo "== mesh run $i"
    fleet 2 "$o/server-run$i"
    if [ $((i % 2)) -eq 1 ]; then
      mesh_lat owner "$i"; mesh_lat mesh "$i"; mesh_tp mesh "$i"; mesh_tp owner "$i"
    else
      mesh_lat mesh "$i"; mesh_lat owner "$i"; mesh_tp owner "$i"; mesh_tp mesh "$i"
    fi
    fleet_down
  done
  for f in "$o"/lat-*-run*.json; do [ -e "$f" ] && cp "$f" "$o/lat/$(basename "${f#"$o"/lat-}")"; done
  for f in "$o"/tp-*-run*.json; do [ -e "$f" ] && cp "$f" "$o/tp/$(basename "${f#"$o"/tp-}")"; done
  BASELINE=owner summarize "$o/lat" latency_us.p50 latency_us.p99 latency_us.p999 messages_per_sec
  BASELINE=owner summarize "$o/tp" bytes_per_sec
}

# --- churn ----------------------------------------------------------------------------------
churn_cfg() { # CFG RUN
  local o="$OUT/churn" n=${1#pg} ports=() k
  fleet "$n" "$o/server-$1-run$2"
  for k in $(seq 1 "$n"); do ports+=("$(api_port "$k")"); done
  start_haproxy "$HAP_PORT" $((HAP_PORT + 3)) "$o/haproxy-$1-run$2.log" "${ports[@]}"
  "$LT" churn --api "http://127.0.0.1:$HAP_PORT" --api-key "$K" --plaintext \
    --concurrency "${BENCH_CHURN_CONCURRENCY:-32}" --devices "$DEV" --duration "$SHORT" \
    --quiet --json "$o/$1-run$2.json" > "$o/$1-run$2.txt" 2>&1 \
    || echo "   churn $1 failed: see $o/$1-run$2.txt"
  stop_haproxy; fleet_down
}
part_churn() {
  local o="$OUT/churn" i
  mkdir -p "$o"
  for i in $(seq 1 "$RUNS"); do
    wait_quiet
    echo "== churn run $i"
    if [ $((i % 2)) -eq 1 ]; then churn_cfg pg1 "$i"; churn_cfg pg3 "$i"
    else churn_cfg pg3 "$i"; churn_cfg pg1 "$i"; fi
  done
  BASELINE=pg1 summarize "$o" cycles_per_sec latency_us.p50 latency_us.p99 \
    steps_us.create.p50 steps_us.pair.p50 steps_us.close.p50
}

case $PART in
  create) part_create ;;
  mesh) part_mesh ;;
  churn) part_churn ;;
  all) part_create; part_mesh; part_churn ;;
  *) echo "usage: $0 create|mesh|churn|all [RUNS] [OUT_DIR]" >&2; exit 2 ;;
esac
