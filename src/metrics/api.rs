//! `iotunnel_api_*`: the control API's requests by route template and status, and their
//! latency, as typed families of the registry.
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::BUCKETS;

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
    "/v1/keys",
    "/v1/keys/{key_id}",
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new(BUCKETS.iter().copied())
}

/// Control API request counts and latencies.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    requests: Family<RouteStatus, Counter>,
    durations: Family<Route, Histogram, fn() -> Histogram>,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        let metrics = Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
        };
        // Every (route, usual status) has a series from start-up, so that rate() and increase()
        // see the first 409 of a route go up from 0 instead of a series born at 1.
        for route in API_ROUTES {
            for status in API_STATUSES {
                let _ = metrics.requests.get_or_create(&RouteStatus {
                    route,
                    status: *status,
                });
            }
            let _ = metrics.durations.get_or_create(&Route { route });
        }
        metrics
    }
}

impl ApiMetrics {
    /// Counts a request no route matched.
    pub fn unmatched(&self, status: axum::http::StatusCode) {
        self.record("unmatched", status.as_u16(), 0.0);
    }

    /// Adds both families to `registry` (they stay shared with this value).
    pub(super) fn register(&self, registry: &mut Registry) {
        // The registry ends each help text with a period itself.
        registry.register(
            "iotunnel_api_requests",
            "Control API requests, by route template and status",
            self.requests.clone(),
        );
        registry.register(
            "iotunnel_api_request_duration_seconds",
            "Control API request latency, by route template",
            self.durations.clone(),
        );
    }

    fn record(&self, route: &str, status: u16, seconds: f64) {
        let route = API_ROUTES
            .iter()
            .copied()
            .find(|r| *r == route)
            .unwrap_or("unmatched");
        self.requests
            .get_or_create(&RouteStatus { route, status })
            .inc();
        self.durations
            .get_or_create(&Route { route })
            .observe(seconds);
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
    metrics.record(
        &route,
        resp.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    resp
}
