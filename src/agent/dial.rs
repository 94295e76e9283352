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
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::BytesMut;
use futures_util::StreamExt;
use rand::Rng;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::config::Secret;
use crate::proto::aws::{self, MessageType, Side};

/// The subprotocol our peers speak: AWS V3 (multiplexed connections, PROTOCOLS.md 1).
pub const SUBPROTOCOL: &str = "aws.iot.securetunneling-3.0";

/// How long the TCP connect, TLS and WebSocket handshakes, and the first SERVICE_IDS may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest WebSocket frame accepted from the relay: the AWS frame limit (PROTOCOLS.md).
const MAX_FRAME: usize = 131_076;

/// Largest reassembled WebSocket message: AWS peers do not fragment, so a few frames at most.
const MAX_WS_MESSAGE: usize = 4 * MAX_FRAME;

/// First wait after a failed relay connection.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between relay reconnects (the issue caps backoff at 30 s).
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The WebSocket to the relay.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

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
                (host, port)
            }
            None => authority
                .rsplit_once(':')
                .with_context(|| format!("expected host:port in {text}"))?,
        };
        if host.is_empty() {
            bail!("no host in {text}");
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

    /// The AWS-family tunnel URL for `side`.
    fn tunnel_url(&self, side: Side) -> String {
        let mode = match side {
            Side::Source => "source",
            Side::Destination => "destination",
        };
        let scheme = if self.tls { "wss" } else { "ws" };
        format!(
            "{scheme}://{}/tunnel?local-proxy-mode={mode}",
            self.host_port()
        )
    }
}

/// A TLS client configuration trusting the certificates in `ca_file` (PEM), or else the public
/// web PKI roots. ring only: another crate in the graph may enable a second provider.
pub fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .with_context(|| format!("cannot read the CA file {}", path.display()))?;
            for cert in certs {
                let cert =
                    cert.with_context(|| format!("bad certificate in {}", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("unusable CA certificate in {}", path.display()))?;
            }
            if roots.is_empty() {
                bail!("no certificate in the CA file {}", path.display());
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// WebSocket limits for relay connections.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_frame_size(Some(MAX_FRAME))
        .max_message_size(Some(MAX_WS_MESSAGE))
}

/// A relay connection right after the upgrade.
pub struct Connected {
    /// The WebSocket.
    pub ws: Ws,
    /// The tunnel's services, from SERVICE_IDS.
    pub services: Vec<String>,
    /// Stream bytes read after SERVICE_IDS (normally none).
    pub leftover: BytesMut,
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
    let mut request = endpoint
        .tunnel_url(side)
        .into_client_request()
        .map_err(|e| network(e.into()))?;
    let headers = request.headers_mut();
    let mut token_value = token
        .0
        .parse::<tungstenite::http::HeaderValue>()
        .map_err(|_| network(anyhow::anyhow!("the token is not a valid header value")))?;
    token_value.set_sensitive(true);
    headers.insert("access-token", token_value);
    headers.insert(
        "sec-websocket-protocol",
        tungstenite::http::HeaderValue::from_static(SUBPROTOCOL),
    );
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(ws_config()),
        true,
        Some(Connector::Rustls(tls.clone())),
    );
    let mut ws = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
        Err(_) => return Err(network(anyhow::anyhow!("handshake timed out"))),
        Ok(Ok((ws, _))) => ws,
        Ok(Err(tungstenite::Error::Http(resp))) => {
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default();
            let text = |key: &str| body["error"][key].as_str().unwrap_or("-").to_string();
            return Err(DialError::Refused {
                status,
                code: text("code"),
                message: match body["error"]["message"].as_str() {
                    Some(m) => m.to_string(),
                    None => resp
                        .status()
                        .canonical_reason()
                        .unwrap_or("refused")
                        .to_string(),
                },
            });
        }
        Ok(Err(e)) => return Err(network(e.into())),
    };
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, first_message(&mut ws)).await;
    let (services, leftover) = match first {
        Err(_) => return Err(network(anyhow::anyhow!("no SERVICE_IDS from the relay"))),
        Ok(r) => r.map_err(network)?,
    };
    Ok(Connected {
        ws,
        services,
        leftover,
    })
}

/// Reads the relay's first message; returns the services when it is SERVICE_IDS (consumed)
/// and the stream bytes that follow.
async fn first_message(ws: &mut Ws) -> anyhow::Result<(Vec<String>, BytesMut)> {
    let mut buf = BytesMut::new();
    loop {
        if let Some((message, used)) = aws::decode_message(&buf)? {
            if message.r#type == MessageType::ServiceIds as i32 {
                let _ = buf.split_to(used);
                return Ok((message.available_service_ids, buf));
            }
            return Ok((Vec::new(), buf));
        }
        match ws.next().await {
            Some(Ok(WsMessage::Binary(b))) => buf.extend_from_slice(&b),
            Some(Ok(WsMessage::Close(frame))) => {
                bail!(
                    "the relay closed the connection: {}",
                    describe_close(&frame)
                )
            }
            Some(Ok(WsMessage::Text(_))) => bail!("the relay sent a text frame"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the relay closed the connection"),
        }
    }
}

/// `code reason` of a close frame, for messages.
pub fn describe_close(frame: &Option<tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(f) => format!("close {} {}", u16::from(f.code), f.reason)
            .trim()
            .to_string(),
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
    pub fn of_close(frame: &Option<tungstenite::protocol::CloseFrame>) -> Self {
        let Some(f) = frame else {
            return Self::Lost("closed without a code".into());
        };
        let code = u16::from(f.code);
        let reason = f.reason.to_string();
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
            e.tunnel_url(Side::Source),
            "ws://[::1]:9000/tunnel?local-proxy-mode=source"
        );
        let e = Endpoint::parse("localhost:8443").unwrap();
        assert!(e.tls);
        for bad in ["http://x:1", "wss://x", "wss://:1/", "x:notaport"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn closes_are_classified() {
        use tungstenite::protocol::frame::coding::CloseCode;
        use tungstenite::protocol::CloseFrame;
        let close = |code: u16, reason: &str| {
            Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_string().into(),
            })
        };
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
}
