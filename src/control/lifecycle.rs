//! The lifecycle sweeper: closes tunnels at `expires_at` (reason `expired`) and deletes tunnels
//! older than the retention (30 days by default). Time comes from the injectable clock, so
//! tests advance a manual clock and call [`sweep_once`] instead of sleeping.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::ControlPlane;
use crate::seam::CloseReason;
use crate::store::StoreResult;

/// Milliseconds in a day.
const DAY_MS: i64 = 86_400_000;

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Tunnels closed because they expired.
    pub expired: Vec<String>,
    /// Tunnels deleted because they outlived the retention.
    pub purged: Vec<String>,
}

/// Runs one sweep at the clock's current time.
pub async fn sweep_once(cp: &ControlPlane) -> StoreResult<SweepReport> {
    let now = cp.clock.now_ms();
    let expired = cp.store.expire_tunnels(now).await?;
    for t in &expired {
        cp.after_close(t, CloseReason::Expired).await;
    }
    let retention = i64::from(cp.settings.retention_days) * DAY_MS;
    let purged = cp.store.purge_tunnels(now - retention).await?;
    for id in &purged {
        // A tunnel purged while still OPEN (retention shorter than its lifetime) must stop too.
        cp.index.remove(id);
        cp.publish(super::fleet::FleetMsg::Delete {
            tunnel_id: id.clone(),
        })
        .await;
    }
    if !purged.is_empty() {
        tracing::info!(count = purged.len(), "tunnels deleted after retention");
    }
    Ok(SweepReport {
        expired: expired.into_iter().map(|t| t.id).collect(),
        purged,
    })
}

/// Sweeps every `sweep_interval_ms` until `shutdown` turns true, while this node leads the
/// fleet (one sweeper at a time; a single node always leads).
pub async fn run_sweeper(cp: Arc<ControlPlane>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(cp.settings.sweep_interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if !cp.fleet.is_leader() {
                    continue;
                }
                if let Err(e) = sweep_once(&cp).await {
                    tracing::warn!(error = %e, "lifecycle sweep failed; will retry");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}
