//! The mesh: node-to-node links that carry a peer's connection from the node it reached to
//! the node that owns its tunnel, so the peer never sees which node it reached.
//!
//! # Wire format
//!
//! One mesh connection carries exactly one peer connection. The forwarding node connects to the
//! owner's mesh address over TCP and then:
//!
//! 1. runs a TLS 1.3 handshake (rustls, ring; ALPN `iotunnel-mesh/1`, no resumption), mutually
//!    authenticated by the fleet CA: the owner presents its mesh certificate and requires one
//!    from the forwarding node; each verifies the other's chain to the fleet CA (`ca.pem`, the
//!    one every node installs from the database). Every node's mesh certificate (`mesh.pem`,
//!    issued by that CA, client and server auth) names only [`SERVER_NAME`], the name the
//!    forwarding node verifies: trust rests on the CA, not on the addresses nodes advertise.
//!    A connection that is not TLS, or whose certificate is missing or from another CA, is
//!    closed (after rustls's alert) and counted as the handshake failure `mesh_tls`.
//!
//! Everything below travels inside that TLS session:
//!
//! 2. one preamble line, ASCII, at most [`MAX_PREAMBLE`] bytes including its `\r\n`:
//!    ```text
//!    IOTUNNEL-MESH/1 {from_node} {to_node} {unix_ms} {nonce} {peer_addr} {mac}\r\n
//!    ```
//!    fields separated by one space:
//!    - `from_node`, `to_node`: node ids, 1 to [`MAX_NODE_ID`] bytes of visible ASCII (no space);
//!    - `unix_ms`: the forwarding node's wall clock, ms since the epoch, decimal;
//!    - `nonce`: 8 random bytes as 16 lowercase hex digits;
//!    - `peer_addr`: the peer's address as the forwarding node saw it (`1.2.3.4:5` or
//!      `[::1]:5`), reported as the peer's address on the owner;
//!    - `mac`: HMAC-SHA256 under the fleet's mesh key of every preceding field (the version
//!      `IOTUNNEL-MESH/1` included) joined by `\n`, as 64 lowercase hex digits.
//!
//!    The MAC is kept under TLS as a second, independent proof of fleet membership: a leaked
//!    CA key alone does not open the mesh, nor does the mesh key alone.
//! 3. the peer's upgrade request exactly as it arrived (decrypted when the relay serves TLS),
//!    then every byte the peer sent after it;
//! 4. from then on the bytes of both directions, unchanged, until either end closes (a
//!    close_notify, then the TCP close).
//!
//! The owner answers nothing to the preamble: it checks it (read within the handshake timeout,
//! MAC compared in constant time, `to_node` is its own id, `unix_ms` within [`MAX_SKEW_MS`] of
//! its clock, nonce not seen in that window) and closes the connection on any failure (counted
//! as the handshake failure `mesh_auth`). Then it runs the normal upgrade path over the mesh
//! link's TLS session: its 101 or HTTP refusal, and every frame after, travel back through
//! the forwarding node to the peer, and the connection is handed to the owner shard with that
//! session exactly like a peer's own TLS connection. A connection that arrived over the mesh
//! is never forwarded again: if this node does not own its tunnel, it is refused
//! `503 owner_unreachable`.
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use monoio::net::{TcpListener, TcpStream};
use subtle::ConstantTimeEq;

pub use super::tls::MeshTls;
use super::upgrade::{self, Accepted, Arrival, Conn};
use super::{pump, tls, ShardCtx};
use crate::clock::Millis;
use crate::token;

/// The server name every node's mesh certificate carries and forwarding nodes verify (one
/// name for the whole fleet: see the module documentation).
pub const SERVER_NAME: &str = crate::tls::MESH_SERVER_NAME;
/// The protocol name and version, the preamble's first field.
pub const VERSION: &str = "IOTUNNEL-MESH/1";
/// The longest preamble: the fields need about 320 bytes at most (two 64-byte node ids, a
/// bracketed IPv6 address with scope, a 64-digit MAC); the rest is slack.
pub const MAX_PREAMBLE: usize = 512;
/// The longest node id.
pub const MAX_NODE_ID: usize = 64;
/// How far a preamble's clock may be from ours: node clocks are NTP-synced to well under a
/// second; a minute tolerates a bad one while bounding how long a captured preamble is usable.
pub const MAX_SKEW_MS: i64 = 60_000;
/// Nonces remembered against replay: far more than the forwards a node makes in the two skew
/// windows a nonce must be remembered for; past this the oldest are forgotten first.
const REPLAY_CAPACITY: usize = 1 << 18;

