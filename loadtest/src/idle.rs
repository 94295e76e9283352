//! `idle`: open N tunnel pairs (one channel open in each, as an idle SSH session would have),
//! hold them for `--duration`, and report what they cost the relay: its resident memory and
//! open files before and after, read from `/proc/{--relay-pid}/status` and `/proc/PID/fd`.
//!
//! Every peer keeps reading, so the relay's pings are answered; a pair whose connection ends
//! during the hold is not counted as held. With `--direct` both ends of every pair are in the
//! loadtest itself, so the figures are the loadtest's own (the sum over its `--procs`).
//! With `--procs K` the parent reads the relay before the children connect and after the
//! hold, while the children still hold their pairs.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::chart::{usage_panels, Chart};
use crate::peers::{Mode, PeerArgs, Ws};
use crate::report::{self, progress, round1, ScenarioReport};
use crate::sys::{self, ProcUsage, UsageSample};
use crate::wire::Family;
use crate::{procs, RunArgs};

/// `idle` flags.
#[derive(Args, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    peers: PeerArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Tunnel pairs to open and hold.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    tunnels: u32,
}

/// Connections that ended during the hold, and the first reason.
#[derive(Default)]
struct Ended {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

/// Runs the scenario (in this process, or split over `--procs` children).
pub async fn run(args: IdleArgs) -> anyhow::Result<()> {
    let mode = args.peers.mode();
    if mode != Mode::Direct && args.peers.relay_pid.is_none() {
        bail!("idle reads the relay's memory and open files: pass its process id with --relay-pid");
    }
    // The process whose usage is the result: the relay, or (direct) the loadtest.
    let watched = |args: &IdleArgs| -> anyhow::Result<Option<ProcUsage>> {
        match mode {
            Mode::Direct => Ok(None),
            _ => args.peers.relay_usage(),
        }
    };
    // Usage over the run: the relay's, or (direct, one process) this process's.
    let sampler = report::sample_usage(match mode {
        Mode::Direct if args.run.procs == 1 => Some("self".to_string()),
        Mode::Direct => None,
        _ => args.peers.relay_pid.map(|p| p.to_string()),
    });
    let mut report = if args.run.procs > 1 {
        let k = args.run.procs as usize;
        procs::check_tunnels(args.run.procs, args.tunnels)?;
        let before = watched(&args)?;
        let start = Instant::now();
        let mut kids = procs::Children::spawn(k, |i| procs::tunnel_flags(args.tunnels, k, i))?;
        kids.wait_ready().await?;
        let setup = start.elapsed();
        hold(args.run.duration, args.run.quiet).await;
        let after = watched(&args)?;
        kids.go().await?;
        let mut r = IdleReport::merge(kids.results().await?);
        r.setup_seconds = round1(setup.as_secs_f64());
        if let (Some(b), Some(a)) = (before, after) {
            r.set_usage(b, a);
        }
        r
    } else {
        let before = watched(&args)?;
        let self_before = sys::proc_usage("self")?;
        let mut r = connect_and_hold(&args, self_before).await?;
        if procs::is_child() {
            return procs::emit(&r);
        }
        if let (Some(b), Some(a)) = (before, r.relay_after) {
            r.set_usage(b, a);
        }
        r
    };
    report.usage_timeline = report::usage_samples(sampler).await;
    report::finish(&report, args.run.json.as_deref())
}

/// Sleeps for the hold, showing its progress.
async fn hold(d: Duration, quiet: bool) {
    let bar = progress(d.as_secs().max(1), "holding", quiet);
    let end = Instant::now() + d;
    while Instant::now() < end {
        tokio::time::sleep((end - Instant::now()).min(Duration::from_millis(500))).await;
        bar.set_position(d.as_secs().saturating_sub((end - Instant::now()).as_secs()));
    }
    bar.finish_and_clear();
}

/// Opens the pairs, holds them (a child: until the parent's go), reports.
async fn connect_and_hold(args: &IdleArgs, self_before: ProcUsage) -> anyhow::Result<IdleReport> {
    let tunnels = args.tunnels as usize;
    let start = Instant::now();
    let bar = progress(tunnels as u64, "pairs", args.run.quiet);
    let mut pairs = crate::peers::Pairs::connect(&args.peers, tunnels, 1, &bar).await?;
    bar.finish_and_clear();
    let setup = start.elapsed();
    eprintln!(
        "{tunnels} idle pairs connected ({}, {}, {}) in {:.2} s",
        pairs.mode.name(),
        args.peers.family.name(),
        pairs.desc,
        setup.as_secs_f64()
    );
    let ended = Arc::new(Ended::default());
    let mut keepers: Vec<JoinHandle<()>> = Vec::with_capacity(2 * tunnels);
    for p in pairs.take() {
        keepers.push(tokio::spawn(keep(p.client, ended.clone())));
        keepers.push(tokio::spawn(keep(p.device, ended.clone())));
    }
    let relay_after_create = pairs.relay_after_create;
    if procs::is_child() {
        procs::ready().await?;
    } else {
        hold(args.run.duration, args.run.quiet).await;
    }
    let relay_after = match pairs.mode {
        Mode::Direct => None,
        _ => args.peers.relay_usage()?,
    };
    let self_after = sys::proc_usage("self")?;
    let lost = ended.count.load(Ordering::Relaxed);
    let mut errors = Vec::new();
    if let Some(why) = ended.first.lock().unwrap().clone() {
        errors.push(format!(
            "{lost} connection(s) ended during the hold; first: {why}"
        ));
    }
    for (dev, why) in pairs.dropped_channels() {
        errors.push(format!("device channel {dev} dropped: {why}"));
    }
    let mode = pairs.mode;
    let mut params = BTreeMap::new();
    params.insert("relay".into(), json!(pairs.desc));
    for k in keepers {
        k.abort();
    }
    pairs.close().await;
    let mut r = IdleReport {
        scenario: "idle".into(),
        mode: mode.name().into(),
        family: args.peers.family,
        label: args.run.label.clone(),
        tls: mode == Mode::Relay && !args.peers.plaintext,
        tunnels: args.tunnels,
        procs: 1,
        seconds: args.run.duration.as_secs_f64(),
        setup_seconds: round1(setup.as_secs_f64()),
        bytes: 0,
        bytes_per_sec: 0.0,
        // Each lost connection breaks its pair; at most one count per pair is exact enough.
        pairs_held: (tunnels as u64).saturating_sub(lost),
        watched: match mode {
            Mode::Direct => "loadtest (both ends of every pair)".into(),
            _ => format!("relay pid {}", args.peers.relay_pid.unwrap_or_default()),
        },
        rss_before: 0,
        rss_after: 0,
        fds_before: 0,
        fds_after: 0,
        rss_per_pair_bytes: 0.0,
        fds_per_pair: 0.0,
        relay_after_create,
        relay_after,
        loadtest_before: self_before,
        loadtest_after: self_after,
        loadtest_fd_limit: sys::raise_fd_limit(),
        errors,
        params,
        usage_timeline: Vec::new(),
    };
    if mode == Mode::Direct {
        r.set_usage(self_before, self_after);
    }
    Ok(r)
}

/// Reads (answering pings) until the connection ends, and counts the end.
async fn keep(mut ws: Ws, ended: Arc<Ended>) {
    let why = loop {
        match ws.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => {
                break crate::wire::describe_close(&f)
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => break format!("read error: {e}"),
            None => break "connection ended".into(),
        }
    };
    ended.count.fetch_add(1, Ordering::Relaxed);
    ended.first.lock().unwrap().get_or_insert(why);
}

#[derive(Debug, Serialize, Deserialize)]
struct IdleReport {
    scenario: String,
    mode: String,
    family: Family,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    tls: bool,
    tunnels: u32,
    procs: u32,
    /// The hold.
    seconds: f64,
    /// Creating the tunnels and connecting the pairs.
    setup_seconds: f64,
    /// No data moves: 0.
    bytes: u64,
    bytes_per_sec: f64,
    /// Pairs still connected at the end of the hold.
    pairs_held: u64,
    /// Whose usage `rss_*` and `fds_*` are.
    watched: String,
    rss_before: u64,
    rss_after: u64,
    fds_before: u64,
    fds_after: u64,
    /// `(rss_after - rss_before) / tunnels`.
    rss_per_pair_bytes: f64,
    /// `(fds_after - fds_before) / tunnels`.
    fds_per_pair: f64,
    /// The relay after the tunnels were created through the API, before any peer dialed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    relay_after_create: Option<ProcUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    relay_after: Option<ProcUsage>,
    /// This loadtest process (a child's, with --procs).
    loadtest_before: ProcUsage,
    loadtest_after: ProcUsage,
    /// The loadtest's open-file limit after raising it.
    loadtest_fd_limit: u64,
    errors: Vec<String>,
    params: BTreeMap<String, Value>,
    /// The watched process's RSS and open files once a second, setup included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    usage_timeline: Vec<UsageSample>,
}

impl IdleReport {
    fn set_usage(&mut self, before: ProcUsage, after: ProcUsage) {
        let n = f64::from(self.tunnels.max(1));
        self.rss_before = before.rss_bytes;
        self.rss_after = after.rss_bytes;
        self.fds_before = before.fds;
        self.fds_after = after.fds;
        self.rss_per_pair_bytes = round1((after.rss_bytes as f64 - before.rss_bytes as f64) / n);
        self.fds_per_pair = round1((after.fds as f64 - before.fds as f64) / n);
    }

