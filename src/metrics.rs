//! The Prometheus exporter, through the `prometheus-client` crate: `/metrics` on `--metrics-addr`
//! and on the API address. Base units, `_total` counters, bounded labels, every label value
//! present from start-up.
//!
//! One [`Registry`] holds the control API's typed families ([`ApiMetrics`]) and three custom
//! collectors that read state at scrape time: the control plane's ([`NodeCollector`]), the
//! relay's per-shard snapshots ([`relay::RelayCollector`], merged at scrape: hdrhistograms become
//! cumulative buckets from 25 µs to 10 s) and the process's ([`process::ProcessCollector`]).
//!
//! The answer is the Prometheus text format (0.0.4) unless the scraper's `Accept` prefers
//! OpenMetrics (as Prometheus itself does). Either way the series are the ones this exporter
//! always had: see [`legacy_le`] for the one place where the library's spelling is undone.
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::control::ControlPlane;
use crate::relay::stats::StatsSnapshot;
use crate::relay::RelayScraper;

mod api;
mod process;
mod relay;

pub use api::{track_api, ApiMetrics, RouteLabel, API_ROUTES, API_STATUSES};

/// Histogram bucket bounds in seconds: 25 µs to 10 s (issue 5).
pub const BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4, the default.
    Prometheus,
    /// OpenMetrics text 1.0.0, for a scraper whose `Accept` prefers it.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a quality at least that of every other type it
    /// accepts (Prometheus sends it first with q=1); the text format otherwise, and for no header.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let (mut openmetrics, mut other) = (0.0f32, 0.0f32);
        for item in accept.split(',') {
            let mut parts = item.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            if media == "application/openmetrics-text" {
                openmetrics = openmetrics.max(q);
            } else if !media.is_empty() {
                other = other.max(q);
            }
        }
        if openmetrics > 0.0 && openmetrics >= other {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }
}

/// The registry and what a scrape needs to fill it.
#[derive(Debug)]
pub struct Exporter {
    registry: Registry,
    /// The shards' snapshots of the scrape in progress, read by the relay collector.
    shards: Arc<Mutex<Vec<StatsSnapshot>>>,
    relay: Option<RelayScraper>,
    /// One scrape at a time: the snapshots encoded are the ones that scrape took.
    scraping: tokio::sync::Mutex<()>,
}

impl Exporter {
    /// Registers every metric: the API families of `api`, the control plane's and the process's
    /// state, and the relay's snapshots when the server runs a relay.
    pub fn new(cp: Arc<ControlPlane>, api: &ApiMetrics, relay: Option<RelayScraper>) -> Self {
        let mut registry = Registry::default();
        // Info appends `_info`: the series is `iotunnel_build_info{version}`, as it always was.
        registry.register(
            "iotunnel_build",
            "Build information; always 1",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        let per_tunnel = cp.settings.metrics_per_tunnel;
        registry.register_collector(Box::new(NodeCollector { cp }));
        let shards = Arc::new(Mutex::new(Vec::new()));
        registry.register_collector(Box::new(relay::RelayCollector {
            shards: shards.clone(),
            per_tunnel,
        }));
        api.register(&mut registry);
        registry.register_collector(Box::new(process::ProcessCollector));
        Self {
            registry,
            shards,
            relay,
            scraping: tokio::sync::Mutex::new(()),
        }
    }

    /// Takes the shards' snapshots and encodes every metric in `format`.
    pub async fn render(&self, format: Format) -> String {
        let _one = self.scraping.lock().await;
        let snapshots = match &self.relay {
            Some(r) => r.scrape().await,
            None => Vec::new(),
        };
        *self.shards.lock().expect("metrics lock") = snapshots;
        let mut out = String::with_capacity(64 * 1024);
        let encoded = match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)
            }
        };
        self.shards.lock().expect("metrics lock").clear();
        // Writing into a String cannot fail, and no collector returns an error of its own.
        if let Err(e) = encoded {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        legacy_le(&out)
    }
}