/// This node's identity in the fleet and the fleet's mesh secret: what signs and checks
/// preambles.
#[derive(Clone)]
pub struct MeshIdentity {
    /// This node's id (as in the nodes table).
    pub node_id: String,
    /// The fleet-wide mesh secret (never logged).
    pub key: [u8; 32],
}

impl std::fmt::Debug for MeshIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshIdentity")
            .field("node_id", &self.node_id)
            .field("key", &"<hidden>")
            .finish()
    }
}

/// What a node needs on the mesh: its identity for preambles and its TLS for the links.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// This node's id and the fleet's mesh key.
    pub identity: MeshIdentity,
    /// Both ends of the mesh TLS, from the fleet CA and this node's mesh certificate.
    pub tls: MeshTls,
}

/// Whether `id` can be a node id in a preamble.
fn valid_node_id(id: &str) -> bool {
    (1..=MAX_NODE_ID).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Fails unless `id` can be a node id on the mesh.
pub fn check_node_id(id: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        valid_node_id(id),
        "node id {id:?} must be 1 to {MAX_NODE_ID} visible ASCII characters without spaces"
    );
    Ok(())
}

/// A verified preamble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    /// The forwarding node.
    pub from_node: String,
    /// The peer's address as the forwarding node saw it.
    pub peer: SocketAddr,
    /// The nonce, for replay detection.
    pub nonce: [u8; 8],
}

/// Why a preamble was rejected (all counted as `mesh_auth`; told apart in the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshRefusal {
    /// Not a preamble: wrong version, field count, or a field that does not parse.
    Malformed,
    /// The MAC does not match (wrong key, or altered fields).
    BadMac,
    /// The timestamp is too far from our clock.
    Stale,
    /// Meant for another node.
    WrongNode,
    /// The nonce was seen already.
    Replayed,
}

fn signed_fields(from: &str, to: &str, unix_ms: Millis, nonce: &str, peer: &str) -> String {
    format!("{VERSION}\n{from}\n{to}\n{unix_ms}\n{nonce}\n{peer}")
}

/// The preamble line (with its `\r\n`) from this node to `to_node` for a peer at `peer`.
pub fn encode_preamble(
    cfg: &MeshIdentity,
    to_node: &str,
    unix_ms: Millis,
    nonce: [u8; 8],
    peer: SocketAddr,
) -> String {
    let (from, nonce, peer) = (&cfg.node_id, hex::encode(nonce), peer.to_string());
    let mac = token::hmac_sha256(
        &cfg.key,
        signed_fields(from, to_node, unix_ms, &nonce, &peer).as_bytes(),
    );
    format!(
        "{VERSION} {from} {to_node} {unix_ms} {nonce} {peer} {}\r\n",
        hex::encode(mac)
    )
}

/// Checks one preamble line (without its `\r\n`) against our node id, key and clock.
pub fn verify_preamble(
    line: &[u8],
    cfg: &MeshIdentity,
    now_ms: Millis,
) -> Result<Preamble, MeshRefusal> {
    let line = std::str::from_utf8(line).map_err(|_| MeshRefusal::Malformed)?;
    let fields: Vec<&str> = line.split(' ').collect();
    let [version, from, to, unix_ms, nonce, peer, mac] = fields.as_slice() else {
        return Err(MeshRefusal::Malformed);
    };
    let nonce_bytes: [u8; 8] = hex::decode(nonce)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(MeshRefusal::Malformed)?;
    let mac: [u8; 32] = hex::decode(mac)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(MeshRefusal::Malformed)?;
    let at: Millis = unix_ms.parse().map_err(|_| MeshRefusal::Malformed)?;
    let peer_addr: SocketAddr = peer.parse().map_err(|_| MeshRefusal::Malformed)?;
    if *version != VERSION || !valid_node_id(from) || !valid_node_id(to) {
        return Err(MeshRefusal::Malformed);
    }
    let want = token::hmac_sha256(
        &cfg.key,
        signed_fields(from, to, at, nonce, peer).as_bytes(),
    );
    if !bool::from(want.ct_eq(&mac)) {
        return Err(MeshRefusal::BadMac);
    }
    if *to != cfg.node_id {
        return Err(MeshRefusal::WrongNode);
    }
    if now_ms.abs_diff(at) > MAX_SKEW_MS.unsigned_abs() {
        return Err(MeshRefusal::Stale);
    }
    Ok(Preamble {
        from_node: from.to_string(),
        peer: peer_addr,
        nonce: nonce_bytes,
    })
}

