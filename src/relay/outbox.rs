//! A peer's outgoing queues, local to its shard: control frames (unbounded, written first) and
//! forwarded frames (bounded, so a fast sender waits for a slow receiver). Unlike a channel,
//! an empty queue holds no memory, so an idle peer costs little more than this struct.
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

/// A frame queued for a writer, with when it was read (for the forwarding latency).
pub(super) type Queued = (Bytes, Option<Instant>);

/// Something for a peer's writer besides forwarded frames; served first.
pub(super) enum Ctl {
    /// A whole frame of our own (pong, ping, SERVICE_IDS, relay answers).
    Frame(Vec<u8>),
    /// The TLS session has records to send (alerts, key updates).
    FlushTls,
    /// Send a close frame and end the connection.
    Close(u16, String),
}

/// Why a frame was not queued.
pub(super) enum Refused {
    /// The queue is full; the frame is given back.
    Full(Queued),
    /// The writer is gone; the frame is given back.
    Closed(Queued),
}

/// The queues between a shard's tasks and one peer's writer.
pub(super) struct Outbox {
    ctl: RefCell<VecDeque<Ctl>>,
    data: RefCell<VecDeque<Queued>>,
    cap: usize,
    closed: Cell<bool>,
    /// Wakes the writer (one waiter; a wake-up before it waits is kept).
    readable: Notify,
    /// Wakes senders waiting for room.
    writable: Notify,
}

impl Outbox {
    /// Empty queues holding at most `cap` forwarded frames.
    pub(super) fn new(cap: usize) -> Self {
        Self {
            ctl: RefCell::default(),
            data: RefCell::default(),
            cap,
            closed: Cell::new(false),
            readable: Notify::new(),
            writable: Notify::new(),
        }
    }

    /// Queues a control message (dropped once the writer is gone).
    pub(super) fn push_ctl(&self, c: Ctl) {
        if !self.closed.get() {
            self.ctl.borrow_mut().push_back(c);
            self.readable.notify_one();
        }
    }

    /// Queues a forwarded frame if there is room.
    pub(super) fn try_push(&self, item: Queued) -> Result<(), Refused> {
        if self.closed.get() {
            return Err(Refused::Closed(item));
        }
        let mut data = self.data.borrow_mut();
        if data.len() >= self.cap {
            return Err(Refused::Full(item));
        }
        data.push_back(item);
        self.readable.notify_one();
        Ok(())
    }

    /// Queues a forwarded frame, waiting for room; gives it back if the writer is gone.
    pub(super) async fn push(&self, mut item: Queued) -> Result<(), Queued> {
        loop {
            match self.try_push(item) {
                Ok(()) => return Ok(()),
                Err(Refused::Closed(back)) => return Err(back),
                Err(Refused::Full(back)) => item = back,
            }
            // Full: wait for a pop, registered before looking again so one in between is not
            // missed (the common, not-full case never touches the waiter list).
            let room = self.writable.notified();
            let mut room = std::pin::pin!(room);
            room.as_mut().enable();
            if self.closed.get() || self.data.borrow().len() < self.cap {
                continue;
            }
            room.await;
        }
    }

    /// Takes the next control message.
    pub(super) fn pop_ctl(&self) -> Option<Ctl> {
        self.ctl.borrow_mut().pop_front()
    }

    /// Takes the next forwarded frame, waking senders that wait for room.
    pub(super) fn pop_data(&self) -> Option<Queued> {
        let mut data = self.data.borrow_mut();
        let was_full = data.len() >= self.cap;
        let item = data.pop_front();
        if was_full {
            self.writable.notify_waiters();
        }
        item
    }

    /// Whether nothing is queued.
    pub(super) fn is_empty(&self) -> bool {
        self.ctl.borrow().is_empty() && self.data.borrow().is_empty()
    }

    /// Waits until something is queued.
    pub(super) async fn ready(&self) {
        while self.is_empty() {
            self.readable.notified().await;
        }
    }

    /// The writer is gone: what is queued is dropped, later frames are refused, and waiting
    /// senders get theirs back.
    pub(super) fn close(&self) {
        self.closed.set(true);
        self.ctl.take();
        self.data.take();
        self.writable.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(n: u8) -> Queued {
        (Bytes::from(vec![n]), None)
    }

    #[test]
    fn bounded_data_unbounded_ctl_and_close() {
        let o = Outbox::new(2);
        assert!(o.try_push(frame(1)).is_ok() && o.try_push(frame(2)).is_ok());
        assert!(matches!(o.try_push(frame(3)), Err(Refused::Full(_))));
        for _ in 0..100 {
            o.push_ctl(Ctl::FlushTls);
        }
        assert_eq!(o.pop_data().unwrap().0[0], 1);
        assert!(o.try_push(frame(3)).is_ok());
        o.close();
        assert!(o.pop_ctl().is_none() && o.pop_data().is_none());
        assert!(matches!(o.try_push(frame(4)), Err(Refused::Closed(_))));
    }

    #[test]
    fn a_waiting_sender_gets_room_or_its_frame_back() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let o = std::rc::Rc::new(Outbox::new(1));
            o.try_push(frame(1)).ok().unwrap();
            let local = tokio::task::LocalSet::new();
            local
                .run_until(async {
                    let waiting = tokio::task::spawn_local({
                        let o = o.clone();
                        async move { o.push(frame(2)).await.is_ok() }
                    });
                    tokio::task::yield_now().await;
                    assert!(
                        !waiting.is_finished(),
                        "the queue is full: the sender waits"
                    );
                    o.ready().await;
                    assert_eq!(o.pop_data().unwrap().0[0], 1);
                    assert!(waiting.await.unwrap(), "a pop makes room");
                    assert_eq!(o.pop_data().unwrap().0[0], 2);

                    o.try_push(frame(3)).ok().unwrap();
                    let refused = tokio::task::spawn_local({
                        let o = o.clone();
                        async move { o.push(frame(4)).await.err().map(|f| f.0[0]) }
                    });
                    tokio::task::yield_now().await;
                    o.close();
                    assert_eq!(
                        refused.await.unwrap(),
                        Some(4),
                        "close gives the frame back"
                    );
                })
                .await;
        });
    }
}
