//! `latency`: ping-pong at a fixed total rate over N tunnel pairs.
//!
//! Each tunnel's client peer sends a `--size` byte data message every `tunnels / rate` seconds
//! (the tunnels' schedules are staggered by `1 / rate`, so the total is `--rate` msg/s), the
//! device peer echoes it, and the client times the round trip from the moment it sent.
//!
//! Coordinated omission: a tunnel has one message in flight. When an echo comes late and the
//! schedule has slipped, the next message goes at once (the missed slots are not sent), and
//! the round trip is recorded with hdrhistogram's `record_correct(rtt, interval)`, which adds
//! the samples the missed slots would have seen. A stall therefore weighs in the percentiles
//! as it would for a sender that never waits.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::chart::{usage_panels, Chart, Panel};
use crate::peers::{Mode, PeerArgs, Ws};
use crate::report::{self, progress, round1, round3, Latency, ScenarioReport};
use crate::sys::UsageSample;
use crate::throughput::parse_warmup;
use crate::wire::{self, Channel, Event, Family, Inbox};
use crate::{procs, RunArgs};

/// An echo later than this is an error, not a sample.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);

/// `latency` flags.
#[derive(Args, Debug)]
pub struct LatencyArgs {
    #[command(flatten)]
    peers: PeerArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Pings before the measured window starts (`0` for none).
    #[arg(long, default_value = "1s", value_parser = parse_warmup)]
    warmup: Duration,
    /// Tunnel pairs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    tunnels: u32,
    /// Messages per second, all tunnels together.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    rate: u32,
    /// Data payload bytes per message.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=129_024))]
    size: u32,
}

/// What one tunnel's pinger saw.
struct PingerResult {
    hist: Histogram<u64>,
    /// Round trips measured in the window (without the corrected ones).
    messages: u64,
    error: Option<String>,
}

/// Runs the scenario (in this process, or split over `--procs` children).
pub async fn run(args: LatencyArgs) -> anyhow::Result<()> {
    let family = args.peers.family;
    if args.size as usize > family.max_frame_payload() {
        bail!(
            "--size {}: one {} message carries at most {} B",
            args.size,
            family.name(),
            family.max_frame_payload()
        );
    }
    let k = args.run.procs as usize;
    procs::check_tunnels(args.run.procs, args.tunnels)?;
    let (tunnels, rate) = (u64::from(args.tunnels), u64::from(args.rate));
    let flags = |i| {
        vec![
            ("--tunnels", procs::share(tunnels, k, i).to_string()),
            // The rate follows the tunnels, so every tunnel keeps the same interval.
            (
                "--rate",
                ((rate * procs::share(tunnels, k, i)) / tunnels)
                    .max(1)
                    .to_string(),
            ),
        ]
    };
    let sampler = report::sample_usage(args.peers.relay_pid.map(|p| p.to_string()));
    let Some(mut report) = procs::split(k, flags, LatencyReport::merge, measure(&args)).await?
    else {
        return Ok(());
    };
    report.usage_timeline = report::usage_samples(sampler).await;
    report::finish(&report, args.run.json.as_deref())
}

