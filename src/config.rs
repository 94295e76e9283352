//! Server settings: command-line flags with `IOTUNNEL_*` environment fallbacks, an optional TOML
//! file (`--config`, unknown keys refused), embedded defaults, validated once at start.
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

/// Default data directory, relative to the working directory (DESIGN.md).
pub const DEFAULT_DATA_DIR: &str = "./iotunnel-data";
/// Default control API address (DESIGN.md).
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:8080";
/// Default relay address (DESIGN.md).
pub const DEFAULT_RELAY_ADDR: &str = "127.0.0.1:8443";
/// Default Prometheus exporter address (DESIGN.md).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9100";
/// A tunnel lives 24 h unless told otherwise: the vendors' forced close (PROTOCOLS.md).
pub const DEFAULT_MAX_LIFETIME_SECONDS: u32 = 86_400;
/// The shortest lifetime a tunnel may be given (issue: 60 s).
pub const MIN_LIFETIME_SECONDS: u32 = 60;
/// Both vendors allow 10 open tunnels per device; ours is configurable.
pub const DEFAULT_MAX_OPEN_TUNNELS_PER_DEVICE: u32 = 10;
/// CLOSED tunnels are deleted 30 days after creation, as on the product page.
pub const DEFAULT_RETENTION_DAYS: u32 = 30;
/// The device channel is pinged every 20 s; 3 missed pings (60 s) mark it dead.
pub const DEFAULT_DEVICE_PING_INTERVAL_MS: u64 = 20_000;
/// The lifecycle sweeper runs every second, so expiry is late by at most that.
pub const DEFAULT_SWEEP_INTERVAL_MS: u64 = 1_000;
/// TLS handshake plus upgrade request must complete within 10 s (issue 3).
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Relay peers are pinged every 20 s, like localproxy pings us (PROTOCOLS.md).
pub const DEFAULT_PEER_PING_INTERVAL_MS: u64 = 20_000;
/// Handshakes in progress per IP: enough for a NATed site, too few to starve others.
pub const DEFAULT_MAX_HANDSHAKES_PER_IP: usize = 64;

/// A fleet node heartbeats every second (issue 11).
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// A node is dead after 5 s without a heartbeat (issue 11): five missed beats, so one slow
/// database round trip never kills a node.
pub const DEFAULT_NODE_DEAD_AFTER_MS: u64 = 5_000;

/// Default AWS thing name of a device in MQTT notifications (issue 4).
pub const DEFAULT_MQTT_THING_TEMPLATE: &str = "{product_key}_{device_name}";

/// A secret string that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Per-tunnel metric series are capped at 1000 tunnels by default (issue 5).
pub const DEFAULT_METRICS_PER_TUNNEL_MAX: usize = 1000;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// From `IOTUNNEL_LOG_FORMAT` (for the agent and client, which have no config file).
    pub fn from_env() -> Self {
        match std::env::var("IOTUNNEL_LOG_FORMAT").as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

/// How the relay's shards drive I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoDriver {
    /// io_uring where the kernel allows it, else epoll.
    #[default]
    Auto,
    /// io_uring only.
    Uring,
    /// epoll only.
    Epoll,
}

