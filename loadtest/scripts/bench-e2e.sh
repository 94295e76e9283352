#!/usr/bin/env bash
# End to end through client, relay and agent, measured as a user would (issues 4 and 12), all
# in one run, every path against the same apps:
#   throughput: one TCP connection carries BYTES (default 1 GiB) from a sender app to a sink app
#               that answers one byte when it has them all (the time runs until that byte);
#   latency:    a 64-byte ping-pong against an echo app, PINGS round trips (default 10000)
#               after WARMUP (default 1000), p50 and p99 of the round trip;
#   iperf3:     1 stream and 8 parallel streams (-P 8), client -> device and device -> client
#               (-R), IPERF_SECONDS each (default 10), Gbit/s received (end.sum_received of
#               `iperf3 -J`); one iperf3 server per path on the device side, the iperf3 client
#               dialing the path's entry; CPU seconds per GB (10^9 bytes received) of all the
#               path's tunnel processes over a round's four iperf3 runs (/proc/PID/stat);
#   held:       HELD connections (default 1000) to the echo app through the path, each carrying
#               a 16-byte round trip, held together; the summed RSS (VmRSS) of the path's tunnel
#               processes before, while held and 5 s after all closed: KiB per held connection
#               and the share of the growth given back. Each round restarts the path's processes
#               first (last phase), so that rounds do not feed on each other's leftovers.
# The paths (BENCH_CONFIGS) between the same apps (Python, bench-e2e-apps.py):
#   direct  : one loopback TCP connection (the baseline; no tunnel processes);
#   plain   : app -> iotunnel client -> relay (ws, --relay-plaintext) -> agent -> app;
#   tls     : the same with the relay on wss (the generated CA);
#   rathole : app -> rathole server -> rathole client -> app (plain TCP transport);
#   rathole-tls : the same over rathole's TLS transport (its default native-tls build, a
#             P-256 certificate for localhost made with openssl), to compare with tls;
#   bore    : app -> bore server -> bore local -> app (bore has one transport: TCP; --secret on,
#             one `bore local` per service, as bore exposes one port per process).
# Tunnel processes (CPU and RSS): iotunnel client + server + agent; rathole server + client;
# bore server + its locals. Every path is set up once and stays up (idle ones cost nothing
# measurable); each phase runs RUNS rounds (default 5), each round the paths back to back in a
# rotating order. A path that fails to set up, a tunnel process that dies and a measurement that
# fails are printed at once and written to results.tsv and summary.md (SETUP FAILED, DIED,
# FAILED), never counted as 0; the other paths go on.
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
#   BENCH_IPERF_SECONDS (10), BENCH_HELD (1000), BENCH_HELD_SETTLE (seconds after the close, 5),
#   BENCH_CONFIGS ("direct plain tls rathole rathole-tls bore"), BENCH_MQTT
#   (mqtt://127.0.0.1:1883, for the plain path), BENCH_QUIET_WAIT (seconds to wait for other
#   benchmarks before starting; default 1800), BENCH_BIN_DIR (a folder with a built iotunnel:
#   no cargo at all), IPERF3, RATHOLE, BORE (the binaries; see lib-tools.sh, which installs the
#   missing ones unless BENCH_INSTALL=0).
# Needs: python3, curl, openssl, bc, mosquitto_pub/mosquitto_sub and a broker (plain path only).
# Results: $OUT/summary.md (printed at the end), $OUT/iperf/*.json (every iperf3 run), $OUT/logs/,
# and $OUT/results.tsv, one line per measurement (RUN 0 is the warm-up):
#   throughput CONFIG RUN BYTES_PER_S CPU_S_PER_GIB
#   latency    CONFIG RUN P50_US P99_US
#   iperf      CONFIG RUN STREAMS normal|reverse GBIT_S BYTES_RECEIVED CPU_S STREAMS_MIN/MAX
#   iperf_cpu  CONFIG RUN CPU_S_PER_GB CPU_S BYTES        (the round's four iperf3 runs together)
#   held       CONFIG RUN N BEFORE_KIB DURING_KIB AFTER_KIB KIB_PER_CONN GIVEN_BACK_PCT NAME=KIB,...
#   fail       CONFIG RUN MEASURE WHY                     (a failed measurement or a death)
#   path       CONFIG ok|setup-failed|died WHY            (one per path, at the end)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${1:-5}
OUT=${2:-/work/scratch/bench-e2e}
BYTES=${BENCH_BYTES:-1073741824}
PINGS=${BENCH_PINGS:-10000}
WARMUP_PINGS=${BENCH_WARMUP_PINGS:-1000}
IPERF_SECONDS=${BENCH_IPERF_SECONDS:-10}
HELD=${BENCH_HELD:-1000}
HELD_SETTLE=${BENCH_HELD_SETTLE:-5}
CONFIGS=${BENCH_CONFIGS:-direct plain tls rathole rathole-tls bore}
MQTT=${BENCH_MQTT:-mqtt://127.0.0.1:1883}
QUIET_WAIT=${BENCH_QUIET_WAIT:-1800}
BENCH_INSTALL=${BENCH_INSTALL:-1}
# shellcheck source=loadtest/scripts/lib-tools.sh
. "$ROOT/loadtest/scripts/lib-tools.sh"
export IOTUNNEL_ADMIN_KEY=${IOTUNNEL_ADMIN_KEY:-bench-e2e-admin-key-0123456789abcdef}
export IOTUNNEL_API_KEY=$IOTUNNEL_ADMIN_KEY
# Ports (fixed, away from bench-relay.sh's and bench-create.sh's). Apps on the device side:
SINK=127.0.0.1:18691
ECHO=127.0.0.1:18692
declare -A IPERF_SERVER=([direct]=127.0.0.1:18693 [plain]=127.0.0.1:18694 [tls]=127.0.0.1:18695
  [rathole]=127.0.0.1:18696 [rathole-tls]=127.0.0.1:18697 [bore]=127.0.0.1:18698)
# Servers and the paths' entries on the client side:
TLS_API=127.0.0.1:18381 TLS_METRICS=127.0.0.1:19381 TLS_RELAY=127.0.0.1:18643
PLAIN_API=127.0.0.1:18382 PLAIN_METRICS=127.0.0.1:19382 PLAIN_RELAY=127.0.0.1:18644
TLS_SINK=127.0.0.1:18661 TLS_ECHO=127.0.0.1:18662 TLS_IPERF=127.0.0.1:18663
PLAIN_SINK=127.0.0.1:18671 PLAIN_ECHO=127.0.0.1:18672 PLAIN_IPERF=127.0.0.1:18673
RH_CONTROL=127.0.0.1:18650 RH_SINK=127.0.0.1:18651 RH_ECHO=127.0.0.1:18652 RH_IPERF=127.0.0.1:18656
RHT_CONTROL=127.0.0.1:18653 RHT_SINK=127.0.0.1:18654 RHT_ECHO=127.0.0.1:18655 RHT_IPERF=127.0.0.1:18657
# bore's control port is fixed (7835 in bore's source); its tunnels take ports from a range.
BORE_CONTROL=127.0.0.1:7835 BORE_MIN_PORT=18680 BORE_MAX_PORT=18689
BORE_SINK=127.0.0.1:18681 BORE_ECHO=127.0.0.1:18682 BORE_IPERF=127.0.0.1:18683

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/data" "$OUT/iperf" "$OUT/logs" && mkdir -p "$OUT/data" "$OUT/bin" "$OUT/logs" "$OUT/iperf"
: > "$OUT/results.tsv"
# A held connection is a descriptor in the app, the entry and the exit (two in a relay or a
# rathole/bore server): every process here inherits this limit.
want=$((4 * HELD + 1024))
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge "$want" ] || ulimit -n "$want" 2>/dev/null ||
  ulimit -n "$(ulimit -Hn)"

