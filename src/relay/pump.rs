//! Pairing and pumping: both sides of a tunnel live on its owner shard, and each peer has a
//! reader (parses and checks its frames, forwards them) and a writer (drains its queues).
//!
//! Frames are forwarded frame for frame: a client frame is unmasked in place and its header is
//! rewritten, in the bytes of its own (4 bytes longer) masked header, as a server header; the
//! frame then goes to the other side as one contiguous buffer, with no payload copy in user
//! space beyond what TLS itself needs: with TLS, records are decrypted in the read buffer,
//! each payload written by the decryption right behind the frames before it (no copy in), and
//! frames are encrypted in the writer's buffer (the one copy out).
//!
//! Backpressure: each peer has a bounded queue of frames to write. A reader whose target queue
//! is full, or whose other side is absent, stops reading: nothing is ever dropped silently.
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use monoio::io::{AsyncReadRent, OwnedReadHalf, Splitable};
use monoio::net::TcpStream;
use tokio::sync::Notify;

use super::outbox::{Outbox, Refused};
use super::stats::MeshDirection;
use super::tls::RECORD_OVERHEAD;
use super::upgrade::{Conn, Upgrade};
use super::{sys, ShardCtx};
use crate::proto::aliyun::{self, FrameType};
use crate::proto::aws::{self, BoundaryTracker, MessageType, ProtocolVersion};
use crate::proto::ws::{self, close_code, FragmentTracker, OpCode};
use crate::seam::{ConnectionEventKind, Family, IndexedTunnel, RelayCommand, Side};

/// Frames queued for one peer before its senders stop reading: with 131 KiB frames at most,
/// a few MiB per direction.
const QUEUE_FRAMES: usize = 32;
/// How long a closing peer gets to take its close frame before its socket is shut.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Pings a peer may miss before it is dropped (issue 3).
const MISSED_PINGS: u32 = 3;
/// Smallest read: what an idle peer's pending read holds.
const MIN_READ: usize = 1024;

/// A peer's TLS session, shared by its reader (opens records) and writer (seals them).
pub(super) type Tls = Rc<RefCell<super::tls::ServerSession>>;
/// A frame queued for a writer, with when it was read (for the forwarding latency).
pub(super) type Queued = (Bytes, Option<Instant>);

fn slot_of(side: Side) -> usize {
    match side {
        Side::Device => 0,
        Side::Client => 1,
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::Device => Side::Client,
        Side::Client => Side::Device,
    }
}

/// Microseconds since the process's first ping: the payload of our pings.
fn ping_clock_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Something for a peer's writer besides forwarded frames; served first.
pub(super) enum Ctl {
    /// A whole frame of our own (pong, ping, SERVICE_IDS, relay answers).
    Frame(Vec<u8>),
    /// The TLS session has records to send (alerts, key updates).
    FlushTls,
    /// Send a close frame and end the connection.
    Close(u16, String),
}

/// One connection of one side.
pub(super) struct Peer {
    id: u64,
    side: Side,
    pub(super) fd: RawFd,
    family: Family,
    aws_version: Option<ProtocolVersion>,
    /// What its writer is to send.
    pub(super) outbox: Outbox,
    closing: Cell<bool>,
    end_reason: Cell<&'static str>,
    ending: Notify,
    last_pong: Cell<Instant>,
    srtt_us: Cell<Option<u64>>,
    /// Halves of the socket still alive; the fd stays open (and ours) while any is.
    pub(super) halves: Cell<u8>,
    /// Bytes read from the peer.
    bytes_sent: Cell<u64>,
    /// Bytes written to the peer.
    pub(super) bytes_received: Cell<u64>,
    /// The last frame forwarded from this peer ended inside a message (a WebSocket fragment or
    /// part of an AWS message): nothing may be injected after it.
    mid_message: Cell<bool>,
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

    fn send_ctl_frame(&self, frame: Vec<u8>) {
        self.outbox.push_ctl(Ctl::Frame(frame));
    }
}

#[derive(Default)]
struct AliyunSessions {
    next: u64,
    /// session id -> (creating frame id, service type, answered by the device)
    open: HashMap<String, (i64, Option<String>, bool)>,
}

