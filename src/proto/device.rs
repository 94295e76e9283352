//! What the server and the device agent say to each other, on the device channel and in its
//! MQTT form: message shapes, topic names and presence payloads. Both sides use this module,
//! so neither reaches into the other (STYLE.md 17); like the rest of `proto` it does no I/O.
//!
//! # Device channel (`GET /v1/device/connect`, one JSON object per WebSocket text message)
//!
//! Server to agent ([`ServerMessage`]):
//!
//! ```text
//!  {"operation": "connect", "tunnel_id", "token", "url", "endpoint", "custom_info",
//!   "services", "expires_at"}                  a tunnel to serve (replayed on every reconnect)
//!  {"operation": "close", "tunnel_id", "reason"} a tunnel closed: stop serving it
//!  {"operation": "device_deleted"}              MQTT only (the channel closes with 4001)
//! ```
//!
//! Agent to server ([`AgentMessage`]), sent right after the channel opens (and again whenever
//! the agent's services change):
//!
//! ```text
//!  {"operation": "services", "services": ["SSH", "HTTP"]}
//! ```
//!
//! The server then refuses (409 `unknown_service`) a tunnel for a service the agent does not
//! map. An agent that never reports (older versions) leaves its services unknown, and every
//! service is allowed; a server that does not know the message ignores it. Unknown operations
//! are ignored by both sides, so either can add messages without breaking the other.
//!
//! # MQTT
//!
//! - `iotunnel/{product_key}/{device_name}/notify`: the server's [`ServerMessage`]s, QoS 1.
//! - `iotunnel/{product_key}/{device_name}/presence`, retained: the agent's
//!   [`Presence::Online`] on every (re)connect, either the plain text `online` (older agents)
//!   or `{"state": "online", "services": [...]}`, and `offline` as its last will. An empty
//!   retained message (the server clears a deleted device's) reads as offline.
use serde::{Deserialize, Serialize};

/// Close code of a device channel replaced by a newer one (private-use range 4000-4999).
pub const CLOSE_REPLACED: u16 = 4000;
/// Close code of a device channel whose device was deleted.
pub const CLOSE_DEVICE_DELETED: u16 = 4001;

/// The topic filter of every device's presence (the server subscribes to it).
pub const PRESENCE_FILTER: &str = "iotunnel/+/+/presence";
/// Presence payload of a connected agent that does not report its services.
pub const ONLINE: &str = "online";
/// Presence payload of an agent that left (its retained last will).
pub const OFFLINE: &str = "offline";

/// The native notification topic of a device.
pub fn notify_topic(product_key: &str, device_name: &str) -> String {
    format!("iotunnel/{product_key}/{device_name}/notify")
}

/// The presence topic of a device.
pub fn presence_topic(product_key: &str, device_name: &str) -> String {
    format!("iotunnel/{product_key}/{device_name}/presence")
}

/// (product key, device name) of a presence topic.
pub fn parse_presence_topic(topic: &str) -> Option<(&str, &str)> {
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

/// A `connect` notification: a tunnel the device is to serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connect {
    /// The tunnel id.
    pub tunnel_id: String,
    /// The device token (never logged).
    #[serde(default)]
    pub token: Option<String>,
    /// `wss://{host:port}/tunnel/{tunnel_id}/device` (Alibaba-family agents).
    #[serde(default)]
    pub url: Option<String>,
    /// The relay's `host:port` (AWS-family agents); `url`'s scheme says ws or wss.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The operator's custom information.
    #[serde(default)]
    pub custom_info: Option<String>,
    /// The tunnel's services.
    #[serde(default)]
    pub services: Vec<String>,
    /// RFC 3339 time the tunnel expires.
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// A message from the server to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "operation", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Serve this tunnel.
    Connect(Connect),
    /// Stop serving this tunnel.
    Close {
        /// The tunnel id.
        tunnel_id: String,
        /// Why it closed (`closed`, `expired`, `device_deleted`).
        #[serde(default)]
        reason: Option<String>,
    },
    /// The device was deleted: the agent exits (MQTT; the channel closes with 4001 instead).
    DeviceDeleted,
    /// An operation this version does not know: ignored.
    #[serde(other)]
    Unknown,
}

impl ServerMessage {
    /// The JSON text sent on the channel or the notify topic.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A message from an agent to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "operation", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The services the agent maps to local addresses, by name.
    Services {
        /// Service names (`SSH`, `HTTP`, ...).
        services: Vec<String>,
    },
    /// An operation this version does not know: ignored.
    #[serde(other)]
    Unknown,
}

