//! The shared store: PostgreSQL, for a fleet of nodes.
//!
//! Same contract as [`super::sqlite::SqliteStore`] (`tests/store.rs` runs both). Each call takes
//! a pooled connection; statements are prepared once per connection (`prepare_cached`). Writes
//! that read before they write (the per-device tunnel limit, re-placement) lock the rows they
//! read, so nodes racing on one device or one dead node never break the invariants.
use std::fmt;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::*;
use crate::seam::ConnectionEventKind;

mod calls;
mod connect;
mod fleet;
mod keys;
mod migrations;
mod vendor;

pub use connect::SslMode;
pub use fleet::BUS_APPLICATION_NAME;

/// Pooled connections per store when not told otherwise: the control plane's concurrent
/// requests rarely need more, and a fleet of nodes multiplies it on the server.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// PostgreSQL-backed [`Store`].
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Where and how to open the bus listener's own connection.
    bus: fleet::BusTarget,
    ssl_mode: SslMode,
}

impl fmt::Debug for PgStore {
    // The URL may hold a password: show only what is harmless.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("pool_size", &self.pool.status().max_size)
            .field("ssl_mode", &self.ssl_mode)
            .finish_non_exhaustive()
    }
}

/// Maps a database error to the store's; the message never holds the URL.
fn db_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) if *db.code() == SqlState::UNIQUE_VIOLATION => StoreError::AlreadyExists,
        Some(db) => StoreError::Unavailable(format!("database error: {}", db.message())),
        None if e.is_closed() => StoreError::Unavailable("database connection lost".into()),
        None => StoreError::Unavailable(format!("database: {e}")),
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(format!("cannot reach the database: {e}"))
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Runs a statement, prepared once per connection.
async fn query(c: &impl GenericClient, sql: &str, p: Params<'_>) -> StoreResult<Vec<Row>> {
    let st = c.prepare_cached(sql).await.map_err(db_err)?;
    c.query(&st, p).await.map_err(db_err)
}

/// [`query`] for a statement returning at most one row.
async fn query_opt(c: &impl GenericClient, sql: &str, p: Params<'_>) -> StoreResult<Option<Row>> {
    let st = c.prepare_cached(sql).await.map_err(db_err)?;
    c.query_opt(&st, p).await.map_err(db_err)
}

/// [`query`] for a statement returning no rows; the number of rows it touched.
async fn execute(c: &impl GenericClient, sql: &str, p: Params<'_>) -> StoreResult<u64> {
    let st = c.prepare_cached(sql).await.map_err(db_err)?;
    c.execute(&st, p).await.map_err(db_err)
}

const TUNNEL_COLUMNS: &str = "seq, id, account_id, product_key, device_name, custom_info, \
    description, services, state, created_at, expires_at, closed_at, close_reason, \
    client_token_hash, device_token_hash, device_token_seed, device_connected, \
    device_updated_at, device_rtt_us, device_srtt_us, device_addr, client_connected, \
    client_updated_at, client_rtt_us, client_srtt_us, client_addr, device_bytes_sent, \
    device_bytes_received, client_bytes_sent, client_bytes_received, owner_node";

fn hash32(v: Vec<u8>) -> [u8; 32] {
    let mut out = [0u8; 32];
    if v.len() == 32 {
        out.copy_from_slice(&v);
    }
    out
}

/// One side's columns: five from `base`, and its two byte counters from `bytes`.
fn peer_from_row(
    row: &Row,
    base: usize,
    bytes: usize,
) -> Result<PeerStatus, tokio_postgres::Error> {
    Ok(PeerStatus {
        connected: row.try_get(base)?,
        updated_at: row.try_get(base + 1)?,
        rtt_us: row.try_get::<_, Option<i64>>(base + 2)?.map(|v| v as u64),
        srtt_us: row.try_get::<_, Option<i64>>(base + 3)?.map(|v| v as u64),
        addr: row.try_get(base + 4)?,
        bytes_sent: row.try_get::<_, i64>(bytes)? as u64,
        bytes_received: row.try_get::<_, i64>(bytes + 1)? as u64,
    })
}

