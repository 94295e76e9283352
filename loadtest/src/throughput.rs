//! `throughput`: bulk data both ways over N tunnel pairs, as fast as the peers can go.
//!
//! Each tunnel has a device peer (`local-proxy-mode=destination`) and a client peer (`source`),
//! both AWS V3 WebSocket clients (tokio-tungstenite; wss with `--ca-file`, ws with
//! `--plaintext`). After the upgrade each skips the relay's SERVICE_IDS; the client sends
//! STREAM_START (stream 1, service `SSH`) and a CONNECTION_START for each further `--streams`
//! connection id; then both sides send DATA frames round-robin over the connection ids until
//! the end. Every WebSocket frame carries `--size` bytes of DATA payload: one message when
//! `--size` is at most 64512 (the AWS payload limit), else the fewest messages that hold it
//! (65536 = 64512 + 1024). Received DATA payload bytes are counted per tunnel and direction.
//!
//! Where the pairs come from:
//! - default: tunnels created through the API (product, device online on its channel, one
//!   tunnel per pair, the device token from the channel's `connect` notification), peers
//!   dialing the iotunnel relay;
//! - `--baseline ADDR`: no API; a random token per pair, both peers dialing a plain ws relay
//!   (`iotunnel-baseline-relay`), which sends no SERVICE_IDS;
//! - `--direct`: no relay at all. The loadtest listens itself; each client peer dials it and
//!   the accepted server-side WebSocket is handed to the device peer's endpoint, so the same
//!   endpoint code runs client <-> device with nothing between them: the baseline for
//!   "relay/direct".
//!
//! `--relay-pid PID` reads the relay's utime+stime from `/proc/PID/stat` at the start and end
//! of the measured window and reports CPU seconds per GiB forwarded.
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use clap::Args;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use iotunnel::proto::aws::{self, MessageType};
use prost::Message as _;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::setup::{Api, Fleet};

/// The subprotocol the peers offer.
const SUBPROTOCOL: &str = iotunnel::agent::dial::SUBPROTOCOL;
/// Largest WebSocket frame payload the AWS family allows.
const MAX_FRAME: usize = 131_076;
/// Handshakes (TCP, TLS, upgrade, SERVICE_IDS) must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A writer flushes after this many bytes fed (tungstenite also writes out on its own once
/// its buffer passes 128 KiB).
const FLUSH_BYTES: usize = 256 * 1024;
/// Pairs connected at once during setup.
const SETUP_CONCURRENCY: usize = 16;
/// The stream id and service of the data.
const STREAM_ID: i32 = 1;
const SERVICE: &str = "SSH";

/// `throughput` flags.
#[derive(Args, Debug)]
pub struct ThroughputArgs {
    /// Control API base URL (relay mode only).
    #[arg(long, env = "IOTUNNEL_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// API key, an account's or the admin key (relay mode only).
    #[arg(long, env = "IOTUNNEL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// How long to measure, e.g. `10s`, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Traffic before the measured window starts (`0` for none).
    #[arg(long, default_value = "1s", value_parser = parse_warmup)]
    warmup: Duration,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Tunnel pairs (device peer + client peer each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    tunnels: u32,
    /// Multiplexed connections (V3 connection ids) per tunnel; frames go round-robin over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    streams: u32,
    /// DATA payload bytes per WebSocket frame (one message up to 64512, else several).
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..=129_024))]
    size: u32,
    /// The relay serves ws:// (server started with --relay-plaintext).
    #[arg(long)]
    plaintext: bool,
    /// PEM CA the relay's certificate chains to (the server's {data-dir}/tls/ca.pem).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// The relay's host:port (default: the `client_endpoint` the API returns).
    #[arg(long, value_name = "HOST:PORT")]
    relay: Option<String>,
    /// Devices the tunnels are spread over (relay mode).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    devices: u32,
    /// No relay: client and device peers connected directly to each other, in process.
    #[arg(long, conflicts_with = "baseline")]
    direct: bool,
    /// Dial a plain ws baseline relay (iotunnel-baseline-relay) at this host:port; no API.
    #[arg(long, value_name = "ADDR")]
    baseline: Option<String>,
    /// The relay's process id: report its CPU seconds (utime+stime) and CPU seconds per GiB.
    #[arg(long, value_name = "PID")]
    relay_pid: Option<u32>,
    /// A free-form label copied into the JSON (for scripts).
    #[arg(long)]
    label: Option<String>,
}

fn parse_warmup(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches(['s', 'm']).trim() == "0" {
        Ok(Duration::ZERO)
    } else {
        crate::parse_duration(s)
    }
}

/// Where the pairs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Relay,
    Direct,
    Baseline,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Relay => "relay",
            Mode::Direct => "direct",
            Mode::Baseline => "baseline",
        }
    }
}