    fn merge(parts: Vec<Self>) -> Self {
        let k = parts.len() as u32;
        let mut it = parts.into_iter();
        let mut out = it.next().expect("at least one child");
        let (mut before, mut after) = (out.loadtest_before, out.loadtest_after);
        for p in it {
            out.tunnels += p.tunnels;
            out.pairs_held += p.pairs_held;
            out.errors.extend(p.errors);
            before.rss_bytes += p.loadtest_before.rss_bytes;
            before.fds += p.loadtest_before.fds;
            after.rss_bytes += p.loadtest_after.rss_bytes;
            after.fds += p.loadtest_after.fds;
        }
        out.procs = k;
        // Relay figures come from the parent; the children's own readings are per child.
        out.relay_after_create = None;
        out.relay_after = None;
        out.loadtest_before = before;
        out.loadtest_after = after;
        if out.mode == "direct" {
            out.set_usage(before, after);
        }
        out
    }
}

impl ScenarioReport for IdleReport {
    fn print(&self) {
        let kib = |b: u64| b as f64 / 1024.0;
        println!();
        println!(
            "scenario    idle  (mode={} family={} tls={} tunnels={} procs={} {})",
            self.mode,
            self.family.name(),
            self.tls,
            self.tunnels,
            self.procs,
            self.params["relay"].as_str().unwrap_or_default()
        );
        println!(
            "held        {} of {} pairs for {:.1} s (setup {:.1} s)",
            self.pairs_held, self.tunnels, self.seconds, self.setup_seconds
        );
        println!("watched     {}", self.watched);
        println!(
            "rss         {:.0} KiB -> {:.0} KiB = {:.0} B per pair ({:.2} KiB)",
            kib(self.rss_before),
            kib(self.rss_after),
            self.rss_per_pair_bytes,
            self.rss_per_pair_bytes / 1024.0
        );
        println!(
            "fds         {} -> {} = {:.2} per pair",
            self.fds_before, self.fds_after, self.fds_per_pair
        );
        if let Some(c) = &self.relay_after_create {
            println!(
                "after create {:.0} KiB, {} fds (tunnels created, no peer dialed yet)",
                kib(c.rss_bytes),
                c.fds
            );
        }
        crate::report::print_errors(&self.errors);
    }

    fn chart(&self) -> Option<Chart> {
        let mut chart = Chart::new(format!(
            "idle: {} {} tls={} tunnels={} procs={}: {:.0} B and {:.2} fds per pair{}",
            self.mode,
            self.family.name(),
            self.tls,
            self.tunnels,
            self.procs,
            self.rss_per_pair_bytes,
            self.fds_per_pair,
            self.label
                .as_ref()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default()
        ));
        let who = if self.mode == "direct" {
            "loadtest"
        } else {
            "relay"
        };
        for p in usage_panels(&self.usage_timeline, who) {
            chart.push(p);
        }
        Some(chart)
    }

    fn failure(&self) -> Option<String> {
        (self.pairs_held < u64::from(self.tunnels)).then(|| {
            format!(
                "{} of {} pairs ended during the hold; first: {}",
                u64::from(self.tunnels) - self.pairs_held,
                self.tunnels,
                self.errors.first().map_or("?", String::as_str)
            )
        })
    }
}
