//! Tunnel pairs, shared by the peer scenarios: the flags that say where the peers go, dialing
//! the relay (source addresses spread over 127.0.0.0/8), tunnels created through the API with
//! the device token from the device channel, and the `--direct` and `--baseline` pairings.
//!
//! Where a pair comes from:
//! - default: a tunnel created through the API (a product, devices online on their channels,
//!   the device token from the channel's `connect` notification), both peers dialing the
//!   iotunnel relay;
//! - `--baseline ADDR`: no API; a random token per pair, both peers dialing a plain ws relay
//!   (`iotunnel-baseline-relay`, AWS family only), which sends no SERVICE_IDS;
//! - `--direct`: no relay. The loadtest listens itself; each client peer dials it and the
//!   accepted WebSocket becomes the device peer, so the same endpoint code runs with nothing
//!   between client and device: the baseline for "relay vs direct".
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use futures_util::StreamExt;
use indicatif::ProgressBar;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::setup::{Api, Fleet};
use crate::sys::{self, ProcUsage};
use crate::wire::{self, Channel, Family, Side};

/// A peer's WebSocket, dialed or (direct mode, device side) accepted.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Handshakes (TCP, TLS, upgrade, SERVICE_IDS) must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Tunnel creates in flight during setup (the API's group commit likes a few at once).
const CREATE_CONCURRENCY: usize = 16;
/// Pairs dialed at once during setup: enough to hide a round trip, few enough that the
/// relay's accept queue never overflows.
const DIAL_CONCURRENCY: usize = 64;

/// Where the peers go and how they speak: the flags every peer scenario takes.
#[derive(Args, Debug, Clone)]
pub struct PeerArgs {
    /// Control API base URL (relay mode).
    #[arg(long, env = "IOTUNNEL_API", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// API key, an account's or the admin key (relay mode).
    #[arg(long, env = "IOTUNNEL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The relay serves ws:// (server started with --relay-plaintext).
    #[arg(long)]
    pub plaintext: bool,
    /// PEM CA the relay's certificate chains to (the server's {data-dir}/tls/ca.pem).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The relay's host:port for every peer (default: each tunnel's `client_endpoint` from
    /// the API, its owner node's relay).
    #[arg(long, value_name = "HOST:PORT")]
    pub relay: Option<String>,
    /// Client peers dial the first of these relays (comma-separated host:port) that is not
    /// their tunnel's own, so in a fleet they reach a non-owner node and cross the mesh;
    /// device peers still dial the owner's.
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    pub client_relay: Vec<String>,
    /// Devices the tunnels are spread over (relay mode).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub devices: u32,
    /// Protocol family the peers speak.
    #[arg(long, value_enum, default_value_t = Family::Aws)]
    pub family: Family,
    /// No relay: client and device peers connected directly to each other, in process.
    #[arg(long, conflicts_with = "baseline")]
    pub direct: bool,
    /// Dial a plain ws baseline relay (iotunnel-baseline-relay) at this host:port; no API.
    #[arg(long, value_name = "ADDR")]
    pub baseline: Option<String>,
    /// The --baseline relay serves wss (started with --tls-cert/--tls-key), trusted through
    /// --ca-file.
    #[arg(long, requires = "baseline")]
    pub baseline_tls: bool,
    /// Source addresses the peers bind to (127.0.1.1, 127.0.1.2, ... round-robin) when the
    /// relay is on loopback, each with its own ephemeral port range; 1 = the kernel's choice.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    pub source_ips: u32,
    /// The relay's process id: its CPU time, RSS and open files are read from /proc.
    #[arg(long, value_name = "PID")]
    pub relay_pid: Option<u32>,
}

impl PeerArgs {
    /// Where the pairs come from.
    pub fn mode(&self) -> Mode {
        if self.direct {
            Mode::Direct
        } else if self.baseline.is_some() {
            Mode::Baseline
        } else {
            Mode::Relay
        }
    }