/// A WebSocket a peer dialed.
type ClientWs = WebSocketStream<MaybeTlsStream<TcpStream>>;
/// The server side of a direct pair.
type ServerWs = WebSocketStream<TcpStream>;

/// A device peer's WebSocket: dialed (relay, baseline) or accepted (direct).
enum DeviceWs {
    Dialed(Box<ClientWs>),
    Accepted(Box<ServerWs>),
}

/// One side's counters, on a cache line of its own.
#[repr(align(64))]
#[derive(Default)]
struct SideCounters {
    /// DATA payload bytes received.
    bytes: AtomicU64,
    /// WebSocket data frames received.
    frames: AtomicU64,
}

/// A tunnel's counters: what its device received and what its client received.
#[derive(Default)]
struct TunnelCounters {
    to_device: SideCounters,
    to_client: SideCounters,
}

#[derive(Clone, Copy, Default)]
struct Snapshot {
    to_device: u64,
    to_client: u64,
    frames: u64,
}

fn snapshot(counters: &[Arc<TunnelCounters>]) -> Vec<Snapshot> {
    counters
        .iter()
        .map(|c| Snapshot {
            to_device: c.to_device.bytes.load(Ordering::Relaxed),
            to_client: c.to_client.bytes.load(Ordering::Relaxed),
            frames: c.to_device.frames.load(Ordering::Relaxed)
                + c.to_client.frames.load(Ordering::Relaxed),
        })
        .collect()
}

