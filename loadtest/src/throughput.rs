//! `throughput`: bulk data both ways over N tunnel pairs, as fast as the peers can go.
//!
//! Each tunnel has a client peer and a device peer (see [`crate::peers`] for where they come
//! from) speaking `--family` (see [`crate::wire`]). The client opens `--streams` channels (AWS
//! V3 connection ids, or Alibaba sessions); then both sides send data frames round-robin over
//! the channels until the end. Every WebSocket frame carries `--size` bytes of data payload:
//! AWS, one message when `--size` is at most 64512 (the payload limit), else two
//! (65536 = 64512 + 1024); Alibaba, one data_transport frame of at most 4096 bytes. Received
//! data payload bytes are counted per tunnel and direction.
//!
//! `--relay-pid PID` reads the relay's utime+stime from `/proc/PID/stat` at the start and end
//! of the measured window and reports CPU seconds per GiB forwarded.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use clap::Args;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::chart::{mib, usage_panels, Chart, Panel, Series};
use crate::peers::{Mode, PeerArgs, Ws};
use crate::report::{self, median, progress, round1, round3, ScenarioReport};
use crate::sys::{clk_tck, cpu_ticks, ksoftirqd_ticks, machine_ticks, UsageSample};
use crate::wire::{self, Channel, Event, Family, Inbox};
use crate::{procs, RunArgs};

/// A writer flushes after this many bytes fed (tungstenite also writes out on its own once
/// its buffer passes 128 KiB).
const FLUSH_BYTES: usize = 256 * 1024;

/// `throughput` flags.
#[derive(Args, Debug)]
pub struct ThroughputArgs {
    #[command(flatten)]
    peers: PeerArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Traffic before the measured window starts (`0` for none).
    #[arg(long, default_value = "1s", value_parser = parse_warmup)]
    warmup: Duration,
    /// Tunnel pairs (device peer + client peer each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    tunnels: u32,
    /// Channels per tunnel (AWS V3 connection ids, or Alibaba sessions); frames go
    /// round-robin over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    streams: u32,
    /// Data payload bytes per WebSocket frame (default: 65536 for aws, 4096 for aliyun, the
    /// most one Alibaba frame holds).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=129_024))]
    size: Option<u32>,
    /// With --relay-pid: count the relay's syscalls, io_uring submissions and completions and
    /// context switches over the window with `perf stat`, reported per GiB.
    #[arg(long, requires = "relay_pid")]
    kernel_events: bool,
}

/// Parses a warm-up: a duration, or `0` for none.
pub fn parse_warmup(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches(['s', 'm']).trim() == "0" {
        Ok(Duration::ZERO)
    } else {
        crate::parse_duration(s)
    }
}