    /// The relay's usage now, when `--relay-pid` names it.
    pub fn relay_usage(&self) -> anyhow::Result<Option<ProcUsage>> {
        self.relay_pid
            .map(|p| sys::proc_usage(&p.to_string()).with_context(|| format!("--relay-pid {p}")))
            .transpose()
    }
}

/// Where the pairs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Tunnels through the API and the iotunnel relay.
    Relay,
    /// Peers connected to each other in process.
    Direct,
    /// The plain tokio-tungstenite relay.
    Baseline,
}

impl Mode {
    /// `relay`, `direct` or `baseline`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Relay => "relay",
            Mode::Direct => "direct",
            Mode::Baseline => "baseline",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dialing.

/// Dials one relay (or the in-process direct listener) as peers of one family.
pub struct Dialer {
    family: Family,
    base: String,
    addr: SocketAddr,
    connector: Option<Connector>,
    /// The relay sends SERVICE_IDS first (the iotunnel relay, AWS family).
    greeted: bool,
    source_ips: u32,
    next_source: AtomicU32,
}

impl Dialer {
    /// A dialer for `host_port`; `tls` with the CA of `ca_file`.
    pub async fn new(
        host_port: &str,
        tls: bool,
        ca_file: Option<&std::path::Path>,
        family: Family,
        greeted: bool,
        source_ips: u32,
    ) -> anyhow::Result<Self> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host_port)
            .await
            .with_context(|| format!("cannot resolve the relay address {host_port:?}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| anyhow!("{host_port:?} resolves to no address"))?;
        let connector = if tls {
            Some(Connector::Rustls(iotunnel::agent::dial::tls_config(
                ca_file,
            )?))
        } else {
            None
        };
        let scheme = if tls { "wss" } else { "ws" };
        Ok(Self {
            family,
            base: format!("{scheme}://{host_port}"),
            addr,
            connector,
            greeted: greeted && family.greets(),
            source_ips: if addr.ip().is_loopback() && addr.is_ipv4() {
                source_ips
            } else {
                1
            },
            next_source: AtomicU32::new(0),
        })
    }

    /// `ws://host:port` or `wss://host:port`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// TCP connect, from the next source address when spreading.
    async fn connect_tcp(&self) -> std::io::Result<TcpStream> {
        if self.source_ips <= 1 {
            return TcpStream::connect(self.addr).await;
        }
        let k = self.next_source.fetch_add(1, Ordering::Relaxed) % self.source_ips;
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 1, 1)) + k);
        let socket = TcpSocket::new_v4()?;
        sys::bind_address_no_port(socket.as_raw_fd())?;
        socket.bind(SocketAddr::new(src.into(), 0))?;
        socket.connect(self.addr).await
    }

    /// Dials the `side` of `tunnel_id` with `token`; with a greeting relay, reads and checks
    /// SERVICE_IDS.
    pub async fn dial(&self, side: Side, tunnel_id: &str, token: &str) -> anyhow::Result<Ws> {
        let url = format!("{}{}", self.base, self.family.path(tunnel_id, side));
        let mut req = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("relay URL {url}"))?;
        let h = req.headers_mut();
        h.insert(
            self.family.token_header(),
            HeaderValue::from_str(token).context("token is not a header value")?,
        );
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(self.family.subprotocol()),
        );
        let handshake = async {
            let tcp = self.connect_tcp().await?;
            let _ = tcp.set_nodelay(true);
            tokio_tungstenite::client_async_tls_with_config(
                req,
                tcp,
                Some(crate::wire::ws_config()),
                self.connector.clone(),
            )
            .await
        };
        let mut ws = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Err(_) => bail!("{url}: no upgrade within {HANDSHAKE_TIMEOUT:?}"),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(|b| {
                        String::from_utf8_lossy(b)
                            .chars()
                            .take(300)
                            .collect::<String>()
                    })
                    .unwrap_or_default();
                bail!(
                    "{url}: the relay refused the upgrade: HTTP {} {body}",
                    resp.status()
                )
            }
            Ok(Err(e)) => {
                let hint = if self.base.starts_with("wss") {
                    " (a wss relay needs --ca-file {data-dir}/tls/ca.pem; a ws one needs --plaintext)"
                } else {
                    " (is the relay up, and plaintext? a wss relay needs --ca-file instead of --plaintext)"
                };
                return Err(anyhow!("{url}: {e}{hint}"));
            }
            Ok(Ok((ws, _))) => ws,
        };
        if self.greeted {
            read_service_ids(&mut ws)
                .await
                .with_context(|| url.clone())?;
        }
        Ok(ws)
    }
}