/// Runs the scenario.
pub async fn run(args: ThroughputArgs) -> anyhow::Result<()> {
    let mode = if args.direct {
        Mode::Direct
    } else if args.baseline.is_some() {
        Mode::Baseline
    } else {
        Mode::Relay
    };
    let tunnels = args.tunnels as usize;
    let streams = args.streams;
    let size = args.size as usize;
    let device_frames = Arc::new(data_frames(size, streams)?);
    let client_frames = device_frames.clone();
    if let Some(pid) = args.relay_pid {
        cpu_ticks(&pid.to_string()).with_context(|| {
            format!("--relay-pid {pid}: cannot read /proc/{pid}/stat (is the relay running?)")
        })?;
    }

    let setup_start = Instant::now();
    let mut keep_alive: Option<Fleet> = None;
    let (pairs, relay_desc): (Vec<(DeviceWs, ClientWs)>, String) = match mode {
        Mode::Relay => {
            let (pairs, fleet, relay) = relay_pairs(&args).await?;
            keep_alive = Some(fleet);
            (pairs, relay)
        }
        Mode::Baseline => {
            let addr = args.baseline.clone().expect("baseline mode");
            (
                baseline_pairs(&addr, tunnels).await?,
                format!("ws://{addr}"),
            )
        }
        Mode::Direct => direct_pairs(tunnels).await?,
    };
    eprintln!(
        "{} tunnel pairs connected ({}, {relay_desc}) in {:.2} s; {} stream(s), {} B per frame, \
         warm-up {:?}, measuring {:?}",
        pairs.len(),
        mode.name(),
        setup_start.elapsed().as_secs_f64(),
        streams,
        size,
        args.warmup,
        args.duration
    );

    // Endpoints.
    let (go_tx, go_rx) = watch::channel(false);
    let stopping = Arc::new(AtomicBool::new(false));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut counters = Vec::with_capacity(tunnels);
    let mut tasks: Vec<JoinHandle<()>> = Vec::with_capacity(tunnels * 4);
    let client_preamble = preamble(streams)?;
    for (i, (device, client)) in pairs.into_iter().enumerate() {
        let c = Arc::new(TunnelCounters::default());
        let ctx = |side: &'static str, to: fn(&TunnelCounters) -> &SideCounters| EndpointCtx {
            label: format!("tunnel {i} {side}"),
            counters: c.clone(),
            side: to,
            go: go_rx.clone(),
            stopping: stopping.clone(),
            errors: errors.clone(),
        };
        let dev_ctx = ctx("device", |c| &c.to_device);
        tasks.extend(match device {
            DeviceWs::Dialed(ws) => endpoint(*ws, dev_ctx, device_frames.clone(), Vec::new()),
            DeviceWs::Accepted(ws) => endpoint(*ws, dev_ctx, device_frames.clone(), Vec::new()),
        });
        tasks.extend(endpoint(
            client,
            ctx("client", |c| &c.to_client),
            client_frames.clone(),
            client_preamble.clone(),
        ));
        counters.push(c);
    }

    // Measurement.
    let clk = clk_tck();
    let _ = go_tx.send(true);
    tokio::time::sleep(args.warmup).await;
    let relay_pid = args.relay_pid.map(|p| p.to_string());
    let relay0 = relay_pid.as_deref().and_then(cpu_ticks);
    let self0 = cpu_ticks("self");
    let machine0 = machine_ticks();
    let ksoftirqd0 = ksoftirqd_ticks();
    let snap0 = snapshot(&counters);
    let t0 = Instant::now();
    let mut timeline = Vec::new();
    let mut last = snap0.iter().map(|s| s.to_device + s.to_client).sum::<u64>();
    let mut last_t = t0;
    let end = t0 + args.duration;
    loop {
        let next = (last_t + Duration::from_secs(1)).min(end);
        tokio::time::sleep_until(next.into()).await;
        let now_total: u64 = snapshot(&counters)
            .iter()
            .map(|s| s.to_device + s.to_client)
            .sum();
        let now = Instant::now();
        let dt = now.duration_since(last_t).as_secs_f64();
        if dt > 0.05 {
            timeline.push(round1((now_total - last) as f64 / dt));
        }
        last = now_total;
        last_t = now;
        if now >= end {
            break;
        }
    }
    let snap1 = snapshot(&counters);
    let seconds = t0.elapsed().as_secs_f64();
    let relay1 = relay_pid.as_deref().and_then(cpu_ticks);
    let self1 = cpu_ticks("self");
    let machine1 = machine_ticks();
    let ksoftirqd1 = ksoftirqd_ticks();
    stopping.store(true, Ordering::SeqCst);
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    if let Some(fleet) = keep_alive {
        fleet.close().await;
    }

    // Results.
    let per_tunnel: Vec<(u64, u64, u64)> = snap0
        .iter()
        .zip(&snap1)
        .map(|(a, b)| {
            (
                b.to_device - a.to_device,
                b.to_client - a.to_client,
                b.frames - a.frames,
            )
        })
        .collect();
    let to_device: u64 = per_tunnel.iter().map(|t| t.0).sum();
    let to_client: u64 = per_tunnel.iter().map(|t| t.1).sum();
    let frames: u64 = per_tunnel.iter().map(|t| t.2).sum();
    let bytes = to_device + to_client;
    let mut rates: Vec<f64> = per_tunnel
        .iter()
        .map(|t| (t.0 + t.1) as f64 / seconds)
        .collect();
    rates.sort_by(f64::total_cmp);
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let relay_cpu = match (args.relay_pid, relay0, relay1) {
        (Some(pid), Some(a), Some(b)) => {
            let user = (b.0 - a.0) as f64 / clk;
            let system = (b.1 - a.1) as f64 / clk;
            let cpu = user + system;
            Some(RelayCpu {
                pid,
                cpu_seconds: round3(cpu),
                user_seconds: round3(user),
                system_seconds: round3(system),
                cores_busy: round3(cpu / seconds),
                cpu_seconds_per_gib: if gib > 0.0 { round3(cpu / gib) } else { 0.0 },
            })
        }
        (Some(pid), _, _) => {
            errors
                .lock()
                .unwrap()
                .push(format!("relay pid {pid} vanished during the run"));
            None
        }
        _ => None,
    };
    let loadtest_cpu = match (self0, self1) {
        (Some(a), Some(b)) => round3(((b.0 - a.0) + (b.1 - a.1)) as f64 / clk),
        _ => 0.0,
    };
    let cores = machine0.map_or(0, |m| m.cpus);
    let machine = match (machine0, machine1) {
        (Some(a), Some(b)) if b.total > a.total => {
            let busy = (b.busy - a.busy) as f64 / clk;
            let softirq = (b.softirq - a.softirq) as f64 / clk;
            let relay = relay_cpu.as_ref().map_or(0.0, |r| r.cpu_seconds);
            let ksoftirqd = ksoftirqd1.saturating_sub(ksoftirqd0) as f64 / clk;
            MachineCpu {
                cores,
                busy_fraction: round3((b.busy - a.busy) as f64 / (b.total - a.total) as f64),
                busy_cpu_seconds: round3(busy),
                softirq_cpu_seconds: round3(softirq),
                ksoftirqd_cpu_seconds: round3(ksoftirqd),
                other_cpu_seconds: round3((busy - relay - loadtest_cpu - ksoftirqd).max(0.0)),
            }
        }
        _ => MachineCpu {
            cores,
            busy_fraction: 0.0,
            busy_cpu_seconds: 0.0,
            softirq_cpu_seconds: 0.0,
            ksoftirqd_cpu_seconds: 0.0,
            other_cpu_seconds: 0.0,
        },
    };
    let errors = errors.lock().unwrap().clone();
    let mut params = BTreeMap::new();
    params.insert("relay".into(), json!(relay_desc));
    params.insert("warmup_seconds".into(), json!(args.warmup.as_secs_f64()));
    params.insert(
        "messages_per_frame".into(),
        json!(size.div_ceil(aws::MAX_PAYLOAD)),
    );
    if mode == Mode::Relay {
        params.insert("api".into(), json!(args.api));
        params.insert("devices".into(), json!(args.devices));
    }
    let report = ThroughputReport {
        scenario: "throughput",
        mode: mode.name(),
        label: args.label.clone(),
        tls: mode == Mode::Relay && !args.plaintext,
        tunnels: args.tunnels,
        streams,
        size: args.size,
        seconds: round3(seconds),
        bytes,
        bytes_per_sec: round1(bytes as f64 / seconds),
        bytes_to_device: to_device,
        bytes_to_client: to_client,
        frames,
        frames_per_sec: round1(frames as f64 / seconds),
        per_tunnel_bytes_per_sec: Spread {
            min: round1(rates.first().copied().unwrap_or(0.0)),
            median: round1(median(&rates)),
            max: round1(rates.last().copied().unwrap_or(0.0)),
        },
        timeline_bytes_per_sec: timeline,
        relay_cpu,
        loadtest_cpu_seconds: loadtest_cpu,
        machine,
        errors,
        params,
    };
    report.print();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !report.errors.is_empty() {
        bail!(
            "{} peer connection(s) failed during the run; first: {}",
            report.errors.len(),
            report.errors[0]
        );
    }
    if bytes == 0 {
        bail!("no data arrived in the measured window");
    }
    Ok(())
}

