//! The seam between the control plane and the data plane.
//!
//! The relay never touches the store. What it needs from the control plane is here:
//! - [`TunnelIndex`]: token hash -> (tunnel id, side, family lock, owner shard, services). The
//!   control plane keeps it current on create, close, rotate and delete, and rebuilds it from the
//!   store at start. A relay shard that accepts a connection hashes the presented token and looks
//!   it up here, then hands the socket to the owner shard.
//! - [`RelayCommand`]s flow from the control plane to the data plane (close a tunnel, drop a side
//!   whose token was rotated). The relay routes each to the tunnel's owner shard.
//! - [`ConnectionEvent`]s flow back (connected, disconnected with a reason, ping RTT). The control
//!   plane persists them in batches, so describe shows CONNECTED/DISCONNECTED with times.
//! - [`MeshRoutes`]: in a fleet, where each other node's mesh listener is, so a connection for a
//!   tunnel owned elsewhere can be forwarded to its owner node.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::clock::Millis;
use crate::token::SecretHash;

/// One end of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The device end (AWS "destination").
    Device,
    /// The person's end (AWS "source").
    Client,
}

impl Side {
    /// The lowercase name used in columns, labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Device => "device",
            Side::Client => "client",
        }
    }
}

/// Which vendor protocol family a tunnel's peers speak; the first peer to connect decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Family {
    /// AWS IoT Secure Tunneling, V1-V3.
    Aws = 1,
    /// Alibaba `aliyun.iot.securetunnel-v1.1`.
    Aliyun = 2,
}

/// The family lock shared by both sides of a tunnel: unset until the first peer connects.
#[derive(Debug, Default)]
pub struct FamilyLock(AtomicU8);

impl FamilyLock {
    /// Locks the tunnel to `family`, or returns the family it is already locked to if different.
    pub fn lock(&self, family: Family) -> Result<(), Family> {
        match self
            .0
            .compare_exchange(0, family as u8, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(()),
            Err(v) if v == family as u8 => Ok(()),
            Err(v) if v == Family::Aws as u8 => Err(Family::Aws),
            Err(_) => Err(Family::Aliyun),
        }
    }

    /// The family the tunnel is locked to, if any.
    pub fn get(&self) -> Option<Family> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(Family::Aws),
            2 => Some(Family::Aliyun),
            _ => None,
        }
    }
}

/// What the index knows of one tunnel.
#[derive(Debug)]
pub struct IndexedTunnel {
    /// The tunnel id.
    pub tunnel_id: Arc<str>,
    /// The services the tunnel carries (AWS SERVICE_IDS, Alibaba service_type).
    pub services: Arc<[String]>,
    /// When the tunnel expires, ms since the epoch.
    pub expires_at: Millis,
    /// The shard that owns the tunnel (meaningless when another node owns it).
    pub owner_shard: usize,
    /// The family both sides must speak.
    pub family: FamilyLock,
    /// The node that owns the tunnel: `None` is this node (pumped here); `Some(node_id)` means
    /// its connections are forwarded to that node over the mesh.
    pub owner_node: Option<Arc<str>>,
}

/// A successful token lookup.
#[derive(Debug, Clone)]
pub struct TokenMatch {
    /// The tunnel the token opens.
    pub tunnel: Arc<IndexedTunnel>,
    /// The side the token belongs to.
    pub side: Side,
}

/// In-memory index of the OPEN tunnels' tokens, shared by the control plane and every shard.
///
/// Tokens of closed tunnels are kept aside until the tunnel is deleted, so the relay can answer
/// "tunnel closed" (409) rather than "unknown token" (401). They are not rebuilt at start.
#[derive(Debug)]
pub struct TunnelIndex {
    /// OPEN tunnels owned by each shard: a new tunnel goes to the least loaded.
    load: Box<[AtomicUsize]>,
    by_token: DashMap<SecretHash, TokenMatch>,
    by_tunnel: DashMap<Arc<str>, Owned>,
    closed_tokens: DashMap<SecretHash, ()>,
    closed_by_tunnel: DashMap<Arc<str>, Owned>,
    /// OPEN tunnels owned by each other node of the fleet, for placement.
    remote_load: DashMap<Arc<str>, usize>,
    /// Closed tunnels (tokens remembered) that this node owned when they closed.
    closed_here: AtomicUsize,
}

