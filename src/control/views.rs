//! Request and response bodies of the control API, and their validation rules.
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use crate::clock::rfc3339;
use crate::seam::Side;
use crate::store::{Device, PeerStatus, Product, Tunnel};

/// Most bytes of custom info (the Alibaba `Udi` limit, PROTOCOLS.md).
pub const MAX_CUSTOM_INFO_BYTES: usize = 4096;
/// Most bytes of a description (the Alibaba limit, PROTOCOLS.md).
pub const MAX_DESCRIPTION_BYTES: usize = 1024;
/// Most services per tunnel (AWS allows up to 3; we allow 10).
pub const MAX_SERVICES: usize = 10;
/// Longest service name.
pub const MAX_SERVICE_NAME: usize = 128;
/// Most ids in one batch request.
pub const MAX_BATCH: usize = 100;
/// Largest search page.
pub const MAX_PAGE_SIZE: u32 = 100;
/// Search page size when none is given.
pub const DEFAULT_PAGE_SIZE: u32 = 20;
/// Longest product, device and account name.
pub const MAX_NAME: usize = 64;

/// `POST /v1/accounts`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    /// Display name.
    pub name: String,
}

/// A created account, with its API key (shown once).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccountCreated {
    /// Account id.
    pub account_id: String,
    /// Display name.
    pub name: String,
    /// The account's API key; shown only now.
    pub api_key: String,
}

/// `POST /v1/products`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProduct {
    /// Display name.
    pub name: String,
}

/// A product.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProductView {
    /// Product key.
    pub product_key: String,
    /// Display name.
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
}

impl From<Product> for ProductView {
    fn from(p: Product) -> Self {
        Self {
            product_key: p.product_key,
            name: p.name,
            created_at: rfc3339(p.created_at),
        }
    }
}

/// `GET /v1/products`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProductList {
    /// The products.
    pub products: Vec<ProductView>,
}

/// `POST /v1/products/{product_key}/devices`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDevice {
    /// Device name, `[A-Za-z0-9_.:@-]{1,64}`.
    pub name: String,
}

/// A created device, with its secret (shown once).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceCreated {
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// The device secret; shown only now.
    pub device_secret: String,
    /// RFC 3339.
    pub created_at: String,
}

/// A device in a list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// Whether its device channel is connected.
    pub online: bool,
    /// Its OPEN tunnels.
    pub open_tunnels: u32,
    /// RFC 3339.
    pub created_at: String,
}

impl DeviceView {
    /// A device and its online status.
    pub fn new(d: Device, online: bool) -> Self {
        Self {
            product_key: d.product_key,
            device_name: d.name,
            online,
            open_tunnels: d.open_tunnels,
            created_at: rfc3339(d.created_at),
        }
    }
}

/// `GET /v1/products/{product_key}/devices`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceList {
    /// The devices.
    pub devices: Vec<DeviceView>,
}

/// A node of the fleet in `GET /v1/nodes`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    /// The node's id.
    pub node_id: String,
    /// Its relay's public URL.
    pub relay_url: String,
    /// Its API's URL.
    pub api_url: String,
    /// Its mesh address, when it has a mesh listener.
    pub mesh_addr: Option<String>,
    /// `live`, or `dead` after no heartbeat for the dead-after window.
    pub state: String,
    /// Whether it is draining (shutting down, taking no new tunnels).
    pub draining: bool,
    /// RFC 3339 time of its last heartbeat.
    pub heartbeat_at: String,
    /// RFC 3339 time it started.
    pub started_at: String,
    /// OPEN tunnels it owns, as of its last heartbeat (0 once dead).
    pub open_tunnels: u64,
    /// Device channels connected to it, as of its last heartbeat (0 once dead).
    pub device_channels: u64,
    /// Its relay shards.
    pub shards: u32,
    /// The iotunnel version it runs.
    pub version: String,
}

