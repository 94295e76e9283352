//! `churn`: whole tunnel lifecycles, again and again, at `--rate` cycles/s (or as fast as
//! `--concurrency` cycles in flight allow).
//!
//! One cycle, each step timed:
//! 1. create: `POST /v1/tunnels` to the next device (round-robin);
//! 2. pair: the device token arrives on the device's channel; the device peer dials with it,
//!    the client peer with the client token; the client opens a channel (STREAM_START, or an
//!    Alibaba session the device accepts);
//! 3. exchange: the client sends one `--size` byte message, the device echoes it back;
//! 4. close: `POST /v1/tunnels/{id}/close`, until the relay has ended both peers' connections.
//!
//! `--direct` and `--baseline` have no meaning here: the cycle is the API and the relay
//! together, and there is nothing without them to compare with.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::chart::{usage_panels, Chart, Panel};
use crate::peers::{Mode, PeerArgs, Relays, Tunnels, Ws, HANDSHAKE_TIMEOUT};
use crate::report::{self, progress, round1, round3, Latency, ScenarioReport};
use crate::sys::UsageSample;
use crate::wire::{self, Event, Family, Inbox, Side};
use crate::{procs, RunArgs};

/// The steps of a cycle, in order.
const STEPS: [&str; 4] = ["create", "pair", "exchange", "close"];

