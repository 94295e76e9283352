//! `iotunnel device`: the device agent. It keeps the device channel up, reconnecting after
//! network errors and 5xx answers with jittered exponential backoff capped at 30 s (a 4xx
//! refusal, such as a wrong secret, ends it with one line: retrying cannot help), reports the
//! services it maps ([`crate::proto::device::AgentMessage`]), and serves each tunnel it is
//! notified of: on
//! `connect` it dials the relay as the destination (AWS V3) with the notified token and opens a
//! TCP connection to the mapped local service for every stream and connection the client
//! starts ([`super::tunnels`]); on `close` it tears that tunnel down. Tokens are never logged.
//!
//! With `--mqtt-url` the agent takes the same notifications from an MQTT broker instead of the
//! device channel ([`super::mqtt`]); the device secret is then not needed.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

use super::dial::{self, Endpoint};
use super::mux::LocalServices;
use super::tunnels::{Connect, RelayContext, Tunnels};
use crate::clock::{Clock, SystemClock};
use crate::config::Secret;
use crate::proto::device::{AgentMessage, ServerMessage};
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
        default_value = DEFAULT_API
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

/// The agent's MQTT flags: with `--mqtt-url`, notifications come from the broker instead of
/// the device channel.
#[derive(Args, Debug, Clone, Default)]
pub struct MqttAgentArgs {
    /// MQTT broker (mqtt://HOST:PORT or mqtts://HOST:PORT) to take notifications from, instead
    /// of the device channel.
    #[arg(long, env = "IOTUNNEL_MQTT_URL")]
    pub mqtt_url: Option<String>,
    /// MQTT user name.
    #[arg(long, env = "IOTUNNEL_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// MQTT password.
    #[arg(long, env = "IOTUNNEL_MQTT_PASSWORD", hide_env_values = true, value_parser = crate::config::parse_secret)]
    pub mqtt_password: Option<Secret>,
    /// PEM CA certificates to trust for an mqtts:// broker [default: the public web PKI roots].
    #[arg(long, value_name = "FILE")]
    pub mqtt_ca_file: Option<PathBuf>,
}

/// The service a device offers when no `--service` is given: its SSH server.
pub const DEFAULT_SERVICE: (&str, &str) = ("SSH", "127.0.0.1:22");

/// The agent's relay flags: which local services it serves, and TLS trust.
#[derive(Args, Debug, Clone, Default)]
pub struct RelayArgs {
    /// A local service: NAME=HOST:PORT (repeatable; default SSH=127.0.0.1:22).
    #[arg(long = "service", value_name = "NAME=HOST:PORT", value_parser = parse_service)]
    pub services: Vec<(String, String)>,
    /// Trust the CA certificates in this PEM file (the server's tls/ca.pem) for the relay and
    /// an https API, instead of the public web PKI roots.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// A TOML file with the agent's settings; flags and environment win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Parses `NAME=HOST:PORT`: one service per flag, a port from 1 to 65535, and a name the
/// server accepts in a tunnel (`[A-Za-z0-9:_.-]`, as `tunnel create --service` takes it).
fn parse_service(text: &str) -> Result<(String, String), String> {
    let (name, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=HOST:PORT, got {text:?}"))?;
    let name_ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_.-".contains(&b));
    if !name_ok {
        return Err(format!(
            "expected NAME=HOST:PORT with NAME of letters, digits and : _ . -, got {text:?}"
        ));
    }
    let (host, port) =
        crate::config::split_host_port(addr).map_err(|e| format!("in --service {text:?}: {e}"))?;
    Ok((name.to_string(), crate::config::host_port(&host, port)))
}

/// The services by name; a name given twice is refused rather than one silently winning.
fn service_map(list: Vec<(String, String)>) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for (name, addr) in list {
        if let Some(first) = map.insert(name.clone(), addr.clone()) {
            bail!("--service {name} is given twice ({name}={first} and {name}={addr}): keep one");
        }
    }
    Ok(map)
}

/// The agent's TOML configuration file (`--config`).
///
/// ```toml
/// api = "https://iot.example.com:8080"
/// product_key = "pk_..."
/// device_name = "dev-1"
/// device_secret = "..."          # or IOTUNNEL_DEVICE_SECRET
/// ca_file = "/etc/iotunnel/ca.pem"
/// # mqtt_url = "mqtts://broker.example.com:8883"   # notifications over MQTT instead
/// # mqtt_username = "dev-1"
/// # mqtt_password = "..."        # or IOTUNNEL_MQTT_PASSWORD
/// # mqtt_ca_file = "/etc/iotunnel/broker-ca.pem"
///
/// [services]
/// SSH = "127.0.0.1:22"
/// HTTP = "127.0.0.1:80"
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// Control API base URL.
    pub api: Option<String>,
    /// The device's product key.
    pub product_key: Option<String>,
    /// The device's name.
    pub device_name: Option<String>,
    /// The device secret.
    pub device_secret: Option<String>,
    /// PEM CA file to trust.
    pub ca_file: Option<PathBuf>,
    /// MQTT broker to take notifications from.
    pub mqtt_url: Option<String>,
    /// MQTT user name.
    pub mqtt_username: Option<String>,
    /// MQTT password.
    pub mqtt_password: Option<Secret>,
    /// PEM CA file to trust for an mqtts:// broker.
    pub mqtt_ca_file: Option<PathBuf>,
    /// Service name -> `host:port`.
    #[serde(default)]
    pub services: BTreeMap<String, String>,
}

