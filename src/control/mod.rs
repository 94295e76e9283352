//! The control plane: the HTTP API, the device channel and the lifecycle sweeper, around the
//! store. Every change to a tunnel goes through [`ControlPlane`], which keeps the store, the
//! tunnel index, the data plane and the device in step.
use std::sync::Arc;

use axum::http::StatusCode;
use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::clock::{rfc3339, Clock};
use crate::config::Settings;
use crate::proto::device::{self, ServerMessage};
use crate::seam::{CloseReason, RelayCommand, Side, TunnelIndex};
use crate::store::{Account, NewTunnel, Rotation, Store, Tunnel};
use crate::token;

pub mod access_keys;
pub mod acs;
pub mod aliyun;
pub mod api;
pub mod aws;
pub mod console;
pub mod device_channel;
pub mod error;
pub mod fleet;
pub mod keys;
pub mod lifecycle;
pub mod mqtt;
pub mod sigv4;
pub mod thing;
pub mod vendor;
pub mod views;

use device_channel::{ChannelMsg, DeviceChannels};
use error::ApiError;

/// What a tunnel create asks for, validated.
#[derive(Debug, Clone)]
pub struct TunnelSpec {
    /// The device's product.
    pub product_key: String,
    /// The device.
    pub device_name: String,
    /// Sent to the device.
    pub custom_info: Option<String>,
    /// For the operator.
    pub description: Option<String>,
    /// Services carried.
    pub services: Vec<String>,
    /// Lifetime in seconds.
    pub lifetime_seconds: u32,
    /// Refuse an offline device (native and Alibaba APIs); AWS opens tunnels to offline
    /// things, which learn of them when they connect (the device channel replays OPEN ones).
    pub require_online: bool,
}

/// A created tunnel and its client token (returned once, never stored).
#[derive(Debug)]
pub struct CreatedTunnel {
    /// The stored tunnel.
    pub tunnel: Tunnel,
    /// The client token in clear.
    pub client_token: String,
}

/// A notification for a device: sent on its channel and, with `--mqtt-url`, published to the
/// broker ([`mqtt`]).
#[derive(Debug, Clone, Copy)]
pub enum DeviceEvent<'a> {
    /// Connect to (or, after a rotate, reconnect to) an OPEN tunnel.
    Connect(&'a Tunnel),
    /// A tunnel closed.
    Close {
        /// The tunnel.
        tunnel_id: &'a str,
        /// Why.
        reason: CloseReason,
    },
}

