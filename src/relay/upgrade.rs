//! The relay's front door: TLS handshake, the HTTP upgrade request (httparse, at most 4 KiB,
//! absolute-form targets allowed), token and side checks, and a refusal as a plain HTTP
//! response with the JSON error envelope when anything is wrong.
//!
//! Routes (DESIGN.md): AWS family `GET /tunnel?local-proxy-mode=source|destination` with the
//! token in `access-token` (or cookie `awsiot-tunnel-token`) and subprotocol
//! `aws.iot.securetunneling-{1.0,2.0,3.0}`; Alibaba family `GET /tunnel/{id}/source|device`
//! with `tunnel-access-token` and subprotocol `aliyun.iot.securetunnel-v1.1` in
//! `Sec-WebSocket-Protocol` or a plain `subprotocol` header.
//!
//! Fleet mode: a tunnel owned by another node passes the same checks (all but the family lock,
//! which its owner takes), then no 101 is written here: the caller forwards the request to the
//! owner over the mesh ([`super::forward`]), whose answer reaches the peer unchanged.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::proto::aws::ProtocolVersion;
use crate::proto::{aliyun, ws};
use crate::seam::{Family, IndexedTunnel, Side};
use crate::token;

use super::tls::ServerSession;
use super::ShardCtx;

/// The upgrade request may be at most 4 KiB (PROTOCOLS.md).
pub const MAX_REQUEST: usize = 4096;
/// Ciphertext read per call while reading the request: the request and a few records after.
const REQUEST_READ: usize = 8 * 1024;
/// Ciphertext read per call in a forward's splice, and the most a pump reads at once.
pub const CIPHER_READ: usize = 64 * 1024;

/// An accepted socket with its TLS session (past its handshake) and whatever plaintext was
/// read past the request.
pub struct Conn {
    /// The socket.
    pub stream: TcpStream,
    /// The TLS session: the peer's (unless the relay serves plaintext), or for a connection
    /// that arrived over the mesh, the mesh link's. Ciphertext read past the last whole record
    /// travels in it.
    pub tls: Option<Box<ServerSession>>,
    /// Plaintext already read and not yet consumed (bytes after the upgrade request).
    pub buffered: BytesMut,
    /// The peer's address.
    pub peer: SocketAddr,
}

/// What an accepted upgrade asked for.
#[derive(Debug)]
pub struct Upgrade {
    /// The tunnel.
    pub tunnel: Arc<IndexedTunnel>,
    /// The side the token belongs to.
    pub side: Side,
    /// The protocol family.
    pub family: Family,
    /// The AWS protocol version, for the AWS family.
    pub aws_version: Option<ProtocolVersion>,
    /// The connection arrived over the mesh from another node.
    pub via_mesh: bool,
}

/// How a connection reached this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Straight from the peer, on the relay port.
    Direct,
    /// Forwarded by another node over the mesh (never forwarded again).
    Mesh,
}

/// What an accepted upgrade request leads to.
#[derive(Debug)]
pub enum Accepted {
    /// Answered 101: the connection is pumped on this node.
    Local(Upgrade),
    /// The tunnel is owned by another node: nothing was answered; forward the request head
    /// (and `Conn::buffered` after it) to `owner_node`.
    Forward {
        /// The owner node's id.
        owner_node: Arc<str>,
        /// The upgrade request exactly as the peer sent it.
        head: BytesMut,
    },
}

/// Why an upgrade was refused; each is a metric label too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: not HTTP, not GET, or over 4 KiB.
    MalformedRequest,
    /// 400: not a tunnel path.
    BadPath,
    /// 400: no supported subprotocol.
    BadSubprotocol,
    /// 400: more than one token.
    AmbiguousToken,
    /// 401: no token or an unknown one.
    UnknownToken,
    /// 403: the token of the other side, or of another tunnel.
    WrongSide,
    /// 409: the tunnel is closed or expired.
    TunnelClosed,
    /// 409: the other side speaks the other family.
    FamilyMismatch,
    /// 426: not a WebSocket upgrade.
    NotUpgrade,
    /// 503: another node owns the tunnel and cannot be reached now.
    OwnerUnreachable,
}

