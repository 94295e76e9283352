//! Test peers for the relay, written from PROTOCOLS.md rather than from the relay's code:
//! - [`Relay`]: where the relay listens and how to reach it (TLS trusting the generated CA, or
//!   plaintext; optionally from another loopback source address);
//! - [`AwsPeer`]: an AWS IoT Secure Tunneling peer (V1-V3) on tokio-tungstenite that sends and
//!   receives `[u16 length][Message]` streams in any frame split;
//! - [`AliyunPeer`]: an Alibaba `aliyun.iot.securetunnel-v1.1` peer, one tunnel frame per message;
//! - [`RawConn`]: a TLS (or TCP) stream without a WebSocket library, for hostile input: it writes
//!   arbitrary bytes, reads an HTTP answer byte by byte, and reads server frames as they are on
//!   the wire (unmasked, FIN bit and all).
//!
//! Every await is bounded ([`within`]), so a broken relay fails a test instead of hanging it.
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use iotunnel::config::{IoDriver, Settings};
use iotunnel::proto::aws::{self, Message, MessageType};
use prost::Message as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;

use super::{Fixture, TestServer};

/// The longest one network step (a connect, a handshake, one message) may take.
pub const STEP: Duration = Duration::from_secs(10);

/// Fails the test when `fut` takes longer than [`STEP`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(STEP, what, fut).await
}

/// Fails the test when `fut` takes longer than `limit`.
pub async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Starts an in-process server whose relay uses `driver`, after `tweak` adjusts the settings.
pub async fn relay_server(driver: IoDriver, tweak: impl FnOnce(&mut Settings)) -> TestServer {
    TestServer::start_with(|s| {
        s.io_driver = driver;
        tweak(s);
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Reaching the relay
// ---------------------------------------------------------------------------------------------

/// A rustls client configuration trusting only the CA in `ca_pem`, offering `versions`.
pub fn tls_config(
    ca_pem: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).expect("tls/ca.pem is readable") {
        roots
            .add(cert.expect("tls/ca.pem parses"))
            .expect("the CA is a valid trust anchor");
    }
    // An explicit provider: another crate in the graph may enable a second one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Where the relay listens and how to reach it.
#[derive(Clone)]
pub struct Relay {
    /// The relay's real listen address (the URLs carry the public `localhost:8443`).
    pub addr: SocketAddr,
    /// TLS client configuration; `None` for a plaintext relay.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The name checked against the certificate (a SAN of the generated one).
    pub server_name: &'static str,
    /// Source address to connect from (None: the kernel's choice, 127.0.0.1).
    pub bind: Option<IpAddr>,
}

impl Relay {
    /// The relay of `t`: TLS trusting `{data dir}/tls/ca.pem`, or plaintext when so configured.
    pub fn of(t: &TestServer) -> Self {
        let server = t.server();
        let tls = (!server.control.settings.relay_plaintext)
            .then(|| tls_config(&t.dir.path().join("tls/ca.pem"), rustls::ALL_VERSIONS));
        Self {
            addr: server.relay_addr,
            tls,
            server_name: "localhost",
            bind: None,
        }
    }

    /// The same relay reached from another source address (e.g. 127.0.0.2).
    pub fn bound_to(mut self, ip: IpAddr) -> Self {
        self.bind = Some(ip);
        self
    }

    /// The same relay with a TLS client that offers only `versions`.
    pub fn with_tls_versions(
        mut self,
        t: &TestServer,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Self {
        self.tls = Some(tls_config(&t.dir.path().join("tls/ca.pem"), versions));
        self
    }

    /// `wss` or `ws`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "wss"
        } else {
            "ws"
        }
    }

    /// A TCP connection to the relay (from [`Relay::bind`] when set).
    pub async fn tcp(&self) -> TcpStream {
        within("TCP connect to the relay", async {
            let stream = match self.bind {
                Some(ip) => {
                    let socket = if ip.is_ipv4() {
                        TcpSocket::new_v4()
                    } else {
                        TcpSocket::new_v6()
                    }
                    .expect("socket");
                    socket
                        .bind(SocketAddr::new(ip, 0))
                        .expect("bind the source address");
                    socket.connect(self.addr).await
                }
                None => TcpStream::connect(self.addr).await,
            };
            let stream = stream.expect("the relay accepts TCP connections");
            stream.set_nodelay(true).expect("nodelay");
            stream
        })
        .await
    }

    /// A connection ready for HTTP: TLS-handshaken unless the relay is plaintext.
    pub async fn connect(&self) -> RelayStream {
        let tcp = self.tcp().await;
        match &self.tls {
            None => RelayStream::Plain(tcp),
            Some(config) => {
                let name = ServerName::try_from(self.server_name).expect("valid server name");
                let tls = within(
                    "TLS handshake with the relay",
                    tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp),
                )
                .await
                .expect("TLS handshake with the relay succeeds");
                RelayStream::Tls(Box::new(tls))
            }
        }
    }
}

/// A connection to the relay, TLS or plain.
pub enum RelayStream {
    /// ws://
    Plain(TcpStream),
    /// wss://
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl RelayStream {
    /// The negotiated TLS version (None when plaintext).
    pub fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(s) => s.get_ref().1.protocol_version(),
        }
    }
}

impl AsyncRead for RelayStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RelayStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Upgrade requests, both families
// ---------------------------------------------------------------------------------------------

