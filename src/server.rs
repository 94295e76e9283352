//! `iotunnel server`: prepares the data dir, the TLS material and the store, rebuilds the tunnel
//! index, then serves the control API and the metrics until told to shut down.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::config::Settings;
use crate::control::access_keys::Sealer;
use crate::control::fleet::{self, Fleet};
use crate::control::{api, lifecycle, mqtt, ControlPlane};
use crate::seam::{ConnectionEvent, DataPlaneSeam, MeshRoutes, TunnelIndex};
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{KeyOrigin, NewApiKey, NodeRecord, Store, StoreError};
use crate::{tls, token};

/// Connection events buffered between the data plane and the persister; beyond this the relay
/// waits, which is what we want from a store that has fallen behind.
const EVENT_QUEUE: usize = 65_536;
/// Most connection events persisted in one store call.
const EVENT_BATCH: usize = 1024;

/// The bound sockets of a server; binding happens before start so tests can use port 0.
#[derive(Debug)]
pub struct Listeners {
    /// Control API listener.
    pub api: TcpListener,
    /// Prometheus exporter listener.
    pub metrics: TcpListener,
    /// One `SO_REUSEPORT` relay listener per shard, all on one port.
    pub relay: Vec<std::net::TcpListener>,
    /// The mesh listener (fleet mode): connections forwarded by other nodes.
    pub mesh: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Binds the API and metrics addresses of `settings`.
    pub async fn bind(settings: &Settings) -> anyhow::Result<Self> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {what} address {addr}"))
        };
        Ok(Self {
            api: bind(settings.api_addr, "api").await?,
            metrics: bind(settings.metrics_addr, "metrics").await?,
            relay: crate::relay::bind_listeners(settings.relay_addr, settings.shards)?,
            mesh: match settings.mesh_addr {
                Some(addr) => Some(
                    std::net::TcpListener::bind(addr)
                        .and_then(|l| l.set_nonblocking(true).map(|()| l))
                        .with_context(|| format!("cannot listen on mesh address {addr}"))?,
                ),
                None => None,
            },
        })
    }
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// The control plane, for tests and the data plane.
    pub control: Arc<ControlPlane>,
    /// Where the API listens.
    pub api_addr: SocketAddr,
    /// Where the metrics listen.
    pub metrics_addr: SocketAddr,
    /// Where the relay listens.
    pub relay_addr: SocketAddr,
    /// The admin API key, when this start created it (to print once).
    pub new_admin_key: Option<String>,
    /// The data plane's ends of the seam, when the server runs without its relay.
    pub seam: Option<DataPlaneSeam>,
    /// The other nodes' mesh addresses, shared with the relay (fleet mode).
    pub routes: Arc<MeshRoutes>,
    relay: Option<crate::relay::RelayHandle>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    _data_dir_lock: std::fs::File,
}

/// Creates the data dir, checks it is writable, and locks it: two servers sharing one
/// database would fight over connection state and sweeps. The lock lasts as long as the file.
fn prepare_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let path = dir.join("iotunnel.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("data dir {} is not writable", dir.display()))?;
    lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "data dir {} is in use by another iotunnel server",
            dir.display()
        )
    })?;
    Ok(lock)
}

