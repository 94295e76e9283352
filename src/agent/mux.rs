//! AWS V3 multiplexing over one relay WebSocket, for both ends: the client (source) and the
//! device agent (destination). One [`Session`] per relay connection; each local TCP connection
//! (or stdin/stdout) is one connection id on its service's stream.
//!
//! ```text
//!  source                                            destination
//!  1st connection of a service:  STREAM_START(s, svc, 1) -->  connect to svc's local address
//!  more connections:         CONNECTION_START(s, svc, c) -->  connect again
//!  DATA(s, svc, c) <------------------------------------------> DATA(s, svc, c)  (<= 63 KiB each)
//!  local EOF/error:           CONNECTION_RESET(s, svc, c) <-->  close that connection only
//!  source's last connection of a stream ends: STREAM_RESET(s) -->  the stream is gone
//!  refused local connect:                                <--  CONNECTION_RESET(s, svc, c)
//! ```
//!
//! A stream belongs to the source that started it: only the source ends a stream (when its
//! last connection ends), so a connection it starts never races a stream the destination just
//! dropped. STREAM_RESET from the relay (the other side went away) and SESSION_RESET end the
//! named stream or all of them. Stream ids increase across reconnects of one client, so a
//! late DATA message of an old stream never lands in a new connection.
//!
//! The WebSocket itself is [`super::wire`]: each message in a frame of its own, written by one
//! writer task. The protocol has no flow control per connection: a local socket that does not
//! read stalls its tunnel's reader, never other tunnels.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::SplitStream;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::dial::{Connected, SessionEnd, Ws};
use super::wire::{message, next_message, write_loop, Out, IDLE_LIMIT};
use crate::proto::aws::{self, Message, MessageType, Side};

/// Bytes read from a local connection per DATA message: the AWS payload limit, 63 KiB.
pub const MAX_DATA: usize = aws::MAX_PAYLOAD;
/// Messages queued for the relay before local readers wait: about 2 MiB of DATA.
const OUT_QUEUE: usize = 32;
/// Payloads queued for one local connection before the session's reader waits (about 1 MiB).
const CONN_QUEUE: usize = 16;
/// How long a destination waits for a local service to accept a connection.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The local services a destination serves: service id -> `host:port`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalServices(pub BTreeMap<String, String>);

impl LocalServices {
    /// The address for `service_id`; an empty id (V1-style peers) means the only service.
    pub fn resolve(&self, service_id: &str) -> Option<&str> {
        if let Some(addr) = self.0.get(service_id) {
            return Some(addr);
        }
        match (service_id.is_empty(), self.0.len()) {
            (true, 1) => self.0.values().next().map(String::as_str),
            _ => None,
        }
    }
}

/// One connection id on a stream.
struct Conn {
    /// Payloads for the local socket; dropping it ends the connection's local side.
    to_local: mpsc::Sender<Bytes>,
    /// Tells this entry apart from a later one with the same ids.
    generation: u64,
}

/// A stream: one service's connections.
struct Stream {
    service: String,
    conns: HashMap<u32, Conn>,
    /// Source: the connection id the next CONNECTION_START gets.
    next_conn: u32,
}

/// The session's streams.
#[derive(Default)]
struct Table {
    streams: HashMap<i32, Stream>,
    /// The open stream of each service.
    current: HashMap<String, i32>,
}

impl Table {
    fn remove_stream(&mut self, stream_id: i32) {
        if let Some(stream) = self.streams.remove(&stream_id) {
            if self.current.get(&stream.service) == Some(&stream_id) {
                self.current.remove(&stream.service);
            }
        }
    }
}

/// Fixed at construction, shared by the reader, the writer and the connection tasks.
struct Inner {
    side: Side,
    out: mpsc::Sender<Out>,
    table: Mutex<Table>,
    /// Source: orders the start and reset decisions with the messages that announce them.
    order: tokio::sync::Mutex<()>,
    local: Arc<LocalServices>,
    next_stream_id: Arc<AtomicI32>,
    next_generation: AtomicU64,
    services: Vec<String>,
}

/// A handle to a relay connection: opens connections (source) and closes it.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

/// Drives a session: reads the relay's messages until the connection ends. Dropping it tears
/// the session down: every local connection of the session is closed.
pub struct Driver {
    inner: Arc<Inner>,
    read: SplitStream<Ws>,
    buf: BytesMut,
    writer: JoinHandle<()>,
    writer_done: oneshot::Receiver<bool>,
}

/// Options of a session.
pub struct SessionOptions {
    /// Our side.
    pub side: Side,
    /// Destination: where each service's connections go.
    pub local: Arc<LocalServices>,
    /// Source: the next stream id, shared across reconnects.
    pub next_stream_id: Arc<AtomicI32>,
}