/// `churn` flags.
#[derive(Args, Debug)]
pub struct ChurnArgs {
    #[command(flatten)]
    peers: PeerArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Cycles started per second; 0 = as fast as --concurrency allows.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Cycles in flight at most (each holds one OPEN tunnel: the server's
    /// --max-open-tunnels-per-device times --devices must allow it).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,
    /// Data payload bytes of the one message exchanged.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    size: u32,
}

/// What the cycles share.
struct Ctx {
    tunnels: Tunnels,
    relays: Relays,
    args: PeerArgs,
    payload: Vec<u8>,
    stats: Mutex<Stats>,
    done: AtomicU64,
}

/// Step histograms and failures.
struct Stats {
    steps: Vec<Histogram<u64>>,
    cycle: Histogram<u64>,
    errors_by_kind: BTreeMap<String, u64>,
    first_errors: Vec<String>,
}

/// Runs the scenario (in this process, or split over `--procs` children).
pub async fn run(args: ChurnArgs) -> anyhow::Result<()> {
    if args.peers.mode() != Mode::Relay {
        bail!(
            "churn measures the API and the relay together: --direct and --baseline have no \
             meaning here"
        );
    }
    let k = args.run.procs as usize;
    let (rate, conc) = (u64::from(args.rate), u64::from(args.concurrency));
    let flags = |i| {
        let mut flags = vec![("--concurrency", procs::share(conc, k, i).max(1).to_string())];
        if rate > 0 {
            flags.push(("--rate", procs::share(rate, k, i).max(1).to_string()));
        }
        flags
    };
    let sampler = report::sample_usage(args.peers.relay_pid.map(|p| p.to_string()));
    let Some(mut report) = procs::split(k, flags, ChurnReport::merge, measure(&args)).await? else {
        return Ok(());
    };
    report.usage_timeline = report::usage_samples(sampler).await;
    report::finish(&report, args.run.json.as_deref())
}

async fn measure(args: &ChurnArgs) -> anyhow::Result<ChurnReport> {
    let tunnels = Tunnels::setup(&args.peers, "loadtest-churn").await?;
    let ctx = Arc::new(Ctx {
        tunnels,
        relays: Relays::new(&args.peers),
        args: args.peers.clone(),
        payload: (0..args.size).map(|i| (i % 251) as u8).collect(),
        stats: Mutex::new(Stats {
            steps: STEPS.iter().map(|_| report::latency_histogram()).collect(),
            cycle: report::latency_histogram(),
            errors_by_kind: BTreeMap::new(),
            first_errors: Vec::new(),
        }),
        done: AtomicU64::new(0),
    });
    procs::ready().await?;
    eprintln!(
        "churn: {} cycles/s target, {} in flight at most, for {:?}",
        if args.rate == 0 {
            "no".to_string()
        } else {
            args.rate.to_string()
        },
        args.concurrency,
        args.run.duration
    );

    let slots = Arc::new(Semaphore::new(args.concurrency as usize));
    let start = Instant::now();
    let end = start + args.run.duration;
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(args.rate)));
    let mut next = start;
    let bar = progress(
        args.run.duration.as_secs().max(1),
        "seconds",
        args.run.quiet,
    );
    let mut started = 0u64;
    loop {
        if let Some(iv) = interval {
            tokio::time::sleep_until(next.into()).await;
            next += iv;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        if Instant::now() >= end {
            break;
        }
        started += 1;
        let cycle_ctx = ctx.clone();
        tokio::spawn(async move {
            let r = cycle(&cycle_ctx).await;
            cycle_ctx.record(r);
            // The run takes the context back once every slot is free: let go of it first.
            drop(cycle_ctx);
            drop(slot);
        });
        if started.is_multiple_of(64) {
            bar.set_position(start.elapsed().as_secs());
            bar.set_message(format!("{} cycles", ctx.done.load(Ordering::Relaxed)));
        }
    }
    // Wait for the cycles in flight.
    let _ = slots.acquire_many(args.concurrency).await;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let ctx = Arc::try_unwrap(ctx).map_err(|_| anyhow!("a cycle outlived the run"))?;
    let stats = ctx.stats.into_inner().unwrap();
    let mut first_errors = stats.first_errors;
    for (dev, why) in ctx.tunnels.dropped_channels() {
        first_errors.push(format!("device channel {dev} dropped: {why}"));
    }
    ctx.tunnels.shutdown().await;
    let cycles = stats.cycle.len();
    let mut params = BTreeMap::new();
    params.insert("api".into(), json!(args.peers.api));
    params.insert("devices".into(), json!(args.peers.devices));
    params.insert("started".into(), json!(started));
    Ok(ChurnReport {
        scenario: "churn".into(),
        mode: "relay".into(),
        family: args.peers.family,
        label: args.run.label.clone(),
        tls: !args.peers.plaintext,
        rate: args.rate,
        concurrency: args.concurrency,
        size: args.size,
        procs: 1,
        seconds: round3(seconds),
        cycles,
        cycles_per_sec: round1(cycles as f64 / seconds),
        bytes: 2 * cycles * u64::from(args.size),
        bytes_per_sec: round1((2 * cycles * u64::from(args.size)) as f64 / seconds),
        latency_us: Latency::of(&stats.cycle),
        steps_us: STEPS
            .iter()
            .zip(&stats.steps)
            .map(|(s, h)| (s.to_string(), Latency::of(h)))
            .collect(),
        errors: stats.errors_by_kind.values().sum(),
        errors_by_kind: stats.errors_by_kind,
        first_errors,
        params,
        hists: if procs::is_child() {
            std::iter::once(&stats.cycle)
                .chain(&stats.steps)
                .map(report::hist_to_pairs)
                .collect()
        } else {
            Vec::new()
        },
        usage_timeline: Vec::new(),
    })
}

/// A failed step: which, and why.
struct StepError {
    step: &'static str,
    error: anyhow::Error,
}

fn at(step: &'static str) -> impl FnOnce(anyhow::Error) -> StepError {
    move |error| StepError { step, error }
}

impl Ctx {
    fn record(&self, r: Result<[Duration; 4], StepError>) {
        let mut s = self.stats.lock().unwrap();
        match r {
            Ok(steps) => {
                for (h, d) in s.steps.iter_mut().zip(steps) {
                    report::record(h, d);
                }
                report::record(&mut s.cycle, steps.iter().sum());
                self.done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                *s.errors_by_kind.entry(e.step.to_string()).or_default() += 1;
                if s.first_errors.len() < 5 {
                    s.first_errors.push(format!("{}: {:#}", e.step, e.error));
                }
            }
        }
    }
}

