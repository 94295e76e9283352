//! MQTT client plumbing shared by the server ([`crate::control::mqtt`]) and the device agent
//! ([`crate::agent::mqtt`]): connection options and reconnect backoff. The topics and payloads
//! both sides agree on are in [`crate::proto::device`].
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use rumqttc::{MqttOptions, TlsConfiguration, Transport};

use crate::config::{MqttUrl, Secret};

/// Requests (publishes) queued for the broker; beyond this a notification is dropped with a
/// warning (presence replay sends `connect`s again once the device is back).
pub const REQUEST_QUEUE: usize = 10_000;
/// Largest MQTT packet sent or accepted: a notification with 4096 chars of custom info fits.
pub const MAX_PACKET: usize = 64 * 1024;
/// MQTT keep-alive of the server's and the agents' connections.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// First wait after a broker failure; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between reconnects to the broker.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// MQTT options for a broker URL, with credentials and TLS (trusting `ca_file`, else the public
/// web PKI roots) when the URL is `mqtts://`.
pub fn connect_options(
    url: &MqttUrl,
    client_id: &str,
    username: Option<&str>,
    password: Option<&Secret>,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<MqttOptions> {
    let mut o = MqttOptions::new(client_id, url.host.clone(), url.port);
    o.set_keep_alive(KEEP_ALIVE)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_request_channel_capacity(REQUEST_QUEUE);
    if let Some(user) = username {
        o.set_credentials(user, password.map(|p| p.0.as_str()).unwrap_or(""));
    }
    if url.tls {
        let tls =
            crate::tls::client_config(ca_file).context("cannot set up TLS for the MQTT broker")?;
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    }
    Ok(o)
}

/// Jittered exponential backoff for broker reconnects.
#[derive(Debug)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(FIRST_BACKOFF)
    }
}

impl Backoff {
    /// Starts over after a connection that worked.
    pub fn reset(&mut self) {
        self.0 = FIRST_BACKOFF;
    }

    /// The next wait (full jitter over its upper half); doubles the one after.
    pub fn next_wait(&mut self) -> Duration {
        let wait = rand::thread_rng().gen_range(self.0 / 2..=self.0);
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap() {
        let mut b = Backoff::default();
        let waits: Vec<_> = (0..10).map(|_| b.next_wait()).collect();
        assert!(waits[0] <= FIRST_BACKOFF);
        assert!(waits.iter().all(|w| *w <= MAX_BACKOFF));
        assert!(waits[9] >= MAX_BACKOFF / 2);
    }
}