/// The DATA frames each side sends, one per connection id: `size` payload bytes each, in as
/// few messages as the 64512-byte payload limit allows.
fn data_frames(size: usize, streams: u32) -> anyhow::Result<Vec<Bytes>> {
    let pattern: Vec<u8> = (0..aws::MAX_PAYLOAD)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    (1..=streams)
        .map(|conn| {
            let mut out = Vec::with_capacity(size + 64);
            let mut left = size;
            while left > 0 {
                let n = left.min(aws::MAX_PAYLOAD);
                let m = aws::Message {
                    r#type: MessageType::Data as i32,
                    stream_id: STREAM_ID,
                    connection_id: conn,
                    payload: Bytes::copy_from_slice(&pattern[..n]),
                    ..aws::Message::default()
                };
                aws::encode_into(&m, &mut out)?;
                left -= n;
            }
            if out.len() > MAX_FRAME {
                bail!(
                    "--size {size} makes {} B frames, over the {MAX_FRAME} B limit",
                    out.len()
                );
            }
            Ok(Bytes::from(out))
        })
        .collect()
}

/// What the client sends before its data: STREAM_START, then CONNECTION_START per further
/// connection id, each in a frame of its own.
fn preamble(streams: u32) -> anyhow::Result<Vec<Bytes>> {
    let mut out = Vec::new();
    for conn in 1..=streams {
        let m = aws::Message {
            r#type: if conn == 1 {
                MessageType::StreamStart
            } else {
                MessageType::ConnectionStart
            } as i32,
            stream_id: STREAM_ID,
            service_id: SERVICE.into(),
            connection_id: conn,
            ..aws::Message::default()
        };
        out.push(Bytes::from(aws::encode_frame_payload(&m)?));
    }
    Ok(out)
}

struct EndpointCtx {
    label: String,
    counters: Arc<TunnelCounters>,
    side: fn(&TunnelCounters) -> &SideCounters,
    go: watch::Receiver<bool>,
    stopping: Arc<AtomicBool>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl EndpointCtx {
    fn fail(&self, what: String) {
        if !self.stopping.load(Ordering::SeqCst) {
            self.errors
                .lock()
                .unwrap()
                .push(format!("{}: {what}", self.label));
        }
    }
}

/// Starts one peer: a reader counting what arrives and a writer sending `frames` round-robin
/// (after `preamble`) once `go` says so, until aborted.
fn endpoint<S>(
    ws: WebSocketStream<S>,
    ctx: EndpointCtx,
    frames: Arc<Vec<Bytes>>,
    preamble: Vec<Bytes>,
) -> [JoinHandle<()>; 2]
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let ctx = Arc::new(ctx);
    [
        tokio::spawn(read_side(stream, ctx.clone())),
        tokio::spawn(write_side(sink, ctx, frames, preamble)),
    ]
}

