//! The fleet's calls on PostgreSQL, and the bus: LISTEN/NOTIFY on one channel.
use std::time::Duration;

use deadpool_postgres::GenericClient;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{db_err, execute, query, query_opt, query_tunnels};
use crate::clock::Millis;
use crate::store::{BusEvent, NodeRecord, StoreError, StoreResult, Tunnel};

/// The NOTIFY channel every node listens on.
pub(super) const BUS_CHANNEL: &str = "iotunnel_fleet";
/// `application_name` of the listener's connection, so operators (and tests) can find it.
pub const BUS_APPLICATION_NAME: &str = "iotunnel-bus";
/// First wait before reconnecting a lost listener; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnects: a fleet notices a database that is back within 2 s.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

fn node_from_row(r: &Row) -> Result<NodeRecord, tokio_postgres::Error> {
    Ok(NodeRecord {
        node_id: r.try_get(0)?,
        relay_url: r.try_get(1)?,
        api_url: r.try_get(2)?,
        mesh_addr: r.try_get(3)?,
        version: r.try_get(4)?,
        started_at: r.try_get(5)?,
        heartbeat_at: r.try_get(6)?,
        shards: r.try_get::<_, i64>(7)? as u32,
        open_tunnels: r.try_get::<_, i64>(8)? as u64,
        device_channels: r.try_get::<_, i64>(9)? as u64,
        draining: r.try_get(10)?,
    })
}

pub(super) async fn upsert_node(c: &impl GenericClient, n: &NodeRecord) -> StoreResult<()> {
    execute(
        c,
        "INSERT INTO nodes (node_id, relay_url, api_url, mesh_addr, version, started_at, \
         heartbeat_at, shards, open_tunnels, device_channels, draining) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (node_id) DO UPDATE \
         SET relay_url = EXCLUDED.relay_url, api_url = EXCLUDED.api_url, \
         mesh_addr = EXCLUDED.mesh_addr, version = EXCLUDED.version, \
         started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at, \
         shards = EXCLUDED.shards, open_tunnels = EXCLUDED.open_tunnels, \
         device_channels = EXCLUDED.device_channels, draining = EXCLUDED.draining",
        &[
            &n.node_id,
            &n.relay_url,
            &n.api_url,
            &n.mesh_addr,
            &n.version,
            &n.started_at,
            &n.heartbeat_at,
            &i64::from(n.shards),
            &(n.open_tunnels as i64),
            &(n.device_channels as i64),
            &n.draining,
        ],
    )
    .await
    .map(drop)
}

pub(super) async fn list_nodes(c: &impl GenericClient) -> StoreResult<Vec<NodeRecord>> {
    let sql = "SELECT node_id, relay_url, api_url, mesh_addr, version, started_at, heartbeat_at, \
               shards, open_tunnels, device_channels, draining FROM nodes ORDER BY node_id";
    query(c, sql, &[])
        .await?
        .iter()
        .map(node_from_row)
        .collect::<Result<_, _>>()
        .map_err(db_err)
}

pub(super) async fn fleet_secret(
    c: &impl GenericClient,
    name: &str,
    proposed: &[u8],
) -> StoreResult<Vec<u8>> {
    execute(
        c,
        "INSERT INTO fleet_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        &[&name, &proposed],
    )
    .await?;
    query_opt(
        c,
        "SELECT value FROM fleet_secrets WHERE name = $1",
        &[&name],
    )
    .await?
    .ok_or_else(|| StoreError::Unavailable(format!("fleet secret {name} vanished")))?
    .try_get(0)
    .map_err(db_err)
}

pub(super) async fn try_lease(
    c: &impl GenericClient,
    name: &str,
    holder: &str,
    now: Millis,
    ttl_ms: i64,
) -> StoreResult<bool> {
    // One statement: the row is taken, renewed or left to its holder atomically; no row back
    // means another holder has it.
    let row = query_opt(
        c,
        "INSERT INTO leases (name, holder, until_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until_ms = EXCLUDED.until_ms \
         WHERE leases.holder = EXCLUDED.holder OR leases.until_ms < $4 RETURNING holder",
        &[&name, &holder, &now.saturating_add(ttl_ms), &now],
    )
    .await?;
    Ok(row.is_some())
}

