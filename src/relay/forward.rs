//! Forwarding a peer to its tunnel's owner node over the mesh (wire format in [`super::mesh`]).
//!
//! The peer's upgrade request passed every check here but the family lock; no 101 was written.
//! We connect to the owner's mesh address, send the preamble, the request and whatever the peer
//! sent after it, then splice bytes both ways: the owner answers the upgrade and pumps frames
//! as for any peer, and its answer reaches the peer unchanged (through our TLS session).
//!
//! Two tasks on this shard, one per direction, each the only reader of one socket and the only
//! writer of the other, so no read is ever dropped in flight (STYLE rule 11). The TLS session is
//! shared through `Rc<RefCell<..>>`, borrowed only between awaits: the peer->mesh task only
//! decrypts; records the session wants to send (key updates) go out with the next seal of the
//! mesh->peer task, in order. Each task holds a half of both sockets, so both fds stay open
//! while either task runs and `shutdown` on them is always safe. Buffers are bounded (one read
//! each way in flight), so a slow side stops the other from reading: backpressure, no queue.
use std::cell::RefCell;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use bytes::BytesMut;
use monoio::io::Splitable;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf};
use monoio::net::TcpStream;

use super::pump::Tls;
use super::stats::MeshDirection;
use super::upgrade::{self, Conn, Refusal, CIPHER_READ};
use super::{mesh, sys, ShardCtx};
use crate::token;

/// Bytes read per call each way: the TLS read size, so one record batch fits one read.
const SPLICE_READ: usize = CIPHER_READ;
/// A write to the peer that makes no progress for this many ping intervals ends the forward:
/// the owner drops a peer that misses 3 pings anyway, and a peer that takes nothing would
/// otherwise hold both sockets once the owner has gone.
const STALLED_PINGS: u32 = 4;

/// Forwards `conn` (whose request `head` was read and checked) to `owner_node`; answers the
/// peer `503 owner_unreachable` when the owner cannot be reached.
pub(super) async fn forward(mut conn: Conn, owner_node: &str, head: BytesMut, ctx: Rc<ShardCtx>) {
    let mesh = match connect(&conn, owner_node, head, &ctx).await {
        Some(mesh) => mesh,
        None => {
            ctx.stats.mesh_forward(false);
            ctx.stats
                .handshake_failed(Refusal::OwnerUnreachable.label());
            tracing::warn!(owner_node, peer = %conn.peer, "tunnel owner unreachable over the mesh");
            let answer = upgrade::refuse::<()>(&mut conn, Refusal::OwnerUnreachable);
            let _ = monoio::time::timeout(ctx.cfg.handshake_timeout, answer).await;
            return;
        }
    };
    ctx.stats.mesh_forward(true);
    splice(conn, mesh, ctx).await;
}

/// Connects to the owner and sends the preamble, the request and the bytes after it.
async fn connect(
    conn: &Conn,
    owner_node: &str,
    head: BytesMut,
    ctx: &ShardCtx,
) -> Option<TcpStream> {
    let cfg = ctx.cfg.mesh.as_ref()?;
    let addr = ctx.routes.get(owner_node)?;
    let preamble = mesh::encode_preamble(
        cfg,
        owner_node,
        ctx.clock.now_ms(),
        token::random_bytes(),
        conn.peer,
    );
    let mut first = Vec::with_capacity(preamble.len() + head.len() + conn.buffered.len());
    first.extend_from_slice(preamble.as_bytes());
    first.extend_from_slice(&head);
    first.extend_from_slice(&conn.buffered);
    let dial = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        let (res, _) = stream.write_all(first).await;
        res.ok().map(|_| stream)
    };
    monoio::time::timeout(ctx.cfg.handshake_timeout, dial)
        .await
        .ok()
        .flatten()
}

/// Keeps the outbound gauge up while a forward runs.
struct OpenForward(Rc<ShardCtx>);

impl OpenForward {
    fn new(ctx: Rc<ShardCtx>) -> Rc<Self> {
        ctx.stats.mesh_opened(MeshDirection::Outbound);
        Rc::new(Self(ctx))
    }
}

impl Drop for OpenForward {
    fn drop(&mut self) {
        self.0.stats.mesh_closed(MeshDirection::Outbound);
    }
}

/// The fds of both sockets, for waking the other task.
#[derive(Clone, Copy)]
struct Fds {
    peer: RawFd,
    mesh: RawFd,
}

impl Fds {
    /// Ends both connections both ways (the other task's read wakes with EOF).
    fn shut_all(self) {
        sys::shutdown_both(self.peer);
        sys::shutdown_both(self.mesh);
    }
}