/// A tunnel's two token hashes (client, device), its owner shard, and its owner node when that
/// is another node.
#[derive(Debug, Clone)]
struct Owned {
    hashes: [SecretHash; 2],
    shard: usize,
    /// Whether the tunnel holds a place in `load` (owned by this node).
    placed: bool,
    /// The other node that owns it (`None` when `placed`).
    owner: Option<Arc<str>>,
}

impl TunnelIndex {
    /// An empty index for a data plane of `shards` shards (at least one).
    pub fn new(shards: usize) -> Self {
        Self {
            load: (0..shards.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            by_token: DashMap::new(),
            by_tunnel: DashMap::new(),
            closed_tokens: DashMap::new(),
            closed_by_tunnel: DashMap::new(),
            remote_load: DashMap::new(),
            closed_here: AtomicUsize::new(0),
        }
    }

    /// The shard that owns `tunnel_id`, open or closed; None once it is deleted.
    pub fn owner_shard(&self, tunnel_id: &str) -> Option<usize> {
        self.by_tunnel
            .get(tunnel_id)
            .or_else(|| self.closed_by_tunnel.get(tunnel_id))
            .map(|o| o.shard)
    }

    /// The shard owning the fewest OPEN tunnels (the first of equals), now one more.
    fn place(&self) -> usize {
        let (shard, load) = self
            .load
            .iter()
            .enumerate()
            .min_by_key(|(_, l)| l.load(Ordering::Relaxed))
            .expect("at least one shard");
        load.fetch_add(1, Ordering::Relaxed);
        shard
    }

    /// Adds (or replaces) an OPEN tunnel with its two token hashes. `owner_node` is `None` when
    /// this node owns the tunnel; a tunnel owned by another node takes no shard place here.
    pub fn insert(
        &self,
        tunnel_id: &str,
        services: &[String],
        expires_at: Millis,
        client_hash: SecretHash,
        device_hash: SecretHash,
        owner_node: Option<&str>,
    ) {
        if self.closed_by_tunnel.contains_key(tunnel_id) {
            // CLOSED is final: a late fleet message (a re-placement published before the close
            // reached this node) must not reopen it.
            return;
        }
        let current = self.by_tunnel.get(tunnel_id).map(|o| o.clone());
        if let Some(cur) = &current {
            if cur.hashes == [client_hash, device_hash] && cur.owner.as_deref() == owner_node {
                // Already indexed as is (a fleet resync): keep its shard and family lock.
                return;
            }
        }
        // A local tunnel that stays local keeps its shard: its peers may be pumped there now.
        let keep_shard = current
            .filter(|c| c.placed && owner_node.is_none())
            .map(|c| c.shard);
        self.remove(tunnel_id);
        let placed = owner_node.is_none();
        let shard = match keep_shard {
            Some(s) => {
                self.load[s].fetch_add(1, Ordering::Relaxed);
                s
            }
            None if placed => self.place(),
            None => 0,
        };
        let owner: Option<Arc<str>> = owner_node.map(Arc::from);
        if let Some(o) = &owner {
            *self.remote_load.entry(o.clone()).or_insert(0) += 1;
        }
        let tunnel = Arc::new(IndexedTunnel {
            tunnel_id: Arc::from(tunnel_id),
            services: services.to_vec().into(),
            expires_at,
            owner_shard: shard,
            family: FamilyLock::default(),
            owner_node: owner.clone(),
        });
        for (hash, side) in [(client_hash, Side::Client), (device_hash, Side::Device)] {
            self.by_token.insert(
                hash,
                TokenMatch {
                    tunnel: tunnel.clone(),
                    side,
                },
            );
        }
        let owned = Owned {
            hashes: [client_hash, device_hash],
            shard,
            placed,
            owner,
        };
        self.by_tunnel.insert(tunnel.tunnel_id.clone(), owned);
    }

    /// Replaces the token of one side of a tunnel (rotate); false when the tunnel is not indexed.
    pub fn rotate(&self, tunnel_id: &str, side: Side, new_hash: SecretHash) -> bool {
        let Some(mut owned) = self.by_tunnel.get_mut(tunnel_id) else {
            return false;
        };
        let slot = match side {
            Side::Client => 0,
            Side::Device => 1,
        };
        let Some((_, found)) = self.by_token.remove(&owned.hashes[slot]) else {
            return false;
        };
        self.by_token.insert(new_hash, found);
        owned.hashes[slot] = new_hash;
        true
    }

    /// Marks a tunnel closed: its tokens stop matching at once, and are known as closed.
    pub fn close(&self, tunnel_id: &str) {
        if let Some((id, owned)) = self.by_tunnel.remove(tunnel_id) {
            if owned.placed {
                self.load[owned.shard].fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(o) = &owned.owner {
                self.remote_load.remove_if_mut(o, |_, n| {
                    *n -= 1;
                    *n == 0
                });
            }
            for h in owned.hashes {
                self.by_token.remove(&h);
                self.closed_tokens.insert(h, ());
            }
            if owned.placed {
                self.closed_here.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(prev) = self.closed_by_tunnel.insert(id, owned) {
                if prev.placed {
                    self.closed_here.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Forgets a tunnel entirely (deleted), open or closed.
    pub fn remove(&self, tunnel_id: &str) {
        self.close(tunnel_id);
        if let Some((_, owned)) = self.closed_by_tunnel.remove(tunnel_id) {
            if owned.placed {
                self.closed_here.fetch_sub(1, Ordering::Relaxed);
            }
            for h in owned.hashes {
                self.closed_tokens.remove(&h);
            }
        }
    }

    /// Whether a token belonged to a tunnel that is now closed.
    pub fn is_closed_token(&self, token_hash: &SecretHash) -> bool {
        self.closed_tokens.contains_key(token_hash)
    }

    /// Looks up a presented token (hashed by the caller with [`crate::token::hash_secret`]).
    pub fn lookup(&self, token_hash: &SecretHash) -> Option<TokenMatch> {
        self.by_token.get(token_hash).map(|m| m.clone())
    }

    /// The OPEN tunnels this node owns (pumped on its shards).
    pub fn owned_here(&self) -> usize {
        self.load.iter().map(|l| l.load(Ordering::Relaxed)).sum()
    }

    /// The OPEN tunnels another node owns, as far as this index knows.
    pub fn owned_by(&self, node_id: &str) -> usize {
        self.remote_load.get(node_id).map_or(0, |n| *n)
    }

    /// Whether `tunnel_id` is OPEN and owned by this node.
    pub fn is_owned_here(&self, tunnel_id: &str) -> bool {
        self.by_tunnel.get(tunnel_id).is_some_and(|o| o.placed)
    }

    /// The ids of every indexed (OPEN) tunnel.
    pub fn open_ids(&self) -> Vec<Arc<str>> {
        self.by_tunnel.iter().map(|e| e.key().clone()).collect()
    }

    /// The number of indexed tunnels.
    pub fn len(&self) -> usize {
        self.by_tunnel.len()
    }

    /// The closed tunnels whose tokens are remembered that this node owned when they closed.
    pub fn closed_here(&self) -> usize {
        self.closed_here.load(Ordering::Relaxed)
    }

    /// Whether no tunnel is indexed.
    pub fn is_empty(&self) -> bool {
        self.by_tunnel.is_empty()
    }
}

/// Why the relay must end connections of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Closed through the API.
    Closed,
    /// Lifetime expired.
    Expired,
    /// Its device was deleted.
    DeviceDeleted,
}

impl CloseReason {
    /// The name stored as `close_reason` and sent in notifications.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Closed => "closed",
            CloseReason::Expired => "expired",
            CloseReason::DeviceDeleted => "device_deleted",
        }
    }
}

/// A command from the control plane to the data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayCommand {
    /// End both sides of a tunnel with a close frame (1000 + reason).
    CloseTunnel {
        /// The tunnel.
        tunnel_id: String,
        /// Why.
        reason: CloseReason,
    },
    /// The tunnel moved to another node: end both sides with 1001 so they reconnect and reach
    /// the new owner (nothing is closed).
    Evict {
        /// The tunnel.
        tunnel_id: String,
    },
    /// A side's token was rotated: drop that side's connection.
    DisconnectSide {
        /// The tunnel.
        tunnel_id: String,
        /// The rotated side.
        side: Side,
    },
}

/// What happened to one side's connection.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectionEventKind {
    /// The side connected from `addr`.
    Connected {
        /// The peer's address.
        addr: String,
    },
    /// The side disconnected.
    Disconnected {
        /// Why, as a metric label (closed, expired, replaced, peer_gone, ping_timeout, ...).
        reason: String,
    },
    /// A ping round trip completed.
    Rtt {
        /// The last round trip, microseconds.
        last_us: u64,
        /// The smoothed round trip, microseconds.
        smoothed_us: u64,
    },
    /// Bytes carried so far on this connection (reported with pings and at disconnect).
    Traffic {
        /// Bytes the side sent (read by the relay from it).
        sent: u64,
        /// Bytes the side received (written by the relay to it).
        received: u64,
    },
}

/// A connection event from the data plane, persisted by the control plane in batches.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionEvent {
    /// The tunnel.
    pub tunnel_id: String,
    /// Which side.
    pub side: Side,
    /// When, ms since the epoch.
    pub at: Millis,
    /// What happened.
    pub kind: ConnectionEventKind,
}

/// Where each other node of the fleet listens for mesh connections (node id -> address); the
/// control plane keeps it current from the nodes table.
#[derive(Debug, Default)]
pub struct MeshRoutes {
    routes: DashMap<String, SocketAddr>,
}

impl MeshRoutes {
    /// Sets (or replaces) the mesh address of `node_id`.
    pub fn set(&self, node_id: &str, addr: SocketAddr) {
        self.routes.insert(node_id.to_string(), addr);
    }

