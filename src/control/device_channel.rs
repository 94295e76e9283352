//! The device channel: one WebSocket per device at `GET /v1/device/connect` on the API port.
//!
//! Authentication (the secret never travels): headers `x-iotunnel-product-key`,
//! `x-iotunnel-device-name`, `x-iotunnel-timestamp` (unix seconds, within
//! [`TIMESTAMP_WINDOW_SECS`] of the server's clock) and `x-iotunnel-signature`, the lowercase hex
//! HMAC-SHA256 of `{product_key}\n{device_name}\n{timestamp}` keyed by the device secret.
//!
//! Flow: while the channel is up the device is online. On every (re)connect the server first
//! sends a `connect` message for each OPEN tunnel of the device, then live `connect`/`close`
//! messages (one JSON object per text message). A newer channel of the same device replaces the
//! older one, which is closed with code [`CLOSE_REPLACED`]. The server pings every interval; a
//! channel silent for [`MISSED_PINGS`] intervals is dropped as dead. The agent reports the
//! services it maps (`{"operation": "services", ...}`, [`crate::proto::device`]); until it does
//! (older agents never do) the device's services are unknown and any service may be tunnelled.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::error::ApiError;
use super::ControlPlane;
use crate::token;

/// Accepted clock skew between device and server, seconds (DESIGN.md: ±300 s).
pub const TIMESTAMP_WINDOW_SECS: i64 = 300;
/// Pings a channel may miss before it is dropped: 3 × 20 s = the 60 s detection bound.
pub const MISSED_PINGS: u32 = 3;
use crate::proto::device::AgentMessage;
pub use crate::proto::device::{CLOSE_DEVICE_DELETED, CLOSE_REPLACED};

/// A message for a connected channel.
#[derive(Debug, Clone)]
pub enum ChannelMsg {
    /// A JSON notification.
    Text(String),
    /// A newer channel of the device took over.
    Replaced,
    /// The device was deleted.
    DeviceDeleted,
}

#[derive(Debug)]
struct ChannelHandle {
    id: u64,
    tx: mpsc::UnboundedSender<ChannelMsg>,
    /// What the agent reported it serves; `None` until it reports (older agents never do).
    services: Option<Vec<String>>,
}

type DeviceKey = (String, String);

/// The connected device channels, by (product key, device name).
#[derive(Debug, Default)]
pub struct DeviceChannels {
    map: DashMap<DeviceKey, ChannelHandle>,
    next_id: AtomicU64,
}

impl DeviceChannels {
    /// Whether the device has a channel up.
    pub fn is_online(&self, product_key: &str, device_name: &str) -> bool {
        self.map
            .contains_key(&(product_key.to_string(), device_name.to_string()))
    }

    /// The services the device's connected agent reported, if it did.
    pub fn services_of(&self, product_key: &str, device_name: &str) -> Option<Vec<String>> {
        self.map
            .get(&(product_key.to_string(), device_name.to_string()))
            .and_then(|h| h.services.clone())
    }

    /// Records what channel `id` of the device reported it serves (a replaced one is ignored).
    fn set_services(&self, key: &DeviceKey, id: u64, services: Vec<String>) {
        if let Some(mut h) = self.map.get_mut(key) {
            if h.id == id {
                h.services = Some(services);
            }
        }
    }

    /// The number of connected channels.
    pub fn connected(&self) -> usize {
        self.map.len()
    }

    /// Queues a message for the device's channel, if it is up.
    pub fn send(&self, product_key: &str, device_name: &str, msg: ChannelMsg) {
        if let Some(h) = self
            .map
            .get(&(product_key.to_string(), device_name.to_string()))
        {
            let _ = h.tx.send(msg);
        }
    }

    /// Ends every channel (server shutdown).
    pub fn close_all(&self) {
        self.map.clear();
    }

    fn register(&self, key: DeviceKey) -> (u64, mpsc::UnboundedReceiver<ChannelMsg>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(old) = self.map.insert(
            key,
            ChannelHandle {
                id,
                tx,
                services: None,
            },
        ) {
            let _ = old.tx.send(ChannelMsg::Replaced);
        }
        (id, rx)
    }

    /// Removes the channel `id` of the device; false when a newer one replaced it.
    fn unregister(&self, key: &DeviceKey, id: u64) -> bool {
        self.map.remove_if(key, |_, h| h.id == id).is_some()
    }
}

/// Whether a device's timestamp `ts` is within [`TIMESTAMP_WINDOW_SECS`] of `now_s`, for any
/// two values (both come from outside: the clock and a header).
pub fn timestamp_fresh(now_s: i64, ts: i64) -> bool {
    // `(now_s - ts).abs()` overflows for hostile values (found by fuzz/device_channel).
    now_s.abs_diff(ts) <= TIMESTAMP_WINDOW_SECS.unsigned_abs()
}

