//! `create`: C concurrent API clients, each with its own HTTP client, create tunnels
//! (`POST /v1/tunnels`, expecting 201) round-robin over N online devices for the duration.
//!
//! The devices' channels stay open and are read throughout (each create sends one `connect`
//! notification), so the server's notification path is part of what is measured.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use crate::report::{self, Report};
use crate::setup::{Api, Fleet};
use crate::CommonArgs;

/// `create` flags.
#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Concurrent API clients (each its own HTTP client and connection).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    clients: u32,
    /// Devices to create tunnels to (round-robin), each with its channel open.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    devices: u32,
    /// `lifetime_seconds` of each tunnel (the server's maximum when absent).
    #[arg(long)]
    lifetime_seconds: Option<u32>,
}

/// Hint printed when the server refuses a create with 429 tunnel_limit.
const TUNNEL_LIMIT_HINT: &str = "the server answered 429 tunnel_limit: it caps OPEN tunnels per \
device (10 by default) and this benchmark keeps every tunnel open. Start the benchmark server \
with `iotunnel server ... --max-open-tunnels-per-device 100000000` (see BENCHMARKS.md).";

struct ClientResult {
    hist: hdrhistogram::Histogram<u64>,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
}

/// Runs the scenario.
pub async fn run(args: CreateArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.common.api, &args.common.api_key)?;
    api.check().await?;
    let fleet = Fleet::create(&api, "loadtest-create", args.devices as usize)
        .await
        .context("setting up the product and devices")?;
    eprintln!(
        "product {} with {} online devices; {} clients creating tunnels for {:?}",
        fleet.product_key,
        fleet.devices.len(),
        args.clients,
        args.common.duration
    );

    let bodies: Arc<Vec<Value>> = Arc::new(
        fleet
            .devices
            .iter()
            .map(|d| {
                let mut b = json!({
                    "product_key": d.product_key,
                    "device_name": d.device_name,
                    "services": ["SSH"],
                });
                if let Some(l) = args.lifetime_seconds {
                    b["lifetime_seconds"] = json!(l);
                }
                b
            })
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tunnel_limit = Arc::new(AtomicBool::new(false));

    let done = Arc::new(AtomicU64::new(0));
    let (timeline_stop, timeline_rx) = tokio::sync::watch::channel(false);
    let start = Instant::now();
    let timeline = report::spawn_timeline(done.clone(), timeline_rx);
    let deadline = start + args.common.duration;
    let mut tasks = Vec::with_capacity(args.clients as usize);
    for _ in 0..args.clients {
        let api = api.with_own_client()?;
        let (bodies, next, stop, tunnel_limit, done) = (
            bodies.clone(),
            next.clone(),
            stop.clone(),
            tunnel_limit.clone(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut r = ClientResult {
                hist: report::latency_histogram(),
                errors: BTreeMap::new(),
                first_error: None,
            };
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                let body = &bodies[next.fetch_add(1, Ordering::Relaxed) % bodies.len()];
                let t0 = Instant::now();
                match api.post_created("/v1/tunnels", body).await {
                    Ok(_) => {
                        report::record(&mut r.hist, t0.elapsed());
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        *r.errors.entry(e.kind()).or_default() += 1;
                        if e.status == Some(429) && e.code == "tunnel_limit" {
                            tunnel_limit.store(true, Ordering::Relaxed);
                            stop.store(true, Ordering::Relaxed);
                        }
                        if r.first_error.is_none() {
                            r.first_error = Some(e.to_string());
                        }
                        if e.status.is_none() {
                            // Do not spin on a dead connection.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
            r
        }));
    }
    let mut hist = report::latency_histogram();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_error = None;
    for t in tasks {
        let r = t.await.context("a client task panicked")?;
        hist.add(&r.hist).expect("same histogram bounds");
        for (k, n) in r.errors {
            *errors.entry(k).or_default() += n;
        }
        first_error = first_error.or(r.first_error);
    }
    let elapsed = start.elapsed();
    let _ = timeline_stop.send(true);
    let per_second = timeline.await.unwrap_or_default();

    // Every create sends one `connect` notification; give the channels a moment to catch up.
    let created = hist.len();
    let wait_until = Instant::now() + Duration::from_secs(5);
    while fleet.connects() < created && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let notifications = fleet.connects();
    let dropped = fleet.dropped();
    let product_key = fleet.product_key.clone();
    fleet.close().await;

    let mut rep = Report::new("create", elapsed, &hist, errors);
    rep.params.insert("api".into(), json!(api.base()));
    rep.params.insert("clients".into(), json!(args.clients));
    rep.params.insert("devices".into(), json!(args.devices));
    rep.params.insert(
        "duration_s".into(),
        json!(args.common.duration.as_secs_f64()),
    );
    rep.extra.insert("product_key".into(), json!(product_key));
    rep.extra
        .insert("notifications".into(), json!(notifications));
    rep.extra.insert("ops_per_second".into(), json!(per_second));
    if !dropped.is_empty() {
        rep.extra.insert(
            "channels_dropped".into(),
            json!(dropped
                .iter()
                .map(|(d, why)| format!("{d}: {why}"))
                .collect::<Vec<_>>()),
        );
    }
    rep.print("creates");
    if let Some(path) = &args.common.json {
        rep.write_json(path)?;
        eprintln!("wrote {}", path.display());
        crate::chart::write_beside_or_warn(&rep.chart("creates/s"), path);
    }

    if tunnel_limit.load(Ordering::Relaxed) {
        bail!("{TUNNEL_LIMIT_HINT}");
    }
    if notifications < created {
        eprintln!(
            "warning: {created} tunnels created but only {notifications} connect notifications \
             reached the devices"
        );
    }
    if !dropped.is_empty() {
        eprintln!(
            "warning: {} device channels ended during the run",
            dropped.len()
        );
    }
    if created == 0 {
        bail!(
            "no tunnel was created; first error: {}",
            first_error.unwrap_or_else(|| "none".into())
        );
    }
    if let Some(e) = first_error {
        eprintln!("first error: {e}");
    }
    Ok(())
}
