//! The fleet's calls on SQLite: a fleet of one node, with the same tables as PostgreSQL's.
use std::collections::HashMap;

use rusqlite::{params, Connection, Row};

use super::{backend, exec, query_tunnels};
use crate::clock::Millis;
use crate::store::{NodeRecord, StoreResult, Tunnel};

fn node_from_row(r: &Row<'_>) -> rusqlite::Result<NodeRecord> {
    Ok(NodeRecord {
        node_id: r.get(0)?,
        relay_url: r.get(1)?,
        api_url: r.get(2)?,
        mesh_addr: r.get(3)?,
        version: r.get(4)?,
        started_at: r.get(5)?,
        heartbeat_at: r.get(6)?,
        shards: r.get::<_, i64>(7)? as u32,
        open_tunnels: r.get::<_, i64>(8)? as u64,
        device_channels: r.get::<_, i64>(9)? as u64,
        draining: r.get::<_, i64>(10)? != 0,
    })
}

pub(super) fn upsert_node(c: &Connection, n: &NodeRecord) -> StoreResult<()> {
    exec(
        c,
        "INSERT OR REPLACE INTO nodes (node_id, relay_url, api_url, mesh_addr, version, \
         started_at, heartbeat_at, shards, open_tunnels, device_channels, draining) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            n.node_id,
            n.relay_url,
            n.api_url,
            n.mesh_addr,
            n.version,
            n.started_at,
            n.heartbeat_at,
            i64::from(n.shards),
            n.open_tunnels as i64,
            n.device_channels as i64,
            n.draining as i64,
        ],
    )
    .map(drop)
    .map_err(backend)
}

pub(super) fn list_nodes(c: &Connection) -> StoreResult<Vec<NodeRecord>> {
    let mut s = c
        .prepare_cached(
            "SELECT node_id, relay_url, api_url, mesh_addr, version, started_at, heartbeat_at, \
             shards, open_tunnels, device_channels, draining FROM nodes ORDER BY node_id",
        )
        .map_err(backend)?;
    let rows = s.query_map([], node_from_row).map_err(backend)?;
    rows.collect::<Result<_, _>>().map_err(backend)
}

pub(super) fn fleet_secret(c: &Connection, name: &str, proposed: &[u8]) -> StoreResult<Vec<u8>> {
    exec(
        c,
        "INSERT OR IGNORE INTO fleet_secrets (name, value) VALUES (?1, ?2)",
        params![name, proposed],
    )
    .map_err(backend)?;
    super::query_row(
        c,
        "SELECT value FROM fleet_secrets WHERE name = ?1",
        params![name],
        |r| r.get(0),
    )
    .map_err(backend)
}

pub(super) fn try_lease(
    c: &Connection,
    name: &str,
    holder: &str,
    now: Millis,
    ttl_ms: i64,
) -> StoreResult<bool> {
    // The update only happens when the lease is ours or has expired; no row changed means
    // another holder has it.
    let changed = exec(
        c,
        "INSERT INTO leases (name, holder, until_ms) VALUES (?1, ?2, ?3) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms \
         WHERE leases.holder = excluded.holder OR leases.until_ms < ?4",
        params![name, holder, now.saturating_add(ttl_ms), now],
    )
    .map_err(backend)?;
    Ok(changed > 0)
}

pub(super) fn open_tunnels_by_owner(c: &Connection) -> StoreResult<Vec<(String, u64)>> {
    let mut s = c
        .prepare_cached(
            "SELECT owner_node, COUNT(*) FROM tunnels WHERE state = 'OPEN' \
             AND owner_node IS NOT NULL GROUP BY owner_node ORDER BY owner_node",
        )
        .map_err(backend)?;
    let rows = s
        .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
        .map_err(backend)?;
    rows.collect::<Result<_, _>>().map_err(backend)
}

pub(super) fn reassign_tunnels(
    c: &Connection,
    from_node: &str,
    to_nodes: &[String],
    now: Millis,
) -> StoreResult<Vec<Tunnel>> {
    if to_nodes.is_empty() {
        return Ok(Vec::new());
    }
    // The writer thread runs one job at a time inside a transaction: nobody moves these
    // tunnels between this read and the updates.
    let moving = query_tunnels(
        c,
        "owner_node = ?1 AND state = 'OPEN' ORDER BY seq",
        params![from_node],
    )?;
    let mut moved = Vec::with_capacity(moving.len());
    for (i, t) in moving.into_iter().enumerate() {
        let to = &to_nodes[i % to_nodes.len()];
        exec(
            c,
            "UPDATE tunnels SET owner_node = ?1, device_connected = 0, device_updated_at = ?2, \
             client_connected = 0, client_updated_at = ?2 WHERE seq = ?3",
            params![to, now, t.seq],
        )
        .map_err(backend)?;
        moved.extend(query_tunnels(c, "seq = ?1", params![t.seq])?);
    }
    Ok(moved)
}

pub(super) fn device_channel_nodes(
    c: &Connection,
    product_key: &str,
) -> StoreResult<HashMap<String, String>> {
    let mut s = c
        .prepare_cached("SELECT device_name, node_id FROM device_channels WHERE product_key = ?1")
        .map_err(backend)?;
    let rows = s
        .query_map(params![product_key], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(backend)?;
    rows.collect::<Result<_, _>>().map_err(backend)
}
