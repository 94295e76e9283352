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