# Wait for other benchmarks (they and this one would disturb each other).
waited=0
while pgrep -f 'bench-relay.sh|bench-create.sh|iotunnel-loadtest' >/dev/null; do
  if [ "$waited" -ge "$QUIET_WAIT" ]; then echo "other benchmarks still running; going on" >&2; break; fi
  [ "$waited" = 0 ] && echo "waiting for other benchmarks to finish..."
  sleep 10
  waited=$((waited + 10))
done

if [ -n "${BENCH_BIN_DIR:-}" ]; then
  BUILT=$BENCH_BIN_DIR/iotunnel
else
  if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --release -p iotunnel)
  fi
  # Where cargo put it (CARGO_TARGET_DIR, or the workspace's target/).
  TARGET=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  BUILT=$TARGET/release/iotunnel
fi
# A private copy: another session's build must not swap the binary mid-run.
cp "$BUILT" "$OUT/bin/iotunnel.new" && mv "$OUT/bin/iotunnel.new" "$OUT/bin/iotunnel"
IOT=$OUT/bin/iotunnel
cp "$ROOT/loadtest/scripts/bench-e2e-apps.py" "$OUT/bin/apps.py"
apps() { python3 "$OUT/bin/apps.py" "$@"; }

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  clear_presence
}
clear_presence() { # the retained presence the plain path left on the broker
  [ -n "${PK_PLAIN:-}" ] || return 0
  for dn in dev-1 dev-1-ws; do
    mosquitto_pub -L "$MQTT/iotunnel/$PK_PLAIN/$dn/presence" -r -n -q 1 2>/dev/null || true
  done
}
trap cleanup EXIT
wait_port() { # host:port
  for _ in $(seq 200); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.05; done
  echo "nothing listens on $1" >&2
  return 1
}
field() { sed -n "s/^ *\"$1\": \"\(.*\)\",\{0,1\}$/\1/p"; } # one string field of --json output
json_num() { sed -E "s/.*\"$1\": *([-0-9.eE+]+|NaN).*/\1/"; }
cpu_ticks() { # PIDS... -> utime+stime ticks summed (every thread of each process)
  local t=0 p v
  for p in "$@"; do
    # A process that is gone counts nothing here; the measurement then reports it dead.
    v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}')
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
CLK_TCK=$(getconf CLK_TCK)

