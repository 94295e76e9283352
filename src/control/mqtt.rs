//! MQTT notifications and presence, for fleets that already run a broker (`--mqtt-url`).
//!
//! Every device notification that goes to the device channel is also published, QoS 1, not
//! retained, on three topics:
//! - AWS: `$aws/things/{thing}/tunnels/notify` with
//!   `{"clientAccessToken", "clientMode": "destination", "region", "services"}`, where the
//!   thing name comes from the template (`{product_key}_{device_name}` by default). AWS has no
//!   close notification: a close is not published there (the relay ends the device's
//!   connection instead).
//! - Alibaba: `/sys/{productKey}/{deviceName}/secure_tunnel/notify` with `operation`
//!   (`connect` or `close`), `tunnel_id`, `host`, `port` (a string), `path`
//!   (`/tunnel/{tunnel_id}/device`), `token`, `token_expire` (unix seconds: the device token
//!   lasts as long as the tunnel), `udi` (the custom info, when there is one), and
//!   `close_reason` on close.
//! - iotunnel: `iotunnel/{product_key}/{device_name}/notify`, the device channel's own JSON,
//!   which `iotunnel device --mqtt-url` reads.
//!
//! Presence: the server subscribes to `iotunnel/+/+/presence`, where agents publish a retained
//! `online` on every (re)connect and leave a retained `offline` as their last will. A device is
//! online when its channel is up or its last presence message said `online`. Each `online`
//! message (also the retained ones delivered when the server (re)subscribes) makes the server
//! publish a native `connect` for every OPEN tunnel of the device, as the device channel does on
//! every reconnect, so a notification lost to an outage is not lost for good.
//!
//! While the broker is unreachable the server keeps the presence it last knew (a device that
//! left meanwhile shows online until the broker answers again and its retained `offline` comes
//! back), queues notifications up to [`REQUEST_QUEUE`], and reconnects with jittered
//! exponential backoff capped at 30 s. The API never waits for the broker.
//!
//! The broker authenticates devices and keeps each to its own topics (ACLs): the server trusts
//! whatever it reads on a presence topic. Tokens and passwords are never logged.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dashmap::DashMap;
use rand::Rng;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use serde_json::json;
use tokio::sync::watch;

use super::ControlPlane;
use crate::config::{MqttSettings, MqttUrl, Secret};
use crate::seam::CloseReason;
use crate::store::Tunnel;

/// The topic filter of every device's presence.
pub const PRESENCE_FILTER: &str = "iotunnel/+/+/presence";
/// Presence payload of a connected agent (retained).
pub const ONLINE: &str = "online";
/// Presence payload of an agent that left (its retained last will).
pub const OFFLINE: &str = "offline";
/// The `region` put into AWS notifications: iotunnel is no AWS region, so AWS-family agents
/// must be pointed at the relay's endpoint (e.g. localproxy `--proxy-endpoint`).
pub const AWS_REGION: &str = "iotunnel";
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

/// The native notification topic of a device.
pub fn notify_topic(product_key: &str, device_name: &str) -> String {
    format!("iotunnel/{product_key}/{device_name}/notify")
}

/// The presence topic of a device.
pub fn presence_topic(product_key: &str, device_name: &str) -> String {
    format!("iotunnel/{product_key}/{device_name}/presence")
}

/// The AWS notification topic of a thing.
pub fn aws_topic(thing: &str) -> String {
    format!("$aws/things/{thing}/tunnels/notify")
}

/// The Alibaba notification topic of a device.
pub fn alibaba_topic(product_key: &str, device_name: &str) -> String {
    format!("/sys/{product_key}/{device_name}/secure_tunnel/notify")
}

/// (product key, device name) of a presence topic.
fn parse_presence_topic(topic: &str) -> Option<(&str, &str)> {
    let mut parts = topic.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("iotunnel"), Some(pk), Some(dn), Some("presence"), None)
            if !pk.is_empty() && !dn.is_empty() =>
        {
            Some((pk, dn))
        }
        _ => None,
    }
}

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
        let tls = crate::agent::dial::tls_config(ca_file)
            .context("cannot set up TLS for the MQTT broker")?;
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

type DeviceKey = (String, String);

/// The server's MQTT side: publishes notifications and knows which devices announced
/// themselves online.
pub struct MqttNotifier {
    client: AsyncClient,
    settings: MqttSettings,
    online: DashMap<DeviceKey, ()>,
    connected: AtomicBool,
}

