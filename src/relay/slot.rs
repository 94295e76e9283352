//! A tunnel on its owner shard: its two sides, forwarding from one to the other, and what the
//! relay tracks of each protocol family's streams and sessions to check frames and to tell one
//! side what the other had open when it leaves.
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::peer::{other, queue_frame, slot_of, Peer};
use super::ShardCtx;
use crate::proto::aliyun::{self, FrameType};
use crate::proto::aws::{self, BoundaryTracker, MessageType, ProtocolVersion};
use crate::proto::ws::{self, close_code, OpCode};
use crate::seam::{Family, IndexedTunnel, Side};

/// A tunnel's open Alibaba-family sessions.
#[derive(Default)]
pub(super) struct AliyunSessions {
    pub(super) next: u64,
    /// session id -> (creating frame id, service type, answered by the device)
    pub(super) open: HashMap<String, (i64, Option<String>, bool)>,
}

/// A tunnel on its owner shard.
pub(super) struct Slot {
    pub(super) tunnel: Arc<IndexedTunnel>,
    pub(super) peers: [RefCell<Option<Rc<Peer>>>; 2],
    pub(super) arrived: [Notify; 2],
    /// AWS: service id -> open stream id (for STREAM_RESET when a side goes away).
    pub(super) aws_streams: RefCell<HashMap<String, (i32, u32)>>,
    pub(super) aliyun: RefCell<AliyunSessions>,
    /// Bytes forwarded by direction (client_to_device, device_to_client).
    pub(super) bytes: [Cell<u64>; 2],
}

/// What to do with an Alibaba frame.
pub(super) enum Aliyun {
    /// Forward it unchanged.
    Forward,
    /// Forward this frame instead (session_create with the relay's session id).
    Rewritten(Vec<u8>),
    /// The relay answered it; forward nothing.
    Answered,
}

/// Why a reader stopped: the label reported, and the close frame to send if any.
pub(super) struct Stop {
    pub(super) label: &'static str,
    pub(super) close: Option<(u16, String)>,
}

impl Stop {
    /// Stop without a close frame of ours (the peer left, or already closed).
    pub(super) fn quiet(label: &'static str) -> Self {
        Self { label, close: None }
    }

    /// Stop for a protocol violation: close with `code`, reason `label`.
    pub(super) fn violation(code: u16, label: &'static str) -> Self {
        Self {
            label: "protocol_error",
            close: Some((code, label.to_string())),
        }
    }
}

impl From<aws::StreamError> for Stop {
    fn from(e: aws::StreamError) -> Self {
        Stop::violation(e.close_code(), e.label())
    }
}

impl From<aws::Violation> for Stop {
    fn from(e: aws::Violation) -> Self {
        Stop::violation(e.close_code(), e.label())
    }
}

impl Slot {
    /// A tunnel with neither side connected yet.
    pub(super) fn new(tunnel: Arc<IndexedTunnel>) -> Self {
        Self {
            tunnel,
            peers: Default::default(),
            arrived: Default::default(),
            aws_streams: RefCell::default(),
            aliyun: RefCell::default(),
            bytes: Default::default(),
        }
    }

    /// Tells the other side what the leaving side had open.
    pub(super) fn side_left(&self, gone: &Peer) {
        let Some(other_peer) = self.peers[slot_of(other(gone.side))].borrow().clone() else {
            self.aws_streams.borrow_mut().clear();
            self.aliyun.borrow_mut().open.clear();
            return;
        };
        if gone.mid_message.get() {
            // The other side is waiting for the rest of a message that will never come; a
            // reset injected now would be read as its bytes. End that connection instead: its
            // streams end with it, and it reconnects with the same token.
            self.aws_streams.borrow_mut().clear();
            other_peer.end(close_code::GOING_AWAY, "peer left mid-message", "peer_gone");
            return;
        }
        match gone.family {
            Family::Aws => {
                for (service_id, (stream_id, connection_id)) in
                    self.aws_streams.borrow_mut().drain()
                {
                    let msg = aws::stream_reset_message(stream_id, &service_id, connection_id);
                    if let Ok(frame) = aws::server_frame(&msg) {
                        queue_frame(&other_peer, Bytes::from(frame));
                    }
                }
            }
            Family::Aliyun => {
                let code = match gone.side {
                    Side::Client => aliyun::release_code::CLIENT_DISCONNECTED,
                    Side::Device => aliyun::release_code::DEVICE_DISCONNECTED,
                };
                let mut sessions = self.aliyun.borrow_mut();
                for (sid, (frame_id, _, _)) in sessions.open.drain() {
                    if let Ok(f) =
                        aliyun::session_release(&sid, frame_id, code, "peer disconnected")
                    {
                        queue_frame(
                            &other_peer,
                            Bytes::from(ws::server_frame(true, OpCode::Binary, &f)),
                        );
                    }
                }
            }
        }
    }

    pub(super) fn inspect_aws(
        &self,
        peer: &Peer,
        tracker: &mut BoundaryTracker,
        payload: &[u8],
    ) -> Result<(), Stop> {
        let from = match peer.side {
            Side::Client => aws::Side::Source,
            Side::Device => aws::Side::Destination,
        };
        let version = peer.aws_version.unwrap_or(ProtocolVersion::V3);
        tracker.feed(payload, |_, header| {
            let kind = aws::check_message(header, from, version, &self.tunnel.services)?;
            if header.payload_len > aws::MAX_PAYLOAD {
                return Err(Stop::violation(
                    close_code::MESSAGE_TOO_BIG,
                    "message_too_large",
                ));
            }
            let service = header.service_id().unwrap_or_default().to_string();
            match kind {
                MessageType::StreamStart => {
                    self.aws_streams.borrow_mut().insert(
                        service,
                        (header.stream_id, header.effective_connection_id()),
                    );
                }
                MessageType::StreamReset => {
                    self.aws_streams.borrow_mut().remove(&service);
                }
                _ => {}
            }
            Ok(())
        })
    }