{
  echo "date: $(date -u +%FT%TZ)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "rustc: $(rustc --version 2>/dev/null || echo '?')"
  echo "python: $(python3 --version 2>&1)"
  echo "iperf3: $("$IPERF3" --version 2>/dev/null | head -1)"
  echo "rathole: $("$RATHOLE" --version 2>/dev/null | sed -n 's/^Build Version: *//p') ($RATHOLE)"
  echo "bore: $("$BORE" --version 2>/dev/null) ($BORE)"
  echo "git: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?') (+ uncommitted changes: $(cd "$ROOT" && git status --porcelain | wc -l) paths)"
  echo "runs: $RUNS, bytes $BYTES, pings $PINGS after $WARMUP_PINGS, iperf3 ${IPERF_SECONDS}s, held $HELD, configs: $CONFIGS"
  echo "open files limit: $(ulimit -n)"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

python3 "$OUT/bin/apps.py" servers "$SINK" "$ECHO" > "$OUT/logs/apps.log" 2>&1 & PIDS+=($!)
wait_port "$SINK"; wait_port "$ECHO"

# Each path: its entries (PATH_SINK/ECHO/IPERF), its tunnel processes (PATH_PIDS, with a name
# and a log each in PATH_NAMES and PATH_LOGS), and PATH_STATUS ok | setup-failed | died with
# PATH_WHY. A setup function returns 1 with SETUP_WHY set at the first step that fails (they run
# under `if`, where bash ignores set -e, so every step says `|| { why ...; return 1; }`).
declare -A PATH_SINK PATH_ECHO PATH_IPERF PATH_PIDS PATH_NAMES PATH_LOGS PATH_STATUS PATH_WHY
declare -A IPERF_PID
why() { SETUP_WHY=$1; }
add_proc() { # CONFIG NAME PID LOG: one tunnel process of a path
  PATH_PIDS[$1]="${PATH_PIDS[$1]:-} $3"
  PATH_NAMES[$1]="${PATH_NAMES[$1]:-} $2"
  PATH_LOGS[$1]="${PATH_LOGS[$1]:-} $4"
}

start_iperf_server() { # CONFIG: this path's iperf3 server (the device side)
  local addr=${IPERF_SERVER[$1]}
  "$IPERF3" -s -B "${addr%:*}" -p "${addr#*:}" --rcv-timeout 15000 \
    >> "$OUT/logs/$1-iperf3-server.log" 2>&1 &
  IPERF_PID[$1]=$!
  PIDS+=($!)
  wait_port "$addr"
}

# --- rathole: server and client on loopback, transport tcp or tls ------------------------
start_rathole() { # NAME TRANSPORT CONTROL SINK ECHO IPERF
  local name=$1 transport=$2 control=$3 sink=$4 echo=$5 iperf=$6 dir="$OUT/data/$1"
  local server_tls="" client_tls=""
  [ -x "$RATHOLE" ] || { why "no rathole binary at $RATHOLE"; return 1; }
  mkdir -p "$dir"
  if [ "$transport" = tls ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -subj /CN=localhost -addext subjectAltName=DNS:localhost \
      -addext basicConstraints=critical,CA:TRUE \
      -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null &&
      openssl pkcs12 -export -inkey "$dir/key.pem" -in "$dir/cert.pem" \
        -out "$dir/identity.p12" -passout pass:bench-e2e || { why "openssl failed"; return 1; }
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
[server.services.iperf]
token = "bench-e2e"
bind_addr = "$iperf"
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
[client.services.iperf]
token = "bench-e2e"
local_addr = "${IPERF_SERVER[$name]}"
EOF
  "$RATHOLE" --server "$dir/server.toml" >> "$OUT/logs/$name-server.log" 2>&1 &
  PIDS+=($!)
  add_proc "$name" "rathole-server" $! "$OUT/logs/$name-server.log"
  wait_port "$control" || { why "the rathole server does not listen on $control"; return 1; }
  "$RATHOLE" --client "$dir/client.toml" >> "$OUT/logs/$name-client.log" 2>&1 &
  PIDS+=($!)
  add_proc "$name" "rathole-client" $! "$OUT/logs/$name-client.log"
  # The server binds a service's port once that service's client is in.
  wait_port "$sink" && wait_port "$echo" && wait_port "$iperf" ||
    { why "rathole's services never listened ($sink $echo $iperf)"; return 1; }
  PATH_SINK[$name]=$sink; PATH_ECHO[$name]=$echo; PATH_IPERF[$name]=$iperf
}

# --- bore: server and one `bore local` per service, on loopback, with a secret -----------
start_bore() {
  [ -x "$BORE" ] || { why "no bore binary at $BORE"; return 1; }
  (exec 3<>"/dev/tcp/${BORE_CONTROL%:*}/${BORE_CONTROL#*:}") 2>/dev/null &&
    { why "something already listens on bore's fixed control port $BORE_CONTROL"; return 1; }
  "$BORE" server --secret bench-e2e --bind-addr 127.0.0.1 --min-port "$BORE_MIN_PORT" \
    --max-port "$BORE_MAX_PORT" >> "$OUT/logs/bore-server.log" 2>&1 &
  PIDS+=($!)
  add_proc bore bore-server $! "$OUT/logs/bore-server.log"
  wait_port "$BORE_CONTROL" || { why "the bore server does not listen on $BORE_CONTROL"; return 1; }
  local svc local_addr entry
  for svc in "sink $SINK $BORE_SINK" "echo $ECHO $BORE_ECHO" "iperf ${IPERF_SERVER[bore]} $BORE_IPERF"; do
    read -r svc local_addr entry <<< "$svc"
    "$BORE" local "${local_addr#*:}" --local-host "${local_addr%:*}" --to "${BORE_CONTROL%:*}" \
      --port "${entry#*:}" --secret bench-e2e >> "$OUT/logs/bore-local-$svc.log" 2>&1 &
    PIDS+=($!)
    add_proc bore "bore-local-$svc" $! "$OUT/logs/bore-local-$svc.log"
    wait_port "$entry" || { why "bore local for $svc never listened on $entry"; return 1; }
  done
  PATH_SINK[bore]=$BORE_SINK; PATH_ECHO[bore]=$BORE_ECHO; PATH_IPERF[bore]=$BORE_IPERF
}

# --- iotunnel ------------------------------------------------------------------------------
start_server() { # NAME API METRICS RELAY EXTRA... -> $SRV_PID, $SRV_DIR
  local name=$1 api=$2 metrics=$3 relay=$4; shift 4
  SRV_DIR="$OUT/data/$name"
  mkdir -p "$SRV_DIR"
  "$IOT" server --data-dir "$SRV_DIR" --api-addr "$api" --metrics-addr "$metrics" \
    --relay-addr "$relay" "$@" >> "$OUT/logs/$name-server.log" 2>&1 &
  SRV_PID=$!
  PIDS+=("$SRV_PID")
  for _ in $(seq 100); do curl -fs "http://$api/healthz" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "server $name did not come up" >&2
  return 1
}
wait_connected() { # API TUNNEL_ID
  local d
  for _ in $(seq 200); do
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

# TLS: the device channel, as in the README.
start_tls() {
  local pk secret url token tunnel ca
  start_server tls "$TLS_API" "$TLS_METRICS" "$TLS_RELAY" || { why "the server did not come up"; return 1; }
  add_proc tls server "$SRV_PID" "$OUT/logs/tls-server.log"
  ca=$SRV_DIR/tls/ca.pem
  pk=$("$IOT" product create --name bench --api "http://$TLS_API" --json | field product_key)
  [ -n "$pk" ] || { why "product create failed"; return 1; }
  secret=$("$IOT" device create --product-key "$pk" --name dev-1 --api "http://$TLS_API" --json | field device_secret)
  [ -n "$secret" ] || { why "device create failed"; return 1; }
  IOTUNNEL_DEVICE_SECRET=$secret "$IOT" device --api "http://$TLS_API" --product-key "$pk" \
    --device-name dev-1 --service "SINK=$SINK" --service "ECHO=$ECHO" \
    --service "IPERF=${IPERF_SERVER[tls]}" --ca-file "$ca" >> "$OUT/logs/tls-agent.log" 2>&1 &
  PIDS+=($!)
  local agent=$!
  wait_online "$TLS_API" "$pk" dev-1 || { why "the agent never came online"; return 1; }
  "$IOT" tunnel create --product-key "$pk" --device-name dev-1 --service SINK --service ECHO \
    --service IPERF --api "http://$TLS_API" --json > "$OUT/data/tls-tunnel.json" ||
    { why "tunnel create failed"; return 1; }
  url=$(field client_url < "$OUT/data/tls-tunnel.json")
  token=$(field client_token < "$OUT/data/tls-tunnel.json")
  tunnel=$(field tunnel_id < "$OUT/data/tls-tunnel.json")
  IOTUNNEL_TOKEN=$token "$IOT" client --url "$url" --ca-file "$ca" --listen "SINK=$TLS_SINK" \
    --listen "ECHO=$TLS_ECHO" --listen "IPERF=$TLS_IPERF" >> "$OUT/logs/tls-client.log" 2>&1 &
  PIDS+=($!)
  add_proc tls client $! "$OUT/logs/tls-client.log"
  add_proc tls agent "$agent" "$OUT/logs/tls-agent.log"
  wait_port "$TLS_SINK" && wait_port "$TLS_ECHO" && wait_port "$TLS_IPERF" ||
    { why "the client never listened"; return 1; }
  wait_connected "$TLS_API" "$tunnel" || { why "the tunnel never connected on both sides"; return 1; }
  PATH_SINK[tls]=$TLS_SINK; PATH_ECHO[tls]=$TLS_ECHO; PATH_IPERF[tls]=$TLS_IPERF
}

# Plain (ws): see the top of this file.
start_plain() {
  local topic sub token tunnel
  start_server plain "$PLAIN_API" "$PLAIN_METRICS" "$PLAIN_RELAY" --relay-plaintext --mqtt-url "$MQTT" ||
    { why "the server did not come up (is an MQTT broker at $MQTT?)"; return 1; }
  add_proc plain server "$SRV_PID" "$OUT/logs/plain-server.log"
  PK_PLAIN=$("$IOT" product create --name bench --api "http://$PLAIN_API" --json | field product_key)
  [ -n "$PK_PLAIN" ] || { why "product create failed"; return 1; }
  "$IOT" device create --product-key "$PK_PLAIN" --name dev-1 --api "http://$PLAIN_API" --json > /dev/null ||
    { why "device create failed"; return 1; }
  topic=iotunnel/$PK_PLAIN
  # The agent, as dev-1-ws: it subscribes before it announces itself.
  "$IOT" device --api "http://$PLAIN_API" --product-key "$PK_PLAIN" --device-name dev-1-ws \
    --mqtt-url "$MQTT" --service "SINK=$SINK" --service "ECHO=$ECHO" \
    --service "IPERF=${IPERF_SERVER[plain]}" >> "$OUT/logs/plain-agent.log" 2>&1 &
  PIDS+=($!)
  local agent=$!
  [ "$(mosquitto_sub -L "$MQTT/$topic/dev-1-ws/presence" -C 1 -W 20)" = online ] ||
    { why "the MQTT agent never announced itself on $MQTT"; return 1; }
  # dev-1 is online by its presence; the server then publishes each connect on its topic.
  mosquitto_sub -L "$MQTT/$topic/dev-1/notify" -C 1 -W 30 > "$OUT/data/plain-note.json" &
  sub=$!
  sleep 0.5
  mosquitto_pub -L "$MQTT/$topic/dev-1/presence" -r -q 1 -m online
  wait_online "$PLAIN_API" "$PK_PLAIN" dev-1 || { why "dev-1 never came online by MQTT"; return 1; }
  "$IOT" tunnel create --product-key "$PK_PLAIN" --device-name dev-1 --service SINK --service ECHO \
    --service IPERF --api "http://$PLAIN_API" --json > "$OUT/data/plain-tunnel.json" ||
    { why "tunnel create failed"; return 1; }
  wait "$sub" && grep -q '"operation":"connect"' "$OUT/data/plain-note.json" ||
    { why "no connect notification on the broker"; return 1; }
  sed 's#"url":"wss://#"url":"ws://#' "$OUT/data/plain-note.json" |
    mosquitto_pub -L "$MQTT/$topic/dev-1-ws/notify" -q 1 -s
  token=$(field client_token < "$OUT/data/plain-tunnel.json")
  tunnel=$(field tunnel_id < "$OUT/data/plain-tunnel.json")
  IOTUNNEL_TOKEN=$token "$IOT" client --url "ws://$PLAIN_RELAY" --listen "SINK=$PLAIN_SINK" \
    --listen "ECHO=$PLAIN_ECHO" --listen "IPERF=$PLAIN_IPERF" >> "$OUT/logs/plain-client.log" 2>&1 &
  PIDS+=($!)
  add_proc plain client $! "$OUT/logs/plain-client.log"
  add_proc plain agent "$agent" "$OUT/logs/plain-agent.log"
  wait_port "$PLAIN_SINK" && wait_port "$PLAIN_ECHO" && wait_port "$PLAIN_IPERF" ||
    { why "the client never listened"; return 1; }
  wait_connected "$PLAIN_API" "$tunnel" || { why "the tunnel never connected on both sides"; return 1; }
  PATH_SINK[plain]=$PLAIN_SINK; PATH_ECHO[plain]=$PLAIN_ECHO; PATH_IPERF[plain]=$PLAIN_IPERF
}

start_direct() {
  PATH_SINK[direct]=$SINK; PATH_ECHO[direct]=$ECHO; PATH_IPERF[direct]=${IPERF_SERVER[direct]}
  PATH_PIDS[direct]=""
}

start_path() { # CONFIG
  [ -x "$IPERF3" ] || { why "no iperf3 binary at $IPERF3"; return 1; }
  start_iperf_server "$1" || { why "its iperf3 server did not listen on ${IPERF_SERVER[$1]}"; return 1; }
  case $1 in
  direct) start_direct ;;
  tls) start_tls ;;
  plain) start_plain ;;
  rathole) start_rathole rathole tcp "$RH_CONTROL" "$RH_SINK" "$RH_ECHO" "$RH_IPERF" ;;
  rathole-tls) start_rathole rathole-tls tls "$RHT_CONTROL" "$RHT_SINK" "$RHT_ECHO" "$RHT_IPERF" ;;
  bore) start_bore ;;
  *) why "unknown config"; return 1 ;;
  esac
}