async fn read_side<S>(mut stream: SplitStream<WebSocketStream<S>>, ctx: Arc<EndpointCtx>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let counters = (ctx.side)(&ctx.counters);
    let mut rest = BytesMut::new();
    loop {
        match stream.next().await {
            Some(Ok(WsMessage::Binary(b))) => match payload_bytes(&mut rest, b) {
                Ok(n) => {
                    counters.bytes.fetch_add(n, Ordering::Relaxed);
                    counters.frames.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return ctx.fail(format!("bad AWS stream: {e:#}")),
            },
            // tungstenite answers pings itself.
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
            Some(Ok(WsMessage::Text(_))) => return ctx.fail("a text frame arrived".into()),
            Some(Ok(WsMessage::Close(frame))) => {
                return ctx.fail(format!(
                    "closed by the other end: {}",
                    iotunnel::agent::dial::describe_close(&frame)
                ))
            }
            Some(Err(e)) => return ctx.fail(format!("read error: {e}")),
            None => return ctx.fail("connection ended".into()),
        }
    }
}

/// Counts the DATA payload bytes of the complete `[u16 len][Message]`s in `rest` + `frame`,
/// keeping an incomplete tail in `rest`. Payloads are not copied.
fn payload_bytes(rest: &mut BytesMut, frame: Bytes) -> anyhow::Result<u64> {
    let mut data = if rest.is_empty() {
        frame
    } else {
        rest.extend_from_slice(&frame);
        rest.split().freeze()
    };
    let mut total = 0u64;
    while data.len() >= aws::LENGTH_PREFIX {
        let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
        if data.len() < aws::LENGTH_PREFIX + len {
            break;
        }
        let m = aws::Message::decode(data.slice(aws::LENGTH_PREFIX..aws::LENGTH_PREFIX + len))?;
        match MessageType::try_from(m.r#type) {
            Ok(MessageType::Data) => total += m.payload.len() as u64,
            Ok(
                MessageType::StreamStart | MessageType::ConnectionStart | MessageType::ServiceIds,
            ) => {}
            Ok(other) => bail!("unexpected {other:?} (stream {})", m.stream_id),
            Err(_) => bail!("unknown message type {}", m.r#type),
        }
        data.advance(aws::LENGTH_PREFIX + len);
    }
    if !data.is_empty() {
        rest.extend_from_slice(&data);
    }
    Ok(total)
}

async fn write_side<S>(
    mut sink: SplitSink<WebSocketStream<S>, WsMessage>,
    ctx: Arc<EndpointCtx>,
    frames: Arc<Vec<Bytes>>,
    preamble: Vec<Bytes>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut go = ctx.go.clone();
    if go.wait_for(|g| *g).await.is_err() {
        return;
    }
    for p in preamble {
        if let Err(e) = sink.send(WsMessage::Binary(p)).await {
            return ctx.fail(format!("write error: {e}"));
        }
    }
    let mut pending = 0usize;
    let mut i = 0usize;
    loop {
        let f = frames[i].clone();
        i = if i + 1 == frames.len() { 0 } else { i + 1 };
        pending += f.len();
        if let Err(e) = sink.feed(WsMessage::Binary(f)).await {
            return ctx.fail(format!("write error: {e}"));
        }
        if pending >= FLUSH_BYTES {
            pending = 0;
            if let Err(e) = sink.flush().await {
                return ctx.fail(format!("write error: {e}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pair setup.

/// Creates the tunnels through the API and connects both peers of each to the relay.
async fn relay_pairs(
    args: &ThroughputArgs,
) -> anyhow::Result<(Vec<(DeviceWs, ClientWs)>, Fleet, String)> {
    let key = args
        .api_key
        .as_deref()
        .ok_or_else(|| anyhow!("an API key is required: --api-key or IOTUNNEL_API_KEY"))?;
    let api = Api::new(&args.api, key)?;
    api.check().await?;
    let (note_tx, mut note_rx) = mpsc::unbounded_channel::<Value>();
    let fleet = Fleet::create_with(
        &api,
        "loadtest-throughput",
        args.devices as usize,
        Some(note_tx),
    )
    .await
    .context("setting up the product and devices")?;

    // Tunnels.
    let bodies: Vec<Value> = (0..args.tunnels as usize)
        .map(|i| {
            let d = &fleet.devices[i % fleet.devices.len()];
            json!({
                "product_key": d.product_key,
                "device_name": d.device_name,
                "services": [SERVICE],
                "description": "iotunnel-loadtest throughput",
            })
        })
        .collect();
    let created: Vec<anyhow::Result<(String, String, String)>> =
        futures_util::stream::iter(bodies.into_iter().map(|body| {
            let api = api.clone();
            async move {
                let v = api.post_created("/v1/tunnels", &body).await.map_err(|e| {
                    if e.code == "tunnel_limit" {
                        anyhow!(
                            "POST /v1/tunnels: {e}. Start the server with \
                             --max-open-tunnels-per-device 100000000 (or use more --devices)"
                        )
                    } else {
                        anyhow!("POST /v1/tunnels: {e}")
                    }
                })?;
                let field = |f: &str| {
                    v[f].as_str()
                        .map(str::to_string)
                        .ok_or_else(|| anyhow!("the create answer lacks {f:?}: {v}"))
                };
                Ok((
                    field("tunnel_id")?,
                    field("client_token")?,
                    field("client_endpoint")?,
                ))
            }
        }))
        .buffered(SETUP_CONCURRENCY)
        .collect()
        .await;
    let created: Vec<(String, String, String)> = created.into_iter().collect::<Result<_, _>>()?;

    // Device tokens, from the channels' `connect` notifications.
    let mut device_tokens: HashMap<String, String> = HashMap::new();
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    while created.iter().any(|t| !device_tokens.contains_key(&t.0)) {
        let note = tokio::time::timeout_at(deadline, note_rx.recv())
            .await
            .map_err(|_| {
                anyhow!(
                    "only {} of {} device notifications arrived within {HANDSHAKE_TIMEOUT:?}",
                    device_tokens.len(),
                    created.len()
                )
            })?
            .ok_or_else(|| anyhow!("the device channels ended"))?;
        if let (Some(id), Some(token)) = (note["tunnel_id"].as_str(), note["token"].as_str()) {
            device_tokens.insert(id.to_string(), token.to_string());
        }
    }

    let relay = match &args.relay {
        Some(r) => r.clone(),
        None => created[0].2.clone(),
    };
    let connector = if args.plaintext {
        None
    } else {
        let cfg = iotunnel::agent::dial::tls_config(args.ca_file.as_deref())?;
        Some(Connector::Rustls(cfg))
    };
    let scheme = if args.plaintext { "ws" } else { "wss" };
    let base = format!("{scheme}://{relay}");
    let pairs: Vec<anyhow::Result<(DeviceWs, ClientWs)>> =
        futures_util::stream::iter(created.iter().map(|(id, client_token, _)| {
            let device_token = device_tokens[id].clone();
            let connector = connector.clone();
            let base = base.clone();
            async move {
                let device = dial(&base, false, &device_token, connector.clone(), true)
                    .await
                    .with_context(|| format!("device peer of tunnel {id}"))?;
                let client = dial(&base, true, client_token, connector, true)
                    .await
                    .with_context(|| format!("client peer of tunnel {id}"))?;
                Ok((DeviceWs::Dialed(Box::new(device)), client))
            }
        }))
        .buffered(SETUP_CONCURRENCY)
        .collect()
        .await;
    let pairs = pairs.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok((pairs, fleet, base))
}

/// Connects both peers of each pair to a baseline relay with a shared random token.
async fn baseline_pairs(addr: &str, tunnels: usize) -> anyhow::Result<Vec<(DeviceWs, ClientWs)>> {
    let base = format!("ws://{addr}");
    let pairs: Vec<anyhow::Result<(DeviceWs, ClientWs)>> =
        futures_util::stream::iter((0..tunnels).map(|i| {
            let base = base.clone();
            async move {
                let token = random_token(i);
                let device = dial(&base, false, &token, None, false)
                    .await
                    .with_context(|| format!("device peer {i} to the baseline relay"))?;
                let client = dial(&base, true, &token, None, false)
                    .await
                    .with_context(|| format!("client peer {i} to the baseline relay"))?;
                Ok((DeviceWs::Dialed(Box::new(device)), client))
            }
        }))
        .buffered(SETUP_CONCURRENCY)
        .collect()
        .await;
    pairs.into_iter().collect()
}

/// Listens in process; each client peer dials it and the accepted WebSocket becomes the
/// device peer's.
async fn direct_pairs(tunnels: usize) -> anyhow::Result<(Vec<(DeviceWs, ClientWs)>, String)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let waiting: Arc<Mutex<HashMap<String, oneshot::Sender<ServerWs>>>> = Arc::default();
    let acceptor = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let waiting = waiting.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let mut token = None;
                    // The error type is tungstenite's.
                    #[allow(clippy::result_large_err)]
                    let callback = |req: &Request, mut resp: Response| {
                        token = req
                            .headers()
                            .get("access-token")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        resp.headers_mut().insert(
                            "sec-websocket-protocol",
                            HeaderValue::from_static(SUBPROTOCOL),
                        );
                        Ok::<_, ErrorResponse>(resp)
                    };
                    let config = iotunnel::agent::dial::ws_config();
                    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(
                        tcp,
                        callback,
                        Some(config),
                    )
                    .await
                    else {
                        return;
                    };
                    let tx = token.and_then(|t| waiting.lock().unwrap().remove(&t));
                    if let Some(tx) = tx {
                        let _ = tx.send(ws);
                    }
                });
            }
        })
    };
    let base = format!("ws://{addr}");
    let pairs: Vec<anyhow::Result<(DeviceWs, ClientWs)>> =
        futures_util::stream::iter((0..tunnels).map(|i| {
            let base = base.clone();
            let waiting = waiting.clone();
            async move {
                let token = random_token(i);
                let (tx, rx) = oneshot::channel();
                waiting.lock().unwrap().insert(token.clone(), tx);
                let client = dial(&base, true, &token, None, false).await?;
                let device = tokio::time::timeout(HANDSHAKE_TIMEOUT, rx)
                    .await
                    .map_err(|_| anyhow!("the in-process server did not accept peer {i}"))?
                    .map_err(|_| anyhow!("the in-process server dropped peer {i}"))?;
                Ok((DeviceWs::Accepted(Box::new(device)), client))
            }
        }))
        .buffered(SETUP_CONCURRENCY)
        .collect()
        .await;
    acceptor.abort();
    Ok((
        pairs.into_iter().collect::<Result<_, _>>()?,
        format!("in-process {base}"),
    ))
}

/// A random token (hex), different for each `i`.
fn random_token(i: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(i);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let a = h.finish();
    h.write_u64(a);
    format!("lt-{a:016x}{:016x}-{i}", h.finish())
}

/// Dials `{base}/tunnel?local-proxy-mode=...` as an AWS V3 peer; with `service_ids`, reads and
/// checks the relay's first message (SERVICE_IDS).
async fn dial(
    base: &str,
    source: bool,
    token: &str,
    connector: Option<Connector>,
    service_ids: bool,
) -> anyhow::Result<ClientWs> {
    let mode = if source { "source" } else { "destination" };
    let url = format!("{base}/tunnel?local-proxy-mode={mode}");
    let mut req = url
        .as_str()
        .into_client_request()
        .with_context(|| format!("relay URL {url}"))?;
    let h = req.headers_mut();
    h.insert(
        "access-token",
        HeaderValue::from_str(token).context("token is not a header value")?,
    );
    h.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        req,
        Some(iotunnel::agent::dial::ws_config()),
        true,
        connector,
    );
    let mut ws = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
        Err(_) => bail!("{url}: no upgrade within {HANDSHAKE_TIMEOUT:?}"),
        Ok(Err(tungstenite::Error::Http(resp))) => {
            let body = resp
                .body()
                .as_deref()
                .map(|b| {
                    String::from_utf8_lossy(b)
                        .chars()
                        .take(300)
                        .collect::<String>()
                })
                .unwrap_or_default();
            bail!(
                "{url}: the relay refused the upgrade: HTTP {} {body}",
                resp.status()
            )
        }
        Ok(Err(e)) => {
            let hint = if base.starts_with("wss") {
                " (a wss relay needs --ca-file {data-dir}/tls/ca.pem; a ws one needs --plaintext)"
            } else {
                " (is the relay up, and plaintext? a wss relay needs --ca-file instead of --plaintext)"
            };
            return Err(anyhow!("{url}: {e}{hint}"));
        }
        Ok(Ok((ws, _))) => ws,
    };
    if service_ids {
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, ws.next())
            .await
            .map_err(|_| anyhow!("{url}: no SERVICE_IDS within {HANDSHAKE_TIMEOUT:?}"))?;
        match first {
            Some(Ok(WsMessage::Binary(b))) => match aws::decode_message(&b)? {
                Some((m, used))
                    if m.r#type == MessageType::ServiceIds as i32 && used == b.len() => {}
                other => bail!("{url}: the first message is not SERVICE_IDS alone: {other:?}"),
            },
            other => bail!("{url}: expected SERVICE_IDS, got {other:?}"),
        }
    }
    Ok(ws)
}

