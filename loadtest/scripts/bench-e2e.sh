#!/usr/bin/env bash
# End to end through client, relay and agent (issue 4), all in one run:
#   throughput: one TCP connection carries BYTES (default 1 GiB) from a sender app to a sink app
#               that answers one byte when it has them all (the time runs until that byte);
#   latency:    a 64-byte ping-pong against an echo app, PINGS round trips (default 10000)
#               after WARMUP (default 1000), p50 and p99 of the round trip.
# Each over four paths between the same two apps (Python, below):
#   direct  : sender -> sink, one loopback TCP connection (the baseline);
#   plain   : sender -> iotunnel client -> relay (ws, --relay-plaintext) -> agent -> sink;
#   tls     : the same with the relay on wss (the generated CA);
#   rathole : sender -> rathole server -> rathole client -> sink (plain TCP transport);
#   rathole-tls : the same over rathole's TLS transport (its default native-tls build, a
#             P-256 certificate for localhost made with openssl), to compare with tls.
# Every path is set up once and stays up (idle ones cost nothing measurable); each round runs
# the paths back to back in a rotating order, RUNS rounds (default 5).
#
# The plain path: the server sends wss:// URLs even with --relay-plaintext (it expects a TLS
# terminator in front), and the agent dials the scheme its notification names. So that path
# runs the server with --mqtt-url, catches the device's native `connect` notification on the
# broker, rewrites its url to ws:// and hands it to an agent in MQTT mode (under a second
# device name, so that it never sees the wss one). The client dials ws:// with --url.
#
# Usage (from anywhere; builds release first unless BENCH_NO_BUILD=1):
#   loadtest/scripts/bench-e2e.sh [RUNS] [OUT_DIR]        (OUT_DIR default /work/scratch/bench-e2e)
# Environment: BENCH_BYTES (1073741824), BENCH_PINGS (10000), BENCH_WARMUP_PINGS (1000),
#   BENCH_CONFIGS ("direct plain tls rathole rathole-tls"), RATHOLE (the rathole binary; default
#   `rathole` on PATH, else /work/scratch/e2e/rathole/bin/rathole), BENCH_MQTT
#   (mqtt://127.0.0.1:1883, for the plain path), BENCH_QUIET_WAIT (seconds to wait for other
#   benchmarks before starting; default 1800).
# Needs: python3, curl, mosquitto_pub/mosquitto_sub and a broker (plain path only).
# Results: $OUT/results.tsv (one line per measurement), $OUT/summary.md (printed at the end).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${1:-5}
OUT=${2:-/work/scratch/bench-e2e}
BYTES=${BENCH_BYTES:-1073741824}
PINGS=${BENCH_PINGS:-10000}
WARMUP_PINGS=${BENCH_WARMUP_PINGS:-1000}
CONFIGS=${BENCH_CONFIGS:-direct plain tls rathole rathole-tls}
MQTT=${BENCH_MQTT:-mqtt://127.0.0.1:1883}
QUIET_WAIT=${BENCH_QUIET_WAIT:-1800}
RATHOLE=${RATHOLE:-$(command -v rathole || echo /work/scratch/e2e/rathole/bin/rathole)}
export IOTUNNEL_ADMIN_KEY=${IOTUNNEL_ADMIN_KEY:-bench-e2e-admin-key-0123456789abcdef}
export IOTUNNEL_API_KEY=$IOTUNNEL_ADMIN_KEY
# Ports (fixed, away from bench-relay.sh's and bench-create.sh's).
SINK=127.0.0.1:18691
ECHO=127.0.0.1:18692
TLS_API=127.0.0.1:18381 TLS_METRICS=127.0.0.1:19381 TLS_RELAY=127.0.0.1:18643
PLAIN_API=127.0.0.1:18382 PLAIN_METRICS=127.0.0.1:19382 PLAIN_RELAY=127.0.0.1:18644
TLS_SINK=127.0.0.1:18661 TLS_ECHO=127.0.0.1:18662
PLAIN_SINK=127.0.0.1:18671 PLAIN_ECHO=127.0.0.1:18672
RH_CONTROL=127.0.0.1:18650 RH_SINK=127.0.0.1:18651 RH_ECHO=127.0.0.1:18652
RHT_CONTROL=127.0.0.1:18653 RHT_SINK=127.0.0.1:18654 RHT_ECHO=127.0.0.1:18655

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/data" && mkdir -p "$OUT/data" "$OUT/bin" "$OUT/logs"
: > "$OUT/results.tsv"

# Wait for other benchmarks (they and this one would disturb each other).
waited=0
while pgrep -f 'bench-relay.sh|bench-create.sh|iotunnel-loadtest' >/dev/null; do
  if [ "$waited" -ge "$QUIET_WAIT" ]; then echo "other benchmarks still running; going on" >&2; break; fi
  [ "$waited" = 0 ] && echo "waiting for other benchmarks to finish..."
  sleep 10
  waited=$((waited + 10))
done

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --release -p iotunnel)
fi
# A private copy: another session's build must not swap the binary mid-run.
cp "$ROOT/target/release/iotunnel" "$OUT/bin/iotunnel.new" && mv "$OUT/bin/iotunnel.new" "$OUT/bin/iotunnel"
IOT=$OUT/bin/iotunnel