/// This node's id: generated on first start and kept in the data dir, so a restarted node
/// rejoins as itself.
fn load_node_id(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("node.id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let id = text.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let id = format!("node-{}", token::random_alnum(10).to_lowercase());
    tls::write_atomic(&path, &id, 0o644)?;
    Ok(id)
}

/// A 32-byte fleet-wide secret: created by the first node, read by the others.
async fn fleet_key(store: &dyn Store, name: &str) -> anyhow::Result<[u8; 32]> {
    let proposed = token::random_bytes::<32>().to_vec();
    let stored = store.fleet_secret(name.into(), proposed).await?;
    <[u8; 32]>::try_from(stored).map_err(|_| anyhow::anyhow!("fleet secret {name} is corrupt"))
}

/// Installs the fleet's relay CA into the data dir (the first node creates it), so every
/// node's relay certificate chains to the one `ca.pem` clients trust, and every node's mesh
/// certificate to the one CA the mesh trusts.
async fn install_fleet_ca(store: &dyn Store, data_dir: &Path) -> anyhow::Result<()> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Ca {
        cert: String,
        key: String,
    }
    let (cert, key) = tls::new_ca()?;
    let proposed = serde_json::to_vec(&Ca { cert, key })?;
    let stored = store.fleet_secret("tls_ca".into(), proposed).await?;
    let ca: Ca = serde_json::from_slice(&stored).context("fleet secret tls_ca is corrupt")?;
    tls::install_ca(data_dir, &ca.cert, &ca.key)
}

/// The access-key encryption key: the configured one, else on a single node one generated
/// into the data dir; a fleet node without one gets none (each node would make its own).
fn load_access_key_key(settings: &Settings, shared: bool) -> anyhow::Result<Option<[u8; 32]>> {
    if let Some(key) = &settings.access_key_encryption_key {
        return crate::config::parse_key32(&key.0).map(Some);
    }
    if shared {
        return Ok(None);
    }
    let path = settings.data_dir.join("access-key.key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let key = crate::config::parse_key32(&text)
            .with_context(|| format!("{} is corrupt", path.display()))?;
        return Ok(Some(key));
    }
    let key = token::random_bytes::<32>();
    tls::write_private(&path, &hex::encode(key))?;
    Ok(Some(key))
}

/// The key device tokens are derived from, created on first start.
fn load_token_key(dir: &Path) -> anyhow::Result<[u8; 32]> {
    let path = dir.join("token.key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let bytes = hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok());
        return bytes.with_context(|| format!("{} is corrupt", path.display()));
    }
    let key = token::random_bytes::<32>();
    tls::write_private(&path, &hex::encode(key))?;
    Ok(key)
}

/// The admin account's id, the same on every node of a fleet.
const ADMIN_ACCOUNT: &str = "acc_admin";

