//! The relay WebSocket as a stream of AWS messages: a writer task that puts each message in a
//! binary frame of its own (PROTOCOLS.md: localproxy drops what follows a control message in
//! one frame), writes everything queued before flushing once (STYLE.md 7) and pings; and the
//! reader's decoding of `[u16 length][Message]` across frame boundaries.
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::dial::Ws;
use crate::proto::aws::{self, Message, MessageType};

/// Our pings to the relay; localproxy pings every 20 s too (PROTOCOLS.md).
const PING_INTERVAL: Duration = Duration::from_secs(20);
/// Silence after which the relay connection counts as lost: three ping intervals.
pub(super) const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// What a session's writer sends.
pub(super) enum Out {
    /// One message, in a frame of its own.
    Message(Message),
    /// A close frame; the writer stops after it.
    Close,
}

/// Writes queued messages (all that are ready, then one flush) and pings. Returns true when
/// it sent a close frame on request, false when the connection failed.
pub(super) async fn write_loop(
    mut sink: SplitSink<Ws, WsMessage>,
    mut rx: mpsc::Receiver<Out>,
) -> bool {
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        tokio::select! {
            first = rx.recv() => {
                let mut next = first;
                while let Some(out) = next {
                    match out {
                        Out::Message(m) => {
                            let frame = match aws::encode_frame_payload(&m) {
                                Ok(f) => f,
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot encode a message");
                                    return false;
                                }
                            };
                            if sink.feed(WsMessage::Binary(frame.into())).await.is_err() {
                                return false;
                            }
                        }
                        Out::Close => {
                            let _ = sink.send(WsMessage::Close(None)).await;
                            return true;
                        }
                    }
                    next = rx.try_recv().ok();
                }
                if sink.flush().await.is_err() {
                    return false;
                }
            }
            _ = ping.tick() => {
                if sink.send(WsMessage::Ping(Bytes::new())).await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Takes the first complete `[u16 length][Message]` off `buf`; the payload is not copied.
pub(super) fn next_message(buf: &mut BytesMut) -> Result<Option<Message>, aws::StreamError> {
    let Some(&[high, low]) = buf.get(..aws::LENGTH_PREFIX) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([high, low]));
    if buf.len() < aws::LENGTH_PREFIX + len {
        return Ok(None);
    }
    buf.advance(aws::LENGTH_PREFIX);
    let message = Message::decode(buf.split_to(len).freeze())?;
    if message.payload.len() > aws::MAX_PAYLOAD {
        return Err(aws::StreamError::PayloadTooLarge(message.payload.len()));
    }
    Ok(Some(message))
}

/// A message of one stream connection.
pub(super) fn message(
    kind: MessageType,
    stream_id: i32,
    service_id: &str,
    connection_id: u32,
    payload: Bytes,
) -> Message {
    Message {
        r#type: kind as i32,
        stream_id,
        service_id: service_id.to_string(),
        connection_id,
        payload,
        ..Message::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_across_buffers() {
        let m = message(MessageType::Data, 3, "SSH", 2, Bytes::from_static(b"hello"));
        let mut stream = aws::encode_frame_payload(&m).unwrap();
        stream.extend(aws::encode_frame_payload(&m).unwrap());
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in stream {
            buf.extend_from_slice(&[byte]);
            while let Some(m) = next_message(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![m.clone(), m]);
        assert!(buf.is_empty());
    }
}
