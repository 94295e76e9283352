//! API keys on SQLite.
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{account_from_row, backend, exec, hash32, is_unique_violation, query_row};
use crate::clock::Millis;
use crate::store::{Account, ApiKey, KeyOrigin, NewApiKey, StoreError, StoreResult};
use crate::token::SecretHash;

/// The columns [`key_from_row`] reads, unqualified (as `RETURNING` needs them).
const KEY_COLUMNS: &str =
    "id, account_id, name, origin, key_hash, created_at, last_used_at, revoked_at";
/// The same columns of `api_keys k`, for joins.
const K_COLUMNS: &str =
    "k.id, k.account_id, k.name, k.origin, k.key_hash, k.created_at, k.last_used_at, k.revoked_at";

fn key_from_row(r: &Row<'_>, base: usize) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        id: r.get(base)?,
        account_id: r.get(base + 1)?,
        name: r.get(base + 2)?,
        origin: KeyOrigin::parse(&r.get::<_, String>(base + 3)?),
        key_hash: hash32(r.get(base + 4)?),
        created_at: r.get(base + 5)?,
        last_used_at: r.get(base + 6)?,
        revoked_at: r.get(base + 7)?,
    })
}

pub(super) fn insert(c: &Connection, k: &NewApiKey) -> rusqlite::Result<usize> {
    exec(
        c,
        "INSERT INTO api_keys (id, account_id, name, origin, key_hash, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            k.id,
            k.account_id,
            k.name,
            k.origin.as_str(),
            &k.key_hash[..],
            k.created_at
        ],
    )
}

fn by_hash(c: &Connection, hash: &SecretHash) -> StoreResult<Option<ApiKey>> {
    query_row(
        c,
        &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?1"),
        params![&hash[..]],
        |r| key_from_row(r, 0),
    )
    .optional()
    .map_err(backend)
}

pub(super) fn add(c: &Connection, k: &NewApiKey) -> StoreResult<ApiKey> {
    if let Some(existing) = by_hash(c, &k.key_hash)? {
        return Ok(existing);
    }
    insert(c, k).map_err(|e| match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
        {
            StoreError::NotFound
        }
        _ if is_unique_violation(&e) => StoreError::AlreadyExists,
        _ => backend(e),
    })?;
    Ok(ApiKey {
        id: k.id.clone(),
        account_id: k.account_id.clone(),
        name: k.name.clone(),
        origin: k.origin,
        key_hash: k.key_hash,
        created_at: k.created_at,
        last_used_at: None,
        revoked_at: None,
    })
}

pub(super) fn account_by_key(
    c: &Connection,
    hash: &SecretHash,
) -> StoreResult<Option<(Account, ApiKey)>> {
    query_row(
        c,
        &format!(
            "SELECT a.id, a.name, a.is_admin, a.created_at, {K_COLUMNS} FROM api_keys k \
             JOIN accounts a ON a.id = k.account_id \
             WHERE k.key_hash = ?1 AND k.revoked_at IS NULL"
        ),
        params![&hash[..]],
        |r| Ok((account_from_row(r)?, key_from_row(r, 4)?)),
    )
    .optional()
    .map_err(backend)
}

pub(super) fn list(c: &Connection, account_id: Option<&str>) -> StoreResult<Vec<ApiKey>> {
    let mut s = c
        .prepare_cached(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL \
             AND (?1 IS NULL OR account_id = ?1) ORDER BY created_at, id"
        ))
        .map_err(backend)?;
    let rows = s
        .query_map(params![account_id], |r| key_from_row(r, 0))
        .map_err(backend)?;
    rows.collect::<Result<_, _>>().map_err(backend)
}

pub(super) fn revoke(
    c: &Connection,
    account_id: Option<&str>,
    key_id: &str,
    now: Millis,
) -> StoreResult<ApiKey> {
    query_row(
        c,
        &format!(
            "UPDATE api_keys SET revoked_at = ?3 WHERE id = ?2 AND revoked_at IS NULL \
             AND (?1 IS NULL OR account_id = ?1) RETURNING {KEY_COLUMNS}"
        ),
        params![account_id, key_id, now],
        |r| key_from_row(r, 0),
    )
    .optional()
    .map_err(backend)?
    .ok_or(StoreError::NotFound)
}

pub(super) fn retire(
    c: &Connection,
    account_id: &str,
    origin: KeyOrigin,
    keep_id: &str,
    now: Millis,
) -> StoreResult<Vec<ApiKey>> {
    let mut s = c
        .prepare_cached(&format!(
            "UPDATE api_keys SET revoked_at = ?4 WHERE account_id = ?1 AND origin = ?2 \
             AND id <> ?3 AND revoked_at IS NULL RETURNING {KEY_COLUMNS}"
        ))
        .map_err(backend)?;
    let rows = s
        .query_map(params![account_id, origin.as_str(), keep_id, now], |r| {
            key_from_row(r, 0)
        })
        .map_err(backend)?;
    rows.collect::<Result<_, _>>().map_err(backend)
}

pub(super) fn touch(c: &Connection, key_id: &str, at: Millis) -> StoreResult<()> {
    exec(
        c,
        "UPDATE api_keys SET last_used_at = ?2 \
         WHERE id = ?1 AND (last_used_at IS NULL OR last_used_at < ?2)",
        params![key_id, at],
    )
    .map(drop)
    .map_err(backend)
}
