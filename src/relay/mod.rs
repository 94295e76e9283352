//! The data plane: a thread-per-core relay on monoio (io_uring, or epoll where io_uring is
//! missing).
//!
//! Each shard owns one `SO_REUSEPORT` listener on the relay address. The shard that accepts a
//! connection runs the TLS handshake and reads the upgrade request ([`upgrade`]), checks the
//! token against the [`TunnelIndex`], answers 101, and hands the socket with its TLS session and
//! every byte already read to the tunnel's owner shard. There both sides of a tunnel meet and
//! [`pump`] forwards their frames: no locks and no cross-core traffic on the data path.
//!
//! In a fleet, a tunnel owned by another node is checked here and then forwarded to its owner
//! over the [`mesh`] ([`forward`]); connections other nodes forward to us arrive on the mesh
//! listener (TLS mutually authenticated by the fleet CA, then the preamble) and take the same
//! upgrade path and hand-off as direct ones, with the mesh link's TLS session.
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use dashmap::DashMap;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use tokio::sync::mpsc;

use crate::clock::Clock;
use crate::config::{IoDriver, Settings};
use crate::seam::{ConnectionEvent, DataPlaneSeam, MeshRoutes, RelayCommand, Side, TunnelIndex};

mod forward;
pub mod mesh;
mod outbox;
mod peer;
pub mod pump;
mod slot;
pub mod stats;
mod sys;
pub mod tls;
pub mod upgrade;
mod writer;

pub use mesh::{MeshConfig, MeshIdentity, MeshTls};

/// Pending connections per shard listener.
const LISTEN_BACKLOG: i32 = 4096;

/// A fleet's bus delivers a new tunnel to every node within milliseconds; half a second covers
/// a loaded database with room to spare and still refuses guessed tokens promptly.
const FLEET_UNKNOWN_TOKEN_GRACE: Duration = Duration::from_millis(500);

/// What every shard needs to know, fixed at start.
pub struct RelayConfig {
    /// TLS configuration; `None` serves plaintext ws://.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS handshake plus upgrade request deadline.
    pub handshake_timeout: Duration,
    /// Ping interval; three missed pongs drop a peer.
    pub ping_interval: Duration,
    /// Largest frame payload.
    pub max_frame_payload: usize,
    /// Most Alibaba-family sessions per tunnel.
    pub max_sessions: usize,
    /// Most handshakes in progress per client IP.
    pub max_handshakes_per_ip: usize,
    /// Device responses to session_create time out after this (Alibaba family).
    pub session_create_timeout: Duration,
    /// Report per-tunnel statistics for at most this many tunnels per shard (0: off).
    pub per_tunnel_stats: usize,
    /// Record per-frame metrics (`--relay-metrics`).
    pub frame_stats: bool,
    /// How long an unknown token is looked up again before the 401 (fleet mode: a tunnel
    /// created on another node may reach this index a moment after its peers dial).
    pub unknown_token_grace: Duration,
    /// This node's fleet identity, mesh secret and mesh TLS; `None` without a mesh.
    pub mesh: Option<MeshConfig>,
}

impl RelayConfig {
    /// The relay configuration from the server settings, loading the TLS material.
    pub fn from_settings(
        s: &Settings,
        default_cert: &std::path::Path,
        default_key: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let tls = if s.relay_plaintext {
            None
        } else {
            let cert = s.tls_cert.as_deref().unwrap_or(default_cert);
            let key = s.tls_key.as_deref().unwrap_or(default_key);
            Some(tls::server_config(cert, key)?)
        };
        Ok(Self {
            tls,
            handshake_timeout: Duration::from_millis(s.handshake_timeout_ms),
            ping_interval: Duration::from_millis(s.peer_ping_interval_ms),
            max_frame_payload: s.max_frame_payload,
            max_sessions: s.max_sessions_per_tunnel,
            max_handshakes_per_ip: s.max_handshakes_per_ip,
            session_create_timeout: Duration::from_millis(s.session_create_timeout_ms),
            per_tunnel_stats: s.metrics_per_tunnel,
            frame_stats: s.relay_metrics,
            unknown_token_grace: if s.database_url.is_some() {
                FLEET_UNKNOWN_TOKEN_GRACE
            } else {
                Duration::ZERO
            },
            // The control plane fills it in fleet mode.
            mesh: None,
        })
    }
}

/// A message to a shard.
#[derive(Debug)]
pub enum ShardMsg {
    /// A connection accepted elsewhere, for a tunnel this shard owns.
    HandOff(HandOff),
    /// A command from the control plane.
    Command(RelayCommand),
    /// Send a snapshot of the shard's statistics.
    Scrape(tokio::sync::oneshot::Sender<stats::StatsSnapshot>),
    /// Close every connection and stop.
    Shutdown,
}