impl std::fmt::Debug for MqttNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttNotifier")
            .field("url", &self.settings.url)
            .field("online", &self.online.len())
            .finish_non_exhaustive()
    }
}

impl MqttNotifier {
    /// A notifier for the broker in `settings`, and the event loop that [`run`] drives. Nothing
    /// connects until the loop runs.
    pub fn new(settings: &MqttSettings) -> anyhow::Result<(Self, EventLoop)> {
        let client_id = format!(
            "iotunnel-server-{}",
            hex::encode(crate::token::random_bytes::<6>())
        );
        let mut options = connect_options(
            &settings.url,
            &client_id,
            settings.username.as_deref(),
            settings.password.as_ref(),
            settings.ca_file.as_deref(),
        )?;
        options.set_clean_session(true);
        let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
        Ok((
            Self {
                client,
                settings: settings.clone(),
                online: DashMap::new(),
                connected: AtomicBool::new(false),
            },
            eventloop,
        ))
    }

    /// Whether the device's last presence message said `online`.
    pub fn is_online(&self, product_key: &str, device_name: &str) -> bool {
        self.online
            .contains_key(&(product_key.to_string(), device_name.to_string()))
    }

    /// How many devices are online over MQTT.
    pub fn online_count(&self) -> usize {
        self.online.len()
    }

    /// Whether the server is connected to the broker now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Queues a QoS 1 publish; never waits (a full queue drops it with a warning).
    fn publish(&self, topic: String, payload: String) {
        if let Err(e) = self
            .client
            .try_publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
        {
            tracing::warn!(%topic, error = %e, "MQTT notification dropped: the broker queue is full");
        }
    }

    /// Publishes a `connect` for a tunnel: AWS, Alibaba, then the native JSON.
    pub(super) fn publish_connect(&self, cp: &ControlPlane, t: &Tunnel, native: &str) {
        let (pk, dn) = (&t.product_key, &t.device_name);
        let token = cp.device_token(t);
        let thing = self.settings.thing_name(pk, dn);
        let aws = json!({
            "clientAccessToken": token,
            "clientMode": "destination",
            "region": AWS_REGION,
            "services": t.services,
        });
        self.publish(aws_topic(&thing), aws.to_string());
        let relay = &cp.settings.public_relay;
        let mut ali = json!({
            "operation": "connect",
            "tunnel_id": t.id,
            "host": relay.host,
            "port": relay.port.to_string(),
            "path": format!("/tunnel/{}/device", t.id),
            "token": token,
            "token_expire": t.expires_at.div_euclid(1000),
        });
        if let Some(info) = &t.custom_info {
            ali["udi"] = json!(info);
        }
        self.publish(alibaba_topic(pk, dn), ali.to_string());
        self.publish(notify_topic(pk, dn), native.to_string());
    }

    /// Publishes a `close`: Alibaba, then the native JSON (AWS has no close notification).
    pub(super) fn publish_close(
        &self,
        product_key: &str,
        device_name: &str,
        tunnel_id: &str,
        reason: CloseReason,
        native: &str,
    ) {
        let ali = json!({
            "operation": "close",
            "tunnel_id": tunnel_id,
            "close_reason": reason.as_str(),
        });
        self.publish(alibaba_topic(product_key, device_name), ali.to_string());
        self.publish(notify_topic(product_key, device_name), native.to_string());
    }

    /// Tells a deleted device's agent (native `{"operation":"device_deleted"}`, as the device
    /// channel closes with 4001) and clears its retained presence, so it no longer reads online.
    pub(super) fn publish_device_deleted(&self, product_key: &str, device_name: &str) {
        let note = json!({ "operation": "device_deleted" });
        self.publish(notify_topic(product_key, device_name), note.to_string());
        let presence = presence_topic(product_key, device_name);
        if let Err(e) =
            self.client
                .try_publish(presence.as_str(), QoS::AtLeastOnce, true, Vec::new())
        {
            tracing::warn!(topic = %presence, error = %e, "cannot clear a deleted device's presence");
        }
        self.online
            .remove(&(product_key.to_string(), device_name.to_string()));
    }