async fn measure(args: &LatencyArgs) -> anyhow::Result<LatencyReport> {
    let family = args.peers.family;
    let tunnels = args.tunnels as usize;
    let setup_start = Instant::now();
    let bar = progress(tunnels as u64, "pairs", args.run.quiet);
    let mut pairs = crate::peers::Pairs::connect(&args.peers, tunnels, 1, &bar).await?;
    bar.finish_and_clear();
    let (mode, desc) = (pairs.mode, pairs.desc.clone());
    let interval = Duration::from_secs_f64(args.tunnels as f64 / args.rate as f64);
    eprintln!(
        "{tunnels} tunnel pairs connected ({}, {}, {desc}) in {:.2} s; {} msg/s in all, one \
         every {:?} per tunnel, {} B, warm-up {:?}, measuring {:?}",
        mode.name(),
        family.name(),
        setup_start.elapsed().as_secs_f64(),
        args.rate,
        interval,
        args.size,
        args.warmup,
        args.run.duration
    );
    let mut echoes: Vec<JoinHandle<()>> = Vec::with_capacity(tunnels);
    let mut clients = Vec::with_capacity(tunnels);
    for pair in pairs.take() {
        echoes.push(tokio::spawn(echo(pair.device, family)));
        clients.push((pair.client, pair.channels[0].clone()));
    }
    procs::ready().await?;

    let go = Instant::now();
    let from = go + args.warmup;
    let end = from + args.run.duration;
    let payload: Vec<u8> = (0..args.size).map(|i| (i % 251) as u8).collect();
    let stagger = Duration::from_secs_f64(1.0 / args.rate as f64);
    let pingers: Vec<JoinHandle<PingerResult>> = clients
        .into_iter()
        .enumerate()
        .map(|(i, (ws, ch))| {
            let schedule = Schedule {
                first: go
                    + Duration::from_nanos(
                        ((i as u128 * stagger.as_nanos()) % interval.as_nanos().max(1)) as u64,
                    ),
                interval,
                from,
                end,
            };
            tokio::spawn(pinger(ws, ch, family, payload.clone(), schedule))
        })
        .collect();
    let bar = progress((end - go).as_secs().max(1), "seconds", args.run.quiet);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        bar.set_position(go.elapsed().as_secs());
    }
    bar.finish_and_clear();
    let mut hist = report::latency_histogram();
    let mut messages = 0;
    let mut errors = Vec::new();
    for (i, p) in pingers.into_iter().enumerate() {
        match p.await {
            Ok(r) => {
                let _ = hist.add(&r.hist);
                messages += r.messages;
                if let Some(e) = r.error {
                    errors.push(format!("tunnel {i}: {e}"));
                }
            }
            Err(e) => errors.push(format!("tunnel {i}: pinger failed: {e}")),
        }
    }
    for e in &echoes {
        e.abort();
    }
    for (dev, why) in pairs.dropped_channels() {
        errors.push(format!("device channel {dev} dropped: {why}"));
    }
    pairs.close().await;
    let seconds = args.run.duration.as_secs_f64();
    let mut params = BTreeMap::new();
    params.insert("relay".into(), json!(desc));
    params.insert("warmup_seconds".into(), json!(args.warmup.as_secs_f64()));
    params.insert("interval_us".into(), json!(interval.as_micros() as u64));
    Ok(LatencyReport {
        scenario: "latency".into(),
        mode: mode.name().into(),
        family,
        label: args.run.label.clone(),
        tls: mode == Mode::Relay && !args.peers.plaintext,
        tunnels: args.tunnels,
        rate: args.rate,
        size: args.size,
        procs: 1,
        seconds: round3(seconds),
        messages,
        messages_per_sec: round1(messages as f64 / seconds),
        corrected_samples: hist.len().saturating_sub(messages),
        bytes: 2 * messages * u64::from(args.size),
        bytes_per_sec: round1((2 * messages * u64::from(args.size)) as f64 / seconds),
        latency_us: Latency::of(&hist),
        errors,
        params,
        hist: if procs::is_child() {
            report::hist_to_pairs(&hist)
        } else {
            Vec::new()
        },
        usage_timeline: Vec::new(),
    })
}

/// When a tunnel sends, and which round trips count.
struct Schedule {
    first: Instant,
    interval: Duration,
    from: Instant,
    end: Instant,
}

/// Sends on schedule, one message in flight, until the end; records the round trips sent in
/// the window.
async fn pinger(
    mut ws: Ws,
    ch: Channel,
    family: Family,
    payload: Vec<u8>,
    s: Schedule,
) -> PingerResult {
    let mut out = PingerResult {
        hist: report::latency_histogram(),
        messages: 0,
        error: None,
    };
    let interval_us = (s.interval.as_micros() as u64).max(1);
    let mut inbox = Inbox::new(family);
    let mut next = s.first;
    let mut frame_id = 0i64;
    while next < s.end {
        tokio::time::sleep_until(next.into()).await;
        frame_id += 1;
        let frame = match wire::data_frame(&ch, &payload, frame_id) {
            Ok(f) => f,
            Err(e) => {
                out.error = Some(format!("{e:#}"));
                return out;
            }
        };
        let sent = Instant::now();
        let result = async {
            ws.send(WsMessage::Binary(frame)).await?;
            wait_echo(&mut ws, &mut inbox, payload.len()).await
        };
        if let Err(e) = tokio::time::timeout(ECHO_TIMEOUT, result)
            .await
            .map_err(|_| anyhow!("no echo within {ECHO_TIMEOUT:?}"))
            .and_then(|r| r)
        {
            out.error = Some(format!("{e:#}"));
            return out;
        }
        let now = Instant::now();
        if sent >= s.from {
            let us = ((now - sent).as_micros() as u64).max(1);
            let _ = out.hist.record_correct(us, interval_us);
            out.messages += 1;
        }
        next += s.interval;
        if next < now {
            // Behind schedule: send now; record_correct accounts for the missed slots.
            next = now;
        }
    }
    let _ = ws.close(None).await;
    out
}

/// Reads until the echo (one data payload of `len` bytes) is in.
async fn wait_echo(ws: &mut Ws, inbox: &mut Inbox, len: usize) -> anyhow::Result<()> {
    let mut got = 0usize;
    while got < len {
        match ws.next().await {
            Some(Ok(WsMessage::Binary(b))) => {
                let mut ended = None;
                inbox.feed(b, |e| match e {
                    Event::Data(_, p) => got += p.len(),
                    Event::Ended(why) => ended = Some(why),
                    _ => {}
                })?;
                if let Some(why) = ended {
                    bail!("channel ended: {why}");
                }
            }
            Some(Ok(WsMessage::Close(f))) => bail!(
                "closed by the other end: {}",
                crate::wire::describe_close(&f)
            ),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("read error: {e}"),
            None => bail!("connection ended"),
        }
    }
    if got != len {
        bail!("echo of {got} B for a {len} B message");
    }
    Ok(())
}