impl Refusal {
    /// Every refusal, for metric series created at start.
    pub const ALL: [Refusal; 10] = [
        Refusal::MalformedRequest,
        Refusal::BadPath,
        Refusal::BadSubprotocol,
        Refusal::AmbiguousToken,
        Refusal::UnknownToken,
        Refusal::WrongSide,
        Refusal::TunnelClosed,
        Refusal::FamilyMismatch,
        Refusal::NotUpgrade,
        Refusal::OwnerUnreachable,
    ];

    /// HTTP status, envelope code and message.
    pub fn describe(self) -> (u16, &'static str, &'static str) {
        match self {
            Refusal::MalformedRequest => (400, "malformed_request", "malformed upgrade request"),
            Refusal::BadPath => (
                400,
                "bad_path",
                "use /tunnel?local-proxy-mode=source|destination or /tunnel/{id}/source|device",
            ),
            Refusal::BadSubprotocol => (
                400,
                "bad_subprotocol",
                "no supported WebSocket subprotocol offered",
            ),
            Refusal::AmbiguousToken => (
                400,
                "ambiguous_token",
                "exactly one access token is allowed",
            ),
            Refusal::UnknownToken => (401, "unknown_token", "missing or unknown access token"),
            Refusal::WrongSide => (
                403,
                "wrong_side",
                "the token belongs to the other side of the tunnel, or to another tunnel",
            ),
            Refusal::TunnelClosed => (409, "tunnel_closed", "the tunnel is closed"),
            Refusal::FamilyMismatch => (
                409,
                "family_mismatch",
                "the other side of this tunnel speaks the other protocol family",
            ),
            Refusal::NotUpgrade => (
                426,
                "upgrade_required",
                "the relay only accepts WebSocket upgrades",
            ),
            Refusal::OwnerUnreachable => (
                503,
                "owner_unreachable",
                "the node serving this tunnel cannot be reached; try again",
            ),
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        self.describe().1
    }
}

/// A parsed upgrade request, before the token is checked.
struct Request {
    family: Family,
    side: Side,
    path_tunnel: Option<String>,
    tokens: Vec<String>,
    ws_key: Option<String>,
    is_upgrade: bool,
    aws_version: Option<ProtocolVersion>,
    aliyun_via: Option<&'static str>,
}

/// Reads more plaintext into `conn.buffered`; Ok(false) at end of stream.
pub async fn read_more(conn: &mut Conn) -> std::io::Result<bool> {
    match conn.tls.as_mut() {
        None => {
            conn.buffered.reserve(4096);
            let buf = std::mem::take(&mut conn.buffered);
            let len = buf.len();
            let cap = buf.capacity();
            let (res, slice) = conn
                .stream
                .read(monoio::buf::IoBufMut::slice_mut(buf, len..cap))
                .await;
            conn.buffered = slice.into_inner();
            Ok(res? > 0)
        }
        Some(tls) => {
            let mut cipher = std::mem::take(&mut tls.incoming);
            cipher.reserve(REQUEST_READ);
            let len = cipher.len();
            let cap = cipher.capacity();
            let (res, slice) = conn
                .stream
                .read(monoio::buf::IoBufMut::slice_mut(cipher, len..cap))
                .await;
            let mut cipher = slice.into_inner();
            let n = res?;
            let opened = tls.open_in_place(&mut cipher, 0);
            let plain = *opened.as_ref().unwrap_or(&0);
            conn.buffered.extend_from_slice(&cipher[..plain]);
            let _ = cipher.split_to(plain);
            tls.incoming = cipher;
            let closed = tls.peer_closed();
            if tls.wants_write() {
                // A key update to answer, or the alert for what failed.
                flush_tls(conn).await?;
            }
            opened?;
            // Progress: more ciphertext, and the stream still open or more plaintext.
            Ok(n > 0 && (!closed || plain > 0))
        }
    }
}

/// Writes whatever the TLS session has pending (key updates, alerts).
pub(super) async fn flush_tls(conn: &mut Conn) -> std::io::Result<()> {
    if let Some(tls) = conn.tls.as_mut() {
        let mut out = Vec::new();
        tls.flush(&mut out);
        if !out.is_empty() {
            let (res, _) = conn.stream.write_all(out).await;
            res?;
        }
    }
    Ok(())
}

/// Writes `plain` to the peer, through TLS when there is a session.
pub async fn write_plain(conn: &mut Conn, plain: &[u8]) -> std::io::Result<()> {
    let out = match conn.tls.as_mut() {
        Some(tls) => {
            let mut out = Vec::new();
            tls.seal(plain, &mut out)?;
            out
        }
        None => plain.to_vec(),
    };
    let (res, _) = conn.stream.write_all(out).await;
    res.map(drop)
}

/// Reads the upgrade request (past the TLS handshake); answers 101 or a refusal, or (for a
/// tunnel owned by another node, arrived directly) answers nothing and says where to forward.
pub async fn accept(
    conn: &mut Conn,
    ctx: &ShardCtx,
    arrival: Arrival,
) -> Result<Accepted, Option<Refusal>> {
    let head_len = loop {
        if let Some(end) = find_head_end(&conn.buffered) {
            break end;
        }
        if conn.buffered.len() > MAX_REQUEST {
            return refuse(conn, Refusal::MalformedRequest).await;
        }
        match read_more(conn).await {
            Ok(true) => {}
            _ => return Err(None),
        }
    };
    if head_len > MAX_REQUEST {
        return refuse(conn, Refusal::MalformedRequest).await;
    }
    let head = conn.buffered.split_to(head_len);
    let req = match parse_request(&head) {
        Ok(r) => r,
        Err(refusal) => return refuse(conn, refusal).await,
    };
    match check_with_grace(&req, ctx, arrival).await {
        Ok(upgrade) => {
            if let Some(owner_node) = upgrade.tunnel.owner_node.clone() {
                // check() refuses a mesh arrival for a remote tunnel: this one came directly.
                return Ok(Accepted::Forward { owner_node, head });
            }
            let mut resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\nchannel-id: {}\r\n",
                ws::accept_key(req.ws_key.as_deref().unwrap_or_default()),
                hex::encode(token::random_bytes::<8>()),
            );
            match (upgrade.aws_version, req.aliyun_via) {
                (Some(v), _) => {
                    resp.push_str(&format!("Sec-WebSocket-Protocol: {}\r\n", v.subprotocol()))
                }
                (None, Some(header)) => {
                    resp.push_str(&format!("{header}: {}\r\n", aliyun::SUBPROTOCOL))
                }
                (None, None) => {}
            }
            resp.push_str("\r\n");
            write_plain(conn, resp.as_bytes()).await.map_err(|_| None)?;
            Ok(Accepted::Local(upgrade))
        }
        Err(refusal) => refuse(conn, refusal).await,
    }
}