impl SessionOptions {
    /// A source's options, with stream ids from 1.
    pub fn source() -> Self {
        Self {
            side: Side::Source,
            local: Arc::default(),
            next_stream_id: Arc::new(AtomicI32::new(1)),
        }
    }

    /// A destination's options.
    pub fn destination(local: Arc<LocalServices>) -> Self {
        Self {
            side: Side::Destination,
            local,
            next_stream_id: Arc::new(AtomicI32::new(1)),
        }
    }
}

/// Starts a session over a fresh relay connection.
pub fn start(connected: Connected, options: &SessionOptions) -> (Session, Driver) {
    let Connected {
        ws,
        services,
        leftover,
    } = connected;
    let (sink, read) = ws.split();
    let (out, out_rx) = mpsc::channel(OUT_QUEUE);
    let (done_tx, writer_done) = oneshot::channel();
    let writer = tokio::spawn(async move {
        let closed = write_loop(sink, out_rx).await;
        let _ = done_tx.send(closed);
    });
    let inner = Arc::new(Inner {
        side: options.side,
        out,
        table: Mutex::default(),
        order: tokio::sync::Mutex::new(()),
        local: options.local.clone(),
        next_stream_id: options.next_stream_id.clone(),
        next_generation: AtomicU64::new(1),
        services,
    });
    let driver = Driver {
        inner: inner.clone(),
        read,
        buf: leftover,
        writer,
        writer_done,
    };
    (Session { inner }, driver)
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.writer.abort();
        // Dropping the entries ends every local connection of this session.
        self.inner.lock_table().streams.clear();
    }
}

