//! Reaching the relay as an AWS V3 peer, shared by the device agent and the client: where the
//! relay is, which certificates to trust, the upgrade, and what a refusal or a close means.
//!
//! ```text
//!  GET wss://{host:port}/tunnel?local-proxy-mode=source|destination
//!  access-token: <token>                       (never logged)
//!  Sec-WebSocket-Protocol: aws.iot.securetunneling-3.0
//!  <- 101, then SERVICE_IDS [services] in a frame of its own
//! ```
//!
//! An HTTP 4xx answer is final (PROTOCOLS.md: the client must not retry), except 408 and 429;
//! 5xx and network errors are retried by the caller with [`Backoff`].
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use anyhow::{bail, Context};
use base64::Engine as _;
use bytes::BytesMut;
use rand::Rng;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::wire::{Incoming, Reader};
use crate::config::Secret;
use crate::proto::aws::{MessageType, Side};
use crate::proto::ws;

/// The subprotocol our peers speak: AWS V3 (multiplexed connections, PROTOCOLS.md 1).
pub const SUBPROTOCOL: &str = "aws.iot.securetunneling-3.0";

/// How long the TCP connect, TLS and WebSocket handshakes, and the first SERVICE_IDS may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest HTTP answer head (status line and headers) taken from the relay.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Longest error body read from a refused upgrade.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// First wait after a failed relay connection.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between relay reconnects (the issue caps backoff at 30 s).
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where the relay listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `wss` (true) or `ws`.
    pub tls: bool,
    /// Host name or IP address, without brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Endpoint {
    /// Parses `wss://host:port[/path]`, `ws://host:port[/path]` or `host:port` (TLS).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let (tls, rest) = if let Some(rest) = text.strip_prefix("wss://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("ws://") {
            (false, rest)
        } else if text.contains("://") {
            bail!("the relay URL must start with wss:// or ws://: {text}");
        } else {
            (true, text)
        };
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, port) = v6
                    .split_once("]:")
                    .with_context(|| format!("expected [host]:port in {text}"))?;
                // Brackets hold an IPv6 address and nothing else (RFC 3986 3.2.2).
                if host.parse::<std::net::Ipv6Addr>().is_err() {
                    bail!("not an IPv6 address in brackets: {text}");
                }
                (host, port)
            }
            None => authority
                .rsplit_once(':')
                .with_context(|| format!("expected host:port in {text}"))?,
        };
        if host.is_empty() {
            bail!("no host in {text}");
        }
        // A colon or bracket left in a host is a mangled IPv6 address (found by fuzzing:
        // `ws://_::1]:1]:80` gave the host `_::1]:1]`).
        if host.contains(['[', ']']) || (!authority.starts_with('[') && host.contains(':')) {
            bail!("bad host in {text}; an IPv6 address goes in brackets");
        }
        let port = port
            .parse()
            .with_context(|| format!("bad port in {text}"))?;
        Ok(Self {
            tls,
            host: host.to_string(),
            port,
        })
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub fn host_port(&self) -> String {
        crate::config::host_port(&self.host, self.port)
    }

    /// The AWS-family tunnel path for `side`.
    fn tunnel_path(&self, side: Side) -> &'static str {
        match side {
            Side::Source => "/tunnel?local-proxy-mode=source",
            Side::Destination => "/tunnel?local-proxy-mode=destination",
        }
    }
}

pub use crate::tls::client_config as tls_config;

/// A relay connection right after the upgrade.
pub struct Connected {
    /// The tunnel's services, from SERVICE_IDS.
    pub services: Vec<String>,
    /// The relay's frames, from the one after SERVICE_IDS.
    pub(super) reader: Reader<ReadHalf<RelayIo>>,
    /// Where our frames go.
    pub(super) writer: WriteHalf<RelayIo>,
}

/// The byte stream under the relay WebSocket.
pub enum RelayIo {
    /// `ws://`.
    Plain(TcpStream),
    /// `wss://`.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for RelayIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RelayIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why dialing the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The relay answered the upgrade with an HTTP error.
    #[error("the relay refused the connection: {message} ({code}, HTTP {status})")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The error envelope's code (`unknown_token`, `tunnel_closed`, ...).
        code: String,
        /// The error envelope's message.
        message: String,
    },
    /// The network, TLS, or a malformed answer.
    #[error("cannot reach the relay at {endpoint}: {error}")]
    Network {
        /// `host:port`.
        endpoint: String,
        /// What went wrong.
        error: anyhow::Error,
    },
}