    /// Checks an Alibaba frame and says what to do with it.
    pub(super) fn inspect_aliyun(
        self: &Rc<Self>,
        ctx: &ShardCtx,
        peer: &Rc<Peer>,
        payload: &[u8],
    ) -> Result<Aliyun, Stop> {
        let frame =
            aliyun::parse_frame(payload).map_err(|e| Stop::violation(e.close_code(), e.label()))?;
        let h = &frame.header;
        match (peer.side, h.frame_type) {
            (Side::Client, FrameType::SessionCreate) => {
                let mut sessions = self.aliyun.borrow_mut();
                if sessions.open.len() >= ctx.cfg.max_sessions {
                    let answer = aliyun::common_response(
                        None,
                        h.frame_id,
                        h.service_type.as_deref(),
                        aliyun::response_code::SESSION_LIMIT,
                        "session limit reached",
                    );
                    if let Ok(answer) = answer {
                        peer.send_ctl_frame(ws::server_frame(true, OpCode::Binary, &answer));
                    }
                    return Ok(Aliyun::Answered);
                }
                sessions.next += 1;
                let sid = format!(
                    "{}-{}",
                    &self.tunnel.tunnel_id[..8.min(self.tunnel.tunnel_id.len())],
                    sessions.next
                );
                sessions
                    .open
                    .insert(sid.clone(), (h.frame_id, h.service_type.clone(), false));
                drop(sessions);
                let mut header = h.clone();
                header.session_id = Some(sid.clone());
                let rewritten = aliyun::server_frame(&header, frame.payload)
                    .map_err(|e| Stop::violation(e.close_code(), e.label()))?;
                monoio::spawn(session_timeout(
                    self.clone(),
                    peer.clone(),
                    sid,
                    h.frame_id,
                    h.service_type.clone(),
                    ctx.cfg.session_create_timeout,
                ));
                Ok(Aliyun::Rewritten(rewritten))
            }
            (Side::Device, FrameType::SessionCreate) => Err(Stop::violation(
                close_code::POLICY_VIOLATION,
                "session_create_from_device",
            )),
            (Side::Device, FrameType::CommonResponse) => {
                if let Some(sid) = &h.session_id {
                    let ok = aliyun::parse_response_payload(frame.payload)
                        .map(|r| r.code == aliyun::response_code::SUCCESS)
                        .unwrap_or(false);
                    let mut sessions = self.aliyun.borrow_mut();
                    if ok {
                        if let Some(s) = sessions.open.get_mut(sid) {
                            s.2 = true;
                        }
                    } else {
                        sessions.open.remove(sid);
                    }
                }
                Ok(Aliyun::Forward)
            }
            (_, FrameType::SessionRelease) => {
                if let Some(sid) = &h.session_id {
                    self.aliyun.borrow_mut().open.remove(sid);
                }
                Ok(Aliyun::Forward)
            }
            _ => Ok(Aliyun::Forward),
        }
    }
}

/// Forwards a frame to the other side, waiting while it is absent or its queue is full.
/// Returns false when `me` is ending.
pub(super) async fn forward_frame(
    slot: &Slot,
    me: &Rc<Peer>,
    frame: Bytes,
    stats: &super::stats::ShardStats,
) -> bool {
    let len = frame.len();
    let mut frame = (frame, stats.stamp());
    let target_slot = slot_of(other(me.side));
    loop {
        if me.closing.get() {
            return false;
        }
        let target = slot.peers[target_slot].borrow().clone();
        match target {
            Some(target) if !target.closing.get() => {
                let ending = me.ending.notified();
                monoio::select! {
                    sent = target.outbox.push(frame.clone()) => match sent {
                        Ok(()) => {
                            stats.forwarded(me.side, len);
                            let d = &slot.bytes[super::stats::direction(me.side)];
                            d.set(d.get() + len as u64);
                            return true;
                        }
                        Err(f) => frame = f,
                    },
                    _ = ending => return false,
                }
            }
            _ => {
                let arrived = slot.arrived[target_slot].notified();
                let ending = me.ending.notified();
                let mut arrived = std::pin::pin!(arrived);
                arrived.as_mut().enable();
                let present = slot.peers[target_slot]
                    .borrow()
                    .as_ref()
                    .is_some_and(|p| !p.closing.get());
                if present {
                    continue;
                }
                monoio::select! {
                    _ = arrived => {},
                    _ = ending => return false,
                }
            }
        }
    }
}

async fn session_timeout(
    slot: Rc<Slot>,
    client: Rc<Peer>,
    sid: String,
    frame_id: i64,
    service_type: Option<String>,
    after: Duration,
) {
    monoio::time::sleep(after).await;
    let unanswered = matches!(slot.aliyun.borrow().open.get(&sid), Some((_, _, false)));
    if unanswered && !client.closing.get() {
        slot.aliyun.borrow_mut().open.remove(&sid);
        if let Ok(answer) = aliyun::common_response(
            Some(&sid),
            frame_id,
            service_type.as_deref(),
            aliyun::response_code::TIMEOUT,
            "the device did not answer in time",
        ) {
            client.send_ctl_frame(ws::server_frame(true, OpCode::Binary, &answer));
        }
    }
}
