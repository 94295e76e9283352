//! `iotunnel client`: the local proxy for a person. It dials the relay as the source (AWS V3)
//! with the client token and carries local TCP connections (`--listen`) or one connection over
//! stdin/stdout (`--stdio`, for ssh's ProxyCommand) through the tunnel, many connections at
//! once on one relay connection ([`super::mux`]).
//!
//! - At start: a refused token or a closed tunnel ends the client with one clear line.
//! - The relay connection drops: connections open then are reset, and the client reconnects
//!   with the same token (with backoff) while it keeps accepting.
//! - The tunnel is closed (or the token rotated): the client exits non-zero saying so.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::dial::{self, Backoff, DialError, Endpoint, SessionEnd};
use super::mux::{self, LocalRead, Session, SessionOptions};
use crate::config::Secret;
use crate::proto::aws::Side;

/// How long a stdio client waits for its close frame to leave before exiting.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Flags of `iotunnel client`.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The tunnel's client URL (`client_url` from `tunnel create`):
    /// wss://HOST:PORT/tunnel/ID/source (or the relay's HOST:PORT).
    #[arg(long, env = "IOTUNNEL_URL")]
    pub url: String,
    /// The client access token (shown once by `tunnel create`).
    #[arg(long, env = "IOTUNNEL_TOKEN", hide_env_values = true, value_parser = |s: &str| Ok::<_, String>(Secret(s.to_string())))]
    pub token: Secret,
    /// Accept local connections for a service: [SERVICE=]HOST:PORT, or a port alone for
    /// 127.0.0.1:PORT (repeatable). Without SERVICE, the tunnel's only service.
    #[arg(long = "listen", value_name = "[SERVICE=]HOST:PORT")]
    pub listen: Vec<String>,
    /// Carry one connection to SERVICE over stdin/stdout (for ssh -o ProxyCommand).
    #[arg(long, value_name = "SERVICE", conflicts_with = "listen")]
    pub stdio: Option<String>,
    /// Trust the CA certificates in this PEM file (the server's tls/ca.pem) instead of the
    /// public web PKI roots.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// A client connected to the relay and listening.
pub struct RunningClient {
    /// Each listener: its service and the address it is bound to.
    pub listening: Vec<(String, SocketAddr)>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningClient {
    /// Waits until the client ends (the tunnel closed, or a refusal on reconnect).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        (&mut self.task).await.context("the client task failed")?
    }
}

impl Drop for RunningClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs the client until the tunnel closes (an error) or, with `--stdio`, the connection ends.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let _trim = crate::trim::spawn();
    if args.stdio.is_some() {
        return run_stdio(args).await;
    }
    let running = start(args).await?;
    for (service, addr) in &running.listening {
        tracing::info!(service = %service, address = %addr, "listening");
    }
    running.wait().await
}

/// The relay endpoint, TLS trust and first connection, or one clear error.
async fn connect_first(args: &ClientArgs) -> anyhow::Result<(Relay, dial::Connected)> {
    let endpoint = Endpoint::parse(&args.url)?;
    let tls = dial::tls_config(args.ca_file.as_deref())?;
    let relay = Relay {
        endpoint,
        tls,
        token: args.token.clone(),
    };
    let connected = relay.dial().await.map_err(start_error)?;
    Ok((relay, connected))
}

/// Everything needed to dial the relay again.
struct Relay {
    endpoint: Endpoint,
    tls: Arc<rustls::ClientConfig>,
    token: Secret,
}

impl Relay {
    async fn dial(&self) -> Result<dial::Connected, DialError> {
        dial::dial(&self.endpoint, Side::Source, &self.token, &self.tls).await
    }
}

/// One clear line for a refusal.
fn start_error(e: DialError) -> anyhow::Error {
    match &e {
        _ if e.tunnel_closed() => anyhow::anyhow!("the tunnel is closed: {e}"),
        DialError::Refused {
            status: 401 | 403, ..
        } => anyhow::anyhow!("the relay refused the client token: {e}"),
        _ => e.into(),
    }
}