/// The server's settings as flags (each with an `IOTUNNEL_*` environment fallback) and as keys
/// of the `--config` TOML file; all optional, defaults applied by [`Settings::merge`].
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct Knobs {
    /// Directory for the database and TLS material [default: ./iotunnel-data].
    #[arg(long, env = "IOTUNNEL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Control API address [default: 127.0.0.1:8080].
    #[arg(long, env = "IOTUNNEL_API_ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// Relay (data plane) address [default: 127.0.0.1:8443].
    #[arg(long, env = "IOTUNNEL_RELAY_ADDR")]
    pub relay_addr: Option<SocketAddr>,
    /// Prometheus exporter address [default: 127.0.0.1:9100].
    #[arg(long, env = "IOTUNNEL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// The relay's public host:port (or wss://host:port) put into tunnel URLs.
    #[arg(long, env = "IOTUNNEL_PUBLIC_RELAY_URL")]
    pub public_relay_url: Option<String>,
    /// Longest tunnel lifetime in seconds [default: 86400].
    #[arg(long, env = "IOTUNNEL_MAX_LIFETIME_SECONDS")]
    pub max_lifetime_seconds: Option<u32>,
    /// Most OPEN tunnels per device [default: 10].
    #[arg(long, env = "IOTUNNEL_MAX_OPEN_TUNNELS_PER_DEVICE")]
    pub max_open_tunnels_per_device: Option<u32>,
    /// Days after creation when a tunnel is deleted [default: 30].
    #[arg(long, env = "IOTUNNEL_RETENTION_DAYS")]
    pub retention_days: Option<u32>,
    /// Device channel ping interval in milliseconds [default: 20000].
    #[arg(long, env = "IOTUNNEL_DEVICE_PING_INTERVAL_MS")]
    pub device_ping_interval_ms: Option<u64>,
    /// Lifecycle sweep interval in milliseconds [default: 1000].
    #[arg(long, env = "IOTUNNEL_SWEEP_INTERVAL_MS")]
    pub sweep_interval_ms: Option<u64>,
    /// Relay shards (threads) [default: the number of cores].
    #[arg(long, env = "IOTUNNEL_SHARDS")]
    pub shards: Option<usize>,
    /// The relay's I/O driver [default: auto].
    #[arg(long, env = "IOTUNNEL_IO_DRIVER", value_enum)]
    pub io_driver: Option<IoDriver>,
    /// Serve ws:// instead of wss:// (behind a TLS terminator).
    #[arg(long, env = "IOTUNNEL_RELAY_PLAINTEXT", num_args = 0..=1, default_missing_value = "true")]
    pub relay_plaintext: Option<bool>,
    /// PEM certificate chain for the relay [default: {data-dir}/tls/server.pem].
    #[arg(long, env = "IOTUNNEL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for the relay [default: {data-dir}/tls/server.key].
    #[arg(long, env = "IOTUNNEL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Time allowed for the TLS handshake plus the upgrade request, ms [default: 10000].
    #[arg(long, env = "IOTUNNEL_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// Relay peer ping interval, ms; 3 missed pings drop the peer [default: 20000].
    #[arg(long, env = "IOTUNNEL_PEER_PING_INTERVAL_MS")]
    pub peer_ping_interval_ms: Option<u64>,
    /// Largest WebSocket frame payload, bytes [default: 131076].
    #[arg(long, env = "IOTUNNEL_MAX_FRAME_PAYLOAD")]
    pub max_frame_payload: Option<usize>,
    /// Most Alibaba-family sessions per tunnel [default: 10].
    #[arg(long, env = "IOTUNNEL_MAX_SESSIONS_PER_TUNNEL")]
    pub max_sessions_per_tunnel: Option<usize>,
    /// Most handshakes in progress per client IP [default: 64].
    #[arg(long, env = "IOTUNNEL_MAX_HANDSHAKES_PER_IP")]
    pub max_handshakes_per_ip: Option<usize>,
    /// Alibaba family: how long a device has to answer session_create, ms [default: 10000].
    #[arg(long, env = "IOTUNNEL_SESSION_CREATE_TIMEOUT_MS")]
    pub session_create_timeout_ms: Option<u64>,
    /// MQTT broker (mqtt://HOST:PORT or mqtts://HOST:PORT) to publish device notifications to
    /// and to learn device presence from [default: none].
    #[arg(long, env = "IOTUNNEL_MQTT_URL")]
    pub mqtt_url: Option<String>,
    /// MQTT user name.
    #[arg(long, env = "IOTUNNEL_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// MQTT password.
    #[arg(long, env = "IOTUNNEL_MQTT_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub mqtt_password: Option<Secret>,
    /// PEM CA certificates to trust for an mqtts:// broker [default: the public web PKI roots].
    #[arg(long, env = "IOTUNNEL_MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,
    /// AWS thing name of a device in notifications [default: {product_key}_{device_name}].
    #[arg(long, env = "IOTUNNEL_MQTT_THING_TEMPLATE")]
    pub mqtt_thing_template: Option<String>,
    /// Log line format [default: text].
    #[arg(long, env = "IOTUNNEL_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Export per-tunnel series (`tunnel_id` label), for small fleets [default: off].
    #[arg(long, env = "IOTUNNEL_METRICS_PER_TUNNEL", num_args = 0..=1, default_missing_value = "true")]
    pub metrics_per_tunnel: Option<bool>,
    /// Most tunnels with per-tunnel series [default: 1000].
    #[arg(long, env = "IOTUNNEL_METRICS_PER_TUNNEL_MAX")]
    pub metrics_per_tunnel_max: Option<usize>,
    /// Record the relay's per-frame metrics (bytes, frames, forwarding latency) [default: on].
    #[arg(long, env = "IOTUNNEL_RELAY_METRICS", value_name = "on|off", value_parser = on_off())]
    pub relay_metrics: Option<bool>,
    /// PostgreSQL URL (`postgres://user@host/db?sslmode=require&sslrootcert=ca.pem`): run as
    /// a node of a fleet sharing that database [default: SQLite in the data dir, one node].
    #[arg(long, env = "IOTUNNEL_DATABASE_URL", hide_env_values = true, value_parser = parse_secret)]
    pub database_url: Option<Secret>,
    /// This node's id [default: generated once and kept in {data-dir}/node.id].
    #[arg(long, env = "IOTUNNEL_NODE_ID")]
    pub node_id: Option<String>,
    /// Mesh listener address: other nodes forward peers of this node's tunnels here, always
    /// over TLS with the fleet CA ({data-dir}/tls/mesh.pem), even with --relay-plaintext
    /// [default: off].
    #[arg(long, env = "IOTUNNEL_MESH_ADDR")]
    pub mesh_addr: Option<SocketAddr>,
    /// The mesh address other nodes dial, when it differs from --mesh-addr (NAT, 0.0.0.0)
    /// [default: --mesh-addr, with the public relay host for an unspecified IP].
    #[arg(long, env = "IOTUNNEL_PUBLIC_MESH_ADDR")]
    pub public_mesh_addr: Option<String>,
    /// Key sealing access-key secrets in the database, 64 hex digits; every node of a fleet
    /// needs the same one [default: one node: generated into {data-dir}/access-key.key; a
    /// fleet: none, and access keys are refused].
    #[arg(long, env = "IOTUNNEL_ACCESS_KEY_ENCRYPTION_KEY", hide_env_values = true, value_parser = parse_secret)]
    pub access_key_encryption_key: Option<Secret>,
    /// Fleet heartbeat interval, ms [default: 1000].
    #[arg(long, env = "IOTUNNEL_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// A node without a heartbeat for this long is dead, ms [default: 5000].
    #[arg(long, env = "IOTUNNEL_NODE_DEAD_AFTER_MS")]
    pub node_dead_after_ms: Option<u64>,
    /// Keep the API keys earlier starts took from IOTUNNEL_ADMIN_KEY valid [default: a start
    /// with an IOTUNNEL_ADMIN_KEY revokes them].
    #[arg(long, env = "IOTUNNEL_KEEP_PREVIOUS_ADMIN_KEYS", num_args = 0..=1,
        default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub keep_previous_admin_keys: Option<bool>,
}

