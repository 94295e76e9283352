//! API keys on PostgreSQL.
use deadpool_postgres::GenericClient;
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;

use super::{account_from_row, db_err, execute, hash32, query, query_opt};
use crate::clock::Millis;
use crate::store::{Account, ApiKey, KeyOrigin, NewApiKey, StoreError, StoreResult};
use crate::token::SecretHash;

/// The columns [`key_from_row`] reads, unqualified (as `RETURNING` names them).
const KEY_COLUMNS: &str =
    "id, account_id, name, origin, key_hash, created_at, last_used_at, revoked_at";

fn key_from_row(r: &Row, base: usize) -> Result<ApiKey, tokio_postgres::Error> {
    Ok(ApiKey {
        id: r.try_get(base)?,
        account_id: r.try_get(base + 1)?,
        name: r.try_get(base + 2)?,
        origin: KeyOrigin::parse(r.try_get(base + 3)?),
        key_hash: hash32(r.try_get(base + 4)?),
        created_at: r.try_get(base + 5)?,
        last_used_at: r.try_get(base + 6)?,
        revoked_at: r.try_get(base + 7)?,
    })
}

fn keys_from_rows(rows: Vec<Row>) -> StoreResult<Vec<ApiKey>> {
    rows.iter()
        .map(|r| key_from_row(r, 0))
        .collect::<Result<_, _>>()
        .map_err(db_err)
}

pub(super) async fn insert(c: &impl GenericClient, k: &NewApiKey) -> StoreResult<u64> {
    let st = c
        .prepare_cached(
            "INSERT INTO api_keys (id, account_id, name, origin, key_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key_hash) DO NOTHING",
        )
        .await
        .map_err(db_err)?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
        &k.id,
        &k.account_id,
        &k.name,
        &k.origin.as_str(),
        &&k.key_hash[..],
        &k.created_at,
    ];
    c.execute(&st, &params).await.map_err(|e| {
        if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) {
            StoreError::NotFound
        } else {
            db_err(e)
        }
    })
}

pub(super) async fn add(c: &impl GenericClient, k: &NewApiKey) -> StoreResult<ApiKey> {
    // Nodes starting together add the same IOTUNNEL_ADMIN_KEY at once: one insert wins and
    // every caller reads the row that won.
    insert(c, k).await?;
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1");
    let row = query_opt(c, &sql, &[&&k.key_hash[..]])
        .await?
        .ok_or_else(|| StoreError::Unavailable("an inserted API key vanished".into()))?;
    key_from_row(&row, 0).map_err(db_err)
}

pub(super) async fn account_by_key(
    c: &impl GenericClient,
    hash: &SecretHash,
) -> StoreResult<Option<(Account, ApiKey)>> {
    let sql = "SELECT a.id, a.name, a.is_admin, a.created_at, k.id, k.account_id, k.name, \
               k.origin, k.key_hash, k.created_at, k.last_used_at, k.revoked_at \
               FROM api_keys k JOIN accounts a ON a.id = k.account_id \
               WHERE k.key_hash = $1 AND k.revoked_at IS NULL";
    let Some(row) = query_opt(c, sql, &[&&hash[..]]).await? else {
        return Ok(None);
    };
    let account = account_from_row(&row)?;
    let key = key_from_row(&row, 4).map_err(db_err)?;
    Ok(Some((account, key)))
}

pub(super) async fn list(
    c: &impl GenericClient,
    account_id: Option<&str>,
) -> StoreResult<Vec<ApiKey>> {
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL \
         AND ($1::TEXT IS NULL OR account_id = $1) ORDER BY created_at, id"
    );
    keys_from_rows(query(c, &sql, &[&account_id]).await?)
}

pub(super) async fn revoke(
    c: &impl GenericClient,
    account_id: Option<&str>,
    key_id: &str,
    now: Millis,
) -> StoreResult<ApiKey> {
    let sql = format!(
        "UPDATE api_keys SET revoked_at = $3 WHERE id = $2 AND revoked_at IS NULL \
         AND ($1::TEXT IS NULL OR account_id = $1) RETURNING {KEY_COLUMNS}"
    );
    let row = query_opt(c, &sql, &[&account_id, &key_id, &now])
        .await?
        .ok_or(StoreError::NotFound)?;
    key_from_row(&row, 0).map_err(db_err)
}

pub(super) async fn retire(
    c: &impl GenericClient,
    account_id: &str,
    origin: KeyOrigin,
    keep_id: &str,
    now: Millis,
) -> StoreResult<Vec<ApiKey>> {
    let sql = format!(
        "UPDATE api_keys SET revoked_at = $4 WHERE account_id = $1 AND origin = $2 \
         AND id <> $3 AND revoked_at IS NULL RETURNING {KEY_COLUMNS}"
    );
    let rows = query(c, &sql, &[&account_id, &origin.as_str(), &keep_id, &now]).await?;
    keys_from_rows(rows)
}

pub(super) async fn touch(c: &impl GenericClient, key_id: &str, at: Millis) -> StoreResult<()> {
    execute(
        c,
        "UPDATE api_keys SET last_used_at = $2 \
         WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < $2)",
        &[&key_id, &at],
    )
    .await
    .map(drop)
}
