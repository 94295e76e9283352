//! `iotunnel device`: the device agent. It keeps the device channel up, reconnecting with
//! jittered exponential backoff capped at 30 s, and reports each notification.
//!
//! Dialing the relay on `connect` notifications comes with the relay; today the agent logs
//! them (never the token).
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use rand::Rng;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::clock::{Clock, SystemClock};
use crate::config::Secret;
use crate::token;

/// Longest wait between reconnects (issue: capped at 30 s).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First wait after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Flags of the device agent.
#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Control API base URL.
    #[arg(
        long = "api",
        env = "IOTUNNEL_API",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api_url: String,
    /// The device's product key.
    #[arg(long, env = "IOTUNNEL_PRODUCT_KEY")]
    pub product_key: Option<String>,
    /// The device's name.
    #[arg(long, env = "IOTUNNEL_DEVICE_NAME")]
    pub device_name: Option<String>,
    /// The device secret.
    #[arg(long, env = "IOTUNNEL_DEVICE_SECRET", hide_env_values = true, value_parser = |s: &str| Ok::<_, String>(Secret(s.to_string())))]
    pub device_secret: Option<Secret>,
}

/// Why the channel ended.
enum Ended {
    /// The server closed it on purpose (replaced by a newer channel, or the device was deleted).
    Final(String),
    /// A network error or an ordinary close: reconnect.
    Retry(String),
}

/// Runs the agent until the device is deleted or replaced; network errors never end it.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let pk = args.product_key.context("--product-key is required")?;
    let dn = args.device_name.context("--device-name is required")?;
    let secret = args
        .device_secret
        .context("--device-secret or IOTUNNEL_DEVICE_SECRET is required")?;
    let url = channel_url(&args.api_url)?;
    let mut backoff = FIRST_BACKOFF;
    loop {
        match session(&url, &pk, &dn, &secret).await {
            Ok(Ended::Final(why)) => bail!("device channel ended: {why}"),
            Ok(Ended::Retry(why)) => {
                tracing::warn!(reason = %why, "device channel dropped; reconnecting");
                backoff = FIRST_BACKOFF;
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "device channel failed; retrying"),
        }
        // Full jitter: a fleet that lost the server together does not come back together.
        let wait = rand::thread_rng().gen_range(backoff / 2..=backoff);
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn channel_url(api: &str) -> anyhow::Result<String> {
    let api = api.trim_end_matches('/');
    let base = if let Some(rest) = api.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = api.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        bail!("--api must start with http:// or https://");
    };
    Ok(format!("{base}/v1/device/connect"))
}

async fn session(url: &str, pk: &str, dn: &str, secret: &Secret) -> anyhow::Result<Ended> {
    let ts = SystemClock.now_ms() / 1000;
    let sig = hex::encode(token::hmac_sha256(
        secret.0.as_bytes(),
        format!("{pk}\n{dn}\n{ts}").as_bytes(),
    ));
    let mut req = url.into_client_request()?;
    let h = req.headers_mut();
    h.insert("x-iotunnel-product-key", pk.parse()?);
    h.insert("x-iotunnel-device-name", dn.parse()?);
    h.insert("x-iotunnel-timestamp", ts.to_string().parse()?);
    h.insert("x-iotunnel-signature", sig.parse()?);
    let (mut ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            bail!(
                "the server refused the device channel: HTTP {} {body}",
                resp.status()
            );
        }
        Err(e) => return Err(e).context("cannot reach the device channel"),
    };
    tracing::info!(
        product_key = pk,
        device_name = dn,
        "device channel connected"
    );
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Text(text) => {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                tracing::info!(
                    operation = v["operation"].as_str().unwrap_or("?"),
                    tunnel_id = v["tunnel_id"].as_str().unwrap_or("?"),
                    services = %v["services"],
                    "notification"
                );
            }
            Message::Close(Some(frame))
                if u16::from(frame.code) == 4000 || u16::from(frame.code) == 4001 =>
            {
                return Ok(Ended::Final(frame.reason.to_string()));
            }
            Message::Close(frame) => return Ok(Ended::Retry(format!("closed: {frame:?}"))),
            _ => {}
        }
    }
    Ok(Ended::Retry("connection lost".into()))
}
