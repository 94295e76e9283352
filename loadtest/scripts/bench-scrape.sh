#!/usr/bin/env bash
# What a Prometheus scrape of /metrics costs (issue 5: "A scrape must not stall the data plane.
# Measure it."), in two parts, all in one run:
#
# (a) Render time: GET /metrics over one keep-alive connection, $SCRAPES times back to back
#     (default 300), timed around each request by a small Python client; median, p90, p99, max
#     and the exposition's size, for
#       idle        : a fresh server, no tunnels;
#       load        : 1000 tunnel pairs connected and carrying data
#                     (iotunnel-loadtest throughput --tunnels 1000 --size 1024), default metrics;
#       load+tunnel : the same load with --metrics-per-tunnel (capped at 1000 tunnels: 4000+ more
#                     series).
#     Under load the scrapes start once all 1000 clients are connected.
# (b) Does scraping stall the data plane? The throughput scenario (--tunnels 8 --size 65536,
#     like bench-relay.sh's t8) with nobody scraping, with a tight scrape loop (the next
#     request as soon as the last answer is read), and with a scrape every 10 ms: RUNS rounds
#     (default 3), the three back to back in a rotating order; throughput and relay CPU per
#     GiB, paired with "none" of the same round. The scraper also reports how many scrapes it
#     made and their latency while the relay was saturated. For scale: Prometheus scrapes once
#     per 15 s (grafana/prometheus.yml); the tight loop is thousands of times that.
#
# Usage: loadtest/scripts/bench-scrape.sh [RUNS] [OUT_DIR]   (OUT_DIR default
#        /work/scratch/bench-scrape); builds release first unless BENCH_NO_BUILD=1.
# Environment: BENCH_DURATION (10s), BENCH_WARMUP (1s), BENCH_SHARDS (2), BENCH_SCRAPES (300),
# BENCH_LOAD_TUNNELS (1000), BENCH_PARTS ("a b"), BENCH_BIN_DIR (use the binaries there).
# Results: $OUT/render-*.json, $OUT/stall-*.json and the loadtest's JSON, $OUT/summary.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${1:-3}
OUT=${2:-/work/scratch/bench-scrape}
DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-1s}
SHARDS=${BENCH_SHARDS:-2}
SCRAPES=${BENCH_SCRAPES:-300}
LOAD_TUNNELS=${BENCH_LOAD_TUNNELS:-1000}
PARTS=${BENCH_PARTS:-a b}
API=127.0.0.1:18581
METRICS=127.0.0.1:19591
RELAY=127.0.0.1:18843
export IOTUNNEL_ADMIN_KEY=${IOTUNNEL_ADMIN_KEY:-bench-scrape-admin-key-0123456789}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

. "$ROOT/loadtest/scripts/lib-binaries.sh"
bench_binaries "$ROOT" "$OUT" iotunnel iotunnel-loadtest