impl DialError {
    /// True when retrying with the same token cannot help (HTTP 4xx but 408 and 429).
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Refused { status, .. }
            if (400..500).contains(status) && *status != 408 && *status != 429)
    }

    /// True when the relay says the tunnel is closed (HTTP 409 `tunnel_closed`).
    pub fn tunnel_closed(&self) -> bool {
        matches!(self, Self::Refused { status: 409, code, .. } if code == "tunnel_closed")
    }
}

/// Connects to the relay as `side` with `token` and reads the first SERVICE_IDS.
pub async fn dial(
    endpoint: &Endpoint,
    side: Side,
    token: &Secret,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Connected, DialError> {
    let network = |error: anyhow::Error| DialError::Network {
        endpoint: endpoint.host_port(),
        error,
    };
    if !token.0.bytes().all(|b| b.is_ascii_graphic()) || token.0.is_empty() {
        return Err(network(anyhow::anyhow!(
            "the token is not a valid header value"
        )));
    }
    let upgrade = async {
        let mut io = connect(endpoint, tls).await.map_err(network)?;
        let leftover = upgrade(&mut io, endpoint, side, token).await?;
        Ok::<_, DialError>((io, leftover))
    };
    let (io, leftover) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, upgrade).await {
        Err(_) => return Err(network(anyhow::anyhow!("handshake timed out"))),
        Ok(r) => r?,
    };
    let (read, write) = tokio::io::split(io);
    let mut reader = Reader::new(read, leftover);
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, first_message(&mut reader)).await;
    let services = match first {
        Err(_) => return Err(network(anyhow::anyhow!("no SERVICE_IDS from the relay"))),
        Ok(r) => r.map_err(network)?,
    };
    Ok(Connected {
        services,
        reader,
        writer: write,
    })
}

/// The TCP connection (no Nagle: tunnel messages are written whole) and the TLS handshake.
async fn connect(endpoint: &Endpoint, tls: &Arc<rustls::ClientConfig>) -> anyhow::Result<RelayIo> {
    let tcp = TcpStream::connect(endpoint.host_port()).await?;
    tcp.set_nodelay(true)?;
    if !endpoint.tls {
        return Ok(RelayIo::Plain(tcp));
    }
    let name = ServerName::try_from(endpoint.host.clone())
        .with_context(|| format!("{} is not a valid server name", endpoint.host))?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| {
            if crate::tls::is_unknown_issuer(&e) {
                anyhow::anyhow!(
                    "{e}: the relay's certificate is signed by a CA this program does not \
                     trust; {}",
                    crate::tls::CA_FILE_HINT
                )
            } else {
                e.into()
            }
        })?;
    Ok(RelayIo::Tls(Box::new(stream)))
}

/// Sends the upgrade request and reads the answer; returns the bytes read past it.
async fn upgrade(
    io: &mut RelayIo,
    endpoint: &Endpoint,
    side: Side,
    token: &Secret,
) -> Result<BytesMut, DialError> {
    let network = |error: anyhow::Error| DialError::Network {
        endpoint: endpoint.host_port(),
        error,
    };
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\naccess-token: {token}\r\n\
         User-Agent: iotunnel/{version}\r\n\r\n",
        path = endpoint.tunnel_path(side),
        host = endpoint.host_port(),
        token = token.0,
        version = env!("CARGO_PKG_VERSION"),
    );
    io.write_all(request.as_bytes())
        .await
        .map_err(|e| network(e.into()))?;
    io.flush().await.map_err(|e| network(e.into()))?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let parsed = response
            .parse(&buf)
            .map_err(|e| network(anyhow::anyhow!("malformed HTTP answer: {e}")))?;
        if let httparse::Status::Complete(len) = parsed {
            let status = response.code.unwrap_or_default();
            let header = |name: &str| {
                response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(str::trim)
            };
            if status != 101 {
                let reason = response.reason.unwrap_or("refused").to_string();
                let body_len = header("content-length")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0)
                    .min(MAX_ERROR_BODY);
                let _ = buf.split_to(len);
                return Err(refusal(status, reason, io, buf, body_len).await);
            }
            if header("sec-websocket-accept") != Some(ws::accept_key(&key).as_str()) {
                return Err(network(anyhow::anyhow!(
                    "the relay answered the upgrade with a wrong Sec-WebSocket-Accept"
                )));
            }
            match header("sec-websocket-protocol") {
                Some(SUBPROTOCOL) => {}
                other => {
                    return Err(network(anyhow::anyhow!(
                        "the relay chose the subprotocol {other:?}, not {SUBPROTOCOL}"
                    )))
                }
            }
            let _ = buf.split_to(len);
            return Ok(buf);
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(network(anyhow::anyhow!(
                "the relay's HTTP answer is too long"
            )));
        }
        if io.read_buf(&mut buf).await.map_err(|e| network(e.into()))? == 0 {
            return Err(network(anyhow::anyhow!(
                "the relay closed the connection during the upgrade"
            )));
        }
    }
}

