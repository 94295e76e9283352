//! Command-line interface: `iotunnel server` and the API commands
//! (`account`, `product`, `device`, `tunnel`). Tables for people, `--json` for scripts.
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::config::{ServerArgs, Settings};

pub mod keys;

/// iotunnel: secure tunnels to IoT devices that never open a port.
#[derive(Parser, Debug)]
#[command(name = "iotunnel", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (control plane, relay, metrics) with embedded defaults.
    Server(Box<ServerArgs>),
    /// Manage accounts (admin key only).
    #[command(subcommand)]
    Account(AccountCmd),
    /// List, create and revoke API keys.
    #[command(subcommand)]
    Key(keys::KeyCmd),
    /// Manage products.
    #[command(subcommand)]
    Product(ProductCmd),
    /// Run the device agent, or manage devices (`device create|list|delete`).
    Device(DeviceArgs),
    /// Carry local connections (or stdin/stdout) through a tunnel: the person's local proxy.
    Client(crate::agent::client::ClientArgs),
    /// Manage tunnels.
    #[command(subcommand)]
    Tunnel(TunnelCmd),
    /// Inspect the nodes of the fleet (admin key only).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Manage access key pairs, the credentials of the AWS and Alibaba SDKs.
    #[command(subcommand)]
    AccessKey(AccessKeyCmd),
    /// Print a shell completion script to stdout (the package installs them).
    #[command(hide = true)]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (the package installs them).
    #[command(hide = true)]
    Man {
        /// Write every command's page into this directory [default: print iotunnel(1)].
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

/// `iotunnel access-key ...`
#[derive(Subcommand, Debug)]
pub enum AccessKeyCmd {
    /// Create an access key pair and print its secret (once).
    Create {
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
    /// List the account's access key ids.
    List {
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
    /// Revoke an access key: requests signed with it fail at once.
    Delete {
        /// The access key id.
        access_key_id: String,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
}

/// `iotunnel node ...`
#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// List every node: live or dead, its relay, tunnels and device channels.
    List {
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
}

/// How to reach the API.
#[derive(Args, Debug, Clone)]
pub struct ApiOpts {
    /// Control API base URL (http:// when no scheme is given).
    #[arg(
        long,
        env = "IOTUNNEL_API",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub api: String,
    /// API key.
    #[arg(long, env = "IOTUNNEL_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `iotunnel account ...`
#[derive(Subcommand, Debug)]
pub enum AccountCmd {
    /// Create an account and print its API key (once).
    Create {
        /// Account name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
}

/// `iotunnel product ...`
#[derive(Subcommand, Debug)]
pub enum ProductCmd {
    /// Create a product.
    Create {
        /// Product name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
    /// List products.
    List {
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
}

/// `iotunnel device`: the agent when no subcommand is given.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DeviceArgs {
    /// Manage devices through the API.
    #[command(subcommand)]
    pub cmd: Option<DeviceCmd>,
    /// Device agent flags.
    #[command(flatten)]
    pub agent: crate::agent::device::AgentArgs,
    /// Device agent relay flags.
    #[command(flatten)]
    pub relay: crate::agent::device::RelayArgs,
    /// Device agent MQTT flags (notifications from a broker instead of the device channel).
    #[command(flatten)]
    pub mqtt: crate::agent::device::MqttAgentArgs,
}

/// `iotunnel device ...`
#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// Create a device and print its secret (once).
    Create {
        /// Product key.
        #[arg(long)]
        product_key: String,
        /// Device name.
        #[arg(long = "device-name", visible_alias = "name")]
        name: String,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
    /// List a product's devices.
    List {
        /// Product key.
        #[arg(long)]
        product_key: String,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
    /// Delete a device (closes its tunnels).
    Delete {
        /// Product key.
        #[arg(long)]
        product_key: String,
        /// Device name.
        #[arg(long = "device-name", visible_alias = "name")]
        name: String,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
}

/// `iotunnel tunnel ...`
#[derive(Subcommand, Debug)]
pub enum TunnelCmd {
    /// Create a tunnel to an online device.
    Create {
        /// Product key.
        #[arg(long)]
        product_key: String,
        /// Device name.
        #[arg(long)]
        device_name: String,
        /// Custom information sent to the device.
        #[arg(long)]
        custom_info: Option<String>,
        /// Description.
        #[arg(long)]
        description: Option<String>,
        /// A service name (repeatable); default SSH.
        #[arg(long = "service")]
        services: Vec<String>,
        /// Lifetime in seconds (60 to 86400).
        #[arg(long)]
        lifetime_seconds: Option<u32>,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
    /// Search tunnels, newest first.
    List {
        /// Only this product.
        #[arg(long)]
        product_key: Option<String>,
        /// Only this device.
        #[arg(long)]
        device_name: Option<String>,
        /// Only this tunnel.
        #[arg(long)]
        tunnel_id: Option<String>,
        /// OPEN or CLOSED.
        #[arg(long)]
        state: Option<String>,
        /// Page size (1 to 100).
        #[arg(long)]
        page_size: Option<u32>,
        /// Page token from a previous page.
        #[arg(long)]
        page_token: Option<String>,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
    /// Show a tunnel's details.
    Describe {
        /// Tunnel id.
        id: String,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
    /// Close an OPEN tunnel (disconnects both sides; irreversible).
    Close {
        /// Tunnel id.
        id: String,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
    /// Delete a CLOSED tunnel.
    Delete {
        /// Tunnel id.
        id: String,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
    /// Issue new tokens.
    Rotate {
        /// Tunnel id.
        id: String,
        /// client, device or all.
        #[arg(long, default_value = "client")]
        side: String,
        #[command(flatten)]
        /// API options.
        api: ApiOpts,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(args) => {
            let settings = Settings::resolve(&args)?;
            init_server_logging(settings.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("iotunnel-control")
                .enable_all()
                .build()?;
            rt.block_on(crate::server::run(settings))
        }
        Command::Device(DeviceArgs {
            cmd: None,
            agent,
            relay,
            mqtt,
        }) => {
            init_server_logging(crate::config::LogFormat::from_env());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let config = crate::agent::device::AgentConfig {
                options: crate::agent::device::AgentOptions {
                    channel: agent,
                    relay,
                },
                mqtt,
            };
            rt.block_on(crate::agent::device::run(config))
        }
        Command::Client(args) => {
            // With --stdio, stdout carries the tunnel: logs go to stderr, warnings only.
            let level = if args.stdio.is_some() { "warn" } else { "info" };
            init_logging(level, crate::config::LogFormat::from_env());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let result = rt.block_on(crate::agent::client::run(args));
            // A stdin read may still be blocked in its thread: do not wait for it.
            rt.shutdown_background();
            result
        }
        Command::Completions { shell } => {
            crate::cli_docs::write_completions(shell, &mut std::io::stdout().lock())
        }
        Command::Man { dir: Some(dir) } => crate::cli_docs::write_man_pages(&dir),
        Command::Man { dir: None } => {
            crate::cli_docs::write_main_man_page(&mut std::io::stdout().lock())
        }
        other => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(api_command(other))
        }
    }
}

fn init_server_logging(format: crate::config::LogFormat) {
    init_logging("info", format);
}

fn init_logging(default_level: &str, format: crate::config::LogFormat) {
    let filter = crate::logging::filter(default_level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        crate::config::LogFormat::Json => builder.json().with_current_span(true).try_init(),
        crate::config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// A small client of the control API.
struct ApiClient {
    http: reqwest::Client,
    base: String,
    key: String,
    json: bool,
}

impl ApiClient {
    fn new(opts: ApiOpts) -> anyhow::Result<Self> {
        let key = opts
            .api_key
            .context("an API key is required: --api-key or IOTUNNEL_API_KEY")?;
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()?,
            base: crate::config::api_base_url(&opts.api)?,
            key,
            json: opts.json,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the API at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let e = &value["error"];
            match (e["code"].as_str(), e["message"].as_str()) {
                (Some(code), Some(msg)) => bail!(
                    "{msg} ({code}, HTTP {}, request {})",
                    status.as_u16(),
                    e["request_id"].as_str().unwrap_or("-")
                ),
                _ => bail!("HTTP {status}: {value}"),
            }
        }
        Ok(value)
    }

    /// The tunnel as it stands once the relay has ended both sides: the close's answer still
    /// shows the connections it is ending, and their end is recorded a moment later. Gives up
    /// waiting after [`CLOSE_SETTLE`] and shows what it has.
    async fn after_close(&self, path: &str, closed: Value) -> Value {
        let settled = |v: &Value| {
            ["/device/state", "/client/state"]
                .iter()
                .all(|p| v.pointer(p).and_then(Value::as_str) != Some("CONNECTED"))
        };
        let mut latest = closed;
        let deadline = tokio::time::Instant::now() + CLOSE_SETTLE;
        while !settled(&latest) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            match self.call(reqwest::Method::GET, path, None).await {
                Ok(v) => latest = v,
                Err(_) => break,
            }
        }
        latest
    }

    /// Prints `value` as JSON, or as a table of `columns` over `rows`.
    fn print(&self, value: &Value, rows: &[Value], columns: &[(&str, &str)]) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            );
            return;
        }
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                columns
                    .iter()
                    .map(|(_, ptr)| cell(r.pointer(ptr)))
                    .collect()
            })
            .collect();
        let widths: Vec<usize> = columns
            .iter()
            .enumerate()
            .map(|(i, (h, _))| {
                cells
                    .iter()
                    .map(|c| c[i].len())
                    .chain([h.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |vals: Vec<String>| {
            let s: Vec<String> = vals
                .iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v:<w$}"))
                .collect();
            println!("{}", s.join("  ").trim_end());
        };
        line(columns.iter().map(|(h, _)| h.to_string()).collect());
        cells.into_iter().for_each(line);
    }
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| cell(Some(x)))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How long `tunnel close` waits for the relay to report both sides disconnected: the relay
/// ends them at once, and its events are persisted in batches well within this.
const CLOSE_SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

const TUNNEL_COLUMNS: &[(&str, &str)] = &[
    ("TUNNEL ID", "/tunnel_id"),
    ("PRODUCT", "/product_key"),
    ("DEVICE", "/device_name"),
    ("STATE", "/state"),
    ("DEVICE CONN", "/device/state"),
    ("CLIENT CONN", "/client/state"),
    ("CREATED", "/created_at"),
];

async fn api_command(cmd: Command) -> anyhow::Result<()> {
    use reqwest::Method;
    match cmd {
        Command::Server(_)
        | Command::Client(_)
        | Command::Device(DeviceArgs { cmd: None, .. })
        | Command::Completions { .. }
        | Command::Man { .. } => {
            unreachable!("handled by run")
        }
        Command::Account(AccountCmd::Create { name, api }) => {
            let c = ApiClient::new(api)?;
            let v = c
                .call(Method::POST, "/v1/accounts", Some(json!({ "name": name })))
                .await?;
            c.print(
                &v,
                std::slice::from_ref(&v),
                &[
                    ("ACCOUNT ID", "/account_id"),
                    ("NAME", "/name"),
                    ("API KEY (shown once)", "/api_key"),
                ],
            );
        }
        Command::Product(ProductCmd::Create { name, api }) => {
            let c = ApiClient::new(api)?;
            let v = c
                .call(Method::POST, "/v1/products", Some(json!({ "name": name })))
                .await?;
            c.print(
                &v,
                std::slice::from_ref(&v),
                &[
                    ("PRODUCT KEY", "/product_key"),
                    ("NAME", "/name"),
                    ("CREATED", "/created_at"),
                ],
            );
        }
        Command::Node(NodeCmd::List { api }) => {
            let c = ApiClient::new(api)?;
            let v = c.call(Method::GET, "/v1/nodes", None).await?;
            let rows = v["nodes"].as_array().cloned().unwrap_or_default();
            c.print(
                &v,
                &rows,
                &[
                    ("NODE ID", "/node_id"),
                    ("STATE", "/state"),
                    ("RELAY URL", "/relay_url"),
                    ("TUNNELS", "/open_tunnels"),
                    ("DEVICES", "/device_channels"),
                    ("HEARTBEAT", "/heartbeat_at"),
                    ("VERSION", "/version"),
                ],
            );
        }
        Command::Product(ProductCmd::List { api }) => {
            let c = ApiClient::new(api)?;
            let v = c.call(Method::GET, "/v1/products", None).await?;
            let rows = v["products"].as_array().cloned().unwrap_or_default();
            c.print(
                &v,
                &rows,
                &[
                    ("PRODUCT KEY", "/product_key"),
                    ("NAME", "/name"),
                    ("CREATED", "/created_at"),
                ],
            );
        }
        Command::Device(DeviceArgs {
            cmd:
                Some(DeviceCmd::Create {
                    product_key,
                    name,
                    api,
                }),
            ..
        }) => {
            let c = ApiClient::new(api)?;
            let path = format!("/v1/products/{}/devices", enc(&product_key));
            let v = c
                .call(Method::POST, &path, Some(json!({ "name": name })))
                .await?;
            c.print(
                &v,
                std::slice::from_ref(&v),
                &[
                    ("PRODUCT KEY", "/product_key"),
                    ("DEVICE", "/device_name"),
                    ("SECRET (shown once)", "/device_secret"),
                ],
            );
        }
        Command::Device(DeviceArgs {
            cmd: Some(DeviceCmd::List { product_key, api }),
            ..
        }) => {
            let c = ApiClient::new(api)?;
            let v = c
                .call(
                    Method::GET,
                    &format!("/v1/products/{}/devices", enc(&product_key)),
                    None,
                )
                .await?;
            let rows = v["devices"].as_array().cloned().unwrap_or_default();
            c.print(
                &v,
                &rows,
                &[
                    ("DEVICE", "/device_name"),
                    ("ONLINE", "/online"),
                    ("OPEN TUNNELS", "/open_tunnels"),
                    ("CREATED", "/created_at"),
                ],
            );
        }
        Command::Device(DeviceArgs {
            cmd:
                Some(DeviceCmd::Delete {
                    product_key,
                    name,
                    api,
                }),
            ..
        }) => {
            let c = ApiClient::new(api)?;
            let path = format!("/v1/products/{}/devices/{}", enc(&product_key), enc(&name));
            c.call(Method::DELETE, &path, None).await?;
            if !c.json {
                println!("device {name} deleted");
            }
        }
        Command::Tunnel(cmd) => tunnel_command(cmd).await?,
        Command::Key(cmd) => keys::run(cmd).await?,
        Command::AccessKey(cmd) => access_key_command(cmd).await?,
    }
    Ok(())
}

async fn access_key_command(cmd: AccessKeyCmd) -> anyhow::Result<()> {
    use reqwest::Method;
    match cmd {
        AccessKeyCmd::Create { api } => {
            let c = ApiClient::new(api)?;
            let v = c
                .call(Method::POST, "/v1/access-keys", Some(json!({})))
                .await?;
            c.print(
                &v,
                std::slice::from_ref(&v),
                &[
                    ("ACCESS KEY ID", "/access_key_id"),
                    ("SECRET ACCESS KEY (shown once)", "/secret_access_key"),
                    ("CREATED", "/created_at"),
                ],
            );
        }
        AccessKeyCmd::List { api } => {
            let c = ApiClient::new(api)?;
            let v = c.call(Method::GET, "/v1/access-keys", None).await?;
            let rows = v["access_keys"].as_array().cloned().unwrap_or_default();
            c.print(
                &v,
                &rows,
                &[
                    ("ACCESS KEY ID", "/access_key_id"),
                    ("CREATED", "/created_at"),
                ],
            );
        }
        AccessKeyCmd::Delete { access_key_id, api } => {
            let c = ApiClient::new(api)?;
            let path = format!("/v1/access-keys/{}", enc(&access_key_id));
            c.call(Method::DELETE, &path, None).await?;
            if !c.json {
                println!("access key {access_key_id} revoked");
            }
        }
    }
    Ok(())
}

async fn tunnel_command(cmd: TunnelCmd) -> anyhow::Result<()> {
    use reqwest::Method;
    match cmd {
        TunnelCmd::Create {
            product_key,
            device_name,
            custom_info,
            description,
            services,
            lifetime_seconds,
            api,
        } => {
            let c = ApiClient::new(api)?;
            let mut body = json!({ "product_key": product_key, "device_name": device_name });
            if let Some(v) = custom_info {
                body["custom_info"] = json!(v);
            }
            if let Some(v) = description {
                body["description"] = json!(v);
            }
            if !services.is_empty() {
                body["services"] = json!(services);
            }
            if let Some(v) = lifetime_seconds {
                body["lifetime_seconds"] = json!(v);
            }
            let v = c.call(Method::POST, "/v1/tunnels", Some(body)).await?;
            if c.json {
                c.print(&v, &[], &[]);
            } else {
                for (k, ptr) in [
                    ("tunnel id", "/tunnel_id"),
                    ("client token (shown once)", "/client_token"),
                    ("client url", "/client_url"),
                    ("client endpoint", "/client_endpoint"),
                    ("expires at", "/expires_at"),
                ] {
                    println!("{k:<26} {}", cell(v.pointer(ptr)));
                }
            }
        }
        TunnelCmd::List {
            product_key,
            device_name,
            tunnel_id,
            state,
            page_size,
            page_token,
            api,
        } => {
            let c = ApiClient::new(api)?;
            let mut q = Vec::new();
            for (k, v) in [
                ("product_key", product_key),
                ("device_name", device_name),
                ("tunnel_id", tunnel_id),
                ("state", state),
                ("page_size", page_size.map(|n| n.to_string())),
                ("page_token", page_token),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", enc(&v)));
                }
            }
            let v = c
                .call(Method::GET, &format!("/v1/tunnels?{}", q.join("&")), None)
                .await?;
            let rows = v["tunnels"].as_array().cloned().unwrap_or_default();
            c.print(&v, &rows, TUNNEL_COLUMNS);
            if let (false, Some(next)) = (c.json, v["next_page_token"].as_str()) {
                println!("more: --page-token {next}");
            }
        }
        TunnelCmd::Describe { id, api } => {
            let c = ApiClient::new(api)?;
            let v = c
                .call(Method::GET, &format!("/v1/tunnels/{}", enc(&id)), None)
                .await?;
            if c.json {
                c.print(&v, &[], &[]);
            } else {
                for (k, ptr) in [
                    ("tunnel id", "/tunnel_id"),
                    ("product", "/product_key"),
                    ("device", "/device_name"),
                    ("state", "/state"),
                    ("services", "/services"),
                    ("description", "/description"),
                    ("custom info", "/custom_info"),
                    ("created at", "/created_at"),
                    ("expires at", "/expires_at"),
                    ("closed at", "/closed_at"),
                    ("close reason", "/close_reason"),
                    ("device connection", "/device/state"),
                    ("device since", "/device/updated_at"),
                    ("device rtt ms", "/device/rtt_ms"),
                    ("client connection", "/client/state"),
                    ("client since", "/client/updated_at"),
                    ("client rtt ms", "/client/rtt_ms"),
                ] {
                    println!("{k:<18} {}", cell(v.pointer(ptr)));
                }
            }
        }
        TunnelCmd::Close { id, api } => {
            let c = ApiClient::new(api)?;
            let path = format!("/v1/tunnels/{}", enc(&id));
            let closed = c.call(Method::POST, &format!("{path}/close"), None).await?;
            let v = c.after_close(&path, closed).await;
            c.print(&v, std::slice::from_ref(&v), TUNNEL_COLUMNS);
        }
        TunnelCmd::Delete { id, api } => {
            let c = ApiClient::new(api)?;
            c.call(Method::DELETE, &format!("/v1/tunnels/{}", enc(&id)), None)
                .await?;
            if !c.json {
                println!("tunnel {id} deleted");
            }
        }
        TunnelCmd::Rotate { id, side, api } => {
            let c = ApiClient::new(api)?;
            let v = c
                .call(
                    Method::POST,
                    &format!("/v1/tunnels/{}/rotate", enc(&id)),
                    Some(json!({ "side": side })),
                )
                .await?;
            c.print(
                &v,
                std::slice::from_ref(&v),
                &[
                    ("TUNNEL ID", "/tunnel_id"),
                    ("CLIENT TOKEN", "/client_token"),
                    ("DEVICE TOKEN", "/device_token"),
                ],
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("iotunnel").chain(args.iter().copied()))
    }

    #[test]
    fn relay_metrics_takes_on_and_off_as_its_help_says() {
        let metrics = |value: &str| match parse(&["server", "--relay-metrics", value]) {
            Ok(Cli {
                command: Command::Server(args),
            }) => Ok(args.knobs.relay_metrics),
            Ok(_) => panic!("not the server command"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(metrics("on"), Ok(Some(true)));
        assert_eq!(metrics("off"), Ok(Some(false)));
        // Still accepted from before: true/false.
        assert_eq!(metrics("true"), Ok(Some(true)));
        assert_eq!(metrics("false"), Ok(Some(false)));
        let e = metrics("maybe").unwrap_err();
        assert!(e.contains("[possible values: on, off]"), "{e}");
    }

    #[test]
    fn device_commands_take_device_name_and_keep_name() {
        for flag in ["--device-name", "--name"] {
            for sub in ["create", "delete"] {
                let cli = parse(&["device", sub, "--product-key", "pk", flag, "cam-1"])
                    .unwrap_or_else(|e| panic!("device {sub} {flag}: {e}"));
                let name = match cli.command {
                    Command::Device(DeviceArgs {
                        cmd: Some(DeviceCmd::Create { name, .. } | DeviceCmd::Delete { name, .. }),
                        ..
                    }) => name,
                    other => panic!("{other:?}"),
                };
                assert_eq!(name, "cam-1");
            }
        }
    }

    #[test]
    fn agent_services_refuse_what_they_cannot_mean() {
        let agent = |service: &str| {
            parse(&[
                "device",
                "--product-key",
                "pk",
                "--device-name",
                "d",
                "--service",
                service,
            ])
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert_eq!(agent("SSH=127.0.0.1:22"), Ok(()));
        for (bad, why) in [
            ("SSH=127.0.0.1:99999", "1 to 65535"),
            ("A=h:1,B=h:2", "one address only"),
            ("SSH", "NAME=HOST:PORT"),
        ] {
            let e = agent(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