/// The `Sec-WebSocket-Key` of RFC 6455's example, and the accept value it must produce.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// `base64(sha1(WS_KEY + GUID))` (RFC 6455 section 1.3).
pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// An AWS protocol version, by the subprotocol that selects it (PROTOCOLS.md 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aws {
    /// Fields 1-4, types 0-4: no SERVICE_IDS.
    V1,
    /// Service ids.
    V2,
    /// Connection ids.
    V3,
}

impl Aws {
    /// The `Sec-WebSocket-Protocol` value.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Aws::V1 => "aws.iot.securetunneling-1.0",
            Aws::V2 => "aws.iot.securetunneling-2.0",
            Aws::V3 => "aws.iot.securetunneling-3.0",
        }
    }
}

/// `local-proxy-mode`: which side an AWS peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The client (a person's local proxy).
    Source,
    /// The device.
    Destination,
}

impl Mode {
    /// The AWS path for this side.
    pub fn path(self) -> &'static str {
        match self {
            Mode::Source => "/tunnel?local-proxy-mode=source",
            Mode::Destination => "/tunnel?local-proxy-mode=destination",
        }
    }
}

/// The Alibaba subprotocol (PROTOCOLS.md 2).
pub const ALIYUN_SUBPROTOCOL: &str = "aliyun.iot.securetunnel-v1.1";

/// How an Alibaba peer names its subprotocol: both are accepted (PROTOCOLS.md 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliyunStyle {
    /// `Sec-WebSocket-Protocol: aliyun.iot.securetunnel-v1.1` (echoed back).
    WebSocketProtocol,
    /// A plain `subprotocol: aliyun.iot.securetunnel-v1.1` header (nothing to echo).
    PlainHeader,
}

/// Which end an Alibaba peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliyunSide {
    /// `/tunnel/{id}/source`
    Source,
    /// `/tunnel/{id}/device`
    Device,
}

/// The Alibaba path for `side` of `tunnel_id`.
pub fn aliyun_path(tunnel_id: &str, side: AliyunSide) -> String {
    match side {
        AliyunSide::Source => format!("/tunnel/{tunnel_id}/source"),
        AliyunSide::Device => format!("/tunnel/{tunnel_id}/device"),
    }
}

/// Headers of an AWS upgrade beyond the WebSocket ones.
pub fn aws_headers(version: Aws, token: &str) -> Vec<(String, String)> {
    vec![
        ("access-token".into(), token.into()),
        (
            "Sec-WebSocket-Protocol".into(),
            version.subprotocol().into(),
        ),
    ]
}

/// Headers of an Alibaba upgrade beyond the WebSocket ones.
pub fn aliyun_headers(style: AliyunStyle, token: &str) -> Vec<(String, String)> {
    let protocol = match style {
        AliyunStyle::WebSocketProtocol => "Sec-WebSocket-Protocol",
        AliyunStyle::PlainHeader => "subprotocol",
    };
    vec![
        ("tunnel-access-token".into(), token.into()),
        (protocol.into(), ALIYUN_SUBPROTOCOL.into()),
    ]
}