{
  echo "date: $(date -u +%FT%TZ)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "git: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?') (+ uncommitted changes: $(cd "$ROOT" && git status --porcelain 2>/dev/null | wc -l) paths)"
  echo "runs: $RUNS, duration $DURATION, warm-up $WARMUP, shards $SHARDS, scrapes per render case $SCRAPES"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

# The scraper: GET /metrics on one keep-alive connection, COUNT times (0: until SIGTERM), the
# next request INTERVAL_MS after the last answer (0: at once); writes timings as JSON.
cat > "$OUT/scrape.py" <<'PY'
import http.client, json, signal, sys, time
addr, count, interval_ms, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
host, port = addr.rsplit(":", 1)
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
conn = http.client.HTTPConnection(host, int(port), timeout=30)
times, size, lines = [], 0, 0
t0 = time.perf_counter()
while not stop and (count == 0 or len(times) < count):
    t = time.perf_counter()
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    body = resp.read()
    times.append(time.perf_counter() - t)
    if resp.status != 200:
        sys.exit(f"/metrics answered {resp.status}")
    size, lines = len(body), body.count(b"\n")
    if interval_ms > 0:
        time.sleep(interval_ms / 1000)
elapsed = time.perf_counter() - t0
xs = sorted(times)
q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None
json.dump({"scrapes": len(xs), "seconds": elapsed, "per_sec": len(xs) / elapsed if elapsed else 0,
           "median_s": q(0.5), "p90_s": q(0.9), "p99_s": q(0.99), "max_s": xs[-1] if xs else None,
           "bytes": size, "lines": lines}, open(out, "w"), indent=1)
PY

wait_http() { # URL
  for _ in $(seq 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "server did not come up: $1" >&2
  return 1
}
json_num() { # FILE KEY -> first numeric value of "KEY":
  grep -m1 "\"$2\":" "$1" | sed -E 's/.*: *([-0-9.eE+]+).*/\1/'
}
SRV=""
start_server() { # LOG EXTRA-FLAGS...
  local log=$1 d
  shift
  d=$(mktemp -d -p "$OUT" data.XXXXXX)
  "$BIN/iotunnel" server --data-dir "$d" --api-addr "$API" --metrics-addr "$METRICS" \
    --relay-addr "$RELAY" --shards "$SHARDS" --max-open-tunnels-per-device 100000000 \
    --relay-plaintext "$@" > "$log" 2>&1 &
  SRV=$!
  wait_http "http://$API/healthz"
}
stop_server() {
  kill "$SRV"; wait "$SRV" || true
  rm -rf "$OUT"/data.*
}
clients_connected() {
  curl -fs "http://$METRICS/metrics" | awk '/^iotunnel_peers_connected\{role="client"\}/ { print $2 }'
}

# ---- (a) render time ----------------------------------------------------------------------
render_case() { # NAME TUNNELS(0: idle) EXTRA-FLAGS...
  local name=$1 tunnels=$2 lt=""
  shift 2
  start_server "$OUT/render-$name.server.log" "$@"
  if [ "$tunnels" -gt 0 ]; then
    "$BIN/iotunnel-loadtest" throughput --tunnels "$tunnels" --size 1024 --duration 120s --warmup 0 \
      --api "http://$API" --api-key "$IOTUNNEL_ADMIN_KEY" --plaintext \
      > "$OUT/render-$name.loadtest.log" 2>&1 &
    lt=$!
    local up=0
    for _ in $(seq 600); do
      up=$(clients_connected || echo 0)
      [ "${up%.*}" -ge "$tunnels" ] && break
      sleep 0.1
    done
    if [ "${up%.*}" -lt "$tunnels" ]; then
      echo "   only $up of $tunnels clients connected" >&2
      kill "$lt" 2>/dev/null || true; stop_server; return 1
    fi
  fi
  python3 "$OUT/scrape.py" "$METRICS" "$SCRAPES" 0 "$OUT/render-$name.json"
  if [ -n "$lt" ]; then
    # The last exposition, for the disconnects by reason (a stalled shard misses pings).
    curl -fs "http://$METRICS/metrics" > "$OUT/render-$name.metrics.txt" || true
    echo "   clients still connected after the scrapes: $(clients_connected);" \
      "disconnects: $(awk '/^iotunnel_peer_disconnects_total/ && $2 > 0 { printf "%s %s ", $1, $2 }' "$OUT/render-$name.metrics.txt")"
    kill "$lt" 2>/dev/null || true; wait "$lt" 2>/dev/null || true
  fi
  stop_server
  python3 - "$OUT/render-$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"   {sys.argv[2]:<12} {r['scrapes']} scrapes: median {r['median_s']*1e3:.2f} ms, p90 {r['p90_s']*1e3:.2f} ms, "
      f"p99 {r['p99_s']*1e3:.2f} ms, max {r['max_s']*1e3:.2f} ms; {r['bytes']} bytes, {r['lines']} lines")
PY
}

# ---- (b) scraping during the throughput scenario -------------------------------------------
stall_case() { # SCRAPE(none|tight|10ms) RUN
  local s=$1 i=$2 scraper="" json="$OUT/stall-$1-run$2.lt.json"
  start_server "$OUT/stall-$s-run$i.server.log"
  case $s in
    tight) python3 "$OUT/scrape.py" "$METRICS" 0 0 "$OUT/stall-$s-run$i.json" & scraper=$! ;;
    10ms) python3 "$OUT/scrape.py" "$METRICS" 0 10 "$OUT/stall-$s-run$i.json" & scraper=$! ;;
    none) ;;
  esac
  rm -f "$json"
  if ! "$BIN/iotunnel-loadtest" throughput --tunnels 8 --streams 1 --size 65536 --duration "$DURATION" \
      --warmup "$WARMUP" --api "http://$API" --api-key "$IOTUNNEL_ADMIN_KEY" --plaintext \
      --relay-pid "$SRV" --label "stall-$s" --json "$json" > "$OUT/stall-$s-run$i.lt.log" 2>&1; then
    tail -5 "$OUT/stall-$s-run$i.lt.log"
    [ -n "$scraper" ] && kill "$scraper"
    stop_server; return 1
  fi
  if [ -n "$scraper" ]; then kill -TERM "$scraper"; wait "$scraper" || true; fi
  stop_server
  awk -v s="$s" -v i="$i" -v b="$(json_num "$json" bytes_per_sec)" \
    -v g="$(json_num "$json" cpu_seconds_per_gib)" 'BEGIN {
      printf "   scrape %-5s run %s: %8.1f MiB/s  relay %s CPU s/GiB\n", s, i, b / 1048576, g }'
}