/// One side's counters, on a cache line of its own.
#[repr(align(64))]
#[derive(Default)]
struct SideCounters {
    /// Data payload bytes received.
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

fn total(s: &[Snapshot]) -> u64 {
    s.iter().map(|s| s.to_device + s.to_client).sum()
}

/// Runs the scenario (in this process, or split over `--procs` children).
pub async fn run(args: ThroughputArgs) -> anyhow::Result<()> {
    let family = args.peers.family;
    let size = args.size.unwrap_or(match family {
        Family::Aws => 65_536,
        Family::Aliyun => 4096,
    }) as usize;
    if size > family.max_frame_payload() {
        bail!(
            "--size {size}: one {} WebSocket frame carries at most {} B of data",
            family.name(),
            family.max_frame_payload()
        );
    }
    if args.peers.relay_pid.is_some() {
        args.peers.relay_usage()?;
    }
    let k = args.run.procs as usize;
    procs::check_tunnels(args.run.procs, args.tunnels)?;
    let flags = |i| procs::tunnel_flags(args.tunnels, k, i);
    let merge = ThroughputReport::merge;
    let sampler = report::sample_usage(args.peers.relay_pid.map(|p| p.to_string()));
    let Some(mut report) = procs::split(k, flags, merge, measure(&args, size)).await? else {
        return Ok(());
    };
    report.usage_timeline = report::usage_samples(sampler).await;
    report::finish(&report, args.run.json.as_deref())
}

/// Connects the pairs, waits for the go (`--procs`), runs the window and reports.
async fn measure(args: &ThroughputArgs, size: usize) -> anyhow::Result<ThroughputReport> {
    let tunnels = args.tunnels as usize;
    let family = args.peers.family;
    let setup_start = Instant::now();
    let bar = progress(tunnels as u64, "pairs", args.run.quiet);
    let mut pairs = crate::peers::Pairs::connect(&args.peers, tunnels, args.streams, &bar).await?;
    bar.finish_and_clear();
    let mode = pairs.mode;
    let desc = pairs.desc.clone();
    eprintln!(
        "{} tunnel pairs connected ({}, {}, {}) in {:.2} s; {} stream(s), {size} B per frame, \
         warm-up {:?}, measuring {:?}",
        pairs.pairs.len(),
        mode.name(),
        family.name(),
        pairs.desc,
        setup_start.elapsed().as_secs_f64(),
        args.streams,
        args.warmup,
        args.run.duration
    );

    // Endpoints.
    let pattern: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let frames_for = |channels: &[Channel]| -> anyhow::Result<Arc<Vec<Bytes>>> {
        Ok(Arc::new(
            channels
                .iter()
                .map(|c| wire::data_frame(c, &pattern, 1))
                .collect::<Result<_, _>>()?,
        ))
    };
    // AWS channels are the same in every pair: build their frames once.
    let shared = match (family, pairs.pairs.first()) {
        (Family::Aws, Some(p)) => Some(frames_for(&p.channels)?),
        _ => None,
    };
    let (go_tx, go_rx) = watch::channel(false);
    let stopping = Arc::new(AtomicBool::new(false));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut counters = Vec::with_capacity(tunnels);
    let mut tasks: Vec<JoinHandle<()>> = Vec::with_capacity(tunnels * 4);
    for (i, pair) in pairs.take().into_iter().enumerate() {
        let frames = match &shared {
            Some(f) => f.clone(),
            None => frames_for(&pair.channels)?,
        };
        let c = Arc::new(TunnelCounters::default());
        let ctx = |side: &'static str, to: fn(&TunnelCounters) -> &SideCounters| EndpointCtx {
            label: format!("tunnel {i} {side}"),
            family,
            counters: c.clone(),
            side: to,
            go: go_rx.clone(),
            stopping: stopping.clone(),
            errors: errors.clone(),
        };
        tasks.extend(endpoint(
            pair.device,
            ctx("device", |c| &c.to_device),
            frames.clone(),
        ));
        tasks.extend(endpoint(
            pair.client,
            ctx("client", |c| &c.to_client),
            frames,
        ));
        counters.push(c);
    }
    procs::ready().await?;