/// A tunnel on its owner shard.
struct Slot {
    tunnel: Arc<IndexedTunnel>,
    peers: [RefCell<Option<Rc<Peer>>>; 2],
    arrived: [Notify; 2],
    /// AWS: service id -> open stream id (for STREAM_RESET when a side goes away).
    aws_streams: RefCell<HashMap<String, (i32, u32)>>,
    aliyun: RefCell<AliyunSessions>,
    /// Bytes forwarded by direction (client_to_device, device_to_client).
    bytes: [Cell<u64>; 2],
}

/// A shard's tunnels.
pub struct Shard {
    ctx: Rc<ShardCtx>,
    tunnels: RefCell<HashMap<Arc<str>, Rc<Slot>>>,
    next_peer: Cell<u64>,
}

/// What to do with an Alibaba frame.
enum Aliyun {
    /// Forward it unchanged.
    Forward,
    /// Forward this frame instead (session_create with the relay's session id).
    Rewritten(Vec<u8>),
    /// The relay answered it; forward nothing.
    Answered,
}

/// Why a reader stopped: the label reported, and the close frame to send if any.
struct Stop {
    label: &'static str,
    close: Option<(u16, String)>,
}

impl Stop {
    fn quiet(label: &'static str) -> Self {
        Self { label, close: None }
    }