/// Picks the service of each `--listen` against the tunnel's services.
fn listen_specs(listen: &[String], services: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    if listen.is_empty() {
        bail!("nothing to do: give --listen [SERVICE=]HOST:PORT or --stdio SERVICE");
    }
    listen
        .iter()
        .map(|spec| {
            let (service, addr) = match spec.split_once('=') {
                Some((service, addr)) => (service.to_string(), addr.to_string()),
                None => match services {
                    [only] => (only.clone(), spec.clone()),
                    _ => bail!(
                        "the tunnel has services {services:?}: say which one with --listen SERVICE={spec}"
                    ),
                },
            };
            check_service(&service, services)?;
            Ok((service, listen_addr(&addr)?))
        })
        .collect()
}

/// A `--listen` address: `HOST:PORT`, or a bare port on 127.0.0.1 (`2222`); port 0 picks one.
fn listen_addr(text: &str) -> anyhow::Result<String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(format!("127.0.0.1:{port}"));
    }
    // Port 0 is fine for a listener; any other check is split_host_port's.
    let checked = match text.strip_suffix(":0") {
        Some(host) => crate::config::split_host_port(&format!("{host}:1")),
        None => crate::config::split_host_port(text),
    };
    match checked {
        Ok(_) => Ok(text.to_string()),
        Err(e) => bail!("--listen takes [SERVICE=]HOST:PORT or a port: {e}"),
    }
}

fn check_service(service: &str, services: &[String]) -> anyhow::Result<()> {
    if !services.is_empty() && !services.iter().any(|s| s == service) {
        bail!("the tunnel has no service {service:?} (it has {services:?})");
    }
    Ok(())
}

/// Connects, binds the listeners and serves them in a task; errors at start are returned.
pub async fn start(args: ClientArgs) -> anyhow::Result<RunningClient> {
    if args.listen.is_empty() {
        bail!("nothing to do: give --listen [SERVICE=]HOST:PORT or --stdio SERVICE");
    }
    let (relay, connected) = connect_first(&args).await?;
    let specs = listen_specs(&args.listen, &connected.services)?;
    let mut listeners = Vec::new();
    let mut listening = Vec::new();
    for (service, addr) in specs {
        let listener = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        listening.push((service.clone(), listener.local_addr()?));
        listeners.push((service, listener));
    }
    let task = tokio::spawn(serve(relay, connected, listeners));
    Ok(RunningClient { listening, task })
}

/// Accepts local connections and keeps the relay connection up.
async fn serve(
    relay: Relay,
    connected: dial::Connected,
    listeners: Vec<(String, TcpListener)>,
) -> anyhow::Result<()> {
    let options = SessionOptions::source();
    let (session, driver) = mux::start(connected, &options);
    let (current, watcher) = watch::channel(Some(session));
    let _accepting: Vec<AbortOnDrop> = listeners
        .into_iter()
        .map(|(service, listener)| {
            AbortOnDrop(tokio::spawn(accept(service, listener, watcher.clone())))
        })
        .collect();
    let mut driver = driver;
    let mut backoff = Backoff::default();
    loop {
        let end = driver.run().await;
        current.send_replace(None);
        match end {
            SessionEnd::TunnelClosed(reason) => bail!("the tunnel is closed ({reason})"),
            SessionEnd::Superseded(reason) => {
                bail!("the relay ended this client's connection for good ({reason})")
            }
            SessionEnd::Local => return Ok(()),
            SessionEnd::Lost(why) => {
                tracing::warn!(reason = %why, "relay connection lost; open connections were reset; reconnecting")
            }
        }
        driver = loop {
            backoff.wait().await;
            match relay.dial().await {
                Ok(connected) => {
                    tracing::info!("reconnected to the relay");
                    backoff.reset();
                    let (session, driver) = mux::start(connected, &options);
                    current.send_replace(Some(session));
                    break driver;
                }
                Err(e) if e.is_final() => return Err(start_error(e)),
                Err(e) => tracing::warn!(error = %e, "cannot reach the relay; retrying"),
            }
        };
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts connections for one service; each waits for a relay connection, then is carried.
async fn accept(
    service: String,
    listener: TcpListener,
    sessions: watch::Receiver<Option<Session>>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(ok) => ok,
            Err(e) => {
                // EMFILE and friends: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut sessions = sessions.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let session = match sessions.wait_for(Option::is_some).await {
                Ok(s) => s.clone(),
                Err(_) => return,
            };
            let Some(session) = session else { return };
            let (read, write) = tcp.into_split();
            match session.open(&service, LocalRead::Tcp(read), write).await {
                None => {
                    tracing::debug!(%peer, "relay connection gone; dropped the local connection")
                }
                Some(conn) => {
                    if let Ok(Some(why)) = conn.await {
                        tracing::warn!(%peer, service = %service, reason = %why,
                            "the device refused the connection");
                    }
                }
            }
        });
    }
}