/// Spells every histogram bound as this exporter always has (`le="0.000025"`, `le="1"`): the
/// library writes Go's `2.5e-05` in the text format and `2.5e-5`, `1.0` in OpenMetrics, and a
/// Prometheus before 3.0 stores `le` verbatim, so another spelling would start new series and
/// break queries naming a bucket. Only values of [`BUCKETS`] are rewritten.
pub fn legacy_le(text: &str) -> String {
    const LE: &str = "le=\"";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(LE) {
        let (head, tail) = rest.split_at(at + LE.len());
        out.push_str(head);
        let end = tail.find('"').unwrap_or(tail.len());
        let value = &tail[..end];
        // A label named `le`, not one ending in it (`role`).
        let is_le = matches!(head.as_bytes().get(at.wrapping_sub(1)), Some(b'{' | b','));
        match value.parse::<f64>() {
            Ok(v) if is_le && BUCKETS.contains(&v) => {
                use std::fmt::Write;
                let _ = write!(out, "{v}");
            }
            _ => out.push_str(value),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// The control plane's state at scrape time: tunnels owned, device channels, the fleet.
struct NodeCollector {
    cp: Arc<ControlPlane>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cp = &self.cp;
        gauges(
            &mut encoder,
            "iotunnel_tunnels",
            "Tunnels this node owns, by state (closed: tokens still remembered). In a fleet each \
             tunnel counts on its owner only, so sums over nodes are right.",
            [
                ([("state", "open")], cp.index.owned_here() as u64),
                ([("state", "closed")], cp.index.closed_here() as u64),
            ],
        )?;
        gauge(
            &mut encoder,
            "iotunnel_device_channels_connected",
            "Connected device channels.",
            cp.channels.connected() as u64,
        )?;
        let now = cp.clock.now_ms();
        let dead_after = cp.settings.node_dead_after_ms as i64;
        let nodes = cp.fleet.nodes();
        let live = nodes
            .iter()
            .filter(|n| crate::control::fleet::is_live(n, now, dead_after))
            .count();
        gauges(
            &mut encoder,
            "iotunnel_fleet_nodes",
            "Nodes of the fleet as this node last read them, by state (live, dead).",
            [
                ([("state", "live")], live as u64),
                ([("state", "dead")], (nodes.len() - live) as u64),
            ],
        )?;
        gauge(
            &mut encoder,
            "iotunnel_fleet_leader",
            "1 while this node leads the fleet (sweeps lifecycles, re-places dead nodes' tunnels).",
            u64::from(cp.fleet.is_leader()),
        )
    }
}

/// One unlabelled gauge.
fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(m)
}

/// A gauge family, one series per label set.
fn gauges<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// `GET /metrics`, in the format the scraper's `Accept` header prefers.
async fn metrics(State(exporter): State<Arc<Exporter>>, headers: HeaderMap) -> Response {
    let accept = headers.get(ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    let body = exporter.render(format).await;
    ([(CONTENT_TYPE, format.content_type())], body).into_response()
}

/// The `/metrics` route, for the metrics listener and the API's.
pub fn router(exporter: Arc<Exporter>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(exporter)
}

/// Serves `/metrics` until `shutdown` turns true.
pub async fn serve(
    exporter: Arc<Exporter>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let serve = axum::serve(listener, router(exporter)).with_graceful_shutdown(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    });
    if let Err(e) = serve.await {
        tracing::error!(error = %e, "metrics server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_openmetrics_only_when_preferred() {
        // What Prometheus 2.x sends by default.
        let prometheus = "application/openmetrics-text;version=1.0.0,\
            application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
        for plain in [
            None,
            Some("*/*"),
            Some("text/plain"),
            Some("text/plain;version=0.0.4,application/openmetrics-text;q=0.5"),
            Some("application/openmetrics-text;q=0"),
            Some(""),
        ] {
            assert_eq!(Format::negotiate(plain), Format::Prometheus, "{plain:?}");
        }
    }

    #[test]
    fn bucket_bounds_keep_their_spelling() {
        let text = "a_bucket{le=\"2.5e-05\"} 1\na_bucket{role=\"x\",le=\"5e-5\"} 2\n\
            a_bucket{le=\"1.0\"} 3\na_bucket{le=\"10\"} 3\na_bucket{le=\"+Inf\"} 4\n\
            b{le=\"0.3\"} 1\nc{route=\"le=\\\"\"} 1\nd{handle=\"1.0\"} 1\n";
        assert_eq!(
            legacy_le(text),
            "a_bucket{le=\"0.000025\"} 1\na_bucket{role=\"x\",le=\"0.00005\"} 2\n\
            a_bucket{le=\"1\"} 3\na_bucket{le=\"10\"} 3\na_bucket{le=\"+Inf\"} 4\n\
            b{le=\"0.3\"} 1\nc{route=\"le=\\\"\"} 1\nd{handle=\"1.0\"} 1\n"
        );
    }
}