/// Shared state of the control plane.
pub struct ControlPlane {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Validated settings.
    pub settings: Settings,
    /// The token index shared with the data plane.
    pub index: Arc<TunnelIndex>,
    /// Connected device channels.
    pub channels: DeviceChannels,
    /// The MQTT broker link, when `--mqtt-url` is set.
    pub mqtt: Option<Arc<mqtt::MqttNotifier>>,
    /// This node and the others sharing the store.
    pub fleet: fleet::Fleet,
    relay: mpsc::UnboundedSender<RelayCommand>,
    /// Key from which device tokens are derived; never leaves the process.
    token_key: [u8; 32],
    /// API keys in use, briefly trusted without asking the store.
    keys: keys::KeyCache,
    /// Seals access-key secrets; `None` on a fleet node without `--access-key-encryption-key`.
    access_keys: Option<Arc<access_keys::Sealer>>,
    /// `{access key id}:{nonce}` -> until when: Alibaba signatures already used.
    pub(crate) vendor_nonces: DashMap<String, i64>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Assembles the control plane.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        settings: Settings,
        index: Arc<TunnelIndex>,
        relay: mpsc::UnboundedSender<RelayCommand>,
        token_key: [u8; 32],
        fleet: fleet::Fleet,
    ) -> Self {
        Self {
            store,
            clock,
            settings,
            index,
            channels: DeviceChannels::default(),
            mqtt: None,
            fleet,
            relay,
            token_key,
            keys: keys::KeyCache::default(),
            access_keys: None,
            vendor_nonces: DashMap::new(),
        }
    }

    /// Adds the access-key sealer (before the control plane is shared).
    pub fn with_access_keys(mut self, sealer: access_keys::Sealer) -> Self {
        self.access_keys = Some(Arc::new(sealer));
        self
    }

    /// Adds the MQTT broker link (before the control plane is shared).
    pub fn with_mqtt(mut self, mqtt: Arc<mqtt::MqttNotifier>) -> Self {
        self.mqtt = Some(mqtt);
        self
    }

    /// Whether the device is online: its channel is up here, or on a live node of the fleet,
    /// or it announced itself over MQTT.
    pub async fn is_online(&self, product_key: &str, device_name: &str) -> bool {
        if self.is_online_here(product_key, device_name) {
            return true;
        }
        if !self.fleet.shared {
            return false;
        }
        match self
            .store
            .device_channel_node(product_key.into(), device_name.into())
            .await
        {
            Ok(Some(node)) => self.node_is_live(&node),
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read device presence");
                false
            }
        }
    }

    /// Whether the device's channel is up on this node, or it is online over MQTT.
    pub fn is_online_here(&self, product_key: &str, device_name: &str) -> bool {
        self.channels.is_online(product_key, device_name)
            || self
                .mqtt
                .as_ref()
                .is_some_and(|m| m.is_online(product_key, device_name))
    }

    /// Whether a node of the fleet is live now.
    pub fn node_is_live(&self, node_id: &str) -> bool {
        let dead_after = self.settings.node_dead_after_ms as i64;
        self.fleet
            .node_is_live(node_id, self.clock.now_ms(), dead_after)
    }

    /// Notifies a device: on its channel, wherever in the fleet it is connected, and on the
    /// MQTT broker if configured.
    pub async fn notify(&self, product_key: &str, device_name: &str, event: DeviceEvent<'_>) {
        let native = match event {
            DeviceEvent::Connect(t) => self.connect_notification(t),
            DeviceEvent::Close { tunnel_id, reason } => Self::close_notification(tunnel_id, reason),
        };
        if let Some(m) = &self.mqtt {
            match event {
                DeviceEvent::Connect(t) => m.publish_connect(self, t, &native),
                DeviceEvent::Close { tunnel_id, reason } => {
                    m.publish_close(product_key, device_name, tunnel_id, reason, &native)
                }
            }
        }
        let tunnel_id = match event {
            DeviceEvent::Connect(t) => Some(t.id.as_str()),
            DeviceEvent::Close { .. } => None,
        };
        self.send_to_channel(product_key, device_name, Some(native), tunnel_id)
            .await;
    }

    /// Queues a message (`None`: "deleted") for the device's channel, here or on the node that
    /// holds it. A `connect` too large for the bus (custom info of up to 4 KiB, escaped twice)
    /// travels as its tunnel id, and the node holding the channel builds it from the store.
    async fn send_to_channel(
        &self,
        product_key: &str,
        device_name: &str,
        text: Option<String>,
        connect_of: Option<&str>,
    ) {
        if self.channels.is_online(product_key, device_name) || !self.fleet.shared {
            let msg = text.map_or(ChannelMsg::DeviceDeleted, ChannelMsg::Text);
            self.channels.send(product_key, device_name, msg);
            return;
        }
        let (product_key, device_name) = (product_key.to_string(), device_name.to_string());
        let too_big = text
            .as_ref()
            .is_some_and(|t| t.len() > fleet::MAX_INLINE_TEXT);
        let msg = match connect_of {
            Some(tunnel_id) if too_big => fleet::FleetMsg::DeviceConnect {
                product_key,
                device_name,
                tunnel_id: tunnel_id.into(),
            },
            _ => fleet::FleetMsg::Device {
                product_key,
                device_name,
                text,
            },
        };
        self.publish(msg).await;
    }

    /// The account an API key belongs to.
    pub async fn authenticate(&self, api_key: &str) -> Result<Account, ApiError> {
        self.authenticate_key(api_key).await.map(|c| c.account)
    }

    /// The relay URL a side dials for a tunnel: its owner's relay (Alibaba-style path;
    /// AWS-family peers use the endpoint with `/tunnel?local-proxy-mode=`).
    pub fn side_url(&self, t: &Tunnel, side: Side) -> String {
        let path = match side {
            Side::Client => "source",
            Side::Device => "device",
        };
        let (scheme, endpoint) = self.relay_base(t);
        format!("{scheme}://{endpoint}/tunnel/{}/{path}", t.id)
    }

    /// The public `host:port` of the relay owning a tunnel.
    pub fn relay_endpoint(&self, t: &Tunnel) -> String {
        self.relay_base(t).1
    }

    fn relay_base(&self, t: &Tunnel) -> (String, String) {
        self.fleet
            .relay_of(t.owner_node.as_deref())
            .unwrap_or_else(|| {
                (
                    self.settings.public_relay_scheme.to_string(),
                    self.settings.public_relay.host_port(),
                )
            })
    }

    /// The device token of a tunnel, derived again from its seed.
    fn device_token(&self, t: &Tunnel) -> String {
        token::derive_device_token(&self.token_key, &t.id, &t.device_token_seed)
    }

    /// The `connect` notification for a tunnel, as sent on the device channel.
    pub fn connect_notification(&self, t: &Tunnel) -> String {
        ServerMessage::Connect(device::Connect {
            tunnel_id: t.id.clone(),
            token: Some(self.device_token(t)),
            url: Some(self.side_url(t, Side::Device)),
            endpoint: Some(self.relay_endpoint(t)),
            custom_info: t.custom_info.clone(),
            services: t.services.clone(),
            expires_at: Some(rfc3339(t.expires_at)),
        })
        .to_json()
    }

    fn close_notification(tunnel_id: &str, reason: CloseReason) -> String {
        ServerMessage::Close {
            tunnel_id: tunnel_id.to_string(),
            reason: Some(reason.as_str().to_string()),
        }
        .to_json()
    }

    /// The services the device's agent reported (on its channel here or in its MQTT
    /// presence); `None` while unknown (no report yet, an older agent, or a channel on another
    /// node of the fleet).
    pub fn known_services(&self, product_key: &str, device_name: &str) -> Option<Vec<String>> {
        self.channels
            .services_of(product_key, device_name)
            .or_else(|| {
                self.mqtt
                    .as_ref()
                    .and_then(|m| m.services_of(product_key, device_name))
            })
    }

    /// Creates a tunnel for an online device of the caller's account and notifies the device.
    pub async fn create_tunnel(
        &self,
        account: &Account,
        spec: TunnelSpec,
    ) -> Result<CreatedTunnel, ApiError> {
        let device = self
            .store
            .get_device(spec.product_key.clone(), spec.device_name.clone())
            .await?
            .filter(|d| d.account_id == account.id)
            .ok_or_else(|| ApiError::not_found("device"))?;
        if self
            .store
            .device_tunnels_disabled(device.product_key.clone(), device.name.clone())
            .await?
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "device_tunnels_disabled",
                "the device's tunnel switch is off: no new tunnels until it is enabled",
            ));
        }
        if spec.require_online && !self.is_online(&device.product_key, &device.name).await {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "device_offline",
                "the device is offline: it must be connected on the device channel or \
                 announce itself online over MQTT",
            ));
        }
        if let Some(known) = self.known_services(&device.product_key, &device.name) {
            if let Some(missing) = spec.services.iter().find(|s| !known.contains(s)) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "unknown_service",
                    format!(
                        "the device's agent does not serve {missing:?} (it serves {}): start it \
                         with --service {missing}=HOST:PORT, or ask for one of its services",
                        known.join(", ")
                    ),
                ));
            }
        }
        let now = self.clock.now_ms();
        let client_token = token::random_secret();
        let seed = token::random_bytes::<32>();
        let id = token::new_tunnel_id();
        let device_token = token::derive_device_token(&self.token_key, &id, &seed);
        let tunnel = self
            .store
            .create_tunnel(NewTunnel {
                id,
                account_id: account.id.clone(),
                product_key: spec.product_key,
                device_name: spec.device_name,
                custom_info: spec.custom_info,
                description: spec.description,
                services: spec.services,
                created_at: now,
                expires_at: now + i64::from(spec.lifetime_seconds) * 1000,
                client_token_hash: token::hash_secret(&client_token),
                device_token_hash: token::hash_secret(&device_token),
                device_token_seed: seed,
                max_open_per_device: self.settings.max_open_tunnels_per_device,
                owner_node: Some(self.fleet.place(
                    now,
                    self.settings.node_dead_after_ms as i64,
                    |node| {
                        if node == self.fleet.node_id {
                            self.index.owned_here()
                        } else {
                            self.index.owned_by(node)
                        }
                    },
                )),
            })
            .await
            .map_err(|e| ApiError::from_store(e, "device"))?;
        self.open_everywhere(&tunnel).await;
        tracing::info!(tunnel_id = %tunnel.id, product_key = %tunnel.product_key,
            device_name = %tunnel.device_name, "tunnel created");
        Ok(CreatedTunnel {
            tunnel,
            client_token,
        })
    }

    /// Puts an OPEN tunnel's tokens into the index, with its owner unless that is this node.
    pub fn index_tunnel(&self, t: &Tunnel) {
        self.index_entry(&fleet::IndexEntry::of(t));
    }

    /// Closes an OPEN tunnel of the account.
    pub async fn close_tunnel(
        &self,
        account_id: &str,
        tunnel_id: &str,
    ) -> Result<Tunnel, ApiError> {
        let t = self
            .store
            .close_tunnel(
                account_id.into(),
                tunnel_id.into(),
                CloseReason::Closed,
                self.clock.now_ms(),
            )
            .await
            .map_err(|e| ApiError::from_store(e, "tunnel"))?;
        self.after_close(&t, CloseReason::Closed).await;
        Ok(t)
    }

    /// Tells the index, the data plane (the owner's, wherever it is) and the device that a
    /// tunnel closed.
    pub async fn after_close(&self, t: &Tunnel, reason: CloseReason) {
        self.index.close(&t.id);
        let _ = self.relay.send(RelayCommand::CloseTunnel {
            tunnel_id: t.id.clone(),
            reason,
        });
        self.publish(fleet::FleetMsg::Close {
            tunnel_id: t.id.clone(),
            reason: reason.as_str().into(),
        })
        .await;
        self.notify(
            &t.product_key,
            &t.device_name,
            DeviceEvent::Close {
                tunnel_id: &t.id,
                reason,
            },
        )
        .await;
        tracing::info!(tunnel_id = %t.id, reason = reason.as_str(), "tunnel closed");
    }

    /// Deletes a CLOSED tunnel of the account.
    pub async fn delete_tunnel(&self, account_id: &str, tunnel_id: &str) -> Result<(), ApiError> {
        self.store
            .delete_tunnel(account_id.into(), tunnel_id.into())
            .await
            .map_err(|e| ApiError::from_store(e, "tunnel"))?;
        self.index.remove(tunnel_id);
        self.publish(fleet::FleetMsg::Delete {
            tunnel_id: tunnel_id.into(),
        })
        .await;
        tracing::info!(%tunnel_id, "tunnel deleted");
        Ok(())
    }

    /// Issues new tokens for `sides` of an OPEN tunnel, disconnecting the rotated sides and
    /// notifying the device of its new token. Returns the new tokens in clear.
    pub async fn rotate(
        &self,
        account_id: &str,
        tunnel_id: &str,
        sides: &[Side],
    ) -> Result<(Option<String>, Option<String>), ApiError> {
        let client_token = sides.contains(&Side::Client).then(token::random_secret);
        let seed = sides
            .contains(&Side::Device)
            .then(token::random_bytes::<32>);
        let device_token = seed.map(|s| token::derive_device_token(&self.token_key, tunnel_id, &s));
        let rotation = Rotation {
            client_token_hash: client_token.as_deref().map(token::hash_secret),
            device_token: device_token.as_deref().map(token::hash_secret).zip(seed),
        };
        let t = self
            .store
            .rotate_tokens(account_id.into(), tunnel_id.into(), rotation)
            .await
            .map_err(|e| ApiError::from_store(e, "tunnel"))?;
        for &side in sides {
            let hash = match side {
                Side::Client => t.client_token_hash,
                Side::Device => t.device_token_hash,
            };
            if !self.index.rotate(&t.id, side, hash) {
                self.index_tunnel(&t);
            }
            let _ = self.relay.send(RelayCommand::DisconnectSide {
                tunnel_id: t.id.clone(),
                side,
            });
            self.publish(fleet::FleetMsg::Rotate {
                tunnel_id: t.id.clone(),
                side,
                hash: hex::encode(hash),
            })
            .await;
        }
        if device_token.is_some() {
            self.notify(&t.product_key, &t.device_name, DeviceEvent::Connect(&t))
                .await;
        }
        tracing::info!(%tunnel_id, sides = ?sides, "tunnel tokens rotated");
        Ok((client_token, device_token))
    }

    /// Deletes a device of the account, closing its tunnels and its channel.
    pub async fn delete_device(
        &self,
        account_id: &str,
        product_key: &str,
        device_name: &str,
    ) -> Result<(), ApiError> {
        let closed = self
            .store
            .delete_device(
                account_id.into(),
                product_key.into(),
                device_name.into(),
                self.clock.now_ms(),
            )
            .await
            .map_err(|e| ApiError::from_store(e, "device"))?;
        for t in &closed {
            self.after_close(t, CloseReason::DeviceDeleted).await;
        }
        self.send_to_channel(product_key, device_name, None, None)
            .await;
        if let Some(mqtt) = &self.mqtt {
            mqtt.publish_device_deleted(product_key, device_name);
        }
        tracing::info!(%product_key, %device_name, tunnels_closed = closed.len(), "device deleted");
        Ok(())
    }
}