pub(super) async fn open_tunnels_by_owner(
    c: &impl GenericClient,
) -> StoreResult<Vec<(String, u64)>> {
    let sql = "SELECT owner_node, COUNT(*) FROM tunnels WHERE state = 'OPEN' \
               AND owner_node IS NOT NULL GROUP BY owner_node ORDER BY owner_node";
    query(c, sql, &[])
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64)))
        .collect::<Result<_, _>>()
        .map_err(db_err)
}

/// Runs inside the caller's transaction; `to_nodes` is not empty.
pub(super) async fn reassign_tunnels(
    tx: &impl GenericClient,
    from_node: &str,
    to_nodes: &[String],
    now: Millis,
) -> StoreResult<Vec<Tunnel>> {
    // Rows another re-placement has locked are skipped, not waited for: that one moves them.
    let rows = query(
        tx,
        "SELECT seq FROM tunnels WHERE owner_node = $1 AND state = 'OPEN' ORDER BY seq \
         FOR UPDATE SKIP LOCKED",
        &[&from_node],
    )
    .await?;
    let seqs = rows
        .iter()
        .map(|r| r.try_get::<_, i64>(0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err)?;
    let owners: Vec<&str> = (0..seqs.len())
        .map(|i| to_nodes[i % to_nodes.len()].as_str())
        .collect();
    execute(
        tx,
        "UPDATE tunnels SET owner_node = moves.owner, device_connected = FALSE, \
         device_updated_at = $3, client_connected = FALSE, client_updated_at = $3 \
         FROM UNNEST($1::BIGINT[], $2::TEXT[]) AS moves(seq, owner) WHERE tunnels.seq = moves.seq",
        &[&seqs, &owners, &now],
    )
    .await?;
    query_tunnels(tx, "seq = ANY($1) ORDER BY seq", &[&seqs]).await
}

/// What the bus listener needs to open its own connection.
#[derive(Clone)]
pub(super) struct BusTarget {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    runtime: tokio::runtime::Handle,
}

impl BusTarget {
    /// Captures the current runtime: listeners are spawned on it.
    pub(super) fn new(mut config: tokio_postgres::Config, tls: MakeRustlsConnect) -> Self {
        config.application_name(BUS_APPLICATION_NAME);
        Self {
            config,
            tls,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Starts a listener task feeding a new receiver; it stops when the receiver is dropped.
    pub(super) fn subscribe(&self) -> mpsc::UnboundedReceiver<BusEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.runtime.spawn(listen_forever(self.clone(), tx));
        rx
    }
}

/// Why one listening connection ended.
enum Ended {
    /// The receiver is gone: stop.
    Unsubscribed,
    /// The connection failed or was lost: reconnect.
    Lost(String),
}

async fn listen_forever(target: BusTarget, tx: mpsc::UnboundedSender<BusEvent>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mut listened = false;
        match listen_once(&target, &tx, &mut listened).await {
            Ended::Unsubscribed => return,
            Ended::Lost(why) => tracing::warn!(%why, "fleet bus connection lost, reconnecting"),
        }
        if listened {
            backoff = FIRST_BACKOFF;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = tx.closed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's life: LISTEN, announce [`BusEvent::Resynced`], forward notifications.
async fn listen_once(
    target: &BusTarget,
    tx: &mpsc::UnboundedSender<BusEvent>,
    listened: &mut bool,
) -> Ended {
    let connecting = target.config.connect(target.tls.clone());
    let (client, mut connection) = tokio::select! {
        r = connecting => match r {
            Ok(pair) => pair,
            Err(e) => return Ended::Lost(e.to_string()),
        },
        _ = tx.closed() => return Ended::Unsubscribed,
    };
    // Polling the connection's messages is also what drives it.
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let listen_sql = format!("LISTEN {BUS_CHANNEL}");
    let listen = client.batch_execute(&listen_sql);
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            r = &mut listen, if !listening => {
                if let Err(e) = r {
                    return Ended::Lost(e.to_string());
                }
                listening = true;
                *listened = true;
                if tx.send(BusEvent::Resynced).is_err() {
                    return Ended::Unsubscribed;
                }
            }
            m = messages.next() => match m {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(BusEvent::Message(n.payload().to_string())).is_err() {
                        return Ended::Unsubscribed;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Ended::Lost(e.to_string()),
                None => return Ended::Lost("connection closed".into()),
            },
            _ = tx.closed() => return Ended::Unsubscribed,
        }
    }
}
