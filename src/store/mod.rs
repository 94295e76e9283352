//! The store: accounts, API keys, products, devices and tunnels.
//!
//! [`Store`] is what the control plane needs; [`sqlite::SqliteStore`] is the embedded
//! implementation. A PostgreSQL implementation must pass the same tests (`tests/store.rs`).
//! A write that returns `Ok` is durable.
use async_trait::async_trait;

use crate::clock::Millis;
use crate::seam::{CloseReason, ConnectionEvent, Side};
use crate::token::SecretHash;

pub mod sqlite;

/// What a store operation can fail with.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The object does not exist, or belongs to another account.
    #[error("not found")]
    NotFound,
    /// An object with that key already exists.
    #[error("already exists")]
    AlreadyExists,
    /// The tunnel is not OPEN.
    #[error("tunnel is not open")]
    TunnelNotOpen,
    /// The tunnel is not CLOSED.
    #[error("tunnel is not closed")]
    TunnelNotClosed,
    /// The device already has the maximum number of OPEN tunnels.
    #[error("device has {0} open tunnels, the limit")]
    TunnelLimit(u32),
    /// The database failed (disk full, I/O error, ...). Nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// An account; every product, device and tunnel belongs to one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Account id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Whether this is the admin account (may create accounts).
    pub is_admin: bool,
    /// Creation time.
    pub created_at: Millis,
}

/// A product: a group of devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    /// Globally unique product key.
    pub product_key: String,
    /// Owning account.
    pub account_id: String,
    /// Display name.
    pub name: String,
    /// Creation time.
    pub created_at: Millis,
}

/// A device of a product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its product.
    pub product_key: String,
    /// Owning account (that of the product).
    pub account_id: String,
    /// Device name, unique within the product.
    pub name: String,
    /// The device secret, key of the device channel's HMAC.
    pub secret: String,
    /// Creation time.
    pub created_at: Millis,
}

/// OPEN or CLOSED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelState {
    /// Peers may connect.
    Open,
    /// Irreversibly closed.
    Closed,
}

impl TunnelState {
    /// `OPEN` or `CLOSED`, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelState::Open => "OPEN",
            TunnelState::Closed => "CLOSED",
        }
    }

    /// Parses `OPEN`/`CLOSED` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "OPEN" => Some(TunnelState::Open),
            "CLOSED" => Some(TunnelState::Closed),
            _ => None,
        }
    }
}

/// One side's connection as last reported by the relay.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerStatus {
    /// CONNECTED when true.
    pub connected: bool,
    /// Time of the last change.
    pub updated_at: Option<Millis>,
    /// Last ping round trip, microseconds.
    pub rtt_us: Option<u64>,
    /// Smoothed ping round trip, microseconds.
    pub srtt_us: Option<u64>,
    /// The peer's address while connected (or last connected).
    pub addr: Option<String>,
    /// Bytes the side sent on its current (or last) connection.
    pub bytes_sent: u64,
    /// Bytes the side received on its current (or last) connection.
    pub bytes_received: u64,
}

/// A tunnel as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Tunnel {
    /// Tunnel id.
    pub id: String,
    /// Insertion order; newest first in search.
    pub seq: i64,
    /// Owning account.
    pub account_id: String,
    /// The device's product.
    pub product_key: String,
    /// The device.
    pub device_name: String,
    /// Sent to the device in the notification.
    pub custom_info: Option<String>,
    /// Free text for the operator.
    pub description: Option<String>,
    /// Service names carried.
    pub services: Vec<String>,
    /// OPEN or CLOSED.
    pub state: TunnelState,
    /// Creation time.
    pub created_at: Millis,
    /// When it auto-closes.
    pub expires_at: Millis,
    /// When it closed.
    pub closed_at: Option<Millis>,
    /// Why it closed (`closed`, `expired`, `device_deleted`).
    pub close_reason: Option<String>,
    /// SHA-256 of the client token.
    pub client_token_hash: SecretHash,
    /// SHA-256 of the device token.
    pub device_token_hash: SecretHash,
    /// Seed from which the device token is derived (see [`crate::token::derive_device_token`]).
    pub device_token_seed: [u8; 32],
    /// Device side's connection.
    pub device: PeerStatus,
    /// Client side's connection.
    pub client: PeerStatus,
}

/// A tunnel to create.
#[derive(Debug, Clone)]
pub struct NewTunnel {
    /// Tunnel id.
    pub id: String,
    /// Owning account.
    pub account_id: String,
    /// The device's product.
    pub product_key: String,
    /// The device.
    pub device_name: String,
    /// Custom info.
    pub custom_info: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Services.
    pub services: Vec<String>,
    /// Creation time.
    pub created_at: Millis,
    /// Expiry time.
    pub expires_at: Millis,
    /// SHA-256 of the client token.
    pub client_token_hash: SecretHash,
    /// SHA-256 of the device token.
    pub device_token_hash: SecretHash,
    /// Device token seed.
    pub device_token_seed: [u8; 32],
    /// Refuse with [`StoreError::TunnelLimit`] when the device already has this many OPEN.
    pub max_open_per_device: u32,
}

