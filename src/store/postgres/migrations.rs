//! The PostgreSQL schema, as numbered migrations recorded in `schema_migrations`.
//!
//! Every node migrates at connect. The migrations run under one session-level advisory lock, so
//! nodes starting together queue up and each migration is applied exactly once; each one runs
//! in its own transaction, so a failure leaves the schema at the previous version.
use anyhow::Context;

/// Key of the advisory lock held while migrating: "iotunnel" in ASCII, a fixed value every
/// node agrees on.
const MIGRATION_LOCK: i64 = 0x696f_7475_6e6e_656c;

/// Schema migrations, applied in order; never edit one that has shipped, append a new one.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    is_admin BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL
);
CREATE TABLE api_keys (
    key_hash BYTEA PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    created_at BIGINT NOT NULL
);
CREATE TABLE products (
    product_key TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX products_by_account ON products(account_id, created_at);
CREATE TABLE devices (
    product_key TEXT NOT NULL REFERENCES products(product_key),
    name TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (product_key, name)
);
CREATE TABLE tunnels (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    custom_info TEXT,
    description TEXT,
    services TEXT[] NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    closed_at BIGINT,
    close_reason TEXT,
    client_token_hash BYTEA NOT NULL,
    device_token_hash BYTEA NOT NULL,
    device_token_seed BYTEA NOT NULL,
    device_connected BOOLEAN NOT NULL DEFAULT FALSE,
    device_updated_at BIGINT,
    device_rtt_us BIGINT,
    device_srtt_us BIGINT,
    device_addr TEXT,
    client_connected BOOLEAN NOT NULL DEFAULT FALSE,
    client_updated_at BIGINT,
    client_rtt_us BIGINT,
    client_srtt_us BIGINT,
    client_addr TEXT,
    device_bytes_sent BIGINT NOT NULL DEFAULT 0,
    device_bytes_received BIGINT NOT NULL DEFAULT 0,
    client_bytes_sent BIGINT NOT NULL DEFAULT 0,
    client_bytes_received BIGINT NOT NULL DEFAULT 0,
    owner_node TEXT
);
CREATE INDEX tunnels_by_account ON tunnels(account_id, seq);
CREATE INDEX tunnels_by_device ON tunnels(product_key, device_name, state);
CREATE INDEX tunnels_by_expiry ON tunnels(state, expires_at);
CREATE INDEX tunnels_by_created ON tunnels(created_at);
CREATE INDEX tunnels_by_owner ON tunnels(owner_node, state);
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    relay_url TEXT NOT NULL,
    api_url TEXT NOT NULL,
    mesh_addr TEXT,
    version TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    shards BIGINT NOT NULL,
    open_tunnels BIGINT NOT NULL,
    device_channels BIGINT NOT NULL,
    draining BOOLEAN NOT NULL
);
CREATE TABLE fleet_secrets (
    name TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);
CREATE TABLE device_channels (
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    node_id TEXT NOT NULL,
    connected_at BIGINT NOT NULL,
    PRIMARY KEY (product_key, device_name)
);
CREATE INDEX device_channels_by_node ON device_channels(node_id);
"#,
    // Each device's OPEN tunnels, counted by triggers in the same transaction as every change of
    // `tunnels`, so the limit check in `create_tunnel` reads the (already locked) device row
    // instead of counting. Inserts count per row (`create_tunnel` holds the device row's lock).
    // Updates and deletes count per statement, from the transition tables: a statement locks
    // all its tunnel rows before any device row, so a close (tunnel, then device) and a
    // multi-row close or `delete_device` (tunnels, then device) always lock in the same order.
    r#"
ALTER TABLE devices ADD COLUMN open_tunnels BIGINT NOT NULL DEFAULT 0;
UPDATE devices d SET open_tunnels = c.n
FROM (SELECT product_key, device_name, COUNT(*) AS n FROM tunnels WHERE state = 'OPEN'
      GROUP BY product_key, device_name) c
WHERE d.product_key = c.product_key AND d.name = c.device_name;

CREATE FUNCTION tunnels_count_open_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE devices SET open_tunnels = open_tunnels + 1
    WHERE product_key = NEW.product_key AND name = NEW.device_name;
    RETURN NULL;