/// A socket moving between shards with everything needed to go on where it stopped.
#[derive(Debug)]
pub struct HandOff {
    fd: RawFd,
    tls: Option<Box<tls::ServerSession>>,
    buffered: BytesMut,
    peer: SocketAddr,
    upgrade: upgrade::Upgrade,
}

/// State shared by all shards, and each shard's own id.
pub struct ShardCtx {
    /// This shard.
    pub id: usize,
    /// The configuration.
    pub cfg: Arc<RelayConfig>,
    /// The token index.
    pub index: Arc<TunnelIndex>,
    /// The other nodes' mesh addresses.
    pub routes: Arc<MeshRoutes>,
    /// Wall-clock time for events.
    pub clock: Arc<dyn Clock>,
    /// Connection events to the control plane.
    pub events: mpsc::Sender<ConnectionEvent>,
    /// Every shard's inbox, for hand-offs.
    pub shards: Arc<[mpsc::UnboundedSender<ShardMsg>]>,
    /// Handshakes in progress per IP, across shards.
    pub handshakes: Arc<DashMap<IpAddr, usize>>,
    /// This shard's statistics.
    pub stats: stats::ShardStats,
}

impl ShardCtx {
    /// Reports a connection event; never blocks the shard (a full queue drops the event and
    /// says so in the log).
    pub fn event(&self, tunnel_id: &str, side: Side, kind: crate::seam::ConnectionEventKind) {
        let ev = ConnectionEvent {
            tunnel_id: tunnel_id.to_string(),
            side,
            at: self.clock.now_ms(),
            kind,
        };
        if self.events.try_send(ev).is_err() {
            tracing::warn!(tunnel_id, "connection event queue full; event dropped");
        }
    }
}

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its mesh listener listens, when it has one.
    pub mesh_addr: Option<SocketAddr>,
    inboxes: Arc<[mpsc::UnboundedSender<ShardMsg>]>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Asks every shard for its statistics.
#[derive(Debug, Clone)]
pub struct RelayScraper {
    inboxes: Arc<[mpsc::UnboundedSender<ShardMsg>]>,
}

impl RelayScraper {
    /// One snapshot per shard that answers within a second (a busy shard is skipped, never
    /// waited on: a scrape must not stall the data plane or hang the exporter).
    pub async fn scrape(&self) -> Vec<stats::StatsSnapshot> {
        let mut waiting = Vec::new();
        for inbox in self.inboxes.iter() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if inbox.send(ShardMsg::Scrape(tx)).is_ok() {
                waiting.push(rx);
            }
        }
        let mut out = Vec::new();
        for rx in waiting {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), rx).await {
                out.push(s);
            }
        }
        out
    }
}

