//! `iotunnel-baseline-relay`: the relay most users would write, as the baseline that
//! `iotunnel-loadtest throughput --baseline ADDR` measures iotunnel's relay against (issue 3,
//! "CPU per byte"; issue 6, "Baseline relay").
//!
//! tokio (multi-threaded runtime, default worker count) + tokio-tungstenite, plaintext ws (or
//! wss through tokio-rustls with `--tls-cert`/`--tls-key`: the relay's own TLS configuration,
//! ring, TLS 1.2 and 1.3, so `throughput --baseline ADDR --baseline-tls` compares wss like for
//! like), the AWS-family handshake (`/tunnel?local-proxy-mode=source|destination`, `access-token` header,
//! the offered `aws.iot.securetunneling-*` subprotocol echoed back). A `source` and a
//! `destination` connection that present the same token are paired, and one task per direction
//! forwards WebSocket messages as they come (`StreamExt::next` -> `SinkExt::send`). Pings are
//! answered by tungstenite itself. No SERVICE_IDS, no token check against a store, no protocol
//! rules, no metrics: a floor for what any relay must spend per byte.
//!
//! ```text
//! iotunnel-baseline-relay [--listen 127.0.0.1:18600] [--tls-cert FILE --tls-key FILE | --tls-dir DIR]
//! ```
//!
//! `--tls-dir DIR` uses (generating what is missing, as `iotunnel server --data-dir DIR` does)
//! `DIR/tls/server.pem` and `server.key`; peers trust `DIR/tls/ca.pem`.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Connections waiting for their other side, by token: (is source, connection).
type Waiting<S> = Arc<Mutex<HashMap<String, (bool, WebSocketStream<S>)>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:18600".parse()?;
    let (mut cert, mut key) = (None, None);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))
        };
        match a.as_str() {
            "--listen" => listen = value("--listen")?.parse()?,
            "--tls-cert" => cert = Some(std::path::PathBuf::from(value("--tls-cert")?)),
            "--tls-key" => key = Some(std::path::PathBuf::from(value("--tls-key")?)),
            "--tls-dir" => {
                let dir = std::path::PathBuf::from(value("--tls-dir")?);
                let paths = iotunnel::tls::ensure_material(&dir, "127.0.0.1")?;
                (cert, key) = (Some(paths.server_cert), Some(paths.server_key));
            }
            "-h" | "--help" => {
                println!(
                    "usage: iotunnel-baseline-relay [--listen ADDR] [--tls-cert FILE --tls-key FILE \
                     | --tls-dir DIR]  (default 127.0.0.1:18600, plaintext ws)"
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let listener = TcpListener::bind(listen).await?;
    match (cert, key) {
        (Some(cert), Some(key)) => {
            let tls = TlsAcceptor::from(iotunnel::relay::tls::server_config(&cert, &key)?);
            eprintln!(
                "baseline relay listening on wss://{}",
                listener.local_addr()?
            );
            run(listener, move |tcp| {
                let tls = tls.clone();
                async move { Ok(tls.accept(tcp).await?) }
            })
            .await
        }
        (None, None) => {
            eprintln!(
                "baseline relay listening on ws://{}",
                listener.local_addr()?
            );
            run(listener, |tcp| async move { Ok(tcp) }).await
        }
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    }
}

/// Accepts connections, `wrap`s each (TLS or not) and serves it.
async fn run<S, F, W>(listener: TcpListener, wrap: W) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: std::future::Future<Output = anyhow::Result<S>> + Send + 'static,
    W: Fn(TcpStream) -> F,
{
    let waiting: Waiting<S> = Arc::default();
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let waiting = waiting.clone();
        let stream = wrap(tcp);
        tokio::spawn(async move {
            let served = match stream.await {
                Ok(stream) => serve(stream, waiting).await,
                Err(e) => Err(e),
            };
            if let Err(e) = served {
                eprintln!("connection failed: {e}");
            }
        });
    }
}

async fn serve<S>(stream: S, waiting: Waiting<S>) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut who: Option<(bool, String)> = None;
    // The error type is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let refuse = |status: StatusCode, why: &str| {
            let mut r = ErrorResponse::new(Some(why.to_string()));
            *r.status_mut() = status;
            r
        };
        if req.uri().path() != "/tunnel" {
            return Err(refuse(StatusCode::BAD_REQUEST, "bad path"));
        }
        let query = req.uri().query().unwrap_or_default();
        let source = if query.contains("local-proxy-mode=source") {
            true
        } else if query.contains("local-proxy-mode=destination") {
            false
        } else {
            return Err(refuse(StatusCode::BAD_REQUEST, "bad local-proxy-mode"));
        };
        let Some(token) = req
            .headers()
            .get("access-token")
            .and_then(|v| v.to_str().ok())
        else {
            return Err(refuse(StatusCode::UNAUTHORIZED, "no access-token"));
        };
        if let Some(offered) = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
        {
            if let Some(p) = offered
                .split(',')
                .map(str::trim)
                .find(|p| p.starts_with("aws.iot.securetunneling-"))
            {
                if let Ok(v) = HeaderValue::from_str(p) {
                    resp.headers_mut().insert("sec-websocket-protocol", v);
                }
            }
        }
        who = Some((source, token.to_string()));
        Ok(resp)
    };
    let config = WebSocketConfig::default().max_frame_size(Some(131_076));
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    let (source, token) = who.expect("set by the accepted handshake");
    let other = {
        let mut w = waiting.lock().unwrap();
        match w.remove(&token) {
            Some((other_source, other)) if other_source != source => Some(other),
            // Same side again: the newer connection replaces the older one.
            _ => {
                w.insert(token, (source, ws));
                return Ok(());
            }
        }
    };
    let other = other.expect("matched");
    pair(ws, other);
    Ok(())
}

/// One task per direction: messages from one side are sent to the other as they come.
fn pair<S>(a: WebSocketStream<S>, b: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (a_tx, a_rx) = a.split();
    let (b_tx, b_rx) = b.split();
    tokio::spawn(forward(a_rx, b_tx));
    tokio::spawn(forward(b_rx, a_tx));
}

async fn forward<S>(
    mut from: futures_util::stream::SplitStream<WebSocketStream<S>>,
    mut to: futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(msg) = from.next().await {
        match msg {
            Ok(m @ (Message::Binary(_) | Message::Text(_))) => {
                if to.send(m).await.is_err() {
                    break;
                }
            }
            // Pings are answered by tungstenite; pongs and raw frames are not forwarded.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
            Ok(Message::Close(_)) | Err(_) => break,
        }
    }
    let _ = to.close().await;
}