/// Parses a secret flag value.
pub fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret(s.to_string()))
}

impl Knobs {
    /// Each field from `self`, else from `other`.
    fn or(self, other: Knobs) -> Knobs {
        macro_rules! pick {
            ($($f:ident),*) => { Knobs { $($f: self.$f.or(other.$f),)* } };
        }
        pick!(
            data_dir,
            api_addr,
            relay_addr,
            metrics_addr,
            public_relay_url,
            max_lifetime_seconds,
            max_open_tunnels_per_device,
            retention_days,
            device_ping_interval_ms,
            sweep_interval_ms,
            shards,
            io_driver,
            relay_plaintext,
            tls_cert,
            tls_key,
            handshake_timeout_ms,
            peer_ping_interval_ms,
            max_frame_payload,
            max_sessions_per_tunnel,
            max_handshakes_per_ip,
            session_create_timeout_ms,
            mqtt_url,
            mqtt_username,
            mqtt_password,
            mqtt_ca_file,
            mqtt_thing_template,
            log_format,
            metrics_per_tunnel,
            metrics_per_tunnel_max,
            relay_metrics,
            database_url,
            node_id,
            mesh_addr,
            public_mesh_addr,
            heartbeat_interval_ms,
            node_dead_after_ms,
            keep_previous_admin_keys,
            access_key_encryption_key
        )
    }
}

/// Flags of `iotunnel server`.
#[derive(Args, Debug, Default, Clone)]
pub struct ServerArgs {
    /// TOML configuration file; flags and environment override it.
    #[arg(long, env = "IOTUNNEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// The settings.
    #[command(flatten)]
    pub knobs: Knobs,
}

/// The `--config` TOML file: the same settings as the flags, all optional.
pub type FileConfig = Knobs;

impl Knobs {
    /// Reads and parses a TOML config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.message().trim()))
    }
}

