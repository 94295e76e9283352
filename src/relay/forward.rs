//! Forwarding a peer to its tunnel's owner node over the mesh (wire format in [`super::mesh`]).
//!
//! The peer's upgrade request passed every check here but the family lock; no 101 was written.
//! We connect to the owner's mesh address, run the mesh TLS handshake (our mesh certificate for
//! the owner, the owner's verified against the fleet CA), send the preamble, the request and
//! whatever the peer sent after it, then splice bytes both ways: the owner answers the upgrade
//! and pumps frames as for any peer, and its answer reaches the peer unchanged (through our TLS
//! session with the peer, when there is one).
//!
//! Two tasks on this shard, one per direction, each the only reader of one socket and the only
//! writer of the other, so no read is ever dropped in flight (STYLE rule 11). Each TLS session
//! (the peer's, the mesh link's) is shared through `Rc<RefCell<..>>`, borrowed only between
//! awaits: a task only decrypts with the session of the socket it reads and only encrypts with
//! the session of the socket it writes; records a session wants to send after decrypting (key
//! updates) go out, in order, with the next seal of the other task. Each task holds a half of
//! both sockets, so both fds stay open while either task runs and `shutdown` on them is always
//! safe. Buffers are bounded (one read each way in flight, its plaintext, its ciphertext), so a
//! slow side stops the other from reading: backpressure, no queue.
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use monoio::buf::IoBuf;
use monoio::io::Splitable;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf};
use monoio::net::TcpStream;
use rustls::pki_types::ServerName;

use super::peer::Tls;
use super::stats::MeshDirection;
use super::tls::{ClientSession, Session};
use super::upgrade::{self, Conn, Refusal, CIPHER_READ};
use super::{mesh, sys, ShardCtx};
use crate::token;

/// Bytes read per call each way: the TLS read size, so one record batch fits one read.
const SPLICE_READ: usize = CIPHER_READ;
/// A write to the peer that makes no progress for this many ping intervals ends the forward:
/// the owner drops a peer that misses 3 pings anyway, and a peer that takes nothing would
/// otherwise hold both sockets once the owner has gone.
const STALLED_PINGS: u32 = 4;

/// The mesh link's TLS session, shared by both tasks.
type MeshSession = Rc<RefCell<ClientSession>>;

/// A mesh link to the owner, past its handshake and first flight.
struct MeshLink {
    stream: TcpStream,
    tls: Box<ClientSession>,
    /// Plaintext the owner sent with its handshake flight (none in practice: it speaks only
    /// once it has read the request), carried so that no byte is lost (STYLE rule 10).
    early: BytesMut,
}

/// Forwards `conn` (whose request `head` was read and checked) to `owner_node`; answers the
/// peer `503 owner_unreachable` when the owner cannot be reached.
pub(super) async fn forward(mut conn: Conn, owner_node: &str, head: BytesMut, ctx: Rc<ShardCtx>) {
    let mesh = match connect(&conn, owner_node, head, &ctx).await {
        Ok(mesh) => mesh,
        Err(e) => {
            ctx.stats.mesh_forward(false);
            ctx.stats
                .handshake_failed(Refusal::OwnerUnreachable.label());
            tracing::warn!(owner_node, peer = %conn.peer, error = %e, "tunnel owner unreachable over the mesh");
            let answer = upgrade::refuse::<()>(&mut conn, Refusal::OwnerUnreachable);
            let _ = monoio::time::timeout(ctx.cfg.handshake_timeout, answer).await;
            return;
        }
    };
    ctx.stats.mesh_forward(true);
    splice(conn, mesh, ctx).await;
}