/// One lifecycle; the time of each step.
async fn cycle(ctx: &Ctx) -> Result<[Duration; 4], StepError> {
    let t0 = Instant::now();
    let created = ctx.tunnels.create().await.map_err(at("create"))?;
    let t1 = Instant::now();
    let result = async {
        let pair = async {
            let (device_dialer, client_dialer) = ctx.relays.for_tunnel(&created.endpoint).await?;
            let token = ctx.tunnels.device_token(&created.id).await?;
            let mut device = device_dialer
                .dial(Side::Device, &created.id, &token)
                .await?;
            let mut client = client_dialer
                .dial(Side::Client, &created.id, &created.client_token)
                .await?;
            let channels =
                wire::open_channels(ctx.args.family, &mut client, &mut device, 1).await?;
            anyhow::Ok((client, device, channels))
        };
        let (mut client, mut device, channels) = pair.await.map_err(at("pair"))?;
        let t2 = Instant::now();
        exchange(
            ctx.args.family,
            &mut client,
            &mut device,
            &channels[0],
            &ctx.payload,
        )
        .await
        .map_err(at("exchange"))?;
        let t3 = Instant::now();
        ctx.tunnels.close(&created.id).await.map_err(at("close"))?;
        let (a, b) = tokio::join!(until_closed(&mut client), until_closed(&mut device));
        a.and(b).map_err(at("close"))?;
        Ok([t1 - t0, t2 - t1, t3 - t2, t3.elapsed()])
    }
    .await;
    if result.is_err() {
        // Leave no OPEN tunnel behind to eat the device's quota.
        let _ = ctx.tunnels.close(&created.id).await;
    }
    result
}

/// The client sends `payload` on `ch`; the device echoes it; the client reads the echo.
async fn exchange(
    family: Family,
    client: &mut Ws,
    device: &mut Ws,
    ch: &wire::Channel,
    payload: &[u8],
) -> anyhow::Result<()> {
    client
        .send(WsMessage::Binary(wire::data_frame(ch, payload, 1)?))
        .await?;
    let got = read_data(device, family).await.context("device peer")?;
    device
        .send(WsMessage::Binary(wire::data_frame(ch, &got, 1)?))
        .await?;
    let back = read_data(client, family).await.context("client peer")?;
    if back != payload {
        bail!("the echo differs from the message");
    }
    Ok(())
}

/// The next data payload on `ws`.
async fn read_data(ws: &mut Ws, family: Family) -> anyhow::Result<Vec<u8>> {
    let mut inbox = Inbox::new(family);
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Binary(b))) => {
                    let mut data = None;
                    inbox.feed(b, |e| {
                        if let Event::Data(_, p) = e {
                            data.get_or_insert_with(Vec::new).extend_from_slice(&p);
                        }
                    })?;
                    if let Some(d) = data {
                        return Ok(d);
                    }
                }
                Some(Ok(WsMessage::Close(f))) => {
                    bail!("closed: {}", crate::wire::describe_close(&f))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("read error: {e}"),
                None => bail!("connection ended"),
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| anyhow!("no data within {HANDSHAKE_TIMEOUT:?}"))?
}

