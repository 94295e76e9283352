//! The Prometheus exporter on `--metrics-addr`: text format, base units, `_total` counters,
//! bounded labels, every label value present from start-up.
//!
//! Data-plane series come from per-shard snapshots merged at scrape time (see
//! [`crate::relay::stats`]): hdrhistograms are turned into cumulative buckets from 25 µs to 10 s.
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hdrhistogram::Histogram;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::control::ControlPlane;
use crate::relay::stats::{MeshDirection, StatsSnapshot, DISCONNECT_REASONS, HANDSHAKE_FAILURES};
use crate::relay::upgrade::Refusal;
use crate::relay::RelayScraper;

/// Histogram bucket bounds in seconds: 25 µs to 10 s (issue 5).
pub const BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The API routes, as templates: the only values of the `route` label (plus `unmatched`).
pub const API_ROUTES: &[&str] = &[
    "/v1/accounts",
    "/v1/products",
    "/v1/products/{product_key}/devices",
    "/v1/products/{product_key}/devices/{device_name}",
    "/v1/tunnels",
    "/v1/tunnels/{id}",
    "/v1/tunnels/{id}/close",
    "/v1/tunnels/batch-close",
    "/v1/tunnels/batch-delete",
    "/v1/tunnels/{id}/rotate",
    "/v1/device/connect",
    "/v1/access-keys",
    "/v1/access-keys/{access_key_id}",
    "aws:OpenTunnel",
    "aws:CloseTunnel",
    "aws:DescribeTunnel",
    "aws:ListTunnels",
    "aws:RotateTunnelAccessToken",
    "aws:TagResource",
    "aws:UntagResource",
    "aws:ListTagsForResource",
    "aws:unknown",
    "aliyun:CreateDeviceTunnel",
    "aliyun:CloseDeviceTunnel",
    "aliyun:DeleteDeviceTunnel",
    "aliyun:QueryDeviceTunnel",
    "aliyun:EnableDeviceTunnel",
    "aliyun:DisableDeviceTunnel",
    "aliyun:GetDeviceTunnelStatus",
    "aliyun:unknown",
    "/healthz",
    "/readyz",
    "/openapi.json",
    "unmatched",
];

/// The statuses the API answers in the normal course, each exported from start-up per route.
pub const API_STATUSES: &[u16] = &[200, 201, 204, 400, 401, 403, 404, 409, 413, 429, 500, 503];

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("static bounds are valid")
}

/// Control API request counts and latencies (the control plane is not the hot path: a mutex).
#[derive(Debug)]
pub struct ApiMetrics {
    requests: Mutex<HashMap<(String, u16), u64>>,
    durations: Mutex<HashMap<String, Histogram<u64>>>,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        let durations = API_ROUTES
            .iter()
            .map(|r| (r.to_string(), new_histogram()))
            .collect();
        Self {
            requests: Mutex::default(),
            durations: Mutex::new(durations),
        }
    }
}

impl ApiMetrics {
    /// Counts a request no route matched.
    pub fn unmatched(&self, status: axum::http::StatusCode) {
        self.record("unmatched", status.as_u16(), Duration::ZERO);
    }

    fn record(&self, route: &str, status: u16, took: Duration) {
        let route = if API_ROUTES.contains(&route) {
            route
        } else {
            "unmatched"
        };
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((route.to_string(), status))
            .or_default() += 1;
        if let Some(h) = self.durations.lock().expect("metrics lock").get_mut(route) {
            let _ = h.record(took.as_nanos() as u64);
        }
    }
}

/// A response's route label when the matched path does not name the operation (the vendor
/// facades all live on `POST /`): one of [`API_ROUTES`].
#[derive(Debug, Clone, Copy)]
pub struct RouteLabel(pub &'static str);

/// Middleware recording `iotunnel_api_*` by route template.
pub async fn track_api(
    State(metrics): State<Arc<ApiMetrics>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |m| m.as_str().to_string());
    let start = Instant::now();
    let resp = next.run(req).await;
    let route = match resp.extensions().get::<RouteLabel>() {
        Some(label) => label.0.to_string(),
        None => route,
    };
    metrics.record(&route, resp.status().as_u16(), start.elapsed());
    resp
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram<u64>) {
    let sep = if labels.is_empty() { "" } else { "," };
    for b in BUCKETS {
        let count = h.count_between(0, (*b * 1e9) as u64);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.len());
    // hdrhistogram keeps no exact sum; the mean times the count is within its 0.1% precision.
    let sum = h.mean() * h.len() as f64 / 1e9;
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {}", h.len());
}