/// Reads the relay's greeting, SERVICE_IDS in a frame of its own.
async fn read_service_ids(ws: &mut Ws) -> anyhow::Result<()> {
    use iotunnel::proto::aws::{self, MessageType};
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, ws.next())
        .await
        .map_err(|_| anyhow!("no SERVICE_IDS within {HANDSHAKE_TIMEOUT:?}"))?;
    match first {
        Some(Ok(WsMessage::Binary(b))) => match aws::decode_message(&b)? {
            Some((m, used)) if m.r#type == MessageType::ServiceIds as i32 && used == b.len() => {
                Ok(())
            }
            other => bail!("the first message is not SERVICE_IDS alone: {other:?}"),
        },
        Some(Ok(WsMessage::Close(f))) => bail!(
            "the relay closed the connection: {}",
            crate::wire::describe_close(&f)
        ),
        other => bail!("expected SERVICE_IDS, got {other:?}"),
    }
}

/// A random token (hex), different for each `i`.
pub fn random_token(i: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(i);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let a = h.finish();
    h.write_u64(a);
    format!("lt-{a:016x}{:016x}-{i}", h.finish())
}

// ---------------------------------------------------------------------------------------------
// Tunnels through the API.

/// What `POST /v1/tunnels` returned.
#[derive(Debug, Clone)]
pub struct Created {
    /// The tunnel id.
    pub id: String,
    /// The client side's token.
    pub client_token: String,
    /// The relay's host:port for clients.
    pub endpoint: String,
}

/// Device tokens from the channels' `connect` notifications, by tunnel id; a notification may
/// come before or after its create's answer.
#[derive(Default)]
struct Notes {
    slots: Mutex<HashMap<String, NoteSlot>>,
}

enum NoteSlot {
    Arrived(String),
    Waiting(oneshot::Sender<String>),
}

impl Notes {
    fn deliver(&self, id: String, token: String) {
        let mut slots = self.slots.lock().unwrap();
        match slots.remove(&id) {
            Some(NoteSlot::Waiting(tx)) => {
                let _ = tx.send(token);
            }
            // A channel's reconnect repeats notifications; the first token is as good.
            Some(arrived @ NoteSlot::Arrived(_)) => {
                slots.insert(id, arrived);
            }
            None => {
                slots.insert(id, NoteSlot::Arrived(token));
            }
        }
    }

    async fn take(&self, id: &str) -> anyhow::Result<String> {
        let rx = {
            let mut slots = self.slots.lock().unwrap();
            match slots.remove(id) {
                Some(NoteSlot::Arrived(token)) => return Ok(token),
                _ => {
                    let (tx, rx) = oneshot::channel();
                    slots.insert(id.to_string(), NoteSlot::Waiting(tx));
                    rx
                }
            }
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, rx).await {
            Ok(Ok(token)) => Ok(token),
            _ => {
                self.slots.lock().unwrap().remove(id);
                bail!("no device notification for tunnel {id} within {HANDSHAKE_TIMEOUT:?}")
            }
        }
    }
}

/// A product with online devices, creating and closing tunnels to them through the API.
pub struct Tunnels {
    /// The API.
    pub api: Api,
    fleet: Fleet,
    notes: Arc<Notes>,
    next_device: AtomicUsize,
    family: Family,
    dispatch: JoinHandle<()>,
}

