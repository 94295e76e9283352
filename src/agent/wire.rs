//! The relay WebSocket as a stream of AWS messages, on the project's own frame codec
//! ([`crate::proto::ws`]) over tokio, with as few payload copies as the protocol allows:
//!
//! - out: a DATA payload is read from its local socket straight into a buffer with room in
//!   front ([`DataBuf`]); the message fields, the length prefix and the frame header are written
//!   into that room and the frame is masked in place, so the bytes read are the bytes written.
//!   The writer task sends every frame queued with one vectored write, then pings when idle.
//! - in: frames are parsed in the read buffer; a frame's whole messages are decoded as slices
//!   of it (no copy), and only a message split across frames is gathered in a second buffer.
//!
//! Each message goes in a frame of its own (PROTOCOLS.md: localproxy drops what follows a
//! control message in one frame).
use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::proto::aws::{self, Message, MessageType};
use crate::proto::ws::{self, FragmentTracker, FrameError, FrameHeader, OpCode, Sender};

/// Our pings to the relay; localproxy pings every 20 s too (PROTOCOLS.md).
const PING_INTERVAL: Duration = Duration::from_secs(20);
/// Silence after which the relay connection counts as lost: three ping intervals.
pub(super) const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// Largest WebSocket frame accepted from the relay: the AWS frame limit (PROTOCOLS.md).
const MAX_FRAME: usize = ws::DEFAULT_MAX_PAYLOAD;
/// The read buffer grows by this much when it runs low: two full frames.
const READ_CHUNK: usize = 2 * MAX_FRAME;
/// Frames written with one vectored write at most.
const MAX_BATCH: usize = 64;
/// Room for a message's fields before its payload: type, stream id, connection id and the
/// payload's key and length, each a varint of at most 10 bytes; the service id comes on top.
const FIELDS_ROOM: usize = 48;

/// Payloads up to this size move to a buffer of their own size before they are queued.
const SMALL_PAYLOAD: usize = 8 * 1024;

/// What a session's writer sends.
pub(super) enum Out {
    /// One finished frame.
    Frame(Bytes),
    /// A close frame; the writer stops after it.
    Close,
}

/// What the relay sent.
#[derive(Debug)]
pub(super) enum Incoming {
    /// A tunnel message.
    Message(Message),
    /// A ping, to be answered with this payload.
    Ping(Bytes),
    /// A pong: the relay is alive.
    Pong,
    /// A close frame: its code and reason, if it had them.
    Close(Option<(u16, String)>),
}

/// Why reading from the relay failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    /// The connection failed or ended.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A frame broke RFC 6455 or the frame limit.
    #[error("bad frame from the relay: {0}")]
    Frame(#[from] FrameError),
    /// A message broke the AWS protocol.
    #[error("protocol error from the relay: {0}")]
    Stream(#[from] aws::StreamError),
    /// The relay sent a text frame, which the AWS protocol does not allow.
    #[error("the relay sent a text frame")]
    Text,
}

/// Reads the relay's frames and the messages in them.
pub(super) struct Reader<R> {
    io: R,
    /// Bytes read and not yet parsed.
    raw: BytesMut,
    /// The start of a message that continues in the next frame.
    partial: BytesMut,
    fragments: FragmentTracker,
    /// Messages decoded and not yet taken.
    ready: VecDeque<Message>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// A reader starting with `leftover`, bytes already read past the HTTP upgrade.
    pub(super) fn new(io: R, leftover: BytesMut) -> Self {
        Self {
            io,
            raw: leftover,
            partial: BytesMut::new(),
            fragments: FragmentTracker::new(),
            ready: VecDeque::new(),
        }
    }

    /// The next message or control frame.
    pub(super) async fn next(&mut self) -> Result<Incoming, ReadError> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                return Ok(Incoming::Message(m));
            }
            match self.parse()? {
                Parsed::Control(c) => return Ok(c),
                Parsed::Data => continue,
                Parsed::Short(want) => {
                    if self.raw.capacity() - self.raw.len() < want.max(1024) {
                        self.raw.reserve(want.max(READ_CHUNK));
                    }
                    if self.io.read_buf(&mut self.raw).await? == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                    }
                }
            }
        }
    }

    /// Returns `message` to the front of the queue: [`Reader::next`] yields it again.
    pub(super) fn put_back(&mut self, message: Message) {
        self.ready.push_front(message);
    }

    /// Takes the first frame off the read buffer when it is complete.
    fn parse(&mut self) -> Result<Parsed, ReadError> {
        let Some(header) = ws::parse_header(&self.raw, Sender::Server, MAX_FRAME)? else {
            return Ok(Parsed::Short(ws::MAX_SERVER_HEADER));
        };
        let len = header.frame_len();
        if self.raw.len() < len {
            return Ok(Parsed::Short(len - self.raw.len()));
        }
        let opcode = self.fragments.on_frame(&header)?;
        self.raw.advance(header.header_len);
        let payload = self.raw.split_to(header.payload_len).freeze();
        Ok(match opcode {
            OpCode::Binary | OpCode::Continuation => {
                self.absorb(payload)?;
                Parsed::Data
            }
            OpCode::Text => return Err(ReadError::Text),
            OpCode::Ping => Parsed::Control(Incoming::Ping(payload)),
            OpCode::Pong => Parsed::Control(Incoming::Pong),
            OpCode::Close => Parsed::Control(Incoming::Close(
                ws::parse_close_payload(&payload)?.map(|c| (c.code, c.reason.to_string())),
            )),
        })
    }

    /// Decodes the messages in one frame's payload; a message may span frames.
    fn absorb(&mut self, mut payload: Bytes) -> Result<(), ReadError> {
        while !self.partial.is_empty() && payload.has_remaining() {
            let want = match aws::framed_len(&self.partial) {
                Some(total) => total - self.partial.len(),
                None => aws::LENGTH_PREFIX - self.partial.len(),
            };
            let take = want.min(payload.len());
            self.partial.extend_from_slice(&payload[..take]);
            payload.advance(take);
            if aws::framed_len(&self.partial) == Some(self.partial.len()) {
                let whole = self.partial.split().freeze();
                self.ready.push_back(decode(whole)?);
            }
        }
        while payload.has_remaining() {
            match aws::framed_len(&payload) {
                Some(total) if payload.len() >= total => {
                    let whole = payload.split_to(total);
                    self.ready.push_back(decode(whole)?);
                }
                _ => {
                    self.partial.extend_from_slice(&payload);
                    break;
                }
            }
        }
        Ok(())
    }
}

