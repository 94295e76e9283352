//! The embedded store: SQLite in WAL mode behind one writer thread with group commit.
//!
//! Every operation is a job sent to the writer thread. The thread drains whatever jobs are
//! queued, runs each inside its own savepoint of one transaction, commits once (one fsync with
//! `synchronous=FULL`), and only then answers the callers. So a successful answer means the
//! write is on disk, and under load many writes share each fsync.
use std::path::Path;
use std::sync::mpsc as std_mpsc;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};
use tokio::sync::oneshot;

use super::*;
use crate::seam::ConnectionEventKind;

mod fleet;
mod keys;
mod vendor;

/// Most jobs committed together; bounds the latency a batch adds to its first job.
const MAX_BATCH: usize = 512;

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE api_keys (
    key_hash BLOB PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    created_at INTEGER NOT NULL
);
CREATE TABLE products (
    product_key TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX products_by_account ON products(account_id, created_at);
CREATE TABLE devices (
    product_key TEXT NOT NULL REFERENCES products(product_key),
    name TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (product_key, name)
);
CREATE TABLE tunnels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    custom_info TEXT,
    description TEXT,
    services TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    closed_at INTEGER,
    close_reason TEXT,
    client_token_hash BLOB NOT NULL,
    device_token_hash BLOB NOT NULL,
    device_token_seed BLOB NOT NULL,
    device_connected INTEGER NOT NULL DEFAULT 0,
    device_updated_at INTEGER,
    device_rtt_us INTEGER,
    device_srtt_us INTEGER,
    device_addr TEXT,
    client_connected INTEGER NOT NULL DEFAULT 0,
    client_updated_at INTEGER,
    client_rtt_us INTEGER,
    client_srtt_us INTEGER,
    client_addr TEXT
);
CREATE INDEX tunnels_by_account ON tunnels(account_id, seq);
CREATE INDEX tunnels_by_device ON tunnels(product_key, device_name, state);
CREATE INDEX tunnels_by_expiry ON tunnels(state, expires_at);
CREATE INDEX tunnels_by_created ON tunnels(created_at);
"#,
    r#"
ALTER TABLE tunnels ADD COLUMN device_bytes_sent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tunnels ADD COLUMN device_bytes_received INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tunnels ADD COLUMN client_bytes_sent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tunnels ADD COLUMN client_bytes_received INTEGER NOT NULL DEFAULT 0;
"#,
    // Fleet mode: an owner per tunnel, the nodes, fleet-wide secrets, leases, device presence.
    r#"
ALTER TABLE tunnels ADD COLUMN owner_node TEXT NULL;
CREATE INDEX tunnels_by_owner ON tunnels(owner_node, state);
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    relay_url TEXT NOT NULL,
    api_url TEXT NOT NULL,
    mesh_addr TEXT,
    version TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    shards INTEGER NOT NULL,
    open_tunnels INTEGER NOT NULL,
    device_channels INTEGER NOT NULL,
    draining INTEGER NOT NULL
);
CREATE TABLE fleet_secrets (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until_ms INTEGER NOT NULL
);
CREATE TABLE device_channels (
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    node_id TEXT NOT NULL,
    connected_at INTEGER NOT NULL,
    PRIMARY KEY (product_key, device_name)
);
CREATE INDEX device_channels_by_node ON device_channels(node_id);
"#,
    // Each device's OPEN tunnels, counted by triggers in the same transaction as every change of
    // `tunnels` (no code path can forget one), so the per-device limit check in `create_tunnel`
    // reads one row instead of counting the device's OPEN tunnels.
    r#"
ALTER TABLE devices ADD COLUMN open_tunnels INTEGER NOT NULL DEFAULT 0;
UPDATE devices SET open_tunnels = (SELECT COUNT(*) FROM tunnels t
    WHERE t.product_key = devices.product_key AND t.device_name = devices.name
    AND t.state = 'OPEN');
CREATE TRIGGER tunnels_count_open_insert AFTER INSERT ON tunnels WHEN new.state = 'OPEN'
BEGIN
    UPDATE devices SET open_tunnels = open_tunnels + 1
    WHERE product_key = new.product_key AND name = new.device_name;
END;
CREATE TRIGGER tunnels_count_open_update
AFTER UPDATE OF state, product_key, device_name ON tunnels
WHEN old.state IS NOT new.state OR old.product_key IS NOT new.product_key
    OR old.device_name IS NOT new.device_name