async fn splice(conn: Conn, mesh: TcpStream, ctx: Rc<ShardCtx>) {
    let Conn { stream, tls, .. } = conn;
    let fds = Fds {
        peer: stream.as_raw_fd(),
        mesh: mesh.as_raw_fd(),
    };
    let tls = tls.map(|b| Rc::new(RefCell::new(*b)));
    let open = OpenForward::new(ctx.clone());
    let (peer_read, peer_write) = stream.into_split();
    let (mesh_read, mesh_write) = mesh.into_split();
    monoio::spawn(peer_to_mesh(
        peer_read,
        mesh_write,
        tls.clone(),
        fds,
        open.clone(),
    ));
    mesh_to_peer(mesh_read, peer_write, tls, fds, open).await;
}

/// Peer -> owner: reads (and decrypts) what the peer sends, writes it to the mesh. At the
/// peer's EOF (or close_notify) the mesh is half-closed, so the owner sees the end and its
/// answer (a close frame) can still come back.
async fn peer_to_mesh(
    mut read: OwnedReadHalf<TcpStream>,
    mut write: OwnedWriteHalf<TcpStream>,
    tls: Option<Tls>,
    fds: Fds,
    open: Rc<OpenForward>,
) {
    let stats = &open.0.stats;
    let mut buf = Vec::with_capacity(SPLICE_READ);
    let mut plain = BytesMut::new();
    loop {
        let (res, b) = read.read(buf).await;
        buf = b;
        let n = match res {
            Ok(n) if n > 0 => n,
            Ok(_) => break,
            Err(_) => return fds.shut_all(),
        };
        let mut open_tls = true;
        let written = match &tls {
            None => {
                stats.mesh_bytes(MeshDirection::Outbound, n);
                let (res, b) = write.write_all(buf).await;
                buf = b;
                res.is_ok()
            }
            Some(tls) => {
                let absorbed = super::tls::absorb(&mut tls.borrow_mut(), &buf[..n], &mut plain);
                let Ok((_, still_open)) = absorbed else {
                    return fds.shut_all();
                };
                open_tls = still_open;
                stats.mesh_bytes(MeshDirection::Outbound, plain.len());
                let (res, p) = write.write_all(std::mem::take(&mut plain)).await;
                plain = p;
                plain.clear();
                res.is_ok()
            }
        };
        buf.clear();
        if !written {
            return fds.shut_all();
        }
        if !open_tls {
            break;
        }
    }
    let _ = write.shutdown().await;
}

/// Owner -> peer: reads what the owner sends, writes it (encrypted) to the peer. At the owner's
/// EOF the peer gets close_notify and both connections end.
async fn mesh_to_peer(
    mut read: OwnedReadHalf<TcpStream>,
    mut write: OwnedWriteHalf<TcpStream>,
    tls: Option<Tls>,
    fds: Fds,
    open: Rc<OpenForward>,
) {
    let ctx = &open.0;
    let stall = ctx.cfg.ping_interval * STALLED_PINGS;
    let mut buf = Vec::with_capacity(SPLICE_READ);
    let mut sealed = Vec::new();
    loop {
        let (res, b) = read.read(buf).await;
        buf = b;
        let n = match res {
            Ok(n) if n > 0 => n,
            _ => break,
        };
        ctx.stats.mesh_bytes(MeshDirection::Outbound, n);
        let out = match &tls {
            None => std::mem::take(&mut buf),
            Some(tls) => {
                sealed.clear();
                if super::tls::seal(&mut tls.borrow_mut(), &buf[..n], &mut sealed).is_err() {
                    return fds.shut_all();
                }
                buf.clear();
                std::mem::take(&mut sealed)
            }
        };
        // A timed-out write is dropped in flight: the connection ends with it, nothing is lost
        // that anyone would read.
        match monoio::time::timeout(stall, write.write_all(out)).await {
            Ok((Ok(_), out)) if tls.is_none() => {
                buf = out;
                buf.clear();
            }
            Ok((Ok(_), out)) => sealed = out,
            _ => return fds.shut_all(),
        }
    }
    if let Some(tls) = &tls {
        sealed.clear();
        let ok = {
            let mut session = tls.borrow_mut();
            session.send_close_notify();
            super::tls::seal(&mut session, &[], &mut sealed).is_ok()
        };
        if ok && !sealed.is_empty() {
            let _ = monoio::time::timeout(stall, write.write_all(sealed)).await;
        }
    }
    fds.shut_all();
}