/// Nonces of recently accepted preambles: a captured preamble cannot be replayed while its
/// timestamp is still accepted.
#[derive(Default)]
struct ReplayCache {
    seen: HashSet<[u8; 8]>,
    order: VecDeque<(Millis, [u8; 8])>,
}

impl ReplayCache {
    /// Records `nonce`; false when it was seen already.
    fn first_use(&mut self, nonce: [u8; 8], now_ms: Millis) -> bool {
        // A nonce accepted at `t` carries a timestamp >= t - skew, accepted until t + 2 skew.
        while let Some(&(at, old)) = self.order.front() {
            if at + 2 * MAX_SKEW_MS >= now_ms && self.order.len() < REPLAY_CAPACITY {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
        if !self.seen.insert(nonce) {
            return false;
        }
        self.order.push_back((now_ms, nonce));
        true
    }
}

/// Accepts connections other nodes forward to this one (on one shard).
pub(super) async fn accept_loop(listener: TcpListener, ctx: Rc<ShardCtx>, state: Rc<pump::Shard>) {
    let replay = Rc::new(RefCell::new(ReplayCache::default()));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "mesh accept failed");
                monoio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        monoio::spawn(inbound(
            stream,
            from,
            ctx.clone(),
            state.clone(),
            replay.clone(),
        ));
    }
}

/// Reads the preamble line from the decrypted stream; returns it without its `\r\n`, leaving
/// the bytes after it in `conn.buffered`.
async fn read_preamble(conn: &mut Conn) -> Option<BytesMut> {
    loop {
        if let Some(end) = conn.buffered.windows(2).position(|w| w == b"\r\n") {
            if end + 2 > MAX_PREAMBLE {
                return None;
            }
            let mut line = conn.buffered.split_to(end + 2);
            line.truncate(end);
            return Some(line);
        }
        if conn.buffered.len() >= MAX_PREAMBLE {
            return None;
        }
        match upgrade::read_more(conn).await {
            Ok(true) => {}
            _ => return None,
        }
    }
}

