//! The device agent's MQTT mode (`iotunnel device --mqtt-url ...`): notifications come from
//! `iotunnel/{product_key}/{device_name}/notify` (QoS 1) instead of the device channel and feed
//! the same tunnel handling. The agent announces itself with a retained
//! `{"state": "online", "services": [...]}` on `iotunnel/{product_key}/{device_name}/presence`
//! on every (re)connect ([`crate::proto::device::Presence`]), and leaves a retained
//! `offline` there as its last will; the server reads that topic to know the device is online,
//! and answers each `online` with a `connect` for every OPEN tunnel of the device.
//!
//! The broker authenticates the device (user name, password, TLS) and should let it subscribe
//! to its own notify topic and publish to its own presence topic only. Network errors never end
//! the agent: it reconnects with jittered exponential backoff capped at 30 s.
use std::time::Duration;

use anyhow::bail;
use rumqttc::{AsyncClient, Event, LastWill, Packet, QoS, SubscribeReasonCode};

use super::device::{on_notification, MqttConn};
use super::tunnels::Tunnels;
use crate::mqtt::{connect_options, Backoff};
use crate::proto::device::{notify_topic, presence_topic, Presence, ServerMessage, OFFLINE};

/// Requests the agent queues for the broker (a subscribe and a presence per connect).
const REQUEST_QUEUE: usize = 64;

/// Takes notifications from the broker until aborted.
pub(super) async fn run(
    conn: &MqttConn,
    product_key: &str,
    device_name: &str,
    tunnels: &Tunnels,
) -> anyhow::Result<()> {
    let notify = notify_topic(product_key, device_name);
    let presence = presence_topic(product_key, device_name);
    // One client id per device: a second agent of the same device takes the session over,
    // as a newer device channel replaces the older one.
    let client_id = format!("iotunnel-{product_key}-{device_name}");
    let mut options = connect_options(
        &conn.url,
        &client_id,
        conn.username.as_deref(),
        conn.password.as_ref(),
        conn.ca_file.as_deref(),
    )?;
    options.set_clean_session(true).set_last_will(LastWill::new(
        &presence,
        OFFLINE,
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
    let broker = format!("{}:{}", conn.url.host, conn.url.port);
    let online = Presence::Online {
        services: Some(tunnels.local_services().0.keys().cloned().collect()),
    }
    .to_payload();
    let mut backoff = Backoff::default();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(%broker, product_key, device_name, "connected to the MQTT broker");
                backoff.reset();
                // Subscribe first: the server answers `online` with the OPEN tunnels, and the
                // broker handles this connection's packets in order.
                let subscribed = client.try_subscribe(&notify, QoS::AtLeastOnce);
                let announced =
                    client.try_publish(&presence, QoS::AtLeastOnce, true, online.as_str());
                if let Err(e) = subscribed.and(announced) {
                    tracing::warn!(error = %e, "cannot queue the MQTT subscription and presence");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    tracing::warn!(topic = %notify, "the MQTT broker refused the notification subscription (check its ACL)");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == notify => {
                match std::str::from_utf8(&p.payload) {
                    Ok(text) if is_device_deleted(text) => {
                        // As over the device channel (close 4001): the device is gone for good.
                        // Its presence was cleared by the server; leave without a last will.
                        let _ = client.try_disconnect();
                        let flush = async { while eventloop.poll().await.is_ok() {} };
                        let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
                        bail!("device deleted");
                    }
                    Ok(text) => on_notification(text, tunnels),
                    Err(_) => tracing::warn!("ignored a notification that is not UTF-8"),
                }
            }
            Ok(_) => {}
            Err(e) => {
                let wait = backoff.next_wait();
                tracing::warn!(%broker, error = %e, retry_in_ms = wait.as_millis() as u64,
                    "MQTT connection failed; reconnecting");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Whether a notification says the device was deleted.
fn is_device_deleted(text: &str) -> bool {
    matches!(
        serde_json::from_str::<ServerMessage>(text),
        Ok(ServerMessage::DeviceDeleted)
    )
}
