//! Per-shard counters and histograms. Each shard owns its own (plain cells, no atomics shared
//! across cores); a scrape asks every shard for a snapshot through its inbox and merges them.
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::seam::{Family, Side};

/// Every reason a peer disconnects, a label of `iotunnel_peer_disconnects_total`.
pub const DISCONNECT_REASONS: &[&str] = &[
    "closed",
    "expired",
    "device_deleted",
    "replaced",
    "rotated",
    "peer_gone",
    "closed_by_peer",
    "ping_timeout",
    "protocol_error",
    "write_failed",
    "tls_error",
    "shutdown",
    "moved",
];

/// Every reason a handshake fails besides the refusals of [`super::upgrade::Refusal`]
/// (`mesh_tls`: a mesh connection that is not TLS or has no certificate from the fleet CA;
/// `mesh_auth`: one whose preamble did not verify; see [`super::mesh`]).
pub const HANDSHAKE_FAILURES: &[&str] = &[
    "timeout",
    "tls_or_io",
    "too_many_handshakes",
    "mesh_tls",
    "mesh_auth",
];

/// Which way a mesh connection goes, an index into the mesh statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshDirection {
    /// This node forwards a peer's connection to the tunnel's owner node.
    Outbound = 0,
    /// A connection another node forwarded to this one.
    Inbound = 1,
}

impl MeshDirection {
    /// Both directions, in index order.
    pub const ALL: [MeshDirection; 2] = [MeshDirection::Outbound, MeshDirection::Inbound];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            MeshDirection::Outbound => "outbound",
            MeshDirection::Inbound => "inbound",
        }
    }
}

/// Histogram range: 1 µs to 60 s in nanoseconds, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("static bounds are valid")
}

fn role(side: Side) -> usize {
    match side {
        Side::Device => 0,
        Side::Client => 1,
    }
}

/// Direction of forwarded traffic: 0 client_to_device, 1 device_to_client.
pub fn direction(from: Side) -> usize {
    match from {
        Side::Client => 0,
        Side::Device => 1,
    }
}

/// A shard's live statistics.
pub struct ShardStats {
    peers: [Cell<u64>; 2],
    connects: [[Cell<u64>; 2]; 2],
    disconnects: RefCell<HashMap<(usize, &'static str), u64>>,
    bytes: [Cell<u64>; 2],
    frames: [Cell<u64>; 2],
    forward_latency: RefCell<Histogram<u64>>,
    rtt: [RefCell<Histogram<u64>>; 2],
    handshake_failures: RefCell<HashMap<&'static str, u64>>,
    tunnels: Cell<u64>,
    /// Forwards to an owner node: (ok, unreachable).
    mesh_forwards: [Cell<u64>; 2],
    /// Mesh connections open now, by [`MeshDirection`].
    mesh_connections: [Cell<u64>; 2],
    /// Bytes carried over the mesh, by [`MeshDirection`].
    mesh_bytes: [Cell<u64>; 2],
    /// Per-frame recording is on (`--relay-metrics`).
    frame_stats: bool,
}

impl std::fmt::Debug for ShardStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardStats").finish_non_exhaustive()
    }
}

impl ShardStats {
    /// Empty statistics; `frame_stats` false skips the per-frame counters and latency.
    pub fn new(frame_stats: bool) -> Self {
        Self {
            peers: Default::default(),
            connects: Default::default(),
            disconnects: RefCell::default(),
            bytes: Default::default(),
            frames: Default::default(),
            forward_latency: RefCell::new(histogram()),
            rtt: [RefCell::new(histogram()), RefCell::new(histogram())],
            handshake_failures: RefCell::default(),
            tunnels: Cell::new(0),
            mesh_forwards: Default::default(),
            mesh_connections: Default::default(),
            mesh_bytes: Default::default(),
            frame_stats,
        }
    }

    /// When a frame was read, for its forwarding latency; None when per-frame stats are off.
    pub fn stamp(&self) -> Option<Instant> {
        self.frame_stats.then(Instant::now)
    }
}

fn bump(c: &Cell<u64>, by: u64) {
    c.set(c.get().wrapping_add(by));
}

impl ShardStats {
    /// A peer connected.
    pub fn connected(&self, side: Side, family: Family) {
        bump(&self.peers[role(side)], 1);
        bump(&self.connects[role(side)][family as usize - 1], 1);
    }

    /// A peer disconnected for `reason`.
    pub fn disconnected(&self, side: Side, reason: &'static str) {
        crate::trim::connection_closed();
        let p = &self.peers[role(side)];
        p.set(p.get().saturating_sub(1));
        *self
            .disconnects
            .borrow_mut()
            .entry((role(side), reason))
            .or_default() += 1;
    }