/// Answers `refusal` as an HTTP error with the JSON envelope, then ends TLS; always `Err`.
pub async fn refuse<T>(conn: &mut Conn, refusal: Refusal) -> Result<T, Option<Refusal>> {
    let (status, code, message) = refusal.describe();
    let request_id = format!("req_{}", hex::encode(token::random_bytes::<8>()));
    let body =
        serde_json::json!({"error": {"code": code, "message": message, "request_id": request_id}})
            .to_string();
    let reason = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        409 => "Conflict",
        503 => "Service Unavailable",
        _ => "Upgrade Required",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    tracing::info!(peer = %conn.peer, %request_id, code, "relay upgrade refused");
    let _ = write_plain(conn, resp.as_bytes()).await;
    if let Some(tls) = conn.tls.as_mut() {
        let mut out = Vec::new();
        tls.close(&mut out);
        let _ = conn.stream.write_all(out).await;
    }
    Err(Some(refusal))
}

/// The length of the request head at the start of `buf` (through its blank line), if complete.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Parses a request head without the tunnel index: the family and side it asks for, whether it
/// is a WebSocket upgrade with a valid key, and its tokens (the pure part of [`accept`], fuzzed).
pub fn parse_head(head: &[u8]) -> Result<ParsedHead, Refusal> {
    let req = parse_request(head)?;
    Ok(ParsedHead {
        family: req.family,
        side: req.side,
        is_upgrade: req.is_upgrade && req.ws_key.as_deref().is_some_and(ws::is_valid_client_key),
        tokens: req.tokens,
        subprotocol_offered: req.aws_version.is_some() || req.aliyun_via.is_some(),
    })
}