impl Tunnels {
    /// Checks the API, creates a product with `--devices` devices and brings their channels up.
    pub async fn setup(args: &PeerArgs, prefix: &str) -> anyhow::Result<Self> {
        let key = args
            .api_key
            .as_deref()
            .ok_or_else(|| anyhow!("an API key is required: --api-key or IOTUNNEL_API_KEY"))?;
        let api = Api::new(&args.api, key)?;
        api.check().await?;
        let (note_tx, mut note_rx) = mpsc::unbounded_channel::<Value>();
        let fleet = Fleet::create_with(&api, prefix, args.devices as usize, Some(note_tx))
            .await
            .context("setting up the product and devices")?;
        let notes = Arc::new(Notes::default());
        let dispatch = {
            let notes = notes.clone();
            tokio::spawn(async move {
                while let Some(n) = note_rx.recv().await {
                    if let (Some(id), Some(token)) = (n["tunnel_id"].as_str(), n["token"].as_str())
                    {
                        notes.deliver(id.to_string(), token.to_string());
                    }
                }
            })
        };
        Ok(Self {
            api,
            fleet,
            notes,
            next_device: AtomicUsize::new(0),
            family: args.family,
            dispatch,
        })
    }

    /// Creates a tunnel to the next device (round-robin).
    pub async fn create(&self) -> anyhow::Result<Created> {
        let i = self.next_device.fetch_add(1, Ordering::Relaxed);
        let d = &self.fleet.devices[i % self.fleet.devices.len()];
        let body = json!({
            "product_key": d.product_key,
            "device_name": d.device_name,
            "services": [self.family.service()],
            "description": "iotunnel-loadtest",
        });
        let v = self
            .api
            .post_created("/v1/tunnels", &body)
            .await
            .map_err(|e| {
                if e.code == "tunnel_limit" {
                    anyhow!(
                        "POST /v1/tunnels: {e}. Start the server with \
                         --max-open-tunnels-per-device 100000000 (or use more --devices)"
                    )
                } else {
                    anyhow!("POST /v1/tunnels: {e}")
                }
            })?;
        let field = |f: &str| {
            v[f].as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("the create answer lacks {f:?}: {v}"))
        };
        Ok(Created {
            id: field("tunnel_id")?,
            client_token: field("client_token")?,
            endpoint: field("client_endpoint")?,
        })
    }

    /// The device token of tunnel `id`, from its device's channel.
    pub async fn device_token(&self, id: &str) -> anyhow::Result<String> {
        self.notes.take(id).await
    }

    /// Closes tunnel `id` (`POST /v1/tunnels/{id}/close`).
    pub async fn close(&self, id: &str) -> anyhow::Result<()> {
        let resp = self
            .api
            .request(reqwest::Method::POST, &format!("/v1/tunnels/{id}/close"))
            .send()
            .await
            .with_context(|| format!("POST /v1/tunnels/{id}/close"))?;
        if !resp.status().is_success() {
            let f = crate::setup::ApiFailure::from_response(resp).await;
            bail!("POST /v1/tunnels/{id}/close: {f}");
        }
        Ok(())
    }

    /// Device channels that ended on their own, with why.
    pub fn dropped_channels(&self) -> Vec<(String, String)> {
        self.fleet.dropped()
    }

    /// Closes the device channels.
    pub async fn shutdown(self) {
        self.dispatch.abort();
        self.fleet.close().await;
    }
}

/// The relays the peers of API-created tunnels dial, one [`Dialer`] per host:port, made on
/// first use: in a fleet each tunnel's endpoint names its owner node.
pub struct Relays {
    args: PeerArgs,
    dialers: tokio::sync::Mutex<HashMap<String, Arc<Dialer>>>,
}