END $$;
CREATE TRIGGER tunnels_count_open_insert AFTER INSERT ON tunnels
FOR EACH ROW WHEN (NEW.state = 'OPEN') EXECUTE FUNCTION tunnels_count_open_insert();

CREATE FUNCTION tunnels_count_open_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE devices d SET open_tunnels = d.open_tunnels + c.delta
    FROM (SELECT product_key, device_name, SUM(delta) AS delta FROM (
              SELECT product_key, device_name, -1 AS delta FROM old_rows WHERE state = 'OPEN'
              UNION ALL
              SELECT product_key, device_name, 1 FROM new_rows WHERE state = 'OPEN') x
          GROUP BY product_key, device_name) c
    WHERE c.delta <> 0 AND d.product_key = c.product_key AND d.name = c.device_name;
    RETURN NULL;
END $$;
CREATE TRIGGER tunnels_count_open_update AFTER UPDATE ON tunnels
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION tunnels_count_open_update();

CREATE FUNCTION tunnels_count_open_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE devices d SET open_tunnels = d.open_tunnels - c.n
    FROM (SELECT product_key, device_name, COUNT(*) AS n FROM old_rows WHERE state = 'OPEN'
          GROUP BY product_key, device_name) c
    WHERE d.product_key = c.product_key AND d.name = c.device_name;
    RETURN NULL;
END $$;
CREATE TRIGGER tunnels_count_open_delete AFTER DELETE ON tunnels
REFERENCING OLD TABLE AS old_rows
FOR EACH STATEMENT EXECUTE FUNCTION tunnels_count_open_delete();
"#,
    // API keys get a public id, a name, an origin, a last-used time and revocation. Which admin
    // keys came from IOTUNNEL_ADMIN_KEY was never recorded: all are taken as env-given, so the
    // next start with a new IOTUNNEL_ADMIN_KEY retires them.
    r#"
ALTER TABLE api_keys ADD COLUMN id TEXT;
ALTER TABLE api_keys ADD COLUMN name TEXT NOT NULL DEFAULT 'created with the account';
ALTER TABLE api_keys ADD COLUMN origin TEXT NOT NULL DEFAULT 'account';
ALTER TABLE api_keys ADD COLUMN last_used_at BIGINT;
ALTER TABLE api_keys ADD COLUMN revoked_at BIGINT;
UPDATE api_keys SET id = 'key_' || substr(md5(random()::text || encode(key_hash, 'hex')), 1, 16);
UPDATE api_keys SET origin = 'env', name = 'IOTUNNEL_ADMIN_KEY'
WHERE account_id IN (SELECT id FROM accounts WHERE is_admin);
ALTER TABLE api_keys ALTER COLUMN id SET NOT NULL;
CREATE UNIQUE INDEX api_keys_by_id ON api_keys(id);
CREATE INDEX api_keys_by_account ON api_keys(account_id, created_at);
"#,
    // Vendor facades (issue 13): access keys (secrets sealed with the server's key), tunnel
    // tags (AWS TagResource), and the per-device tunnel switch (Alibaba DisableDeviceTunnel).
    r#"
CREATE TABLE access_keys (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    sealed_secret BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX access_keys_by_account ON access_keys(account_id, created_at);
CREATE TABLE tunnel_tags (
    tunnel_id TEXT NOT NULL REFERENCES tunnels(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (tunnel_id, key)
);
ALTER TABLE devices ADD COLUMN tunnels_disabled BOOLEAN NOT NULL DEFAULT FALSE;
"#,
];

/// Brings the schema up to date on `client` (a connection of its own: the lock is the
/// session's, and it is released with the connection if this node dies midway).
pub(super) async fn migrate(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("cannot take the migration lock")?;
    let applied = apply(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    applied?;
    unlocked.context("cannot release the migration lock")?;
    Ok(())
}

async fn apply(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (\
             version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await
        .context("cannot create schema_migrations")?;
    let row = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await?;
    let version = usize::try_from(row.try_get::<_, i32>(0)?).unwrap_or(0);
    anyhow::ensure!(
        version <= MIGRATIONS.len(),
        "database schema version {version} is newer than this binary ({})",
        MIGRATIONS.len()
    );
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let version = i as i32 + 1;
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("migration {version} failed"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
            &[&version, &chrono::Utc::now().timestamp_millis()],
        )
        .await?;
        tx.commit().await?;
    }
    Ok(())
}