/// Binds `n` listeners sharing `addr` through `SO_REUSEPORT` (port 0 picks one port for all).
pub fn bind_listeners(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut bound = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket
            .bind(&bound.into())
            .with_context(|| format!("cannot listen on relay address {addr}"))?;
        socket.listen(LISTEN_BACKLOG)?;
        let listener: std::net::TcpListener = socket.into();
        bound = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

impl RelayHandle {
    /// Starts one shard per listener and routes the control plane's commands to them; shard 0
    /// also accepts on `mesh_listener` (which needs `cfg.mesh`).
    pub fn start(
        mut cfg: RelayConfig,
        io_driver: IoDriver,
        seam: DataPlaneSeam,
        clock: Arc<dyn Clock>,
        listeners: Vec<std::net::TcpListener>,
        mut mesh_listener: Option<std::net::TcpListener>,
    ) -> anyhow::Result<Self> {
        let addr = listeners
            .first()
            .context("no relay listener")?
            .local_addr()?;
        if let Some(mesh) = &cfg.mesh {
            mesh::check_node_id(&mesh.identity.node_id)?;
        }
        // Our record layer takes over from rustls after each handshake.
        cfg.tls = cfg.tls.take().map(tls::with_extraction);
        if mesh_listener.is_some() && cfg.mesh.is_none() {
            anyhow::bail!("a mesh listener needs a node id, a mesh key and the mesh TLS");
        }
        let mesh_addr = mesh_listener
            .as_ref()
            .map(std::net::TcpListener::local_addr)
            .transpose()?;
        let cfg = Arc::new(cfg);
        let (txs, rxs): (Vec<_>, Vec<_>) =
            listeners.iter().map(|_| mpsc::unbounded_channel()).unzip();
        let inboxes: Arc<[_]> = txs.into();
        let handshakes = Arc::new(DashMap::new());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for (id, (listener, inbox)) in listeners.into_iter().zip(rxs).enumerate() {
            let ctx = ShardCtx {
                id,
                cfg: cfg.clone(),
                index: seam.index.clone(),
                routes: seam.routes.clone(),
                clock: clock.clone(),
                events: seam.events.clone(),
                shards: inboxes.clone(),
                handshakes: handshakes.clone(),
                stats: stats::ShardStats::new(cfg.frame_stats),
            };
            let ready = ready_tx.clone();
            let listeners = ShardListeners {
                relay: listener,
                mesh: mesh_listener.take(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("iotunnel-shard-{id}"))
                    .spawn(move || run_shard(ctx, listeners, inbox, io_driver, ready))?,
            );
        }
        drop(ready_tx);
        for _ in 0..threads.len() {
            ready_rx.recv().context("a relay shard died at start")??;
        }
        let router_inboxes = inboxes.clone();
        let index = seam.index.clone();
        let mut commands = seam.commands;
        tokio::spawn(async move {
            while let Some(cmd) = commands.recv().await {
                let tunnel_id = match &cmd {
                    RelayCommand::CloseTunnel { tunnel_id, .. }
                    | RelayCommand::DisconnectSide { tunnel_id, .. } => tunnel_id,
                    // The index already names the new owner: whichever shard pumped it ends it.
                    RelayCommand::Evict { .. } => {
                        for inbox in router_inboxes.iter() {
                            let _ = inbox.send(ShardMsg::Command(cmd.clone()));
                        }
                        continue;
                    }
                };
                match index.owner_shard(tunnel_id) {
                    Some(shard) => {
                        let _ = router_inboxes[shard].send(ShardMsg::Command(cmd));
                    }
                    // Deleted meanwhile: whichever shard still holds it ends it.
                    None => {
                        for inbox in router_inboxes.iter() {
                            let _ = inbox.send(ShardMsg::Command(cmd.clone()));
                        }
                    }
                }
            }
        });
        Ok(Self {
            addr,
            mesh_addr,
            inboxes,
            threads,
        })
    }

    /// A handle for scraping the shards' statistics.
    pub fn scraper(&self) -> RelayScraper {
        RelayScraper {
            inboxes: self.inboxes.clone(),
        }
    }

    /// Closes every connection and joins the shards.
    pub fn shutdown(self) {
        for inbox in self.inboxes.iter() {
            let _ = inbox.send(ShardMsg::Shutdown);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A shard's listeners: its relay listener, and the mesh listener on one shard.
struct ShardListeners {
    relay: std::net::TcpListener,
    mesh: Option<std::net::TcpListener>,
}

fn run_shard(
    ctx: ShardCtx,
    listener: ShardListeners,
    inbox: mpsc::UnboundedReceiver<ShardMsg>,
    driver: IoDriver,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
) {
    let id = ctx.id;
    let want_uring = match driver {
        IoDriver::Auto => monoio::utils::detect_uring(),
        IoDriver::Uring => true,
        IoDriver::Epoll => false,
    };
    if want_uring {
        match RuntimeBuilder::<IoUringDriver>::new()
            .enable_timer()
            .build()
        {
            Ok(mut rt) => {
                tracing::info!(shard = id, driver = "io_uring", "relay shard started");
                return rt.block_on(shard_main(ctx, listener, inbox, ready));
            }
            Err(e) if driver == IoDriver::Uring => {
                let _ = ready.send(Err(anyhow::anyhow!("io_uring is not available: {e}")));
                return;
            }
            Err(e) => {
                tracing::warn!(shard = id, error = %e, "io_uring unavailable; falling back to epoll")
            }
        }
    }
    match RuntimeBuilder::<LegacyDriver>::new().enable_timer().build() {
        Ok(mut rt) => {
            tracing::info!(shard = id, driver = "epoll", "relay shard started");
            rt.block_on(shard_main(ctx, listener, inbox, ready));
        }
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("cannot start a relay shard: {e}")));
        }
    }
}

async fn shard_main(
    ctx: ShardCtx,
    listeners: ShardListeners,
    mut inbox: mpsc::UnboundedReceiver<ShardMsg>,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
) {
    let register = |l: std::net::TcpListener, what: &str| {
        l.set_nonblocking(true)
            .and_then(|()| monoio::net::TcpListener::from_std(l))
            .map_err(|e| anyhow::anyhow!("cannot register the {what} listener: {e}"))
    };
    let listener = match register(listeners.relay, "relay") {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mesh_listener = match listeners.mesh.map(|l| register(l, "mesh")).transpose() {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let ctx = Rc::new(ctx);
    let state = Rc::new(pump::Shard::new(ctx.clone()));
    monoio::spawn(accept_loop(listener, ctx.clone(), state.clone()));
    if let Some(l) = mesh_listener {
        monoio::spawn(mesh::accept_loop(l, ctx.clone(), state.clone()));
    }
    while let Some(msg) = inbox.recv().await {
        match msg {
            ShardMsg::HandOff(h) => {
                let stream = sys::adopt_socket(h.fd);
                let adopted = stream
                    .set_nonblocking(true)
                    .and_then(|()| monoio::net::TcpStream::from_std(stream));
                match adopted {
                    Ok(stream) => {
                        let conn = upgrade::Conn {
                            stream,
                            tls: h.tls,
                            buffered: h.buffered,
                            peer: h.peer,
                        };
                        state.adopt(conn, h.upgrade);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot adopt a handed-off socket"),
                }
            }
            ShardMsg::Command(cmd) => state.command(cmd),
            ShardMsg::Scrape(reply) => {
                ctx.stats.set_tunnels(state.tunnel_count());
                let mut snapshot = ctx.stats.snapshot();
                snapshot.per_tunnel = state.per_tunnel_stats(ctx.cfg.per_tunnel_stats);
                let _ = reply.send(snapshot);
            }
            ShardMsg::Shutdown => break,
        }
    }
    state.close_all(
        crate::proto::ws::close_code::GOING_AWAY,
        "relay shutting down",
    );
    // Let the writers send their close frames.
    monoio::time::sleep(Duration::from_millis(50)).await;
}

/// Counts a handshake in progress for an IP while alive.
struct HandshakeSlot {
    map: Arc<DashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl HandshakeSlot {
    fn take(map: &Arc<DashMap<IpAddr, usize>>, ip: IpAddr, cap: usize) -> Option<Self> {
        let mut n = map.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Self {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.map.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

async fn accept_loop(
    listener: monoio::net::TcpListener,
    ctx: Rc<ShardCtx>,
    state: Rc<pump::Shard>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of fds or similar: back off briefly instead of spinning.
                tracing::warn!(error = %e, "relay accept failed");
                monoio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(slot) =
            HandshakeSlot::take(&ctx.handshakes, peer.ip(), ctx.cfg.max_handshakes_per_ip)
        else {
            ctx.stats.handshake_failed("too_many_handshakes");
            tracing::info!(%peer, "too many handshakes in progress from this address; refused");
            continue;
        };
        let _ = stream.set_nodelay(true);
        monoio::spawn(handshake(stream, peer, ctx.clone(), state.clone(), slot));
    }
}

async fn handshake(
    stream: monoio::net::TcpStream,
    peer: SocketAddr,
    ctx: Rc<ShardCtx>,
    state: Rc<pump::Shard>,
    slot: HandshakeSlot,
) {
    let accepting = async {
        let mut stream = stream;
        let mut buffered = BytesMut::new();
        let tls = match &ctx.cfg.tls {
            Some(cfg) => {
                let session = tls::accept(&mut stream, cfg.clone(), &mut buffered).await;
                Some(session.map_err(|_| None)?)
            }
            None => None,
        };
        let mut conn = upgrade::Conn {
            stream,
            tls,
            buffered,
            peer,
        };
        let accepted = upgrade::accept(&mut conn, &ctx, upgrade::Arrival::Direct).await?;
        Ok::<_, Option<upgrade::Refusal>>((conn, accepted))
    };
    let result = monoio::time::timeout(ctx.cfg.handshake_timeout, accepting).await;
    drop(slot);
    let (conn, up) = match result {
        Ok(Ok((conn, upgrade::Accepted::Local(up)))) => (conn, up),
        Ok(Ok((conn, upgrade::Accepted::Forward { owner_node, head }))) => {
            forward::forward(conn, &owner_node, head, ctx).await;
            return;
        }
        Ok(Err(refusal)) => {
            ctx.stats
                .handshake_failed(refusal.map_or("tls_or_io", upgrade::Refusal::label));
            return;
        }
        Err(_) => {
            ctx.stats.handshake_failed("timeout");
            tracing::debug!(%peer, "relay handshake timed out");
            return;
        }
    };
    hand_off(&ctx, &state, conn, up);
}

/// Gives an upgraded connection to its tunnel's owner shard (this one, or another through its
/// inbox), with its TLS session and every byte already read.
fn hand_off(ctx: &ShardCtx, state: &Rc<pump::Shard>, conn: upgrade::Conn, up: upgrade::Upgrade) {
    let owner = up.tunnel.owner_shard;
    if owner == ctx.id {
        state.adopt(conn, up);
        return;
    }
    let upgrade::Conn {
        stream,
        tls,
        buffered,
        peer,
    } = conn;
    let fd = stream.into_raw_fd();
    let h = HandOff {
        fd,
        tls,
        buffered,
        peer,
        upgrade: up,
    };
    if let Err(mpsc::error::SendError(ShardMsg::HandOff(h))) =
        ctx.shards[owner].send(ShardMsg::HandOff(h))
    {
        // The owner is gone (shutdown): close the socket we still own.
        drop(sys::adopt_socket(h.fd));
    }
}
