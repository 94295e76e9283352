//! The two protocol families as the peers speak them (PROTOCOLS.md): where a side dials, how a
//! session is opened inside a tunnel, how data is framed and how received frames are read.
//!
//! ```text
//! AWS V3     client: STREAM_START (stream 1, SSH, connection 1), CONNECTION_START 2..n
//!            data:   [u16 len][Message DATA stream 1, connection c] ... per WebSocket frame
//! Alibaba    client: session_create {frame_id i, service_type _SSH}
//!            device: common_response {session_id (the relay's), frame_id i, code 0}
//!            data:   [u16 len][JSON header data_transport, session_id][payload <= 4 KiB]
//! ```
//! With no relay in between (`--direct`) the device side assigns the Alibaba session ids itself,
//! the one job the relay does there.
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use iotunnel::proto::aliyun::{self, FrameHeader, FrameType};
use iotunnel::proto::aws::{self, MessageType};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::peers::Ws;

/// The AWS stream id of every session.
const STREAM_ID: i32 = 1;
/// How long one step of opening a session may take.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Which vendor protocol the peers speak.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// AWS IoT Secure Tunneling V3 (binary protobuf messages, 63 KiB payloads).
    Aws,
    /// Alibaba Cloud `aliyun.iot.securetunnel-v1.1` (JSON header + 4 KiB payload per frame).
    Aliyun,
}

/// Which end of a tunnel a peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The person's side (`source`).
    Client,
    /// The device's side (`destination` / `device`).
    Device,
}

impl Family {
    /// `aws` or `aliyun`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Aws => "aws",
            Family::Aliyun => "aliyun",
        }
    }

    /// The subprotocol offered in the upgrade.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Family::Aws => iotunnel::agent::dial::SUBPROTOCOL,
            Family::Aliyun => aliyun::SUBPROTOCOL,
        }
    }

    /// The header that carries the token.
    pub fn token_header(self) -> &'static str {
        match self {
            Family::Aws => "access-token",
            Family::Aliyun => aliyun::TOKEN_HEADER,
        }
    }

    /// The path a side dials on the relay.
    pub fn path(self, tunnel_id: &str, side: Side) -> String {
        match (self, side) {
            (Family::Aws, Side::Client) => "/tunnel?local-proxy-mode=source".into(),
            (Family::Aws, Side::Device) => "/tunnel?local-proxy-mode=destination".into(),
            (Family::Aliyun, Side::Client) => format!("/tunnel/{tunnel_id}/source"),
            (Family::Aliyun, Side::Device) => format!("/tunnel/{tunnel_id}/device"),
        }
    }

    /// The tunnel's service, named as the family's clients name it.
    pub fn service(self) -> &'static str {
        match self {
            Family::Aws => "SSH",
            Family::Aliyun => "_SSH",
        }
    }

    /// Largest data payload one WebSocket frame carries: two AWS messages (the frame limit is
    /// 131076 B), or one Alibaba frame.
    pub fn max_frame_payload(self) -> usize {
        match self {
            Family::Aws => 2 * aws::MAX_PAYLOAD,
            Family::Aliyun => aliyun::MAX_PAYLOAD_LEN,
        }
    }

    /// Whether the relay greets this family's peers with SERVICE_IDS.
    pub fn greets(self) -> bool {
        self == Family::Aws
    }
}

/// One logical connection inside a tunnel: an AWS V3 connection id or an Alibaba session id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Channel {
    /// AWS connection id on stream 1.
    Aws(u32),
    /// Alibaba session id.
    Aliyun(String),
}

/// A data frame carrying `payload` on `ch`: the fewest AWS messages that hold it, or one
/// Alibaba data_transport frame (`frame_id` is the sender's counter).
pub fn data_frame(ch: &Channel, payload: &[u8], frame_id: i64) -> anyhow::Result<Bytes> {
    let mut out = Vec::with_capacity(payload.len() + 128);
    match ch {
        Channel::Aws(conn) => {
            for chunk in payload.chunks(aws::MAX_PAYLOAD) {
                let m = aws::Message {
                    r#type: MessageType::Data as i32,
                    stream_id: STREAM_ID,
                    connection_id: *conn,
                    payload: Bytes::copy_from_slice(chunk),
                    ..aws::Message::default()
                };
                aws::encode_into(&m, &mut out)?;
            }
        }
        Channel::Aliyun(sid) => {
            let header = FrameHeader {
                frame_type: FrameType::DataTransport,
                session_id: Some(sid.clone()),
                frame_id,
                service_type: None,
            };
            aliyun::encode_frame_into(&header, payload, &mut out)?;
        }
    }
    Ok(Bytes::from(out))
}