# The apps: a sink, an echo server, a sender and a ping-pong client, in Python.
cat > "$OUT/bin/apps.py" <<'PY'
import json, os, socket, struct, sys, threading, time

def nodelay(s):
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

def recv_exact(s, n):
    out = bytearray()
    while len(out) < n:
        d = s.recv(n - len(out))
        if not d:
            raise EOFError("connection ended")
        out += d
    return bytes(out)

def sink(c):
    # 8-byte big-endian length, that many bytes, then one byte back.
    n = struct.unpack(">Q", recv_exact(c, 8))[0]
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    left = n
    while left:
        k = c.recv_into(mv[: min(left, len(buf))])
        if not k:
            return
        left -= k
    c.sendall(b"k")
    c.recv(1)

def echo(c):
    while True:
        d = c.recv(65536)
        if not d:
            return
        c.sendall(d)

def serve(addr, handler):
    host, port = addr.rsplit(":", 1)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, int(port)))
    ls.listen(512)
    while True:
        c, _ = ls.accept()
        nodelay(c)
        def run(c=c):
            try:
                handler(c)
            except (OSError, EOFError):
                pass
            finally:
                c.close()
        threading.Thread(target=run, daemon=True).start()

def connect(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    nodelay(s)
    return s

def send(addr, n):
    buf = memoryview(os.urandom(1 << 20))
    s = connect(addr)
    t0 = time.perf_counter()
    s.sendall(struct.pack(">Q", n))
    left = n
    while left:
        k = min(left, len(buf))
        s.sendall(buf[:k])
        left -= k
    if s.recv(1) != b"k":
        raise SystemExit("the sink did not confirm")
    dt = time.perf_counter() - t0
    s.close()
    print(json.dumps({"bytes": n, "seconds": dt, "bytes_per_sec": n / dt}))

def ping(addr, n, warmup):
    s = connect(addr)
    msg = os.urandom(64)
    lat = []
    for i in range(warmup + n):
        t0 = time.perf_counter_ns()
        s.sendall(msg)
        got = recv_exact(s, 64)
        t1 = time.perf_counter_ns()
        if got != msg:
            raise SystemExit("echo differs")
        if i >= warmup:
            lat.append(t1 - t0)
    s.close()
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000.0
    print(json.dumps({"n": n, "p50_us": q(0.50), "p90_us": q(0.90), "p99_us": q(0.99),
                      "mean_us": sum(lat) / len(lat) / 1000.0, "max_us": lat[-1] / 1000.0}))

cmd = sys.argv[1]
if cmd == "servers":
    threading.Thread(target=serve, args=(sys.argv[2], sink), daemon=True).start()
    serve(sys.argv[3], echo)
elif cmd == "send":
    send(sys.argv[2], int(sys.argv[3]))
elif cmd == "ping":
    ping(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
PY

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${PK_PLAIN:-}" ]; then # clear the retained presence the plain path left on the broker
    for dn in dev-1 dev-1-ws; do
      mosquitto_pub -L "$MQTT/iotunnel/$PK_PLAIN/$dn/presence" -r -n -q 1 2>/dev/null || true
    done
  fi
}
trap cleanup EXIT
wait_port() { # host:port
  for _ in $(seq 200); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.05; done
  echo "nothing listens on $1" >&2
  return 1
}
field() { sed -n "s/^ *\"$1\": \"\(.*\)\",\{0,1\}$/\1/p"; } # one string field of --json output
cpu_ticks() { # PIDS... -> utime+stime ticks summed
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "rustc: $(rustc --version 2>/dev/null || echo '?')"
  echo "python: $(python3 --version 2>&1)"
  echo "rathole: $("$RATHOLE" --version 2>/dev/null | sed -n 's/^Build Version: *//p')"
  echo "git: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?') (+ uncommitted changes: $(cd "$ROOT" && git status --porcelain | wc -l) paths)"
  echo "runs: $RUNS, bytes $BYTES, pings $PINGS after $WARMUP_PINGS, configs: $CONFIGS"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

python3 "$OUT/bin/apps.py" servers "$SINK" "$ECHO" & PIDS+=($!)
wait_port "$SINK"; wait_port "$ECHO"

# --- rathole: server and client on loopback, transport tcp or tls ------------------------
start_rathole() { # NAME TRANSPORT CONTROL SINK_PORT ECHO_PORT
  local name=$1 transport=$2 control=$3 sink=$4 echo=$5 dir="$OUT/data/$1"
  local server_tls="" client_tls=""
  mkdir -p "$dir"
  if [ "$transport" = tls ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj /CN=localhost -addext subjectAltName=DNS:localhost \
      -addext basicConstraints=critical,CA:TRUE \
      -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
    openssl pkcs12 -export -inkey "$dir/key.pem" -in "$dir/cert.pem" \
      -out "$dir/identity.p12" -passout pass:bench-e2e
    server_tls="[server.transport.tls]
pkcs12 = \"$dir/identity.p12\"
pkcs12_password = \"bench-e2e\""
    client_tls="[client.transport.tls]
trusted_root = \"$dir/cert.pem\"
hostname = \"localhost\""
  fi
  cat > "$dir/server.toml" <<EOF
[server]
bind_addr = "$control"
[server.transport]
type = "$transport"
[server.transport.tcp]
nodelay = true
$server_tls
[server.services.sink]
token = "bench-e2e"
bind_addr = "$sink"
[server.services.echo]
token = "bench-e2e"
bind_addr = "$echo"
EOF
  cat > "$dir/client.toml" <<EOF
[client]
remote_addr = "$control"
[client.transport]
type = "$transport"
[client.transport.tcp]
nodelay = true
$client_tls
[client.services.sink]
token = "bench-e2e"
local_addr = "$SINK"
[client.services.echo]
token = "bench-e2e"
local_addr = "$ECHO"
EOF
  "$RATHOLE" --server "$dir/server.toml" > "$OUT/logs/$name-server.log" 2>&1 &
  local server=$!
  PIDS+=("$server")
  wait_port "$control"
  "$RATHOLE" --client "$dir/client.toml" > "$OUT/logs/$name-client.log" 2>&1 &
  local client=$!
  PIDS+=("$client")
  # The server binds a service's port once that service's client is in.
  wait_port "$sink"; wait_port "$echo"
  PATH_SINK[$name]=$sink; PATH_ECHO[$name]=$echo
  PATH_PIDS[$name]="$server $client"
}

# --- iotunnel, TLS: device channel, as in the README -------------------------------------
start_server() { # NAME API METRICS RELAY EXTRA... -> $SRV_PID, $SRV_DIR
  local name=$1 api=$2 metrics=$3 relay=$4; shift 4
  SRV_DIR="$OUT/data/$name"
  mkdir -p "$SRV_DIR"
  "$IOT" server --data-dir "$SRV_DIR" --api-addr "$api" --metrics-addr "$metrics" \
    --relay-addr "$relay" "$@" > "$OUT/logs/$name-server.log" 2>&1 &
  SRV_PID=$!
  PIDS+=("$SRV_PID")
  for _ in $(seq 100); do curl -fs "http://$api/healthz" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "server $name did not come up" >&2
  return 1
}
wait_connected() { # API TUNNEL_ID
  for _ in $(seq 200); do
    local d
    d=$("$IOT" tunnel describe "$2" --api "http://$1" --json)
    if [ "$(grep -c '"state": "CONNECTED"' <<< "$d")" -ge 2 ]; then return 0; fi
    sleep 0.1
  done
  echo "tunnel $2 never connected on both sides: $d" >&2
  return 1
}
wait_online() { # API PK DEVICE
  for _ in $(seq 200); do
    "$IOT" device list --product-key "$2" --api "http://$1" --json | tr -d ' \n' |
      grep -q "\"device_name\":\"$3\"[^}]*\"online\":true\|\"online\":true[^}]*\"device_name\":\"$3\"" && return 0
    sleep 0.1
  done
  echo "device $3 never came online" >&2
  return 1
}

declare -A PATH_SINK PATH_ECHO PATH_PIDS
PATH_SINK[direct]=$SINK
PATH_ECHO[direct]=$ECHO
PATH_PIDS[direct]=""

for c in $CONFIGS; do
  case $c in
  tls)
    start_server tls "$TLS_API" "$TLS_METRICS" "$TLS_RELAY"
    TLS_PID=$SRV_PID; CA=$SRV_DIR/tls/ca.pem
    PK=$("$IOT" product create --name bench --api "http://$TLS_API" --json | field product_key)
    SECRET=$("$IOT" device create --product-key "$PK" --name dev-1 --api "http://$TLS_API" --json | field device_secret)
    IOTUNNEL_DEVICE_SECRET=$SECRET "$IOT" device --api "http://$TLS_API" --product-key "$PK" \
      --device-name dev-1 --service "SINK=$SINK" --service "ECHO=$ECHO" --ca-file "$CA" \
      > "$OUT/logs/tls-agent.log" 2>&1 &
    TLS_AGENT=$!; PIDS+=($!)
    wait_online "$TLS_API" "$PK" dev-1
    "$IOT" tunnel create --product-key "$PK" --device-name dev-1 --service SINK --service ECHO \
      --api "http://$TLS_API" --json > "$OUT/data/tls-tunnel.json"
    URL=$(field client_url < "$OUT/data/tls-tunnel.json")
    IOTUNNEL_TOKEN=$(field client_token < "$OUT/data/tls-tunnel.json") "$IOT" client --url "$URL" \
      --ca-file "$CA" --listen "SINK=$TLS_SINK" --listen "ECHO=$TLS_ECHO" \
      > "$OUT/logs/tls-client.log" 2>&1 &
    TLS_CLIENT=$!; PIDS+=($!)
    wait_port "$TLS_SINK"
    wait_connected "$TLS_API" "$(field tunnel_id < "$OUT/data/tls-tunnel.json")"
    PATH_SINK[tls]=$TLS_SINK; PATH_ECHO[tls]=$TLS_ECHO
    PATH_PIDS[tls]="$TLS_CLIENT $TLS_PID $TLS_AGENT"
    ;;
  plain)
    start_server plain "$PLAIN_API" "$PLAIN_METRICS" "$PLAIN_RELAY" --relay-plaintext --mqtt-url "$MQTT"
    PLAIN_PID=$SRV_PID
    PK_PLAIN=$("$IOT" product create --name bench --api "http://$PLAIN_API" --json | field product_key)
    "$IOT" device create --product-key "$PK_PLAIN" --name dev-1 --api "http://$PLAIN_API" --json > /dev/null
    TOPIC=iotunnel/$PK_PLAIN
    # The agent, as dev-1-ws: it subscribes before it announces itself.
    "$IOT" device --api "http://$PLAIN_API" --product-key "$PK_PLAIN" --device-name dev-1-ws \
      --mqtt-url "$MQTT" --service "SINK=$SINK" --service "ECHO=$ECHO" \
      > "$OUT/logs/plain-agent.log" 2>&1 &
    PLAIN_AGENT=$!; PIDS+=($!)
    [ "$(mosquitto_sub -L "$MQTT/$TOPIC/dev-1-ws/presence" -C 1 -W 20)" = online ]
    # dev-1 is online by its presence; the server then publishes each connect on its topic.
    mosquitto_sub -L "$MQTT/$TOPIC/dev-1/notify" -C 1 -W 30 > "$OUT/data/plain-note.json" &
    SUB=$!
    sleep 0.5
    mosquitto_pub -L "$MQTT/$TOPIC/dev-1/presence" -r -q 1 -m online
    wait_online "$PLAIN_API" "$PK_PLAIN" dev-1
    "$IOT" tunnel create --product-key "$PK_PLAIN" --device-name dev-1 --service SINK --service ECHO \
      --api "http://$PLAIN_API" --json > "$OUT/data/plain-tunnel.json"
    wait "$SUB"
    grep -q '"operation":"connect"' "$OUT/data/plain-note.json"
    sed 's#"url":"wss://#"url":"ws://#' "$OUT/data/plain-note.json" |
      mosquitto_pub -L "$MQTT/$TOPIC/dev-1-ws/notify" -q 1 -s
    IOTUNNEL_TOKEN=$(field client_token < "$OUT/data/plain-tunnel.json") "$IOT" client \
      --url "ws://$PLAIN_RELAY" --listen "SINK=$PLAIN_SINK" --listen "ECHO=$PLAIN_ECHO" \
      > "$OUT/logs/plain-client.log" 2>&1 &
    PLAIN_CLIENT=$!; PIDS+=($!)
    wait_port "$PLAIN_SINK"
    wait_connected "$PLAIN_API" "$(field tunnel_id < "$OUT/data/plain-tunnel.json")"
    PATH_SINK[plain]=$PLAIN_SINK; PATH_ECHO[plain]=$PLAIN_ECHO
    PATH_PIDS[plain]="$PLAIN_CLIENT $PLAIN_PID $PLAIN_AGENT"
    ;;
  rathole) start_rathole rathole tcp "$RH_CONTROL" "$RH_SINK" "$RH_ECHO" ;;
  rathole-tls) start_rathole rathole-tls tls "$RHT_CONTROL" "$RHT_SINK" "$RHT_ECHO" ;;
  direct) ;;
  *) echo "unknown config $c" >&2; exit 2 ;;
  esac