impl Driver {
    /// Reads and dispatches the relay's messages until the connection ends.
    pub async fn run(mut self) -> SessionEnd {
        loop {
            loop {
                match next_message(&mut self.buf) {
                    Ok(Some(message)) => self.inner.dispatch(message).await,
                    Ok(None) => break,
                    Err(e) => {
                        return SessionEnd::Lost(format!("protocol error from the relay: {e}"))
                    }
                }
            }
            let frame = tokio::select! {
                frame = tokio::time::timeout(IDLE_LIMIT, self.read.next()) => frame,
                closed = &mut self.writer_done => {
                    return match closed {
                        Ok(true) => SessionEnd::Local,
                        _ => SessionEnd::Lost("cannot write to the relay".into()),
                    };
                }
            };
            match frame {
                Err(_) => {
                    return SessionEnd::Lost(format!("the relay was silent for {IDLE_LIMIT:?}"))
                }
                Ok(None) => return SessionEnd::Lost("the relay connection ended".into()),
                Ok(Some(Err(e))) => return SessionEnd::Lost(format!("relay connection: {e}")),
                Ok(Some(Ok(WsMessage::Binary(b)))) => self.buf.extend_from_slice(&b),
                Ok(Some(Ok(WsMessage::Close(frame)))) => return SessionEnd::of_close(&frame),
                Ok(Some(Ok(WsMessage::Text(_)))) => {
                    return SessionEnd::Lost("the relay sent a text frame".into())
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

impl Inner {
    fn lock_table(&self) -> MutexGuard<'_, Table> {
        // The table holds no invariant a panicking holder could break halfway.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn send(&self, m: Message) -> bool {
        self.out.send(Out::Message(m)).await.is_ok()
    }

    async fn dispatch(self: &Arc<Self>, m: Message) {
        let conn_id = m.connection_id.max(1);
        let kind = MessageType::try_from(m.r#type).unwrap_or(MessageType::Unknown);
        match (kind, self.side) {
            (MessageType::Data, _) => {
                let to_local = self
                    .lock_table()
                    .streams
                    .get(&m.stream_id)
                    .and_then(|s| s.conns.get(&conn_id))
                    .map(|c| c.to_local.clone());
                match to_local {
                    // A closed receiver: the connection just ended; its reset is on the way.
                    Some(tx) => {
                        let _ = tx.send(m.payload).await;
                    }
                    None => tracing::trace!(
                        stream_id = m.stream_id,
                        connection_id = conn_id,
                        "DATA for no open connection"
                    ),
                }
            }
            (MessageType::StreamStart, Side::Destination) => {
                {
                    let mut table = self.lock_table();
                    // The source starts the service over: its older stream is gone.
                    if let Some(old) = table.current.get(&m.service_id).copied() {
                        table.remove_stream(old);
                    }
                    table.remove_stream(m.stream_id);
                    table.streams.insert(
                        m.stream_id,
                        Stream {
                            service: m.service_id.clone(),
                            conns: HashMap::new(),
                            next_conn: 1,
                        },
                    );
                    table.current.insert(m.service_id.clone(), m.stream_id);
                }
                self.open_local(m.stream_id, &m.service_id, conn_id).await;
            }
            (MessageType::ConnectionStart, Side::Destination) => {
                let known = self.lock_table().streams.contains_key(&m.stream_id);
                if known {
                    self.open_local(m.stream_id, &m.service_id, conn_id).await;
                } else {
                    let reset = message(
                        MessageType::ConnectionReset,
                        m.stream_id,
                        &m.service_id,
                        conn_id,
                        Bytes::new(),
                    );
                    self.send(reset).await;
                }
            }
            (MessageType::StreamReset, _) => self.lock_table().remove_stream(m.stream_id),
            (MessageType::ConnectionReset, _) => {
                if let Some(stream) = self.lock_table().streams.get_mut(&m.stream_id) {
                    stream.conns.remove(&conn_id);
                }
            }
            (MessageType::SessionReset, _) => {
                let mut table = self.lock_table();
                table.streams.clear();
                table.current.clear();
            }
            (other, side) => {
                tracing::debug!(message_type = ?other, ?side, "ignored a message");
            }
        }
    }

    /// Destination: connects to the service's local address for connection `conn_id`.
    async fn open_local(self: &Arc<Self>, stream_id: i32, service_id: &str, conn_id: u32) {
        let reset = || {
            message(
                MessageType::ConnectionReset,
                stream_id,
                service_id,
                conn_id,
                Bytes::new(),
            )
        };
        let Some(addr) = self.local.resolve(service_id).map(str::to_string) else {
            tracing::warn!(
                service = service_id,
                "no local address for this service; refusing the connection"
            );
            self.send(reset()).await;
            return;
        };
        let (to_local, rx) = mpsc::channel(CONN_QUEUE);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        {
            let mut table = self.lock_table();
            let Some(stream) = table.streams.get_mut(&stream_id) else {
                return;
            };
            stream.conns.insert(
                conn_id,
                Conn {
                    to_local,
                    generation,
                },
            );
        }
        let inner = self.clone();
        let service = service_id.to_string();
        // DATA arriving while we connect waits in the connection's queue.
        tokio::spawn(async move {
            let key = Key {
                stream_id,
                conn_id,
                generation,
            };
            let connect =
                tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr));
            match connect.await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    tracing::debug!(service = %service, %addr, stream_id, connection_id = conn_id, "local connection open");
                    let (read, write) = tcp.into_split();
                    pump(inner, key, service, read, write, rx).await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(service = %service, %addr, error = %e, "local service refused the connection");
                    inner.local_closed(&key, &service).await;
                }
                Err(_) => {
                    tracing::warn!(service = %service, %addr, "local service did not answer in time");
                    inner.local_closed(&key, &service).await;
                }
            }
        });
    }

    /// A local connection ended by itself: tell the other side, unless it already knows.
    async fn local_closed(&self, key: &Key, service: &str) {
        let _order = match self.side {
            Side::Source => Some(self.order.lock().await),
            Side::Destination => None,
        };
        let reset = {
            let mut table = self.lock_table();
            let Some(stream) = table.streams.get_mut(&key.stream_id) else {
                return;
            };
            let ours = stream
                .conns
                .get(&key.conn_id)
                .is_some_and(|c| c.generation == key.generation);
            if !ours {
                return;
            }
            stream.conns.remove(&key.conn_id);
            if self.side == Side::Source && stream.conns.is_empty() {
                table.remove_stream(key.stream_id);
                message(
                    MessageType::StreamReset,
                    key.stream_id,
                    service,
                    0,
                    Bytes::new(),
                )
            } else {
                message(
                    MessageType::ConnectionReset,
                    key.stream_id,
                    service,
                    key.conn_id,
                    Bytes::new(),
                )
            }
        };
        self.send(reset).await;
    }
}

/// Which connection a pump serves.
struct Key {
    stream_id: i32,
    conn_id: u32,
    generation: u64,
}

/// Why one direction of a pump stopped.
enum PumpEnd {
    /// The local side ended or failed: tell the other side.
    Local,
    /// The other side reset the connection, or the session ended: nothing to tell.
    Remote,
}

/// Carries one connection both ways until either side ends it.
async fn pump<R, W>(
    inner: Arc<Inner>,
    key: Key,
    service: String,
    mut read: R,
    mut write: W,
    mut from_relay: mpsc::Receiver<Bytes>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let up = async {
        let mut buf = vec![0u8; MAX_DATA];
        loop {
            let n = match read.read(&mut buf).await {
                Ok(0) | Err(_) => return PumpEnd::Local,
                Ok(n) => n,
            };
            let data = message(
                MessageType::Data,
                key.stream_id,
                &service,
                key.conn_id,
                Bytes::copy_from_slice(&buf[..n]),
            );
            if !inner.send(data).await {
                return PumpEnd::Remote;
            }
        }
    };
    let down = async {
        while let Some(payload) = from_relay.recv().await {
            if write.write_all(&payload).await.is_err() {
                return PumpEnd::Local;
            }
            // Flush once the queue is drained (stdout buffers; a socket does not mind).
            if from_relay.is_empty() && write.flush().await.is_err() {
                return PumpEnd::Local;
            }
        }
        let _ = write.shutdown().await;
        PumpEnd::Remote
    };
    let end = tokio::select! {
        end = up => end,
        end = down => end,
    };
    if let PumpEnd::Local = end {
        inner.local_closed(&key, &service).await;
    }
}

impl Session {
    /// The tunnel's services, from SERVICE_IDS.
    pub fn services(&self) -> &[String] {
        &self.inner.services
    }

