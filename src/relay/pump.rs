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
//!
//! Here: the shard's tunnels, taking a connection over and its reader. Each connection is a
//! [`super::peer::Peer`] (its queues are an [`super::outbox::Outbox`], drained by
//! [`super::writer`]); each tunnel a [`super::slot::Slot`], which forwards between its two
//! peers and checks and tracks each protocol family's streams and sessions.
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use monoio::io::{AsyncReadRent, OwnedReadHalf, Splitable};
use monoio::net::TcpStream;
use tokio::sync::Notify;

use super::outbox::{Ctl, Outbox};
use super::peer::{ping_clock_us, pinger, slot_of, Peer, Tls, QUEUE_FRAMES};
use super::slot::{forward_frame, Aliyun, Slot, Stop};
use super::stats::MeshDirection;
use super::tls::RECORD_OVERHEAD;
use super::upgrade::{Conn, Upgrade};
use super::ShardCtx;
use crate::proto::aws::{self, BoundaryTracker};
use crate::proto::ws::{self, close_code, FragmentTracker, OpCode};
use crate::seam::{ConnectionEventKind, Family, IndexedTunnel, RelayCommand};

/// Smallest read: what an idle peer's pending read holds.
const MIN_READ: usize = 1024;

/// A shard's tunnels.
pub struct Shard {
    ctx: Rc<ShardCtx>,
    tunnels: RefCell<HashMap<Arc<str>, Rc<Slot>>>,
    next_peer: Cell<u64>,
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
            .or_insert_with(|| Rc::new(Slot::new(tunnel.clone())))
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
            slot.side_left(&old);
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
        slot.side_left(&peer);
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
                                if let Err(stop) = slot.inspect_aws(
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
                                match slot.inspect_aliyun(&self.ctx, peer, &frame[hdr.header_len..])
                                {
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
