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
//!                                                            payload: why, in UTF-8 (ours)
//! ```
//!
//! A CONNECTION_RESET the destination sends because it cannot serve the connection (no local
//! address for the service, or the local service refused) carries the reason as its payload,
//! which the source reports ([`Session::open`] returns it); the protocol leaves a reset's
//! payload unused, so other peers ignore it. An ordinary end carries none.
//!
//! A stream belongs to the source that started it: only the source ends a stream (when its
//! last connection ends), so a connection it starts never races a stream the destination just
//! dropped. STREAM_RESET from the relay (the other side went away) and SESSION_RESET end the
//! named stream or all of them. Stream ids increase across reconnects of one client, so a
//! late DATA message of an old stream never lands in a new connection.
//!
//! The WebSocket itself is [`super::wire`]: each message in a frame of its own, written by one
//! writer task. A local socket is read only once it is readable, into a buffer allocated then
//! and freed once its frame is written, so an idle connection holds no buffer. The protocol has
//! no flow control per connection, so what arrives for a local socket that does not read
//! queues in memory (up to [`CONN_BUDGET`] per connection and [`SESSION_BUDGET`] per session)
//! while the other connections go on; past either budget the session's reader waits, which
//! stalls this tunnel only, never other tunnels.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::dial::{Connected, RelayIo, SessionEnd};
use super::wire::{self, message, write_loop, DataBuf, Incoming, Out, Reader, IDLE_LIMIT};
use crate::proto::aws::{self, Message, MessageType, Side};

/// Bytes read from a local connection per DATA message: the AWS payload limit, 63 KiB.
pub const MAX_DATA: usize = aws::MAX_PAYLOAD;
/// Frames queued for the relay before local readers wait: about 2 MiB of DATA.
const OUT_QUEUE: usize = 32;
/// Bytes queued for one local connection that does not read before the session's reader
/// waits for it (and so every connection of the session does). Enough for everything the
/// socket buffers along the way (local service, relay connections, relay) hold at once on a
/// fast link, which is what arrives after a local reader stops, as iperf3's client does at the
/// end of a `-R` test while it waits for its results on another connection.
const CONN_BUDGET: usize = 32 << 20;
/// Bytes queued for all local connections of a session before its reader waits.
const SESSION_BUDGET: usize = 128 << 20;
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
    to_local: mpsc::UnboundedSender<Queued>,
    /// Bytes this connection may still have queued: [`CONN_BUDGET`] when it has none.
    budget: Arc<Semaphore>,
    /// Tells this entry apart from a later one with the same ids.
    generation: u64,
    /// Why the other side refused the connection, when its reset said so.
    refusal: Arc<OnceLock<String>>,
}

impl Conn {
    /// A connection entry and the receiving end of its queue.
    fn new(generation: u64) -> (Self, mpsc::UnboundedReceiver<Queued>) {
        let (to_local, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(CONN_BUDGET));
        let conn = Self {
            to_local,
            budget,
            generation,
            refusal: Arc::default(),
        };
        (conn, rx)
    }
}