// ---------------------------------------------------------------------------------------------
// CPU accounting.

/// `(utime, stime)` in clock ticks from `/proc/{pid}/stat` (`pid` may be `self`).
fn cpu_ticks(pid: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// Jiffies of all CPUs together, from the `cpu` line of `/proc/stat`.
#[derive(Clone, Copy, Debug)]
struct MachineTicks {
    /// Everything but idle and iowait.
    busy: u64,
    /// Of which softirq (the kernel's network receive work lands here when the kernel
    /// accounts IRQ time apart from tasks).
    softirq: u64,
    total: u64,
    /// CPUs listed (`cpuN` lines): the whole machine, whatever this process's affinity.
    cpus: usize,
}

fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Some(MachineTicks {
        busy: total - idle,
        softirq: v.get(6).copied().unwrap_or(0),
        total,
        cpus: stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count(),
    })
}

/// utime+stime, in clock ticks, of every `ksoftirqd/N` kernel thread.
fn ksoftirqd_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .filter_map(|e| cpu_ticks(e.file_name().to_str()?))
        .map(|(u, s)| u + s)
        .sum()
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

// ---------------------------------------------------------------------------------------------
// Report.

#[derive(Debug, Serialize)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct RelayCpu {
    pid: u32,
    cpu_seconds: f64,
    user_seconds: f64,
    system_seconds: f64,
    /// CPU seconds per second of the window (1.0 = one core busy).
    cores_busy: f64,
    cpu_seconds_per_gib: f64,
}