/// A complete WebSocket upgrade request for `target` with the extra `headers`.
pub fn upgrade_request(target: &str, headers: &[(String, String)]) -> Vec<u8> {
    let mut r = format!(
        "GET {target} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in headers {
        r.push_str(&format!("{name}: {value}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// A plain GET (no `Upgrade`, no `Connection: Upgrade`, no WebSocket key) for `target`.
pub fn plain_get(target: &str, headers: &[(String, String)]) -> Vec<u8> {
    let mut r = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n");
    for (name, value) in headers {
        r.push_str(&format!("{name}: {value}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// An HTTP answer as read off the wire.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lowercased) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty for a 101).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a refusal with one of `statuses` and the JSON error envelope
    /// `{"error": {"code", "message", "request_id"}}`; returns the body.
    pub fn assert_refusal(&self, statuses: &[u16]) -> Value {
        let text = String::from_utf8_lossy(&self.body);
        assert!(
            statuses.contains(&self.status),
            "expected HTTP {statuses:?}, got {} with body {text}",
            self.status
        );
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "refusal {} has content-type {:?}",
            self.status,
            self.header("content-type")
        );
        let v: Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("refusal body is not JSON ({e}): {text}"));
        for field in ["code", "message", "request_id"] {
            assert!(
                v["error"][field].as_str().is_some_and(|s| !s.is_empty()),
                "error envelope lacks {field}: {v}"
            );
        }
        v
    }

    /// Asserts a 101 that accepted [`WS_KEY`] and echoed `subprotocol` (when one was asked).
    pub fn assert_switched(&self, subprotocol: Option<&str>) {
        assert_eq!(
            self.status,
            101,
            "expected 101, got {} {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        assert!(self
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket")));
        assert_eq!(self.header("sec-websocket-accept"), Some(WS_ACCEPT));
        assert_eq!(self.header("sec-websocket-protocol"), subprotocol);
    }
}

// ---------------------------------------------------------------------------------------------
// Raw connections: bytes, HTTP answers and server frames as they are on the wire
// ---------------------------------------------------------------------------------------------

/// WebSocket opcodes (RFC 6455 5.2).
pub mod op {
    /// Continuation.
    pub const CONTINUATION: u8 = 0;
    /// Text.
    pub const TEXT: u8 = 1;
    /// Binary.
    pub const BINARY: u8 = 2;
    /// Close.
    pub const CLOSE: u8 = 8;
    /// Ping.
    pub const PING: u8 = 9;
    /// Pong.
    pub const PONG: u8 = 10;
}

/// The mask key of the frames the raw peer builds (any value works; not all zero, so a relay
/// that forgot to unmask would forward garbage).
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A frame header: FIN, opcode, optional mask key, and the length in its shortest form.
pub fn frame_header(fin: bool, opcode: u8, mask: Option<[u8; 4]>, len: u64) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len <= 125 {
        out.push(mask_bit | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(m) = mask {
        out.extend_from_slice(&m);
    }
    out
}

/// A whole frame; the payload is masked with `mask` when given (clients must mask).
pub fn frame_bytes(fin: bool, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = frame_header(fin, opcode, mask, payload.len() as u64);
    match mask {
        Some(m) => out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4])),
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked client frame with FIN set.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame_bytes(true, opcode, Some(MASK), payload)
}

/// A masked client close frame.
pub fn client_close(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    client_frame(op::CLOSE, &payload)
}

/// A frame as read from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// FIN bit.
    pub fin: bool,
    /// RSV1-3.
    pub rsv: u8,
    /// Opcode.
    pub opcode: u8,
    /// Whether the server (wrongly) masked it; the payload below is unmasked either way.
    pub masked: bool,
    /// The payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code and reason of a close frame (None for an empty close payload).
    pub fn close(&self) -> Option<(u16, String)> {
        assert_eq!(self.opcode, op::CLOSE, "not a close frame: {self:?}");
        let code = u16::from_be_bytes(self.payload.get(..2)?.try_into().ok()?);
        Some((
            code,
            String::from_utf8_lossy(&self.payload[2..]).into_owned(),
        ))
    }
}

/// Parses one frame from the front of `buf`; None when more bytes are needed.
fn parse_raw_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let m: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let end = at + usize::try_from(len).ok()?;
    let mut payload = buf.get(at..end)?.to_vec();
    if let Some(m) = mask {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= m[i % 4]);
    }
    let frame = RawFrame {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0f,
        masked,
        payload,
    };
    Some((frame, end))
}

/// How a raw read ended.
#[derive(Debug)]
pub enum Ended {
    /// Orderly EOF.
    Eof,
    /// A reset or another I/O error.
    Error(io::ErrorKind),
}

/// A connection to the relay without a WebSocket library.
pub struct RawConn {
    /// The stream.
    pub stream: RelayStream,
    /// Bytes read and not yet consumed.
    pub buf: Vec<u8>,
}

impl RawConn {
    /// Connects (and TLS-handshakes unless plaintext).
    pub async fn open(relay: &Relay) -> Self {
        Self {
            stream: relay.connect().await,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` and flushes; an error (the relay already hung up) is returned.
    pub async fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        within("raw write", async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
    }

    /// Writes `bytes` and flushes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).await.expect("raw write succeeds");
    }

    /// Reads more bytes into the buffer; Err when the stream ended.
    async fn fill(&mut self) -> Result<(), Ended> {
        let mut chunk = vec![0u8; 64 * 1024];
        match within("raw read", self.stream.read(&mut chunk)).await {
            Ok(0) => Err(Ended::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(Ended::Error(e.kind())),
        }
    }

    /// Reads until the relay ends the connection; returns what arrived before that.
    pub async fn read_to_end(&mut self) -> (Vec<u8>, Ended) {
        loop {
            if let Err(end) = self.fill().await {
                return (std::mem::take(&mut self.buf), end);
            }
        }
    }

    /// Reads an HTTP response: the head, then the body by `Content-Length` or up to EOF
    /// (nothing after a 101: what follows is WebSocket frames, left in the buffer).
    pub async fn read_response(&mut self) -> HttpResponse {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if let Err(end) = self.fill().await {
                panic!(
                    "connection ended ({end:?}) before a complete HTTP head; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("ASCII HTTP head");
        self.buf.drain(..head_end);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(
            parts.next(),
            Some("HTTP/1.1"),
            "status line {status_line:?}"
        );
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap_or_else(|| panic!("header {l:?}"));
                (n.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let mut response = HttpResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if status == 101 {
            return response;
        }
        match response.header("content-length") {
            Some(len) => {
                let len: usize = len.parse().expect("numeric content-length");
                while self.buf.len() < len {
                    if let Err(end) = self.fill().await {
                        panic!("body cut short ({end:?}) at {} of {len}", self.buf.len());
                    }
                }
                response.body = self.buf.drain(..len).collect();
            }
            None => response.body = self.read_to_end().await.0,
        }
        response
    }

    /// Sends a request and reads the answer.
    pub async fn request(relay: &Relay, request: &[u8]) -> (HttpResponse, RawConn) {
        let mut conn = Self::open(relay).await;
        conn.send(request).await;
        let response = conn.read_response().await;
        (response, conn)
    }

    /// Sends an upgrade request for `target` and reads the answer.
    pub async fn upgrade(
        relay: &Relay,
        target: &str,
        headers: &[(String, String)],
    ) -> (HttpResponse, RawConn) {
        Self::request(relay, &upgrade_request(target, headers)).await
    }

    /// An upgraded AWS connection; for V2/V3 the SERVICE_IDS frame has been read and checked to
    /// hold exactly one SERVICE_IDS message, whose services are returned.
    pub async fn aws(relay: &Relay, mode: Mode, version: Aws, token: &str) -> (Self, Vec<String>) {
        let (response, mut conn) =
            Self::upgrade(relay, mode.path(), &aws_headers(version, token)).await;
        response.assert_switched(Some(version.subprotocol()));
        let services = match version {
            Aws::V1 => Vec::new(),
            Aws::V2 | Aws::V3 => {
                let frame = conn.read_data_frame().await;
                service_ids_of_frame(&frame.payload)
            }
        };
        (conn, services)
    }

    /// The next server frame (None when the connection ended first). Server frames must be
    /// unmasked and carry no RSV bits (nothing is ever negotiated).
    pub async fn read_frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = parse_raw_frame(&self.buf) {
                self.buf.drain(..used);
                assert!(!frame.masked, "the server masked a frame: {frame:?}");
                assert_eq!(frame.rsv, 0, "the server set RSV bits");
                return Some(frame);
            }
            if self.fill().await.is_err() {
                return None;
            }
        }
    }

    /// The next data frame (binary or continuation), skipping pings and pongs; fails on a
    /// close frame, a text frame or the end of the connection.
    pub async fn read_data_frame(&mut self) -> RawFrame {
        loop {
            let frame = self
                .read_frame()
                .await
                .expect("connection open while a data frame is expected");
            match frame.opcode {
                op::PING | op::PONG => continue,
                op::BINARY | op::CONTINUATION => return frame,
                _ => panic!("expected a binary frame, got {frame:?}"),
            }
        }
    }

    /// Reads until a close frame; returns its code and reason. Data frames before it are
    /// skipped; a connection that ends without one fails the test.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.read_frame().await {
                Some(f) if f.opcode == op::CLOSE => {
                    return f.close().expect("the close frame carries a code")
                }
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }

    /// Sends a masked frame with FIN set.
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.send(&client_frame(opcode, payload)).await;
    }
}

/// Asserts `got == want` without printing megabytes: lengths and the first differing offset.
#[track_caller]
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        let head = |b: &[u8]| b[..b.len().min(16)].to_vec();
        panic!(
            "{what}: got {} bytes {:02x?}..., want {} bytes {:02x?}...; first difference at {at:?}",
            got.len(),
            head(got),
            want.len(),
            head(want)
        );
    }
}

/// Checks that a frame payload holds exactly one SERVICE_IDS message and nothing else; returns
/// its services.
pub fn service_ids_of_frame(payload: &[u8]) -> Vec<String> {
    assert!(
        payload.len() >= 2,
        "SERVICE_IDS frame too short: {payload:?}"
    );
    let len = usize::from(u16::from_be_bytes([payload[0], payload[1]]));
    assert_eq!(
        len + 2,
        payload.len(),
        "the SERVICE_IDS frame must hold exactly one message (PROTOCOLS.md: own frame)"
    );
    let msg = Message::decode(&payload[2..]).expect("SERVICE_IDS decodes");
    assert_eq!(msg.r#type, MessageType::ServiceIds as i32, "{msg:?}");
    assert_eq!(
        (msg.stream_id, msg.payload.len(), msg.connection_id),
        (0, 0, 0)
    );
    msg.available_service_ids
}

// ---------------------------------------------------------------------------------------------
// AWS messages
// ---------------------------------------------------------------------------------------------

/// A message with the given fields.
pub fn message(
    kind: MessageType,
    stream_id: i32,
    service_id: &str,
    connection_id: u32,
    payload: &[u8],
) -> Message {
    Message {
        r#type: kind as i32,
        stream_id,
        service_id: service_id.into(),
        connection_id,
        payload: payload.to_vec().into(),
        ..Message::default()
    }
}

/// STREAM_START.
pub fn stream_start(stream_id: i32, service_id: &str, connection_id: u32) -> Message {
    message(
        MessageType::StreamStart,
        stream_id,
        service_id,
        connection_id,
        b"",
    )
}

/// DATA.
pub fn data(stream_id: i32, service_id: &str, connection_id: u32, payload: &[u8]) -> Message {
    message(
        MessageType::Data,
        stream_id,
        service_id,
        connection_id,
        payload,
    )
}

/// `[u16 length][Message]...` for `messages`.
pub fn encode_stream(messages: &[Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        aws::encode_into(m, &mut out).expect("message fits a u16 length");
    }
    out
}

/// A stream of DATA messages (stream 1, payload bytes from `seed`) exactly `total` bytes long,
/// so a frame split of it ends on a message boundary.
pub fn data_stream_of_len(total: usize, seed: u8) -> Vec<u8> {
    /// The smallest message: DATA with stream id 1 and no payload (`08 01 10 01`).
    const SMALLEST: usize = 2 + 4;
    assert!(
        total == 0 || total >= SMALLEST,
        "no stream is {total} bytes"
    );
    let mut out = Vec::with_capacity(total);
    let mut byte = seed;
    while out.len() < total {
        let remaining = total - out.len();
        let fits = |p: usize| {
            let e = 2 + data(1, "", 0, &vec![0; p]).encoded_len();
            e == remaining || e + SMALLEST <= remaining
        };
        let p = (0..=aws::MAX_PAYLOAD.min(remaining))
            .rev()
            .find(|&p| fits(p))
            .expect("some payload length fits");
        let payload: Vec<u8> = (0..p)
            .map(|_| {
                byte = byte.wrapping_mul(31).wrapping_add(7);
                byte
            })
            .collect();
        aws::encode_into(&data(1, "", 0, &payload), &mut out).expect("fits");
    }
    assert_eq!(out.len(), total);
    out
}

/// Sends `total` bytes of stream 1 DATA (63 KiB messages, the largest PROTOCOLS.md allows) of
/// xorshift bytes from `seed`; returns their SHA-256.
pub async fn send_bulk<S>(mut sink: S, total: usize, seed: u64) -> Vec<u8>
where
    S: futures_util::Sink<WsMessage> + Unpin,
    S::Error: std::fmt::Debug,
{
    use sha2::{Digest, Sha256};
    const CHUNK: usize = 64_512;
    let (mut hash, mut state, mut sent) = (Sha256::new(), seed, 0);
    while sent < total {
        let n = CHUNK.min(total - sent);
        let mut payload = vec![0u8; n];
        for word in payload.chunks_mut(8) {
            // xorshift64: cheap bytes that no relay bug reproduces by accident.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        hash.update(&payload);
        let frame = encode_stream(&[data(1, "", 1, &payload)]);
        within("bulk send", sink.send(WsMessage::Binary(frame.into())))
            .await
            .expect("bulk frame sent");
        sent += n;
    }
    hash.finalize().to_vec()
}

/// Receives `total` bytes of stream 1 DATA (nothing else may arrive); returns their SHA-256.
pub async fn receive_bulk<R>(mut stream: R, total: usize) -> Vec<u8>
where
    R: futures_util::Stream<Item = Result<WsMessage, tungstenite::Error>> + Unpin,
{
    use sha2::{Digest, Sha256};
    let (mut hash, mut reader, mut received) = (Sha256::new(), MessageReader::default(), 0);
    while received < total {
        let msg = within("bulk receive", stream.next())
            .await
            .expect("stream open")
            .expect("no error");
        let WsMessage::Binary(frame) = msg else {
            continue;
        };
        reader.feed(&frame);
        while let Some(m) = reader.next() {
            assert!(
                m.r#type == MessageType::Data as i32 && m.stream_id == 1,
                "not stream 1 DATA: {m:?}"
            );
            hash.update(&m.payload);
            received += m.payload.len();
        }
    }
    assert_eq!(received, total);
    hash.finalize().to_vec()
}

/// Collects `[u16 length][Message]` messages from a byte stream fed in arbitrary pieces.
#[derive(Default)]
pub struct MessageReader {
    buf: Vec<u8>,
    at: usize,
}

impl MessageReader {
    /// Appends bytes from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.at > 0 && self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        } else if self.at > 1 << 20 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one has arrived.
    pub fn next(&mut self) -> Option<Message> {
        let (msg, used) =
            aws::decode_message(&self.buf[self.at..]).expect("valid message stream")?;
        self.at += used;
        Some(msg)
    }

    /// True when no partial message is buffered.
    pub fn is_empty(&self) -> bool {
        self.at == self.buf.len()
    }
}

/// The end of a WebSocket as a tungstenite peer saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEnd {
    /// A close frame (code, reason); None when it had no payload.
    Close(Option<(u16, String)>),
    /// The connection ended without a close frame.
    Dropped,
}

/// Reads until the peer's WebSocket ends; skips data.
async fn ws_end(ws: &mut WebSocketStream<RelayStream>) -> WsEnd {
    within("the relay ends the WebSocket", async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Close(c))) => {
                    return WsEnd::Close(c.map(|c| (u16::from(c.code), c.reason.to_string())))
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return WsEnd::Dropped,
            }
        }
    })
    .await
}

/// The next binary message of `ws` without a time limit (None when the WebSocket ended); for
/// background peers that wait as long as the test runs.
async fn ws_next_binary_unbounded(ws: &mut WebSocketStream<RelayStream>) -> Option<Vec<u8>> {
    loop {
        match ws.next().await? {
            Ok(WsMessage::Binary(b)) => return Some(b.to_vec()),
            Ok(WsMessage::Ping(_) | WsMessage::Pong(_)) => continue,
            Ok(_) | Err(_) => return None,
        }
    }
}

/// The next binary message of `ws` (pings and pongs skipped; anything else fails the test).
async fn ws_next_binary(ws: &mut WebSocketStream<RelayStream>, what: &str) -> Vec<u8> {
    within(what, async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Binary(b))) => return b.to_vec(),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(other)) => panic!("{what}: expected a binary message, got {other:?}"),
                Some(Err(e)) => panic!("{what}: WebSocket error {e}"),
                None => panic!("{what}: WebSocket ended"),
            }
        }
    })
    .await
}

/// Runs the client handshake over a fresh connection; Err carries the refusal (status and
/// whatever body tungstenite had read).
async fn ws_handshake(
    relay: &Relay,
    target: &str,
    headers: &[(String, String)],
) -> Result<
    (
        WebSocketStream<RelayStream>,
        tungstenite::handshake::client::Response,
    ),
    HttpResponse,
> {
    let stream = relay.connect().await;
    let mut request = format!("{}://localhost{target}", relay.scheme())
        .into_client_request()
        .expect("valid request");
    for (name, value) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    match within(
        "WebSocket handshake",
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    {
        Ok(pair) => Ok(pair),
        Err(tungstenite::Error::Http(resp)) => Err(HttpResponse {
            status: resp.status().as_u16(),
            headers: resp
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            body: resp.body().clone().unwrap_or_default(),
        }),
        Err(e) => panic!("WebSocket handshake to {target} failed: {e}"),
    }
}

/// An AWS IoT Secure Tunneling peer.
pub struct AwsPeer {
    /// The WebSocket.
    pub ws: WebSocketStream<RelayStream>,
    /// The negotiated version.
    pub version: Aws,
    /// The services from SERVICE_IDS (empty for V1).
    pub service_ids: Vec<String>,
    /// The 101's headers.
    pub response: tungstenite::handshake::client::Response,
    reader: MessageReader,
}

impl AwsPeer {
    /// Connects as `mode` with `token`; fails the test when refused. Checks the echoed
    /// subprotocol and, for V2/V3, that the first frame is SERVICE_IDS alone.
    pub async fn connect(relay: &Relay, mode: Mode, version: Aws, token: &str) -> Self {
        match Self::try_connect(relay, mode, version, token).await {
            Ok(peer) => peer,
            Err(r) => panic!(
                "{mode:?} {version:?} upgrade refused: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ),
        }
    }

    /// Like [`AwsPeer::connect`], but a refusal is returned.
    pub async fn try_connect(
        relay: &Relay,
        mode: Mode,
        version: Aws,
        token: &str,
    ) -> Result<Self, HttpResponse> {
        let (mut ws, response) =
            ws_handshake(relay, mode.path(), &aws_headers(version, token)).await?;
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap()),
            Some(version.subprotocol()),
            "the relay must echo the subprotocol"
        );
        let service_ids = match version {
            Aws::V1 => Vec::new(),
            Aws::V2 | Aws::V3 => {
                service_ids_of_frame(&ws_next_binary(&mut ws, "SERVICE_IDS").await)
            }
        };
        Ok(Self {
            ws,
            version,
            service_ids,
            response,
            reader: MessageReader::default(),
        })
    }

    /// Sends one binary frame with exactly `payload`.
    pub async fn send_frame(&mut self, payload: Vec<u8>) {
        within(
            "send a frame",
            self.ws.send(WsMessage::Binary(payload.into())),
        )
        .await
        .expect("frame sent");
    }

    /// Sends `messages` together in one frame.
    pub async fn send_in_one_frame(&mut self, messages: &[Message]) {
        self.send_frame(encode_stream(messages)).await;
    }

    /// Sends one message in a frame of its own.
    pub async fn send(&mut self, message: &Message) {
        self.send_in_one_frame(std::slice::from_ref(message)).await;
    }

    /// Sends `stream` cut at `cuts` (offsets, increasing): one frame per piece.
    pub async fn send_split(&mut self, stream: &[u8], cuts: &[usize]) {
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&stream.len())) {
            self.send_frame(stream[from..to].to_vec()).await;
            from = to;
        }
    }

    /// The next binary frame's payload, exactly as it arrived. Must not be called while a
    /// message is half read by [`AwsPeer::next_message`].
    pub async fn next_frame(&mut self) -> Vec<u8> {
        assert!(self.reader.is_empty(), "a message is half read");
        ws_next_binary(&mut self.ws, "next frame").await
    }

    /// The next message, read across frame boundaries.
    pub async fn next_message(&mut self) -> Message {
        loop {
            if let Some(m) = self.reader.next() {
                return m;
            }
            let frame = ws_next_binary(&mut self.ws, "next message").await;
            self.reader.feed(&frame);
        }
    }

    /// The next message without a time limit; None once the WebSocket ended.
    pub async fn next_message_unbounded(&mut self) -> Option<Message> {
        loop {
            if let Some(m) = self.reader.next() {
                return Some(m);
            }
            let frame = ws_next_binary_unbounded(&mut self.ws).await?;
            self.reader.feed(&frame);
        }
    }

    /// Reads until the relay ends the connection (data in between skipped).
    pub async fn end(&mut self) -> WsEnd {
        ws_end(&mut self.ws).await
    }

    /// Reads until the relay ends the connection; fails unless it sent a close frame.
    pub async fn expect_close(&mut self) -> (u16, String) {
        match self.end().await {
            WsEnd::Close(Some(c)) => c,
            other => panic!("expected a close frame with a code, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Alibaba frames
// ---------------------------------------------------------------------------------------------

/// `frame_type` values (PROTOCOLS.md 2).
pub mod frame_type {
    /// common_response
    pub const COMMON_RESPONSE: i64 = 1;
    /// session_create
    pub const SESSION_CREATE: i64 = 2;
    /// session_release
    pub const SESSION_RELEASE: i64 = 3;
    /// data_transport
    pub const DATA_TRANSPORT: i64 = 4;
}

/// `[u16 BE header length][JSON header][payload]`.
pub fn aliyun_frame(header: &Value, payload: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("JSON");
    let mut out = (json.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(payload);
    out
}

/// A tunnel frame as received.
#[derive(Debug, Clone)]
pub struct AliyunFrame {
    /// The JSON header.
    pub header: Value,
    /// The payload.
    pub payload: Vec<u8>,
    /// The whole WebSocket message, as it arrived.
    pub raw: Vec<u8>,
}

impl AliyunFrame {
    /// Parses one WebSocket message as one tunnel frame.
    pub fn parse(raw: Vec<u8>) -> Self {
        assert!(raw.len() >= 2, "tunnel frame too short: {raw:?}");
        let h = usize::from(u16::from_be_bytes([raw[0], raw[1]]));
        assert!((1..=2048).contains(&h), "header length {h}");
        let header: Value = serde_json::from_slice(&raw[2..2 + h]).expect("JSON header");
        let payload = raw[2 + h..].to_vec();
        assert!(payload.len() <= 4096, "payload of {} bytes", payload.len());
        Self {
            header,
            payload,
            raw,
        }
    }

    /// `frame_type`.
    pub fn frame_type(&self) -> i64 {
        self.header["frame_type"].as_i64().expect("frame_type")
    }

    /// `frame_id`.
    pub fn frame_id(&self) -> i64 {
        self.header["frame_id"].as_i64().expect("frame_id")
    }

    /// `session_id`.
    pub fn session_id(&self) -> &str {
        self.header["session_id"].as_str().expect("session_id")
    }

    /// The `code` of a `{"code", "msg"}` payload.
    pub fn code(&self) -> i64 {
        let v: Value = serde_json::from_slice(&self.payload).expect("JSON payload");
        assert!(v["msg"].is_string(), "payload lacks msg: {v}");
        v["code"].as_i64().expect("code")
    }
}

/// An Alibaba secure-tunnel peer.
pub struct AliyunPeer {
    /// The WebSocket.
    pub ws: WebSocketStream<RelayStream>,
    next_frame_id: i64,
}

impl AliyunPeer {
    /// Connects as `side` of `tunnel_id` with `token`; fails the test when refused.
    pub async fn connect(
        relay: &Relay,
        tunnel_id: &str,
        side: AliyunSide,
        token: &str,
        style: AliyunStyle,
    ) -> Self {
        match Self::try_connect(relay, tunnel_id, side, token, style).await {
            Ok(peer) => peer,
            Err(r) => panic!(
                "Alibaba {side:?} upgrade refused: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ),
        }
    }

    /// Like [`AliyunPeer::connect`], but a refusal is returned. With
    /// [`AliyunStyle::PlainHeader`] no `Sec-WebSocket-Protocol` was asked, so none may come back
    /// (tungstenite fails the handshake otherwise, as RFC 6455 4.1 requires).
    pub async fn try_connect(
        relay: &Relay,
        tunnel_id: &str,
        side: AliyunSide,
        token: &str,
        style: AliyunStyle,
    ) -> Result<Self, HttpResponse> {
        let (ws, response) = ws_handshake(
            relay,
            &aliyun_path(tunnel_id, side),
            &aliyun_headers(style, token),
        )
        .await?;
        if style == AliyunStyle::WebSocketProtocol {
            assert_eq!(
                response
                    .headers()
                    .get("sec-websocket-protocol")
                    .map(|v| v.to_str().unwrap()),
                Some(ALIYUN_SUBPROTOCOL)
            );
        }
        Ok(Self {
            ws,
            next_frame_id: 1,
        })
    }

    /// A fresh, increasing frame id.
    pub fn frame_id(&mut self) -> i64 {
        self.next_frame_id += 1;
        self.next_frame_id - 1
    }

    /// Sends one tunnel frame as one binary message; returns the bytes sent.
    pub async fn send(&mut self, header: Value, payload: &[u8]) -> Vec<u8> {
        let frame = aliyun_frame(&header, payload);
        within(
            "send a tunnel frame",
            self.ws.send(WsMessage::Binary(frame.clone().into())),
        )
        .await
        .expect("tunnel frame sent");
        frame
    }

    /// The next tunnel frame.
    pub async fn recv(&mut self) -> AliyunFrame {
        AliyunFrame::parse(ws_next_binary(&mut self.ws, "next tunnel frame").await)
    }

    /// session_create for `service_type` (client side); returns its frame id.
    pub async fn session_create(&mut self, service_type: &str) -> i64 {
        let id = self.frame_id();
        self.send(
            json!({"frame_type": frame_type::SESSION_CREATE, "frame_id": id, "service_type": service_type}),
            b"",
        )
        .await;
        id
    }

    /// common_response to a session_create (device side), echoing its ids.
    pub async fn respond(&mut self, create: &AliyunFrame, code: i64, msg: &str) {
        self.send(
            json!({
                "frame_type": frame_type::COMMON_RESPONSE,
                "frame_id": create.frame_id(),
                "session_id": create.session_id(),
                "service_type": create.header["service_type"],
            }),
            json!({"code": code, "msg": msg}).to_string().as_bytes(),
        )
        .await;
    }

    /// data_transport on `session_id`; returns the bytes sent.
    pub async fn data(&mut self, session_id: &str, payload: &[u8]) -> Vec<u8> {
        let id = self.frame_id();
        self.send(
            json!({"frame_type": frame_type::DATA_TRANSPORT, "frame_id": id, "session_id": session_id}),
            payload,
        )
        .await
    }

    /// session_release of `session_id`.
    pub async fn release(&mut self, session_id: &str, code: i64, msg: &str) {
        let id = self.frame_id();
        self.send(
            json!({"frame_type": frame_type::SESSION_RELEASE, "frame_id": id, "session_id": session_id}),
            json!({"code": code, "msg": msg}).to_string().as_bytes(),
        )
        .await;
    }

    /// Client: opens a session, the device answers `code 0`; returns the session id the
    /// relay assigned, after checking both sides saw it.
    pub async fn open_session(&mut self, device: &mut AliyunPeer, service_type: &str) -> String {
        let frame_id = self.session_create(service_type).await;
        let create = device.recv().await;
        assert_eq!(
            create.frame_type(),
            frame_type::SESSION_CREATE,
            "{:?}",
            create.header
        );
        assert_eq!(create.frame_id(), frame_id);
        assert_eq!(create.header["service_type"], service_type);
        let session_id = create.session_id().to_string();
        assert!(!session_id.is_empty(), "the relay assigns a session id");
        device.respond(&create, 0, "ok").await;
        let answer = self.recv().await;
        assert_eq!(answer.frame_type(), frame_type::COMMON_RESPONSE);
        assert_eq!(
            (answer.frame_id(), answer.session_id(), answer.code()),
            (frame_id, session_id.as_str(), 0)
        );
        session_id
    }

    /// Reads until the relay ends the connection (data in between skipped).
    pub async fn end(&mut self) -> WsEnd {
        ws_end(&mut self.ws).await
    }
}

// ---------------------------------------------------------------------------------------------
// Tunnels through the API
// ---------------------------------------------------------------------------------------------

/// A tunnel created through the API, with both tokens.
#[derive(Debug, Clone)]
pub struct OpenTunnel {
    /// The tunnel id.
    pub id: String,
    /// The client token (from the 201).
    pub client_token: String,
    /// The device token (from the device-channel notification).
    pub device_token: String,
    /// The device URL from the notification.
    pub device_url: String,
}

/// Creates a tunnel for `f`'s device with `services` and reads the device's notification.
pub async fn open_tunnel(t: &TestServer, f: &mut Fixture, services: &[&str]) -> OpenTunnel {
    let created = t.tunnel(f, json!({ "services": services })).await;
    let id = created["tunnel_id"].as_str().unwrap().to_string();
    // Notifications are at least once: a `connect` for an earlier tunnel may come again when
    // the channel's replay raced with that tunnel's creation.
    let note = loop {
        let note = f.channel.next_json().await;
        if note["tunnel_id"] == id.as_str() {
            break note;
        }
    };
    assert_eq!(note["operation"], "connect", "{note}");
    OpenTunnel {
        client_token: created["client_token"].as_str().unwrap().to_string(),
        device_token: note["token"].as_str().unwrap().to_string(),
        device_url: note["url"].as_str().unwrap().to_string(),
        id,
    }
}

/// `GET /v1/tunnels/{id}`.
pub async fn describe(t: &TestServer, f: &Fixture, id: &str) -> Value {
    let (s, v) = t.get(&format!("/v1/tunnels/{id}"), &f.key).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// Polls describe (bounded) until `pred` holds; returns that answer.
pub async fn wait_describe(
    t: &TestServer,
    f: &Fixture,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    for _ in 0..1000 {
        last = describe(t, f, id).await;
        if pred(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("describe never showed {what}; last: {last}");
}

/// Waits until describe shows `side` ("device" or "client") in `state`.
pub async fn wait_state(t: &TestServer, f: &Fixture, id: &str, side: &str, state: &str) -> Value {
    wait_describe(t, f, id, &format!("{side} {state}"), |v| {
        v[side]["state"] == state
    })
    .await
}

/// A paired AWS V3 tunnel with stream 1 open whose device echoes every DATA message: the
/// "other tunnel" that must keep working while something hostile happens.
pub struct EchoTunnel {
    /// The tunnel.
    pub tunnel: OpenTunnel,
    /// The client end.
    pub client: AwsPeer,
    echo: tokio::task::JoinHandle<()>,
    round: u64,
}

impl EchoTunnel {
    /// Creates the tunnel, connects both sides and starts the device's echo.
    pub async fn open(t: &TestServer, f: &mut Fixture, relay: &Relay) -> Self {
        let tunnel = open_tunnel(t, f, &["SSH"]).await;
        let mut device =
            AwsPeer::connect(relay, Mode::Destination, Aws::V3, &tunnel.device_token).await;
        let mut client = AwsPeer::connect(relay, Mode::Source, Aws::V3, &tunnel.client_token).await;
        client.send(&stream_start(1, "SSH", 1)).await;
        let start = device.next_message().await;
        assert_eq!(start.r#type, MessageType::StreamStart as i32);
        let echo = tokio::spawn(async move {
            while let Some(m) = device.next_message_unbounded().await {
                if m.r#type == MessageType::Data as i32 {
                    device
                        .send(&data(m.stream_id, "", m.connection_id, &m.payload))
                        .await;
                }
            }
        });
        Self {
            tunnel,
            client,
            echo,
            round: 0,
        }
    }

    /// One DATA round trip through the relay.
    pub async fn round_trip(&mut self) {
        self.round += 1;
        let payload = format!("echo round {}", self.round).into_bytes();
        self.client.send(&data(1, "", 1, &payload)).await;
        let back = self.client.next_message().await;
        assert_eq!(back.r#type, MessageType::Data as i32);
        assert_eq!(back.payload.as_ref(), payload.as_slice());
    }

    /// A few round trips: the tunnel still works.
    pub async fn assert_echoes(&mut self) {
        assert!(!self.echo.is_finished(), "the echoing device failed");
        for _ in 0..3 {
            self.round_trip().await;
        }
    }
}

impl Drop for EchoTunnel {
    fn drop(&mut self) {
        self.echo.abort();
    }
}
