//! API setup shared by the scenarios: reaching the API, creating a product and its devices,
//! and holding each device's channel (`GET /v1/device/connect`) open while a scenario runs.
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// How long to wait for a TCP connection to the API before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound for one API request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A handle on the control API: base URL, key and an HTTP client.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

/// Why an API call failed: the HTTP status and the envelope's `code` (or the transport error).
#[derive(Debug)]
pub struct ApiFailure {
    /// HTTP status, or `None` for a transport error.
    pub status: Option<u16>,
    /// The error envelope's code (e.g. `tunnel_limit`), or a transport error kind.
    pub code: String,
    /// The message, for people.
    pub message: String,
}

impl ApiFailure {
    /// A stable key to count failures by, e.g. `429 tunnel_limit` or `transport timeout`.
    pub fn kind(&self) -> String {
        match self.status {
            Some(s) => format!("{s} {}", self.code),
            None => format!("transport {}", self.code),
        }
    }

    fn transport(e: &reqwest::Error) -> Self {
        let code = if e.is_timeout() {
            "timeout"
        } else if e.is_connect() {
            "connect"
        } else if e.is_body() || e.is_decode() {
            "body"
        } else {
            "request"
        };
        Self {
            status: None,
            code: code.into(),
            message: error_chain(e),
        }
    }

    /// Builds the failure from a non-success response, reading the error envelope if any.
    pub async fn from_response(resp: reqwest::Response) -> Self {
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        let envelope: Option<Value> = serde_json::from_str(&body).ok();
        let field = |f: &str| {
            envelope
                .as_ref()
                .and_then(|v| v.pointer(&format!("/error/{f}")))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Self {
            status: Some(status),
            code: field("code").unwrap_or_else(|| "unknown".into()),
            message: field("message").unwrap_or_else(|| body.chars().take(200).collect()),
        }
    }
}

/// An error with its causes, `outer: inner: root`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_text = c.to_string();
        if !s.ends_with(&c_text) {
            s.push_str(": ");
            s.push_str(&c_text);
        }
        cur = c.source();
    }
    s
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "HTTP {s} {}: {}", self.code, self.message),
            None => write!(f, "{} error: {}", self.code, self.message),
        }
    }
}

impl std::error::Error for ApiFailure {}

impl Api {
    /// A handle on the API at `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str, key: &str) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        let url =
            reqwest::Url::parse(&base).with_context(|| format!("invalid --api URL {base:?}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("--api must be an http:// or https:// URL, got {base:?}");
        }
        if key.trim().is_empty() {
            bail!("an API key is required: --api-key or IOTUNNEL_API_KEY");
        }
        Ok(Self {
            base,
            key: key.trim().to_string(),
            http: Self::build_client()?,
        })
    }

    fn build_client() -> anyhow::Result<reqwest::Client> {
        reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("cannot build the HTTP client")
    }