BEGIN
    UPDATE devices SET open_tunnels = open_tunnels - 1
    WHERE old.state = 'OPEN' AND product_key = old.product_key AND name = old.device_name;
    UPDATE devices SET open_tunnels = open_tunnels + 1
    WHERE new.state = 'OPEN' AND product_key = new.product_key AND name = new.device_name;
END;
CREATE TRIGGER tunnels_count_open_delete AFTER DELETE ON tunnels WHEN old.state = 'OPEN'
BEGIN
    UPDATE devices SET open_tunnels = open_tunnels - 1
    WHERE product_key = old.product_key AND name = old.device_name;
END;
"#,
    // API keys get a public id, a name, an origin, a last-used time and revocation. Which admin
    // keys came from IOTUNNEL_ADMIN_KEY was never recorded: all are taken as env-given, so the
    // next start with a new IOTUNNEL_ADMIN_KEY retires them.
    r#"
ALTER TABLE api_keys ADD COLUMN id TEXT;
ALTER TABLE api_keys ADD COLUMN name TEXT NOT NULL DEFAULT 'created with the account';
ALTER TABLE api_keys ADD COLUMN origin TEXT NOT NULL DEFAULT 'account';
ALTER TABLE api_keys ADD COLUMN last_used_at INTEGER;
ALTER TABLE api_keys ADD COLUMN revoked_at INTEGER;
UPDATE api_keys SET id = 'key_' || lower(hex(randomblob(8)));
UPDATE api_keys SET origin = 'env', name = 'IOTUNNEL_ADMIN_KEY'
WHERE account_id IN (SELECT id FROM accounts WHERE is_admin = 1);
CREATE UNIQUE INDEX api_keys_by_id ON api_keys(id);
CREATE INDEX api_keys_by_account ON api_keys(account_id, created_at);
"#,
    // Vendor facades (issue 13): access keys (secrets sealed with the server's key), tunnel
    // tags (AWS TagResource), and the per-device tunnel switch (Alibaba DisableDeviceTunnel).
    r#"
CREATE TABLE access_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    sealed_secret BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX access_keys_by_account ON access_keys(account_id, created_at);
CREATE TABLE tunnel_tags (
    tunnel_id TEXT NOT NULL REFERENCES tunnels(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (tunnel_id, key)
);
ALTER TABLE devices ADD COLUMN tunnels_disabled INTEGER NOT NULL DEFAULT 0;
"#,
];

trait Job: Send {
    /// Runs against the open transaction; returns whether it succeeded and how to answer once
    /// the transaction's fate is known.
    fn run(self: Box<Self>, conn: &Connection) -> (bool, Reply);
    /// Answers with `err` without running.
    fn fail(self: Box<Self>, err: StoreError);
}

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

struct TypedJob<F, T> {
    work: F,
    answer: oneshot::Sender<StoreResult<T>>,
}

impl<F, T> Job for TypedJob<F, T>
where
    F: FnOnce(&Connection) -> StoreResult<T> + Send,
    T: Send + 'static,
{
    fn run(self: Box<Self>, conn: &Connection) -> (bool, Reply) {
        let result = (self.work)(conn);
        let answer = self.answer;
        (
            result.is_ok(),
            Box::new(move |commit| {
                let _ = answer.send(commit.and(result));
            }),
        )
    }

    fn fail(self: Box<Self>, err: StoreError) {
        let _ = self.answer.send(Err(err));
    }
}

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    jobs: std_mpsc::Sender<Box<dyn Job>>,
}

impl std::fmt::Debug for dyn Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, migrates it and starts the writer.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut conn = Connection::open(path)?;
        // The database holds device secrets: owner-only, like the TLS keys.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement the store runs stays prepared (see `exec`).
        conn.set_prepared_statement_cache_capacity(128);
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        anyhow::ensure!(
            mode.eq_ignore_ascii_case("wal"),
            "cannot enable WAL mode (got {mode})"
        );
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        migrate(&mut conn)?;
        let (tx, rx) = std_mpsc::channel::<Box<dyn Job>>();
        std::thread::Builder::new()
            .name("iotunnel-store".into())
            .spawn(move || writer_loop(conn, rx))?;
        Ok(Self { jobs: tx })
    }

    async fn call<T, F>(&self, work: F) -> StoreResult<T>
    where
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let (answer, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(TypedJob { work, answer }))
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
    }
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    anyhow::ensure!(
        version <= MIGRATIONS.len(),
        "database schema version {version} is newer than this binary ({})",
        MIGRATIONS.len()
    );
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn writer_loop(conn: Connection, rx: std_mpsc::Receiver<Box<dyn Job>>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_batch(&conn, batch);
    }
}

