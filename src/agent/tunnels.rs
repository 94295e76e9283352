//! The device agent's relay half: one task per OPEN tunnel keeps a destination connection to
//! the relay and serves the tunnel's streams from the local services.
//!
//! - `connect` notification: start the tunnel's task, or restart it when the token changed
//!   (rotate); a repeat with the same token (the channel replays OPEN tunnels on every
//!   reconnect) changes nothing.
//! - `close` notification: stop the task; its local connections close with it.
//! - The relay connection drops: reconnect with the same token, with backoff, while the relay
//!   accepts it. A 4xx refusal (closed tunnel, rotated token) or a close saying the tunnel is
//!   closed ends the task; network errors never do.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::task::JoinHandle;

use super::dial::{self, Backoff, Endpoint, SessionEnd};
use super::mux::{self, LocalServices, SessionOptions};
use crate::config::Secret;
use crate::proto::aws::Side;

/// What every tunnel task shares.
pub struct RelayContext {
    /// TLS trust for the relay.
    pub tls: Arc<rustls::ClientConfig>,
    /// Where each service's connections go.
    pub local: Arc<LocalServices>,
}

/// A running tunnel task.
struct Running {
    /// SHA-256 of the token it uses (the token itself stays in the task).
    token_hash: [u8; 32],
    /// The relay it dials (a fleet re-places a tunnel by naming another node's relay).
    endpoint: Endpoint,
    generation: u64,
    task: JoinHandle<()>,
}

/// The tunnels this agent serves, by tunnel id.
pub struct Tunnels {
    ctx: Arc<RelayContext>,
    running: Arc<Mutex<HashMap<String, Running>>>,
    next_generation: AtomicU64,
}

/// A `connect` notification's relay fields.
pub struct Connect {
    /// The tunnel id.
    pub tunnel_id: String,
    /// The device token (never logged).
    pub token: Secret,
    /// The relay.
    pub endpoint: Endpoint,
    /// The tunnel's services.
    pub services: Vec<String>,
}

fn lock(map: &Mutex<HashMap<String, Running>>) -> MutexGuard<'_, HashMap<String, Running>> {
    map.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tunnels {
    /// No tunnels yet.
    pub fn new(ctx: RelayContext) -> Self {
        Self {
            ctx: Arc::new(ctx),
            running: Arc::default(),
            next_generation: AtomicU64::new(1),
        }
    }

    /// The local services this agent maps.
    pub fn local_services(&self) -> &LocalServices {
        &self.ctx.local
    }

    /// Serves a tunnel, unless it is already served with this token at this relay.
    pub fn connect(&self, note: Connect) {
        let token_hash = crate::token::hash_secret(&note.token.0);
        let mut running = lock(&self.running);
        if let Some(r) = running.get(&note.tunnel_id) {
            let same = crate::token::hashes_equal(&r.token_hash, &token_hash)
                && r.endpoint == note.endpoint;
            if same && !r.task.is_finished() {
                return;
            }
        }
        for service in &note.services {
            if self.ctx.local.resolve(service).is_none() {
                tracing::warn!(tunnel_id = %note.tunnel_id, service = %service, "the tunnel names a service this agent does not map (--service NAME=HOST:PORT)");
            }
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let task = tokio::spawn(serve_tunnel(
            self.ctx.clone(),
            self.running.clone(),
            generation,
            note.tunnel_id.clone(),
            note.endpoint.clone(),
            note.token,
        ));
        let old = running.insert(
            note.tunnel_id,
            Running {
                token_hash,
                endpoint: note.endpoint,
                generation,
                task,
            },
        );
        if let Some(old) = old {
            old.task.abort();
        }
    }

    /// Stops serving a tunnel.
    pub fn close(&self, tunnel_id: &str, reason: &str) {
        if let Some(r) = lock(&self.running).remove(tunnel_id) {
            tracing::info!(tunnel_id, reason, "tunnel closed; disconnecting it");
            r.task.abort();
        }
    }

    /// How many tunnels are served now.
    pub fn len(&self) -> usize {
        lock(&self.running).len()
    }

    /// True when no tunnel is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Tunnels {
    fn drop(&mut self) {
        for (_, r) in lock(&self.running).drain() {
            r.task.abort();
        }
    }
}

/// Keeps one tunnel's relay connection up until the tunnel ends.
async fn serve_tunnel(
    ctx: Arc<RelayContext>,
    running: Arc<Mutex<HashMap<String, Running>>>,
    generation: u64,
    tunnel_id: String,
    endpoint: Endpoint,
    token: Secret,
) {
    let options = SessionOptions::destination(ctx.local.clone());
    let mut backoff = Backoff::default();
    loop {
        match dial::dial(&endpoint, Side::Destination, &token, &ctx.tls).await {
            Ok(connected) => {
                tracing::info!(tunnel_id = %tunnel_id, relay = %endpoint.host_port(), services = ?connected.services, "tunnel connected to the relay");
                backoff.reset();
                let (_session, driver) = mux::start(connected, &options);
                match driver.run().await {
                    SessionEnd::TunnelClosed(reason) => {
                        tracing::info!(tunnel_id = %tunnel_id, reason = %reason, "tunnel closed by the relay");
                        break;
                    }
                    SessionEnd::Superseded(reason) => {
                        tracing::info!(tunnel_id = %tunnel_id, reason = %reason, "relay connection superseded; waiting for a new notification");
                        break;
                    }
                    SessionEnd::Local => break,
                    SessionEnd::Lost(why) => {
                        tracing::warn!(tunnel_id = %tunnel_id, reason = %why, "relay connection lost; reconnecting");
                    }
                }
            }
            Err(e) if e.is_final() => {
                tracing::warn!(tunnel_id = %tunnel_id, error = %e, "the relay refused this tunnel's token; giving it up");
                break;
            }
            Err(e) => {
                tracing::warn!(tunnel_id = %tunnel_id, error = %e, "cannot reach the relay; retrying")
            }
        }
        backoff.wait().await;
    }
    let mut map = lock(&running);
    if map
        .get(&tunnel_id)
        .is_some_and(|r| r.generation == generation)
    {
        map.remove(&tunnel_id);
    }
}