/// A refused upgrade: reads the error body (`{"error": {"code", "message"}}`) if there is one.
async fn refusal(
    status: u16,
    reason: String,
    io: &mut RelayIo,
    mut body: BytesMut,
    body_len: usize,
) -> DialError {
    while body.len() < body_len {
        match io.read_buf(&mut body).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let json: serde_json::Value =
        serde_json::from_slice(&body[..body.len().min(body_len)]).unwrap_or_default();
    let text = |key: &str| json["error"][key].as_str().unwrap_or("-").to_string();
    DialError::Refused {
        status,
        code: text("code"),
        message: match json["error"]["message"].as_str() {
            Some(m) => m.to_string(),
            None => reason,
        },
    }
}

/// Reads the relay's first message; returns the services when it is SERVICE_IDS (consumed),
/// or none when the first message is another (left for the session).
async fn first_message<R: AsyncRead + Unpin>(
    reader: &mut Reader<R>,
) -> anyhow::Result<Vec<String>> {
    loop {
        match reader.next().await? {
            Incoming::Message(m) if m.r#type == MessageType::ServiceIds as i32 => {
                return Ok(m.available_service_ids)
            }
            Incoming::Message(m) => {
                reader.put_back(m);
                return Ok(Vec::new());
            }
            Incoming::Close(frame) => {
                bail!(
                    "the relay closed the connection: {}",
                    describe_close(&frame)
                )
            }
            Incoming::Ping(_) | Incoming::Pong => {}
        }
    }
}

/// `code reason` of a close frame, for messages.
pub fn describe_close(frame: &Option<(u16, String)>) -> String {
    match frame {
        Some((code, reason)) => format!("close {code} {reason}").trim().to_string(),
        None => "close without a code".into(),
    }
}

/// How a relay connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The tunnel is closed (close 1000, reason naming closed, expired or device_deleted).
    TunnelClosed(String),
    /// The relay ended this connection for good: the token was rotated, or a newer connection
    /// of the same side replaced it.
    Superseded(String),
    /// The network failed or the relay went away: reconnect with the same token.
    Lost(String),
    /// We ended it ourselves.
    Local,
}

impl SessionEnd {
    /// Classifies the relay's close frame.
    pub fn of_close(frame: &Option<(u16, String)>) -> Self {
        let Some((code, reason)) = frame else {
            return Self::Lost("closed without a code".into());
        };
        let (code, reason) = (*code, reason.clone());
        let closed = ["closed", "expired", "device_deleted"]
            .iter()
            .any(|word| reason.contains(word));
        if code == 1000 && closed {
            Self::TunnelClosed(reason)
        } else if (code == 1000 && reason.contains("replaced")) || reason.contains("rotated") {
            Self::Superseded(reason)
        } else {
            Self::Lost(describe_close(frame))
        }
    }
}

/// Jittered exponential backoff between relay reconnects.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: FIRST_BACKOFF,
        }
    }
}