/// Runs one statement, prepared once per connection and cached (the writer runs the same few
/// statements over and over; parsing them each time was a fifth of its CPU).
fn exec(c: &Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(p)
}

/// [`exec`] for a statement that returns one row.
fn query_row<T>(
    c: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached(sql)?.query_row(p, f)
}

fn run_batch(conn: &Connection, batch: Vec<Box<dyn Job>>) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let err = backend(e);
        batch.into_iter().for_each(|job| job.fail(err.clone()));
        return;
    }
    let mut replies: Vec<(Reply, Option<StoreError>)> = Vec::with_capacity(batch.len());
    for job in batch {
        if let Err(e) = exec(conn, "SAVEPOINT job", []) {
            job.fail(backend(e));
            continue;
        }
        let (ok, reply) = job.run(conn);
        let end = if ok {
            exec(conn, "RELEASE job", [])
        } else {
            exec(conn, "ROLLBACK TO job", []).and_then(|_| exec(conn, "RELEASE job", []))
        };
        replies.push((reply, end.err().map(backend)));
    }
    let commit = conn.execute_batch("COMMIT").map_err(backend);
    if commit.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    for (reply, err) in replies {
        reply(match (&commit, err) {
            (Err(e), _) => Err(e.clone()),
            (Ok(()), Some(e)) => Err(e),
            (Ok(()), None) => Ok(()),
        });
    }
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
fn peer_from_row(row: &Row<'_>, base: usize, bytes: usize) -> rusqlite::Result<PeerStatus> {
    Ok(PeerStatus {
        connected: row.get::<_, i64>(base)? != 0,
        updated_at: row.get(base + 1)?,
        rtt_us: row.get::<_, Option<i64>>(base + 2)?.map(|v| v as u64),
        srtt_us: row.get::<_, Option<i64>>(base + 3)?.map(|v| v as u64),
        addr: row.get(base + 4)?,
        bytes_sent: row.get::<_, i64>(bytes)? as u64,
        bytes_received: row.get::<_, i64>(bytes + 1)? as u64,
    })
}

fn tunnel_from_row(row: &Row<'_>) -> rusqlite::Result<Tunnel> {
    let services: String = row.get(7)?;
    let state: String = row.get(8)?;
    Ok(Tunnel {
        seq: row.get(0)?,
        id: row.get(1)?,
        account_id: row.get(2)?,
        product_key: row.get(3)?,
        device_name: row.get(4)?,
        custom_info: row.get(5)?,
        description: row.get(6)?,
        services: serde_json::from_str(&services).unwrap_or_default(),
        state: TunnelState::parse(&state).unwrap_or(TunnelState::Closed),
        created_at: row.get(9)?,
        expires_at: row.get(10)?,
        closed_at: row.get(11)?,
        close_reason: row.get(12)?,
        client_token_hash: hash32(row.get(13)?),
        device_token_hash: hash32(row.get(14)?),
        device_token_seed: hash32(row.get(15)?),
        device: peer_from_row(row, 16, 26)?,
        client: peer_from_row(row, 21, 28)?,
        owner_node: row.get(30)?,
    })
}

fn query_tunnels(
    conn: &Connection,
    where_clause: &str,
    params: impl rusqlite::Params,
) -> StoreResult<Vec<Tunnel>> {
    let sql = format!("SELECT {TUNNEL_COLUMNS} FROM tunnels WHERE {where_clause}");
    let mut stmt = conn.prepare_cached(&sql).map_err(backend)?;
    let rows = stmt.query_map(params, tunnel_from_row).map_err(backend)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(backend)
}

fn one_tunnel(conn: &Connection, account_id: &str, tunnel_id: &str) -> StoreResult<Tunnel> {
    query_tunnels(
        conn,
        "id = ?1 AND account_id = ?2",
        params![tunnel_id, account_id],
    )?
    .pop()
    .ok_or(StoreError::NotFound)
}