    /// Forgets `node_id` (gone from the fleet).
    pub fn remove(&self, node_id: &str) {
        self.routes.remove(node_id);
    }

    /// The mesh address of `node_id`, if known.
    pub fn get(&self, node_id: &str) -> Option<SocketAddr> {
        self.routes.get(node_id).map(|a| *a)
    }
}

/// The control plane's ends of the seam, handed to the data plane at start.
#[derive(Debug)]
pub struct DataPlaneSeam {
    /// The token index, shared.
    pub index: Arc<TunnelIndex>,
    /// The other nodes' mesh addresses, shared.
    pub routes: Arc<MeshRoutes>,
    /// Commands to execute.
    pub commands: mpsc::UnboundedReceiver<RelayCommand>,
    /// Where to send connection events.
    pub events: mpsc::Sender<ConnectionEvent>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_tracks_create_rotate_remove() {
        let idx = TunnelIndex::new(4);
        idx.insert("t1", &["SSH".into()], 0, [1; 32], [2; 32], None);
        assert_eq!(idx.lookup(&[1; 32]).unwrap().side, Side::Client);
        assert_eq!(idx.lookup(&[2; 32]).unwrap().side, Side::Device);
        assert!(idx.rotate("t1", Side::Device, [3; 32]));
        assert!(idx.lookup(&[2; 32]).is_none());
        assert_eq!(&*idx.lookup(&[3; 32]).unwrap().tunnel.tunnel_id, "t1");
        idx.close("t1");
        assert!(idx.lookup(&[1; 32]).is_none() && idx.lookup(&[3; 32]).is_none());
        assert!(idx.is_empty());
        assert!(idx.is_closed_token(&[1; 32]) && idx.is_closed_token(&[3; 32]));
        idx.remove("t1");
        assert!(!idx.is_closed_token(&[1; 32]));
    }