impl AgentFile {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file: Self =
            toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
        for (name, addr) in &file.services {
            parse_service(&format!("{name}={addr}")).map_err(anyhow::Error::msg)?;
        }
        Ok(file)
    }
}

/// Everything the agent runs with: the device-channel flags and the relay flags.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Device-channel flags.
    pub channel: AgentArgs,
    /// Relay flags.
    pub relay: RelayArgs,
}

impl From<AgentArgs> for AgentOptions {
    fn from(channel: AgentArgs) -> Self {
        Self {
            channel,
            relay: RelayArgs::default(),
        }
    }
}

/// The whole agent configuration: [`AgentOptions`] plus the MQTT flags.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Device-channel and relay flags.
    pub options: AgentOptions,
    /// MQTT flags (none set: the device channel).
    pub mqtt: MqttAgentArgs,
}

impl From<AgentOptions> for AgentConfig {
    fn from(options: AgentOptions) -> Self {
        Self {
            options,
            mqtt: MqttAgentArgs::default(),
        }
    }
}

impl From<AgentArgs> for AgentConfig {
    fn from(channel: AgentArgs) -> Self {
        AgentOptions::from(channel).into()
    }
}

/// How the agent reaches its broker, resolved.
pub(super) struct MqttConn {
    pub(super) url: crate::config::MqttUrl,
    pub(super) username: Option<String>,
    pub(super) password: Option<Secret>,
    pub(super) ca_file: Option<PathBuf>,
}

/// The settings after merging flags over the config file.
struct Resolved {
    api_url: String,
    product_key: String,
    device_name: String,
    /// Needed for the device channel only.
    secret: Option<Secret>,
    ca_file: Option<PathBuf>,
    services: LocalServices,
    mqtt: Option<MqttConn>,
}