done

APPS="python3 $OUT/bin/apps.py"
json_num() { sed -E "s/.*\"$1\": *([-0-9.eE+]+).*/\1/"; }
read -r -a CFG <<< "$CONFIGS"
n=${#CFG[@]}

echo "== warm-up: 64 MiB and 1000 pings per path"
for c in "${CFG[@]}"; do
  $APPS send "${PATH_SINK[$c]}" $((64 << 20)) > /dev/null
  $APPS ping "${PATH_ECHO[$c]}" 1000 0 > /dev/null
done

echo "== throughput: $BYTES bytes per run"
for i in $(seq "$RUNS"); do
  for k in $(seq 0 $((n - 1))); do
    c=${CFG[$(((k + i - 1) % n))]}
    # shellcheck disable=SC2086
    before=$( [ -n "${PATH_PIDS[$c]}" ] && cpu_ticks ${PATH_PIDS[$c]} || echo 0)
    r=$($APPS send "${PATH_SINK[$c]}" "$BYTES")
    # shellcheck disable=SC2086
    after=$( [ -n "${PATH_PIDS[$c]}" ] && cpu_ticks ${PATH_PIDS[$c]} || echo 0)
    bps=$(json_num bytes_per_sec <<< "$r")
    cpu=$(echo "($after - $before) / $(getconf CLK_TCK) / ($BYTES / 1073741824)" | bc -l)
    printf 'throughput\t%s\t%s\t%s\t%s\n' "$c" "$i" "$bps" "$cpu" >> "$OUT/results.tsv"
    printf '   %-8s run %s: %8.1f MiB/s  (tunnel processes: %.2f CPU-s/GiB)\n' \
      "$c" "$i" "$(echo "$bps / 1048576" | bc -l)" "$cpu"
  done
done

echo "== latency: 64-byte ping-pong, $PINGS round trips after $WARMUP_PINGS"
for i in $(seq "$RUNS"); do
  for k in $(seq 0 $((n - 1))); do
    c=${CFG[$(((k + i - 1) % n))]}
    r=$($APPS ping "${PATH_ECHO[$c]}" "$PINGS" "$WARMUP_PINGS")
    p50=$(json_num p50_us <<< "$r"); p99=$(json_num p99_us <<< "$r")
    printf 'latency\t%s\t%s\t%s\t%s\n' "$c" "$i" "$p50" "$p99" >> "$OUT/results.tsv"
    printf '   %-8s run %s: p50 %7.1f us  p99 %7.1f us\n' "$c" "$i" "$p50" "$p99"
  done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"

python3 - "$OUT/results.tsv" "$CONFIGS" > "$OUT/summary.md" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
configs = sys.argv[2].split()
def vals(kind, c, col):
    return [float(r[col]) for r in rows if r[0] == kind and r[1] == c]
def fmt(v, scale=1.0, d=1):
    return f"**{statistics.median(v)/scale:.{d}f}** ({min(v)/scale:.{d}f}-{max(v)/scale:.{d}f})"
MIB = 1048576.0
print("| path | runs | MiB/s median (min-max) | tunnel CPU-s per GiB median | x direct | x rathole | x rathole-tls |")
print("|---|---:|---|---:|---:|---:|---:|")
tp = {c: vals("throughput", c, 3) for c in configs}
for c in configs:
    v = tp[c]
    if not v:
        continue
    med = statistics.median(v)
    cpu = statistics.median(vals("throughput", c, 4)) if c != "direct" else float("nan")
    xd = f"{med / statistics.median(tp['direct']):.2f}" if tp.get("direct") else "-"
    xr = f"{med / statistics.median(tp['rathole']):.2f}" if tp.get("rathole") else "-"
    xrt = f"{med / statistics.median(tp['rathole-tls']):.2f}" if tp.get("rathole-tls") else "-"
    cpu_s = "-" if c == "direct" else f"{cpu:.2f}"
    print(f"| {c} | {len(v)} | {fmt(v, MIB)} | {cpu_s} | {xd} | {xr} | {xrt} |")
print()
print("| path | runs | p50 us median (min-max) | p99 us median (min-max) | p50 added over direct | p99 added over direct |")
print("|---|---:|---|---|---:|---:|")
lat50 = {c: vals("latency", c, 3) for c in configs}
lat99 = {c: vals("latency", c, 4) for c in configs}
for c in configs:
    if not lat50[c]:
        continue
    a50 = a99 = "-"
    if lat50.get("direct"):
        a50 = f"{statistics.median(lat50[c]) - statistics.median(lat50['direct']):+.1f} us"
        a99 = f"{statistics.median(lat99[c]) - statistics.median(lat99['direct']):+.1f} us"
    print(f"| {c} | {len(lat50[c])} | {fmt(lat50[c])} | {fmt(lat99[c])} | {a50} | {a99} |")
PY
echo
cat "$OUT/summary.md"
