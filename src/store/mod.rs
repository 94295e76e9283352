//! The store: accounts, API keys, products, devices and tunnels.
//!
//! [`Store`] is what the control plane needs; [`sqlite::SqliteStore`] is the embedded
//! implementation (one node) and [`postgres::PgStore`] the shared one (a fleet of nodes). Both
//! pass the same contract (`tests/store.rs`). A write that returns `Ok` is durable.
use async_trait::async_trait;

use crate::clock::Millis;
use crate::seam::{CloseReason, ConnectionEvent, Side};
use crate::token::SecretHash;

pub mod postgres;
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
    /// Its OPEN tunnels, as the store counts them (ignored by `create_device`).
    pub open_tunnels: u32,
}

/// Where an API key came from; `Env` keys are the ones a restart with a new
/// `IOTUNNEL_ADMIN_KEY` retires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// `IOTUNNEL_ADMIN_KEY` at a server start.
    Env,
    /// Generated and printed at the first start, when no `IOTUNNEL_ADMIN_KEY` was set.
    Generated,
    /// Returned by `POST /v1/accounts` with the new account.
    Account,
    /// Created with `POST /v1/keys`.
    Api,
}

impl KeyOrigin {
    /// `env`, `generated`, `account` or `api`, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOrigin::Env => "env",
            KeyOrigin::Generated => "generated",
            KeyOrigin::Account => "account",
            KeyOrigin::Api => "api",
        }
    }

    /// Parses what [`KeyOrigin::as_str`] wrote; anything else reads as `Api`.
    pub fn parse(s: &str) -> Self {
        match s {
            "env" => KeyOrigin::Env,
            "generated" => KeyOrigin::Generated,
            "account" => KeyOrigin::Account,
            _ => KeyOrigin::Api,
        }
    }
}

/// An API key as stored: only the SHA-256 of its secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Public id (`key_...`), what lists show and revoke takes.
    pub id: String,
    /// The account it authenticates as.
    pub account_id: String,
    /// A label for people.
    pub name: String,
    /// Where it came from.
    pub origin: KeyOrigin,
    /// SHA-256 of the secret.
    pub key_hash: SecretHash,
    /// Creation time.
    pub created_at: Millis,
    /// Last authenticated use, as recorded (at most about a minute old while in use).
    pub last_used_at: Option<Millis>,
    /// When it was revoked; a revoked key never authenticates again.
    pub revoked_at: Option<Millis>,
}

/// An API key to store.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// Public id (`key_...`).
    pub id: String,
    /// The account it authenticates as.
    pub account_id: String,
    /// A label for people.
    pub name: String,
    /// Where it came from.
    pub origin: KeyOrigin,
    /// SHA-256 of the secret.
    pub key_hash: SecretHash,
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
    /// The node that owns the tunnel (where its sides meet); `None` in data written before
    /// fleets existed, which means "whichever single node serves this store".
    pub owner_node: Option<String>,
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
    /// The node chosen to own the tunnel.
    pub owner_node: Option<String>,
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

/// A node of the fleet, as kept in the `nodes` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node's id (`--node-id`).
    pub node_id: String,
    /// Its relay's public URL, `wss://host:port` or `ws://host:port`.
    pub relay_url: String,
    /// Its API's URL, `http://host:port`.
    pub api_url: String,
    /// Where other nodes reach its mesh listener (`host:port`), when it has one.
    pub mesh_addr: Option<String>,
    /// The iotunnel version it runs.
    pub version: String,
    /// When it started.
    pub started_at: Millis,
    /// Its last heartbeat.
    pub heartbeat_at: Millis,
    /// Its relay shards.
    pub shards: u32,
    /// OPEN tunnels it owns, as of its last heartbeat.
    pub open_tunnels: u64,
    /// Device channels connected to it, as of its last heartbeat.
    pub device_channels: u64,
    /// Whether it is draining (shutting down: takes no new tunnels).
    pub draining: bool,
}