fn merge<'a>(hs: impl Iterator<Item = &'a Histogram<u64>>) -> Histogram<u64> {
    let mut total = new_histogram();
    for h in hs {
        let _ = total.add(h);
    }
    total
}

const ROLES: [&str; 2] = ["device", "client"];
const FAMILIES: [&str; 2] = ["aws", "aliyun"];
const DIRECTIONS: [&str; 2] = ["client_to_device", "device_to_client"];

fn render_relay(out: &mut String, shards: &[StatsSnapshot]) {
    let sum2 = |f: &dyn Fn(&StatsSnapshot) -> [u64; 2]| {
        shards.iter().fold([0u64; 2], |acc, s| {
            let v = f(s);
            [acc[0] + v[0], acc[1] + v[1]]
        })
    };
    header(
        out,
        "iotunnel_peers_connected",
        "gauge",
        "Peers connected to the relay, by role.",
    );
    let peers = sum2(&|s| s.peers);
    for (i, role) in ROLES.iter().enumerate() {
        let _ = writeln!(
            out,
            "iotunnel_peers_connected{{role=\"{role}\"}} {}",
            peers[i]
        );
    }
    header(
        out,
        "iotunnel_peer_connects_total",
        "counter",
        "Peer connections accepted, by role and family.",
    );
    for (r, role) in ROLES.iter().enumerate() {
        for (f, family) in FAMILIES.iter().enumerate() {
            let n: u64 = shards.iter().map(|s| s.connects[r][f]).sum();
            let _ = writeln!(
                out,
                "iotunnel_peer_connects_total{{role=\"{role}\",family=\"{family}\"}} {n}"
            );
        }
    }
    header(
        out,
        "iotunnel_peer_disconnects_total",
        "counter",
        "Peer disconnections, by role and reason.",
    );
    for (r, role) in ROLES.iter().enumerate() {
        for reason in DISCONNECT_REASONS {
            let n: u64 = shards
                .iter()
                .map(|s| s.disconnects.get(&(r, *reason)).copied().unwrap_or(0))
                .sum();
            let _ = writeln!(
                out,
                "iotunnel_peer_disconnects_total{{role=\"{role}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
    header(
        out,
        "iotunnel_relay_bytes_total",
        "counter",
        "Bytes forwarded (WebSocket frames), by direction.",
    );
    let bytes = sum2(&|s| s.bytes);
    for (i, d) in DIRECTIONS.iter().enumerate() {
        let _ = writeln!(
            out,
            "iotunnel_relay_bytes_total{{direction=\"{d}\"}} {}",
            bytes[i]
        );
    }
    header(
        out,
        "iotunnel_relay_frames_total",
        "counter",
        "Frames forwarded, by direction.",
    );
    let frames = sum2(&|s| s.frames);
    for (i, d) in DIRECTIONS.iter().enumerate() {
        let _ = writeln!(
            out,
            "iotunnel_relay_frames_total{{direction=\"{d}\"}} {}",
            frames[i]
        );
    }
    header(
        out,
        "iotunnel_forward_latency_seconds",
        "histogram",
        "Time from a frame fully read to fully written to the other side.",
    );
    histogram(
        out,
        "iotunnel_forward_latency_seconds",
        "",
        &merge(shards.iter().map(|s| &s.forward_latency)),
    );
    header(
        out,
        "iotunnel_peer_rtt_seconds",
        "histogram",
        "WebSocket ping round trips, by role.",
    );
    for (r, role) in ROLES.iter().enumerate() {
        let h = merge(shards.iter().map(|s| &s.rtt[r]));
        histogram(
            out,
            "iotunnel_peer_rtt_seconds",
            &format!("role=\"{role}\""),
            &h,
        );
    }
    header(
        out,
        "iotunnel_handshake_failures_total",
        "counter",
        "Relay handshakes that failed, by reason.",
    );
    let reasons = Refusal::ALL
        .iter()
        .map(|r| r.label())
        .chain(HANDSHAKE_FAILURES.iter().copied());
    for reason in reasons {
        let n: u64 = shards
            .iter()
            .map(|s| s.handshake_failures.get(reason).copied().unwrap_or(0))
            .sum();
        let _ = writeln!(
            out,
            "iotunnel_handshake_failures_total{{reason=\"{reason}\"}} {n}"
        );
    }
    header(
        out,
        "iotunnel_shard_tunnels",
        "gauge",
        "Tunnels with a connected peer, by owner shard.",
    );
    for (i, s) in shards.iter().enumerate() {
        let _ = writeln!(out, "iotunnel_shard_tunnels{{shard=\"{i}\"}} {}", s.tunnels);
    }
    header(
        out,
        "iotunnel_shard_bytes_total",
        "counter",
        "Bytes forwarded (WebSocket frames, both directions), by the shard that forwarded them.",
    );
    for (i, s) in shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "iotunnel_shard_bytes_total{{shard=\"{i}\"}} {}",
            s.bytes[0] + s.bytes[1]
        );
    }
    render_mesh(out, shards);
}

/// The fleet's mesh series (all zero on a single node).
fn render_mesh(out: &mut String, shards: &[StatsSnapshot]) {
    let sum = |f: &dyn Fn(&StatsSnapshot) -> u64| shards.iter().map(f).sum::<u64>();
    header(
        out,
        "iotunnel_mesh_forwards_total",
        "counter",
        "Connections this node forwarded to a tunnel's owner node, by result.",
    );
    for (i, result) in ["ok", "unreachable"].iter().enumerate() {
        let n = sum(&|s| s.mesh_forwards[i]);
        let _ = writeln!(
            out,
            "iotunnel_mesh_forwards_total{{result=\"{result}\"}} {n}"
        );
    }
    header(
        out,
        "iotunnel_mesh_connections",
        "gauge",
        "Forwarded connections open now (outbound: to an owner node, inbound: from another node).",
    );
    for d in MeshDirection::ALL {
        let n = sum(&|s| s.mesh_connections[d as usize]);
        let _ = writeln!(
            out,
            "iotunnel_mesh_connections{{direction=\"{}\"}} {n}",
            d.as_str()
        );
    }
    header(
        out,
        "iotunnel_mesh_bytes_total",
        "counter",
        "Bytes carried by forwarded connections, both ways summed, by direction.",
    );
    for d in MeshDirection::ALL {
        let n = sum(&|s| s.mesh_bytes[d as usize]);
        let _ = writeln!(
            out,
            "iotunnel_mesh_bytes_total{{direction=\"{}\"}} {n}",
            d.as_str()
        );
    }
}

/// The optional per-tunnel series (`--metrics-per-tunnel`), for at most `max` tunnels.
fn render_per_tunnel(out: &mut String, shards: &[StatsSnapshot], max: usize) {
    if max == 0 {
        return;
    }
    let mut all: Vec<_> = shards.iter().flat_map(|s| &s.per_tunnel).collect();
    all.sort_by(|a, b| a.tunnel_id.cmp(&b.tunnel_id));
    all.truncate(max);
    header(
        out,
        "iotunnel_tunnel_relay_bytes_total",
        "counter",
        "Bytes forwarded per tunnel, by direction.",
    );
    for t in &all {
        for (i, d) in DIRECTIONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "iotunnel_tunnel_relay_bytes_total{{tunnel_id=\"{}\",direction=\"{d}\"}} {}",
                t.tunnel_id, t.bytes[i]
            );
        }
    }
    header(
        out,
        "iotunnel_tunnel_peer_connected",
        "gauge",
        "Whether each side of a tunnel is connected.",
    );
    for t in &all {
        for (i, role) in ROLES.iter().enumerate() {
            let _ = writeln!(
                out,
                "iotunnel_tunnel_peer_connected{{tunnel_id=\"{}\",role=\"{role}\"}} {}",
                t.tunnel_id,
                u8::from(t.connected[i])
            );
        }
    }
    header(
        out,
        "iotunnel_tunnel_peer_rtt_seconds",
        "gauge",
        "Smoothed ping RTT of each side of a tunnel.",
    );
    for t in &all {
        for (i, role) in ROLES.iter().enumerate() {
            if let Some(us) = t.srtt_us[i] {
                let _ = writeln!(
                    out,
                    "iotunnel_tunnel_peer_rtt_seconds{{tunnel_id=\"{}\",role=\"{role}\"}} {}",
                    t.tunnel_id,
                    us as f64 / 1e6
                );
            }
        }
    }
}