/// What [`Reader::parse`] found.
enum Parsed {
    /// A control frame for the caller.
    Control(Incoming),
    /// A data frame, its messages now in `ready`.
    Data,
    /// More bytes are needed: at least this many.
    Short(usize),
}

/// Decodes one `[u16 length][Message]`; the payload stays a slice of `whole`.
fn decode(mut whole: Bytes) -> Result<Message, aws::StreamError> {
    whole.advance(aws::LENGTH_PREFIX);
    aws::decode_body(whole)
}

/// A buffer a DATA payload is read into, with room in front for the rest of its frame.
pub(super) struct DataBuf {
    buf: BytesMut,
    room: usize,
}

impl DataBuf {
    /// A buffer for up to `aws::MAX_PAYLOAD` bytes of a message on `service_id`.
    pub(super) fn new(service_id: &str) -> Self {
        let room = ws::MAX_CLIENT_HEADER + aws::LENGTH_PREFIX + FIELDS_ROOM + service_id.len();
        let mut buf = BytesMut::with_capacity(room + aws::MAX_PAYLOAD);
        buf.resize(room, 0);
        Self { buf, room }
    }

    /// Where the payload goes: at most `aws::MAX_PAYLOAD` bytes.
    pub(super) fn spare(&mut self) -> impl BufMut + '_ {
        let left = self.room + aws::MAX_PAYLOAD - self.buf.len();
        (&mut self.buf).limit(left)
    }

    /// Payload bytes read so far.
    pub(super) fn payload_len(&self) -> usize {
        self.buf.len() - self.room
    }

    /// The finished, masked frame of a DATA message carrying the payload read.
    pub(super) fn seal(mut self, stream_id: i32, service_id: &str, connection_id: u32) -> Bytes {
        let payload_len = self.payload_len();
        if payload_len <= SMALL_PAYLOAD {
            // A small read waits in the queues in a buffer of its size, not of 63 KiB.
            let mut small = BytesMut::with_capacity(self.buf.len());
            small.extend_from_slice(&self.buf);
            self.buf = small;
        }
        let fields = Message {
            r#type: MessageType::Data as i32,
            stream_id,
            service_id: service_id.to_string(),
            connection_id,
            ..Message::default()
        };
        // The payload field goes last: protobuf fields may come in any order.
        let mut head = Vec::with_capacity(self.room);
        fields.encode_raw(&mut head);
        prost::encoding::encode_key(4, prost::encoding::WireType::LengthDelimited, &mut head);
        prost::encoding::encode_varint(payload_len as u64, &mut head);
        let message_len = head.len() + payload_len;
        let mut frame_head = [0; ws::MAX_CLIENT_HEADER];
        let mask = rand::random();
        let header =
            FrameHeader::client(true, OpCode::Binary, mask, aws::LENGTH_PREFIX + message_len);
        let header_len = header.encode(&mut frame_head);
        let start = self.room - head.len() - aws::LENGTH_PREFIX - header_len;
        let mut at = start;
        for part in [
            &frame_head[..header_len],
            &(message_len as u16).to_be_bytes()[..],
            &head,
        ] {
            self.buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        ws::unmask(&mut self.buf[start + header_len..], mask);
        self.buf.advance(start);
        self.buf.freeze()
    }
}

