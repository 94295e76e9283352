//! The Prometheus exporter on `--metrics-addr`.
//!
//! For now it exports what the control plane knows (build info, OPEN tunnels in the index,
//! connected device channels); the data-plane series come with the relay.
use std::fmt::Write;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::control::ControlPlane;

/// Renders the metrics in the Prometheus text format.
pub fn render(cp: &ControlPlane) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP iotunnel_build_info Build information; always 1."
    );
    let _ = writeln!(out, "# TYPE iotunnel_build_info gauge");
    let _ = writeln!(
        out,
        "iotunnel_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        out,
        "# HELP iotunnel_index_tunnels OPEN tunnels in the relay's token index."
    );
    let _ = writeln!(out, "# TYPE iotunnel_index_tunnels gauge");
    let _ = writeln!(out, "iotunnel_index_tunnels {}", cp.index.len());
    let _ = writeln!(
        out,
        "# HELP iotunnel_device_channels_connected Connected device channels."
    );
    let _ = writeln!(out, "# TYPE iotunnel_device_channels_connected gauge");
    let _ = writeln!(
        out,
        "iotunnel_device_channels_connected {}",
        cp.channels.connected()
    );
    out
}

/// Serves `/metrics` until `shutdown` turns true.
pub async fn serve(
    cp: Arc<ControlPlane>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let app =
        Router::new().route(
            "/metrics",
            get(move || {
                let cp = cp.clone();
                async move {
                    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], render(&cp)).into_response()
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