impl Backoff {
    /// Starts over after a connection that worked.
    pub fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }

    /// Sleeps for the next interval (full jitter over its upper half), then doubles it.
    pub async fn wait(&mut self) {
        let wait = rand::thread_rng().gen_range(self.next / 2..=self.next);
        tokio::time::sleep(wait).await;
        self.next = (self.next * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("wss://relay.example:8443/tunnel/abc/source").unwrap();
        assert_eq!(
            (e.tls, e.host.as_str(), e.port),
            (true, "relay.example", 8443)
        );
        let e = Endpoint::parse("ws://[::1]:9000").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (false, "::1", 9000));
        assert_eq!(e.host_port(), "[::1]:9000");
        assert_eq!(
            e.tunnel_path(Side::Source),
            "/tunnel?local-proxy-mode=source"
        );
        let e = Endpoint::parse("localhost:8443").unwrap();
        assert!(e.tls);
        for bad in ["http://x:1", "wss://x", "wss://:1/", "x:notaport"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn closes_are_classified() {
        let close = |code: u16, reason: &str| Some((code, reason.to_string()));
        for reason in ["tunnel closed", "tunnel expired", "tunnel device_deleted"] {
            assert!(matches!(
                SessionEnd::of_close(&close(1000, reason)),
                SessionEnd::TunnelClosed(_)
            ));
        }
        assert!(matches!(
            SessionEnd::of_close(&close(1000, "replaced by a newer connection")),
            SessionEnd::Superseded(_)
        ));
        assert!(matches!(
            SessionEnd::of_close(&close(1008, "access token rotated")),
            SessionEnd::Superseded(_)
        ));
        assert!(matches!(
            SessionEnd::of_close(&close(1001, "shutting down")),
            SessionEnd::Lost(_)
        ));
        assert!(matches!(SessionEnd::of_close(&None), SessionEnd::Lost(_)));
    }

    #[test]
    fn only_client_errors_are_final() {
        let refused = |status| DialError::Refused {
            status,
            code: "tunnel_closed".into(),
            message: String::new(),
        };
        assert!(refused(401).is_final());
        assert!(refused(409).is_final() && refused(409).tunnel_closed());
        assert!(!refused(429).is_final());
        assert!(!refused(503).is_final());
    }

    /// A relay on loopback that reads the upgrade request and answers with `answer(key)`,
    /// where `key` is the request's Sec-WebSocket-Key; then it holds the connection.
    async fn fake_relay(answer: fn(&str) -> Vec<u8>) -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0];
                if tcp.read_exact(&mut byte).await.is_err() {
                    return;
                }
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).unwrap();
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap_or_default()
                .to_string();
            let _ = tcp.write_all(&answer(&key)).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        Endpoint::parse(&format!("ws://127.0.0.1:{port}")).unwrap()
    }

    async fn dial_fake(answer: fn(&str) -> Vec<u8>) -> Result<Connected, DialError> {
        let endpoint = fake_relay(answer).await;
        let tls = tls_config(None).unwrap();
        dial(&endpoint, Side::Source, &Secret("token-123".into()), &tls).await
    }

    fn switching(accept: &str, protocol: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn the_upgrade_checks_what_the_relay_answers() {
        // A good answer with SERVICE_IDS right behind it, in the same segment.
        let connected = dial_fake(|key| {
            let mut out = switching(&ws::accept_key(key), SUBPROTOCOL);
            out.extend(
                crate::proto::aws::server_frame(&crate::proto::aws::service_ids_message(&["SSH"]))
                    .unwrap(),
            );
            out
        })
        .await
        .expect("a good answer connects");
        assert_eq!(connected.services, ["SSH"]);

        let refused = |r: Result<Connected, DialError>| match r {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a bad answer was accepted"),
        };
        let wrong_accept =
            refused(dial_fake(|_| switching("AAAAAAAAAAAAAAAAAAAAAAAAAAAA=", SUBPROTOCOL)).await);
        assert!(
            wrong_accept.contains("Sec-WebSocket-Accept"),
            "{wrong_accept}"
        );
        let wrong_protocol = refused(
            dial_fake(|key| switching(&ws::accept_key(key), "aws.iot.securetunneling-1.0")).await,
        );
        assert!(wrong_protocol.contains("subprotocol"), "{wrong_protocol}");
        let endless = refused(
            dial_fake(|_| {
                let mut out = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
                // One header line that never ends (too many headers fail on their own).
                out.extend(b"X-Filler: ");
                out.extend([b'a'; 20_000]);
                out
            })
            .await,
        );
        assert!(endless.contains("too long"), "{endless}");
        let garbage = refused(dial_fake(|_| b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()).await);
        assert!(garbage.contains("malformed"), "{garbage}");
        let refusal = dial_fake(|_| {
            let body = r#"{"error":{"code":"unknown_token","message":"no such token"}}"#;
            format!(
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        })
        .await;
        match refusal {
            Err(e @ DialError::Refused { status: 401, .. }) => {
                assert!(e.is_final());
                assert!(
                    e.to_string().contains("no such token (unknown_token"),
                    "{e}"
                );
            }
            Err(e) => panic!("expected a refusal, got {e}"),
            Ok(_) => panic!("a 401 connected"),
        }
    }
}