    /// A frame of `len` bytes was forwarded from `from`.
    pub fn forwarded(&self, from: Side, len: usize) {
        if !self.frame_stats {
            return;
        }
        bump(&self.bytes[direction(from)], len as u64);
        bump(&self.frames[direction(from)], 1);
    }

    /// A frame took `took` from fully read to fully written.
    pub fn forward_latency(&self, took: Duration) {
        let _ = self
            .forward_latency
            .borrow_mut()
            .record(took.as_nanos() as u64);
    }

    /// A ping round trip of `side` took `rtt`.
    pub fn rtt(&self, side: Side, rtt: Duration) {
        let _ = self.rtt[role(side)]
            .borrow_mut()
            .record(rtt.as_nanos() as u64);
    }

    /// A handshake failed for `reason`.
    pub fn handshake_failed(&self, reason: &'static str) {
        *self
            .handshake_failures
            .borrow_mut()
            .entry(reason)
            .or_default() += 1;
    }

    /// A forward to an owner node started (`ok`) or could not reach it.
    pub fn mesh_forward(&self, ok: bool) {
        bump(&self.mesh_forwards[usize::from(!ok)], 1);
    }

    /// A mesh connection opened.
    pub fn mesh_opened(&self, dir: MeshDirection) {
        bump(&self.mesh_connections[dir as usize], 1);
    }

    /// A mesh connection closed.
    pub fn mesh_closed(&self, dir: MeshDirection) {
        let c = &self.mesh_connections[dir as usize];
        c.set(c.get().saturating_sub(1));
    }

    /// `n` bytes were carried over the mesh.
    pub fn mesh_bytes(&self, dir: MeshDirection, n: usize) {
        bump(&self.mesh_bytes[dir as usize], n as u64);
    }

    /// The number of tunnels on the shard.
    pub fn set_tunnels(&self, n: usize) {
        self.tunnels.set(n as u64);
    }

    /// A copy to send to the scraper.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            peers: self.peers.each_ref().map(Cell::get),
            connects: self
                .connects
                .each_ref()
                .map(|r| r.each_ref().map(Cell::get)),
            disconnects: self.disconnects.borrow().clone(),
            bytes: self.bytes.each_ref().map(Cell::get),
            frames: self.frames.each_ref().map(Cell::get),
            forward_latency: self.forward_latency.borrow().clone(),
            rtt: self.rtt.each_ref().map(|h| h.borrow().clone()),
            handshake_failures: self.handshake_failures.borrow().clone(),
            tunnels: self.tunnels.get(),
            mesh_forwards: self.mesh_forwards.each_ref().map(Cell::get),
            mesh_connections: self.mesh_connections.each_ref().map(Cell::get),
            mesh_bytes: self.mesh_bytes.each_ref().map(Cell::get),
            per_tunnel: Vec::new(),
        }
    }
}

/// One shard's statistics at a scrape.
#[derive(Debug, Clone)]
pub struct StatsSnapshot {
    /// Connected peers by role (device, client).
    pub peers: [u64; 2],
    /// Connects by role and family (aws, aliyun).
    pub connects: [[u64; 2]; 2],
    /// Disconnects by (role, reason).
    pub disconnects: HashMap<(usize, &'static str), u64>,
    /// Bytes by direction (client_to_device, device_to_client).
    pub bytes: [u64; 2],
    /// Frames by direction.
    pub frames: [u64; 2],
    /// Forwarding latency, ns.
    pub forward_latency: Histogram<u64>,
    /// Ping RTT by role, ns.
    pub rtt: [Histogram<u64>; 2],
    /// Handshake failures by reason.
    pub handshake_failures: HashMap<&'static str, u64>,
    /// Tunnels on the shard.
    pub tunnels: u64,
    /// Forwards to an owner node: (ok, unreachable).
    pub mesh_forwards: [u64; 2],
    /// Mesh connections open now, by [`MeshDirection`] (outbound, inbound).
    pub mesh_connections: [u64; 2],
    /// Bytes carried over the mesh, by [`MeshDirection`] (outbound, inbound).
    pub mesh_bytes: [u64; 2],
    /// Per-tunnel statistics, when enabled (`--metrics-per-tunnel`).
    pub per_tunnel: Vec<TunnelStats>,
}

/// One tunnel's statistics, for the optional per-tunnel series.
#[derive(Debug, Clone)]
pub struct TunnelStats {
    /// The tunnel.
    pub tunnel_id: String,
    /// Bytes forwarded by direction (client_to_device, device_to_client).
    pub bytes: [u64; 2],
    /// Whether each role (device, client) is connected.
    pub connected: [bool; 2],
    /// Smoothed ping RTT by role, microseconds.
    pub srtt_us: [Option<u64>; 2],
}