fn tunnel_from_row(row: &Row) -> StoreResult<Tunnel> {
    let t = || -> Result<Tunnel, tokio_postgres::Error> {
        let state: String = row.try_get(8)?;
        Ok(Tunnel {
            seq: row.try_get(0)?,
            id: row.try_get(1)?,
            account_id: row.try_get(2)?,
            product_key: row.try_get(3)?,
            device_name: row.try_get(4)?,
            custom_info: row.try_get(5)?,
            description: row.try_get(6)?,
            services: row.try_get(7)?,
            state: TunnelState::parse(&state).unwrap_or(TunnelState::Closed),
            created_at: row.try_get(9)?,
            expires_at: row.try_get(10)?,
            closed_at: row.try_get(11)?,
            close_reason: row.try_get(12)?,
            client_token_hash: hash32(row.try_get(13)?),
            device_token_hash: hash32(row.try_get(14)?),
            device_token_seed: hash32(row.try_get(15)?),
            device: peer_from_row(row, 16, 26)?,
            client: peer_from_row(row, 21, 28)?,
            owner_node: row.try_get(30)?,
        })
    };
    t().map_err(db_err)
}

/// The tunnels matching `where_clause` (which may end in ORDER BY / LIMIT).
async fn query_tunnels(
    c: &impl GenericClient,
    where_clause: &str,
    p: Params<'_>,
) -> StoreResult<Vec<Tunnel>> {
    let sql = format!("SELECT {TUNNEL_COLUMNS} FROM tunnels WHERE {where_clause}");
    query(c, &sql, p)
        .await?
        .iter()
        .map(tunnel_from_row)
        .collect()
}

async fn one_tunnel(
    c: &impl GenericClient,
    account_id: &str,
    tunnel_id: &str,
) -> StoreResult<Tunnel> {
    query_tunnels(c, "id = $1 AND account_id = $2", &[&tunnel_id, &account_id])
        .await?
        .pop()
        .ok_or(StoreError::NotFound)
}

/// Closes the OPEN tunnels matching `where_clause` (parameters from `$3`), oldest first.
async fn close_where(
    c: &impl GenericClient,
    where_clause: &str,
    p: &[&(dyn ToSql + Sync)],
    reason: CloseReason,
    now: Millis,
) -> StoreResult<Vec<Tunnel>> {
    let sql = format!(
        "UPDATE tunnels SET state = 'CLOSED', closed_at = $1, close_reason = $2 \
         WHERE state = 'OPEN' AND {where_clause} RETURNING {TUNNEL_COLUMNS}"
    );
    let reason = reason.as_str();
    let mut all: Vec<&(dyn ToSql + Sync)> = vec![&now, &reason];
    all.extend_from_slice(p);
    let mut tunnels = query(c, &sql, &all)
        .await?
        .iter()
        .map(tunnel_from_row)
        .collect::<StoreResult<Vec<_>>>()?;
    tunnels.sort_by_key(|t| t.seq);
    Ok(tunnels)
}

async fn product_owned(
    c: &impl GenericClient,
    account_id: &str,
    product_key: &str,
) -> StoreResult<()> {
    query_opt(
        c,
        "SELECT 1 FROM products WHERE product_key = $1 AND account_id = $2",
        &[&product_key, &account_id],
    )
    .await?
    .map(drop)
    .ok_or(StoreError::NotFound)
}

fn account_from_row(row: &Row) -> StoreResult<Account> {
    Ok(Account {
        id: row.try_get(0).map_err(db_err)?,
        name: row.try_get(1).map_err(db_err)?,
        is_admin: row.try_get(2).map_err(db_err)?,
        created_at: row.try_get(3).map_err(db_err)?,
    })
}

impl PgStore {
    /// Connects to the database at `url` (libpq URL syntax, plus `sslmode` up to
    /// `verify-full` and `sslrootcert`) with [`DEFAULT_POOL_SIZE`] connections, and migrates it.
    pub async fn connect(url: &str) -> anyhow::Result<PgStore> {
        Self::connect_with_pool_size(url, DEFAULT_POOL_SIZE).await
    }

    /// [`PgStore::connect`] with at most `pool_size` pooled connections.
    pub async fn connect_with_pool_size(url: &str, pool_size: usize) -> anyhow::Result<PgStore> {
        let target = connect::parse(url)?;
        let where_to = describe(&target.config);
        // The migration's connection also proves the database is reachable, with a clear
        // message when it is not.
        let (mut client, connection) = target
            .config
            .connect(target.tls.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL at {where_to}: {e}"))?;
        let driver = tokio::spawn(connection);
        let migrated = migrations::migrate(&mut client).await;
        drop(client);
        let _ = driver.await;
        migrated.map_err(|e| anyhow::anyhow!("cannot migrate PostgreSQL at {where_to}: {e:#}"))?;
        let manager = Manager::from_config(
            target.config.clone(),
            target.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(std::time::Duration::from_secs(30)))
            .build()?;
        Ok(PgStore {
            pool,
            bus: fleet::BusTarget::new(target.config, target.tls),
            ssl_mode: target.ssl_mode,
        })
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }
}

/// `host:port/dbname`, for messages (never the user or password).
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or(""))
}