/// The device peer: echoes every data payload on its channel until the connection ends.
async fn echo(mut ws: Ws, family: Family) {
    let mut inbox = Inbox::new(family);
    let mut frame_id = 0i64;
    while let Some(Ok(msg)) = ws.next().await {
        let WsMessage::Binary(b) = msg else {
            continue;
        };
        let mut data = Vec::new();
        if inbox
            .feed(b, |e| {
                if let Event::Data(ch, p) = e {
                    data.push((ch, p));
                }
            })
            .is_err()
        {
            return;
        }
        for (ch, p) in data {
            frame_id += 1;
            let Ok(frame) = wire::data_frame(&ch, &p, frame_id) else {
                return;
            };
            if ws.send(WsMessage::Binary(frame)).await.is_err() {
                return;
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct LatencyReport {
    scenario: String,
    mode: String,
    family: Family,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    tls: bool,
    tunnels: u32,
    /// Target messages per second, all tunnels together.
    rate: u32,
    size: u32,
    procs: u32,
    seconds: f64,
    /// Round trips measured in the window.
    messages: u64,
    messages_per_sec: f64,
    /// Samples hdrhistogram added for slots missed while an echo was late.
    corrected_samples: u64,
    /// Data payload bytes both ways (messages and echoes).
    bytes: u64,
    bytes_per_sec: f64,
    /// Round-trip time, coordinated-omission corrected.
    latency_us: Latency,
    errors: Vec<String>,
    params: BTreeMap<String, Value>,
    /// The histogram, from a child process to its parent only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    hist: Vec<(u64, u64)>,
    /// The relay's RSS and open files once a second (with --relay-pid), setup included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    usage_timeline: Vec<UsageSample>,
}

impl LatencyReport {
    fn merge(parts: Vec<Self>) -> Self {
        let k = parts.len() as u32;
        let mut hist = report::latency_histogram();
        let mut it = parts.into_iter();
        let mut out = it.next().expect("at least one child");
        report::add_pairs(&mut hist, &std::mem::take(&mut out.hist));
        for p in it {
            report::add_pairs(&mut hist, &p.hist);
            out.tunnels += p.tunnels;
            out.rate += p.rate;
            out.messages += p.messages;
            out.bytes += p.bytes;
            out.errors.extend(p.errors);
        }
        out.procs = k;
        out.messages_per_sec = round1(out.messages as f64 / out.seconds);
        out.bytes_per_sec = round1(out.bytes as f64 / out.seconds);
        out.corrected_samples = hist.len().saturating_sub(out.messages);
        out.latency_us = Latency::of(&hist);
        out
    }
}

impl ScenarioReport for LatencyReport {
    fn print(&self) {
        println!();
        println!(
            "scenario    latency  (mode={} family={} tls={} tunnels={} rate={}/s size={} procs={} {})",
            self.mode,
            self.family.name(),
            self.tls,
            self.tunnels,
            self.rate,
            self.size,
            self.procs,
            self.params["relay"].as_str().unwrap_or_default()
        );
        println!("duration    {:.2} s", self.seconds);
        println!(
            "messages    {} round trips ({:.1}/s; {} corrected samples)",
            self.messages, self.messages_per_sec, self.corrected_samples
        );
        let l = &self.latency_us;
        println!(
            "rtt (us)    {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        println!(
            "            {:>8} {:>8} {:>8} {:>8} {:>8} {:>8.1}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        crate::report::print_errors(&self.errors);
    }

    fn failure(&self) -> Option<String> {
        if !self.errors.is_empty() {
            return Some(format!(
                "{} tunnel(s) failed during the run; first: {}",
                self.errors.len(),
                self.errors[0]
            ));
        }
        if self.messages == 0 {
            return Some("no echo arrived in the measured window".into());
        }
        None
    }

    fn chart(&self) -> Option<Chart> {
        let mut chart = Chart::new(format!(
            "latency: {} {} tls={} tunnels={} rate={}/s size={} procs={}{}",
            self.mode,
            self.family.name(),
            self.tls,
            self.tunnels,
            self.rate,
            self.size,
            self.procs,
            self.label
                .as_ref()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default()
        ));
        chart.push(Panel::Percentiles {
            title: format!(
                "round trip, coordinated-omission corrected ({} round trips, mean {:.1} us)",
                self.messages, self.latency_us.mean
            ),
            groups: vec![("round trip".into(), self.latency_us.clone())],
        });
        for p in usage_panels(&self.usage_timeline, "relay") {
            chart.push(p);
        }
        Some(chart)
    }
}