/// `--stdio SERVICE`: one connection over stdin/stdout; exits when it ends.
async fn run_stdio(args: ClientArgs) -> anyhow::Result<()> {
    let service = args.stdio.clone().unwrap_or_default();
    let (_relay, connected) = connect_first(&args).await?;
    check_service(&service, &connected.services)?;
    let (session, driver) = mux::start(connected, &SessionOptions::source());
    let mut driver = tokio::spawn(driver.run());
    let Some(conn) = session
        .open(
            &service,
            LocalRead::Stream(Box::new(tokio::io::stdin())),
            tokio::io::stdout(),
        )
        .await
    else {
        bail!("the relay connection ended at once");
    };
    tokio::select! {
        refused = conn => {
            session.close().await;
            let _ = tokio::time::timeout(CLOSE_WAIT, &mut driver).await;
            driver.abort();
            match refused {
                Ok(Some(why)) => bail!("the device refused the connection to {service}: {why}"),
                _ => Ok(()),
            }
        }
        end = &mut driver => match end.context("the relay task failed")? {
            SessionEnd::TunnelClosed(reason) => bail!("the tunnel is closed ({reason})"),
            SessionEnd::Superseded(reason) => bail!("the relay ended this connection ({reason})"),
            SessionEnd::Lost(why) => bail!("lost the relay connection: {why}"),
            SessionEnd::Local => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs_pick_services() {
        let one = vec!["SSH".to_string()];
        assert_eq!(
            listen_specs(&["127.0.0.1:0".into()], &one).unwrap(),
            vec![("SSH".to_string(), "127.0.0.1:0".to_string())]
        );
        let two = vec!["SSH".to_string(), "HTTP".to_string()];
        assert!(listen_specs(&["127.0.0.1:0".into()], &two).is_err());
        assert_eq!(
            listen_specs(&["HTTP=127.0.0.1:0".into()], &two).unwrap()[0].0,
            "HTTP"
        );
        assert!(listen_specs(&["RDP=127.0.0.1:0".into()], &two).is_err());
        assert!(listen_specs(&[], &two).is_err());
        // A bare port listens on loopback; anything else must be HOST:PORT.
        assert_eq!(
            listen_specs(&["2222".into()], &one).unwrap()[0].1,
            "127.0.0.1:2222"
        );
        assert_eq!(
            listen_specs(&["HTTP=8080".into()], &two).unwrap()[0].1,
            "127.0.0.1:8080"
        );
        assert_eq!(
            listen_specs(&["[::1]:0".into()], &one).unwrap()[0].1,
            "[::1]:0"
        );
        for bad in ["99999", "localhost", "h:99999", "a:1,b:2"] {
            let e = listen_specs(&[bad.into()], &one).unwrap_err().to_string();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }
}
