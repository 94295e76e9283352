# Shared by bench-latency.sh, bench-churn.sh and bench-idle.sh (sourced, not run).
# Environment: BENCH_BIN_DIR (default target/release), BENCH_DATA_BASE (parent of the fresh
# data dirs, default $TMPDIR or /tmp), BENCH_QUIET_WAIT (seconds to wait for other
# cargo/rustc/test processes before each run, default 300), BENCH_SHARDS (default 2).
BIN=${BENCH_BIN_DIR:-target/release}
BASE=${BENCH_DATA_BASE:-${TMPDIR:-/tmp}}
QUIET_WAIT=${BENCH_QUIET_WAIT:-300}
SHARDS=${BENCH_SHARDS:-2}
export IOTUNNEL_ADMIN_KEY=${IOTUNNEL_ADMIN_KEY:-bench-admin-key-0123456789abcdef}
[ -x "$BIN/iotunnel" ] && [ -x "$BIN/iotunnel-loadtest" ] || {
  echo "build first: cargo build --release -p iotunnel -p iotunnel-loadtest" >&2; exit 2; }

wait_quiet() {
  local waited=0
  while pgrep -x cargo >/dev/null || pgrep -x rustc >/dev/null || pgrep -f 'target/(debug|release)/deps/' >/dev/null; do
    [ "$waited" -ge "$QUIET_WAIT" ] && { echo "   (machine still busy after ${QUIET_WAIT}s; running anyway)"; return 0; }
    sleep 2; waited=$((waited + 2))
  done
  [ "$waited" -gt 0 ] && echo "   (waited ${waited}s for other builds/tests to finish)"
  return 0
}

# start_server API_PORT RELAY_PORT LOG: a fresh plaintext release server; sets SRV (pid) and DD.
start_server() {
  DD=$(mktemp -d -p "$BASE" iotunnel-bench.XXXXXX)
  "$BIN/iotunnel" server --data-dir "$DD" --api-addr "127.0.0.1:$1" \
    --metrics-addr "127.0.0.1:$(($1 + 1))" --relay-addr "127.0.0.1:$2" --shards "$SHARDS" \
    --max-open-tunnels-per-device 100000000 --relay-plaintext > "$3" 2>&1 &
  SRV=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$1/healthz" >/dev/null && return 0; sleep 0.1; done
  echo "the server did not come up; see $3" >&2; return 1
}

stop_server() { kill "$SRV" 2>/dev/null; wait "$SRV" 2>/dev/null || true; rm -rf "$DD"; }

# summarize OUT METRIC... : median (min-max) of each JSON field path per configuration
# (files OUT/CONFIG-runN.json), then the paired ratio of each configuration to the first one
# named in $BASELINE within each run.
summarize() {
  python3 - "$@" <<'PY'
import glob, json, os, re, statistics, sys
out, metrics = sys.argv[1], sys.argv[2:]
base = os.environ.get("BASELINE")
runs = {}
for f in sorted(glob.glob(f"{out}/*-run*.json")):
    m = re.match(r"(.*)-run(\d+)\.json$", os.path.basename(f))
    if m:
        runs.setdefault(m.group(1), {})[int(m.group(2))] = json.load(open(f))
def get(v, path):
    for k in path.split("."):
        v = v[k]
    return float(v)
def fmt(xs):
    return f"{statistics.median(xs):.6g} ({min(xs):.6g}-{max(xs):.6g})" if xs else "-"
lines = [f"| configuration | runs | " + " | ".join(metrics) + " |", "|---|---:|" + "---|" * len(metrics)]
for cfg, rs in sorted(runs.items()):
    lines.append(f"| {cfg} | {len(rs)} | " + " | ".join(fmt([get(v, m) for v in rs.values()]) for m in metrics) + " |")
if base in runs:
    lines.append("")
    lines.append(f"paired per run, against {base}: ratio (and difference) median (min-max)")
    for cfg, rs in sorted(runs.items()):
        if cfg == base:
            continue
        for m in metrics:
            pairs = [(get(v, m), get(runs[base][i], m)) for i, v in rs.items() if i in runs[base]]
            ratios = [a / b for a, b in pairs if b]
            diffs = [a - b for a, b in pairs]
            lines.append(f"- {cfg} / {base}, {m}: ratio {fmt(ratios)}, difference {fmt(diffs)}")
text = "\n".join(lines)
print(text)
open(f"{out}/summary.md", "w").write(text + "\n")
PY
}

