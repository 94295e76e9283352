//! One connection of one side, on its tunnel's owner shard: what its reader, its writer and
//! its pinger share (its queues, its closing state, its counters), and how it ends.
use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use super::outbox::{Ctl, Outbox, Refused};
use super::{sys, ShardCtx};
use crate::proto::aws::ProtocolVersion;
use crate::proto::ws::{self, close_code};
use crate::seam::{Family, Side};

/// Frames queued for one peer before its senders stop reading: with 131 KiB frames at most,
/// a few MiB per direction.
pub(super) const QUEUE_FRAMES: usize = 32;
/// How long a closing peer gets to take its close frame before its socket is shut.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Pings a peer may miss before it is dropped (issue 3).
const MISSED_PINGS: u32 = 3;

/// A peer's TLS session, shared by its reader (opens records) and writer (seals them).
pub(super) type Tls = Rc<RefCell<super::tls::ServerSession>>;

/// The index of `side` in a tunnel's pair of peers.
pub(super) fn slot_of(side: Side) -> usize {
    match side {
        Side::Device => 0,
        Side::Client => 1,
    }
}

/// The side across from `side`.
pub(super) fn other(side: Side) -> Side {
    match side {
        Side::Device => Side::Client,
        Side::Client => Side::Device,
    }
}

/// Microseconds since the process's first ping: the payload of our pings.
pub(super) fn ping_clock_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// One connection of one side.
pub(super) struct Peer {
    pub(super) id: u64,
    pub(super) side: Side,
    pub(super) fd: RawFd,
    pub(super) family: Family,
    pub(super) aws_version: Option<ProtocolVersion>,
    /// What its writer is to send.
    pub(super) outbox: Outbox,
    pub(super) closing: Cell<bool>,
    pub(super) end_reason: Cell<&'static str>,
    pub(super) ending: Notify,
    pub(super) last_pong: Cell<Instant>,
    pub(super) srtt_us: Cell<Option<u64>>,
    /// Halves of the socket still alive; the fd stays open (and ours) while any is.
    pub(super) halves: Cell<u8>,
    /// Bytes read from the peer.
    pub(super) bytes_sent: Cell<u64>,
    /// Bytes written to the peer.
    pub(super) bytes_received: Cell<u64>,
    /// The last frame forwarded from this peer ended inside a message (a WebSocket fragment or
    /// part of an AWS message): nothing may be injected after it.
    pub(super) mid_message: Cell<bool>,
    /// The connection arrived over the mesh from another node (counted as inbound mesh).
    pub(super) via_mesh: bool,
}

impl Peer {
    /// Starts closing with a close frame; `label` is the disconnect reason reported.
    pub(super) fn end(self: &Rc<Self>, code: u16, reason: &str, label: &'static str) {
        if self.closing.replace(true) {
            return;
        }
        self.end_reason.set(label);
        self.outbox.push_ctl(Ctl::Close(code, reason.to_string()));
        self.ending.notify_waiters();
        // A frozen peer never takes its close frame: shut the socket after a grace period,
        // but only while a half still holds the fd open (a closed fd number may be reused).
        let me = self.clone();
        monoio::spawn(async move {
            monoio::time::sleep(CLOSE_GRACE).await;
            if me.halves.get() > 0 {
                sys::shutdown_both(me.fd);
            }
        });
    }

    pub(super) fn send_ctl_frame(&self, frame: Vec<u8>) {
        self.outbox.push_ctl(Ctl::Frame(frame));
    }
}

/// Queues a relay-generated frame for `peer`. The caller can't wait, so when the queue is full
/// a task waits for room: the message is late, never lost (unless the peer goes away).
pub(super) fn queue_frame(peer: &Rc<Peer>, frame: Bytes) {
    if let Err(Refused::Full(item)) = peer.outbox.try_push((frame, None)) {
        let peer = peer.clone();
        monoio::spawn(async move {
            let _ = peer.outbox.push(item).await;
        });
    }
}

pub(super) async fn pinger(peer: Rc<Peer>, ctx: Rc<ShardCtx>) {
    let interval = ctx.cfg.ping_interval;
    loop {
        monoio::time::sleep(interval).await;
        if peer.closing.get() {
            return;
        }
        if peer.last_pong.get().elapsed() >= interval * MISSED_PINGS {
            peer.end(close_code::GOING_AWAY, "ping timeout", "ping_timeout");
            return;
        }
        if let Ok(ping) = ws::ping_frame(&ping_clock_us().to_be_bytes()) {
            peer.send_ctl_frame(ping);
        }
    }
}