    /// Source: carries a new local connection to `service` (STREAM_START for the service's
    /// first connection, CONNECTION_START for later ones). Returns the task that pumps it
    /// (it ends when the connection does), or `None` when the session is gone.
    pub async fn open<R, W>(&self, service: &str, read: R, write: W) -> Option<JoinHandle<()>>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let inner = &self.inner;
        let _order = inner.order.lock().await;
        let (to_local, rx) = mpsc::channel(CONN_QUEUE);
        let generation = inner.next_generation.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            to_local,
            generation,
        };
        let (start, stream_id, conn_id) = {
            let mut table = inner.lock_table();
            let open = table.current.get(service).copied();
            match open.and_then(|id| table.streams.get_mut(&id).map(|s| (id, s))) {
                Some((stream_id, stream)) => {
                    let conn_id = stream.next_conn;
                    stream.next_conn = stream.next_conn.checked_add(1).unwrap_or(1);
                    stream.conns.insert(conn_id, conn);
                    (MessageType::ConnectionStart, stream_id, conn_id)
                }
                None => {
                    let stream_id = next_stream_id(&inner.next_stream_id);
                    table.streams.insert(
                        stream_id,
                        Stream {
                            service: service.to_string(),
                            conns: HashMap::from([(1, conn)]),
                            next_conn: 2,
                        },
                    );
                    table.current.insert(service.to_string(), stream_id);
                    (MessageType::StreamStart, stream_id, 1)
                }
            }
        };
        if !inner
            .send(message(start, stream_id, service, conn_id, Bytes::new()))
            .await
        {
            return None;
        }
        drop(_order);
        tracing::debug!(
            service,
            stream_id,
            connection_id = conn_id,
            "connection started"
        );
        let key = Key {
            stream_id,
            conn_id,
            generation,
        };
        Some(tokio::spawn(pump(
            inner.clone(),
            key,
            service.to_string(),
            read,
            write,
            rx,
        )))
    }

    /// Sends a close frame after everything queued so far; the driver then ends with
    /// [`SessionEnd::Local`].
    pub async fn close(&self) {
        let _ = self.inner.out.send(Out::Close).await;
    }

    /// How many local connections the session carries now.
    pub fn connection_count(&self) -> usize {
        self.inner
            .lock_table()
            .streams
            .values()
            .map(|s| s.conns.len())
            .sum()
    }
}

/// The next positive stream id (wrapping past `i32::MAX` to 1; 0 is invalid).
fn next_stream_id(counter: &AtomicI32) -> i32 {
    let previous = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |id| {
        Some(id.checked_add(1).unwrap_or(1).max(1))
    });
    match previous {
        Ok(id) | Err(id) => id.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_resolve_by_name_or_alone() {
        let one = LocalServices(BTreeMap::from([("SSH".into(), "127.0.0.1:22".into())]));
        assert_eq!(one.resolve("SSH"), Some("127.0.0.1:22"));
        assert_eq!(one.resolve(""), Some("127.0.0.1:22"));
        assert_eq!(one.resolve("HTTP"), None);
        let two = LocalServices(BTreeMap::from([
            ("SSH".into(), "127.0.0.1:22".into()),
            ("HTTP".into(), "127.0.0.1:80".into()),
        ]));
        assert_eq!(two.resolve(""), None);
        assert_eq!(two.resolve("HTTP"), Some("127.0.0.1:80"));
    }

    #[test]
    fn stream_ids_stay_positive() {
        let counter = AtomicI32::new(i32::MAX);
        assert_eq!(next_stream_id(&counter), i32::MAX);
        assert_eq!(next_stream_id(&counter), 1);
        assert_eq!(next_stream_id(&counter), 2);
    }
}