fn close_where(
    conn: &Connection,
    where_clause: &str,
    params: &[&dyn rusqlite::ToSql],
    reason: CloseReason,
    now: Millis,
) -> StoreResult<Vec<Tunnel>> {
    let sql = format!(
        "UPDATE tunnels SET state = 'CLOSED', closed_at = {now}, close_reason = '{}' \
         WHERE state = 'OPEN' AND {where_clause} RETURNING {TUNNEL_COLUMNS}",
        reason.as_str()
    );
    let mut stmt = conn.prepare(&sql).map_err(backend)?;
    let rows = stmt.query_map(params, tunnel_from_row).map_err(backend)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(backend)
}

fn product_owned(conn: &Connection, account_id: &str, product_key: &str) -> StoreResult<()> {
    conn.prepare_cached("SELECT 1 FROM products WHERE product_key = ?1 AND account_id = ?2")
        .and_then(|mut s| s.exists(params![product_key, account_id]))
        .map_err(backend)?
        .then_some(())
        .ok_or(StoreError::NotFound)
}

fn account_from_row(row: &Row<'_>) -> rusqlite::Result<Account> {
    Ok(Account {
        id: row.get(0)?,
        name: row.get(1)?,
        is_admin: row.get::<_, i64>(2)? != 0,
        created_at: row.get(3)?,
    })
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

#[async_trait]
impl Store for SqliteStore {
    async fn admin_account(&self) -> StoreResult<Option<Account>> {
        self.call(|c| {
            query_row(
                c,
                "SELECT id, name, is_admin, created_at FROM accounts WHERE is_admin = 1 LIMIT 1",
                [],
                account_from_row,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn create_account(
        &self,
        id: String,
        name: String,
        is_admin: bool,
        key: NewApiKey,
    ) -> StoreResult<Account> {
        self.call(move |c| {
            let now = key.created_at;
            exec(
                c,
                "INSERT INTO accounts (id, name, is_admin, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![id, name, is_admin as i64, now],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AlreadyExists
                } else {
                    backend(e)
                }
            })?;
            keys::insert(
                c,
                &NewApiKey {
                    account_id: id.clone(),
                    ..key
                },
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AlreadyExists
                } else {
                    backend(e)
                }
            })?;
            Ok(Account {
                id,
                name,
                is_admin,
                created_at: now,
            })
        })
        .await
    }

    async fn add_api_key(&self, key: NewApiKey) -> StoreResult<ApiKey> {
        self.call(move |c| keys::add(c, &key)).await
    }

    async fn account_by_key(&self, key_hash: SecretHash) -> StoreResult<Option<(Account, ApiKey)>> {
        self.call(move |c| keys::account_by_key(c, &key_hash)).await
    }

    async fn list_api_keys(&self, account_id: Option<String>) -> StoreResult<Vec<ApiKey>> {
        self.call(move |c| keys::list(c, account_id.as_deref()))
            .await
    }

    async fn revoke_api_key(
        &self,
        account_id: Option<String>,
        key_id: String,
        now: Millis,
    ) -> StoreResult<ApiKey> {
        self.call(move |c| keys::revoke(c, account_id.as_deref(), &key_id, now))
            .await
    }

    async fn retire_api_keys(
        &self,
        account_id: String,
        origin: KeyOrigin,
        keep_id: String,
        now: Millis,
    ) -> StoreResult<Vec<ApiKey>> {
        self.call(move |c| keys::retire(c, &account_id, origin, &keep_id, now))
            .await
    }

    async fn touch_api_key(&self, key_id: String, at: Millis) -> StoreResult<()> {
        self.call(move |c| keys::touch(c, &key_id, at)).await
    }

    async fn create_access_key(&self, key: AccessKey) -> StoreResult<()> {
        self.call(move |c| vendor::create_access_key(c, &key)).await
    }

    async fn list_access_keys(&self, account_id: String) -> StoreResult<Vec<AccessKey>> {
        self.call(move |c| vendor::list_access_keys(c, &account_id))
            .await
    }

    async fn delete_access_key(&self, account_id: String, key_id: String) -> StoreResult<()> {
        self.call(move |c| vendor::delete_access_key(c, &account_id, &key_id))
            .await
    }

    async fn access_key(&self, key_id: String) -> StoreResult<Option<(AccessKey, Account)>> {
        self.call(move |c| vendor::access_key(c, &key_id)).await
    }

    async fn tunnel_tags(
        &self,
        account_id: String,
        tunnel_id: String,
    ) -> StoreResult<Vec<(String, String)>> {
        self.call(move |c| vendor::tunnel_tags(c, &account_id, &tunnel_id))
            .await
    }

    async fn tag_tunnel(
        &self,
        account_id: String,
        tunnel_id: String,
        tags: Vec<(String, String)>,
    ) -> StoreResult<()> {
        self.call(move |c| vendor::tag_tunnel(c, &account_id, &tunnel_id, &tags))
            .await
    }

    async fn untag_tunnel(
        &self,
        account_id: String,
        tunnel_id: String,
        keys: Vec<String>,
    ) -> StoreResult<()> {
        self.call(move |c| vendor::untag_tunnel(c, &account_id, &tunnel_id, &keys))
            .await
    }

    async fn set_device_tunnels_disabled(
        &self,
        account_id: String,
        product_key: String,
        device_name: String,
        disabled: bool,
    ) -> StoreResult<()> {
        self.call(move |c| {
            vendor::set_device_tunnels_disabled(
                c,
                &account_id,
                &product_key,
                &device_name,
                disabled,
            )
        })
        .await
    }

    async fn device_tunnels_disabled(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<bool> {
        self.call(move |c| vendor::device_tunnels_disabled(c, &product_key, &device_name))
            .await
    }

    async fn create_product(&self, p: Product) -> StoreResult<Product> {
        self.call(move |c| {
            exec(c,
                "INSERT INTO products (product_key, account_id, name, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![p.product_key, p.account_id, p.name, p.created_at],
            )
            .map_err(|e| if is_unique_violation(&e) { StoreError::AlreadyExists } else { backend(e) })?;
            Ok(p)
        })
        .await
    }

    async fn list_products(&self, account_id: String) -> StoreResult<Vec<Product>> {
        self.call(move |c| {
            let mut s = c
                .prepare_cached(
                    "SELECT product_key, account_id, name, created_at FROM products \
                     WHERE account_id = ?1 ORDER BY created_at, product_key",
                )
                .map_err(backend)?;
            let rows = s
                .query_map(params![account_id], |r| {
                    Ok(Product {
                        product_key: r.get(0)?,
                        account_id: r.get(1)?,
                        name: r.get(2)?,
                        created_at: r.get(3)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn create_device(&self, d: Device) -> StoreResult<Device> {
        self.call(move |c| {
            product_owned(c, &d.account_id, &d.product_key)?;
            exec(c,
                "INSERT INTO devices (product_key, name, secret, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![d.product_key, d.name, d.secret, d.created_at],
            )
            .map_err(|e| if is_unique_violation(&e) { StoreError::AlreadyExists } else { backend(e) })?;
            Ok(d)
        })
        .await
    }

    async fn list_devices(
        &self,
        account_id: String,
        product_key: String,
    ) -> StoreResult<Vec<Device>> {
        self.call(move |c| {
            product_owned(c, &account_id, &product_key)?;
            let mut s = c
                .prepare_cached(
                    "SELECT product_key, name, secret, created_at, open_tunnels FROM devices \
                     WHERE product_key = ?1 ORDER BY created_at, name",
                )
                .map_err(backend)?;
            let rows = s
                .query_map(params![product_key], |r| {
                    Ok(Device {
                        product_key: r.get(0)?,
                        account_id: account_id.clone(),
                        name: r.get(1)?,
                        secret: r.get(2)?,
                        created_at: r.get(3)?,
                        open_tunnels: r.get::<_, i64>(4)? as u32,
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn get_device(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<Option<Device>> {
        self.call(move |c| {
            c.prepare_cached(
                "SELECT d.product_key, p.account_id, d.name, d.secret, d.created_at, d.open_tunnels \
                 FROM devices d \
                 JOIN products p ON p.product_key = d.product_key \
                 WHERE d.product_key = ?1 AND d.name = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![product_key, device_name], |r| {
                    Ok(Device {
                        product_key: r.get(0)?,
                        account_id: r.get(1)?,
                        name: r.get(2)?,
                        secret: r.get(3)?,
                        created_at: r.get(4)?,
                        open_tunnels: r.get::<_, i64>(5)? as u32,
                    })
                })
                .optional()
            })
            .map_err(backend)
        })
        .await
    }

    async fn delete_device(
        &self,
        account_id: String,
        product_key: String,
        device_name: String,
        now: Millis,
    ) -> StoreResult<Vec<Tunnel>> {
        self.call(move |c| {
            product_owned(c, &account_id, &product_key)?;
            let n = exec(
                c,
                "DELETE FROM devices WHERE product_key = ?1 AND name = ?2",
                params![product_key, device_name],
            )
            .map_err(backend)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            close_where(
                c,
                "product_key = ?1 AND device_name = ?2",
                params![product_key, device_name],
                CloseReason::DeviceDeleted,
                now,
            )
        })
        .await
    }

    async fn create_tunnel(&self, t: NewTunnel) -> StoreResult<Tunnel> {
        self.call(move |c| {
            product_owned(c, &t.account_id, &t.product_key)?;
            // One row, whatever the device holds: the triggers of migration 4 keep the count.
            let open: i64 = query_row(
                c,
                "SELECT open_tunnels FROM devices WHERE product_key = ?1 AND name = ?2",
                params![t.product_key, t.device_name],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?
            .ok_or(StoreError::NotFound)?;
            if open >= i64::from(t.max_open_per_device) {
                return Err(StoreError::TunnelLimit(t.max_open_per_device));
            }
            let services = serde_json::to_string(&t.services).unwrap_or_else(|_| "[]".into());
            c.prepare_cached(
                "INSERT INTO tunnels (id, account_id, product_key, device_name, custom_info, \
                 description, services, state, created_at, expires_at, client_token_hash, \
                 device_token_hash, device_token_seed, owner_node) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'OPEN', ?8, ?9, ?10, ?11, ?12, ?13)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    t.id,
                    t.account_id,
                    t.product_key,
                    t.device_name,
                    t.custom_info,
                    t.description,
                    services,
                    t.created_at,
                    t.expires_at,
                    &t.client_token_hash[..],
                    &t.device_token_hash[..],
                    &t.device_token_seed[..],
                    t.owner_node,
                ])
            })
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AlreadyExists
                } else {
                    backend(e)
                }
            })?;
            Ok(Tunnel {
                seq: c.last_insert_rowid(),
                id: t.id,
                account_id: t.account_id,
                product_key: t.product_key,
                device_name: t.device_name,
                custom_info: t.custom_info,
                description: t.description,
                services: t.services,
                state: TunnelState::Open,
                created_at: t.created_at,
                expires_at: t.expires_at,
                closed_at: None,
                close_reason: None,
                client_token_hash: t.client_token_hash,
                device_token_hash: t.device_token_hash,
                device_token_seed: t.device_token_seed,
                device: PeerStatus::default(),
                client: PeerStatus::default(),
                owner_node: t.owner_node,
            })
        })
        .await
    }

    async fn get_tunnel(&self, account_id: String, tunnel_id: String) -> StoreResult<Tunnel> {
        self.call(move |c| one_tunnel(c, &account_id, &tunnel_id))
            .await
    }

    async fn search_tunnels(
        &self,
        account_id: String,
        f: TunnelFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<TunnelPage> {
        self.call(move |c| {
            let state = f.state.map(TunnelState::as_str);
            let mut tunnels = query_tunnels(
                c,
                "account_id = ?1 AND (?2 IS NULL OR product_key = ?2) \
                 AND (?3 IS NULL OR device_name = ?3) AND (?4 IS NULL OR id = ?4) \
                 AND (?5 IS NULL OR state = ?5) AND seq < ?6 ORDER BY seq DESC LIMIT ?7",
                params![
                    account_id,
                    f.product_key,
                    f.device_name,
                    f.tunnel_id,
                    state,
                    before_seq.unwrap_or(i64::MAX),
                    i64::from(limit) + 1
                ],
            )?;
            let more = tunnels.len() > limit as usize;
            tunnels.truncate(limit as usize);
            let next_before_seq = more.then(|| tunnels.last().map(|t| t.seq)).flatten();
            Ok(TunnelPage {
                tunnels,
                next_before_seq,
            })
        })
        .await
    }

    async fn close_tunnel(
        &self,
        account_id: String,
        tunnel_id: String,
        reason: CloseReason,
        now: Millis,
    ) -> StoreResult<Tunnel> {
        self.call(move |c| {
            let t = one_tunnel(c, &account_id, &tunnel_id)?;
            if t.state != TunnelState::Open {
                return Err(StoreError::TunnelNotOpen);
            }
            close_where(c, "id = ?1", params![tunnel_id], reason, now)?
                .pop()
                .ok_or(StoreError::TunnelNotOpen)
        })
        .await
    }

    async fn delete_tunnel(&self, account_id: String, tunnel_id: String) -> StoreResult<()> {
        self.call(move |c| {
            let t = one_tunnel(c, &account_id, &tunnel_id)?;
            if t.state != TunnelState::Closed {
                return Err(StoreError::TunnelNotClosed);
            }
            exec(c, "DELETE FROM tunnels WHERE id = ?1", params![tunnel_id])
                .map(drop)
                .map_err(backend)
        })
        .await
    }

    async fn rotate_tokens(
        &self,
        account_id: String,
        tunnel_id: String,
        r: Rotation,
    ) -> StoreResult<Tunnel> {
        self.call(move |c| {
            let t = one_tunnel(c, &account_id, &tunnel_id)?;
            if t.state != TunnelState::Open {
                return Err(StoreError::TunnelNotOpen);
            }
            if let Some(h) = r.client_token_hash {
                exec(c,
                    "UPDATE tunnels SET client_token_hash = ?1 WHERE id = ?2",
                    params![&h[..], tunnel_id],
                )
                .map_err(backend)?;
            }
            if let Some((h, seed)) = r.device_token {
                exec(c,
                    "UPDATE tunnels SET device_token_hash = ?1, device_token_seed = ?2 WHERE id = ?3",
                    params![&h[..], &seed[..], tunnel_id],
                )
                .map_err(backend)?;
            }
            one_tunnel(c, &account_id, &tunnel_id)
        })
        .await
    }

    async fn open_tunnels_of_device(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<Vec<Tunnel>> {
        self.call(move |c| {
            query_tunnels(
                c,
                "product_key = ?1 AND device_name = ?2 AND state = 'OPEN' ORDER BY seq",
                params![product_key, device_name],
            )
        })
        .await
    }

    async fn all_open_tunnels(&self) -> StoreResult<Vec<Tunnel>> {
        self.call(|c| query_tunnels(c, "state = 'OPEN' ORDER BY seq", []))
            .await
    }

    async fn expire_tunnels(&self, now: Millis) -> StoreResult<Vec<Tunnel>> {
        self.call(move |c| {
            close_where(
                c,
                "expires_at <= ?1",
                params![now],
                CloseReason::Expired,
                now,
            )
        })
        .await
    }

    async fn purge_tunnels(&self, created_before: Millis) -> StoreResult<Vec<String>> {
        self.call(move |c| {
            let mut s = c
                .prepare_cached("DELETE FROM tunnels WHERE created_at <= ?1 RETURNING id")
                .map_err(backend)?;
            let rows = s
                .query_map(params![created_before], |r| r.get(0))
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn reset_connections(&self, node_id: String, now: Millis) -> StoreResult<()> {
        self.call(move |c| {
            for side in ["device", "client"] {
                exec(
                    c,
                    &format!(
                        "UPDATE tunnels SET {side}_connected = 0, {side}_updated_at = ?1 \
                         WHERE {side}_connected = 1 AND (owner_node = ?2 OR owner_node IS NULL)"
                    ),
                    params![now, node_id],
                )
                .map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn apply_connection_events(&self, events: Vec<ConnectionEvent>) -> StoreResult<()> {
        self.call(move |c| {
            for e in &events {
                let side = e.side.as_str();
                // An event older than the side's last change is stale: in a fleet, the node a
                // tunnel left may report its peers' end after the new owner reported theirs.
                let not_older = format!("({side}_updated_at IS NULL OR {side}_updated_at <= ?1)");
                let res = match &e.kind {
                    ConnectionEventKind::Connected { addr } => exec(c,
                        &format!(
                            "UPDATE tunnels SET {side}_connected = 1, {side}_updated_at = ?1, \
                             {side}_addr = ?2, {side}_bytes_sent = 0, {side}_bytes_received = 0 \
                             WHERE id = ?3 AND {not_older}"
                        ),
                        params![e.at, addr, e.tunnel_id],
                    ),
                    ConnectionEventKind::Disconnected { .. } => exec(c,
                        &format!(
                            "UPDATE tunnels SET {side}_connected = 0, {side}_updated_at = ?1 \
                             WHERE id = ?2 AND {not_older}"
                        ),
                        params![e.at, e.tunnel_id],
                    ),
                    ConnectionEventKind::Rtt { last_us, smoothed_us } => exec(c,
                        &format!(
                            "UPDATE tunnels SET {side}_rtt_us = ?1, {side}_srtt_us = ?2 WHERE id = ?3"
                        ),
                        params![*last_us as i64, *smoothed_us as i64, e.tunnel_id],
                    ),
                    ConnectionEventKind::Traffic { sent, received } => exec(c,
                        &format!(
                            "UPDATE tunnels SET {side}_bytes_sent = ?1, {side}_bytes_received = ?2 \
                             WHERE id = ?3"
                        ),
                        params![*sent as i64, *received as i64, e.tunnel_id],
                    ),
                };
                res.map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn upsert_node(&self, node: NodeRecord) -> StoreResult<()> {
        self.call(move |c| fleet::upsert_node(c, &node)).await
    }

    async fn list_nodes(&self) -> StoreResult<Vec<NodeRecord>> {
        self.call(fleet::list_nodes).await
    }

    async fn fleet_secret(&self, name: String, proposed: Vec<u8>) -> StoreResult<Vec<u8>> {
        self.call(move |c| fleet::fleet_secret(c, &name, &proposed))
            .await
    }

    async fn try_lease(
        &self,
        name: String,
        holder: String,
        now: Millis,
        ttl_ms: i64,
    ) -> StoreResult<bool> {
        self.call(move |c| fleet::try_lease(c, &name, &holder, now, ttl_ms))
            .await
    }

    async fn open_tunnels_by_owner(&self) -> StoreResult<Vec<(String, u64)>> {
        self.call(fleet::open_tunnels_by_owner).await
    }

    async fn reassign_tunnels(
        &self,
        from_node: String,
        to_nodes: Vec<String>,
        now: Millis,
    ) -> StoreResult<Vec<Tunnel>> {
        self.call(move |c| fleet::reassign_tunnels(c, &from_node, &to_nodes, now))
            .await
    }

    async fn set_device_channel(
        &self,
        product_key: String,
        device_name: String,
        node_id: String,
        now: Millis,
    ) -> StoreResult<()> {
        self.call(move |c| {
            exec(
                c,
                "INSERT OR REPLACE INTO device_channels (product_key, device_name, node_id, \
                 connected_at) VALUES (?1, ?2, ?3, ?4)",
                params![product_key, device_name, node_id, now],
            )
            .map(drop)
            .map_err(backend)
        })
        .await
    }

    async fn clear_device_channel(
        &self,
        product_key: String,
        device_name: String,
        node_id: String,
    ) -> StoreResult<()> {
        self.call(move |c| {
            exec(
                c,
                "DELETE FROM device_channels WHERE product_key = ?1 AND device_name = ?2 \
                 AND node_id = ?3",
                params![product_key, device_name, node_id],
            )
            .map(drop)
            .map_err(backend)
        })
        .await
    }

    async fn clear_device_channels_of_node(&self, node_id: String) -> StoreResult<()> {
        self.call(move |c| {
            exec(
                c,
                "DELETE FROM device_channels WHERE node_id = ?1",
                params![node_id],
            )
            .map(drop)
            .map_err(backend)
        })
        .await
    }

    async fn device_channel_node(
        &self,
        product_key: String,
        device_name: String,
    ) -> StoreResult<Option<String>> {
        self.call(move |c| {
            query_row(
                c,
                "SELECT node_id FROM device_channels WHERE product_key = ?1 AND device_name = ?2",
                params![product_key, device_name],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn device_channel_nodes(
        &self,
        product_key: String,
    ) -> StoreResult<std::collections::HashMap<String, String>> {
        self.call(move |c| fleet::device_channel_nodes(c, &product_key))
            .await
    }

    async fn publish(&self, _payload: String) -> StoreResult<()> {
        // Only one node can open a SQLite store: there is nobody to tell.
        Ok(())
    }

    fn subscribe(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<BusEvent>> {
        None
    }
}
