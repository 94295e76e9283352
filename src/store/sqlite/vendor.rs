//! The vendor facades' calls on SQLite: access keys, tunnel tags and the per-device tunnel
//! switch.
use rusqlite::{params, Connection, OptionalExtension};

use super::{backend, exec, is_unique_violation};
use crate::store::{AccessKey, Account, StoreError, StoreResult};

pub(super) fn create_access_key(c: &Connection, k: &AccessKey) -> StoreResult<()> {
    let exists = c
        .prepare_cached("SELECT 1 FROM accounts WHERE id = ?1")
        .and_then(|mut s| s.exists(params![k.account_id]))
        .map_err(backend)?;
    if !exists {
        return Err(StoreError::NotFound);
    }
    exec(
        c,
        "INSERT INTO access_keys (id, account_id, sealed_secret, created_at) \
         VALUES (?1, ?2, ?3, ?4)",
        params![k.id, k.account_id, k.sealed_secret, k.created_at],
    )
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::AlreadyExists
        } else {
            backend(e)
        }
    })?;
    Ok(())
}

fn key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AccessKey> {
    Ok(AccessKey {
        id: r.get(0)?,
        account_id: r.get(1)?,
        sealed_secret: r.get(2)?,
        created_at: r.get(3)?,
    })
}

pub(super) fn list_access_keys(c: &Connection, account_id: &str) -> StoreResult<Vec<AccessKey>> {
    let mut s = c
        .prepare_cached(
            "SELECT id, account_id, sealed_secret, created_at FROM access_keys \
             WHERE account_id = ?1 ORDER BY created_at, id",
        )
        .map_err(backend)?;
    let rows = s
        .query_map(params![account_id], key_from_row)
        .map_err(backend)?;
    rows.collect::<Result<_, _>>().map_err(backend)
}

pub(super) fn delete_access_key(c: &Connection, account_id: &str, key_id: &str) -> StoreResult<()> {
    let n = exec(
        c,
        "DELETE FROM access_keys WHERE id = ?1 AND account_id = ?2",
        params![key_id, account_id],
    )
    .map_err(backend)?;
    if n == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

pub(super) fn access_key(
    c: &Connection,
    key_id: &str,
) -> StoreResult<Option<(AccessKey, Account)>> {
    c.prepare_cached(
        "SELECT k.id, k.account_id, k.sealed_secret, k.created_at, \
         a.id, a.name, a.is_admin, a.created_at \
         FROM access_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id = ?1",
    )
    .and_then(|mut s| {
        s.query_row(params![key_id], |r| {
            let key = key_from_row(r)?;
            let account = Account {
                id: r.get(4)?,
                name: r.get(5)?,
                is_admin: r.get::<_, i64>(6)? != 0,
                created_at: r.get(7)?,
            };
            Ok((key, account))
        })
        .optional()
    })
    .map_err(backend)
}

/// NotFound unless the tunnel exists and is the account's.
fn tunnel_owned(c: &Connection, account_id: &str, tunnel_id: &str) -> StoreResult<()> {
    c.prepare_cached("SELECT 1 FROM tunnels WHERE id = ?1 AND account_id = ?2")
        .and_then(|mut s| s.exists(params![tunnel_id, account_id]))
        .map_err(backend)?
        .then_some(())
        .ok_or(StoreError::NotFound)
}

pub(super) fn tunnel_tags(
    c: &Connection,
    account_id: &str,
    tunnel_id: &str,
) -> StoreResult<Vec<(String, String)>> {
    tunnel_owned(c, account_id, tunnel_id)?;
    let mut s = c
        .prepare_cached("SELECT key, value FROM tunnel_tags WHERE tunnel_id = ?1 ORDER BY key")
        .map_err(backend)?;
    let rows = s
        .query_map(params![tunnel_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(backend)?;
    rows.collect::<Result<_, _>>().map_err(backend)
}

pub(super) fn tag_tunnel(
    c: &Connection,
    account_id: &str,
    tunnel_id: &str,
    tags: &[(String, String)],
) -> StoreResult<()> {
    tunnel_owned(c, account_id, tunnel_id)?;
    for (k, v) in tags {
        exec(
            c,
            "INSERT INTO tunnel_tags (tunnel_id, key, value) VALUES (?1, ?2, ?3) \
             ON CONFLICT (tunnel_id, key) DO UPDATE SET value = excluded.value",
            params![tunnel_id, k, v],
        )
        .map_err(backend)?;
    }
    Ok(())
}

pub(super) fn untag_tunnel(
    c: &Connection,
    account_id: &str,
    tunnel_id: &str,
    keys: &[String],
) -> StoreResult<()> {
    tunnel_owned(c, account_id, tunnel_id)?;
    for k in keys {
        exec(
            c,
            "DELETE FROM tunnel_tags WHERE tunnel_id = ?1 AND key = ?2",
            params![tunnel_id, k],
        )
        .map_err(backend)?;
    }
    Ok(())
}

pub(super) fn set_device_tunnels_disabled(
    c: &Connection,
    account_id: &str,
    product_key: &str,
    device_name: &str,
    disabled: bool,
) -> StoreResult<()> {
    let n = exec(
        c,
        "UPDATE devices SET tunnels_disabled = ?4 WHERE product_key = ?1 AND name = ?2 \
         AND product_key IN (SELECT product_key FROM products WHERE account_id = ?3)",
        params![product_key, device_name, account_id, disabled as i64],
    )
    .map_err(backend)?;
    if n == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

pub(super) fn device_tunnels_disabled(
    c: &Connection,
    product_key: &str,
    device_name: &str,
) -> StoreResult<bool> {
    c.prepare_cached("SELECT tunnels_disabled FROM devices WHERE product_key = ?1 AND name = ?2")
        .and_then(|mut s| {
            s.query_row(params![product_key, device_name], |r| r.get::<_, i64>(0))
                .optional()
        })
        .map(|v| v.is_some_and(|v| v != 0))
        .map_err(backend)
}