    /// The same API with its own HTTP client (own connection pool), for one load task.
    pub fn with_own_client(&self) -> anyhow::Result<Self> {
        Ok(Self {
            http: Self::build_client()?,
            ..self.clone()
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to `path` with the API key.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Fails fast, with a clear message, when the API is unreachable, not iotunnel, or the key is
    /// refused.
    pub async fn check(&self) -> anyhow::Result<()> {
        let url = format!("{}/healthz", self.base);
        let resp = self
            .http
            .get(&url)
            .timeout(CONNECT_TIMEOUT)
            .send()
            .await
            .map_err(|e| {
                anyhow!(
                    "cannot reach the iotunnel API at {}: {}. Is `iotunnel server` running with \
                     --api-addr matching --api?",
                    self.base,
                    ApiFailure::transport(&e)
                )
            })?;
        if !resp.status().is_success() {
            bail!(
                "{url} answered HTTP {}: is {} the iotunnel control API?",
                resp.status(),
                self.base
            );
        }
        // A cheap authenticated call, so a wrong key is reported before any setup.
        let resp = self
            .request(reqwest::Method::GET, "/v1/products")
            .send()
            .await
            .map_err(|e| {
                anyhow!(
                    "GET {}/v1/products: {}",
                    self.base,
                    ApiFailure::transport(&e)
                )
            })?;
        match resp.status().as_u16() {
            200 => Ok(()),
            401 | 403 => Err(anyhow!(
                "the API key was refused ({}): pass an account or admin key with --api-key \
                 (or IOTUNNEL_API_KEY)",
                ApiFailure::from_response(resp).await
            )),
            _ => Err(anyhow!(
                "GET /v1/products failed: {}",
                ApiFailure::from_response(resp).await
            )),
        }
    }

    /// POSTs JSON and expects 201 Created, returning the body.
    pub async fn post_created(&self, path: &str, body: &Value) -> Result<Value, ApiFailure> {
        let resp = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .map_err(|e| ApiFailure::transport(&e))?;
        if resp.status() != reqwest::StatusCode::CREATED {
            return Err(ApiFailure::from_response(resp).await);
        }
        resp.json().await.map_err(|e| ApiFailure::transport(&e))
    }

    /// Creates a product and returns its key.
    pub async fn create_product(&self, name: &str) -> anyhow::Result<String> {
        let v = self
            .post_created("/v1/products", &json!({ "name": name }))
            .await
            .context("POST /v1/products")?;
        str_field(&v, "product_key")
    }

    /// Creates a device and returns its credentials.
    pub async fn create_device(
        &self,
        product_key: &str,
        name: &str,
    ) -> anyhow::Result<DeviceCreds> {
        let v = self
            .post_created(
                &format!("/v1/products/{product_key}/devices"),
                &json!({ "name": name }),
            )
            .await
            .with_context(|| format!("POST /v1/products/{product_key}/devices"))?;
        Ok(DeviceCreds {
            product_key: str_field(&v, "product_key")?,
            device_name: str_field(&v, "device_name")?,
            device_secret: str_field(&v, "device_secret")?,
        })
    }

    /// The names of the product's devices that are online.
    pub async fn online_devices(&self, product_key: &str) -> anyhow::Result<BTreeSet<String>> {
        #[derive(Deserialize)]
        struct List {
            devices: Vec<Dev>,
        }
        #[derive(Deserialize)]
        struct Dev {
            device_name: String,
            online: bool,
        }
        let resp = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/products/{product_key}/devices"),
            )
            .send()
            .await
            .map_err(|e| ApiFailure::transport(&e))?;
        if !resp.status().is_success() {
            return Err(ApiFailure::from_response(resp).await.into());
        }
        let list: List = resp.json().await.context("device list")?;
        Ok(list
            .devices
            .into_iter()
            .filter(|d| d.online)
            .map(|d| d.device_name)
            .collect())
    }
}

fn str_field(v: &Value, f: &str) -> anyhow::Result<String> {
    v.get(f)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("the API's answer lacks {f:?}: {v}"))
}

/// A device's credentials, as `POST /v1/products/{pk}/devices` shows them once.
#[derive(Debug, Clone)]
pub struct DeviceCreds {
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// Device secret (the HMAC key, as its UTF-8 bytes).
    pub device_secret: String,
}

/// Lowercase hex HMAC-SHA256(key = secret, message = `{pk}\n{dn}\n{ts}`): the device channel's
/// signature.
pub fn sign(secret: &str, product_key: &str, device_name: &str, timestamp: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{product_key}\n{device_name}\n{timestamp}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// What a device channel's reader saw.
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// `connect` notifications received.
    pub connects: AtomicU64,
    /// Other text messages received (`close` notifications and anything else).
    pub other: AtomicU64,
    /// Why the channel ended before the scenario closed it, if it did.
    pub ended: Mutex<Option<String>>,
}

/// One device's open channel, read by a background task (which also answers the server's pings).
pub struct DeviceChannel {
    /// The device.
    pub device_name: String,
    /// What the reader saw.
    pub stats: Arc<ChannelStats>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl DeviceChannel {
    /// Opens the device's channel on the API port and starts reading it.
    #[allow(dead_code)] // The scenarios use `connect_with` (through `Fleet`) today.
    pub async fn connect(api_base: &str, creds: &DeviceCreds) -> anyhow::Result<Self> {
        Self::connect_with(api_base, creds, None).await
    }

    /// Like [`DeviceChannel::connect`], and also passes each `connect` notification (the whole
    /// JSON object: tunnel id, device token, endpoint, ...) to `notify` when given.
    pub async fn connect_with(
        api_base: &str,
        creds: &DeviceCreds,
        notify: Option<mpsc::UnboundedSender<Value>>,
    ) -> anyhow::Result<Self> {
        let ws_base = if let Some(rest) = api_base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else if let Some(rest) = api_base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else {
            bail!("cannot derive the device channel URL from {api_base:?}");
        };
        let url = format!("{ws_base}/v1/device/connect");
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .to_string();
        let sig = sign(
            &creds.device_secret,
            &creds.product_key,
            &creds.device_name,
            &ts,
        );
        let mut req = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("device channel URL {url}"))?;
        let h = req.headers_mut();
        for (name, value) in [
            ("x-iotunnel-product-key", creds.product_key.as_str()),
            ("x-iotunnel-device-name", creds.device_name.as_str()),
            ("x-iotunnel-timestamp", ts.as_str()),
            ("x-iotunnel-signature", sig.as_str()),
        ] {
            h.insert(name, HeaderValue::from_str(value).context("header value")?);
        }
        let (ws, _resp) =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(req))
                .await
                .map_err(|_| anyhow!("device channel {url}: no answer within {CONNECT_TIMEOUT:?}"))?
                .with_context(|| {
                    format!(
                        "device channel for {}/{}",
                        creds.product_key, creds.device_name
                    )
                })?;
        let stats = Arc::new(ChannelStats::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(read_channel(ws, stats.clone(), stop_rx, notify));
        Ok(Self {
            device_name: creds.device_name.clone(),
            stats,
            stop: Some(stop_tx),
            task,
        })
    }