    // Measurement.
    let clk = clk_tck();
    let _ = go_tx.send(true);
    tokio::time::sleep(args.warmup).await;
    let relay_pid = args.peers.relay_pid.map(|p| p.to_string());
    let relay0 = relay_pid.as_deref().and_then(cpu_ticks);
    let kernel_events = match (args.kernel_events, args.peers.relay_pid) {
        (true, Some(pid)) => Some(crate::sys::KernelEventCounter::start(pid)?),
        _ => None,
    };
    let self0 = cpu_ticks("self");
    let machine0 = machine_ticks();
    let ksoftirqd0 = ksoftirqd_ticks();
    let snap0 = snapshot(&counters);
    let t0 = Instant::now();
    let mut timeline = Vec::new();
    let mut last = total(&snap0);
    let mut last_t = t0;
    let end = t0 + args.run.duration;
    let bar = progress(
        args.run.duration.as_secs().max(1),
        "seconds",
        args.run.quiet,
    );
    loop {
        let next = (last_t + Duration::from_secs(1)).min(end);
        tokio::time::sleep_until(next.into()).await;
        let now_total = total(&snapshot(&counters));
        let now = Instant::now();
        let dt = now.duration_since(last_t).as_secs_f64();
        if dt > 0.05 {
            let rate = round1((now_total - last) as f64 / dt);
            timeline.push(rate);
            bar.set_message(format!("{:.1} MiB/s", rate / (1u64 << 20) as f64));
        }
        bar.set_position(now.duration_since(t0).as_secs());
        last = now_total;
        last_t = now;
        if now >= end {
            break;
        }
    }
    bar.finish_and_clear();
    let snap1 = snapshot(&counters);
    let seconds = t0.elapsed().as_secs_f64();
    let relay1 = relay_pid.as_deref().and_then(cpu_ticks);
    let kernel_events = kernel_events.map(|k| k.stop()).transpose()?;
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
    pairs.close().await;

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
    let rates: Vec<f64> = per_tunnel
        .iter()
        .map(|t| round1((t.0 + t.1) as f64 / seconds))
        .collect();
    let relay_cpu = match (args.peers.relay_pid, relay0, relay1) {
        (Some(pid), Some(a), Some(b)) => {
            let user = (b.0 - a.0) as f64 / clk;
            let system = (b.1 - a.1) as f64 / clk;
            let mut cpu = RelayCpu::new(pid, user, system, seconds, bytes);
            cpu.kernel_events_per_gib = kernel_events.map(|counts| {
                let gib = bytes as f64 / (1u64 << 30) as f64;
                counts
                    .into_iter()
                    .map(|(name, n)| {
                        (
                            name,
                            if gib > 0.0 {
                                round1(n as f64 / gib)
                            } else {
                                0.0
                            },
                        )
                    })
                    .collect()
            });
            Some(cpu)
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
        (Some(a), Some(b)) if b.total > a.total => MachineCpu {
            cores,
            busy_fraction: round3((b.busy - a.busy) as f64 / (b.total - a.total) as f64),
            busy_cpu_seconds: round3((b.busy - a.busy) as f64 / clk),
            softirq_cpu_seconds: round3((b.softirq - a.softirq) as f64 / clk),
            ksoftirqd_cpu_seconds: round3(ksoftirqd1.saturating_sub(ksoftirqd0) as f64 / clk),
            other_cpu_seconds: 0.0,
        },
        _ => MachineCpu {
            cores,
            ..MachineCpu::default()
        },
    };
    let errors = errors.lock().unwrap().clone();
    let mut params = BTreeMap::new();
    params.insert("relay".into(), json!(desc));
    params.insert("warmup_seconds".into(), json!(args.warmup.as_secs_f64()));
    params.insert(
        "messages_per_frame".into(),
        json!(match family {
            Family::Aws => size.div_ceil(iotunnel::proto::aws::MAX_PAYLOAD),
            Family::Aliyun => 1,
        }),
    );
    if mode == Mode::Relay {
        params.insert("api".into(), json!(args.peers.api));
        params.insert("devices".into(), json!(args.peers.devices));
    }
    let mut report = ThroughputReport {
        scenario: "throughput".into(),
        mode: mode.name().into(),
        family,
        label: args.run.label.clone(),
        tls: match mode {
            Mode::Relay => !args.peers.plaintext,
            Mode::Baseline => args.peers.baseline_tls,
            Mode::Direct => false,
        },
        tunnels: args.tunnels,
        streams: args.streams,
        size: size as u32,
        procs: 1,
        seconds: round3(seconds),
        bytes,
        bytes_per_sec: round1(bytes as f64 / seconds),
        bytes_to_device: to_device,
        bytes_to_client: to_client,
        frames,
        frames_per_sec: round1(frames as f64 / seconds),
        per_tunnel_bytes_per_sec: Spread::of(rates.clone()),
        timeline_bytes_per_sec: timeline,
        relay_cpu,
        loadtest_cpu_seconds: loadtest_cpu,
        machine,
        errors,
        params,
        per_tunnel_rates: if procs::is_child() { rates } else { Vec::new() },
        usage_timeline: Vec::new(),
    };
    report.machine.other_cpu_seconds = report.other_cpu();
    Ok(report)
}

struct EndpointCtx {
    label: String,
    family: Family,
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
/// once `go` says so, until aborted.
fn endpoint(ws: Ws, ctx: EndpointCtx, frames: Arc<Vec<Bytes>>) -> [JoinHandle<()>; 2] {
    let (sink, stream) = ws.split();
    let ctx = Arc::new(ctx);
    [
        tokio::spawn(read_side(stream, ctx.clone())),
        tokio::spawn(write_side(sink, ctx, frames)),
    ]
}

async fn read_side(mut stream: SplitStream<Ws>, ctx: Arc<EndpointCtx>) {
    let counters = (ctx.side)(&ctx.counters);
    let mut inbox = Inbox::new(ctx.family);
    loop {
        match stream.next().await {
            Some(Ok(WsMessage::Binary(b))) => {
                let mut n = 0u64;
                let mut ended = None;
                let fed = inbox.feed(b, |e| match e {
                    Event::Data(_, p) => n += p.len() as u64,
                    Event::Ended(why) => ended = Some(why),
                    _ => {}
                });
                if let Err(e) = fed {
                    return ctx.fail(format!("bad {} frame: {e:#}", ctx.family.name()));
                }
                if let Some(why) = ended {
                    return ctx.fail(format!("channel ended: {why}"));
                }
                counters.bytes.fetch_add(n, Ordering::Relaxed);
                counters.frames.fetch_add(1, Ordering::Relaxed);
            }
            // tungstenite answers pings itself.
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
            Some(Ok(WsMessage::Text(_))) => return ctx.fail("a text frame arrived".into()),
            Some(Ok(WsMessage::Close(frame))) => {
                return ctx.fail(format!(
                    "closed by the other end: {}",
                    crate::wire::describe_close(&frame)
                ))
            }
            Some(Err(e)) => return ctx.fail(format!("read error: {e}")),
            None => return ctx.fail("connection ended".into()),
        }
    }
}

async fn write_side(
    mut sink: SplitSink<Ws, WsMessage>,
    ctx: Arc<EndpointCtx>,
    frames: Arc<Vec<Bytes>>,
) {
    let mut go = ctx.go.clone();
    if go.wait_for(|g| *g).await.is_err() {
        return;
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
// Report.

/// Smallest, median and largest of a set of values.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Spread {
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`.
    pub fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        Self {
            min: values.first().copied().unwrap_or(0.0),
            median: round1(median(&values)),
            max: values.last().copied().unwrap_or(0.0),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct RelayCpu {
    pid: u32,
    cpu_seconds: f64,
    user_seconds: f64,
    system_seconds: f64,
    /// CPU seconds per second of the window (1.0 = one core busy).
    cores_busy: f64,
    cpu_seconds_per_gib: f64,
    /// With --kernel-events: the relay's syscalls, io_uring submissions and completions, and
    /// context switches per GiB of payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kernel_events_per_gib: Option<BTreeMap<String, f64>>,
}

impl RelayCpu {
    fn new(pid: u32, user: f64, system: f64, seconds: f64, bytes: u64) -> Self {
        let cpu = user + system;
        let gib = bytes as f64 / (1u64 << 30) as f64;
        Self {
            pid,
            cpu_seconds: round3(cpu),
            user_seconds: round3(user),
            system_seconds: round3(system),
            cores_busy: round3(cpu / seconds),
            cpu_seconds_per_gib: if gib > 0.0 { round3(cpu / gib) } else { 0.0 },
            kernel_events_per_gib: None,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
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

#[derive(Debug, Serialize, Deserialize)]
struct ThroughputReport {
    scenario: String,
    mode: String,
    family: Family,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    tls: bool,
    tunnels: u32,
    streams: u32,
    size: u32,
    /// Processes the peers ran in.
    procs: u32,
    seconds: f64,
    /// Data payload bytes received, both directions together.
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    relay_cpu: Option<RelayCpu>,
    loadtest_cpu_seconds: f64,
    machine: MachineCpu,
    errors: Vec<String>,
    params: BTreeMap<String, Value>,
    /// Each tunnel's bytes/s, from a child process to its parent only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    per_tunnel_rates: Vec<f64>,
    /// The relay's RSS and open files once a second (with --relay-pid), setup included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    usage_timeline: Vec<UsageSample>,
}

impl ThroughputReport {
    fn other_cpu(&self) -> f64 {
        let relay = self.relay_cpu.as_ref().map_or(0.0, |r| r.cpu_seconds);
        round3(
            (self.machine.busy_cpu_seconds
                - relay
                - self.loadtest_cpu_seconds
                - self.machine.ksoftirqd_cpu_seconds)
                .max(0.0),
        )
    }

    /// The children's parts as one run: their windows started together (`go`), so rates add.
    fn merge(parts: Vec<Self>) -> Self {
        let k = parts.len() as u32;
        let mut it = parts.into_iter();
        let mut out = it.next().expect("at least one child");
        let mut rates = std::mem::take(&mut out.per_tunnel_rates);
        for p in it {
            out.tunnels += p.tunnels;
            out.seconds = out.seconds.max(p.seconds);
            out.bytes += p.bytes;
            out.bytes_per_sec = round1(out.bytes_per_sec + p.bytes_per_sec);
            out.bytes_to_device += p.bytes_to_device;
            out.bytes_to_client += p.bytes_to_client;
            out.frames += p.frames;
            out.frames_per_sec = round1(out.frames_per_sec + p.frames_per_sec);
            for (a, b) in out
                .timeline_bytes_per_sec
                .iter_mut()
                .zip(&p.timeline_bytes_per_sec)
            {
                *a = round1(*a + b);
            }
            out.loadtest_cpu_seconds = round3(out.loadtest_cpu_seconds + p.loadtest_cpu_seconds);
            out.errors.extend(p.errors);
            rates.extend(p.per_tunnel_rates);
        }
        out.procs = k;
        out.per_tunnel_bytes_per_sec = Spread::of(rates);
        // Every child watched the same relay over the same window: one reading, all bytes.
        if let Some(r) = &out.relay_cpu {
            out.relay_cpu = Some(RelayCpu::new(
                r.pid,
                r.user_seconds,
                r.system_seconds,
                out.seconds,
                out.bytes,
            ));
        }
        out.machine.other_cpu_seconds = out.other_cpu();
        out
    }
}

impl ScenarioReport for ThroughputReport {
    fn print(&self) {
        let mib = |b: f64| b / (1u64 << 20) as f64;
        println!();
        println!(
            "scenario    throughput  (mode={} family={} tls={} tunnels={} streams={} size={} procs={} {})",
            self.mode,
            self.family.name(),
            self.tls,
            self.tunnels,
            self.streams,
            self.size,
            self.procs,
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
        crate::report::print_errors(&self.errors);
    }

    fn failure(&self) -> Option<String> {
        if !self.errors.is_empty() {
            return Some(format!(
                "{} peer connection(s) failed during the run; first: {}",
                self.errors.len(),
                self.errors[0]
            ));
        }
        if self.bytes == 0 {
            return Some("no data arrived in the measured window".into());
        }
        None
    }

    fn chart(&self) -> Option<Chart> {
        let mut chart = Chart::new(format!(
            "throughput: {} {} tls={} tunnels={} streams={} size={} procs={}{}",
            self.mode,
            self.family.name(),
            self.tls,
            self.tunnels,
            self.streams,
            self.size,
            self.procs,
            self.label
                .as_ref()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default()
        ));
        let s = &self.per_tunnel_bytes_per_sec;
        chart.push(Panel::Time {
            title: format!(
                "throughput, both directions (per tunnel: min {:.1}, median {:.1}, max {:.1} MiB/s)",
                mib(s.min),
                mib(s.median),
                mib(s.max)
            ),
            x_label: "seconds of the measured window".into(),
            y_label: "MiB/s".into(),
            series: vec![Series::per_second(
                "all tunnels",
                self.timeline_bytes_per_sec.iter().map(|&b| mib(b)),
            )],
        });
        for p in usage_panels(&self.usage_timeline, "relay") {
            chart.push(p);
        }
        Some(chart)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmups_parse() {
        assert_eq!(parse_warmup("0"), Ok(Duration::ZERO));
        assert_eq!(parse_warmup("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_warmup("2s"), Ok(Duration::from_secs(2)));
    }

    #[test]
    fn spreads_are_ordered() {
        let s = Spread::of(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 2.5, 10.0));
    }
}