/// What a received frame held.
#[derive(Debug)]
pub enum Event {
    /// Data on a channel.
    Data(Channel, Bytes),
    /// AWS: the client started a connection (STREAM_START or CONNECTION_START).
    Started,
    /// Alibaba, device side: a session_create (`session_id` set by the relay, absent direct).
    SessionCreate {
        /// The relay's session id.
        session_id: Option<String>,
        /// The client's frame id, echoed in the answer.
        frame_id: i64,
    },
    /// Alibaba, client side: the answer to a session_create.
    Response {
        /// The session id.
        session_id: Option<String>,
        /// 0 for success.
        code: i64,
        /// Why, for people.
        msg: String,
    },
    /// The other side or the relay ended a channel (STREAM_RESET, session_release, ...).
    Ended(String),
}

/// Reads events out of received WebSocket frames; AWS messages may straddle frames.
pub struct Inbox {
    family: Family,
    rest: BytesMut,
}

impl Inbox {
    /// An empty inbox for `family`.
    pub fn new(family: Family) -> Self {
        Self {
            family,
            rest: BytesMut::new(),
        }
    }

    /// Feeds one binary frame, calling `on` for every complete event in it.
    pub fn feed(&mut self, frame: Bytes, mut on: impl FnMut(Event)) -> anyhow::Result<()> {
        match self.family {
            Family::Aws => self.feed_aws(frame, &mut on),
            Family::Aliyun => feed_aliyun(frame, &mut on),
        }
    }