/// What [`parse_head`] found in a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedHead {
    /// The protocol family its path names.
    pub family: Family,
    /// The side its path names.
    pub side: Side,
    /// A WebSocket version 13 upgrade with a valid `Sec-WebSocket-Key`.
    pub is_upgrade: bool,
    /// Every token it carries (exactly one is accepted).
    pub tokens: Vec<String>,
    /// It offers a subprotocol of its family.
    pub subprotocol_offered: bool,
}

fn parse_request(head: &[u8]) -> Result<Request, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Refusal::MalformedRequest),
    }
    if req.method != Some("GET") {
        return Err(Refusal::MalformedRequest);
    }
    let target = req.path.ok_or(Refusal::MalformedRequest)?;
    // Absolute form (RFC 9112 3.2.2): scheme://authority/path?query.
    let origin_form = match target.find("://") {
        Some(i) => {
            let rest = &target[i + 3..];
            rest.find('/').map_or("/", |j| &rest[j..])
        }
        None => target,
    };
    let (path, query) = origin_form.split_once('?').unwrap_or((origin_form, ""));
    let headers: &[httparse::Header<'_>] = req.headers;
    fn values<'h>(
        headers: &'h [httparse::Header<'h>],
        name: &'h str,
    ) -> impl Iterator<Item = &'h str> + 'h {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    }
    let header = |name: &'static str| values(headers, name);
    let (family, side, path_tunnel) = if path == "/tunnel" {
        let mode = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("local-proxy-mode="))
            .ok_or(Refusal::BadPath)?;
        let side = match mode {
            "source" => Side::Client,
            "destination" => Side::Device,
            _ => return Err(Refusal::BadPath),
        };
        (Family::Aws, side, None)
    } else {
        let rest = path.strip_prefix("/tunnel/").ok_or(Refusal::BadPath)?;
        let (id, which) = rest.split_once('/').ok_or(Refusal::BadPath)?;
        let side = match which {
            "source" => Side::Client,
            "device" => Side::Device,
            _ => return Err(Refusal::BadPath),
        };
        if id.is_empty() || id.len() > 64 {
            return Err(Refusal::BadPath);
        }
        (Family::Aliyun, side, Some(id.to_string()))
    };
    let is_upgrade = header("upgrade").any(|v| v.eq_ignore_ascii_case("websocket"))
        && header("connection").any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
        && header("sec-websocket-version").any(|v| v == "13");
    let ws_key = header("sec-websocket-key").next().map(str::to_string);
    let mut tokens: Vec<String> = Vec::new();
    let mut aws_version = None;
    let mut aliyun_via = None;
    match family {
        Family::Aws => {
            tokens.extend(header("access-token").map(str::to_string));
            for cookie in header("cookie") {
                for pair in cookie.split(';') {
                    if let Some(v) = pair.trim().strip_prefix("awsiot-tunnel-token=") {
                        tokens.push(v.to_string());
                    }
                }
            }
            aws_version = header("sec-websocket-protocol").find_map(ProtocolVersion::select);
        }
        Family::Aliyun => {
            tokens.extend(header(aliyun::TOKEN_HEADER).map(str::to_string));
            let offered =
                |name| header(name).any(|v| v.split(',').any(|p| p.trim() == aliyun::SUBPROTOCOL));
            if offered("sec-websocket-protocol") {
                aliyun_via = Some("Sec-WebSocket-Protocol");
            } else if offered(aliyun::SUBPROTOCOL_FALLBACK_HEADER) {
                aliyun_via = Some(aliyun::SUBPROTOCOL_FALLBACK_HEADER);
            }
        }
    }
    Ok(Request {
        family,
        side,
        path_tunnel,
        tokens,
        ws_key,
        is_upgrade,
        aws_version,
        aliyun_via,
    })
}