/// Search filters; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct TunnelFilter {
    /// Only this product.
    pub product_key: Option<String>,
    /// Only this device name.
    pub device_name: Option<String>,
    /// Only this tunnel id.
    pub tunnel_id: Option<String>,
    /// Only this state.
    pub state: Option<TunnelState>,
}

/// A page of search results, newest first.
#[derive(Debug, Clone)]
pub struct TunnelPage {
    /// The tunnels.
    pub tunnels: Vec<Tunnel>,
    /// The `seq` to continue below, when there are more.
    pub next_before_seq: Option<i64>,
}

/// New tokens for a rotate; `None` leaves that side's token as it is.
#[derive(Debug, Clone, Default)]
pub struct Rotation {
    /// New client token hash.
    pub client_token_hash: Option<SecretHash>,
    /// New device token hash and seed.
    pub device_token: Option<(SecretHash, [u8; 32])>,
}

/// Everything the control plane persists. Methods taking `account_id` only ever see that
/// account's objects; another account's object is [`StoreError::NotFound`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The admin account, if created.
    async fn admin_account(&self) -> StoreResult<Option<Account>>;
    /// Creates an account with one API key.
    async fn create_account(
        &self,
        id: String,
        name: String,
        is_admin: bool,
        key_hash: SecretHash,
        now: Millis,
    ) -> StoreResult<Account>;
    /// Adds an API key to an account (no-op if present).
    async fn add_api_key(
        &self,
        account_id: String,
        key_hash: SecretHash,
        now: Millis,
    ) -> StoreResult<()>;
    /// The account an API key belongs to.
    async fn account_by_key(&self, key_hash: SecretHash) -> StoreResult<Option<Account>>;

    /// Creates a product.
    async fn create_product(&self, product: Product) -> StoreResult<Product>;
    /// The account's products, oldest first.
    async fn list_products(&self, account_id: String) -> StoreResult<Vec<Product>>;
    /// Creates a device under the account's product.
    async fn create_device(&self, device: Device) -> StoreResult<Device>;
    /// The devices of the account's product, oldest first.
    async fn list_devices(
        &self,
        account_id: String,
        product_key: String,
    ) -> StoreResult<Vec<Device>>;
    /// A device by key, any account (the device channel authenticates with it).
    async fn get_device(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<Option<Device>>;
    /// Deletes the account's device and closes its OPEN tunnels; returns the tunnels closed.
    async fn delete_device(
        &self,
        account_id: String,
        product_key: String,
        device_name: String,
        now: Millis,
    ) -> StoreResult<Vec<Tunnel>>;

    /// Creates a tunnel for an existing device of the account, within the per-device limit.
    async fn create_tunnel(&self, tunnel: NewTunnel) -> StoreResult<Tunnel>;
    /// The account's tunnel.
    async fn get_tunnel(&self, account_id: String, tunnel_id: String) -> StoreResult<Tunnel>;
    /// Searches the account's tunnels, newest first.
    async fn search_tunnels(
        &self,
        account_id: String,
        filter: TunnelFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<TunnelPage>;
    /// Closes an OPEN tunnel of the account.
    async fn close_tunnel(
        &self,
        account_id: String,
        tunnel_id: String,
        reason: CloseReason,
        now: Millis,
    ) -> StoreResult<Tunnel>;
    /// Deletes a CLOSED tunnel of the account.
    async fn delete_tunnel(&self, account_id: String, tunnel_id: String) -> StoreResult<()>;
    /// Replaces tokens of an OPEN tunnel of the account.
    async fn rotate_tokens(
        &self,
        account_id: String,
        tunnel_id: String,
        rotation: Rotation,
    ) -> StoreResult<Tunnel>;
    /// The OPEN tunnels of a device, oldest first (for replay on reconnect).
    async fn open_tunnels_of_device(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<Vec<Tunnel>>;
    /// Every OPEN tunnel (to rebuild the index at start).
    async fn all_open_tunnels(&self) -> StoreResult<Vec<Tunnel>>;
    /// Closes every OPEN tunnel whose `expires_at` is at or before `now`; returns them.
    async fn expire_tunnels(&self, now: Millis) -> StoreResult<Vec<Tunnel>>;
    /// Deletes tunnels created at or before `created_before` (CLOSED or not); returns their ids.
    async fn purge_tunnels(&self, created_before: Millis) -> StoreResult<Vec<String>>;
    /// Marks every side DISCONNECTED (at start: no relay connection survives a restart).
    async fn reset_connections(&self, now: Millis) -> StoreResult<()>;
    /// Applies connection events from the relay, in order.
    async fn apply_connection_events(&self, events: Vec<ConnectionEvent>) -> StoreResult<()>;
}

impl Tunnel {
    /// The status of one side.
    pub fn peer(&self, side: Side) -> &PeerStatus {
        match side {
            Side::Device => &self.device,
            Side::Client => &self.client,
        }
    }
}