/// Why a mesh connection was closed before its upgrade request was read.
enum Refused {
    /// No TLS, or no certificate from the fleet CA: `mesh_tls`.
    Tls(std::io::Error),
    /// The preamble did not verify (or was missing): `mesh_auth`.
    Auth(&'static str),
    /// The upgrade path refused it, counted there (or nothing to count).
    Upgrade,
}

/// One connection from another node: TLS handshake, preamble, then the normal upgrade and
/// hand-off with the mesh link's TLS session.
async fn inbound(
    stream: TcpStream,
    from: SocketAddr,
    ctx: Rc<ShardCtx>,
    state: Rc<pump::Shard>,
    replay: Rc<RefCell<ReplayCache>>,
) {
    let Some(cfg) = ctx.cfg.mesh.as_ref() else {
        return;
    };
    let handshake = async {
        let mut stream = stream;
        let mut buffered = BytesMut::new();
        // A failed handshake has sent rustls's alert, as far as the other end listens.
        let session = tls::accept(&mut stream, cfg.tls.server.clone(), &mut buffered)
            .await
            .map_err(Refused::Tls)?;
        let mut conn = Conn {
            stream,
            tls: Some(session),
            buffered,
            peer: from,
        };
        let Some(line) = read_preamble(&mut conn).await else {
            return Err(Refused::Auth("malformed"));
        };
        let now = ctx.clock.now_ms();
        let preamble = match verify_preamble(&line, &cfg.identity, now) {
            Ok(p) if replay.borrow_mut().first_use(p.nonce, now) => p,
            Ok(_) => return Err(Refused::Auth("replayed")),
            Err(e) => {
                tracing::info!(%from, reason = ?e, "mesh preamble refused");
                return Err(Refused::Auth("refused"));
            }
        };
        tracing::debug!(%from, from_node = %preamble.from_node, peer = %preamble.peer, "mesh connection");
        conn.peer = preamble.peer;
        match upgrade::accept(&mut conn, &ctx, Arrival::Mesh).await {
            Ok(Accepted::Local(up)) => Ok((conn, up)),
            // check() refuses a remote tunnel that arrived over the mesh.
            Ok(Accepted::Forward { .. }) => Err(Refused::Upgrade),
            Err(refusal) => {
                ctx.stats
                    .handshake_failed(refusal.map_or("tls_or_io", upgrade::Refusal::label));
                Err(Refused::Upgrade)
            }
        }
    };
    let result = monoio::time::timeout(ctx.cfg.handshake_timeout, handshake).await;
    match result {
        Ok(Ok((conn, up))) => super::hand_off(&ctx, &state, conn, up),
        Ok(Err(Refused::Tls(e))) => {
            ctx.stats.handshake_failed("mesh_tls");
            tracing::info!(%from, error = %e, "mesh TLS handshake failed");
        }
        Ok(Err(Refused::Auth(why))) => {
            ctx.stats.handshake_failed("mesh_auth");
            tracing::info!(%from, why, "mesh connection refused");
        }
        Ok(Err(Refused::Upgrade)) => {}
        Err(_) => ctx.stats.handshake_failed("timeout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(node: &str, key: u8) -> MeshIdentity {
        MeshIdentity {
            node_id: node.into(),
            key: [key; 32],
        }
    }

    const NOW: Millis = 1_800_000_000_000;

    fn line(p: &str) -> &[u8] {
        p.strip_suffix("\r\n").unwrap().as_bytes()
    }

    #[test]
    fn a_preamble_verifies_on_its_node_only() {
        let peer: SocketAddr = "[2001:db8::1]:40000".parse().unwrap();
        let p = encode_preamble(&cfg("a", 7), "b", NOW, [9; 8], peer);
        assert!(p.len() <= MAX_PREAMBLE && p.ends_with("\r\n"));
        let got = verify_preamble(line(&p), &cfg("b", 7), NOW + 1000).unwrap();
        assert_eq!((got.from_node.as_str(), got.peer), ("a", peer));
        assert_eq!(
            verify_preamble(line(&p), &cfg("c", 7), NOW),
            Err(MeshRefusal::WrongNode)
        );
        assert_eq!(
            verify_preamble(line(&p), &cfg("b", 8), NOW),
            Err(MeshRefusal::BadMac)
        );
        assert_eq!(
            verify_preamble(line(&p), &cfg("b", 7), NOW + MAX_SKEW_MS + 1),
            Err(MeshRefusal::Stale)
        );
        assert_eq!(
            verify_preamble(line(&p), &cfg("b", 7), NOW - MAX_SKEW_MS - 1),
            Err(MeshRefusal::Stale)
        );
    }

    #[test]
    fn altered_or_garbage_preambles_are_refused() {
        let peer: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let p = encode_preamble(&cfg("a", 7), "b", NOW, [1; 8], peer);
        let b = cfg("b", 7);
        let spoofed = p.replace("10.0.0.1:1", "10.0.0.2:1");
        assert_eq!(
            verify_preamble(line(&spoofed), &b, NOW),
            Err(MeshRefusal::BadMac)
        );
        let garbage: &[&[u8]] = &[
            b"",
            b"GET / HTTP/1.1",
            b"\xff\xfe",
            b"IOTUNNEL-MESH/1 a b 1 00 1.2.3.4:5 00",
            b"IOTUNNEL-MESH/1 a b x 0000000000000000 1.2.3.4:5 aa",
            b"IOTUNNEL-MESH/2  b 1 0000000000000000 1.2.3.4:5 aa",
        ];
        for g in garbage {
            assert_eq!(verify_preamble(g, &b, NOW), Err(MeshRefusal::Malformed));
        }
        assert!(check_node_id("node 1").is_err() && check_node_id("").is_err());
        assert!(check_node_id("node-1.eu").is_ok());
    }

    #[test]
    fn a_nonce_is_accepted_once_within_the_window() {
        let mut cache = ReplayCache::default();
        assert!(cache.first_use([1; 8], NOW));
        assert!(!cache.first_use([1; 8], NOW + 1));
        assert!(cache.first_use([2; 8], NOW + 1));
        // Long after, the first is forgotten (its timestamp would be stale by now).
        assert!(cache.first_use([1; 8], NOW + 3 * MAX_SKEW_MS));
    }

    #[test]
    fn the_key_is_not_in_debug_output() {
        let shown = format!("{:?}", cfg("a", 0xab));
        assert!(shown.contains("\"a\"") && !shown.contains("171"), "{shown}");
    }
}