    fn feed_aws(&mut self, frame: Bytes, on: &mut impl FnMut(Event)) -> anyhow::Result<()> {
        let mut data = if self.rest.is_empty() {
            frame
        } else {
            self.rest.extend_from_slice(&frame);
            self.rest.split().freeze()
        };
        while data.len() >= aws::LENGTH_PREFIX {
            let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
            if data.len() < aws::LENGTH_PREFIX + len {
                break;
            }
            let m = aws::Message::decode(data.slice(aws::LENGTH_PREFIX..aws::LENGTH_PREFIX + len))?;
            let ch = Channel::Aws(m.connection_id.max(1));
            match MessageType::try_from(m.r#type) {
                Ok(MessageType::Data) => on(Event::Data(ch, m.payload)),
                Ok(MessageType::StreamStart | MessageType::ConnectionStart) => on(Event::Started),
                Ok(MessageType::ServiceIds) => {}
                Ok(other) => on(Event::Ended(format!("{other:?} (stream {})", m.stream_id))),
                Err(_) => bail!("unknown AWS message type {}", m.r#type),
            }
            data.advance(aws::LENGTH_PREFIX + len);
        }
        if !data.is_empty() {
            self.rest.extend_from_slice(&data);
        }
        Ok(())
    }
}

fn feed_aliyun(frame: Bytes, on: &mut impl FnMut(Event)) -> anyhow::Result<()> {
    let f = aliyun::parse_frame(&frame).context("bad Alibaba frame")?;
    let h = f.header;
    match h.frame_type {
        FrameType::DataTransport => {
            let sid = h
                .session_id
                .ok_or_else(|| anyhow!("data_transport without session_id"))?;
            // The payload is the frame's tail.
            let payload = frame.slice(frame.len() - f.payload.len()..);
            on(Event::Data(Channel::Aliyun(sid), payload));
        }
        FrameType::SessionCreate => on(Event::SessionCreate {
            session_id: h.session_id,
            frame_id: h.frame_id,
        }),
        FrameType::CommonResponse => {
            let r =
                aliyun::parse_response_payload(f.payload).context("bad common_response payload")?;
            on(Event::Response {
                session_id: h.session_id,
                code: r.code,
                msg: r.msg,
            })
        }
        FrameType::SessionRelease => on(Event::Ended(format!(
            "session_release of {:?}: {}",
            h.session_id,
            String::from_utf8_lossy(f.payload)
        ))),
    }
    Ok(())
}

/// Reads the next binary frame's events, skipping control frames; errors on a close, an end
/// or after [`SESSION_TIMEOUT`].
async fn next_events(ws: &mut Ws, inbox: &mut Inbox, what: &str) -> anyhow::Result<Vec<Event>> {
    loop {
        let msg = tokio::time::timeout(SESSION_TIMEOUT, ws.next())
            .await
            .map_err(|_| anyhow!("no {what} within {SESSION_TIMEOUT:?}"))?;
        match msg {
            Some(Ok(WsMessage::Binary(b))) => {
                let mut out = Vec::new();
                inbox.feed(b, |e| out.push(e))?;
                return Ok(out);
            }
            Some(Ok(WsMessage::Close(f))) => bail!(
                "closed while waiting for {what}: {}",
                crate::wire::describe_close(&f)
            ),
            Some(Ok(WsMessage::Text(_))) => bail!("a text frame while waiting for {what}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("read error while waiting for {what}: {e}"),
            None => bail!("the connection ended while waiting for {what}"),
        }
    }
}

/// Opens `n` channels from `client` to `device` (AWS connections on stream 1, or Alibaba
/// sessions) and returns them; both peers then hold the same channels.
pub async fn open_channels(
    family: Family,
    client: &mut Ws,
    device: &mut Ws,
    n: u32,
) -> anyhow::Result<Vec<Channel>> {
    let mut client_inbox = Inbox::new(family);
    let mut device_inbox = Inbox::new(family);
    match family {
        Family::Aws => {
            for conn in 1..=n {
                let m = aws::Message {
                    r#type: if conn == 1 {
                        MessageType::StreamStart
                    } else {
                        MessageType::ConnectionStart
                    } as i32,
                    stream_id: STREAM_ID,
                    service_id: family.service().into(),
                    connection_id: conn,
                    ..aws::Message::default()
                };
                // Each in a frame of its own (PROTOCOLS.md: localproxy's habit).
                let frame = Bytes::from(aws::encode_frame_payload(&m)?);
                client.feed(WsMessage::Binary(frame)).await?;
            }
            client.flush().await?;
            let mut started = 0;
            while started < n {
                for e in next_events(device, &mut device_inbox, "STREAM_START").await? {
                    match e {
                        Event::Started => started += 1,
                        other => bail!("device peer: expected STREAM_START, got {other:?}"),
                    }
                }
            }
            Ok((1..=n).map(Channel::Aws).collect())
        }
        Family::Aliyun => {
            let mut out = Vec::with_capacity(n as usize);
            for i in 1..=n {
                let create = FrameHeader {
                    frame_type: FrameType::SessionCreate,
                    session_id: None,
                    frame_id: i64::from(i),
                    service_type: Some(family.service().into()),
                };
                let frame = aliyun::encode_frame(&create, b"")?;
                client.send(WsMessage::Binary(frame.into())).await?;
                let (sid, frame_id) = loop {
                    let events = next_events(device, &mut device_inbox, "session_create").await?;
                    if let Some(Event::SessionCreate {
                        session_id,
                        frame_id,
                    }) = events.into_iter().next()
                    {
                        break (
                            session_id.unwrap_or_else(|| format!("direct-{i}")),
                            frame_id,
                        );
                    }
                };
                let answer = aliyun::common_response(
                    Some(&sid),
                    frame_id,
                    Some(family.service()),
                    aliyun::response_code::SUCCESS,
                    "ok",
                )?;
                device.send(WsMessage::Binary(answer.into())).await?;
                for e in next_events(client, &mut client_inbox, "common_response").await? {
                    match e {
                        Event::Response {
                            code: 0,
                            session_id,
                            ..
                        } if session_id.as_deref() == Some(sid.as_str()) => {}
                        Event::Response { code, msg, .. } => bail!(
                            "session_create {i} refused: code {code} {msg}{}",
                            if code == aliyun::response_code::SESSION_LIMIT {
                                " (the relay's --max-sessions-per-tunnel; use fewer --streams)"
                            } else {
                                ""
                            }
                        ),
                        other => bail!("client peer: expected common_response, got {other:?}"),
                    }
                }
                out.push(Channel::Aliyun(sid));
            }
            Ok(out)
        }
    }
}

/// `code reason` of a close frame, for messages.
pub fn describe_close(
    frame: &Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>,
) -> String {
    let frame = frame
        .as_ref()
        .map(|f| (u16::from(f.code), f.reason.to_string()));
    iotunnel::agent::dial::describe_close(&frame)
}

/// WebSocket limits for the load generator's relay connections: the AWS frame limit.
pub fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    const MAX_FRAME: usize = iotunnel::proto::ws::DEFAULT_MAX_PAYLOAD;
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_frame_size(Some(MAX_FRAME))
        .max_message_size(Some(4 * MAX_FRAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_of(family: Family, frames: &[Bytes]) -> (usize, Vec<Event>) {
        let mut inbox = Inbox::new(family);
        let mut events = Vec::new();
        for f in frames {
            inbox.feed(f.clone(), |e| events.push(e)).unwrap();
        }
        let bytes = events
            .iter()
            .map(|e| match e {
                Event::Data(_, p) => p.len(),
                _ => 0,
            })
            .sum();
        (bytes, events)
    }

    #[test]
    fn aws_frames_round_trip_even_split() {
        let payload = vec![7u8; 65_536];
        let f = data_frame(&Channel::Aws(3), &payload, 0).unwrap();
        assert!(f.len() <= 131_076);
        let (n, events) = data_of(Family::Aws, &[f.slice(..9), f.slice(9..)]);
        assert_eq!(n, 65_536);
        assert!(matches!(events[0], Event::Data(Channel::Aws(3), _)));
        assert_eq!(events.len(), 2, "64512 + 1024");
    }

    #[test]
    fn aliyun_frames_round_trip() {
        let ch = Channel::Aliyun("abc-1".into());
        let f = data_frame(&ch, b"hello", 9).unwrap();
        let (n, events) = data_of(Family::Aliyun, &[f]);
        assert_eq!(n, 5);
        match &events[0] {
            Event::Data(c, p) => {
                assert_eq!(c, &ch);
                assert_eq!(&p[..], b"hello");
            }
            other => panic!("{other:?}"),
        }
        assert!(data_frame(&ch, &[0; 4097], 1).is_err());
        let mut inbox = Inbox::new(Family::Aliyun);
        assert!(inbox.feed(Bytes::from_static(b"\x00"), |_| {}).is_err());
    }
}
