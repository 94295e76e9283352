//! Fleet mode: this node among the others sharing one database.
//!
//! A single node on SQLite is a fleet of one and runs the same code; what changes with a shared
//! store (PostgreSQL) is that the store's bus carries [`FleetMsg`]s between nodes:
//! - every node indexes every OPEN tunnel's tokens, with its **owner** node, so whichever node a
//!   peer reaches can check its token and, when that node is not the owner, forward it over the
//!   mesh (the relay's business);
//! - close, rotate and delete reach the owner (whose relay drops the peers) within the bus's
//!   latency, a few milliseconds;
//! - device notifications reach the node holding the device's channel;
//! - a **leader** (a lease in the store) runs the lifecycle sweeper and re-places the OPEN
//!   tunnels of dead nodes onto live ones, telling each device its new relay URL.
//!
//! Every node heartbeats into the `nodes` table; one silent for `node_dead_after_ms` is dead:
//! its channels count as offline and its tunnels get new owners.
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::device_channel::ChannelMsg;
use super::{ControlPlane, DeviceEvent};
use crate::clock::Millis;
use crate::seam::{CloseReason, MeshRoutes, RelayCommand, Side};
use crate::store::{BusEvent, NodeRecord, Tunnel};
use crate::token::SecretHash;

/// The longest device message sent inline on the bus: PostgreSQL refuses NOTIFY payloads of
/// 8000 bytes or more, and the text is escaped once more inside the message (up to 2x).
pub const MAX_INLINE_TEXT: usize = 3_000;

/// The lease whose holder sweeps lifecycles and re-places dead nodes' tunnels.
const LEADER_LEASE: &str = "leader";
/// The leader looks for dead owners in the store itself every 30 heartbeats (30 s by default)
/// even when its index knows of none: cheap at that rate, and it bounds what a lost bus message
/// can delay.
const FULL_CHECK_BEATS: u64 = 30;

/// What one node tells the others (JSON on the store's bus).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FleetMsg {
    /// A tunnel is OPEN with these tokens and this owner (created, or re-placed).
    Index {
        /// The tunnel.
        entry: IndexEntry,
    },
    /// A tunnel closed.
    Close {
        /// The tunnel.
        tunnel_id: String,
        /// Why (`closed`, `expired`, `device_deleted`).
        reason: String,
    },
    /// A tunnel was deleted.
    Delete {
        /// The tunnel.
        tunnel_id: String,
    },
    /// A side's token was replaced.
    Rotate {
        /// The tunnel.
        tunnel_id: String,
        /// The side.
        side: Side,
        /// The new token's hash, hex.
        hash: String,
    },
    /// A message for a device's channel, delivered by the node holding it.
    Device {
        /// The device's product.
        product_key: String,
        /// The device.
        device_name: String,
        /// The JSON notification, or `None` for "the device was deleted".
        text: Option<String>,
    },
    /// A `connect` for a device's channel, to be built from the store by the node holding it
    /// (sent instead of [`FleetMsg::Device`] when the text would not fit a NOTIFY).
    DeviceConnect {
        /// The device's product.
        product_key: String,
        /// The device.
        device_name: String,
        /// The OPEN tunnel to connect to.
        tunnel_id: String,
    },
    /// The device's channel connected to the sending node: an older channel elsewhere is
    /// replaced.
    Channel {
        /// The device's product.
        product_key: String,
        /// The device.
        device_name: String,
    },
    /// An API key was revoked: forget it now rather than when its cache entry expires.
    KeyRevoked {
        /// The key's id.
        key_id: String,
    },
}

/// A [`FleetMsg`] as it travels: stamped with the node that sent it, so each node skips its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    msg: FleetMsg,
}

/// What the index needs of an OPEN tunnel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// The tunnel.
    pub tunnel_id: String,
    /// Its services.
    pub services: Vec<String>,
    /// When it expires.
    pub expires_at: Millis,
    /// The client token's hash, hex.
    pub client_hash: String,
    /// The device token's hash, hex.
    pub device_hash: String,
    /// The owner node.
    pub owner_node: Option<String>,
}