/// Ensures the admin account exists and `IOTUNNEL_ADMIN_KEY` (if set) is one of its keys; unless
/// `keep_previous_admin_keys`, the keys earlier starts took from `IOTUNNEL_ADMIN_KEY` are then
/// revoked. Returns the generated key when this start created the account without one.
async fn ensure_admin(
    store: &dyn Store,
    settings: &Settings,
    now: i64,
) -> anyhow::Result<Option<String>> {
    let given = settings.admin_key.as_ref().map(|k| k.0.clone());
    let key = given
        .clone()
        .unwrap_or_else(|| format!("itk_{}", token::random_secret()));
    let new_key = NewApiKey {
        id: token::new_key_id(),
        account_id: ADMIN_ACCOUNT.into(),
        name: if given.is_some() {
            "IOTUNNEL_ADMIN_KEY".into()
        } else {
            "generated at first start".into()
        },
        origin: if given.is_some() {
            KeyOrigin::Env
        } else {
            KeyOrigin::Generated
        },
        key_hash: token::hash_secret(&key),
        created_at: now,
    };
    let admin = match store.admin_account().await? {
        Some(admin) => admin,
        None => {
            let created = store
                .create_account(ADMIN_ACCOUNT.into(), "admin".into(), true, new_key.clone())
                .await;
            match created {
                Ok(_) if given.is_none() => return Ok(Some(key)),
                Ok(admin) => admin,
                // Another node of the fleet created it first: the given key joins it below.
                Err(StoreError::AlreadyExists) => store
                    .admin_account()
                    .await?
                    .context("the admin account exists but cannot be read")?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    if given.is_none() {
        return Ok(None);
    }
    let stored = store
        .add_api_key(NewApiKey {
            account_id: admin.id.clone(),
            ..new_key
        })
        .await?;
    if stored.account_id != admin.id {
        bail!(
            "IOTUNNEL_ADMIN_KEY is an API key of account {}, not of the admin",
            stored.account_id
        );
    }
    if let Some(at) = stored.revoked_at {
        bail!(
            "IOTUNNEL_ADMIN_KEY was revoked at {} (key {}): start with a new one",
            crate::clock::rfc3339(at),
            stored.id
        );
    }
    if !settings.keep_previous_admin_keys {
        let retired = store
            .retire_api_keys(admin.id, KeyOrigin::Env, stored.id, now)
            .await?;
        for k in &retired {
            tracing::info!(key_id = %k.id, "revoked the IOTUNNEL_ADMIN_KEY of an earlier start \
                (--keep-previous-admin-keys keeps it)");
        }
    }
    Ok(None)
}

async fn persist_events(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<ConnectionEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(EVENT_BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, EVENT_BATCH) => if n == 0 { return },
            _ = shutdown.changed() => {
                // The relay has stopped: persist what it reported last, then stop.
                while let Ok(ev) = rx.try_recv() {
                    batch.push(ev);
                }
                if !batch.is_empty() {
                    if let Err(e) = store.apply_connection_events(std::mem::take(&mut batch)).await {
                        tracing::warn!(error = %e, "cannot persist connection events");
                    }
                }
                return;
            }
        }
        if let Err(e) = store
            .apply_connection_events(std::mem::take(&mut batch))
            .await
        {
            tracing::warn!(error = %e, "cannot persist connection events");
        }
    }
}

impl Server {
    /// Starts a server on already-bound listeners.
    pub async fn start(
        settings: Settings,
        clock: Arc<dyn Clock>,
        listeners: Listeners,
    ) -> anyhow::Result<Self> {
        Self::start_inner(settings, clock, listeners, true).await
    }

    /// Starts the control plane only, leaving the seam in [`Server::seam`] for the caller to
    /// play the data plane (tests of the seam).
    pub async fn start_control_plane(
        settings: Settings,
        clock: Arc<dyn Clock>,
        listeners: Listeners,
    ) -> anyhow::Result<Self> {
        Self::start_inner(settings, clock, listeners, false).await
    }

    async fn start_inner(
        mut settings: Settings,
        clock: Arc<dyn Clock>,
        listeners: Listeners,
        with_relay: bool,
    ) -> anyhow::Result<Self> {
        let data_dir_lock = prepare_data_dir(&settings.data_dir)?;
        if settings.public_relay.port == 0 {
            // No public URL and the relay on port 0 (tests, scripts): name the bound port.
            if let Some(l) = listeners.relay.first() {
                settings.public_relay.port = l.local_addr()?.port();
            }
        }
        let node_id = match &settings.node_id {
            Some(id) => id.clone(),
            None => load_node_id(&settings.data_dir)?,
        };
        let shared = settings.database_url.is_some();
        let store: Arc<dyn Store> = match &settings.database_url {
            Some(url) => Arc::new(
                PgStore::connect(&url.0)
                    .await
                    .context("cannot open the fleet's PostgreSQL database")?,
            ),
            None => {
                let db = settings.data_dir.join("iotunnel.db");
                Arc::new(
                    SqliteStore::open(&db)
                        .with_context(|| format!("cannot open database {}", db.display()))?,
                )
            }
        };
        // Fleet-wide secrets live in the shared database: a token or certificate from one node
        // is valid on all. A single node keeps its token key in the data dir, as it always did.
        let access_key_encryption_key = load_access_key_key(&settings, shared)?;
        let token_key = if shared {
            fleet_key(store.as_ref(), "token_key").await?
        } else {
            load_token_key(&settings.data_dir)?
        };
        let mesh_key = fleet_key(store.as_ref(), "mesh_key").await?;
        // Even with the operator's own relay certificate: the mesh trusts the fleet CA only.
        if shared {
            install_fleet_ca(store.as_ref(), &settings.data_dir)
                .await
                .context("cannot install the fleet's TLS CA")?;
        }
        let tls_paths = tls::ensure_material(&settings.data_dir, &settings.public_relay.host)
            .context("cannot prepare TLS material")?;
        let mut relay_cfg = crate::relay::RelayConfig::from_settings(
            &settings,
            &tls_paths.server_cert,
            &tls_paths.server_key,
        )
        .context("cannot load the relay's TLS certificate")?;
        let mesh_tls = crate::relay::MeshTls::load(
            &tls_paths.ca_cert,
            &tls_paths.mesh_cert,
            &tls_paths.mesh_key,
        )
        .context("cannot load the mesh's TLS material")?;
        relay_cfg.mesh = Some(crate::relay::MeshConfig {
            identity: crate::relay::MeshIdentity {
                node_id: node_id.clone(),
                key: mesh_key,
            },
            tls: mesh_tls,
        });
        let now = clock.now_ms();
        let new_admin_key = ensure_admin(store.as_ref(), &settings, now).await?;
        store.reset_connections(node_id.clone(), now).await?;
        store.clear_device_channels_of_node(node_id.clone()).await?;
        if !shared {
            // A fleet of one owns every tunnel, whatever node id wrote it.
            for (owner, _) in store.open_tunnels_by_owner().await? {
                if owner != node_id {
                    store
                        .reassign_tunnels(owner, vec![node_id.clone()], now)
                        .await?;
                }
            }
        }
        let mesh_addr = match (&listeners.mesh, &settings.public_mesh_addr) {
            (Some(l), Some(public)) => Some(advertised(public, l.local_addr()?.port())),
            _ => None,
        };
        let me = NodeRecord {
            node_id: node_id.clone(),
            relay_url: format!(
                "{}://{}",
                settings.public_relay_scheme,
                settings.public_relay.host_port()
            ),
            api_url: format!("http://{}", listeners.api.local_addr()?),
            mesh_addr,
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: now,
            heartbeat_at: now,
            shards: settings.shards as u32,
            open_tunnels: 0,
            device_channels: 0,
            draining: false,
        };
        let routes = Arc::new(MeshRoutes::default());
        let fleet = Fleet::new(me, shared, routes.clone());

        let index = Arc::new(TunnelIndex::new(settings.shards));
        let io_driver = settings.io_driver;
        let (relay_tx, relay_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (notifier, mqtt_loop) = match &settings.mqtt {
            Some(m) => {
                let (n, eventloop) = mqtt::MqttNotifier::new(m).context("cannot set up MQTT")?;
                (Some(Arc::new(n)), Some(eventloop))
            }
            None => (None, None),
        };
        let mut control = ControlPlane::new(
            store.clone(),
            clock.clone(),
            settings,
            index.clone(),
            relay_tx,
            token_key,
            fleet,
        );
        if let Some(n) = notifier {
            control = control.with_mqtt(n);
        }
        match access_key_encryption_key {
            Some(key) => control = control.with_access_keys(Sealer::new(&key)),
            None => tracing::warn!(
                "no --access-key-encryption-key on this fleet node: access keys and the \
                 vendor APIs (AWS, Alibaba) are refused"
            ),
        }
        let control = Arc::new(control);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        // Subscribe before reading the index, so nothing published meanwhile is missed.
        if let Some(bus) = store.subscribe() {
            tasks.push(tokio::spawn(fleet::run_bus(
                control.clone(),
                bus,
                shutdown_rx.clone(),
            )));
        }
        control
            .heartbeat()
            .await
            .context("cannot register this node")?;
        for t in store.all_open_tunnels().await? {
            control.index_tunnel(&t);
        }
        tracing::info!(%node_id, shared, open_tunnels = index.len(), "tunnel index rebuilt");

        let api_addr = listeners.api.local_addr()?;
        let metrics_addr = listeners.metrics.local_addr()?;
        tasks.extend([
            tokio::spawn(persist_events(store, events_rx, shutdown_rx.clone())),
            tokio::spawn(lifecycle::run_sweeper(control.clone(), shutdown_rx.clone())),
            tokio::spawn(fleet::run_heartbeat(control.clone(), shutdown_rx.clone())),
        ]);
        if let Some(eventloop) = mqtt_loop {
            tasks.push(tokio::spawn(mqtt::run(
                control.clone(),
                eventloop,
                shutdown_rx.clone(),
            )));
        }
        let api_metrics = Arc::new(crate::metrics::ApiMetrics::default());
        let app = api::router(control.clone(), api_metrics.clone());
        let mut stop = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let serve = axum::serve(listeners.api, app).with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "api server failed");
            }
        }));
        let relay_addr = listeners
            .relay
            .first()
            .context("no relay listener")?
            .local_addr()?;
        let seam = DataPlaneSeam {
            index,
            routes: routes.clone(),
            commands: relay_rx,
            events: events_tx,
        };
        let (seam, relay) = if with_relay {
            let relay = crate::relay::RelayHandle::start(
                relay_cfg,
                io_driver,
                seam,
                clock,
                listeners.relay,
                listeners.mesh,
            )?;
            (None, Some(relay))
        } else {
            (Some(seam), None)
        };
        let scraper = relay.as_ref().map(crate::relay::RelayHandle::scraper);
        tasks.push(tokio::spawn(crate::metrics::serve(
            control.clone(),
            api_metrics,
            scraper,
            listeners.metrics,
            shutdown_rx,
        )));
        tracing::info!(%api_addr, %metrics_addr, %relay_addr, "listening");
        Ok(Self {
            control,
            api_addr,
            metrics_addr,
            relay_addr,
            new_admin_key,
            seam,
            routes,
            relay,
            shutdown,
            tasks,
            _data_dir_lock: data_dir_lock,
        })
    }

    /// Stops serving and waits for in-flight requests and background tasks to finish. A node
    /// of a fleet first drains: it takes no new tunnels and hands its own to the other nodes.
    pub async fn shutdown(self) {
        let moved = self.control.drain().await;
        if moved > 0 {
            tracing::info!(tunnels = moved, "drained: tunnels handed to other nodes");
        }
        self.abandon().await;
    }

    /// Stops without draining: to the rest of the fleet this node looks crashed (its tunnels
    /// move only once it is declared dead). For tests of node loss.
    pub async fn abandon(mut self) {
        if let Some(relay) = self.relay.take() {
            let _ = tokio::task::spawn_blocking(move || relay.shutdown()).await;
        }
        let _ = self.shutdown.send(true);
        self.control.channels.close_all();
        // The persister ends when the last event sender is gone.
        self.seam.take();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// `public` (`host:port` from settings) with the bound port when it names port 0.
fn advertised(public: &str, bound_port: u16) -> String {
    match public.rsplit_once(':') {
        Some((host, "0")) => format!("{host}:{bound_port}"),
        _ => public.to_string(),
    }
}

/// Runs `iotunnel server` until SIGTERM or Ctrl-C.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM that arrives once we are listening must shut down cleanly.
    let stop = shutdown_signal()?;
    let _trim = crate::trim::spawn();
    let listeners = Listeners::bind(&settings).await?;
    let server = Server::start(settings, Arc::new(crate::clock::SystemClock), listeners).await?;
    if let Some(key) = &server.new_admin_key {
        println!(
            "Admin API key (shown only once; set IOTUNNEL_ADMIN_KEY to choose your own): {key}"
        );
    }
    println!("iotunnel API listening on http://{}", server.api_addr);
    println!("iotunnel relay listening on {}", server.relay_addr);
    stop.await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on either signal.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