/// Reads until the relay ends the connection.
async fn until_closed(ws: &mut Ws) -> anyhow::Result<()> {
    let wait = async {
        while let Some(Ok(msg)) = ws.next().await {
            if matches!(msg, WsMessage::Close(_)) {
                // tungstenite answers the close; read on until the end.
                continue;
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, wait)
        .await
        .map_err(|_| anyhow!("the relay did not end the connection within {HANDSHAKE_TIMEOUT:?}"))
}

#[derive(Debug, Serialize, Deserialize)]
struct ChurnReport {
    scenario: String,
    mode: String,
    family: Family,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    tls: bool,
    /// Target cycles/s (0: as fast as the concurrency allows).
    rate: u32,
    concurrency: u32,
    size: u32,
    procs: u32,
    seconds: f64,
    /// Complete cycles.
    cycles: u64,
    cycles_per_sec: f64,
    /// Data payload bytes (the message and its echo).
    bytes: u64,
    bytes_per_sec: f64,
    /// A whole cycle.
    latency_us: Latency,
    /// Each step: create, pair, exchange, close.
    steps_us: BTreeMap<String, Latency>,
    /// Failed cycles.
    errors: u64,
    /// Failed cycles by the step that failed.
    errors_by_kind: BTreeMap<String, u64>,
    first_errors: Vec<String>,
    params: BTreeMap<String, Value>,
    /// Cycle then step histograms, from a child process to its parent only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    hists: Vec<Vec<(u64, u64)>>,
    /// The relay's RSS and open files once a second (with --relay-pid), setup included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    usage_timeline: Vec<UsageSample>,
}

impl ChurnReport {
    fn merge(parts: Vec<Self>) -> Self {
        let k = parts.len() as u32;
        let mut hists: Vec<Histogram<u64>> = (0..=STEPS.len())
            .map(|_| report::latency_histogram())
            .collect();
        let mut it = parts.into_iter();
        let mut out = it.next().expect("at least one child");
        let mut add = |parts: &[Vec<(u64, u64)>]| {
            for (h, p) in hists.iter_mut().zip(parts) {
                report::add_pairs(h, p);
            }
        };
        add(&std::mem::take(&mut out.hists));
        for p in it {
            add(&p.hists);
            out.seconds = out.seconds.max(p.seconds);
            out.rate += p.rate;
            out.concurrency += p.concurrency;
            out.cycles += p.cycles;
            out.bytes += p.bytes;
            out.errors += p.errors;
            for (kind, n) in p.errors_by_kind {
                *out.errors_by_kind.entry(kind).or_default() += n;
            }
            out.first_errors.extend(p.first_errors);
        }
        out.procs = k;
        out.cycles_per_sec = round1(out.cycles as f64 / out.seconds);
        out.bytes_per_sec = round1(out.bytes as f64 / out.seconds);
        out.latency_us = Latency::of(&hists[0]);
        out.steps_us = STEPS
            .iter()
            .zip(&hists[1..])
            .map(|(s, h)| (s.to_string(), Latency::of(h)))
            .collect();
        out
    }
}

impl ScenarioReport for ChurnReport {
    fn print(&self) {
        println!();
        println!(
            "scenario    churn  (family={} tls={} rate={} concurrency={} procs={})",
            self.family.name(),
            self.tls,
            self.rate,
            self.concurrency,
            self.procs
        );
        println!("duration    {:.2} s", self.seconds);
        println!(
            "cycles      {} ({:.1}/s), {} failed",
            self.cycles, self.cycles_per_sec, self.errors
        );
        println!(
            "step (ms)   {:>9} {:>9} {:>9} {:>9} {:>9}",
            "p50", "p90", "p99", "p99.9", "max"
        );
        let ms = |us: u64| us as f64 / 1000.0;
        let rows = STEPS
            .iter()
            .map(|s| (*s, &self.steps_us[*s]))
            .chain(std::iter::once(("cycle", &self.latency_us)));
        for (name, l) in rows {
            println!(
                "  {name:<9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p999),
                ms(l.max)
            );
        }
        for (kind, n) in &self.errors_by_kind {
            println!("  failed at {kind:<10} {n}");
        }
        for e in self.first_errors.iter().take(5) {
            println!("  {e}");
        }
    }

    fn failure(&self) -> Option<String> {
        (self.cycles == 0).then(|| {
            format!(
                "no cycle completed; first error: {}",
                self.first_errors.first().map_or("none", String::as_str)
            )
        })
    }

    fn chart(&self) -> Option<Chart> {
        let mut chart = Chart::new(format!(
            "churn: {} tls={} rate={} concurrency={} size={} procs={}{}",
            self.family.name(),
            self.tls,
            self.rate,
            self.concurrency,
            self.size,
            self.procs,
            self.label
                .as_ref()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default()
        ));
        let groups = std::iter::once(("cycle", &self.latency_us))
            .chain(
                STEPS
                    .iter()
                    .filter_map(|s| Some((*s, self.steps_us.get(*s)?))),
            )
            .map(|(name, l)| (name.to_string(), l.clone()))
            .collect();
        chart.push(Panel::Percentiles {
            title: format!(
                "cycle and step latency ({} cycles, {:.1}/s, {} failed)",
                self.cycles, self.cycles_per_sec, self.errors
            ),
            groups,
        });
        for p in usage_panels(&self.usage_timeline, "relay") {
            chart.push(p);
        }
        Some(chart)
    }
}