#[derive(Debug, Serialize)]
struct MachineCpu {
    cores: usize,
    /// Busy share of all cores during the window (1.0 = every core busy).
    busy_fraction: f64,
    /// CPU seconds all cores were busy during the window.
    busy_cpu_seconds: f64,
    /// Of which softirq (charged to whichever task was running, so mostly already inside the
    /// relay's and the loadtest's system time).
    softirq_cpu_seconds: f64,
    /// CPU seconds of the `ksoftirqd/N` threads: network receive work the kernel deferred
    /// under load. It belongs to the traffic but to neither process's utime+stime.
    ksoftirqd_cpu_seconds: f64,
    /// Busy seconds that neither the loadtest, the relay (with --relay-pid) nor ksoftirqd
    /// account for: other processes (a disturbed run), other kernel threads, or, without
    /// --relay-pid, the relay itself.
    other_cpu_seconds: f64,
}

#[derive(Debug, Serialize)]
struct ThroughputReport {
    scenario: &'static str,
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    tls: bool,
    tunnels: u32,
    streams: u32,
    size: u32,
    seconds: f64,
    /// DATA payload bytes received, both directions together.
    bytes: u64,
    bytes_per_sec: f64,
    bytes_to_device: u64,
    bytes_to_client: u64,
    /// WebSocket data frames received, both directions.
    frames: u64,
    frames_per_sec: f64,
    /// Each tunnel's bytes/s (both directions): fairness.
    per_tunnel_bytes_per_sec: Spread,
    timeline_bytes_per_sec: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_cpu: Option<RelayCpu>,
    loadtest_cpu_seconds: f64,
    machine: MachineCpu,
    errors: Vec<String>,
    params: BTreeMap<String, Value>,
}