/// Connects to the owner, runs the mesh TLS handshake and sends the preamble, the request and
/// the bytes after it, all within the handshake timeout.
async fn connect(
    conn: &Conn,
    owner_node: &str,
    head: BytesMut,
    ctx: &ShardCtx,
) -> io::Result<MeshLink> {
    let cfg = ctx
        .cfg
        .mesh
        .as_ref()
        .ok_or_else(|| io::Error::other("no mesh"))?;
    let addr = ctx
        .routes
        .get(owner_node)
        .ok_or_else(|| io::Error::other("no mesh address for the owner"))?;
    let preamble = mesh::encode_preamble(
        &cfg.identity,
        owner_node,
        ctx.clock.now_ms(),
        token::random_bytes(),
        conn.peer,
    );
    let mut first = Vec::with_capacity(preamble.len() + head.len() + conn.buffered.len());
    first.extend_from_slice(preamble.as_bytes());
    first.extend_from_slice(&head);
    first.extend_from_slice(&conn.buffered);
    let name = ServerName::try_from(mesh::SERVER_NAME).expect("a valid DNS name");
    monoio::time::timeout(
        ctx.cfg.handshake_timeout,
        dial(addr, cfg.tls.client.clone(), name, first),
    )
    .await
    .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// The TCP connection and TLS handshake to `addr` (a failed handshake has sent rustls's
/// alert, as far as the owner listens), then `first`.
async fn dial(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    first: Vec<u8>,
) -> io::Result<MeshLink> {
    let mut stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let mut early = BytesMut::new();
    let mut tls = super::tls::connect(&mut stream, config, name, &mut early).await?;
    let mut out = Vec::new();
    tls.seal(&first, &mut out)?;
    let (res, _) = stream.write_all(out).await;
    res?;
    Ok(MeshLink { stream, tls, early })
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

async fn splice(conn: Conn, mesh: MeshLink, ctx: Rc<ShardCtx>) {
    let Conn { stream, tls, .. } = conn;
    let MeshLink {
        stream: mesh,
        tls: mesh_tls,
        early,
    } = mesh;
    let fds = Fds {
        peer: stream.as_raw_fd(),
        mesh: mesh.as_raw_fd(),
    };
    let tls = tls.map(|b| Rc::new(RefCell::new(*b)));
    let mesh_tls = Rc::new(RefCell::new(*mesh_tls));
    let open = OpenForward::new(ctx.clone());
    let (peer_read, peer_write) = stream.into_split();
    let (mesh_read, mesh_write) = mesh.into_split();
    monoio::spawn(peer_to_mesh(
        peer_read,
        mesh_write,
        tls.clone(),
        mesh_tls.clone(),
        fds,
        open.clone(),
    ));
    let to_peer = ToPeer {
        write: peer_write,
        tls,
        stall: ctx.cfg.ping_interval * STALLED_PINGS,
        sealed: Vec::new(),
    };
    mesh_to_peer(mesh_read, to_peer, mesh_tls, early, fds, open).await;
}

/// Peer -> owner: reads (and decrypts) what the peer sends, encrypts it for the mesh. At the
/// peer's EOF (or close_notify) the mesh link gets close_notify and is half-closed, so the owner
/// sees the end and its answer (a close frame) can still come back.
async fn peer_to_mesh(
    mut read: OwnedReadHalf<TcpStream>,
    mut write: OwnedWriteHalf<TcpStream>,
    tls: Option<Tls>,
    mesh_tls: MeshSession,
    fds: Fds,
    open: Rc<OpenForward>,
) {
    let stats = &open.0.stats;
    // Ciphertext (or plaintext) read from the peer; with TLS, the partial record at its end
    // stays for the next read.
    let mut buf = match &tls {
        Some(tls) => std::mem::take(&mut tls.borrow_mut().incoming),
        None => BytesMut::new(),
    };
    let mut sealed = Vec::new();
    loop {
        let (n, still_open) = match read_into(&mut read, &mut buf, tls.as_ref()).await {
            Ok(Some(read)) => read,
            Ok(None) => break,
            Err(()) => return fds.shut_all(),
        };
        stats.mesh_bytes(MeshDirection::Outbound, n);
        sealed.clear();
        if mesh_tls.borrow_mut().seal(&buf[..n], &mut sealed).is_err() {
            return fds.shut_all();
        }
        let _ = buf.split_to(n);
        if !sealed.is_empty() {
            let (res, s) = write.write_all(std::mem::take(&mut sealed)).await;
            sealed = s;
            if res.is_err() {
                return fds.shut_all();
            }
        }
        if !still_open {
            break;
        }
    }
    sealed.clear();
    mesh_tls.borrow_mut().close(&mut sealed);
    if !sealed.is_empty() {
        let (res, _) = write.write_all(sealed).await;
        if res.is_err() {
            return fds.shut_all();
        }
    }
    let _ = write.shutdown().await;
}

/// Reads once into `buf` and, with a session, opens the records in place: returns how much
/// plaintext `buf` starts with and whether the stream is still open (no close_notify), `None`
/// at end of stream, `Err` on a read or TLS error (the session keeps its alert for the other
/// task's next seal).
async fn read_into<S: super::tls::Role>(
    read: &mut OwnedReadHalf<TcpStream>,
    buf: &mut BytesMut,
    tls: Option<&Rc<RefCell<Session<S>>>>,
) -> Result<Option<(usize, bool)>, ()> {
    buf.reserve(SPLICE_READ);
    let len = buf.len();
    let (res, slice) = read
        .read(monoio::buf::IoBufMut::slice_mut(
            std::mem::take(buf),
            len..len + SPLICE_READ,
        ))
        .await;
    *buf = slice.into_inner();
    match res {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(_) => return Err(()),
    }
    let Some(tls) = tls else {
        return Ok(Some((buf.len(), true)));
    };
    let mut session = tls.borrow_mut();
    let plain = session.open_in_place(buf, 0).map_err(drop)?;
    Ok(Some((plain, !session.peer_closed())))
}

/// The peer's end of the owner -> peer task: its write half, its TLS session, and the bound
/// on how long a write to it may stall.
struct ToPeer {
    write: OwnedWriteHalf<TcpStream>,
    tls: Option<Tls>,
    stall: Duration,
    sealed: Vec<u8>,
}

impl ToPeer {
    /// Writes `plain` to the peer (encrypted when it has a session, after whatever records the
    /// session has pending; with `close_notify` after it when `closing`); false when the peer
    /// cannot take it.
    async fn send(&mut self, plain: BytesMut, closing: bool) -> (bool, BytesMut) {
        let Some(tls) = &self.tls else {
            if plain.is_empty() {
                return (true, plain);
            }
            return write_within(&mut self.write, plain, self.stall).await;
        };
        self.sealed.clear();
        let sealed = {
            let mut session = tls.borrow_mut();
            let ok = session.seal(&plain, &mut self.sealed).is_ok();
            if closing {
                session.close(&mut self.sealed);
            }
            ok
        };
        if self.sealed.is_empty() {
            return (sealed, plain);
        }
        let (ok, out) = write_within(
            &mut self.write,
            std::mem::take(&mut self.sealed),
            self.stall,
        )
        .await;
        self.sealed = out;
        (ok && sealed, plain)
    }
}

/// Writes all of `buf` unless it stalls for `stall`. A timed-out write is dropped in flight:
/// the connection ends with it, nothing is lost that anyone would read.
async fn write_within<B: IoBuf + Default + 'static>(
    write: &mut OwnedWriteHalf<TcpStream>,
    buf: B,
    stall: Duration,
) -> (bool, B) {
    match monoio::time::timeout(stall, write.write_all(buf)).await {
        Ok((res, buf)) => (res.is_ok(), buf),
        Err(_) => (false, B::default()),
    }
}

/// Owner -> peer: reads and decrypts what the owner sends, writes it (encrypted) to the peer.
/// At the owner's close_notify or EOF the peer gets close_notify and both connections end.
async fn mesh_to_peer(
    mut read: OwnedReadHalf<TcpStream>,
    mut peer: ToPeer,
    mesh_tls: MeshSession,
    early: BytesMut,
    fds: Fds,
    open: Rc<OpenForward>,
) {
    let stats = &open.0.stats;
    let mut buf = std::mem::take(&mut mesh_tls.borrow_mut().incoming);
    let mut plain = early;
    let mut still_open = true;
    loop {
        if !plain.is_empty() {
            stats.mesh_bytes(MeshDirection::Outbound, plain.len());
            let (ok, _) = peer.send(std::mem::take(&mut plain), false).await;
            if !ok {
                return fds.shut_all();
            }
        }
        if !still_open {
            break;
        }
        match read_into(&mut read, &mut buf, Some(&mesh_tls)).await {
            Ok(Some((n, open))) => {
                plain = buf.split_to(n);
                still_open = open;
            }
            Ok(None) => break,
            Err(()) => {
                tracing::warn!("mesh link to the owner failed");
                return fds.shut_all();
            }
        }
    }
    let _ = peer.send(BytesMut::new(), true).await;
    fds.shut_all();
}
