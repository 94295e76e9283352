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
//! `{"state": "online", "services": [...]}` (older agents: the plain text `online`) on every
//! (re)connect and leave a retained `offline` as their last will
//! ([`crate::proto::device::Presence`]). A device is online when its channel is up or its last
//! presence message said online; the services it lists gate tunnel create as the device
//! channel's report does. Each `online`
//! message (also the retained ones delivered when the server (re)subscribes) makes the server
//! publish a native `connect` for every OPEN tunnel of the device, as the device channel does on
//! every reconnect, so a notification lost to an outage is not lost for good.
//!
//! While the broker is unreachable the server keeps the presence it last knew (a device that
//! left meanwhile shows online until the broker answers again and its retained `offline` comes
//! back), queues notifications up to [`crate::mqtt::REQUEST_QUEUE`], and reconnects with jittered
//! exponential backoff capped at 30 s. The API never waits for the broker.
//!
//! The broker authenticates devices and keeps each to its own topics (ACLs): the server trusts
//! whatever it reads on a presence topic. Tokens and passwords are never logged.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::json;
use tokio::sync::watch;

use super::ControlPlane;
use crate::config::MqttSettings;
use crate::mqtt::{connect_options, Backoff, REQUEST_QUEUE};
use crate::proto::device::{
    notify_topic, parse_presence_topic, presence_topic, Presence, ServerMessage, PRESENCE_FILTER,
};
use crate::seam::CloseReason;
use crate::store::Tunnel;

/// The `region` put into AWS notifications: iotunnel is no AWS region, so AWS-family agents
/// must be pointed at the relay's endpoint (e.g. localproxy `--proxy-endpoint`).
pub const AWS_REGION: &str = "iotunnel";

/// The AWS notification topic of a thing.
pub fn aws_topic(thing: &str) -> String {
    format!("$aws/things/{thing}/tunnels/notify")
}

/// The Alibaba notification topic of a device.
pub fn alibaba_topic(product_key: &str, device_name: &str) -> String {
    format!("/sys/{product_key}/{device_name}/secure_tunnel/notify")
}

type DeviceKey = (String, String);

/// The server's MQTT side: publishes notifications and knows which devices announced
/// themselves online.
pub struct MqttNotifier {
    client: AsyncClient,
    settings: MqttSettings,
    /// Devices whose last presence said online, with the services they reported (if any).
    online: DashMap<DeviceKey, Option<Vec<String>>>,
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

    /// The services a device online over MQTT reported in its presence; `None` when it is
    /// offline here or did not report them.
    pub fn services_of(&self, product_key: &str, device_name: &str) -> Option<Vec<String>> {
        self.online
            .get(&(product_key.to_string(), device_name.to_string()))
            .and_then(|s| s.clone())
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
        let note = ServerMessage::DeviceDeleted.to_json();
        self.publish(notify_topic(product_key, device_name), note);
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
        match Presence::parse(payload)? {
            Presence::Online { services } => {
                self.online.insert(key, services);
                Some(true)
            }
            Presence::Offline => {
                self.online.remove(&key);
                Some(false)
            }
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
    fn vendor_topics() {
        assert_eq!(aws_topic("pk_d"), "$aws/things/pk_d/tunnels/notify");
        assert_eq!(alibaba_topic("pk", "d"), "/sys/pk/d/secure_tunnel/notify");
    }
}