    /// Closes the channel (a normal close) and waits for the reader to end.
    pub async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.task).await;
        self.task.abort();
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn read_channel(
    mut ws: Ws,
    stats: Arc<ChannelStats>,
    mut stop: oneshot::Receiver<()>,
    notify: Option<mpsc::UnboundedSender<Value>>,
) {
    #[derive(Deserialize)]
    struct Note<'a> {
        #[serde(borrow)]
        operation: &'a str,
    }
    let ended = loop {
        tokio::select! {
            _ = &mut stop => {
                let _ = ws.close(None).await;
                return;
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) if notify.is_some() => {
                    match serde_json::from_str::<Value>(text.as_str()) {
                        Ok(v) if v["operation"] == "connect" => {
                            stats.connects.fetch_add(1, Ordering::Relaxed);
                            if let Some(tx) = &notify {
                                let _ = tx.send(v);
                            }
                        }
                        _ => {
                            stats.other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    match serde_json::from_str::<Note>(text.as_str()) {
                        Ok(n) if n.operation == "connect" => {
                            stats.connects.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            stats.other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                // Pings are answered by tungstenite itself while we keep reading.
                Some(Ok(Message::Close(frame))) => {
                    break format!("closed by the server: {frame:?}");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("error: {e}"),
                None => break "connection ended".to_string(),
            },
        }
    };
    *stats.ended.lock().unwrap() = Some(ended);
}

/// A product with devices whose channels are up.
pub struct Fleet {
    /// The product's key.
    pub product_key: String,
    /// The devices, in creation order.
    pub devices: Vec<DeviceCreds>,
    /// Their channels, in the same order.
    pub channels: Vec<DeviceChannel>,
}

impl Fleet {
    /// Creates a product named `{prefix}-{unix ms}` with `n` devices, connects each device's
    /// channel and waits until the API lists them all online.
    pub async fn create(api: &Api, prefix: &str, n: usize) -> anyhow::Result<Self> {
        Self::create_with(api, prefix, n, None).await
    }

    /// Like [`Fleet::create`], and also passes every channel's `connect` notifications to
    /// `notify` when given (see [`DeviceChannel::connect_with`]).
    pub async fn create_with(
        api: &Api,
        prefix: &str,
        n: usize,
        notify: Option<mpsc::UnboundedSender<Value>>,
    ) -> anyhow::Result<Self> {
        if n == 0 {
            bail!("at least one device is needed");
        }
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let product_key = api.create_product(&format!("{prefix}-{stamp}")).await?;
        let mut devices = Vec::with_capacity(n);
        for i in 0..n {
            devices.push(
                api.create_device(&product_key, &format!("lt-dev-{i}"))
                    .await?,
            );
        }
        let mut channels = Vec::with_capacity(n);
        for d in &devices {
            channels.push(DeviceChannel::connect_with(api.base(), d, notify.clone()).await?);
        }
        // The server registers a channel just after the upgrade answer; wait until it is online
        // so that the first creates do not race it (409 device_offline).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let online = api.online_devices(&product_key).await?;
            if devices.iter().all(|d| online.contains(&d.device_name)) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {n} device channels show online after 10 s",
                    online.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            product_key,
            devices,
            channels,
        })
    }

    /// `connect` notifications received over all channels.
    pub fn connects(&self) -> u64 {
        self.channels
            .iter()
            .map(|c| c.stats.connects.load(Ordering::Relaxed))
            .sum()
    }

    /// Channels that ended on their own, with why.
    pub fn dropped(&self) -> Vec<(String, String)> {
        self.channels
            .iter()
            .filter_map(|c| {
                c.stats
                    .ended
                    .lock()
                    .unwrap()
                    .clone()
                    .map(|why| (c.device_name.clone(), why))
            })
            .collect()
    }

    /// Closes every channel.
    pub async fn close(self) {
        for c in self.channels {
            c.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_lowercase_hex_hmac() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let s = sign("secret", "pk", "dev", "1700000000");
        assert_eq!(s.len(), 64);
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(b"pk\ndev\n1700000000");
        assert_eq!(s, hex::encode(mac.finalize().into_bytes()));
    }

    #[test]
    fn failure_kinds() {
        let f = ApiFailure {
            status: Some(429),
            code: "tunnel_limit".into(),
            message: "x".into(),
        };
        assert_eq!(f.kind(), "429 tunnel_limit");
    }
}