impl Relays {
    /// No dialer yet.
    pub fn new(args: &PeerArgs) -> Self {
        Self {
            args: args.clone(),
            dialers: Default::default(),
        }
    }

    async fn dialer(&self, host_port: &str) -> anyhow::Result<Arc<Dialer>> {
        let mut dialers = self.dialers.lock().await;
        if let Some(d) = dialers.get(host_port) {
            return Ok(d.clone());
        }
        let args = &self.args;
        let d = Arc::new(
            Dialer::new(
                host_port,
                !args.plaintext,
                args.ca_file.as_deref(),
                args.family,
                true,
                args.source_ips,
            )
            .await?,
        );
        dialers.insert(host_port.to_string(), d.clone());
        Ok(d)
    }

    /// The dialers for the device and the client peer of a tunnel whose endpoint is
    /// `endpoint`: `--relay` when given, else the endpoint; the client's is the first
    /// `--client-relay` that differs from the device's.
    pub async fn for_tunnel(&self, endpoint: &str) -> anyhow::Result<(Arc<Dialer>, Arc<Dialer>)> {
        let device_at = self.args.relay.as_deref().unwrap_or(endpoint);
        let client_at = self
            .args
            .client_relay
            .iter()
            .find(|r| r.as_str() != device_at)
            .map_or(device_at, String::as_str);
        Ok((self.dialer(device_at).await?, self.dialer(client_at).await?))
    }

    /// Every base dialed so far (`ws://a:1 ws://b:2`), for reports.
    pub async fn describe(&self) -> String {
        let mut bases: Vec<String> = self
            .dialers
            .lock()
            .await
            .values()
            .map(|d| d.base().to_string())
            .collect();
        bases.sort();
        bases.join(" ")
    }
}

// ---------------------------------------------------------------------------------------------
// Direct pairing.

/// The in-process endpoint client peers dial in `--direct` mode: each accepted WebSocket is
/// handed to whoever registered its token.
pub struct DirectServer {
    /// The listening address.
    pub addr: SocketAddr,
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Ws>>>>,
    task: JoinHandle<()>,
}

impl DirectServer {
    /// Listens on 127.0.0.1 (any 127/8 source can reach it).
    pub async fn start(family: Family) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Ws>>>> = Arc::default();
        let task = {
            let waiting = waiting.clone();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(accept_direct(tcp, family, waiting.clone()));
                }
            })
        };
        Ok(Self {
            addr,
            waiting,
            task,
        })
    }

    /// Connects one direct pair: dials as the client with a fresh token and returns
    /// `(client, device)`.
    pub async fn pair(&self, dialer: &Dialer, i: usize) -> anyhow::Result<(Ws, Ws)> {
        let token = random_token(i);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().insert(token.clone(), tx);
        let client = dialer.dial(Side::Client, "direct", &token).await?;
        let device = tokio::time::timeout(HANDSHAKE_TIMEOUT, rx)
            .await
            .map_err(|_| anyhow!("the in-process server did not accept peer {i}"))?
            .map_err(|_| anyhow!("the in-process server dropped peer {i}"))?;
        Ok((client, device))
    }
}

impl Drop for DirectServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_direct(
    tcp: TcpStream,
    family: Family,
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Ws>>>>,
) {
    let _ = tcp.set_nodelay(true);
    let mut token = None;
    // The error type is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| {
        token = req
            .headers()
            .get(family.token_header())
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        resp.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(family.subprotocol()),
        );
        Ok::<_, ErrorResponse>(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(
        MaybeTlsStream::Plain(tcp),
        callback,
        Some(crate::wire::ws_config()),
    )
    .await
    else {
        return;
    };
    let tx = token.and_then(|t| waiting.lock().unwrap().remove(&t));
    if let Some(tx) = tx {
        let _ = tx.send(ws);
    }
}

// ---------------------------------------------------------------------------------------------
// Pairs for a scenario.