impl IndexEntry {
    /// The entry of a stored tunnel.
    pub fn of(t: &Tunnel) -> Self {
        Self {
            tunnel_id: t.id.clone(),
            services: t.services.clone(),
            expires_at: t.expires_at,
            client_hash: hex::encode(t.client_token_hash),
            device_hash: hex::encode(t.device_token_hash),
            owner_node: t.owner_node.clone(),
        }
    }
}

fn parse_hash(s: &str) -> Option<SecretHash> {
    hex::decode(s).ok().and_then(|v| v.try_into().ok())
}

fn parse_reason(s: &str) -> CloseReason {
    match s {
        "expired" => CloseReason::Expired,
        "device_deleted" => CloseReason::DeviceDeleted,
        _ => CloseReason::Closed,
    }
}

/// Whether a node is live at `now`.
pub fn is_live(node: &NodeRecord, now: Millis, dead_after_ms: i64) -> bool {
    now - node.heartbeat_at <= dead_after_ms
}

/// This node's place in the fleet.
pub struct Fleet {
    /// This node's id.
    pub node_id: String,
    /// Whether the store is shared with other nodes (PostgreSQL).
    pub shared: bool,
    /// Where each live node's mesh listener is, for the relay.
    pub routes: Arc<MeshRoutes>,
    /// This node's row, as last written.
    me: Mutex<NodeRecord>,
    /// Every node, as last read.
    nodes: RwLock<Vec<NodeRecord>>,
    leader: AtomicBool,
    draining: AtomicBool,
    /// Heartbeats so far.
    beats: AtomicU64,
    /// Since when every heartbeat of this node has gone through (`i64::MAX`: the last one
    /// failed, or none yet).
    steady_since: AtomicI64,
    /// Whether a re-placement is running.
    replacing: AtomicBool,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("node_id", &self.node_id)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// A fleet seen from `me`; `shared` when other nodes use the same store.
    pub fn new(me: NodeRecord, shared: bool, routes: Arc<MeshRoutes>) -> Self {
        Self {
            node_id: me.node_id.clone(),
            shared,
            routes,
            nodes: RwLock::new(vec![me.clone()]),
            me: Mutex::new(me),
            leader: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            beats: AtomicU64::new(0),
            steady_since: AtomicI64::new(i64::MAX),
            replacing: AtomicBool::new(false),
        }
    }

    /// Whether this node holds the leader lease (sweeps lifecycles, re-places tunnels).
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Whether this node is draining (shutting down).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Every node as last read, by node id.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.nodes.read().expect("nodes lock").clone()
    }

    /// Whether `node_id` is a node that heartbeated within the dead-after window at `now`.
    pub fn node_is_live(&self, node_id: &str, now: Millis, dead_after_ms: i64) -> bool {
        node_id == self.node_id
            || self
                .nodes
                .read()
                .expect("nodes lock")
                .iter()
                .any(|n| n.node_id == node_id && is_live(n, now, dead_after_ms))
    }

    /// The relay URL base (`scheme`, `host:port`) of a tunnel's owner; this node's for its own
    /// tunnels, or when the owner is unknown.
    pub fn relay_of(&self, owner: Option<&str>) -> Option<(String, String)> {
        let owner = owner.filter(|o| *o != self.node_id)?;
        let nodes = self.nodes.read().expect("nodes lock");
        let node = nodes.iter().find(|n| n.node_id == owner)?;
        let (scheme, host_port) = node.relay_url.split_once("://")?;
        Some((scheme.to_string(), host_port.to_string()))
    }

    /// The owner for a new tunnel: the live node (not draining) owning the fewest OPEN tunnels
    /// by `load` (the fleet-wide index's counts), this node on a tie.
    pub fn place(&self, now: Millis, dead_after_ms: i64, load: impl Fn(&str) -> usize) -> String {
        if !self.shared {
            return self.node_id.clone();
        }
        let nodes = self.nodes.read().expect("nodes lock");
        let mut best = (
            if self.is_draining() {
                usize::MAX
            } else {
                load(&self.node_id)
            },
            self.node_id.as_str(),
        );
        for n in nodes.iter() {
            if n.node_id == self.node_id || n.draining || !is_live(n, now, dead_after_ms) {
                continue;
            }
            let l = load(&n.node_id);
            if l < best.0 {
                best = (l, &n.node_id);
            }
        }
        best.1.to_string()
    }

    fn refresh(&self, nodes: Vec<NodeRecord>, now: Millis, dead_after_ms: i64) {
        for n in &nodes {
            let addr = n.mesh_addr.as_deref().and_then(resolve);
            match addr {
                Some(a) if n.node_id != self.node_id && is_live(n, now, dead_after_ms) => {
                    self.routes.set(&n.node_id, a)
                }
                _ => self.routes.remove(&n.node_id),
            }
        }
        *self.nodes.write().expect("nodes lock") = nodes;
    }
}