# A tunnel process that is gone or a zombie: "NAME (pid P) exited with status S; log: ..."
path_dead() { # CONFIG -> 0 and the first dead process, or 1 when all are up
  local p st i=0 code
  local -a names logs
  read -r -a names <<< "${PATH_NAMES[$1]:-}"
  read -r -a logs <<< "${PATH_LOGS[$1]:-}"
  for p in ${PATH_PIDS[$1]:-}; do
    st=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1)
    if [ -z "$st" ] || [ "$st" = Z ]; then
      code=0
      wait "$p" 2>/dev/null || code=$?
      [ "$code" = 127 ] && code="unknown" # not this shell's child (any more)
      echo "${names[$i]} (pid $p) exited with status $code; last log line: $(tail -n 1 "${logs[$i]}" 2>/dev/null | cut -c1-300)"
      return 0
    fi
    i=$((i + 1))
  done
  return 1
}

bring_up() { # CONFIG WHEN: start_path, and say whether the path is up (PATH_STATUS)
  local dead=""
  SETUP_WHY=""
  if start_path "$1" && ! dead=$(path_dead "$1"); then
    PATH_STATUS[$1]=ok
    echo "== $1: up$2 (tunnel processes:${PATH_NAMES[$1]:- none})"
    return 0
  fi
  [ -n "$dead" ] || dead=$(path_dead "$1") || true
  [ -n "$dead" ] && SETUP_WHY="${SETUP_WHY:+$SETUP_WHY; }$dead"
  PATH_STATUS[$1]=setup-failed; PATH_WHY[$1]="${SETUP_WHY:-unknown}$2"
  echo "!! $1: SETUP FAILED$2: ${PATH_WHY[$1]} (logs in $OUT/logs)" >&2
  return 1
}
stop_path() { # CONFIG: its tunnel processes and iperf3 server, and its data, for a fresh start
  local p
  for p in ${PATH_PIDS[$1]:-} ${IPERF_PID[$1]:-}; do kill "$p" 2>/dev/null || true; done
  for p in ${PATH_PIDS[$1]:-} ${IPERF_PID[$1]:-}; do wait "$p" 2>/dev/null || true; done
  PATH_PIDS[$1]=""; PATH_NAMES[$1]=""; PATH_LOGS[$1]=""
  [ "$1" = plain ] && clear_presence
  rm -rf "${OUT:?}/data/$1"
}

