//! Shared test harness: real servers on 127.0.0.1:0 in temp dirs, an API client and a
//! device-channel client. No fixed ports, no sleeps as synchronisation.
#![allow(dead_code)]

pub mod agent;
pub mod dashboard;
pub mod peers;
pub mod pg;
pub mod process;
pub mod vendor;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use iotunnel::clock::{Clock, ManualClock};
use iotunnel::config::{Secret, Settings};
use iotunnel::server::{Listeners, Server};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The admin key every in-process test server is started with.
pub const ADMIN_KEY: &str = "itk_test-admin-key-0123456789abcdef";

/// Runs each scenario as two tests, `<scenario>::uring` and `<scenario>::epoll`.
#[allow(unused_macros)]
macro_rules! on_both_drivers {
    ($($(#[$attr:meta])* $scenario:ident;)*) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$attr])*
            async fn uring() {
                super::$scenario(iotunnel::config::IoDriver::Uring).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$attr])*
            async fn epoll() {
                super::$scenario(iotunnel::config::IoDriver::Epoll).await
            }
        }
    )*};
}

thread_local! {
    static CONTROL_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn control_only() -> bool {
    CONTROL_ONLY.with(|c| c.get())
}

/// Starts servers on this thread without their relay, so the test plays the data plane
/// through `server.seam`.
pub fn without_relay() {
    CONTROL_ONLY.with(|c| c.set(true));
}

/// An in-process server with a manual clock.
pub struct TestServer {
    pub server: Option<Server>,
    pub clock: ManualClock,
    pub dir: Arc<tempfile::TempDir>,
    pub base: String,
    pub http: reqwest::Client,
}

impl TestServer {
    /// Starts a server in a fresh temp dir.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server in a fresh temp dir after `tweak` adjusts the settings.
    pub async fn start_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let now = iotunnel::clock::SystemClock.now_ms();
        Self::start_in(dir, ManualClock::new(now), tweak).await
    }

    /// Starts a server on an existing data dir (restart) with the given clock.
    pub async fn start_in(
        dir: Arc<tempfile::TempDir>,
        clock: ManualClock,
        tweak: impl FnOnce(&mut Settings),
    ) -> Self {
        let mut settings = Settings::for_tests(dir.path().to_path_buf());
        settings.admin_key = Some(Secret(ADMIN_KEY.into()));
        tweak(&mut settings);
        let listeners = Listeners::bind(&settings).await.unwrap();
        Self::finish(dir, clock, settings, listeners).await
    }

    /// Starts a server (relay included) in `dir` whose tunnel URLs and notifications name
    /// `localhost` and its real relay port (or `public_port`), so agents and clients can dial
    /// them as they are.
    pub async fn start_dialable(
        dir: Arc<tempfile::TempDir>,
        public_port: Option<u16>,
        tweak: impl FnOnce(&mut Settings),
    ) -> Self {
        let clock = ManualClock::new(iotunnel::clock::SystemClock.now_ms());
        Self::start_dialable_at(dir, public_port, clock, tweak).await
    }

    /// [`TestServer::start_dialable`] on a given clock (nodes of a fleet share one, so that
    /// heartbeats compare).
    pub async fn start_dialable_at(
        dir: Arc<tempfile::TempDir>,
        public_port: Option<u16>,
        clock: ManualClock,
        tweak: impl FnOnce(&mut Settings),
    ) -> Self {
        let mut settings = Settings::for_tests(dir.path().to_path_buf());
        settings.admin_key = Some(Secret(ADMIN_KEY.into()));
        tweak(&mut settings);
        let listeners = Listeners::bind(&settings).await.unwrap();
        let relay_port = listeners.relay[0].local_addr().unwrap().port();
        settings.public_relay = iotunnel::config::PublicEndpoint {
            host: "localhost".into(),
            port: public_port.unwrap_or(relay_port),
        };
        Self::finish(dir, clock, settings, listeners).await
    }

    async fn finish(
        dir: Arc<tempfile::TempDir>,
        clock: ManualClock,
        settings: Settings,
        listeners: Listeners,
    ) -> Self {
        let server = if control_only() {
            Server::start_control_plane(settings, Arc::new(clock.clone()), listeners).await
        } else {
            Server::start(settings, Arc::new(clock.clone()), listeners).await
        }
        .unwrap();
        let base = format!("http://{}", server.api_addr);
        Self {
            server: Some(server),
            clock,
            dir,
            base,
            http: reqwest::Client::new(),
        }
    }

    /// The running server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    /// Shuts the server down gracefully.
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }

    /// Calls the API; returns the status and the JSON body (Null when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        process::call_with(&self.http, &self.base, method, path, key, body).await
    }

    pub async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, key, None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, key, Some(body)).await
    }

    pub async fn delete(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, key, None).await
    }

    /// Creates an account; returns its API key.
    pub async fn account(&self, name: &str) -> String {
        let (s, v) = self
            .post("/v1/accounts", ADMIN_KEY, json!({ "name": name }))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["api_key"].as_str().unwrap().to_string()
    }

    /// Creates a product; returns its key.
    pub async fn product(&self, key: &str) -> String {
        let (s, v) = self
            .post("/v1/products", key, json!({ "name": "test product" }))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["product_key"].as_str().unwrap().to_string()
    }

    /// Creates a device; returns its secret.
    pub async fn device(&self, key: &str, product_key: &str, name: &str) -> String {
        let (s, v) = self
            .post(
                &format!("/v1/products/{product_key}/devices"),
                key,
                json!({ "name": name }),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["device_secret"].as_str().unwrap().to_string()
    }

    /// An account with a product and an online device.
    pub async fn online_device(&self) -> Fixture {
        let key = self.account("acme").await;
        let product_key = self.product(&key).await;
        let secret = self.device(&key, &product_key, "dev-1").await;
        let channel = DeviceChannel::connect(self, &product_key, "dev-1", &secret)
            .await
            .unwrap();
        Fixture {
            key,
            product_key,
            device_name: "dev-1".into(),
            secret,
            channel,
        }
    }

    /// Creates a tunnel; returns the 201 body.
    pub async fn tunnel(&self, f: &Fixture, extra: Value) -> Value {
        let mut body = json!({ "product_key": f.product_key, "device_name": f.device_name });
        if let Value::Object(m) = extra {
            for (k, v) in m {
                body[k] = v;
            }
        }
        let (s, v) = self.post("/v1/tunnels", &f.key, body).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }

    /// Waits until the device shows `online` in the device list (bounded).
    pub async fn wait_online(&self, key: &str, product_key: &str, device: &str, online: bool) {
        for _ in 0..500 {
            let (_, v) = self
                .get(&format!("/v1/products/{product_key}/devices"), key)
                .await;
            let found = v["devices"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["device_name"] == device && d["online"] == online);
            if found {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("device {device} never became online={online}");
    }
}

/// An account, product and online device.
pub struct Fixture {
    pub key: String,
    pub product_key: String,
    pub device_name: String,
    pub secret: String,
    pub channel: DeviceChannel,
}

/// The device side of the device channel.
pub struct DeviceChannel {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// Signs a device-channel upgrade: hex HMAC-SHA256(secret, "pk\ndn\nts").
pub fn sign(secret: &str, product_key: &str, device_name: &str, ts: i64) -> String {
    hex::encode(iotunnel::token::hmac_sha256(
        secret.as_bytes(),
        format!("{product_key}\n{device_name}\n{ts}").as_bytes(),
    ))
}

impl DeviceChannel {
    /// Connects with a correct signature at the server clock's time.
    pub async fn connect(
        t: &TestServer,
        pk: &str,
        dn: &str,
        secret: &str,
    ) -> Result<Self, (u16, Value)> {
        let ts = t.clock.now_ms() / 1000;
        Self::connect_raw(t, pk, dn, &ts.to_string(), &sign(secret, pk, dn, ts)).await
    }

    /// Connects with the given timestamp and signature.
    pub async fn connect_raw(
        t: &TestServer,
        pk: &str,
        dn: &str,
        ts: &str,
        sig: &str,
    ) -> Result<Self, (u16, Value)> {
        let url = format!("{}/v1/device/connect", t.base.replace("http://", "ws://"));
        let mut req = url.into_client_request().unwrap();
        let h = req.headers_mut();
        h.insert("x-iotunnel-product-key", pk.parse().unwrap());
        h.insert("x-iotunnel-device-name", dn.parse().unwrap());
        h.insert("x-iotunnel-timestamp", ts.parse().unwrap());
        h.insert("x-iotunnel-signature", sig.parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(Self { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null))
                    .unwrap_or(Value::Null);
                Err((status, body))
            }
            Err(e) => panic!("unexpected connect error: {e}"),
        }
    }

    /// The next JSON notification (bounded wait). Pongs are answered by reading.
    pub async fn next_json(&mut self) -> Value {
        let deadline = Duration::from_secs(10);
        loop {
            let msg = tokio::time::timeout(deadline, self.ws.next())
                .await
                .expect("notification within 10 s")
                .expect("channel open")
                .expect("no error");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Close(c) => panic!("channel closed: {c:?}"),
                _ => continue,
            }
        }
    }

    /// Waits for the server to close the channel; returns the close code.
    pub async fn closed_code(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("close within 10 s")
            {
                Some(Ok(Message::Close(c))) => return c.map(|c| c.code.into()),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Closes the channel.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = self.ws.flush().await;
    }
}

/// Polls `cond` every 10 ms for up to 10 s.
pub async fn wait_for<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1000 {
        if cond().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not met within 10 s");
}