/// A payload on its way to a local socket, holding its share of both budgets.
struct Queued {
    payload: Bytes,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
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
    /// Bytes all connections may still have queued: [`SESSION_BUDGET`] when none has any.
    budget: Arc<Semaphore>,
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
    reader: Reader<ReadHalf<RelayIo>>,
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
        services,
        reader,
        writer,
    } = connected;
    let (out, out_rx) = mpsc::channel(OUT_QUEUE);
    let (done_tx, writer_done) = oneshot::channel();
    let writer = tokio::spawn(async move {
        let closed = write_loop(writer, out_rx).await;
        let _ = done_tx.send(closed);
    });
    let inner = Arc::new(Inner {
        side: options.side,
        out,
        budget: Arc::new(Semaphore::new(SESSION_BUDGET)),
        table: Mutex::default(),
        order: tokio::sync::Mutex::new(()),
        local: options.local.clone(),
        next_stream_id: options.next_stream_id.clone(),
        next_generation: AtomicU64::new(1),
        services,
    });
    let driver = Driver {
        inner: inner.clone(),
        reader,
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
    /// Reads and dispatches the relay's messages until the connection ends. The relay counts
    /// as lost after a silent [`IDLE_LIMIT`] (checked every half of it: one timer per check,
    /// not one per message).
    pub async fn run(mut self) -> SessionEnd {
        let check = IDLE_LIMIT / 2;
        let idle = tokio::time::sleep(check);
        tokio::pin!(idle);
        let (mut heard, mut silent_checks) = (false, 0);
        loop {
            let incoming = tokio::select! {
                incoming = self.reader.next() => incoming,
                _ = &mut idle => {
                    silent_checks = if heard { 0 } else { silent_checks + 1 };
                    if silent_checks == 2 {
                        return SessionEnd::Lost(format!("the relay was silent for {IDLE_LIMIT:?}"));
                    }
                    heard = false;
                    idle.as_mut().reset(tokio::time::Instant::now() + check);
                    continue;
                }
                closed = &mut self.writer_done => {
                    return match closed {
                        Ok(true) => SessionEnd::Local,
                        _ => SessionEnd::Lost("cannot write to the relay".into()),
                    };
                }
            };
            heard = true;
            match incoming {
                Ok(Incoming::Message(m)) => self.inner.dispatch(m).await,
                Ok(Incoming::Ping(payload)) => {
                    let _ = self.inner.out.send(Out::Frame(wire::pong(&payload))).await;
                }
                Ok(Incoming::Pong) => {}
                Ok(Incoming::Close(frame)) => return SessionEnd::of_close(&frame),
                Err(e) => return SessionEnd::Lost(format!("relay connection: {e}")),
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
        match wire::frame(&m) {
            Ok(frame) => self.send_frame(frame).await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a message");
                false
            }
        }
    }

    async fn send_frame(&self, frame: Bytes) -> bool {
        self.out.send(Out::Frame(frame)).await.is_ok()
    }

    async fn dispatch(self: &Arc<Self>, m: Message) {
        let conn_id = m.connection_id.max(1);
        let kind = MessageType::try_from(m.r#type).unwrap_or(MessageType::Unknown);
        match (kind, self.side) {
            (MessageType::Data, _) => {
                let conn = self
                    .lock_table()
                    .streams
                    .get(&m.stream_id)
                    .and_then(|s| s.conns.get(&conn_id))
                    .map(|c| (c.to_local.clone(), c.budget.clone()));
                match conn {
                    Some((tx, budget)) => {
                        // Waits only when this connection, or all of them, queued too much.
                        let n = u32::try_from(m.payload.len()).unwrap_or(u32::MAX);
                        let permits = (
                            budget.acquire_many_owned(n).await,
                            self.budget.clone().acquire_many_owned(n).await,
                        );
                        if let (Ok(conn), Ok(session)) = permits {
                            // A closed receiver: the connection just ended; its reset is on
                            // the way.
                            let _ = tx.send(Queued {
                                payload: m.payload,
                                _permits: (conn, session),
                            });
                        }
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
            (MessageType::StreamReset, _) => {
                let mut table = self.lock_table();
                if let (Some(stream), Some(why)) =
                    (table.streams.get(&m.stream_id), refusal(&m.payload))
                {
                    for conn in stream.conns.values() {
                        let _ = conn.refusal.set(why.clone());
                    }
                }
                table.remove_stream(m.stream_id);
            }
            (MessageType::ConnectionReset, _) => {
                if let Some(stream) = self.lock_table().streams.get_mut(&m.stream_id) {
                    if let (Some(conn), Some(why)) =
                        (stream.conns.remove(&conn_id), refusal(&m.payload))
                    {
                        let _ = conn.refusal.set(why);
                    }
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
        let Some(addr) = self.local.resolve(service_id).map(str::to_string) else {
            tracing::warn!(
                service = service_id,
                "no local address for this service; refusing the connection"
            );
            let mapped: Vec<&str> = self.local.0.keys().map(String::as_str).collect();
            let why = format!(
                "the device's agent has no service {service_id:?} (it maps {}; start it with \
                 --service {service_id}=HOST:PORT)",
                mapped.join(", ")
            );
            let reset = message(
                MessageType::ConnectionReset,
                stream_id,
                service_id,
                conn_id,
                Bytes::from(why),
            );
            self.send(reset).await;
            return;
        };
        let (conn, rx) = Conn::new(self.next_generation.fetch_add(1, Ordering::Relaxed));
        let generation = conn.generation;
        let refused = conn.refusal.clone();
        {
            let mut table = self.lock_table();
            let Some(stream) = table.streams.get_mut(&stream_id) else {
                return;
            };
            stream.conns.insert(conn_id, conn);
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
                    pump(
                        inner,
                        key,
                        service,
                        LocalRead::Tcp(read),
                        write,
                        rx,
                        refused,
                    )
                    .await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(service = %service, %addr, error = %e, "local service refused the connection");
                    let why = format!("the device cannot connect to {service} at {addr}: {e}");
                    inner.local_closed(&key, &service, Some(why)).await;
                }
                Err(_) => {
                    tracing::warn!(service = %service, %addr, "local service did not answer in time");
                    let why = format!("{service} at {addr} did not answer the device in time");
                    inner.local_closed(&key, &service, Some(why)).await;
                }
            }
        });
    }

    /// A local connection ended by itself (or, with `why`, could not be opened): tell the
    /// other side, unless it already knows.
    async fn local_closed(&self, key: &Key, service: &str, why: Option<String>) {
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
                    why.map(Bytes::from).unwrap_or_default(),
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

/// The reading half of a local connection.
pub enum LocalRead {
    /// A socket: read only once readable, into a buffer allocated then.
    Tcp(OwnedReadHalf),
    /// Anything else (stdin): a buffer waits for each read.
    Stream(Box<dyn AsyncRead + Unpin + Send>),
}

impl LocalRead {
    /// Reads up to [`MAX_DATA`] bytes into a fresh [`DataBuf`]; `None` at the end. A socket's
    /// buffer is allocated only once the socket is readable, so a waiting connection holds
    /// none. (After a short read the socket is tried again rather than taken as drained: at
    /// high rates more has often arrived, and waiting for the next edge measured slower.)
    async fn read_data(&mut self, service: &str) -> std::io::Result<Option<DataBuf>> {
        let (n, data) = match self {
            Self::Tcp(read) => loop {
                read.readable().await?;
                let mut data = DataBuf::new(service);
                let read = read.try_read_buf(&mut data.spare());
                match read {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Ok(n) => break (n, data),
                    Err(e) => return Err(e),
                }
            },
            Self::Stream(read) => {
                let mut data = DataBuf::new(service);
                let n = read.read_buf(&mut data.spare()).await?;
                (n, data)
            }
        };
        Ok((n > 0).then_some(data))
    }
}

/// Carries one connection both ways until either side ends it; returns why the other side
/// refused it, if its reset said so.
async fn pump<W>(
    inner: Arc<Inner>,
    key: Key,
    service: String,
    mut read: LocalRead,
    mut write: W,
    mut from_relay: mpsc::UnboundedReceiver<Queued>,
    refusal: Arc<OnceLock<String>>,
) -> Option<String>
where
    W: AsyncWrite + Unpin,
{
    let up = async {
        loop {
            let data = match read.read_data(&service).await {
                Ok(Some(data)) => data,
                Ok(None) | Err(_) => return PumpEnd::Local,
            };
            let frame = data.seal(key.stream_id, &service, key.conn_id);
            if !inner.send_frame(frame).await {
                return PumpEnd::Remote;
            }
            // One frame per turn: a busy connection must not fill the relay queue while the
            // others wait (it would, since a send with room left does not yield).
            tokio::task::yield_now().await;
        }
    };
    let down = async {
        while let Some(queued) = from_relay.recv().await {
            if write.write_all(&queued.payload).await.is_err() {
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
        inner.local_closed(&key, &service, None).await;
    }
    crate::trim::connection_closed();
    refusal.get().cloned()
}

/// The reason a reset's payload gives, if any (our destinations explain refusals).
fn refusal(payload: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(payload);
    let text = text.trim();
    (!text.is_empty()).then(|| text.chars().take(512).collect())
}

impl Session {
    /// The tunnel's services, from SERVICE_IDS.
    pub fn services(&self) -> &[String] {
        &self.inner.services
    }

    /// Source: carries a new local connection to `service` (STREAM_START for the service's
    /// first connection, CONNECTION_START for later ones). Returns the task that pumps it
    /// (it ends when the connection does, with the reason the device gave if it refused it),
    /// or `None` when the session is gone.
    pub async fn open<W>(
        &self,
        service: &str,
        read: LocalRead,
        write: W,
    ) -> Option<JoinHandle<Option<String>>>
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let inner = &self.inner;
        let _order = inner.order.lock().await;
        let (conn, rx) = Conn::new(inner.next_generation.fetch_add(1, Ordering::Relaxed));
        let generation = conn.generation;
        let refused = conn.refusal.clone();
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
            refused,
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