# Fleet nodes (bench-fleet.sh). PG_ADMIN_URL: where databases are created and dropped.
PG_ADMIN=${BENCH_PG_ADMIN:-"-h 127.0.0.1 -U postgres -d test"}
NODE_PIDS=()
NODE_DIRS=()

# fresh_db NAME: drops and creates PostgreSQL database NAME; prints its URL.
fresh_db() {
  # shellcheck disable=SC2086
  psql $PG_ADMIN -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null &&
  # shellcheck disable=SC2086
  psql $PG_ADMIN -qc "CREATE DATABASE $1" >/dev/null &&
  echo "postgres://postgres@127.0.0.1:5432/$1"
}

# drop_db NAME
drop_db() {
  # shellcheck disable=SC2086
  psql $PG_ADMIN -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null || true
}

# start_node DB_URL NODE_ID API_PORT RELAY_PORT MESH_PORT LOG [BIN]: a fleet node (plaintext
# relay, metrics on API_PORT+1), fresh data dir; appends to NODE_PIDS/NODE_DIRS.
start_node() {
  local d
  d=$(mktemp -d -p "$BASE" iotunnel-node.XXXXXX)
  "${7:-$BIN}/iotunnel" server --data-dir "$d" --database-url "$1" --node-id "$2" \
    --api-addr "127.0.0.1:$3" --metrics-addr "127.0.0.1:$(($3 + 1))" \
    --relay-addr "127.0.0.1:$4" --mesh-addr "127.0.0.1:$5" --shards "$SHARDS" \
    --max-open-tunnels-per-device 100000000 --relay-plaintext > "$6" 2>&1 &
  NODE_PIDS+=($!)
  NODE_DIRS+=("$d")
  for _ in $(seq 150); do curl -fs "http://127.0.0.1:$3/healthz" >/dev/null && return 0; sleep 0.1; done
  echo "node $2 did not come up; see $6" >&2; return 1
}

# wait_nodes API_PORT N: until the node on API_PORT lists N live nodes (placement sees them).
wait_nodes() {
  for _ in $(seq 150); do
    [ "$(curl -fs -H "Authorization: Bearer $IOTUNNEL_ADMIN_KEY" "http://127.0.0.1:$1/v1/nodes" |
      jq '[.nodes[] | select(.state == "live" or .state == "LIVE")] | length')" = "$2" ] && return 0
    sleep 0.2
  done
  echo "node on $1 never saw $2 live nodes:" >&2
  curl -s -H "Authorization: Bearer $IOTUNNEL_ADMIN_KEY" "http://127.0.0.1:$1/v1/nodes" >&2; return 1
}

# stop_nodes: SIGTERM every node started by start_node, wait, remove their data dirs.
stop_nodes() {
  local p
  for p in "${NODE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${NODE_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "${NODE_DIRS[@]}"
  NODE_PIDS=(); NODE_DIRS=()
}

# start_haproxy API_PORT RELAY_PORT LOG NODE_API_PORT...: HAProxy with tests/fleet/haproxy.cfg
# (TCP mode, leastconn, health checks) in front of 1-3 nodes; with fewer than three, the
# last node fills the remaining server lines, so every configuration runs the same HAProxy
# setup. A node's relay is at its API port + 3 (bench-fleet.sh's layout). Sets HAP (pid).
start_haproxy() {
  local api=$1 relay=$2 log=$3 k=0 last
  shift 3
  export IOTUNNEL_LB_API="127.0.0.1:$api" IOTUNNEL_LB_RELAY="127.0.0.1:$relay"
  for k in 1 2 3; do
    [ $# -gt 0 ] && { last=$1; shift; }
    export "IOTUNNEL_NODE${k}_API=127.0.0.1:$last" "IOTUNNEL_NODE${k}_RELAY=127.0.0.1:$((last + 3))"
  done
  haproxy -f tests/fleet/haproxy.cfg -db > "$log" 2>&1 &
  HAP=$!
  for _ in $(seq 50); do curl -fs "http://127.0.0.1:$api/healthz" >/dev/null && return 0; sleep 0.1; done
  echo "haproxy did not come up; see $log" >&2; return 1
}

stop_haproxy() { kill "$HAP" 2>/dev/null; wait "$HAP" 2>/dev/null || true; }
