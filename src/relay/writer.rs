//! A peer's writer: drains its control queue first, then forwarded frames, writes everything
//! queued at once (one TLS seal, straight into the write buffer, and one write per batch), and records forwarding latency.
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use monoio::io::{AsyncWriteRentExt, OwnedWriteHalf};
use monoio::net::TcpStream;

use super::outbox::Ctl;
use super::peer::{Peer, Tls};
use super::{sys, ShardCtx};
use crate::proto::ws::{self, close_code};

/// Encrypts `frames` (after the records the session has pending, and with a close_notify
/// after them when `closing`) into `out`: each frame's one copy is into `out`. False when the
/// session cannot send them (it failed: `out` holds its alert).
fn seal_all(tls: &Tls, frames: &[Bytes], closing: bool, out: &mut Vec<u8>) -> bool {
    let mut session = tls.borrow_mut();
    let plain: usize = frames.iter().map(Bytes::len).sum();
    out.reserve(
        plain
            + (plain / super::tls::MAX_RECORD_PLAIN + frames.len() + 1)
                * super::tls::RECORD_OVERHEAD,
    );
    session.flush(out);
    let ok = frames.iter().all(|f| session.seal(f, out).is_ok());
    if closing {
        session.close(out);
    }
    ok
}

/// Writes everything queued, then waits: control frames first, then forwarded frames.
pub(super) async fn write_loop(
    peer: Rc<Peer>,
    ctx: Rc<ShardCtx>,
    write: OwnedWriteHalf<TcpStream>,
    tls: Option<Tls>,
) {
    write_frames(&peer, &ctx, write, tls).await;
    peer.outbox.close();
    peer.halves.set(peer.halves.get() - 1);
}

/// Most forwarded frames written in one go.
const WRITE_BATCH: usize = 64;
/// Most forwarded bytes written in one go (bounds the TLS buffer a burst grows).
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// TLS buffer kept by an idle writer; a larger one is given back.
const KEEP_SEALED: usize = 64 * 1024;

async fn write_frames(
    peer: &Rc<Peer>,
    ctx: &ShardCtx,
    mut write: OwnedWriteHalf<TcpStream>,
    tls: Option<Tls>,
) {
    let outbox = &peer.outbox;
    let mut sealed: Vec<u8> = Vec::new();
    let mut frames: Vec<Bytes> = Vec::new();
    let mut read_at: Vec<Instant> = Vec::new();
    loop {
        frames.clear();
        read_at.clear();
        let mut closing = false;
        let mut take_ctl = |c: Ctl, frames: &mut Vec<Bytes>| match c {
            Ctl::Frame(f) => frames.push(Bytes::from(f)),
            Ctl::FlushTls => {}
            Ctl::Close(code, reason) => {
                frames.push(Bytes::from(ws::close_frame(code, &reason)));
                closing = true;
            }
        };
        if outbox.is_empty() && sealed.capacity() > KEEP_SEALED {
            // Going idle: give back the TLS buffer a burst grew.
            sealed = Vec::new();
        }
        outbox.ready().await;
        while let Some(c) = outbox.pop_ctl() {
            take_ctl(c, &mut frames);
        }
        let mut batch_bytes = 0;
        while frames.len() < WRITE_BATCH && batch_bytes < WRITE_BATCH_BYTES {
            let Some((f, at)) = outbox.pop_data() else {
                break;
            };
            batch_bytes += f.len();
            frames.push(f);
            read_at.extend(at);
        }
        if frames.is_empty() {
            // Only a TLS flush was asked for, and the session had nothing to send.
            if tls.as_ref().is_none_or(|t| !t.borrow().wants_write()) {
                continue;
            }
        }
        let written: u64 = frames.iter().map(|f| f.len() as u64).sum();
        let ok = match &tls {
            Some(tls) => {
                sealed.clear();
                let ok = seal_all(tls, &frames, closing, &mut sealed);
                // Even when sealing failed: what it holds is the session's alert.
                if !sealed.is_empty() {
                    let (res, buf) = write.write_all(std::mem::take(&mut sealed)).await;
                    sealed = buf;
                    ok && res.is_ok()
                } else {
                    ok
                }
            }
            None => {
                let mut ok = true;
                for f in frames.drain(..) {
                    let (res, _) = write.write_all(f).await;
                    if res.is_err() {
                        ok = false;
                        break;
                    }
                }
                ok
            }
        };
        if ok {
            peer.bytes_received.set(peer.bytes_received.get() + written);
            if peer.via_mesh {
                ctx.stats
                    .mesh_bytes(super::stats::MeshDirection::Inbound, written as usize);
            }
            for at in &read_at {
                ctx.stats.forward_latency(at.elapsed());
            }
        }
        if !ok || closing {
            sys::shutdown_both(peer.fd);
            if !ok {
                peer.end(close_code::GOING_AWAY, "", "write_failed");
            }
            return;
        }
    }
}