/// How often an unknown token is looked up again during [`RelayConfig::unknown_token_grace`].
const GRACE_POLL: Duration = Duration::from_millis(10);

/// [`check`], looking an unknown token up again for a short while in a fleet: a tunnel created
/// through another node's API reaches this node's index over the bus a few milliseconds after
/// its 201, and its peers may dial that fast. A guessed token just waits longer for its 401.
async fn check_with_grace(
    req: &Request,
    ctx: &ShardCtx,
    arrival: Arrival,
) -> Result<Upgrade, Refusal> {
    let deadline = Instant::now() + ctx.cfg.unknown_token_grace;
    loop {
        match check(req, ctx, arrival) {
            Err(Refusal::UnknownToken) if !req.tokens.is_empty() && Instant::now() < deadline => {
                monoio::time::sleep(GRACE_POLL).await
            }
            other => return other,
        }
    }
}

fn check(req: &Request, ctx: &ShardCtx, arrival: Arrival) -> Result<Upgrade, Refusal> {
    if !req.is_upgrade {
        return Err(Refusal::NotUpgrade);
    }
    if !req.ws_key.as_deref().is_some_and(ws::is_valid_client_key) {
        return Err(Refusal::MalformedRequest);
    }
    let token = match req.tokens.as_slice() {
        [] => return Err(Refusal::UnknownToken),
        [one] => one,
        _ => return Err(Refusal::AmbiguousToken),
    };
    let hash = token::hash_secret(token);
    let found = match ctx.index.lookup(&hash) {
        Some(found) => found,
        None if ctx.index.is_closed_token(&hash) => return Err(Refusal::TunnelClosed),
        None => return Err(Refusal::UnknownToken),
    };
    if let Some(id) = &req.path_tunnel {
        if id.as_str() != &*found.tunnel.tunnel_id {
            return Err(Refusal::WrongSide);
        }
    }
    if found.side != req.side {
        return Err(Refusal::WrongSide);
    }
    if found.tunnel.expires_at <= ctx.clock.now_ms() {
        return Err(Refusal::TunnelClosed);
    }
    match req.family {
        Family::Aws if req.aws_version.is_none() => return Err(Refusal::BadSubprotocol),
        Family::Aliyun if req.aliyun_via.is_none() => return Err(Refusal::BadSubprotocol),
        _ => {}
    }
    match (&found.tunnel.owner_node, arrival) {
        // Only the owner locks the family: a lock taken here would go unseen there.
        (None, _) => found
            .tunnel
            .family
            .lock(req.family)
            .map_err(|_| Refusal::FamilyMismatch)?,
        // A forwarded connection is never forwarded again (no loops between nodes that
        // disagree about the owner for a moment).
        (Some(_), Arrival::Mesh) => return Err(Refusal::OwnerUnreachable),
        (Some(_), Arrival::Direct) => {}
    }
    Ok(Upgrade {
        tunnel: found.tunnel,
        side: found.side,
        family: req.family,
        aws_version: req.aws_version,
        via_mesh: arrival == Arrival::Mesh,
    })
}