    #[test]
    fn a_late_insert_never_reopens_a_closed_tunnel() {
        let idx = TunnelIndex::new(2);
        idx.insert("t1", &[], 0, [1; 32], [2; 32], Some("n2"));
        idx.close("t1");
        // A re-placement's message published before the close arrives after it.
        idx.insert("t1", &[], 0, [1; 32], [2; 32], Some("n3"));
        assert!(idx.lookup(&[1; 32]).is_none() && idx.is_closed_token(&[1; 32]));
        assert_eq!((idx.len(), idx.owned_by("n3")), (0, 0));
    }

    #[test]
    fn family_lock_is_first_come() {
        let l = FamilyLock::default();
        assert_eq!(l.lock(Family::Aliyun), Ok(()));
        assert_eq!(l.lock(Family::Aliyun), Ok(()));
        assert_eq!(l.lock(Family::Aws), Err(Family::Aliyun));
    }

    #[test]
    fn tunnels_go_to_the_least_loaded_shard() {
        let idx = TunnelIndex::new(2);
        let open = |i: u8| idx.insert(&format!("t{i}"), &[], 0, [i; 32], [100 + i; 32], None);
        (0..8).for_each(open);
        let on = |shard| {
            (0..8)
                .filter(|i| idx.owner_shard(&format!("t{i}")) == Some(shard))
                .count()
        };
        assert_eq!((on(0), on(1)), (4, 4));
        // Closing frees a shard's place (the closed tunnel keeps its owner for commands)...
        for i in (0..8).filter(|i| idx.owner_shard(&format!("t{i}")) == Some(0)) {
            idx.close(&format!("t{i}"));
        }
        assert!(idx.owner_shard("t0").is_some());
        // ...so the next tunnels fill it; a deleted one has no owner left.
        (8..12).for_each(open);
        assert!((8..12).all(|i| idx.owner_shard(&format!("t{i}")) == Some(0)));
        idx.remove("t0");
        assert_eq!(idx.owner_shard("t0"), None);
        assert_eq!(idx.lookup(&[9; 32]).unwrap().tunnel.owner_shard, 0);
    }

    #[test]
    fn remote_owned_tunnels_take_no_shard_place() {
        let idx = TunnelIndex::new(2);
        idx.insert("r1", &[], 0, [1; 32], [2; 32], Some("b"));
        idx.insert("r2", &[], 0, [3; 32], [4; 32], Some("b"));
        let found = idx.lookup(&[1; 32]).unwrap();
        assert_eq!(found.tunnel.owner_node.as_deref(), Some("b"));
        // Closing a remote tunnel frees no place it never took...
        idx.close("r1");
        idx.remove("r2");
        // ...so two local tunnels still spread over both shards.
        idx.insert("l1", &[], 0, [5; 32], [6; 32], None);
        idx.insert("l2", &[], 0, [7; 32], [8; 32], None);
        assert_ne!(idx.owner_shard("l1"), idx.owner_shard("l2"));
        assert!(idx.lookup(&[5; 32]).unwrap().tunnel.owner_node.is_none());
    }

    #[test]
    fn mesh_routes_set_get_remove() {
        let routes = MeshRoutes::default();
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        routes.set("b", addr);
        assert_eq!(routes.get("b"), Some(addr));
        routes.remove("b");
        assert_eq!(routes.get("b"), None);
    }
}