/// Whether `signature` (hex) is the HMAC-SHA256 of `{product_key}\n{device_name}\n{ts_text}`
/// keyed by the device secret, compared in constant time.
pub fn signature_matches(
    secret: &str,
    product_key: &str,
    device_name: &str,
    ts_text: &str,
    signature: &str,
) -> bool {
    let expected = token::hmac_sha256(
        secret.as_bytes(),
        format!("{product_key}\n{device_name}\n{ts_text}").as_bytes(),
    );
    let presented = hex::decode(signature)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok());
    presented.is_some_and(|p| token::hashes_equal(&p, &expected))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing_header",
                format!("header {name} is required"),
            )
        })
}

/// Upgrades an authenticated device to its channel.
#[utoipa::path(get, path = "/v1/device/connect", tag = "device",
    params(
        ("x-iotunnel-product-key" = String, Header, description = "product key"),
        ("x-iotunnel-device-name" = String, Header, description = "device name"),
        ("x-iotunnel-timestamp" = String, Header, description = "unix seconds"),
        ("x-iotunnel-signature" = String, Header, description = "hex HMAC-SHA256(secret, pk\\ndn\\nts)"),
    ),
    responses(
        (status = 101, description = "WebSocket channel of JSON notifications"),
        (status = 400, body = super::error::ErrorEnvelope), (status = 401, body = super::error::ErrorEnvelope),
        (status = 426, body = super::error::ErrorEnvelope),
    ))]
pub async fn connect(
    State(cp): State<Arc<ControlPlane>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let product_key = header(&headers, "x-iotunnel-product-key")?.to_string();
    let device_name = header(&headers, "x-iotunnel-device-name")?.to_string();
    let ts_text = header(&headers, "x-iotunnel-timestamp")?;
    let signature = header(&headers, "x-iotunnel-signature")?;
    let ts: i64 = ts_text.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_timestamp",
            "x-iotunnel-timestamp must be unix seconds",
        )
    })?;
    let now_s = cp.clock.now_ms() / 1000;
    if !timestamp_fresh(now_s, ts) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "stale_timestamp",
            format!("timestamp is more than {TIMESTAMP_WINDOW_SECS} s from the server's clock"),
        ));
    }
    let bad_signature = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
            "unknown device or invalid signature",
        )
    };
    let device = cp
        .store
        .get_device(product_key.clone(), device_name.clone())
        .await?
        .ok_or_else(bad_signature)?;
    if !signature_matches(
        &device.secret,
        &product_key,
        &device_name,
        ts_text,
        signature,
    ) {
        tracing::info!(%product_key, %device_name, "device channel refused: bad signature");
        return Err(bad_signature());
    }
    let ws = ws.map_err(|_| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "the device channel is a WebSocket upgrade",
        )
    })?;
    // Register before the 101 goes out: a device that has its answer is online, so a create
    // right after cannot see it offline. Notifications wait in the queue until the socket is
    // served; the guard unregisters if the upgrade never completes.
    let key = (product_key, device_name);
    let (id, rx) = cp.channels.register(key.clone());
    let guard = Registration {
        cp: cp.clone(),
        key,
        id,
    };
    if cp.fleet.shared {
        // Fleet-wide presence, and the end of an older channel on another node.
        let (pk, dn) = (guard.key.0.clone(), guard.key.1.clone());
        cp.store
            .set_device_channel(
                pk.clone(),
                dn.clone(),
                cp.fleet.node_id.clone(),
                cp.clock.now_ms(),
            )
            .await?;
        cp.publish(super::fleet::FleetMsg::Channel {
            product_key: pk,
            device_name: dn,
        })
        .await;
    }
    Ok(ws.on_upgrade(move |socket| serve_channel(guard, socket, rx)))
}

/// A registered channel; unregistered when dropped (served to the end, or upgrade failed).
struct Registration {
    cp: Arc<ControlPlane>,
    key: DeviceKey,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let gone = self.cp.channels.unregister(&self.key, self.id);
        if gone && self.cp.fleet.shared {
            let (cp, (pk, dn)) = (self.cp.clone(), self.key.clone());
            // Only this node's record goes: a newer channel elsewhere keeps the device online.
            tokio::spawn(async move {
                // A newer channel of the device on this node keeps the record.
                if cp.channels.is_online(&pk, &dn) {
                    return;
                }
                let node = cp.fleet.node_id.clone();
                if let Err(e) = cp.store.clear_device_channel(pk, dn, node).await {
                    tracing::warn!(error = %e, "cannot clear device presence");
                }
            });
        }
    }
}

async fn serve_channel(
    reg: Registration,
    mut socket: WebSocket,
    mut rx: mpsc::UnboundedReceiver<ChannelMsg>,
) {
    let (pk, dn) = (&reg.key.0, &reg.key.1);
    tracing::info!(product_key = %pk, device_name = %dn, "device channel connected");
    let reason = run_channel(&reg.cp, &mut socket, &reg.key, reg.id, &mut rx).await;
    tracing::info!(product_key = %pk, device_name = %dn, reason, "device channel disconnected");
}