if [[ " $PARTS " == *" a "* ]]; then
  echo "== (a) render time"
  render_case idle 0
  render_case load "$LOAD_TUNNELS"
  render_case load+tunnel "$LOAD_TUNNELS" --metrics-per-tunnel --metrics-per-tunnel-max "$LOAD_TUNNELS"
fi
if [[ " $PARTS " == *" b "* ]]; then
  CFG=(none tight 10ms)
  for i in $(seq 1 "$RUNS"); do
    echo "== (b) round $i"
    for k in 0 1 2; do
      s=${CFG[$(((k + i - 1) % 3))]}
      stall_case "$s" "$i" || { echo "   (failed; retrying once)"; stall_case "$s" "$i"; }
    done
  done
fi

python3 - "$OUT" "$RUNS" "$PARTS" <<'PY'
import json, os, statistics, sys
out, runs, parts = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
MiB = 1 << 20
lines = []
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
def spread(xs):
    xs = [x for x in xs if x is not None]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None
def fmt(s, scale=1.0, prec=1):
    return "-" if not s else f"{s['median']/scale:.{prec}f} ({s['min']/scale:.{prec}f}-{s['max']/scale:.{prec}f})"
if "a" in parts:
    lines.append("\n### (a) /metrics render time (one keep-alive connection, back to back)\n")
    lines.append("| case | scrapes | median ms | p90 ms | p99 ms | max ms | bytes | lines |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name in ("idle", "load", "load+tunnel"):
        r = load(f"render-{name}.json")
        if r:
            lines.append(f"| {name} | {r['scrapes']} | {r['median_s']*1e3:.2f} | {r['p90_s']*1e3:.2f} | {r['p99_s']*1e3:.2f} | {r['max_s']*1e3:.2f} | {r['bytes']} | {r['lines']} |")
if "b" in parts:
    cfgs = ("none", "tight", "10ms")
    lt = {s: [load(f"stall-{s}-run{i}.lt.json") for i in range(1, runs + 1)] for s in cfgs}
    sc = {s: [load(f"stall-{s}-run{i}.json") for i in range(1, runs + 1)] for s in cfgs}
    bps = lambda r: r["bytes_per_sec"]
    cpg = lambda r: (r.get("relay_cpu") or {}).get("cpu_seconds_per_gib")
    lines.append("\n### (b) throughput (8 tunnels, 64 KiB frames) while scraping\n")
    lines.append("| scraping | MiB/s, median (min-max) | relay CPU s/GiB | scrapes/s | scrape median ms | scrape p99 ms | throughput / none (paired) | CPU per GiB / none (paired) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for s in cfgs:
        rs = lt[s]
        def paired(f):
            xs = []
            for a, b in zip(rs, lt["none"]):
                if a and b and f(a) is not None and f(b):
                    xs.append(f(a) / f(b))
            return spread(xs)
        ss = [x for x in sc[s] if x]
        lines.append(f"| {s} | {fmt(spread([bps(r) for r in rs if r]), MiB)} | {fmt(spread([cpg(r) for r in rs if r]), 1, 3)} | "
                     f"{fmt(spread([x['per_sec'] for x in ss]), 1, 0) if ss else '-'} | "
                     f"{fmt(spread([x['median_s']*1e3 for x in ss]), 1, 2) if ss else '-'} | "
                     f"{fmt(spread([x['p99_s']*1e3 for x in ss]), 1, 2) if ss else '-'} | "
                     f"{fmt(paired(bps), 1, 3) if s != 'none' else '1'} | {fmt(paired(cpg), 1, 3) if s != 'none' else '1'} |")
text = "\n".join(lines) + "\n"
open(os.path.join(out, "summary.md"), "w").write(open(os.path.join(out, "machine.txt")).read() + text)
print(text)
PY
echo "results: $OUT/summary.md"