for c in $CONFIGS; do
  bring_up "$c" "" || true
done

# measure CONFIG RUN MEASURE CMD...: runs CMD, its stdout in $R. Returns 1 (and writes a `fail`
# line, and says it) when CMD failed or a tunnel process of the path died meanwhile; a death
# takes the path out of the later measurements.
measure() {
  local c=$1 run=$2 m=$3 rc=0 dead err
  shift 3
  R=$("$@" 2> "$OUT/data/stderr") || rc=$?
  if dead=$(path_dead "$c"); then
    PATH_STATUS[$c]=died; PATH_WHY[$c]="during $m, run $run: $dead"
    printf 'fail\t%s\t%s\t%s\t%s\n' "$c" "$run" "$m" "tunnel process died: $dead" >> "$OUT/results.tsv"
    echo "!! $c run $run, $m: TUNNEL PROCESS DIED: $dead" >&2
    return 1
  fi
  if [ "$rc" != 0 ]; then
    err=$(tail -c 400 "$OUT/data/stderr" | tr '\t\n' '  ')
    printf 'fail\t%s\t%s\t%s\t%s\n' "$c" "$run" "$m" "exit $rc: $err" >> "$OUT/results.tsv"
    echo "!! $c run $run, $m: FAILED (exit $rc): $err" >&2
    return 1
  fi
}
up() { [ "${PATH_STATUS[$1]}" = ok ]; }