impl AgentMessage {
    /// The JSON text sent on the channel.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A presence message, as the server reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// The agent is connected; `services` is `None` when it does not report them.
    Online {
        /// The services it maps, when reported.
        services: Option<Vec<String>>,
    },
    /// The agent left, or the device was deleted (an empty retained message).
    Offline,
}

#[derive(Serialize, Deserialize)]
struct PresenceJson {
    state: String,
    #[serde(default)]
    services: Option<Vec<String>>,
}

impl Presence {
    /// Reads a presence payload; `None` when it is neither form.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(payload).ok()?.trim();
        match text {
            ONLINE => return Some(Self::Online { services: None }),
            OFFLINE | "" => return Some(Self::Offline),
            _ => {}
        }
        let json: PresenceJson = serde_json::from_str(text).ok()?;
        match json.state.as_str() {
            ONLINE => Some(Self::Online {
                services: json.services,
            }),
            OFFLINE => Some(Self::Offline),
            _ => None,
        }
    }

    /// The payload an agent publishes: JSON with its services when it has them.
    pub fn to_payload(&self) -> String {
        match self {
            Self::Online { services: None } => ONLINE.into(),
            Self::Online {
                services: Some(services),
            } => serde_json::to_string(&PresenceJson {
                state: ONLINE.into(),
                services: Some(services.clone()),
            })
            .unwrap_or_else(|_| ONLINE.into()),
            Self::Offline => OFFLINE.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert_eq!(notify_topic("pk", "d"), "iotunnel/pk/d/notify");
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
    fn server_messages_round_trip_and_tolerate_the_unknown() {
        let connect = ServerMessage::Connect(Connect {
            tunnel_id: "t1".into(),
            token: Some("tok".into()),
            url: Some("wss://h:1/tunnel/t1/device".into()),
            endpoint: Some("h:1".into()),
            custom_info: None,
            services: vec!["SSH".into()],
            expires_at: Some("2026-01-01T00:00:00Z".into()),
        });
        let text = connect.to_json();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["operation"], "connect");
        assert_eq!(v["services"][0], "SSH");
        assert_eq!(
            serde_json::from_str::<ServerMessage>(&text).unwrap(),
            connect
        );
        let close = r#"{"operation":"close","tunnel_id":"t1","reason":"expired"}"#;
        assert!(matches!(
            serde_json::from_str(close).unwrap(),
            ServerMessage::Close { reason: Some(r), .. } if r == "expired"
        ));
        let deleted: ServerMessage =
            serde_json::from_str(r#"{"operation":"device_deleted"}"#).unwrap();
        assert_eq!(deleted, ServerMessage::DeviceDeleted);
        let future: ServerMessage =
            serde_json::from_str(r#"{"operation":"reboot","x":1}"#).unwrap();
        assert_eq!(future, ServerMessage::Unknown);
        assert!(serde_json::from_str::<ServerMessage>(r#"{"tunnel_id":"t1"}"#).is_err());
    }

    #[test]
    fn agent_messages() {
        let m = AgentMessage::Services {
            services: vec!["SSH".into(), "HTTP".into()],
        };
        assert_eq!(
            m.to_json(),
            r#"{"operation":"services","services":["SSH","HTTP"]}"#
        );
        assert_eq!(
            serde_json::from_str::<AgentMessage>(&m.to_json()).unwrap(),
            m
        );
        let future: AgentMessage = serde_json::from_str(r#"{"operation":"stats"}"#).unwrap();
        assert_eq!(future, AgentMessage::Unknown);
    }

    #[test]
    fn presence_reads_both_forms() {
        assert_eq!(
            Presence::parse(b"online"),
            Some(Presence::Online { services: None })
        );
        assert_eq!(Presence::parse(b"offline"), Some(Presence::Offline));
        assert_eq!(Presence::parse(b""), Some(Presence::Offline));
        let online = Presence::Online {
            services: Some(vec!["SSH".into()]),
        };
        assert_eq!(
            Presence::parse(online.to_payload().as_bytes()),
            Some(online)
        );
        assert_eq!(
            Presence::parse(br#"{"state":"offline"}"#),
            Some(Presence::Offline)
        );
        for bad in [&b"maybe"[..], b"{\"state\":\"away\"}", b"\xff"] {
            assert_eq!(Presence::parse(bad), None);
        }
    }
}