/// One tunnel's two peers, with their channels open.
pub struct Pair {
    /// The client peer (`source`).
    pub client: Ws,
    /// The device peer.
    pub device: Ws,
    /// The open channels (AWS connection ids or Alibaba sessions), the same on both peers.
    pub channels: Vec<Channel>,
}

/// What keeps the pairs' far ends alive.
enum Keep {
    Relay(Tunnels),
    /// Held for its `Drop`, which stops the listener.
    Direct {
        _listener: DirectServer,
    },
    Nothing,
}

/// The pairs of a run and what they need kept alive.
pub struct Pairs {
    /// The pairs, in order.
    pub pairs: Vec<Pair>,
    /// Where they come from.
    pub mode: Mode,
    /// What the peers dialed (`ws://127.0.0.1:8443`, `in-process ws://...`).
    pub desc: String,
    /// The relay's usage after the tunnels were created, before any peer dialed (relay mode
    /// with `--relay-pid`).
    pub relay_after_create: Option<ProcUsage>,
    keep: Keep,
}

impl Pairs {
    /// Connects `n` pairs, each with `streams` channels open; `progress` counts pairs done.
    pub async fn connect(
        args: &PeerArgs,
        n: usize,
        streams: u32,
        progress: &ProgressBar,
    ) -> anyhow::Result<Self> {
        let family = args.family;
        let mode = args.mode();
        let mut relay_after_create = None;
        let (raw, desc, keep): (Vec<(Ws, Ws)>, String, Keep) = match mode {
            Mode::Relay => {
                let tunnels = Tunnels::setup(args, "loadtest").await?;
                let created: Vec<anyhow::Result<Created>> =
                    futures_util::stream::iter((0..n).map(|_| tunnels.create()))
                        .buffered(CREATE_CONCURRENCY)
                        .collect()
                        .await;
                let created = created.into_iter().collect::<Result<Vec<_>, _>>()?;
                relay_after_create = args.relay_usage()?;
                if created.is_empty() {
                    bail!("no tunnels");
                }
                let relays = Relays::new(args);
                let raw = collect_pairs(created.iter().map(|c| {
                    let (tunnels, relays) = (&tunnels, &relays);
                    async move {
                        let (device_dialer, client_dialer) = relays.for_tunnel(&c.endpoint).await?;
                        let token = tunnels.device_token(&c.id).await?;
                        let device = device_dialer
                            .dial(Side::Device, &c.id, &token)
                            .await
                            .with_context(|| format!("device peer of tunnel {}", c.id))?;
                        let client = client_dialer
                            .dial(Side::Client, &c.id, &c.client_token)
                            .await
                            .with_context(|| format!("client peer of tunnel {}", c.id))?;
                        progress.inc(1);
                        Ok((client, device))
                    }
                }))
                .await?;
                (raw, relays.describe().await, Keep::Relay(tunnels))
            }
            Mode::Baseline => {
                if family != Family::Aws {
                    bail!("the baseline relay speaks the AWS family only: drop --family");
                }
                let addr = args.baseline.clone().unwrap_or_default();
                let dialer = Dialer::new(
                    &addr,
                    args.baseline_tls,
                    args.ca_file.as_deref(),
                    family,
                    false,
                    args.source_ips,
                )
                .await?;
                let raw = collect_pairs((0..n).map(|i| {
                    let dialer = &dialer;
                    async move {
                        let token = random_token(i);
                        let device = dialer
                            .dial(Side::Device, "baseline", &token)
                            .await
                            .with_context(|| format!("device peer {i} to the baseline relay"))?;
                        let client = dialer
                            .dial(Side::Client, "baseline", &token)
                            .await
                            .with_context(|| format!("client peer {i} to the baseline relay"))?;
                        progress.inc(1);
                        Ok((client, device))
                    }
                }))
                .await?;
                (raw, dialer.base().to_string(), Keep::Nothing)
            }
            Mode::Direct => {
                let server = DirectServer::start(family).await?;
                let dialer = Dialer::new(
                    &server.addr.to_string(),
                    false,
                    None,
                    family,
                    false,
                    args.source_ips,
                )
                .await?;
                let raw = collect_pairs((0..n).map(|i| {
                    let (server, dialer) = (&server, &dialer);
                    async move {
                        let pair = server.pair(dialer, i).await?;
                        progress.inc(1);
                        Ok(pair)
                    }
                }))
                .await?;
                (
                    raw,
                    format!("in-process {}", dialer.base()),
                    Keep::Direct { _listener: server },
                )
            }
        };
        let opened: Vec<anyhow::Result<Pair>> =
            futures_util::stream::iter(raw.into_iter().enumerate().map(
                |(i, (mut client, mut device))| async move {
                    let channels = wire::open_channels(family, &mut client, &mut device, streams)
                        .await
                        .with_context(|| format!("opening channels of pair {i}"))?;
                    Ok(Pair {
                        client,
                        device,
                        channels,
                    })
                },
            ))
            .buffered(DIAL_CONCURRENCY)
            .collect()
            .await;
        Ok(Self {
            pairs: opened.into_iter().collect::<Result<_, _>>()?,
            mode,
            desc,
            relay_after_create,
            keep,
        })
    }