impl ThroughputReport {
    fn print(&self) {
        let mib = |b: f64| b / (1u64 << 20) as f64;
        println!();
        println!(
            "scenario    throughput  (mode={} tls={} tunnels={} streams={} size={} {})",
            self.mode,
            self.tls,
            self.tunnels,
            self.streams,
            self.size,
            self.params["relay"].as_str().unwrap_or_default()
        );
        println!("duration    {:.2} s", self.seconds);
        println!(
            "bytes       {} ({:.1} MiB/s, {:.3} Gbit/s; to device {}, to client {})",
            self.bytes,
            mib(self.bytes_per_sec),
            self.bytes_per_sec * 8.0 / 1e9,
            self.bytes_to_device,
            self.bytes_to_client
        );
        println!("frames      {} ({:.0}/s)", self.frames, self.frames_per_sec);
        let s = &self.per_tunnel_bytes_per_sec;
        println!(
            "per tunnel  min {:.1}  median {:.1}  max {:.1} MiB/s",
            mib(s.min),
            mib(s.median),
            mib(s.max)
        );
        if let Some(r) = &self.relay_cpu {
            println!(
                "relay cpu   {:.2} s (user {:.2}, sys {:.2}; {:.2} cores) = {:.3} CPU s/GiB",
                r.cpu_seconds,
                r.user_seconds,
                r.system_seconds,
                r.cores_busy,
                r.cpu_seconds_per_gib
            );
        }
        println!(
            "loadtest    {:.2} CPU s; machine {:.0}% busy of {} cores ({:.2} CPU s, softirq {:.2}, \
             ksoftirqd {:.2}, other {:.2})",
            self.loadtest_cpu_seconds,
            self.machine.busy_fraction * 100.0,
            self.machine.cores,
            self.machine.busy_cpu_seconds,
            self.machine.softirq_cpu_seconds,
            self.machine.ksoftirqd_cpu_seconds,
            self.machine.other_cpu_seconds
        );
        println!("errors      {}", self.errors.len());
        for e in self.errors.iter().take(5) {
            println!("  {e}");
        }
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_hold_size_bytes_of_data() {
        for (size, msgs) in [(1usize, 1usize), (16_384, 1), (64_512, 1), (65_536, 2)] {
            let frames = data_frames(size, 3).unwrap();
            assert_eq!(frames.len(), 3);
            let mut rest = BytesMut::new();
            assert_eq!(
                payload_bytes(&mut rest, frames[2].clone()).unwrap(),
                size as u64
            );
            assert!(rest.is_empty());
            assert_eq!(size.div_ceil(aws::MAX_PAYLOAD), msgs);
            assert!(frames[0].len() <= MAX_FRAME);
        }
        assert!(data_frames(129_024, 1).is_ok());
    }

    #[test]
    fn split_messages_are_counted_once() {
        let f = data_frames(1000, 1).unwrap().remove(0);
        let mut rest = BytesMut::new();
        assert_eq!(payload_bytes(&mut rest, f.slice(..7)).unwrap(), 0);
        assert_eq!(payload_bytes(&mut rest, f.slice(7..)).unwrap(), 1000);
        assert!(rest.is_empty());
    }

    #[test]
    fn proc_stat_parses() {
        assert!(cpu_ticks("self").is_some());
        let m = machine_ticks().unwrap();
        assert!(m.softirq <= m.busy && m.busy <= m.total);
        assert!(m.cpus >= 1);
        let _ = ksoftirqd_ticks();
    }
}