fn resolve(host_port: &str) -> Option<SocketAddr> {
    host_port.to_socket_addrs().ok()?.next()
}

impl ControlPlane {
    /// Tells the other nodes (a no-op on a store of one node).
    pub(super) async fn publish(&self, msg: FleetMsg) {
        if !self.fleet.shared {
            return;
        }
        let envelope = Envelope {
            from: self.fleet.node_id.clone(),
            msg,
        };
        let payload = match serde_json::to_string(&envelope) {
            Ok(p) => p,
            Err(e) => return tracing::warn!(error = %e, "cannot encode a fleet message"),
        };
        if let Err(e) = self.store.publish(payload).await {
            tracing::warn!(error = %e, "cannot publish a fleet message");
        }
    }

    /// Applies a message from another node.
    pub async fn apply_fleet_msg(&self, msg: FleetMsg) {
        match msg {
            FleetMsg::Index { entry } => self.index_entry(&entry),
            FleetMsg::Close {
                tunnel_id, reason, ..
            } => {
                self.index.close(&tunnel_id);
                let _ = self.relay.send(RelayCommand::CloseTunnel {
                    tunnel_id,
                    reason: parse_reason(&reason),
                });
            }
            FleetMsg::Delete { tunnel_id, .. } => {
                self.index.remove(&tunnel_id);
                let _ = self.relay.send(RelayCommand::CloseTunnel {
                    tunnel_id,
                    reason: CloseReason::Closed,
                });
            }
            FleetMsg::Rotate {
                tunnel_id,
                side,
                hash,
                ..
            } => {
                if let Some(h) = parse_hash(&hash) {
                    self.index.rotate(&tunnel_id, side, h);
                }
                let _ = self
                    .relay
                    .send(RelayCommand::DisconnectSide { tunnel_id, side });
            }
            FleetMsg::Device {
                product_key,
                device_name,
                text,
                ..
            } => {
                let msg = text.map_or(ChannelMsg::DeviceDeleted, ChannelMsg::Text);
                self.channels.send(&product_key, &device_name, msg);
            }
            FleetMsg::DeviceConnect {
                product_key,
                device_name,
                tunnel_id,
                ..
            } => {
                if !self.channels.is_online(&product_key, &device_name) {
                    return;
                }
                let open = self
                    .store
                    .open_tunnels_of_device(product_key.clone(), device_name.clone())
                    .await;
                match open {
                    Ok(open) => {
                        if let Some(t) = open.iter().find(|t| t.id == tunnel_id) {
                            let text = self.connect_notification(t);
                            self.channels
                                .send(&product_key, &device_name, ChannelMsg::Text(text));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, %tunnel_id, "cannot build a connect"),
                }
            }
            FleetMsg::Channel {
                product_key,
                device_name,
                ..
            } => self
                .channels
                .send(&product_key, &device_name, ChannelMsg::Replaced),
            FleetMsg::KeyRevoked { key_id } => self.keys.forget(&key_id),
        }
    }

    /// Indexes an OPEN tunnel (new, or with a new owner) here and on every other node, and
    /// sends its device the `connect` naming its owner's relay.
    pub(super) async fn open_everywhere(&self, t: &Tunnel) {
        self.index_tunnel(t);
        self.publish(FleetMsg::Index {
            entry: IndexEntry::of(t),
        })
        .await;
        self.notify(&t.product_key, &t.device_name, DeviceEvent::Connect(t))
            .await;
    }

    /// Indexes an OPEN tunnel as the bus or the store describes it.
    pub fn index_entry(&self, e: &IndexEntry) {
        let (Some(client), Some(device)) = (parse_hash(&e.client_hash), parse_hash(&e.device_hash))
        else {
            return tracing::warn!(tunnel_id = %e.tunnel_id, "fleet message with a bad token hash");
        };
        // A fleet of one owns everything, whatever node id is written.
        let owner = e
            .owner_node
            .as_deref()
            .filter(|o| self.fleet.shared && *o != self.fleet.node_id);
        let was_here = self.index.is_owned_here(&e.tunnel_id);
        self.index.insert(
            &e.tunnel_id,
            &e.services,
            e.expires_at,
            client,
            device,
            owner,
        );
        if was_here && owner.is_some() {
            // Moved away (re-placed while this node was thought dead): our peers must go and
            // reconnect, reaching the new owner.
            let _ = self.relay.send(RelayCommand::Evict {
                tunnel_id: e.tunnel_id.clone(),
            });
        }
    }

    /// Reloads the index from the store: after a gap in the bus, messages may have been lost.
    pub async fn resync_index(&self) -> crate::store::StoreResult<()> {
        // Listed before the snapshot: a tunnel created meanwhile is in the snapshot or not
        // listed, never taken for closed.
        let indexed = self.index.open_ids();
        let open = self.store.all_open_tunnels().await?;
        let ids: std::collections::HashSet<&str> = open.iter().map(|t| t.id.as_str()).collect();
        for id in indexed {
            if !ids.contains(&*id) {
                self.index.close(&id);
                let _ = self.relay.send(RelayCommand::CloseTunnel {
                    tunnel_id: id.to_string(),
                    reason: CloseReason::Closed,
                });
            }
        }
        for t in &open {
            self.index_tunnel(t);
        }
        Ok(())
    }

    /// This node's row now.
    fn my_record(&self, now: Millis) -> NodeRecord {
        let mut me = self.fleet.me.lock().expect("me lock");
        me.heartbeat_at = now;
        me.open_tunnels = self.index.owned_here() as u64;
        me.device_channels = self.channels.connected() as u64;
        me.draining = self.fleet.is_draining();
        me.clone()
    }

    /// One heartbeat: writes this node's row, reads every node's, and takes or renews the
    /// leader lease. Returns whether the leader should now look for dead owners
    /// ([`ControlPlane::replace_dead_owners`], which [`run_heartbeat`] runs beside the beats).
    pub async fn heartbeat(&self) -> crate::store::StoreResult<bool> {
        let now = self.clock.now_ms();
        let dead_after = self.settings.node_dead_after_ms as i64;
        self.store.upsert_node(self.my_record(now)).await?;
        let nodes = self.store.list_nodes().await?;
        self.fleet.refresh(nodes, now, dead_after);
        let leader = !self.fleet.is_draining()
            && self
                .store
                .try_lease(
                    LEADER_LEASE.into(),
                    self.fleet.node_id.clone(),
                    now,
                    dead_after,
                )
                .await?;
        if leader != self.fleet.leader.swap(leader, Ordering::Relaxed) {
            tracing::info!(node_id = %self.fleet.node_id, leader, "fleet leadership changed");
        }
        // After an outage of the database (or a start of this node), every other node looks
        // dead until it has had a dead-after window to heartbeat again: judge nobody before
        // this node's own beats have gone through for that long.
        let steady_since = self.fleet.steady_since.load(Ordering::Relaxed);
        if steady_since == i64::MAX {
            self.fleet.steady_since.store(now, Ordering::Relaxed);
            return Ok(false);
        }
        let steady = now - steady_since >= dead_after;
        // Counting OPEN tunnels by owner in the store costs O(open tunnels): do it when this
        // node's index says a dead node still owns some, and every FULL_CHECK_BEATS beats in
        // case the index missed one (a gap in the bus).
        let beat = self.fleet.beats.fetch_add(1, Ordering::Relaxed);
        let suspect = self
            .fleet
            .nodes()
            .iter()
            .any(|n| !is_live(n, now, dead_after) && self.index.owned_by(&n.node_id) > 0);
        Ok(leader
            && steady
            && self.fleet.shared
            && (suspect || beat.is_multiple_of(FULL_CHECK_BEATS)))
    }

    /// Live nodes that take tunnels (not draining), this one included unless it drains.
    fn placeable_nodes(&self, now: Millis, dead_after: i64) -> Vec<String> {
        let mut out: Vec<String> = self
            .fleet
            .nodes()
            .into_iter()
            .filter(|n| n.node_id != self.fleet.node_id)
            .filter(|n| !n.draining && is_live(n, now, dead_after))
            .map(|n| n.node_id)
            .collect();
        if !self.fleet.is_draining() {
            out.push(self.fleet.node_id.clone());
        }
        out.sort();
        out
    }

    /// As leader: moves the OPEN tunnels of dead nodes to live ones.
    pub async fn replace_dead_owners(&self) -> crate::store::StoreResult<()> {
        let now = self.clock.now_ms();
        let dead_after = self.settings.node_dead_after_ms as i64;
        let owners = self.store.open_tunnels_by_owner().await?;
        let targets = self.placeable_nodes(now, dead_after);
        for (owner, count) in owners {
            if count == 0 || self.fleet.node_is_live(&owner, now, dead_after) {
                continue;
            }
            tracing::warn!(dead_node = %owner, tunnels = count, "re-placing a dead node's tunnels");
            self.move_tunnels(owner, targets.clone(), now).await?;
        }
        Ok(())
    }

    /// Moves `from`'s OPEN tunnels to `to`, re-indexes them everywhere and tells each device
    /// its new relay URL.
    async fn move_tunnels(
        &self,
        from: String,
        to: Vec<String>,
        now: Millis,
    ) -> crate::store::StoreResult<usize> {
        let moved = self.store.reassign_tunnels(from.clone(), to, now).await?;
        for t in &moved {
            // Our own peers of a moved tunnel are evicted by `index_entry`.
            self.open_everywhere(t).await;
        }
        if !moved.is_empty() {
            tracing::info!(%from, tunnels = moved.len(), "tunnels re-placed");
        }
        Ok(moved.len())
    }

    /// Stops taking tunnels and hands this node's to the others (SIGTERM). Returns how many
    /// moved; they stay here when no other node is live.
    pub async fn drain(&self) -> usize {
        if !self.fleet.shared {
            return 0;
        }
        self.fleet.draining.store(true, Ordering::Relaxed);
        if let Err(e) = self.heartbeat().await {
            tracing::warn!(error = %e, "cannot announce draining");
        }
        let now = self.clock.now_ms();
        let targets = self.placeable_nodes(now, self.settings.node_dead_after_ms as i64);
        if targets.is_empty() {
            tracing::warn!("no other live node: this node's tunnels wait for one");
            return 0;
        }
        match self
            .move_tunnels(self.fleet.node_id.clone(), targets, now)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand tunnels over");
                0
            }
        }
    }
}