/// The relay's public endpoint, as put into tunnel URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicEndpoint {
    /// Host name or IP address, without brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl PublicEndpoint {
    /// Parses `host:port`, `wss://host:port` or `ws://host:port` (a trailing `/` is allowed).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let rest = s
            .strip_prefix("wss://")
            .or_else(|| s.strip_prefix("ws://"))
            .unwrap_or(s)
            .trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .with_context(|| format!("public relay url {s:?} must be host:port"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("public relay url {s:?} has an invalid port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            bail!("public relay url {s:?} has an invalid host");
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }

    /// `host:port`, bracketing IPv6 addresses.
    pub fn host_port(&self) -> String {
        host_port(&self.host, self.port)
    }
}

/// `host:port`, with brackets around an IPv6 address.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A switch flag's parser: `on` or `off` (and, as before, true/false, yes/no, 1/0).
fn on_off() -> impl clap::builder::TypedValueParser<Value = bool> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new([
        PossibleValue::new("on").aliases(["true", "yes", "1"]),
        PossibleValue::new("off").aliases(["false", "no", "0"]),
    ])
    .map(|v| matches!(v.as_str(), "on" | "true" | "yes" | "1"))
}

/// Splits `HOST:PORT` (`[v6]:PORT` for IPv6), checking that the port is 1 to 65535 and that
/// the text is one address (no list, no scheme, no path).
pub fn split_host_port(text: &str) -> Result<(String, u16), String> {
    let bad = |why: &str| Err(format!("{text:?} is not HOST:PORT: {why}"));
    if text.contains(',') {
        return bad("one address only (repeat the flag for more)");
    }
    if text.contains('/') || text.contains('=') || text.chars().any(char::is_whitespace) {
        return bad("unexpected characters");
    }
    let (host, port) = match text.strip_prefix('[') {
        Some(v6) => match v6.split_once("]:") {
            Some(parts) => parts,
            None => return bad("expected [IPv6]:PORT"),
        },
        None => match text.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return bad("put an IPv6 address in brackets: [::1]:22")
            }
            Some(parts) => parts,
            None => return bad("no port"),
        },
    };
    if host.is_empty() {
        return bad("no host");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host.to_string(), p)),
        _ => bad("the port must be a number from 1 to 65535"),
    }
}

/// The control API's base URL from `--api`: `http://` when no scheme is given
/// (`127.0.0.1:8080`), no trailing slash; a scheme other than http(s) is refused.
pub fn api_base_url(text: &str) -> anyhow::Result<String> {
    let text = text.trim();
    let (scheme, rest) = text.split_once("://").unwrap_or(("http", text));
    let rest = rest.trim_end_matches('/');
    match scheme {
        _ if rest.is_empty() => bail!("--api names no host: {text:?}"),
        "http" | "https" => Ok(format!("{scheme}://{rest}")),
        _ => bail!("--api must be http://HOST:PORT or https://HOST:PORT, not {text:?}"),
    }
}

/// An MQTT broker address: `mqtt://host:port` (plain TCP, default port 1883) or
/// `mqtts://host:port` (TLS, default port 8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    /// Host name or IP address, without brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether the broker speaks TLS.
    pub tls: bool,
}

