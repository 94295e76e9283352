//! `iotunnel server`: prepares the data dir, the TLS material and the store, rebuilds the tunnel
//! index, then serves the control API and the metrics until told to shut down.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::config::Settings;
use crate::control::{api, lifecycle, mqtt, ControlPlane};
use crate::seam::{ConnectionEvent, DataPlaneSeam, MeshRoutes, TunnelIndex};
use crate::store::sqlite::SqliteStore;
use crate::store::Store;
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
            mesh: None,
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

/// Ensures the admin account exists and `IOTUNNEL_ADMIN_KEY` (if set) is one of its keys.
/// Returns the generated key when this start created the account without one.
async fn ensure_admin(
    store: &dyn Store,
    settings: &Settings,
    now: i64,
) -> anyhow::Result<Option<String>> {
    let given = settings.admin_key.as_ref().map(|k| k.0.clone());
    match store.admin_account().await? {
        Some(admin) => {
            if let Some(key) = &given {
                store
                    .add_api_key(admin.id, token::hash_secret(key), now)
                    .await?;
            }
            Ok(None)
        }
        None => {
            let key = given
                .clone()
                .unwrap_or_else(|| format!("itk_{}", token::random_secret()));
            store
                .create_account(
                    "acc_admin".into(),
                    "admin".into(),
                    true,
                    token::hash_secret(&key),
                    now,
                )
                .await?;
            Ok(if given.is_none() { Some(key) } else { None })
        }
    }
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
        settings: Settings,
        clock: Arc<dyn Clock>,
        listeners: Listeners,
        with_relay: bool,
    ) -> anyhow::Result<Self> {
        let data_dir_lock = prepare_data_dir(&settings.data_dir)?;
        let tls_paths = tls::ensure_material(&settings.data_dir, &settings.public_relay.host)
            .context("cannot prepare TLS material")?;
        let relay_cfg = crate::relay::RelayConfig::from_settings(
            &settings,
            &tls_paths.server_cert,
            &tls_paths.server_key,
        )
        .context("cannot load the relay's TLS certificate")?;
        let token_key = load_token_key(&settings.data_dir)?;
        let db = settings.data_dir.join("iotunnel.db");
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&db)
                .with_context(|| format!("cannot open database {}", db.display()))?,
        );
        let now = clock.now_ms();
        let new_admin_key = ensure_admin(store.as_ref(), &settings, now).await?;
        store.reset_connections(String::new(), now).await?;

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
        );
        if let Some(n) = notifier {
            control = control.with_mqtt(n);
        }
        let control = Arc::new(control);
        for t in store.all_open_tunnels().await? {
            control.index_tunnel(&t);
        }
        tracing::info!(open_tunnels = index.len(), "tunnel index rebuilt");

        let (shutdown, shutdown_rx) = watch::channel(false);
        let api_addr = listeners.api.local_addr()?;
        let metrics_addr = listeners.metrics.local_addr()?;
        let mut tasks = vec![
            tokio::spawn(persist_events(store, events_rx, shutdown_rx.clone())),
            tokio::spawn(lifecycle::run_sweeper(control.clone(), shutdown_rx.clone())),
        ];
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
        let routes: Arc<MeshRoutes> = Arc::default();
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

    /// Stops serving and waits for in-flight requests and background tasks to finish.
    pub async fn shutdown(mut self) {
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

/// Runs `iotunnel server` until SIGTERM or Ctrl-C.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM that arrives once we are listening must shut down cleanly.
    let stop = shutdown_signal()?;
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