    /// Records a presence message; true when it said `online`.
    fn on_presence(&self, product_key: &str, device_name: &str, payload: &[u8]) -> Option<bool> {
        let key = (product_key.to_string(), device_name.to_string());
        match std::str::from_utf8(payload).map(str::trim) {
            Ok(ONLINE) => {
                self.online.insert(key, ());
                Some(true)
            }
            // An empty retained message clears the topic: the device is gone.
            Ok(OFFLINE) | Ok("") => {
                self.online.remove(&key);
                Some(false)
            }
            _ => None,
        }
    }
}

/// Publishes a native `connect` for each OPEN tunnel of a device that just came online.
async fn replay(cp: Arc<ControlPlane>, product_key: String, device_name: String) {
    let Some(mqtt) = cp.mqtt.clone() else { return };
    match cp
        .store
        .open_tunnels_of_device(product_key.clone(), device_name.clone())
        .await
    {
        Ok(open) => {
            for t in &open {
                mqtt.publish(
                    notify_topic(&product_key, &device_name),
                    cp.connect_notification(t),
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, %product_key, %device_name,
            "cannot replay open tunnels over MQTT"),
    }
}

/// Drives the broker connection until `shutdown`: subscribes to presence on every connect,
/// tracks presence, replays OPEN tunnels to devices that come online, and reconnects with
/// backoff. Errors are logged, never fatal.
pub async fn run(
    cp: Arc<ControlPlane>,
    mut eventloop: EventLoop,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(mqtt) = cp.mqtt.clone() else { return };
    let url = &mqtt.settings.url;
    let broker = format!("{}:{}", url.host, url.port);
    let mut backoff = Backoff::default();
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = shutdown.changed() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(%broker, "connected to the MQTT broker");
                mqtt.connected.store(true, Ordering::Relaxed);
                backoff.reset();
                if let Err(e) = mqtt.client.try_subscribe(PRESENCE_FILTER, QoS::AtLeastOnce) {
                    tracing::warn!(error = %e, "cannot subscribe to device presence");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if refused {
                    tracing::warn!(filter = PRESENCE_FILTER,
                        "the MQTT broker refused the presence subscription: devices on MQTT will show offline");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some((pk, dn)) = parse_presence_topic(&p.topic) else {
                    continue;
                };
                match mqtt.on_presence(pk, dn, &p.payload) {
                    Some(true) => {
                        tracing::info!(
                            product_key = pk,
                            device_name = dn,
                            "device online over MQTT"
                        );
                        tokio::spawn(replay(cp.clone(), pk.to_string(), dn.to_string()));
                    }
                    Some(false) => {
                        tracing::info!(
                            product_key = pk,
                            device_name = dn,
                            "device offline over MQTT"
                        )
                    }
                    None => tracing::debug!(topic = %p.topic, "ignored a presence message"),
                }
            }
            Ok(_) => {}
            Err(e) => {
                mqtt.connected.store(false, Ordering::Relaxed);
                let wait = backoff.next_wait();
                tracing::warn!(%broker, error = %e, retry_in_ms = wait.as_millis() as u64,
                    "MQTT broker unreachable; keeping the last known presence and retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
    }
    mqtt.connected.store(false, Ordering::Relaxed);
    let _ = mqtt.client.try_disconnect();
    // Let the disconnect (and queued notifications) go out, briefly.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert_eq!(notify_topic("pk", "d"), "iotunnel/pk/d/notify");
        assert_eq!(aws_topic("pk_d"), "$aws/things/pk_d/tunnels/notify");
        assert_eq!(alibaba_topic("pk", "d"), "/sys/pk/d/secure_tunnel/notify");
        assert_eq!(
            parse_presence_topic(&presence_topic("pk", "d")),
            Some(("pk", "d"))
        );
        for bad in [
            "iotunnel/pk/presence",
            "iotunnel/pk/d/notify",
            "x/pk/d/presence",
            "iotunnel//d/presence",
            "iotunnel/pk/d/presence/x",
        ] {
            assert_eq!(parse_presence_topic(bad), None, "{bad}");
        }
    }

    #[test]
    fn backoff_grows_to_the_cap() {
        let mut b = Backoff::default();
        let waits: Vec<_> = (0..10).map(|_| b.next_wait()).collect();
        assert!(waits[0] <= FIRST_BACKOFF);
        assert!(waits.iter().all(|w| *w <= MAX_BACKOFF));
        assert!(waits[9] >= MAX_BACKOFF / 2);
    }
}