async fn run_channel(
    cp: &ControlPlane,
    socket: &mut WebSocket,
    key: &DeviceKey,
    id: u64,
    rx: &mut mpsc::UnboundedReceiver<ChannelMsg>,
) -> &'static str {
    // Replay after registering, so that a tunnel created meanwhile is sent at least once.
    match cp
        .store
        .open_tunnels_of_device(key.0.clone(), key.1.clone())
        .await
    {
        Ok(open) => {
            for t in &open {
                if socket
                    .send(Message::Text(cp.connect_notification(t).into()))
                    .await
                    .is_err()
                {
                    return "send_failed";
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot replay open tunnels");
            let _ = close(socket, 1011, "store unavailable").await;
            return "store_unavailable";
        }
    }
    let interval = Duration::from_millis(cp.settings.device_ping_interval_ms);
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(ChannelMsg::Text(text)) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return "send_failed";
                    }
                }
                Some(ChannelMsg::Replaced) => {
                    let _ = close(socket, CLOSE_REPLACED, "replaced by a newer channel").await;
                    return "replaced";
                }
                Some(ChannelMsg::DeviceDeleted) => {
                    let _ = close(socket, CLOSE_DEVICE_DELETED, "device deleted").await;
                    return "device_deleted";
                }
                None => {
                    let _ = close(socket, 1001, "server shutting down").await;
                    return "shutdown";
                }
            },
            _ = ticker.tick() => {
                if last_heard.elapsed() >= interval * MISSED_PINGS {
                    let _ = close(socket, 1001, "ping timeout").await;
                    return "ping_timeout";
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return "send_failed";
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None => return "closed_by_device",
                Some(Ok(Message::Text(text))) => {
                    last_heard = Instant::now();
                    on_agent_message(cp, key, id, &text);
                }
                Some(Ok(_)) => last_heard = Instant::now(),
                Some(Err(_)) => return "protocol_error",
            },
        }
    }
}

/// Acts on a message from the agent; one this version does not know is ignored.
fn on_agent_message(cp: &ControlPlane, key: &DeviceKey, id: u64, text: &str) {
    match serde_json::from_str::<AgentMessage>(text) {
        Ok(AgentMessage::Services { services }) => {
            tracing::info!(product_key = %key.0, device_name = %key.1, ?services,
                "device reported its services");
            cp.channels.set_services(key, id, services);
        }
        Ok(AgentMessage::Unknown) => {}
        Err(e) => tracing::debug!(error = %e, "ignored a malformed message from a device"),
    }
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) -> Result<(), axum::Error> {
    socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The input fuzz/device_channel crashed on (`now - i64::MIN` overflowed), and the edges.
    #[test]
    fn hostile_timestamps_are_stale_not_a_panic() {
        // fuzz/device_channel's crash: server clock 1800000000, header `-9223372036854775808`.
        let now = 1_800_000_000;
        assert!(!timestamp_fresh(
            now,
            "-9223372036854775808".parse().unwrap()
        ));
        for (now_s, ts) in [(i64::MAX, i64::MIN), (i64::MIN, i64::MAX), (0, i64::MIN)] {
            assert!(!timestamp_fresh(now_s, ts), "{now_s} {ts}");
        }
        assert!(timestamp_fresh(now, now + TIMESTAMP_WINDOW_SECS));
        assert!(timestamp_fresh(now, now - TIMESTAMP_WINDOW_SECS));
        assert!(!timestamp_fresh(now, now + TIMESTAMP_WINDOW_SECS + 1));
        assert!(timestamp_fresh(i64::MIN, i64::MIN) && timestamp_fresh(i64::MAX, i64::MAX));
    }

    proptest! {
        /// Over the whole i64 range: fresh exactly when the true difference is within the window.
        #[test]
        fn timestamp_window_over_all_i64(now_s in any::<i64>(), ts in any::<i64>()) {
            let within = (i128::from(now_s) - i128::from(ts)).abs() <= i128::from(TIMESTAMP_WINDOW_SECS);
            prop_assert_eq!(timestamp_fresh(now_s, ts), within);
        }
    }

    #[test]
    fn signature_is_the_hmac_of_the_headers() {
        let sig = hex::encode(token::hmac_sha256(b"s", b"pk\ndev\n1800000000"));
        assert!(signature_matches("s", "pk", "dev", "1800000000", &sig));
        assert!(signature_matches(
            "s",
            "pk",
            "dev",
            "1800000000",
            &sig.to_uppercase()
        ));
        assert!(!signature_matches("s", "pk", "dev", "1800000001", &sig));
        assert!(!signature_matches("t", "pk", "dev", "1800000000", &sig));
        assert!(!signature_matches(
            "s",
            "pk",
            "dev",
            "1800000000",
            &sig[..62]
        ));
        assert!(!signature_matches(
            "s",
            "pk",
            "dev",
            "1800000000",
            "not hex"
        ));
    }
}