impl MqttUrl {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]` (also `tcp://` and `ssl://`).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtt://").or(s.strip_prefix("tcp://")) {
            (false, r)
        } else if let Some(r) = s.strip_prefix("mqtts://").or(s.strip_prefix("ssl://")) {
            (true, r)
        } else {
            bail!("MQTT url {s:?} must start with mqtt:// or mqtts://");
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .with_context(|| format!("MQTT url {s:?} has an invalid host"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => bail!("MQTT url {s:?} has an invalid host"),
            };
            (host, port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        let port = match port {
            Some(p) => p
                .parse()
                .with_context(|| format!("MQTT url {s:?} has an invalid port"))?,
            None => default_port,
        };
        if host.is_empty() || host.contains(['/', '@', '?', '#']) {
            bail!("MQTT url {s:?} has an invalid host");
        }
        Ok(Self {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

/// The server's MQTT settings (issue 4): where device notifications are published and
/// presence is read.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// The broker.
    pub url: MqttUrl,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// Password (never logged).
    pub password: Option<Secret>,
    /// CA certificates to trust for mqtts (None: the public web PKI roots).
    pub ca_file: Option<PathBuf>,
    /// AWS thing name template with `{product_key}` and `{device_name}`.
    pub thing_template: String,
}

impl MqttSettings {
    /// Builds and checks the MQTT settings from the merged knobs; None when no URL is set.
    fn from_knobs(
        url: Option<String>,
        username: Option<String>,
        password: Option<Secret>,
        ca_file: Option<PathBuf>,
        thing_template: Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let Some(url) = url else {
            if username.is_some() || password.is_some() || ca_file.is_some() {
                bail!("--mqtt-username, --mqtt-password and --mqtt-ca-file need --mqtt-url");
            }
            return Ok(None);
        };
        let url = MqttUrl::parse(&url)?;
        if password.is_some() && username.is_none() {
            bail!("--mqtt-password needs --mqtt-username");
        }
        let thing_template =
            thing_template.unwrap_or_else(|| DEFAULT_MQTT_THING_TEMPLATE.to_string());
        validate_thing_template(&thing_template)?;
        Ok(Some(Self {
            url,
            username,
            password,
            ca_file,
            thing_template,
        }))
    }

    /// The AWS thing name of a device.
    pub fn thing_name(&self, product_key: &str, device_name: &str) -> String {
        self.thing_template
            .replace("{product_key}", product_key)
            .replace("{device_name}", device_name)
    }
}

/// Refuses a thing-name template with anything but `{product_key}`, `{device_name}` and
/// characters allowed in an MQTT topic level.
fn validate_thing_template(thing_template: &str) -> anyhow::Result<()> {
    let sample = thing_template
        .replace("{product_key}", "p")
        .replace("{device_name}", "d");
    if sample.is_empty() || sample.contains(['{', '}', '/', '+', '#']) {
        bail!(
            "mqtt_thing_template {thing_template:?} may use only {{product_key}} and \
             {{device_name}}, and no '/', '+' or '#'"
        );
    }
    Ok(())
}

/// A 256-bit key written as 64 hex digits.
pub fn parse_key32(text: &str) -> anyhow::Result<[u8; 32]> {
    hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .context("access_key_encryption_key must be 64 hex digits (32 bytes)")
}

/// Validated server settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Database and TLS directory.
    pub data_dir: PathBuf,
    /// Control API address.
    pub api_addr: SocketAddr,
    /// Relay address.
    pub relay_addr: SocketAddr,
    /// Prometheus exporter address.
    pub metrics_addr: SocketAddr,
    /// Host and port put into tunnel URLs.
    pub public_relay: PublicEndpoint,
    /// `wss` or `ws`: the scheme of tunnel URLs.
    pub public_relay_scheme: &'static str,
    /// Longest tunnel lifetime, seconds; also the default lifetime.
    pub max_lifetime_seconds: u32,
    /// Most OPEN tunnels per device.
    pub max_open_tunnels_per_device: u32,
    /// Days after creation when a tunnel is deleted.
    pub retention_days: u32,
    /// Device channel ping interval, milliseconds.
    pub device_ping_interval_ms: u64,
    /// Lifecycle sweep interval, milliseconds.
    pub sweep_interval_ms: u64,
    /// Relay shards.
    pub shards: usize,
    /// Relay I/O driver.
    pub io_driver: IoDriver,
    /// Serve ws:// instead of wss://.
    pub relay_plaintext: bool,
    /// Relay certificate chain (None: the generated one).
    pub tls_cert: Option<PathBuf>,
    /// Relay private key (None: the generated one).
    pub tls_key: Option<PathBuf>,
    /// TLS handshake plus upgrade deadline, ms.
    pub handshake_timeout_ms: u64,
    /// Relay peer ping interval, ms.
    pub peer_ping_interval_ms: u64,
    /// Largest WebSocket frame payload.
    pub max_frame_payload: usize,
    /// Most Alibaba-family sessions per tunnel.
    pub max_sessions_per_tunnel: usize,
    /// Most handshakes in progress per client IP.
    pub max_handshakes_per_ip: usize,
    /// Alibaba family: session_create answer deadline, ms.
    pub session_create_timeout_ms: u64,
    /// Admin API key from `IOTUNNEL_ADMIN_KEY`, if set.
    pub admin_key: Option<Secret>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Per-tunnel series: at most this many tunnels (0: off).
    pub metrics_per_tunnel: usize,
    /// The relay records per-frame metrics (off: only connection-level ones).
    pub relay_metrics: bool,
    /// MQTT notifications and presence, when `--mqtt-url` is set.
    pub mqtt: Option<MqttSettings>,
    /// PostgreSQL URL of the fleet's database (None: SQLite in the data dir).
    pub database_url: Option<Secret>,
    /// This node's id (None: the one kept in the data dir, generated on first start).
    pub node_id: Option<String>,
    /// Mesh listener address (None: no mesh listener).
    pub mesh_addr: Option<SocketAddr>,
    /// The mesh `host:port` other nodes dial.
    pub public_mesh_addr: Option<String>,
    /// Fleet heartbeat interval, ms.
    pub heartbeat_interval_ms: u64,
    /// Silence after which a node is dead, ms.
    pub node_dead_after_ms: u64,
    /// Keep the keys earlier starts took from `IOTUNNEL_ADMIN_KEY` (else a start with one
    /// revokes them).
    pub keep_previous_admin_keys: bool,
    /// The AWS thing name of a device (MQTT topics, the AWS facade's `thingName`).
    pub thing_template: String,
    /// The access-key sealing key, 64 hex digits, validated (None: from the data dir on one
    /// node, none in a fleet).
    pub access_key_encryption_key: Option<Secret>,
}

impl Settings {
    /// Merges flags over the config file over the defaults, and validates the result.
    pub fn resolve(args: &ServerArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let admin_key = std::env::var("IOTUNNEL_ADMIN_KEY").ok().map(Secret);
        Self::merge(args.knobs.clone(), file, admin_key)
    }

    /// Merges `flags` over `file` over the defaults, and validates the result.
    pub fn merge(flags: Knobs, file: Knobs, admin_key: Option<Secret>) -> anyhow::Result<Self> {
        let k = flags.or(file);
        let addr = |v: Option<SocketAddr>, default: &str| {
            v.unwrap_or_else(|| default.parse().expect("default addresses parse"))
        };
        let relay_addr = addr(k.relay_addr, DEFAULT_RELAY_ADDR);
        // URLs name wss:// unless the public URL says ws://, or no public URL is given and
        // the relay serves plaintext (a terminator in front would be named in the URL).
        let public_relay_scheme = match k.public_relay_url.as_deref() {
            Some(url) if url.starts_with("ws://") => "ws",
            None if k.relay_plaintext == Some(true) => "ws",
            _ => "wss",
        };
        let public_relay = match k.public_relay_url {
            Some(url) => PublicEndpoint::parse(&url)?,
            None => PublicEndpoint {
                host: if relay_addr.ip().is_unspecified() {
                    "localhost".to_string()
                } else {
                    relay_addr.ip().to_string()
                },
                port: relay_addr.port(),
            },
        };
        let thing_template = k
            .mqtt_thing_template
            .clone()
            .unwrap_or_else(|| DEFAULT_MQTT_THING_TEMPLATE.to_string());
        validate_thing_template(&thing_template)?;
        if let Some(key) = &k.access_key_encryption_key {
            parse_key32(&key.0)?;
        }
        let access_key_encryption_key = k.access_key_encryption_key.clone();
        let mqtt = MqttSettings::from_knobs(
            k.mqtt_url,
            k.mqtt_username,
            k.mqtt_password,
            k.mqtt_ca_file,
            k.mqtt_thing_template,
        )?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let public_relay_host = public_relay.host.clone();
        let settings = Self {
            data_dir: k
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            api_addr: addr(k.api_addr, DEFAULT_API_ADDR),
            relay_addr,
            metrics_addr: addr(k.metrics_addr, DEFAULT_METRICS_ADDR),
            public_relay,
            public_relay_scheme,
            max_lifetime_seconds: k
                .max_lifetime_seconds
                .unwrap_or(DEFAULT_MAX_LIFETIME_SECONDS),
            max_open_tunnels_per_device: k
                .max_open_tunnels_per_device
                .unwrap_or(DEFAULT_MAX_OPEN_TUNNELS_PER_DEVICE),
            retention_days: k.retention_days.unwrap_or(DEFAULT_RETENTION_DAYS),
            device_ping_interval_ms: k
                .device_ping_interval_ms
                .unwrap_or(DEFAULT_DEVICE_PING_INTERVAL_MS),
            sweep_interval_ms: k.sweep_interval_ms.unwrap_or(DEFAULT_SWEEP_INTERVAL_MS),
            shards: k.shards.unwrap_or(cores),
            io_driver: k.io_driver.unwrap_or_default(),
            relay_plaintext: k.relay_plaintext.unwrap_or(false),
            tls_cert: k.tls_cert,
            tls_key: k.tls_key,
            handshake_timeout_ms: k
                .handshake_timeout_ms
                .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_MS),
            peer_ping_interval_ms: k
                .peer_ping_interval_ms
                .unwrap_or(DEFAULT_PEER_PING_INTERVAL_MS),
            max_frame_payload: k
                .max_frame_payload
                .unwrap_or(crate::proto::ws::DEFAULT_MAX_PAYLOAD),
            max_sessions_per_tunnel: k
                .max_sessions_per_tunnel
                .unwrap_or(crate::proto::aliyun::DEFAULT_MAX_SESSIONS),
            max_handshakes_per_ip: k
                .max_handshakes_per_ip
                .unwrap_or(DEFAULT_MAX_HANDSHAKES_PER_IP),
            session_create_timeout_ms: k
                .session_create_timeout_ms
                .unwrap_or(crate::proto::aliyun::SESSION_CREATE_TIMEOUT.as_millis() as u64),
            admin_key,
            log_format: k.log_format.unwrap_or_default(),
            metrics_per_tunnel: if k.metrics_per_tunnel == Some(true) {
                k.metrics_per_tunnel_max
                    .unwrap_or(DEFAULT_METRICS_PER_TUNNEL_MAX)
            } else {
                0
            },
            relay_metrics: k.relay_metrics.unwrap_or(true),
            mqtt,
            database_url: k.database_url,
            node_id: k.node_id,
            public_mesh_addr: k.public_mesh_addr.or_else(|| {
                k.mesh_addr.map(|a| {
                    if a.ip().is_unspecified() {
                        host_port(&public_relay_host, a.port())
                    } else {
                        a.to_string()
                    }
                })
            }),
            mesh_addr: k.mesh_addr,
            heartbeat_interval_ms: k
                .heartbeat_interval_ms
                .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL_MS),
            node_dead_after_ms: k.node_dead_after_ms.unwrap_or(DEFAULT_NODE_DEAD_AFTER_MS),
            keep_previous_admin_keys: k.keep_previous_admin_keys.unwrap_or(false),
            thing_template,
            access_key_encryption_key,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Settings for tests: defaults, with every address on 127.0.0.1:0.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        let flags = Knobs {
            data_dir: Some(data_dir),
            api_addr: Some(any),
            relay_addr: Some(any),
            metrics_addr: Some(any),
            public_relay_url: Some("localhost:8443".into()),
            ..Knobs::default()
        };
        Self::merge(flags, Knobs::default(), None).expect("test settings are valid")
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.max_lifetime_seconds < MIN_LIFETIME_SECONDS {
            bail!("max_lifetime_seconds must be at least {MIN_LIFETIME_SECONDS}");
        }
        if self.max_open_tunnels_per_device == 0 {
            bail!("max_open_tunnels_per_device must be at least 1");
        }
        if self.retention_days == 0 {
            bail!("retention_days must be at least 1");
        }
        if self.device_ping_interval_ms < 10 {
            bail!("device_ping_interval_ms must be at least 10");
        }
        if self.sweep_interval_ms < 10 {
            bail!("sweep_interval_ms must be at least 10");
        }
        if !(1..=1024).contains(&self.shards) {
            bail!("shards must be from 1 to 1024");
        }
        if self.handshake_timeout_ms < 10 || self.peer_ping_interval_ms < 10 {
            bail!("handshake_timeout_ms and peer_ping_interval_ms must be at least 10");
        }
        if !(125..=16 << 20).contains(&self.max_frame_payload) {
            bail!("max_frame_payload must be from 125 to 16 MiB");
        }
        if self.max_sessions_per_tunnel == 0 || self.max_handshakes_per_ip == 0 {
            bail!("max_sessions_per_tunnel and max_handshakes_per_ip must be at least 1");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("--tls-cert and --tls-key go together");
        }
        if self.heartbeat_interval_ms < 10 {
            bail!("heartbeat_interval_ms must be at least 10");
        }
        if self.node_dead_after_ms < 2 * self.heartbeat_interval_ms {
            bail!("node_dead_after_ms must be at least twice heartbeat_interval_ms");
        }
        if let Some(url) = &self.database_url {
            if !(url.0.starts_with("postgres://") || url.0.starts_with("postgresql://")) {
                bail!("database_url must be a postgres:// or postgresql:// URL");
            }
        }
        if let Some(id) = &self.node_id {
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                bail!("node_id must be 1-64 characters of letters, digits, '-', '_' and '.'");
            }
        }
        if let Some(key) = &self.admin_key {
            if key.0.len() < 16 {
                bail!("IOTUNNEL_ADMIN_KEY must be at least 16 characters");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_and_api_urls() {
        assert_eq!(
            split_host_port("127.0.0.1:22"),
            Ok(("127.0.0.1".into(), 22))
        );
        assert_eq!(split_host_port("[::1]:8080"), Ok(("::1".into(), 8080)));
        assert_eq!(
            split_host_port("cam.local:65535"),
            Ok(("cam.local".into(), 65535))
        );
        for bad in [
            "h:99999",
            "h:0",
            "h:-1",
            "h:",
            ":22",
            "h",
            "h:1,B=h:2",
            "::1:22",
            "[::1]22",
            "h:22/x",
            "http://h:22",
        ] {
            let e = split_host_port(bad).unwrap_err();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
        assert_eq!(
            api_base_url("127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            api_base_url("https://api.example/").unwrap(),
            "https://api.example"
        );
        assert_eq!(api_base_url("http://h:1").unwrap(), "http://h:1");
        for bad in ["ftp://h:1", "", "http://"] {
            assert!(api_base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn example_config_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/iotunnel.example.toml"
        ))
        .unwrap();
        let file = FileConfig::parse(&text).unwrap();
        let s = Settings::merge(Knobs::default(), file, None).unwrap();
        assert_eq!(s.max_open_tunnels_per_device, 10);
        assert_eq!(s.io_driver, IoDriver::Auto);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = FileConfig::parse("api_adr = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn flags_override_file_and_validation_runs() {
        let args = Knobs {
            max_open_tunnels_per_device: Some(3),
            ..Default::default()
        };
        let file =
            FileConfig::parse("max_open_tunnels_per_device = 5\nretention_days = 7").unwrap();
        let s = Settings::merge(args, file, None).unwrap();
        assert_eq!((s.max_open_tunnels_per_device, s.retention_days), (3, 7));
        let file = FileConfig::parse("max_lifetime_seconds = 5").unwrap();
        assert!(Settings::merge(Knobs::default(), file, None).is_err());
    }

    #[test]
    fn tunnel_urls_name_ws_only_when_told() {
        let with = |url: Option<&str>, plaintext: Option<bool>| {
            let k = Knobs {
                public_relay_url: url.map(str::to_string),
                relay_plaintext: plaintext,
                ..Default::default()
            };
            Settings::merge(k, Knobs::default(), None)
                .unwrap()
                .public_relay_scheme
        };
        assert_eq!(with(None, None), "wss");
        assert_eq!(with(None, Some(true)), "ws");
        assert_eq!(with(Some("ws://relay:80"), None), "ws");
        assert_eq!(with(Some("relay.example:443"), Some(true)), "wss");
        assert_eq!(with(Some("wss://relay.example:443"), None), "wss");
    }

    #[test]
    fn public_endpoint_forms() {
        let e = PublicEndpoint::parse("wss://relay.example.com:443/").unwrap();
        assert_eq!(e.host_port(), "relay.example.com:443");
        assert_eq!(
            PublicEndpoint::parse("[::1]:8443").unwrap().host_port(),
            "[::1]:8443"
        );
        assert!(PublicEndpoint::parse("nohost").is_err());
        assert!(PublicEndpoint::parse("h:99999").is_err());
    }

    #[test]
    fn mqtt_settings_parse_and_validate() {
        let file = FileConfig::parse(
            "mqtt_url = \"mqtts://broker.example:8884\"\nmqtt_username = \"srv\"\n\
             mqtt_password = \"hunter2\"\nmqtt_thing_template = \"t-{device_name}\"",
        )
        .unwrap();
        let s = Settings::merge(Knobs::default(), file, None).unwrap();
        let m = s.mqtt.as_ref().unwrap();
        assert_eq!(
            m.url,
            MqttUrl {
                host: "broker.example".into(),
                port: 8884,
                tls: true
            }
        );
        assert_eq!(m.thing_name("pk", "dev"), "t-dev");
        assert!(!format!("{s:?}").contains("hunter2"));

        let flags = Knobs {
            mqtt_url: Some("mqtt://127.0.0.1".into()),
            ..Default::default()
        };
        let s = Settings::merge(flags, Knobs::default(), None).unwrap();
        let m = s.mqtt.unwrap();
        assert_eq!((m.url.port, m.url.tls), (1883, false));
        assert_eq!(m.thing_name("pk_1", "d-1"), "pk_1_d-1");
        assert_eq!(MqttUrl::parse("mqtt://[::1]:1884").unwrap().host, "::1");

        for bad in [
            "mqtt_url = \"http://x:1\"",
            "mqtt_url = \"mqtt://x:notaport\"",
            "mqtt_url = \"mqtt://x\"\nmqtt_thing_template = \"a/{device_name}\"",
            "mqtt_url = \"mqtt://x\"\nmqtt_thing_template = \"{tenant}\"",
            "mqtt_url = \"mqtt://x\"\nmqtt_password = \"p\"",
            "mqtt_username = \"u\"",
        ] {
            let file = FileConfig::parse(bad).unwrap();
            assert!(
                Settings::merge(Knobs::default(), file, None).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn secrets_hide_from_debug() {
        assert!(!format!("{:?}", Secret("hunter2".into())).contains("hunter2"));
    }
}