impl AgentConfig {
    fn resolve(self) -> anyhow::Result<Resolved> {
        // `--api` is checked even in MQTT mode: a wrong flag should not wait to be noticed.
        let file = match &self.options.relay.config {
            Some(path) => AgentFile::load(path)?,
            None => AgentFile::default(),
        };
        let m = self.mqtt;
        let mqtt = match m.mqtt_url.or(file.mqtt_url) {
            Some(url) => {
                let username = m.mqtt_username.or(file.mqtt_username);
                let password = m.mqtt_password.or(file.mqtt_password);
                if password.is_some() && username.is_none() {
                    bail!("--mqtt-password needs --mqtt-username");
                }
                Some(MqttConn {
                    url: crate::config::MqttUrl::parse(&url)?,
                    username,
                    password,
                    ca_file: m.mqtt_ca_file.or(file.mqtt_ca_file),
                })
            }
            None => None,
        };
        let options = self.options;
        let c = options.channel;
        // The API flag always has a value: the file wins only over the built-in default.
        let api_url = match file.api {
            Some(api) if c.api_url == DEFAULT_API => api,
            _ => c.api_url,
        };
        let mut services = service_map(options.relay.services)?;
        if services.is_empty() {
            services = file.services;
        }
        if services.is_empty() {
            let (name, addr) = DEFAULT_SERVICE;
            services.insert(name.into(), addr.into());
        }
        Ok(Resolved {
            api_url: crate::config::api_base_url(&api_url)?,
            product_key: c
                .product_key
                .or(file.product_key)
                .context("--product-key is required")?,
            device_name: c
                .device_name
                .or(file.device_name)
                .context("--device-name is required")?,
            secret: match c.device_secret.or(file.device_secret.map(Secret)) {
                Some(s) => Some(s),
                None if mqtt.is_some() => None,
                None => bail!("--device-secret or IOTUNNEL_DEVICE_SECRET is required"),
            },
            ca_file: options.relay.ca_file.or(file.ca_file),
            services: LocalServices(services),
            mqtt,
        })
    }
}

/// The `--api` default.
const DEFAULT_API: &str = "http://127.0.0.1:8080";

/// Why the channel ended.
enum Ended {
    /// The server closed it on purpose (replaced by a newer channel, or the device was deleted).
    Final(String),
    /// A network error or an ordinary close: reconnect.
    Retry(String),
    /// The server refused the channel (HTTP 4xx: wrong secret, unknown device, clock skew):
    /// retrying with the same settings cannot help.
    Refused(String),
}

/// Runs the agent until the device is deleted or replaced; network errors never end it. With
/// MQTT flags it takes its notifications from the broker and runs until aborted.
pub async fn run(config: impl Into<AgentConfig>) -> anyhow::Result<()> {
    let r = config.into().resolve()?;
    let tls = dial::tls_config(r.ca_file.as_deref())?;
    let _trim = crate::trim::spawn();
    for (name, addr) in &r.services.0 {
        tracing::info!(service = %name, address = %addr, "serving local service");
    }
    let tunnels = Tunnels::new(RelayContext {
        tls: tls.clone(),
        local: Arc::new(r.services),
    });
    if let Some(mqtt) = &r.mqtt {
        return super::mqtt::run(mqtt, &r.product_key, &r.device_name, &tunnels).await;
    }
    let url = channel_url(&r.api_url)?;
    let secret = r
        .secret
        .context("--device-secret or IOTUNNEL_DEVICE_SECRET is required")?;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let ended = session(
            &url,
            &r.product_key,
            &r.device_name,
            &secret,
            &tls,
            &tunnels,
        );
        match ended.await {
            Ok(Ended::Final(why)) => bail!("device channel ended: {why}"),
            Ok(Ended::Refused(why)) => bail!("{why}"),
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
    let api = crate::config::api_base_url(api)?;
    let base = match api.split_once("://") {
        Some(("https", rest)) => format!("wss://{rest}"),
        Some((_, rest)) => format!("ws://{rest}"),
        None => bail!("--api must start with http:// or https://"),
    };
    Ok(format!("{base}/v1/device/connect"))
}

/// One line for a refused device channel: what the server said, and what to check.
fn refused_line(status: u16, body: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let said = match (
        json["error"]["code"].as_str(),
        json["error"]["message"].as_str(),
    ) {
        (Some(code), Some(message)) => format!("{message} ({code})"),
        _ => body.trim().chars().take(200).collect(),
    };
    let check = match json["error"]["code"].as_str() {
        Some("stale_timestamp") => "check this machine's clock",
        _ if status == 401 || status == 404 => {
            "check --product-key, --device-name and the device secret (IOTUNNEL_DEVICE_SECRET)"
        }
        _ => "check the agent's settings",
    };
    format!("the server refused the device channel with HTTP {status}: {said}; {check}")
}

async fn session(
    url: &str,
    pk: &str,
    dn: &str,
    secret: &Secret,
    tls: &Arc<rustls::ClientConfig>,
    tunnels: &Tunnels,
) -> anyhow::Result<Ended> {
    let services = tunnels.local_services();
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
    let connector = Some(Connector::Rustls(tls.clone()));
    let (mut ws, _) =
        match tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector).await {
            Ok(ok) => ok,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .into_owned();
                let status = resp.status().as_u16();
                // Authentication does not heal by retrying; a busy or restarting server does.
                if (400..500).contains(&status) && status != 408 && status != 429 {
                    return Ok(Ended::Refused(refused_line(status, &body)));
                }
                bail!("the server refused the device channel: HTTP {status} {body}");
            }
            Err(e) if crate::tls::is_unknown_issuer(&e) => {
                bail!(
                    "cannot reach the device channel: {e}: the API's certificate is signed by a \
                     CA this agent does not trust; {}",
                    crate::tls::CA_FILE_HINT
                )
            }
            Err(e) => return Err(e).context("cannot reach the device channel"),
        };
    tracing::info!(
        product_key = pk,
        device_name = dn,
        "device channel connected"
    );
    // What we serve, so the server refuses a tunnel for a service we do not map.
    let report = AgentMessage::Services {
        services: services.0.keys().cloned().collect(),
    };
    ws.send(Message::Text(report.to_json().into())).await?;
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Text(text) => on_notification(&text, tunnels),
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