# A run that stalls fails (after SECONDS + 20 s at most) instead of hanging the benchmark. One
# way it stalls: at the end of a -R run the iperf3 client stops reading its data connections and
# waits for the results on its control connection; through a tunnel that carries every
# connection on one reader without per-connection flow control, the unread data can hold the
# results back for good.
iperf_run() { # CONFIG STREAMS DIRECTION(normal|reverse) SECONDS JSON -> "Gbit/s<TAB>bytes<TAB>fair"
  local entry=${PATH_IPERF[$1]} r rc=0
  local -a rev=()
  # iperf3 takes --rcv-timeout only when receiving.
  [ "$3" = reverse ] && rev=(-R --rcv-timeout 15000)
  timeout $(($4 + 20)) "$IPERF3" -c "${entry%:*}" -p "${entry#*:}" -P "$2" "${rev[@]}" -t "$4" -J \
    --connect-timeout 5000 > "$5" || rc=$?
  [ "$rc" = 124 ] && rc="124, stalled: killed after $(($4 + 20)) s"
  r=$(apps iperf "$5")
  case $r in
  ERROR*) echo "iperf3 (exit $rc): ${r#ERROR }" >&2; return 1 ;;
  esac
  [ "$rc" = 0 ] || { echo "iperf3 exit $rc" >&2; return 1; }
  echo "$r"
}
restart_iperf_server() { # CONFIG: after a failed run, which can leave the server busy
  kill "${IPERF_PID[$1]}" 2>/dev/null || true
  wait "${IPERF_PID[$1]}" 2>/dev/null || true
  start_iperf_server "$1" || echo "!! $1: its iperf3 server did not come back" >&2
}