fn render_api(out: &mut String, api: &ApiMetrics) {
    header(
        out,
        "iotunnel_api_requests_total",
        "counter",
        "Control API requests, by route template and status.",
    );
    // Every (route, usual status) has a series from start-up, so that rate() and increase()
    // see the first 409 of a route go up from 0 instead of a series born at 1.
    let mut series: std::collections::BTreeMap<(String, u16), u64> = API_ROUTES
        .iter()
        .flat_map(|r| API_STATUSES.iter().map(|s| ((r.to_string(), *s), 0)))
        .collect();
    series.extend(api.requests.lock().expect("metrics lock").clone());
    for ((route, status), n) in series {
        let _ = writeln!(
            out,
            "iotunnel_api_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
        );
    }
    header(
        out,
        "iotunnel_api_request_duration_seconds",
        "histogram",
        "Control API request latency, by route template.",
    );
    let durations = api.durations.lock().expect("metrics lock");
    for route in API_ROUTES {
        if let Some(h) = durations.get(*route) {
            histogram(
                out,
                "iotunnel_api_request_duration_seconds",
                &format!("route=\"{route}\""),
                h,
            );
        }
    }
}

/// Process CPU, RSS and open fds from /proc.
fn render_process(out: &mut String) {
    // clock ticks per second and the page size are 100 and 4096 on every Linux we run on.
    const TICKS: f64 = 100.0;
    const PAGE: u64 = 4096;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
        // After the command: state is field 3, utime 14, stime 15, rss 24 (1-based in proc(5)).
        let get = |n: usize| {
            fields
                .get(n - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        header(
            out,
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time.",
        );
        let _ = writeln!(
            out,
            "process_cpu_seconds_total {}",
            (get(14) + get(15)) as f64 / TICKS
        );
        header(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory.",
        );
        let _ = writeln!(out, "process_resident_memory_bytes {}", get(24) * PAGE);
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        header(out, "process_open_fds", "gauge", "Open file descriptors.");
        let _ = writeln!(out, "process_open_fds {}", dir.count());
    }
}

fn render_fleet(out: &mut String, cp: &ControlPlane) {
    let now = cp.clock.now_ms();
    let dead_after = cp.settings.node_dead_after_ms as i64;
    let nodes = cp.fleet.nodes();
    let live = nodes
        .iter()
        .filter(|n| crate::control::fleet::is_live(n, now, dead_after))
        .count();
    header(
        out,
        "iotunnel_fleet_nodes",
        "gauge",
        "Nodes of the fleet as this node last read them, by state (live, dead).",
    );
    let _ = writeln!(out, "iotunnel_fleet_nodes{{state=\"live\"}} {live}");
    let _ = writeln!(
        out,
        "iotunnel_fleet_nodes{{state=\"dead\"}} {}",
        nodes.len() - live
    );
    header(
        out,
        "iotunnel_fleet_leader",
        "gauge",
        "1 while this node leads the fleet (sweeps lifecycles, re-places dead nodes' tunnels).",
    );
    let _ = writeln!(
        out,
        "iotunnel_fleet_leader {}",
        u8::from(cp.fleet.is_leader())
    );
}

/// Renders every metric in the Prometheus text format.
pub fn render(cp: &ControlPlane, api: &ApiMetrics, shards: &[StatsSnapshot]) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "iotunnel_build_info",
        "gauge",
        "Build information; always 1.",
    );
    let _ = writeln!(
        out,
        "iotunnel_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    header(
        &mut out,
        "iotunnel_tunnels",
        "gauge",
        "Tunnels this node owns, by state (closed: tokens still remembered). In a fleet each \
         tunnel counts on its owner only, so sums over nodes are right.",
    );
    let _ = writeln!(
        out,
        "iotunnel_tunnels{{state=\"open\"}} {}",
        cp.index.owned_here()
    );
    let _ = writeln!(
        out,
        "iotunnel_tunnels{{state=\"closed\"}} {}",
        cp.index.closed_here()
    );
    header(
        &mut out,
        "iotunnel_device_channels_connected",
        "gauge",
        "Connected device channels.",
    );
    let _ = writeln!(
        out,
        "iotunnel_device_channels_connected {}",
        cp.channels.connected()
    );
    render_fleet(&mut out, cp);
    render_relay(&mut out, shards);
    render_per_tunnel(&mut out, shards, cp.settings.metrics_per_tunnel);
    render_api(&mut out, api);
    render_process(&mut out);
    out
}

/// Serves `/metrics` until `shutdown` turns true.
pub async fn serve(
    cp: Arc<ControlPlane>,
    api: Arc<ApiMetrics>,
    relay: Option<RelayScraper>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let (cp, api, relay) = (cp.clone(), api.clone(), relay.clone());
            async move {
                let shards = match &relay {
                    Some(r) => r.scrape().await,
                    None => Vec::new(),
                };
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4")],
                    render(&cp, &api, &shards),
                )
                    .into_response()
            }
        }),
    );
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    });
    if let Err(e) = serve.await {
        tracing::error!(error = %e, "metrics server failed");
    }
}