/// Heartbeats every `heartbeat_interval_ms` until shutdown; as leader, re-places dead nodes'
/// tunnels in a task of its own, so a long re-placement never delays this node's beats.
pub async fn run_heartbeat(cp: Arc<ControlPlane>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker =
        tokio::time::interval(Duration::from_millis(cp.settings.heartbeat_interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => match cp.heartbeat().await {
                Ok(true) if !cp.fleet.replacing.swap(true, Ordering::AcqRel) => {
                    let cp = cp.clone();
                    tokio::spawn(async move {
                        if let Err(e) = cp.replace_dead_owners().await {
                            tracing::warn!(error = %e, "re-placement failed; will retry");
                        }
                        cp.fleet.replacing.store(false, Ordering::Release);
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    cp.fleet.steady_since.store(i64::MAX, Ordering::Relaxed);
                    tracing::warn!(error = %e, "fleet heartbeat failed; will retry");
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Applies what other nodes publish until shutdown.
pub async fn run_bus(
    cp: Arc<ControlPlane>,
    mut rx: mpsc::UnboundedReceiver<BusEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => match ev { Some(ev) => ev, None => return },
            _ = shutdown.changed() => return,
        };
        match ev {
            BusEvent::Message(payload) => match serde_json::from_str::<Envelope>(&payload) {
                // This node did its own part before it published.
                Ok(e) if e.from == cp.fleet.node_id => {}
                Ok(e) => cp.apply_fleet_msg(e.msg).await,
                Err(e) => tracing::warn!(error = %e, "ignored a malformed fleet message"),
            },
            // Every (re)subscription, the first included (it may land after the index was
            // loaded at start), follows a gap in which messages may have been lost.
            BusEvent::Resynced => {
                tracing::info!("fleet bus (re)subscribed; reloading the tunnel index");
                // A revoke may have been missed too: ask the store about every key again.
                cp.keys.clear();
                if let Err(e) = cp.resync_index().await {
                    tracing::warn!(error = %e, "cannot reload the tunnel index");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_json() {
        let msg = Envelope {
            from: "n1".into(),
            msg: FleetMsg::Rotate {
                tunnel_id: "t".into(),
                side: Side::Client,
                hash: hex::encode([7u8; 32]),
            },
        };
        let text = serde_json::to_string(&msg).unwrap();
        assert!(text.contains(r#""op":"rotate""#), "{text}");
        assert!(text.contains(r#""from":"n1""#), "{text}");
        assert_eq!(serde_json::from_str::<Envelope>(&text).unwrap(), msg);
    }

    fn node(id: &str, beat: Millis, open: u64) -> NodeRecord {
        NodeRecord {
            node_id: id.into(),
            relay_url: format!("wss://{id}:8443"),
            api_url: format!("http://{id}:8080"),
            mesh_addr: None,
            version: "0".into(),
            started_at: 0,
            heartbeat_at: beat,
            shards: 1,
            open_tunnels: open,
            device_channels: 0,
            draining: false,
        }
    }

    #[test]
    fn placement_prefers_the_least_loaded_live_node() {
        let fleet = Fleet::new(node("a", 0, 0), true, Arc::default());
        fleet.refresh(
            vec![node("a", 10_000, 5), node("b", 10_000, 2), node("c", 0, 0)],
            10_000,
            5_000,
        );
        let load = |a: usize, b: usize| move |n: &str| if n == "a" { a } else { b };
        // c is dead (and would be least loaded); b has fewer; a tie stays here.
        assert_eq!(fleet.place(10_000, 5_000, load(5, 2)), "b");
        assert_eq!(fleet.place(10_000, 5_000, load(5, 5)), "a");
        assert_eq!(fleet.place(10_000, 5_000, load(5, 6)), "a");
        assert_eq!(
            fleet.relay_of(Some("b")),
            Some(("wss".into(), "b:8443".into()))
        );
        assert_eq!(fleet.relay_of(Some("a")), None);
    }
}