/// The masked frame of one message (for the messages that are not DATA read in place).
pub(super) fn frame(message: &Message) -> Result<Bytes, aws::StreamError> {
    let payload = aws::encode_frame_payload(message)?;
    Ok(ws::client_frame(true, OpCode::Binary, rand::random(), &payload).into())
}

/// A masked control frame.
fn control(opcode: OpCode, payload: &[u8]) -> Bytes {
    ws::client_frame(true, opcode, rand::random(), payload).into()
}

/// The answer to a ping.
pub(super) fn pong(payload: &[u8]) -> Bytes {
    control(OpCode::Pong, payload)
}

/// Writes queued frames (all that are ready, in one vectored write) and pings. Returns true
/// when it sent a close frame on request, false when the connection failed.
pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
    mut io: W,
    mut rx: mpsc::Receiver<Out>,
) -> bool {
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut batch = VecDeque::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            first = rx.recv() => first,
            _ = ping.tick() => Some(Out::Frame(control(OpCode::Ping, &[]))),
        };
        let mut next = first;
        let mut close = false;
        while let Some(out) = next {
            match out {
                Out::Frame(f) => batch.push_back(f),
                Out::Close => {
                    batch.push_back(control(OpCode::Close, &[]));
                    close = true;
                    break;
                }
            }
            if batch.len() == MAX_BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        if batch.is_empty() {
            // Every sender is gone: the session is over.
            return false;
        }
        if write_all(&mut io, &mut batch).await.is_err() || io.flush().await.is_err() {
            return false;
        }
        if close {
            let _ = io.shutdown().await;
            return true;
        }
    }
}

/// Writes every frame of `batch`, as many per system call as it takes.
async fn write_all<W: AsyncWrite + Unpin>(
    io: &mut W,
    batch: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !batch.is_empty() {
        let slices: Vec<IoSlice<'_>> = batch.iter().map(|b| IoSlice::new(b)).collect();
        let mut n = io.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let Some(front) = batch.front_mut() else {
                break;
            };
            let take = n.min(front.len());
            front.advance(take);
            n -= take;
            if front.is_empty() {
                batch.pop_front();
            }
        }
    }
    Ok(())
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

    /// Server frames (unmasked) holding `stream`, cut every `cut` bytes.
    fn server_frames(stream: &[u8], cut: usize) -> Vec<u8> {
        stream
            .chunks(cut)
            .flat_map(|c| ws::server_frame(true, OpCode::Binary, c))
            .collect()
    }

    #[tokio::test]
    async fn messages_split_across_frames_and_reads() {
        let m = message(MessageType::Data, 3, "SSH", 2, Bytes::from_static(b"hello"));
        let mut stream = aws::encode_frame_payload(&m).unwrap();
        stream.extend(aws::encode_frame_payload(&m).unwrap());
        for cut in [1, 3, 7, stream.len()] {
            let mut wire = server_frames(&stream, cut);
            wire.extend(ws::server_frame(true, OpCode::Ping, b"p"));
            // One byte per read: every boundary falls everywhere.
            let (mut tx, rx) = tokio::io::duplex(1);
            tokio::spawn(async move { tx.write_all(&wire).await });
            let mut reader = Reader::new(rx, BytesMut::new());
            for _ in 0..2 {
                match reader.next().await.unwrap() {
                    Incoming::Message(got) => assert_eq!(got, m),
                    other => panic!("expected a message, got {other:?}"),
                }
            }
            assert!(matches!(reader.next().await.unwrap(), Incoming::Ping(p) if p == "p"));
        }
    }

    #[tokio::test]
    async fn sealed_data_frames_decode() {
        let mut data = DataBuf::new("SSH");
        data.spare().put_slice(&[7; 1000]);
        let frame = data.seal(5, "SSH", 9).to_vec();
        let header = ws::parse_header(&frame, Sender::Client, MAX_FRAME)
            .unwrap()
            .unwrap();
        let mut payload = frame[header.header_len..].to_vec();
        ws::unmask(&mut payload, header.mask);
        let got = decode(Bytes::from(payload)).unwrap();
        assert_eq!(
            got,
            message(MessageType::Data, 5, "SSH", 9, vec![7; 1000].into())
        );
    }

    #[tokio::test]
    async fn hostile_frames_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (ws::server_frame(true, OpCode::Text, b"x"), "text"),
            (
                ws::client_frame(true, OpCode::Binary, [1, 2, 3, 4], b"x"),
                "masked",
            ),
            (vec![0x82, 0x7F, 0, 0, 0, 0, 0, 0x10, 0, 0], "too large"),
            // A message whose prefix promises more than its body gives.
            (
                ws::server_frame(true, OpCode::Binary, &[0, 2, 0xFF, 0xFF]),
                "bad message",
            ),
        ];
        for (wire, what) in cases {
            let mut reader = Reader::new(&wire[..], BytesMut::new());
            assert!(reader.next().await.is_err(), "{what} was accepted");
        }
    }
}