    fn violation(code: u16, label: &'static str) -> Self {
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

impl Shard {
    /// The number of tunnels with a connected peer on this shard.
    pub fn tunnel_count(&self) -> usize {
        self.tunnels.borrow().len()
    }

    /// Statistics of up to `max` of this shard's tunnels (by tunnel id).
    pub fn per_tunnel_stats(&self, max: usize) -> Vec<super::stats::TunnelStats> {
        if max == 0 {
            return Vec::new();
        }
        let tunnels = self.tunnels.borrow();
        let mut ids: Vec<&Arc<str>> = tunnels.keys().collect();
        ids.sort();
        ids.into_iter()
            .take(max)
            .map(|id| {
                let slot = &tunnels[id];
                let peer = |i: usize| slot.peers[i].borrow().clone();
                super::stats::TunnelStats {
                    tunnel_id: id.to_string(),
                    bytes: slot.bytes.each_ref().map(Cell::get),
                    connected: [0, 1].map(|i| peer(i).is_some()),
                    srtt_us: [0, 1].map(|i| peer(i).and_then(|p| p.srtt_us.get())),
                }
            })
            .collect()
    }

    /// A shard with no tunnels.
    pub fn new(ctx: Rc<ShardCtx>) -> Self {
        Self {
            ctx,
            tunnels: RefCell::new(HashMap::new()),
            next_peer: Cell::new(1),
        }
    }

    fn slot_for(&self, tunnel: &Arc<IndexedTunnel>) -> Rc<Slot> {
        self.tunnels
            .borrow_mut()
            .entry(tunnel.tunnel_id.clone())
            .or_insert_with(|| {
                Rc::new(Slot {
                    tunnel: tunnel.clone(),
                    peers: Default::default(),
                    arrived: Default::default(),
                    aws_streams: RefCell::default(),
                    aliyun: RefCell::default(),
                    bytes: Default::default(),
                })
            })
            .clone()
    }

    /// Takes over an upgraded connection: pairs it, replacing an older one of its side.
    pub fn adopt(self: &Rc<Self>, conn: Conn, up: Upgrade) {
        let slot = self.slot_for(&up.tunnel);
        let Conn {
            stream,
            tls,
            buffered,
            peer: addr,
        } = conn;
        let fd = stream.as_raw_fd();
        let id = self.next_peer.replace(self.next_peer.get() + 1);
        let peer = Rc::new(Peer {
            id,
            side: up.side,
            fd,
            family: up.family,
            aws_version: up.aws_version,
            outbox: Outbox::new(QUEUE_FRAMES),
            closing: Cell::new(false),
            end_reason: Cell::new("peer_gone"),
            ending: Notify::new(),
            last_pong: Cell::new(Instant::now()),
            srtt_us: Cell::new(None),
            halves: Cell::new(2),
            bytes_sent: Cell::new(0),
            bytes_received: Cell::new(0),
            mid_message: Cell::new(false),
            via_mesh: up.via_mesh,
        });
        if up.via_mesh {
            self.ctx.stats.mesh_opened(MeshDirection::Inbound);
        }
        if up.aws_version.is_some_and(|v| v.has_service_ids()) {
            if let Ok(frame) = aws::server_frame(&aws::service_ids_message(&slot.tunnel.services)) {
                peer.send_ctl_frame(frame);
            }
        }
        let old = slot.peers[slot_of(up.side)].replace(Some(peer.clone()));
        if let Some(old) = old {
            old.end(
                close_code::NORMAL,
                "replaced by a newer connection",
                "replaced",
            );
            self.side_left(&slot, &old);
        }
        slot.arrived[slot_of(up.side)].notify_waiters();
        self.ctx.stats.connected(up.side, up.family);
        self.ctx.event(
            &slot.tunnel.tunnel_id,
            up.side,
            ConnectionEventKind::Connected {
                addr: addr.to_string(),
            },
        );
        tracing::debug!(tunnel_id = %slot.tunnel.tunnel_id, side = up.side.as_str(), %addr, "peer connected");

        let tls = tls.map(|b| Rc::new(RefCell::new(*b)));
        // The reader's buffer: the plaintext read past the request, then the ciphertext read
        // past the last whole record (STYLE rule 10: nothing read is lost in the hand-off).
        let mut buffered = buffered;
        let plain = buffered.len();
        if let Some(tls) = &tls {
            let tail = std::mem::take(&mut tls.borrow_mut().incoming);
            buffered.extend_from_slice(&tail);
        }
        let (read, write) = stream.into_split();
        monoio::spawn(super::writer::write_loop(
            peer.clone(),
            self.ctx.clone(),
            write,
            tls.clone(),
        ));
        monoio::spawn(pinger(peer.clone(), self.ctx.clone()));
        monoio::spawn(
            self.clone()
                .serve_reader(slot, peer, read, tls, (buffered, plain)),
        );
    }

    async fn serve_reader(
        self: Rc<Self>,
        slot: Rc<Slot>,
        peer: Rc<Peer>,
        read: OwnedReadHalf<TcpStream>,
        tls: Option<Tls>,
        buffered: (BytesMut, usize),
    ) {
        let stop = self.read_loop(&slot, &peer, read, tls, buffered).await;
        peer.halves.set(peer.halves.get() - 1);
        match &stop.close {
            Some((code, reason)) => peer.end(*code, reason, stop.label),
            None => peer.end(close_code::NORMAL, "", stop.label),
        }
        let label = peer.end_reason.get();
        let current = slot.peers[slot_of(peer.side)]
            .borrow()
            .as_ref()
            .is_some_and(|p| p.id == peer.id);
        self.ctx.stats.disconnected(peer.side, label);
        if peer.via_mesh {
            self.ctx.stats.mesh_closed(MeshDirection::Inbound);
        }
        if !current {
            // Replaced: the newer connection's state is what describe must show.
            tracing::debug!(tunnel_id = %slot.tunnel.tunnel_id, side = peer.side.as_str(), "replaced peer left");
            return;
        }
        slot.peers[slot_of(peer.side)].replace(None);
        self.side_left(&slot, &peer);
        self.report_traffic(&slot, &peer);
        self.ctx.event(
            &slot.tunnel.tunnel_id,
            peer.side,
            ConnectionEventKind::Disconnected {
                reason: label.to_string(),
            },
        );
        tracing::debug!(tunnel_id = %slot.tunnel.tunnel_id, side = peer.side.as_str(), reason = label, "peer disconnected");
        if slot.peers.iter().all(|p| p.borrow().is_none()) {
            self.tunnels.borrow_mut().remove(&slot.tunnel.tunnel_id);
        }
    }

    /// Tells the other side what the leaving side had open.
    fn side_left(&self, slot: &Slot, gone: &Peer) {
        let Some(other_peer) = slot.peers[slot_of(other(gone.side))].borrow().clone() else {
            slot.aws_streams.borrow_mut().clear();
            slot.aliyun.borrow_mut().open.clear();
            return;
        };
        if gone.mid_message.get() {
            // The other side is waiting for the rest of a message that will never come; a
            // reset injected now would be read as its bytes. End that connection instead: its
            // streams end with it, and it reconnects with the same token.
            slot.aws_streams.borrow_mut().clear();
            other_peer.end(close_code::GOING_AWAY, "peer left mid-message", "peer_gone");
            return;
        }
        match gone.family {
            Family::Aws => {
                for (service_id, (stream_id, connection_id)) in
                    slot.aws_streams.borrow_mut().drain()
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
                let mut sessions = slot.aliyun.borrow_mut();
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

    /// Executes a control-plane command for a tunnel of this shard.
    pub fn command(&self, cmd: RelayCommand) {
        match cmd {
            RelayCommand::CloseTunnel { tunnel_id, reason } => {
                let slot = self.tunnels.borrow().get(tunnel_id.as_str()).cloned();
                if let Some(slot) = slot {
                    for p in slot.peers.iter().filter_map(|p| p.borrow().clone()) {
                        p.end(
                            close_code::NORMAL,
                            &format!("tunnel {}", reason.as_str()),
                            reason.as_str(),
                        );
                    }
                }
            }
            RelayCommand::Evict { tunnel_id } => {
                let slot = self.tunnels.borrow().get(tunnel_id.as_str()).cloned();
                if let Some(slot) = slot {
                    for p in slot.peers.iter().filter_map(|p| p.borrow().clone()) {
                        p.end(
                            close_code::GOING_AWAY,
                            "tunnel moved to another relay node",
                            "moved",
                        );
                    }
                }
            }
            RelayCommand::DisconnectSide { tunnel_id, side } => {
                let slot = self.tunnels.borrow().get(tunnel_id.as_str()).cloned();
                if let Some(p) = slot.and_then(|s| s.peers[slot_of(side)].borrow().clone()) {
                    p.end(
                        close_code::POLICY_VIOLATION,
                        "access token rotated",
                        "rotated",
                    );
                }
            }
        }
    }

    /// Ends every connection (shutdown).
    pub fn close_all(&self, code: u16, reason: &str) {
        let slots: Vec<_> = self.tunnels.borrow().values().cloned().collect();
        for slot in slots {
            for p in slot.peers.iter().filter_map(|p| p.borrow().clone()) {
                p.end(code, reason, "shutdown");
            }
        }
    }

    async fn read_loop(
        &self,
        slot: &Rc<Slot>,
        peer: &Rc<Peer>,
        mut read: OwnedReadHalf<TcpStream>,
        tls: Option<Tls>,
        (mut buf, mut plain): (BytesMut, usize),
    ) -> Stop {
        let max = self.ctx.cfg.max_frame_payload;
        let mut fragments = FragmentTracker::new();
        let mut aws_tracker = BoundaryTracker::new();
        // Length of the last frame: the size of the next read when no header is buffered.
        let mut expect = MIN_READ;
        // The peer sent close_notify: the frames before it are still forwarded.
        let mut tls_closed = false;
        // `buf` holds plaintext frames (`..plain`), then, with TLS, ciphertext past the last
        // whole record.
        loop {
            // Bytes still missing from the frame whose header is buffered.
            let mut need = None;
            loop {
                let hdr = match ws::parse_client_header(&buf[..plain], max) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => return Stop::violation(e.close_code(), e.label()),
                };
                let frame_len = hdr.frame_len();
                expect = frame_len;
                if plain < frame_len {
                    need = Some(frame_len - plain);
                    break;
                }
                let mut frame = buf.split_to(frame_len);
                plain -= frame_len;
                peer.bytes_sent
                    .set(peer.bytes_sent.get() + frame_len as u64);
                if peer.via_mesh {
                    self.ctx.stats.mesh_bytes(MeshDirection::Inbound, frame_len);
                }
                ws::unmask(&mut frame[hdr.header_len..], hdr.mask);
                match hdr.opcode {
                    OpCode::Ping => match ws::pong_frame(&frame[hdr.header_len..]) {
                        Ok(pong) => peer.send_ctl_frame(pong),
                        Err(e) => return Stop::violation(e.close_code(), e.label()),
                    },
                    OpCode::Pong => self.on_pong(slot, peer, &frame[hdr.header_len..]),
                    OpCode::Close => {
                        return match ws::parse_close_payload(&frame[hdr.header_len..]) {
                            // RFC 6455 5.5.1: the answer echoes the code received.
                            Ok(Some(c)) => Stop {
                                label: "closed_by_peer",
                                close: Some((c.code, String::new())),
                            },
                            Ok(None) => Stop::quiet("closed_by_peer"),
                            Err(e) => Stop::violation(e.close_code(), e.label()),
                        };
                    }
                    _ => {
                        let message_op = match fragments.on_frame(&hdr) {
                            Ok(op) => op,
                            Err(e) => return Stop::violation(e.close_code(), e.label()),
                        };
                        if let Err(e) = ws::reject_text(message_op) {
                            return Stop::violation(e.close_code(), e.label());
                        }
                        let forward = match peer.family {
                            Family::Aws => {
                                if let Err(stop) = self.inspect_aws(
                                    slot,
                                    peer,
                                    &mut aws_tracker,
                                    &frame[hdr.header_len..],
                                ) {
                                    return stop;
                                }
                                true
                            }
                            Family::Aliyun => {
                                if !hdr.fin || hdr.opcode == OpCode::Continuation {
                                    return Stop::violation(
                                        close_code::PROTOCOL_ERROR,
                                        "aliyun_fragmented_frame",
                                    );
                                }
                                match self.inspect_aliyun(slot, peer, &frame[hdr.header_len..]) {
                                    Ok(Aliyun::Rewritten(rewritten)) => {
                                        if !forward_frame(
                                            slot,
                                            peer,
                                            Bytes::from(rewritten),
                                            &self.ctx.stats,
                                        )
                                        .await
                                        {
                                            return Stop::quiet(peer.end_reason.get());
                                        }
                                        false
                                    }
                                    Ok(Aliyun::Answered) => false,
                                    Ok(Aliyun::Forward) => true,
                                    Err(stop) => return stop,
                                }
                            }
                        };
                        if forward {
                            let start = match ws::write_header_before(
                                &mut frame,
                                hdr.header_len,
                                hdr.fin,
                                hdr.opcode,
                                hdr.payload_len,
                            ) {
                                Ok(start) => start,
                                Err(_) => {
                                    return Stop::violation(
                                        close_code::INTERNAL_ERROR,
                                        "header_rewrite",
                                    )
                                }
                            };
                            frame.advance(start);
                            if !forward_frame(slot, peer, frame.freeze(), &self.ctx.stats).await {
                                return Stop::quiet(peer.end_reason.get());
                            }
                            peer.mid_message.set(!hdr.fin || !aws_tracker.at_boundary());
                        }
                    }
                }
            }
            if peer.closing.get() {
                return Stop::quiet(peer.end_reason.get());
            }
            if tls_closed {
                return Stop::quiet("peer_gone");
            }
            // Read more.
            let mut want = need.unwrap_or(expect.max(MIN_READ));
            if tls.is_some() {
                // The ciphertext of `want` plaintext bytes, in records of up to 16 KiB, and
                // within a frame, of the rest of the record holding its end, less what is
                // buffered: so the partial frame still moves at most once.
                let records = want.div_ceil(super::tls::MAX_RECORD_PLAIN) * RECORD_OVERHEAD;
                let last = match need {
                    Some(_) => super::tls::MAX_RECORD.saturating_sub(buf.len() - plain),
                    None => 0,
                };
                want += records + last;
            }
            room_for(&mut buf, want);
            let len = buf.len();
            let (res, slice) = read
                .read(monoio::buf::IoBufMut::slice_mut(buf, len..len + want))
                .await;
            buf = slice.into_inner();
            let n = match res {
                Ok(0) | Err(_) => return Stop::quiet("peer_gone"),
                Ok(n) => n,
            };
            match &tls {
                None => plain += n,
                Some(tls) => {
                    let mut session = tls.borrow_mut();
                    // On an error the session holds its alert; the writer sends it.
                    let Ok(opened) = session.open_in_place(&mut buf, plain) else {
                        return Stop::quiet("tls_error");
                    };
                    plain = opened;
                    tls_closed = session.peer_closed();
                    if session.wants_write() {
                        peer.outbox.push_ctl(Ctl::FlushTls);
                    }
                }
            }
        }
    }

    fn report_traffic(&self, slot: &Slot, peer: &Peer) {
        let kind = ConnectionEventKind::Traffic {
            sent: peer.bytes_sent.get(),
            received: peer.bytes_received.get(),
        };
        self.ctx.event(&slot.tunnel.tunnel_id, peer.side, kind);
    }

    fn on_pong(&self, slot: &Slot, peer: &Peer, payload: &[u8]) {
        peer.last_pong.set(Instant::now());
        let Ok(sent) = <[u8; 8]>::try_from(payload) else {
            return;
        };
        let rtt = ping_clock_us().saturating_sub(u64::from_be_bytes(sent));
        // RFC 6298 smoothing: srtt = 7/8 srtt + 1/8 rtt.
        let srtt = peer.srtt_us.get().map_or(rtt, |s| (7 * s + rtt) / 8);
        self.ctx.stats.rtt(peer.side, Duration::from_micros(rtt));
        self.report_traffic(slot, peer);
        peer.srtt_us.set(Some(srtt));
        self.ctx.event(
            &slot.tunnel.tunnel_id,
            peer.side,
            ConnectionEventKind::Rtt {
                last_us: rtt,
                smoothed_us: srtt,
            },
        );
    }

    fn inspect_aws(
        &self,
        slot: &Slot,
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
            let kind = aws::check_message(header, from, version, &slot.tunnel.services)?;
            if header.payload_len > aws::MAX_PAYLOAD {
                return Err(Stop::violation(
                    close_code::MESSAGE_TOO_BIG,
                    "message_too_large",
                ));
            }
            let service = header.service_id().unwrap_or_default().to_string();
            match kind {
                MessageType::StreamStart => {
                    slot.aws_streams.borrow_mut().insert(
                        service,
                        (header.stream_id, header.effective_connection_id()),
                    );
                }
                MessageType::StreamReset => {
                    slot.aws_streams.borrow_mut().remove(&service);
                }
                _ => {}
            }
            Ok(())
        })
    }

    /// Checks an Alibaba frame and says what to do with it.
    fn inspect_aliyun(
        &self,
        slot: &Rc<Slot>,
        peer: &Rc<Peer>,
        payload: &[u8],
    ) -> Result<Aliyun, Stop> {
        let frame =
            aliyun::parse_frame(payload).map_err(|e| Stop::violation(e.close_code(), e.label()))?;
        let h = &frame.header;
        match (peer.side, h.frame_type) {
            (Side::Client, FrameType::SessionCreate) => {
                let mut sessions = slot.aliyun.borrow_mut();
                if sessions.open.len() >= self.ctx.cfg.max_sessions {
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
                    &slot.tunnel.tunnel_id[..8.min(slot.tunnel.tunnel_id.len())],
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
                    slot.clone(),
                    peer.clone(),
                    sid,
                    h.frame_id,
                    h.service_type.clone(),
                    self.ctx.cfg.session_create_timeout,
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
                    let mut sessions = slot.aliyun.borrow_mut();
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
                    slot.aliyun.borrow_mut().open.remove(sid);
                }
                Ok(Aliyun::Forward)
            }
            _ => Ok(Aliyun::Forward),
        }
    }
}

/// Makes room in `buf` for a read of `want` bytes. A partial frame moves at most once, into a
/// buffer sized to hold all of it, and an empty buffer much larger than needed is dropped, so
/// an idle peer's pending read holds only a small one.
fn room_for(buf: &mut BytesMut, want: usize) {
    let len = buf.len();
    let cap = buf.capacity();
    if cap - len >= want && !(len == 0 && cap > 2 * want) {
        return;
    }
    let mut fresh = BytesMut::with_capacity(len + want);
    fresh.extend_from_slice(buf);
    *buf = fresh;
}

/// Queues a relay-generated frame for `peer`. The caller can't wait, so when the queue is full
/// a task waits for room: the message is late, never lost (unless the peer goes away).
fn queue_frame(peer: &Rc<Peer>, frame: Bytes) {
    if let Err(Refused::Full(item)) = peer.outbox.try_push((frame, None)) {
        let peer = peer.clone();
        monoio::spawn(async move {
            let _ = peer.outbox.push(item).await;
        });
    }
}

/// Forwards a frame to the other side, waiting while it is absent or its queue is full.
/// Returns false when `me` is ending.
async fn forward_frame(
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

async fn pinger(peer: Rc<Peer>, ctx: Rc<ShardCtx>) {
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