impl NodeView {
    /// A node as seen at `now`.
    pub fn new(n: crate::store::NodeRecord, now: i64, dead_after_ms: i64) -> Self {
        let live = super::fleet::is_live(&n, now, dead_after_ms);
        // A dead node's last counts are history: its tunnels move and its channels are offline.
        let (open_tunnels, device_channels) = if live {
            (n.open_tunnels, n.device_channels)
        } else {
            (0, 0)
        };
        Self {
            state: if live { "live" } else { "dead" }.into(),
            heartbeat_at: rfc3339(n.heartbeat_at),
            started_at: rfc3339(n.started_at),
            node_id: n.node_id,
            relay_url: n.relay_url,
            api_url: n.api_url,
            mesh_addr: n.mesh_addr,
            draining: n.draining,
            open_tunnels,
            device_channels,
            shards: n.shards,
            version: n.version,
        }
    }
}

/// `GET /v1/nodes`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeList {
    /// Every node ever registered, by node id.
    pub nodes: Vec<NodeView>,
}

/// `POST /v1/tunnels`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTunnel {
    /// The device's product.
    pub product_key: String,
    /// The device.
    pub device_name: String,
    /// Sent to the device in its notification; at most 4096 bytes.
    pub custom_info: Option<String>,
    /// At most 1024 bytes.
    pub description: Option<String>,
    /// 1 to 10 names of `[A-Za-z0-9:_.-]{1,128}`; default `["SSH"]`.
    pub services: Option<Vec<String>>,
    /// 60 to 86400 (the configured maximum); default the maximum.
    pub lifetime_seconds: Option<u32>,
}

/// A created tunnel. The client token is shown only now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TunnelCreated {
    /// Tunnel id.
    pub tunnel_id: String,
    /// The client's token; shown only now.
    pub client_token: String,
    /// `wss://{host:port}/tunnel/{tunnel_id}/source`.
    pub client_url: String,
    /// The relay's `host:port`, for AWS-family clients.
    pub client_endpoint: String,
    /// `OPEN`.
    pub state: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// One side's connection.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PeerView {
    /// `CONNECTED` or `DISCONNECTED`.
    pub state: String,
    /// Time of the last change, RFC 3339.
    pub updated_at: Option<String>,
    /// Last ping round trip, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Smoothed ping round trip, milliseconds.
    pub smoothed_rtt_ms: Option<f64>,
    /// The peer's address.
    pub address: Option<String>,
    /// Bytes this side sent through the relay on its current (or last) connection.
    pub bytes_sent: u64,
    /// Bytes this side received through the relay on its current (or last) connection.
    pub bytes_received: u64,
}

impl From<&PeerStatus> for PeerView {
    fn from(p: &PeerStatus) -> Self {
        Self {
            state: if p.connected {
                "CONNECTED"
            } else {
                "DISCONNECTED"
            }
            .into(),
            updated_at: p.updated_at.map(rfc3339),
            rtt_ms: p.rtt_us.map(|us| us as f64 / 1000.0),
            smoothed_rtt_ms: p.srtt_us.map(|us| us as f64 / 1000.0),
            address: p.addr.clone(),
            bytes_sent: p.bytes_sent,
            bytes_received: p.bytes_received,
        }
    }
}

/// A tunnel's details (describe, and each item of search).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TunnelView {
    /// Tunnel id.
    pub tunnel_id: String,
    /// The device's product.
    pub product_key: String,
    /// The device.
    pub device_name: String,
    /// Custom info sent to the device.
    pub custom_info: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Services.
    pub services: Vec<String>,
    /// `OPEN` or `CLOSED`.
    pub state: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub expires_at: String,
    /// RFC 3339, once closed.
    pub closed_at: Option<String>,
    /// `closed`, `expired` or `device_deleted`.
    pub close_reason: Option<String>,
    /// The device side's connection.
    pub device: PeerView,
    /// The client side's connection.
    pub client: PeerView,
}

impl From<&Tunnel> for TunnelView {
    fn from(t: &Tunnel) -> Self {
        Self {
            tunnel_id: t.id.clone(),
            product_key: t.product_key.clone(),
            device_name: t.device_name.clone(),
            custom_info: t.custom_info.clone(),
            description: t.description.clone(),
            services: t.services.clone(),
            state: t.state.as_str().into(),
            created_at: rfc3339(t.created_at),
            expires_at: rfc3339(t.expires_at),
            closed_at: t.closed_at.map(rfc3339),
            close_reason: t.close_reason.clone(),
            device: (&t.device).into(),
            client: (&t.client).into(),
        }
    }
}

