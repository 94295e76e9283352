//! `iotunnel-baseline-relay`: the relay most users would write, as the baseline that
//! `iotunnel-loadtest throughput --baseline ADDR` measures iotunnel's relay against (issue 3,
//! "CPU per byte"; issue 6, "Baseline relay").
//!
//! tokio (multi-threaded runtime, default worker count) + tokio-tungstenite, plaintext ws, the
//! AWS-family handshake (`/tunnel?local-proxy-mode=source|destination`, `access-token` header,
//! the offered `aws.iot.securetunneling-*` subprotocol echoed back). A `source` and a
//! `destination` connection that present the same token are paired, and one task per direction
//! forwards WebSocket messages as they come (`StreamExt::next` -> `SinkExt::send`). Pings are
//! answered by tungstenite itself. No SERVICE_IDS, no token check against a store, no protocol
//! rules, no metrics: a floor for what any relay must spend per byte.
//!
//! ```text
//! iotunnel-baseline-relay [--listen 127.0.0.1:18600]
//! ```
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// Connections waiting for their other side, by token: (is source, connection).
type Waiting = Arc<Mutex<HashMap<String, (bool, Ws)>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:18600".parse()?;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                listen = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--listen needs an address"))?
                    .parse()?
            }
            "-h" | "--help" => {
                println!(
                    "usage: iotunnel-baseline-relay [--listen ADDR]  (default 127.0.0.1:18600)"
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let listener = TcpListener::bind(listen).await?;
    eprintln!(
        "baseline relay listening on ws://{}",
        listener.local_addr()?
    );
    let waiting: Waiting = Arc::default();
    loop {
        let (tcp, _) = listener.accept().await?;
        let waiting = waiting.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(tcp, waiting).await {
                eprintln!("connection failed: {e}");
            }
        });
    }
}

async fn serve(tcp: TcpStream, waiting: Waiting) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
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
    let ws = tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await?;
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
fn pair(a: Ws, b: Ws) {
    let (a_tx, a_rx) = a.split();
    let (b_tx, b_rx) = b.split();
    tokio::spawn(forward(a_rx, b_tx));
    tokio::spawn(forward(b_rx, a_tx));
}

async fn forward(
    mut from: futures_util::stream::SplitStream<Ws>,
    mut to: futures_util::stream::SplitSink<Ws, Message>,
) {
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