read -r -a CFG <<< "$CONFIGS"
n=${#CFG[@]}
# The config at position K of round I: each round starts one further along.
rotated() { echo "${CFG[$((($1 + $2 - 1) % n))]}"; }

echo "== warm-up: 64 MiB, 1000 pings and a 1 s iperf3 run per path"
for c in "${CFG[@]}"; do
  up "$c" || continue
  measure "$c" 0 warmup-send apps send "${PATH_SINK[$c]}" $((64 << 20)) || continue
  measure "$c" 0 warmup-ping apps ping "${PATH_ECHO[$c]}" 1000 0 || continue
  measure "$c" 0 warmup-iperf iperf_run "$c" 1 normal 1 "$OUT/iperf/$c-warmup.json" ||
    restart_iperf_server "$c"
done

echo "== throughput: $BYTES bytes per run"
for i in $(seq "$RUNS"); do
  for k in $(seq 0 $((n - 1))); do
    c=$(rotated "$k" "$i")
    up "$c" || continue
    # shellcheck disable=SC2086
    before=$(cpu_ticks ${PATH_PIDS[$c]})
    measure "$c" "$i" throughput apps send "${PATH_SINK[$c]}" "$BYTES" || continue
    # shellcheck disable=SC2086
    after=$(cpu_ticks ${PATH_PIDS[$c]})
    bps=$(json_num bytes_per_sec <<< "$R")
    cpu=$(printf '%.4f' "$(echo "($after - $before) / $CLK_TCK / ($BYTES / 1073741824)" | bc -l)")
    printf 'throughput\t%s\t%s\t%s\t%s\n' "$c" "$i" "$bps" "$cpu" >> "$OUT/results.tsv"
    printf '   %-11s run %s: %8.1f MiB/s  (tunnel processes: %.2f CPU-s/GiB)\n' \
      "$c" "$i" "$(echo "$bps / 1048576" | bc -l)" "$cpu"
  done
done

echo "== latency: 64-byte ping-pong, $PINGS round trips after $WARMUP_PINGS"
for i in $(seq "$RUNS"); do
  for k in $(seq 0 $((n - 1))); do
    c=$(rotated "$k" "$i")
    up "$c" || continue
    measure "$c" "$i" latency apps ping "${PATH_ECHO[$c]}" "$PINGS" "$WARMUP_PINGS" || continue
    p50=$(json_num p50_us <<< "$R"); p99=$(json_num p99_us <<< "$R")
    printf 'latency\t%s\t%s\t%s\t%s\n' "$c" "$i" "$p50" "$p99" >> "$OUT/results.tsv"
    printf '   %-11s run %s: p50 %7.1f us  p99 %7.1f us\n' "$c" "$i" "$p50" "$p99"
  done
done

echo "== iperf3: 1 and 8 streams, both directions, ${IPERF_SECONDS}s each"
for i in $(seq "$RUNS"); do
  for k in $(seq 0 $((n - 1))); do
    c=$(rotated "$k" "$i")
    cpu_sum=0 bytes_sum=0
    for test in "1 normal" "1 reverse" "8 normal" "8 reverse"; do
      up "$c" || continue
      read -r streams direction <<< "$test"
      # shellcheck disable=SC2086
      before=$(cpu_ticks ${PATH_PIDS[$c]})
      if ! measure "$c" "$i" "iperf-$streams-$direction" \
        iperf_run "$c" "$streams" "$direction" "$IPERF_SECONDS" "$OUT/iperf/$c-P$streams-$direction-run$i.json"; then
        up "$c" && restart_iperf_server "$c"
        continue
      fi
      # shellcheck disable=SC2086
      after=$(cpu_ticks ${PATH_PIDS[$c]})
      read -r gbps bytes fair <<< "$R"
      cpu=$(printf '%.2f' "$(echo "($after - $before) / $CLK_TCK" | bc -l)")
      cpu_sum=$(echo "$cpu_sum + $cpu" | bc -l); bytes_sum=$((bytes_sum + bytes))
      printf 'iperf\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$i" "$streams" "$direction" "$gbps" "$bytes" "$cpu" "$fair" >> "$OUT/results.tsv"
      printf '   %-11s run %s: %s stream(s) %-7s %7.2f Gbit/s  (tunnel processes: %.2f CPU-s; streams min/max %s)\n' \
        "$c" "$i" "$streams" "$direction" "$gbps" "$cpu" "$fair"
    done
    if [ "$c" != direct ] && [ "$bytes_sum" -gt 0 ]; then
      per_gb=$(printf '%.4f' "$(echo "$cpu_sum / ($bytes_sum / 1000000000)" | bc -l)")
      printf 'iperf_cpu\t%s\t%s\t%s\t%s\t%s\n' "$c" "$i" "$per_gb" "$cpu_sum" "$bytes_sum" >> "$OUT/results.tsv"
      printf '   %-11s run %s: %.2f CPU-s per GB over its iperf3 runs\n' "$c" "$i" "$per_gb"
    fi
  done
done

# Each round on freshly started tunnel processes: what one round does not give back would
# otherwise serve the next round's connections, and its growth would read as nothing.
echo "== held: $HELD connections through each path, RSS before, held, ${HELD_SETTLE}s after closing"
for i in $(seq "$RUNS"); do
  for k in $(seq 0 $((n - 1))); do
    c=$(rotated "$k" "$i")
    [ "$c" != direct ] && up "$c" || continue
    stop_path "$c"
    bring_up "$c" " again for held run $i" || continue
    # One connection through first, so that what a path sets up once is in the "before".
    measure "$c" "$i" held-warmup apps ping "${PATH_ECHO[$c]}" 100 0 || continue
    sleep 1
    # shellcheck disable=SC2086
    measure "$c" "$i" held apps held "${PATH_ECHO[$c]}" "$HELD" "$HELD_SETTLE" ${PATH_PIDS[$c]} || continue
    vals=()
    for f in before_kib during_kib after_kib kib_per_conn given_back_pct; do vals+=("$(json_num "$f" <<< "$R")"); done
    # Each process's share, as NAME=KiB per connection.
    read -r -a names <<< "${PATH_NAMES[$c]}"
    IFS=, read -r -a each <<< "$(sed -E 's/.*"kib_per_conn_each": "([^"]*)".*/\1/' <<< "$R")"
    shares=""
    for j in "${!names[@]}"; do shares+="${shares:+,}${names[$j]}=${each[$j]:-?}"; done
    vals[4]=$(printf '%.1f' "${vals[4]}"); [ "${vals[4]}" = -0.0 ] && vals[4]=0.0
    printf 'held\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$i" "$HELD" "${vals[@]}" "$shares" >> "$OUT/results.tsv"
    printf '   %-11s run %s: RSS %s -> %s -> %s KiB: %.1f KiB per connection (%s), %.0f%% given back\n' \
      "$c" "$i" "${vals[0]}" "${vals[1]}" "${vals[2]}" "${vals[3]}" "$shares" "${vals[4]}"
  done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"

for c in "${CFG[@]}"; do
  printf 'path\t%s\t%s\t%s\n' "$c" "${PATH_STATUS[$c]}" "${PATH_WHY[$c]:-}" >> "$OUT/results.tsv"
done
apps summary "$OUT/results.tsv" "$CONFIGS" "$HELD_SETTLE" > "$OUT/summary.md"
echo
cat "$OUT/summary.md"