/// `GET /v1/tunnels` query.
#[derive(Debug, Deserialize, Default, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// Only this product.
    pub product_key: Option<String>,
    /// Only this device.
    pub device_name: Option<String>,
    /// Only this tunnel.
    pub tunnel_id: Option<String>,
    /// `OPEN` or `CLOSED`.
    pub state: Option<String>,
    /// 1 to 100, default 20.
    pub page_size: Option<u32>,
    /// From the previous page's `next_page_token`.
    pub page_token: Option<String>,
}

/// A page of tunnels, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TunnelList {
    /// The tunnels.
    pub tunnels: Vec<TunnelView>,
    /// Pass as `page_token` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// `POST /v1/tunnels/batch-close` and `batch-delete`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to 100 tunnel ids.
    pub tunnel_ids: Vec<String>,
}

/// The outcome for one id of a batch.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchItem {
    /// The id, as given.
    pub tunnel_id: String,
    /// Whether the operation succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Batch results, one per id, in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchResults {
    /// The results.
    pub results: Vec<BatchItem>,
}

/// Which tokens to rotate.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RotateSide {
    /// The client token.
    Client,
    /// The device token (the device is notified of its new one).
    Device,
    /// Both.
    All,
}

impl RotateSide {
    /// The sides it names.
    pub fn sides(self) -> &'static [Side] {
        match self {
            RotateSide::Client => &[Side::Client],
            RotateSide::Device => &[Side::Device],
            RotateSide::All => &[Side::Client, Side::Device],
        }
    }
}

/// `POST /v1/tunnels/{id}/rotate`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// `client`, `device` or `all`.
    pub side: RotateSide,
}

/// New tokens, shown once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RotateResponse {
    /// Tunnel id.
    pub tunnel_id: String,
    /// The new client token, if rotated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
    /// The new device token, if rotated (also sent to the device on its channel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_token: Option<String>,
}

/// Checks a display name (account, product): 1 to 64 characters, no control characters.
pub fn validate_display_name(field: &str, v: &str) -> Result<String, ApiError> {
    let v = v.trim();
    if v.is_empty() || v.chars().count() > MAX_NAME || v.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field} must be 1 to {MAX_NAME} characters without control characters"
        )));
    }
    Ok(v.to_string())
}

/// Checks a device name: `[A-Za-z0-9_.:@-]{1,64}`.
pub fn validate_device_name(v: &str) -> Result<(), ApiError> {
    let ok = !v.is_empty()
        && v.len() <= MAX_NAME
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@-".contains(&b));
    ok.then_some(())
        .ok_or_else(|| ApiError::invalid("device name must match [A-Za-z0-9_.:@-]{1,64}"))
}

/// Checks services, defaulting to `["SSH"]`.
pub fn validate_services(services: Option<Vec<String>>) -> Result<Vec<String>, ApiError> {
    let services = services.unwrap_or_else(|| vec!["SSH".to_string()]);
    if services.is_empty() || services.len() > MAX_SERVICES {
        return Err(ApiError::invalid(format!(
            "services must list 1 to {MAX_SERVICES} names"
        )));
    }
    for s in &services {
        let ok = !s.is_empty()
            && s.len() <= MAX_SERVICE_NAME
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":_.-".contains(&b));
        if !ok {
            return Err(ApiError::invalid(format!(
                "service name {s:?} must match [A-Za-z0-9:_.-]{{1,{MAX_SERVICE_NAME}}}"
            )));
        }
    }
    let mut seen = std::collections::HashSet::new();
    if !services.iter().all(|s| seen.insert(s)) {
        return Err(ApiError::invalid("service names must be distinct"));
    }
    Ok(services)
}

/// Checks an optional free-text field's byte length.
pub fn validate_text(
    field: &str,
    v: Option<String>,
    max: usize,
) -> Result<Option<String>, ApiError> {
    match v {
        Some(s) if s.len() > max => Err(ApiError::invalid(format!(
            "{field} must be at most {max} bytes"
        ))),
        other => Ok(other),
    }
}

/// Encodes a search cursor as an opaque page token.
pub fn encode_page_token(before_seq: i64) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{before_seq}"))
}

/// Decodes a page token.
pub fn decode_page_token(token: &str) -> Result<i64, ApiError> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix("v1:").and_then(|n| n.parse().ok()))
        .ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "invalid_page_token",
                "page_token is not valid",
            )
        })
}