    /// Device channels that ended on their own (relay mode), with why.
    pub fn dropped_channels(&self) -> Vec<(String, String)> {
        match &self.keep {
            Keep::Relay(t) => t.dropped_channels(),
            _ => Vec::new(),
        }
    }

    /// Takes the pairs out, keeping the far ends alive until [`Pairs::close`].
    pub fn take(&mut self) -> Vec<Pair> {
        std::mem::take(&mut self.pairs)
    }

    /// Ends the device channels and the direct listener.
    pub async fn close(self) {
        if let Keep::Relay(t) = self.keep {
            t.shutdown().await;
        }
    }
}

/// Runs the pair futures, [`DIAL_CONCURRENCY`] at once, failing on the first error.
async fn collect_pairs<F>(futs: impl Iterator<Item = F>) -> anyhow::Result<Vec<(Ws, Ws)>>
where
    F: std::future::Future<Output = anyhow::Result<(Ws, Ws)>>,
{
    let mut out = Vec::new();
    let mut stream = futures_util::stream::iter(futs).buffered(DIAL_CONCURRENCY);
    while let Some(r) = stream.next().await {
        out.push(r?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notes_arrive_before_or_after_the_wait() {
        let notes = Arc::new(Notes::default());
        notes.deliver("a".into(), "ta".into());
        assert_eq!(notes.take("a").await.unwrap(), "ta");
        let waiter = {
            let notes = notes.clone();
            tokio::spawn(async move { notes.take("b").await })
        };
        while !notes.slots.lock().unwrap().contains_key("b") {
            tokio::task::yield_now().await;
        }
        notes.deliver("b".into(), "tb".into());
        assert_eq!(waiter.await.unwrap().unwrap(), "tb");
        assert!(notes.slots.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn direct_pairs_spread_source_addresses() {
        for family in [Family::Aws, Family::Aliyun] {
            let server = DirectServer::start(family).await.unwrap();
            let dialer = Dialer::new(&server.addr.to_string(), false, None, family, false, 4)
                .await
                .unwrap();
            let mut sources = std::collections::BTreeSet::new();
            for i in 0..4 {
                let (mut client, mut device) = server.pair(&dialer, i).await.unwrap();
                let peer = match client.get_ref() {
                    MaybeTlsStream::Plain(s) => s.local_addr().unwrap().ip(),
                    _ => unreachable!(),
                };
                sources.insert(peer);
                let ch = wire::open_channels(family, &mut client, &mut device, 2)
                    .await
                    .unwrap();
                assert_eq!(ch.len(), 2);
            }
            assert_eq!(sources.len(), 4, "{sources:?}");
        }
    }
}