/// An access key pair of an account, which signs requests to the vendor facades (AWS SigV4,
/// Alibaba's RPC signatures). The secret is kept only sealed with the server's access-key
/// encryption key (see [`crate::control::access_keys`]): the database alone does not reveal it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessKey {
    /// The access key id (`IOTK...`), public.
    pub id: String,
    /// Owning account.
    pub account_id: String,
    /// The secret access key, sealed (nonce and AES-256-GCM ciphertext).
    pub sealed_secret: Vec<u8>,
    /// Creation time.
    pub created_at: Millis,
}

/// What arrives on a fleet subscription ([`Store::subscribe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// A message another node published.
    Message(String),
    /// The subscription was (re)established: messages may have been missed before it, so
    /// state learnt from them must be reloaded from the store.
    Resynced,
}

/// Everything the control plane persists. Methods taking `account_id` only ever see that
/// account's objects; another account's object is [`StoreError::NotFound`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The admin account, if created.
    async fn admin_account(&self) -> StoreResult<Option<Account>>;
    /// Creates an account (created at `key.created_at`) with one API key.
    async fn create_account(
        &self,
        id: String,
        name: String,
        is_admin: bool,
        key: NewApiKey,
    ) -> StoreResult<Account>;
    /// Adds an API key; when its hash is already stored (revoked, or another account's
    /// included), changes nothing and returns the stored key.
    async fn add_api_key(&self, key: NewApiKey) -> StoreResult<ApiKey>;
    /// The account an unrevoked API key belongs to, and the key.
    async fn account_by_key(&self, key_hash: SecretHash) -> StoreResult<Option<(Account, ApiKey)>>;
    /// The unrevoked API keys of an account (`None`: of every account), oldest first.
    async fn list_api_keys(&self, account_id: Option<String>) -> StoreResult<Vec<ApiKey>>;
    /// Revokes an unrevoked key of the account (`None`: of any account); returns it revoked.
    async fn revoke_api_key(
        &self,
        account_id: Option<String>,
        key_id: String,
        now: Millis,
    ) -> StoreResult<ApiKey>;
    /// Revokes every unrevoked key of the account from `origin` except `keep_id`; returns them.
    async fn retire_api_keys(
        &self,
        account_id: String,
        origin: KeyOrigin,
        keep_id: String,
        now: Millis,
    ) -> StoreResult<Vec<ApiKey>>;
    /// Records a use of a key at `at` (kept when later than the recorded one).
    async fn touch_api_key(&self, key_id: String, at: Millis) -> StoreResult<()>;

    /// Stores a new access key of an existing account.
    async fn create_access_key(&self, key: AccessKey) -> StoreResult<()>;
    /// The account's access keys, oldest first.
    async fn list_access_keys(&self, account_id: String) -> StoreResult<Vec<AccessKey>>;
    /// Revokes (deletes) an access key of the account.
    async fn delete_access_key(&self, account_id: String, key_id: String) -> StoreResult<()>;
    /// An access key by id, any account, with its account.
    async fn access_key(&self, key_id: String) -> StoreResult<Option<(AccessKey, Account)>>;

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
    /// The tags of the account's tunnel, by key.
    async fn tunnel_tags(
        &self,
        account_id: String,
        tunnel_id: String,
    ) -> StoreResult<Vec<(String, String)>>;
    /// Adds tags to the account's tunnel, replacing the values of keys it already has.
    async fn tag_tunnel(
        &self,
        account_id: String,
        tunnel_id: String,
        tags: Vec<(String, String)>,
    ) -> StoreResult<()>;
    /// Removes tags (absent keys are ignored) from the account's tunnel.
    async fn untag_tunnel(
        &self,
        account_id: String,
        tunnel_id: String,
        keys: Vec<String>,
    ) -> StoreResult<()>;
    /// Turns the tunnel switch of the account's device off (`disabled`: no new tunnels) or on.
    async fn set_device_tunnels_disabled(
        &self,
        account_id: String,
        product_key: String,
        device_name: String,
        disabled: bool,
    ) -> StoreResult<()>;
    /// Whether the device's tunnel switch is off (false for an unknown device).
    async fn device_tunnels_disabled(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<bool>;
    /// Every OPEN tunnel (to rebuild the index at start).
    async fn all_open_tunnels(&self) -> StoreResult<Vec<Tunnel>>;
    /// Closes every OPEN tunnel whose `expires_at` is at or before `now`; returns them.
    async fn expire_tunnels(&self, now: Millis) -> StoreResult<Vec<Tunnel>>;
    /// Deletes tunnels created at or before `created_before` (CLOSED or not); returns their ids.
    async fn purge_tunnels(&self, created_before: Millis) -> StoreResult<Vec<String>>;
    /// Marks DISCONNECTED every side of the tunnels owned by `node_id` or by no node (at a
    /// node's start: no relay connection survives a restart).
    async fn reset_connections(&self, node_id: String, now: Millis) -> StoreResult<()>;
    /// Applies connection events from the relay, in order.
    async fn apply_connection_events(&self, events: Vec<ConnectionEvent>) -> StoreResult<()>;

    // Fleet: nodes, fleet-wide secrets, leases, ownership, device presence and the bus. A
    // single node on SQLite uses the same calls: it is a fleet of one.

    /// Inserts or replaces a node's row (at start and at every heartbeat).
    async fn upsert_node(&self, node: NodeRecord) -> StoreResult<()>;
    /// Every node ever registered, by node id.
    async fn list_nodes(&self) -> StoreResult<Vec<NodeRecord>>;
    /// The fleet-wide secret `name`: `proposed` if none was stored yet (first writer wins, also
    /// under concurrent callers), else the stored one.
    async fn fleet_secret(&self, name: String, proposed: Vec<u8>) -> StoreResult<Vec<u8>>;
    /// Takes or renews the named lease for `holder` until `now + ttl_ms`; true when `holder`
    /// holds it now. It is free when never taken or expired (`until < now`).
    async fn try_lease(
        &self,
        name: String,
        holder: String,
        now: Millis,
        ttl_ms: i64,
    ) -> StoreResult<bool>;
    /// OPEN tunnels per owner node (tunnels without an owner are not counted).
    async fn open_tunnels_by_owner(&self) -> StoreResult<Vec<(String, u64)>>;
    /// Moves every OPEN tunnel owned by `from_node` to `to_nodes` (round robin, in tunnel
    /// order), marking both sides DISCONNECTED at `now`; returns the moved tunnels as stored.
    /// Atomic: two callers never move the same tunnel twice. No-op when `to_nodes` is empty.
    async fn reassign_tunnels(
        &self,
        from_node: String,
        to_nodes: Vec<String>,
        now: Millis,
    ) -> StoreResult<Vec<Tunnel>>;
    /// Records that the device's channel is connected to `node_id` (a newer channel on any
    /// node replaces the older record).
    async fn set_device_channel(
        &self,
        product_key: String,
        device_name: String,
        node_id: String,
        now: Millis,
    ) -> StoreResult<()>;
    /// Forgets the device's channel record, only if it is `node_id`'s.
    async fn clear_device_channel(
        &self,
        product_key: String,
        device_name: String,
        node_id: String,
    ) -> StoreResult<()>;
    /// Forgets every channel record of `node_id` (at its start).
    async fn clear_device_channels_of_node(&self, node_id: String) -> StoreResult<()>;
    /// The node holding the device's channel, if any.
    async fn device_channel_node(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<Option<String>>;
    /// Device name -> node holding its channel, for every device of a product with a channel.
    async fn device_channel_nodes(
        &self,
        product_key: String,
    ) -> StoreResult<std::collections::HashMap<String, String>>;
    /// Sends `payload` (at most 7,000 bytes) to every node's subscription, this one's included
    /// where it has one. A store with no other nodes may drop it.
    async fn publish(&self, payload: String) -> StoreResult<()>;
    /// A subscription to what nodes publish, for a store shared by several nodes; `None` for
    /// a store only one node can open (SQLite).
    fn subscribe(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<BusEvent>>;
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