/// The relay a `connect` names: `endpoint` is the relay's host:port and `url`'s scheme says
/// whether it is wss or ws; without `endpoint`, `url` itself.
pub fn relay_endpoint(note: &crate::proto::device::Connect) -> anyhow::Result<Endpoint> {
    let plain = note.url.as_deref().is_some_and(|u| u.starts_with("ws://"));
    match (&note.endpoint, &note.url) {
        (Some(host_port), _) if plain => Endpoint::parse(&format!("ws://{host_port}")),
        (Some(host_port), _) => Endpoint::parse(host_port),
        (None, Some(url)) => Endpoint::parse(url),
        (None, None) => Err(anyhow::anyhow!("no relay endpoint")),
    }
}

/// Acts on one notification (device channel or MQTT); a malformed one is logged (without its
/// token) and skipped.
pub(super) fn on_notification(text: &str, tunnels: &Tunnels) {
    let note: ServerMessage = match serde_json::from_str(text) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "ignored a malformed notification");
            return;
        }
    };
    match note {
        ServerMessage::Connect(note) => {
            tracing::info!(operation = "connect", tunnel_id = %note.tunnel_id,
                services = ?note.services, "notification");
            let endpoint = relay_endpoint(&note);
            let Some(token) = note.token else {
                tracing::warn!(tunnel_id = %note.tunnel_id, "connect notification without a token");
                return;
            };
            match endpoint {
                Ok(endpoint) => tunnels.connect(Connect {
                    tunnel_id: note.tunnel_id,
                    token: Secret(token),
                    endpoint,
                    services: note.services,
                }),
                Err(e) => {
                    tracing::warn!(tunnel_id = %note.tunnel_id, error = %e, "bad relay endpoint")
                }
            }
        }
        ServerMessage::Close { tunnel_id, reason } => {
            tracing::info!(operation = "close", tunnel_id = %tunnel_id, "notification");
            tunnels.close(&tunnel_id, reason.as_deref().unwrap_or("-"))
        }
        ServerMessage::DeviceDeleted | ServerMessage::Unknown => {
            tracing::debug!("ignored a notification")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(text: &str) -> crate::proto::device::Connect {
        match serde_json::from_str(text).unwrap() {
            ServerMessage::Connect(c) => c,
            _ => panic!("not a connect: {text}"),
        }
    }

    /// fuzz/device_channel's crash: a connect whose URL has a mangled IPv6 host parsed to an
    /// endpoint whose host:port did not parse back; now it is refused.
    #[test]
    fn connect_with_a_mangled_ipv6_host_is_refused() {
        let crash = r#"{"operation": "connect", "tunnel_id": "t-1", "token": "tok", "url": "ws://_::1]:1]:80", "services": ["SSH"]}"#;
        assert!(relay_endpoint(&connect(crash)).is_err());
        for bad in ["ws://[_::1]:80", "ws://::1:80", "[::1]]:80", "ws://a]:80"] {
            let note = connect(&format!(
                r#"{{"operation":"connect","tunnel_id":"t","url":"{bad}"}}"#
            ));
            assert!(relay_endpoint(&note).is_err(), "{bad}");
        }
        let note = connect(
            r#"{"operation":"connect","tunnel_id":"t","url":"ws://x","endpoint":"[::1]:80"}"#,
        );
        let e = relay_endpoint(&note).unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (false, "::1", 80));
        assert_eq!(Endpoint::parse(&e.host_port()).unwrap().host, "::1");
    }

    #[test]
    fn services_parse() {
        assert_eq!(
            parse_service("SSH=127.0.0.1:22").unwrap(),
            ("SSH".into(), "127.0.0.1:22".into())
        );
        assert_eq!(
            parse_service("WEB=[::1]:80").unwrap(),
            ("WEB".into(), "[::1]:80".into())
        );
        for bad in [
            "SSH",
            "=1.2.3.4:5",
            "SSH=host",
            "SSH=h:99999",
            "SSH=h:0",
            "A=h:1,B=h:2",
            "A B=h:1",
            "SSH=h:22 ",
        ] {
            assert!(parse_service(bad).is_err(), "{bad}");
        }
        let twice = vec![
            ("SSH".to_string(), "h:1".to_string()),
            ("SSH".to_string(), "h:2".to_string()),
        ];
        let e = service_map(twice).unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
        assert_eq!(
            channel_url("127.0.0.1:8080").unwrap(),
            "ws://127.0.0.1:8080/v1/device/connect"
        );
        assert_eq!(
            channel_url("https://api.example/").unwrap(),
            "wss://api.example/v1/device/connect"
        );
    }

    #[test]
    fn refusals_say_what_to_check() {
        let body = r#"{"error":{"code":"invalid_signature","message":"unknown device or invalid signature","request_id":"r"}}"#;
        let line = refused_line(401, body);
        assert!(
            line.contains("HTTP 401") && line.contains("invalid_signature"),
            "{line}"
        );
        assert!(
            line.contains("device secret") && !line.contains('\n'),
            "{line}"
        );
        let skew = r#"{"error":{"code":"stale_timestamp","message":"timestamp is off"}}"#;
        assert!(refused_line(401, skew).contains("clock"));
    }

    #[test]
    fn config_file_parses_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "api = \"http://10.0.0.1:8080\"\nproduct_key = \"pk\"\ndevice_name = \"d\"\n\
             device_secret = \"s\"\n[services]\nSSH = \"127.0.0.1:2222\"\n",
        )
        .unwrap();
        let options = AgentConfig::from(AgentOptions {
            channel: AgentArgs {
                api_url: DEFAULT_API.into(),
                product_key: None,
                device_name: Some("flag-name".into()),
                device_secret: None,
            },
            relay: RelayArgs {
                config: Some(path.clone()),
                ..RelayArgs::default()
            },
        });
        let r = options.clone().resolve().unwrap();
        assert_eq!(r.api_url, "http://10.0.0.1:8080");
        assert_eq!(
            (r.product_key.as_str(), r.device_name.as_str()),
            ("pk", "flag-name")
        );
        assert_eq!(r.services.resolve("SSH"), Some("127.0.0.1:2222"));
        assert!(r.mqtt.is_none() && r.secret.is_some());

        // MQTT mode from the file: no secret needed.
        std::fs::write(
            &path,
            "product_key = \"pk\"\ndevice_name = \"d\"\nmqtt_url = \"mqtts://broker:8884\"\n\
             mqtt_username = \"u\"\nmqtt_password = \"p\"\n",
        )
        .unwrap();
        let r = options.clone().resolve().unwrap();
        let m = r.mqtt.as_ref().unwrap();
        assert_eq!((m.url.port, m.url.tls), (8884, true));
        assert_eq!(m.username.as_deref(), Some("u"));
        assert!(r.secret.is_none());

        std::fs::write(&path, "unknown_key = 1\n").unwrap();
        assert!(AgentFile::load(&path).is_err());
    }
}
