//! The AWS IoT Secure Tunneling protocol (V1-V3): the protobuf `Message`, its
//! `[u16 length][Message]` stream, a boundary tracker that follows the stream across WebSocket
//! frames without decoding DATA payloads, and the service's validation rules.
//! Layouts and flows are documented in [the module docs](super).

use bytes::Bytes;
use prost::Message as _;

use crate::proto::ws::{self, close_code, OpCode};

/// Bytes of the big-endian length before each message (PROTOCOLS.md, "Framing").
pub const LENGTH_PREFIX: usize = 2;

/// Longest message: what a `u16` length prefix can express.
pub const MAX_MESSAGE_LEN: usize = u16::MAX as usize;

/// Longest `payload` field: 63 KiB (PROTOCOLS.md, "Message payload at most 64512 bytes").
pub const MAX_PAYLOAD: usize = 64_512;

/// Longest service id the tracker keeps: AWS limits each `destinationConfig.services` entry to
/// 128 characters, so a longer `serviceId` can never name a service of the tunnel.
pub const MAX_SERVICE_ID_LEN: usize = 128;

/// WebSocket subprotocols, newest first, with the version each selects (PROTOCOLS.md).
pub const SUBPROTOCOLS: [(&str, ProtocolVersion); 3] = [
    ("aws.iot.securetunneling-3.0", ProtocolVersion::V3),
    ("aws.iot.securetunneling-2.0", ProtocolVersion::V2),
    ("aws.iot.securetunneling-1.0", ProtocolVersion::V1),
];

/// Message types (field 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MessageType {
    /// Unset; always invalid.
    Unknown = 0,
    /// Tunnel bytes of one stream.
    Data = 1,
    /// The source opens a stream (V2+: for a service).
    StreamStart = 2,
    /// Either side (or the service) ends a stream.
    StreamReset = 3,
    /// The service ends every stream; only the service sends it.
    SessionReset = 4,
    /// V2: the service lists the tunnel's services; only the service sends it.
    ServiceIds = 5,
    /// V3: the source opens another connection on a stream.
    ConnectionStart = 6,
    /// V3: one connection on a stream ends.
    ConnectionReset = 7,
}

impl MessageType {
    /// True for the types that belong to a stream and so need a non-zero stream id.
    pub fn is_stream_message(self) -> bool {
        matches!(
            self,
            Self::Data
                | Self::StreamStart
                | Self::StreamReset
                | Self::ConnectionStart
                | Self::ConnectionReset
        )
    }

    /// The oldest protocol version that has this type.
    pub fn since(self) -> ProtocolVersion {
        match self {
            Self::ServiceIds => ProtocolVersion::V2,
            Self::ConnectionStart | Self::ConnectionReset => ProtocolVersion::V3,
            _ => ProtocolVersion::V1,
        }
    }
}

/// The tunnel message (proto3), derived by hand to match AWS's `Message.proto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Message {
    /// A [`MessageType`] value.
    #[prost(enumeration = "MessageType", tag = "1")]
    pub r#type: i32,
    /// The stream this message belongs to.
    #[prost(int32, tag = "2")]
    pub stream_id: i32,
    /// Whether a receiver that does not understand the message may drop it.
    #[prost(bool, tag = "3")]
    pub ignorable: bool,
    /// Tunnel bytes (DATA) or nothing.
    #[prost(bytes = "bytes", tag = "4")]
    pub payload: Bytes,
    /// V2+: the service a stream belongs to.
    #[prost(string, tag = "5")]
    pub service_id: String,
    /// V2+: the tunnel's services (SERVICE_IDS).
    #[prost(string, repeated, tag = "6")]
    pub available_service_ids: Vec<String>,
    /// V3: the connection within a stream; 0 or absent means 1.
    #[prost(uint32, tag = "7")]
    pub connection_id: u32,
}

/// A protocol version, chosen by the WebSocket subprotocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// Fields 1-4 and types 0-4.
    V1,
    /// Adds service ids.
    V2,
    /// Adds connection ids.
    V3,
}

impl ProtocolVersion {
    /// The version a subprotocol name selects.
    pub fn from_subprotocol(name: &str) -> Option<Self> {
        SUBPROTOCOLS
            .iter()
            .find(|(known, _)| *known == name)
            .map(|&(_, version)| version)
    }

    /// Picks the newest version in a `Sec-WebSocket-Protocol` header value (comma-separated).
    pub fn select(header_value: &str) -> Option<Self> {
        header_value
            .split(',')
            .filter_map(|name| Self::from_subprotocol(name.trim()))
            .max()
    }

    /// The subprotocol name to echo back.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Self::V1 => SUBPROTOCOLS[2].0,
            Self::V2 => SUBPROTOCOLS[1].0,
            Self::V3 => SUBPROTOCOLS[0].0,
        }
    }

    /// True when peers of this version expect SERVICE_IDS right after the upgrade.
    pub fn has_service_ids(self) -> bool {
        self >= Self::V2
    }
}

/// Which end of the tunnel a peer is (the `local-proxy-mode` query parameter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client side: a person's local proxy.
    Source,
    /// The device side.
    Destination,
}

/// Why the byte stream is not a valid sequence of messages.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A varint longer than 10 bytes or above `u64::MAX`.
    #[error("varint overflows 64 bits")]
    VarintOverflow,
    /// A field key above `u32::MAX`, with field number 0, or with wire type 6 or 7.
    #[error("invalid field key {0:#x}")]
    InvalidKey(u64),
    /// A known field with the wrong wire type, or a group (unused in proto3).
    #[error("field {field} has unexpected wire type {wire_type}")]
    WireType {
        /// Field number.
        field: u32,
        /// Wire type found.
        wire_type: u8,
    },
    /// A field that runs past the end of its message.
    #[error("field runs past the end of the message")]
    Truncated,
    /// A `payload` field longer than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes exceeds {MAX_PAYLOAD}")]
    PayloadTooLarge(usize),
    /// A `serviceId` that is not UTF-8.
    #[error("serviceId is not UTF-8")]
    ServiceIdNotUtf8,
    /// A message to encode that is longer than [`MAX_MESSAGE_LEN`].
    #[error("message of {0} bytes exceeds {MAX_MESSAGE_LEN}")]
    MessageTooLarge(usize),
    /// prost refused a message while decoding it whole.
    #[error("invalid message: {0}")]
    Decode(#[from] prost::DecodeError),
}

impl StreamError {
    /// Every value [`StreamError::label`] returns, for creating metric series up front.
    pub const LABELS: &'static [&'static str] = &[
        "varint_overflow",
        "invalid_key",
        "wire_type",
        "truncated",
        "payload_too_large",
        "service_id_not_utf8",
        "message_too_large",
        "decode",
    ];

    /// The WebSocket close code for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::PayloadTooLarge(_) | Self::MessageTooLarge(_) => close_code::MESSAGE_TOO_BIG,
            _ => close_code::PROTOCOL_ERROR,
        }
    }

    /// A stable snake_case name, usable as a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::VarintOverflow => "varint_overflow",
            Self::InvalidKey(_) => "invalid_key",
            Self::WireType { .. } => "wire_type",
            Self::Truncated => "truncated",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::ServiceIdNotUtf8 => "service_id_not_utf8",
            Self::MessageTooLarge(_) => "message_too_large",
            Self::Decode(_) => "decode",
        }
    }
}

/// The fields of a message the relay checks, read without copying its payload.
#[derive(Clone, Copy)]
pub struct MessageHeader {
    /// Field 1, raw (may be a value no version defines).
    pub message_type: i32,
    /// Field 2.
    pub stream_id: i32,
    /// Field 3.
    pub ignorable: bool,
    /// Field 7, raw (0 when absent).
    pub connection_id: u32,
    /// Length of field 4 (the last one, as protobuf keeps the last value).
    pub payload_len: usize,
    /// How many field 6 entries the message has.
    pub available_service_ids: usize,
    /// Message length, without the 2-byte prefix.
    pub len: usize,
    /// Field 5, the first [`MAX_SERVICE_ID_LEN`] bytes.
    service_id: [u8; MAX_SERVICE_ID_LEN],
    /// Full length of field 5 (may exceed what is kept).
    service_id_len: usize,
}

impl Default for MessageHeader {
    fn default() -> Self {
        Self {
            message_type: 0,
            stream_id: 0,
            ignorable: false,
            connection_id: 0,
            payload_len: 0,
            available_service_ids: 0,
            len: 0,
            service_id: [0; MAX_SERVICE_ID_LEN],
            service_id_len: 0,
        }
    }
}

impl PartialEq for MessageHeader {
    fn eq(&self, other: &Self) -> bool {
        // Bytes past the kept service id are stale and do not count.
        (
            self.message_type,
            self.stream_id,
            self.ignorable,
            self.connection_id,
            self.payload_len,
            self.available_service_ids,
            self.len,
            self.service_id_len,
        ) == (
            other.message_type,
            other.stream_id,
            other.ignorable,
            other.connection_id,
            other.payload_len,
            other.available_service_ids,
            other.len,
            other.service_id_len,
        ) && self.kept_service_id() == other.kept_service_id()
    }
}

impl Eq for MessageHeader {}

impl std::fmt::Debug for MessageHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageHeader")
            .field("message_type", &self.message_type)
            .field("stream_id", &self.stream_id)
            .field("ignorable", &self.ignorable)
            .field("connection_id", &self.connection_id)
            .field("payload_len", &self.payload_len)
            .field("available_service_ids", &self.available_service_ids)
            .field("len", &self.len)
            .field(
                "service_id",
                &String::from_utf8_lossy(self.kept_service_id()),
            )
            .field("service_id_len", &self.service_id_len)
            .finish()
    }
}

impl MessageHeader {
    /// The header of a decoded message (for tests and for messages the relay builds).
    pub fn of(message: &Message) -> Self {
        let mut header = Self {
            message_type: message.r#type,
            stream_id: message.stream_id,
            ignorable: message.ignorable,
            connection_id: message.connection_id,
            payload_len: message.payload.len(),
            available_service_ids: message.available_service_ids.len(),
            len: message.encoded_len(),
            ..Self::default()
        };
        header.push_service_id(message.service_id.as_bytes());
        header
    }

    /// The type, or `None` for a value no version defines.
    pub fn kind(&self) -> Option<MessageType> {
        MessageType::try_from(self.message_type).ok()
    }

    /// Field 5 (empty when absent), or `None` when longer than [`MAX_SERVICE_ID_LEN`].
    pub fn service_id(&self) -> Option<&str> {
        let kept = self.service_id.get(..self.service_id_len)?;
        std::str::from_utf8(kept).ok()
    }

    /// The bytes of field 5 that were kept.
    fn kept_service_id(&self) -> &[u8] {
        let kept = self.service_id_len.min(MAX_SERVICE_ID_LEN);
        self.service_id.get(..kept).unwrap_or_default()
    }

    /// The V3 connection id, with 0 (absent) read as 1.
    pub fn effective_connection_id(&self) -> u32 {
        self.connection_id.max(1)
    }

    /// Appends bytes of field 5, keeping at most [`MAX_SERVICE_ID_LEN`].
    fn push_service_id(&mut self, bytes: &[u8]) {
        let kept = self.service_id_len.min(MAX_SERVICE_ID_LEN);
        let room = MAX_SERVICE_ID_LEN - kept;
        let take = bytes.len().min(room);
        self.service_id[kept..kept + take].copy_from_slice(&bytes[..take]);
        self.service_id_len += bytes.len();
    }
}

/// A protobuf varint read a byte at a time, so it may straddle frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Varint {
    /// Bits gathered so far.
    value: u64,
    /// Bits already shifted in (a multiple of 7); non-zero while a varint is half read.
    shift: u32,
}

impl Varint {
    /// Adds one byte; returns the value once its last byte arrives.
    fn push(&mut self, byte: u8) -> Result<Option<u64>, StreamError> {
        // The 10th byte may hold only the 64th bit (the same rule as prost and protobuf-go).
        if self.shift == 63 && byte > 1 {
            return Err(StreamError::VarintOverflow);
        }
        self.value |= u64::from(byte & 0x7F) << self.shift;
        if byte & 0x80 == 0 {
            let value = self.value;
            *self = Self::default();
            return Ok(Some(value));
        }
        self.shift += 7;
        Ok(None)
    }
}

/// Where the tracker is inside the byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading the length prefix; `Some(high byte)` once its first byte arrived.
    Prefix(Option<u8>),
    /// Inside a message body.
    Body(Field),
}

/// Where the scanner is inside a message body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    /// Expecting a field key.
    Key,
    /// Reading a varint field's value.
    Varint(u32),
    /// Reading a length-delimited field's length.
    Length(u32),
    /// Skipping bytes nobody checks (payload, unknown fields, service id list).
    Skip(usize),
    /// Reading this many more bytes of the service id.
    ServiceId(usize),
}

/// Follows message boundaries through a byte stream fed in arbitrary pieces, reading only the
/// header fields: DATA payloads are skipped, never decoded or copied.
#[derive(Clone, Debug)]
pub struct BoundaryTracker {
    /// Position in the stream.
    state: State,
    /// A varint being read (key, length or value).
    varint: Varint,
    /// Body bytes of the current message not yet read.
    remaining: usize,
    /// What is known of the current message.
    header: MessageHeader,
}

impl Default for BoundaryTracker {
    fn default() -> Self {
        Self::new()
    }
}

/// What one call to [`BoundaryTracker::advance`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Input bytes used; when `completed` is set, a message ends right after them.
    pub consumed: usize,
    /// The header of the message that ended at `consumed`, if one did.
    pub completed: Option<MessageHeader>,
}

impl BoundaryTracker {
    /// A tracker at the start of a stream.
    pub fn new() -> Self {
        Self {
            state: State::Prefix(None),
            varint: Varint::default(),
            remaining: 0,
            header: MessageHeader::default(),
        }
    }

    /// True between messages: the only place the relay may inject a message of its own.
    pub fn at_boundary(&self) -> bool {
        self.state == State::Prefix(None)
    }

    /// Reads `input` up to the end of the current message (or all of it).
    pub fn advance(&mut self, input: &[u8]) -> Result<Progress, StreamError> {
        let mut at = 0;
        while at < input.len() {
            match self.state {
                State::Prefix(None) => {
                    self.state = State::Prefix(Some(input[at]));
                    at += 1;
                }
                State::Prefix(Some(high)) => {
                    let len = usize::from(u16::from_be_bytes([high, input[at]]));
                    at += 1;
                    self.header = MessageHeader {
                        len,
                        ..MessageHeader::default()
                    };
                    self.remaining = len;
                    self.state = State::Body(Field::Key);
                    if len == 0 {
                        return self.finish(at);
                    }
                }
                State::Body(field) => {
                    let body_end = at + self.remaining.min(input.len() - at);
                    let used = self.scan(field, &input[at..body_end])?;
                    at += used;
                    self.remaining -= used;
                    if self.remaining == 0 {
                        return self.finish(at);
                    }
                }
            }
        }
        Ok(Progress {
            consumed: at,
            completed: None,
        })
    }

    /// Feeds a whole chunk, calling `on_message(end, header)` for each message ending in it,
    /// where `end` is the offset in `chunk` just after the message.
    pub fn feed<E: From<StreamError>>(
        &mut self,
        chunk: &[u8],
        mut on_message: impl FnMut(usize, &MessageHeader) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut at = 0;
        while at < chunk.len() {
            let progress = self.advance(&chunk[at..])?;
            at += progress.consumed;
            if let Some(header) = progress.completed {
                on_message(at, &header)?;
            }
        }
        Ok(())
    }

    /// Ends the current message: it must not stop inside a field.
    fn finish(&mut self, consumed: usize) -> Result<Progress, StreamError> {
        if self.state != State::Body(Field::Key) || self.varint.shift != 0 {
            return Err(StreamError::Truncated);
        }
        if self.header.service_id_len <= MAX_SERVICE_ID_LEN && self.header.service_id().is_none() {
            return Err(StreamError::ServiceIdNotUtf8);
        }
        self.state = State::Prefix(None);
        Ok(Progress {
            consumed,
            completed: Some(self.header),
        })
    }

    /// Scans body bytes (all within the current message) from `field`; returns bytes used.
    fn scan(&mut self, mut field: Field, body: &[u8]) -> Result<usize, StreamError> {
        let mut at = 0;
        while at < body.len() {
            // Body bytes left after the ones read so far, to refuse fields that overrun.
            let left = self.remaining - at;
            match field {
                Field::Key | Field::Varint(_) | Field::Length(_) => {
                    let byte = body[at];
                    at += 1;
                    if let Some(value) = self.varint.push(byte)? {
                        field = self.on_varint(field, value, left - 1)?;
                    }
                }
                Field::Skip(n) => {
                    let take = n.min(body.len() - at);
                    at += take;
                    field = if take == n {
                        Field::Key
                    } else {
                        Field::Skip(n - take)
                    };
                }
                Field::ServiceId(n) => {
                    let take = n.min(body.len() - at);
                    self.header.push_service_id(&body[at..at + take]);
                    at += take;
                    field = if take == n {
                        Field::Key
                    } else {
                        Field::ServiceId(n - take)
                    };
                }
            }
        }
        self.state = State::Body(field);
        Ok(at)
    }

    /// Acts on a complete varint read in state `field`; `left` is body bytes after it.
    fn on_varint(&mut self, field: Field, value: u64, left: usize) -> Result<Field, StreamError> {
        let h = &mut self.header;
        match field {
            Field::Key => {
                let key = u32::try_from(value).map_err(|_| StreamError::InvalidKey(value))?;
                let (number, wire_type) = (key >> 3, (key & 7) as u8);
                if number == 0 || wire_type > 5 {
                    return Err(StreamError::InvalidKey(value));
                }
                let expected = match number {
                    1 | 2 | 3 | 7 => Some(0),
                    4..=6 => Some(2),
                    _ => None,
                };
                if expected.is_some_and(|w| w != wire_type) || matches!(wire_type, 3 | 4) {
                    return Err(StreamError::WireType {
                        field: number,
                        wire_type,
                    });
                }
                let skip = |n: usize| {
                    if n > left {
                        Err(StreamError::Truncated)
                    } else {
                        Ok(Field::Skip(n))
                    }
                };
                match wire_type {
                    0 => Ok(Field::Varint(number)),
                    1 => skip(8),
                    2 => Ok(Field::Length(number)),
                    _ => skip(4),
                }
            }
            // Truncating casts match prost: int32, enum and uint32 keep the low 32 bits.
            Field::Varint(1) => {
                h.message_type = value as i32;
                Ok(Field::Key)
            }
            Field::Varint(2) => {
                h.stream_id = value as i32;
                Ok(Field::Key)
            }
            Field::Varint(3) => {
                h.ignorable = value != 0;
                Ok(Field::Key)
            }
            Field::Varint(7) => {
                h.connection_id = value as u32;
                Ok(Field::Key)
            }
            Field::Varint(_) => Ok(Field::Key),
            Field::Length(number) => {
                let len = match usize::try_from(value) {
                    Ok(len) if len <= left => len,
                    _ => return Err(StreamError::Truncated),
                };
                match number {
                    4 if len > MAX_PAYLOAD => Err(StreamError::PayloadTooLarge(len)),
                    4 => {
                        h.payload_len = len;
                        Ok(Field::Skip(len))
                    }
                    5 => {
                        // The last occurrence wins, as in protobuf.
                        h.service_id_len = 0;
                        Ok(Field::ServiceId(len))
                    }
                    6 => {
                        h.available_service_ids += 1;
                        Ok(Field::Skip(len))
                    }
                    _ => Ok(Field::Skip(len)),
                }
                .map(|f| if len == 0 { Field::Key } else { f })
            }
            Field::Skip(_) | Field::ServiceId(_) => Ok(field),
        }
    }
}

/// Appends `[u16 length][message]` to `out`.
pub fn encode_into(message: &Message, out: &mut Vec<u8>) -> Result<(), StreamError> {
    let len = message.encoded_len();
    let prefix = u16::try_from(len).map_err(|_| StreamError::MessageTooLarge(len))?;
    out.reserve(LENGTH_PREFIX + len);
    out.extend_from_slice(&prefix.to_be_bytes());
    message
        .encode(out)
        .map_err(|_| StreamError::MessageTooLarge(len))
}

/// `[u16 length][message]` as one WebSocket frame payload.
pub fn encode_frame_payload(message: &Message) -> Result<Vec<u8>, StreamError> {
    let mut out = Vec::new();
    encode_into(message, &mut out)?;
    Ok(out)
}

/// A complete server WebSocket frame carrying one message (the relay sends each of its own
/// messages in a frame of its own: PROTOCOLS.md, "Framing").
pub fn server_frame(message: &Message) -> Result<Vec<u8>, StreamError> {
    Ok(ws::server_frame(
        true,
        OpCode::Binary,
        &encode_frame_payload(message)?,
    ))
}

/// Decodes the first `[u16 length][message]` of `buf`; `Ok(None)` means more bytes are needed,
/// otherwise returns the message and the bytes it used.
pub fn decode_message(buf: &[u8]) -> Result<Option<(Message, usize)>, StreamError> {
    let Some(end) = framed_len(buf) else {
        return Ok(None);
    };
    let Some(body) = buf.get(LENGTH_PREFIX..end) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, end)))
}

/// The length of the `[u16 length][message]` starting `buf`, prefix included, once the prefix
/// is there.
pub fn framed_len(buf: &[u8]) -> Option<usize> {
    match buf {
        [high, low, ..] => Some(LENGTH_PREFIX + usize::from(u16::from_be_bytes([*high, *low]))),
        _ => None,
    }
}

/// Decodes a message's body (what follows its length prefix) and checks the payload limit;
/// from [`bytes::Bytes`] the payload is a slice of the input, not a copy.
pub fn decode_body(body: impl bytes::Buf) -> Result<Message, StreamError> {
    let message = Message::decode(body)?;
    if message.payload.len() > MAX_PAYLOAD {
        return Err(StreamError::PayloadTooLarge(message.payload.len()));
    }
    Ok(message)
}

/// SERVICE_IDS listing the tunnel's services; the relay sends it right after the upgrade.
pub fn service_ids_message<S: AsRef<str>>(services: &[S]) -> Message {
    Message {
        r#type: MessageType::ServiceIds as i32,
        available_service_ids: services.iter().map(|s| s.as_ref().to_owned()).collect(),
        ..Message::default()
    }
}

/// STREAM_RESET for a stream; `service_id` empty and `connection_id` 0 leave those fields out
/// (as V1 and V2 peers expect).
pub fn stream_reset_message(stream_id: i32, service_id: &str, connection_id: u32) -> Message {
    Message {
        r#type: MessageType::StreamReset as i32,
        stream_id,
        service_id: service_id.to_owned(),
        connection_id,
        ..Message::default()
    }
}

/// SESSION_RESET: the service ends every stream of the tunnel.
pub fn session_reset_message() -> Message {
    Message {
        r#type: MessageType::SessionReset as i32,
        ..Message::default()
    }
}

/// A message the service must refuse (PROTOCOLS.md, "What the service does"); the relay closes
/// the sender's connection with [`Violation::close_code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// Type 0 (UNKNOWN).
    #[error("message type is unset")]
    MissingType,
    /// A type value no version defines.
    #[error("unknown message type {0}")]
    UnknownType(i32),
    /// A type newer than the negotiated version.
    #[error("{message_type:?} does not exist in protocol {version:?}")]
    TypeNotInVersion {
        /// The type sent.
        message_type: MessageType,
        /// The negotiated version.
        version: ProtocolVersion,
    },
    /// STREAM_START from the destination.
    #[error("the destination may not send STREAM_START")]
    StreamStartFromDestination,
    /// A stream message with stream id 0.
    #[error("{0:?} with stream id 0")]
    ZeroStreamId(MessageType),
    /// SESSION_RESET or SERVICE_IDS from a peer: only the service sends those.
    #[error("{0:?} may only be sent by the service")]
    ServiceOnly(MessageType),
    /// A serviceId that is not one of the tunnel's services.
    #[error("serviceId is not a service of this tunnel")]
    UnknownServiceId,
}

impl Violation {
    /// Every value [`Violation::label`] returns, for creating metric series up front.
    pub const LABELS: &'static [&'static str] = &[
        "missing_type",
        "unknown_type",
        "type_not_in_version",
        "stream_start_from_destination",
        "zero_stream_id",
        "service_only",
        "unknown_service_id",
    ];

    /// The WebSocket close code for this violation.
    pub fn close_code(&self) -> u16 {
        close_code::POLICY_VIOLATION
    }

    /// A stable snake_case name, usable as a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::MissingType => "missing_type",
            Self::UnknownType(_) => "unknown_type",
            Self::TypeNotInVersion { .. } => "type_not_in_version",
            Self::StreamStartFromDestination => "stream_start_from_destination",
            Self::ZeroStreamId(_) => "zero_stream_id",
            Self::ServiceOnly(_) => "service_only",
            Self::UnknownServiceId => "unknown_service_id",
        }
    }
}

/// Applies the service's rules to a message `from` one side; returns its type when allowed.
///
/// An empty serviceId is allowed (V1 peers and single-service tunnels send none); a non-empty
/// one must be one of `services`.
pub fn check_message<S: AsRef<str>>(
    header: &MessageHeader,
    from: Side,
    version: ProtocolVersion,
    services: &[S],
) -> Result<MessageType, Violation> {
    let kind = match header.kind() {
        Some(MessageType::Unknown) => return Err(Violation::MissingType),
        Some(kind) => kind,
        None => return Err(Violation::UnknownType(header.message_type)),
    };
    if kind.since() > version {
        return Err(Violation::TypeNotInVersion {
            message_type: kind,
            version,
        });
    }
    if matches!(kind, MessageType::SessionReset | MessageType::ServiceIds) {
        return Err(Violation::ServiceOnly(kind));
    }
    if kind == MessageType::StreamStart && from == Side::Destination {
        return Err(Violation::StreamStartFromDestination);
    }
    if kind.is_stream_message() && header.stream_id == 0 {
        return Err(Violation::ZeroStreamId(kind));
    }
    match header.service_id() {
        Some("") => {}
        Some(id) if services.iter().any(|s| s.as_ref() == id) => {}
        _ => return Err(Violation::UnknownServiceId),
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(stream_id: i32, payload: &[u8]) -> Message {
        Message {
            r#type: MessageType::Data as i32,
            stream_id,
            payload: Bytes::copy_from_slice(payload),
            ..Message::default()
        }
    }

    /// Feeds `stream` in the given pieces; returns (end offset in the stream, header) per message.
    fn track(pieces: &[&[u8]]) -> Result<Vec<(usize, MessageHeader)>, StreamError> {
        let mut tracker = BoundaryTracker::new();
        let mut found = Vec::new();
        let mut base = 0;
        for piece in pieces {
            tracker.feed(piece, |end, h| {
                found.push((base + end, *h));
                Ok::<_, StreamError>(())
            })?;
            base += piece.len();
        }
        Ok(found)
    }

    fn body(bytes: &[u8]) -> Vec<u8> {
        let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn header_matches_decoded_message() {
        let message = Message {
            r#type: MessageType::StreamStart as i32,
            stream_id: -5,
            ignorable: true,
            payload: Bytes::from_static(b"abc"),
            service_id: "SSH".into(),
            available_service_ids: vec!["a".into(), "b".into()],
            connection_id: 9,
        };
        let stream = encode_frame_payload(&message).unwrap();
        let found = track(&[&stream]).unwrap();
        assert_eq!(found, vec![(stream.len(), MessageHeader::of(&message))]);
        let h = found[0].1;
        assert_eq!(h.service_id(), Some("SSH"));
        assert_eq!(h.kind(), Some(MessageType::StreamStart));
        assert_eq!(h.effective_connection_id(), 9);
        assert_eq!(
            decode_message(&stream).unwrap(),
            Some((message, stream.len()))
        );
        assert_eq!(decode_message(&stream[..stream.len() - 1]), Ok(None));
        assert_eq!(decode_message(&stream[..1]), Ok(None));
    }

    #[test]
    fn prefix_split_and_empty_messages() {
        let mut stream = body(&[]);
        stream.extend(encode_frame_payload(&data(1, b"xyz")).unwrap());
        stream.extend(body(&[]));
        let pieces: Vec<&[u8]> = stream.chunks(1).collect();
        let found = track(&pieces).unwrap();
        let ends: Vec<usize> = found.iter().map(|(end, _)| *end).collect();
        assert_eq!(ends, vec![2, stream.len() - 2, stream.len()]);
        assert_eq!(found[0].1.kind(), Some(MessageType::Unknown));

        let mut tracker = BoundaryTracker::new();
        assert!(tracker.at_boundary());
        assert_eq!(tracker.advance(&[0]).unwrap().completed, None);
        assert!(!tracker.at_boundary());
        let p = tracker.advance(&[0, 0, 1]).unwrap();
        assert_eq!((p.consumed, p.completed.map(|h| h.len)), (1, Some(0)));
        assert!(tracker.at_boundary());
    }

    #[test]
    fn malformed_messages() {
        let cases: &[(&[u8], StreamError)] = &[
            (&[0x08], StreamError::Truncated),
            (&[0x08, 0x80], StreamError::Truncated),
            (&[0x22, 0x05, 1, 2], StreamError::Truncated),
            (&[0x41, 1, 2, 3], StreamError::Truncated),
            (&[0x00], StreamError::InvalidKey(0)),
            (&[0x0E, 0], StreamError::InvalidKey(0x0E)),
            (
                &[0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
                StreamError::InvalidKey(1 << 35),
            ),
            (
                &[0x0A, 0],
                StreamError::WireType {
                    field: 1,
                    wire_type: 2,
                },
            ),
            (
                &[0x20, 0],
                StreamError::WireType {
                    field: 4,
                    wire_type: 0,
                },
            ),
            (
                &[0x43],
                StreamError::WireType {
                    field: 8,
                    wire_type: 3,
                },
            ),
            (
                &[
                    0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02,
                ],
                StreamError::VarintOverflow,
            ),
            (&[0x2A, 0x01, 0xFF], StreamError::ServiceIdNotUtf8),
        ];
        for (bytes, want) in cases {
            assert_eq!(track(&[&body(bytes)]), Err(want.clone()), "{bytes:x?}");
            assert_eq!(want.close_code(), 1002);
            assert!(StreamError::LABELS.contains(&want.label()));
            assert!(
                decode_message(&body(bytes)).is_err(),
                "prost takes {bytes:x?}"
            );
        }
        // Unknown fields of every wire type are skipped, as prost does.
        let unknown = [
            0x40, 0x01, 0x49, 1, 2, 3, 4, 5, 6, 7, 8, 0x52, 0x01, 0xAA, 0x5D, 1, 2, 3, 4, 0x08,
            0x01,
        ];
        let found = track(&[&body(&unknown)]).unwrap();
        assert_eq!(found[0].1.kind(), Some(MessageType::Data));
        assert!(decode_message(&body(&unknown)).is_ok());
    }

    #[test]
    fn repeated_service_id_keeps_the_last() {
        // Found by fuzzing: a longer first serviceId left stale bytes that equality compared.
        let found = track(&[&body(&[0x2A, 2, b'P', b'P', 0x2A, 0])]).unwrap();
        assert_eq!(found[0].1.service_id(), Some(""));
        assert_eq!(
            found[0].1,
            MessageHeader {
                len: 6,
                ..MessageHeader::default()
            }
        );
        let found = track(&[&body(&[0x2A, 2, b'P', b'Q', 0x2A, 1, b'R'])]).unwrap();
        assert_eq!(found[0].1.service_id(), Some("R"));
    }

    #[test]
    fn payload_limit() {
        let ok = data(1, &[0; MAX_PAYLOAD]);
        assert_eq!(
            track(&[&encode_frame_payload(&ok).unwrap()]).unwrap().len(),
            1
        );
        let big = encode_frame_payload(&data(1, &[0; MAX_PAYLOAD + 1])).unwrap();
        let err = StreamError::PayloadTooLarge(MAX_PAYLOAD + 1);
        assert_eq!(track(&[&big]), Err(err.clone()));
        assert_eq!(decode_message(&big), Err(err.clone()));
        assert_eq!(err.close_code(), 1009);
        // Refused as soon as the payload length is read.
        assert_eq!(track(&[&big[..10]]), Err(err));
        let huge = data(1, &[0; MAX_MESSAGE_LEN]);
        assert!(matches!(
            encode_frame_payload(&huge),
            Err(StreamError::MessageTooLarge(_))
        ));
    }

    #[test]
    fn long_service_id_is_kept_short() {
        let long = "s".repeat(MAX_SERVICE_ID_LEN + 1);
        let message = stream_reset_message(3, &long, 0);
        let found = track(&[&encode_frame_payload(&message).unwrap()]).unwrap();
        assert_eq!(found[0].1.service_id(), None);
        assert_eq!(
            check_message(&found[0].1, Side::Source, ProtocolVersion::V3, &[long]),
            Err(Violation::UnknownServiceId)
        );
    }

    #[test]
    fn rules() {
        let services = ["SSH", "HTTP"];
        let check = |m: &Message, from, version| {
            check_message(&MessageHeader::of(m), from, version, &services)
        };
        let with = |t: MessageType, stream_id: i32, service: &str| Message {
            r#type: t as i32,
            stream_id,
            service_id: service.into(),
            ..Message::default()
        };
        use MessageType::*;
        use ProtocolVersion::*;
        use Side::*;
        assert_eq!(check(&with(Data, 1, ""), Source, V1), Ok(Data));
        assert_eq!(
            check(&with(StreamStart, 1, "SSH"), Source, V2),
            Ok(StreamStart)
        );
        assert_eq!(
            check(&with(ConnectionStart, 1, "HTTP"), Source, V3),
            Ok(ConnectionStart)
        );
        assert_eq!(
            check(&with(StreamReset, 1, ""), Destination, V3),
            Ok(StreamReset)
        );
        let cases = [
            (with(Unknown, 1, ""), Source, V3, Violation::MissingType),
            (
                Message {
                    r#type: 8,
                    ..with(Data, 1, "")
                },
                Source,
                V3,
                Violation::UnknownType(8),
            ),
            (
                with(ConnectionReset, 1, ""),
                Destination,
                V2,
                Violation::TypeNotInVersion {
                    message_type: ConnectionReset,
                    version: V2,
                },
            ),
            (
                with(ServiceIds, 0, ""),
                Source,
                V1,
                Violation::TypeNotInVersion {
                    message_type: ServiceIds,
                    version: V1,
                },
            ),
            (
                with(StreamStart, 1, ""),
                Destination,
                V3,
                Violation::StreamStartFromDestination,
            ),
            (
                with(Data, 0, ""),
                Destination,
                V3,
                Violation::ZeroStreamId(Data),
            ),
            (
                with(SessionReset, 0, ""),
                Source,
                V3,
                Violation::ServiceOnly(SessionReset),
            ),
            (
                with(ServiceIds, 0, ""),
                Destination,
                V3,
                Violation::ServiceOnly(ServiceIds),
            ),
            (
                with(StreamStart, 1, "RDP"),
                Source,
                V2,
                Violation::UnknownServiceId,
            ),
        ];
        for (message, from, version, want) in cases {
            assert_eq!(check(&message, from, version), Err(want), "{message:?}");
            assert_eq!(want.close_code(), 1008);
            assert!(Violation::LABELS.contains(&want.label()));
        }
    }

    #[test]
    fn builders_and_subprotocols() {
        let ids = service_ids_message(&["SSH", "VNC"]);
        let frame = server_frame(&ids).unwrap();
        let h = ws::parse_header(&frame, ws::Sender::Server, ws::DEFAULT_MAX_PAYLOAD)
            .unwrap()
            .unwrap();
        let (decoded, used) = decode_message(&frame[h.header_len..]).unwrap().unwrap();
        assert_eq!(used, h.payload_len);
        assert_eq!(decoded.available_service_ids, ["SSH", "VNC"]);
        assert_eq!(decoded.r#type, MessageType::ServiceIds as i32);
        // Absent fields stay off the wire for older peers.
        let reset = encode_frame_payload(&stream_reset_message(7, "", 0)).unwrap();
        assert_eq!(reset, [0, 4, 0x08, 3, 0x10, 7]);
        assert_eq!(
            encode_frame_payload(&session_reset_message()).unwrap(),
            [0, 2, 0x08, 4]
        );

        assert_eq!(
            ProtocolVersion::select("aws.iot.securetunneling-1.0, aws.iot.securetunneling-3.0"),
            Some(ProtocolVersion::V3)
        );
        assert_eq!(ProtocolVersion::select("chat, superchat"), None);
        for (name, version) in SUBPROTOCOLS {
            assert_eq!(version.subprotocol(), name);
            assert_eq!(ProtocolVersion::from_subprotocol(name), Some(version));
        }
        assert!(!ProtocolVersion::V1.has_service_ids());
        assert!(ProtocolVersion::V2.has_service_ids());
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            0i32..9,
            any::<i32>(),
            any::<bool>(),
            prop_oneof![
                3 => proptest::collection::vec(any::<u8>(), 0..40),
                1 => proptest::collection::vec(any::<u8>(), 60_000..=MAX_PAYLOAD),
            ],
            "[A-Za-z0-9é-]{0,10}",
            proptest::collection::vec("[a-z]{0,5}", 0..3),
            any::<u32>(),
        )
            .prop_map(
                |(t, stream_id, ignorable, payload, service_id, ids, conn)| Message {
                    r#type: t,
                    stream_id,
                    ignorable,
                    payload: payload.into(),
                    service_id,
                    available_service_ids: ids,
                    connection_id: conn,
                },
            )
    }

    /// A small encoded message with a few bytes overwritten and maybe cut short.
    fn mutated_message() -> impl Strategy<Value = Vec<u8>> {
        (
            arb_message().prop_filter("small", |m| m.payload.len() < 100),
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(message, edits, cut)| {
                let mut bytes = message.encode_to_vec();
                if !bytes.is_empty() {
                    for (at, byte) in edits {
                        let at = at.index(bytes.len());
                        bytes[at] = byte;
                    }
                }
                let keep = cut
                    .index(bytes.len() + 1)
                    .max(bytes.len().saturating_sub(2));
                bytes.truncate(keep);
                bytes
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn boundaries_survive_any_split(messages in proptest::collection::vec(arb_message(), 1..5),
                                        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12)) {
            let mut stream = Vec::new();
            let mut want = Vec::new();
            for m in &messages {
                encode_into(m, &mut stream).unwrap();
                want.push((stream.len(), MessageHeader::of(m)));
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([stream.len()]) {
                pieces.push(&stream[at..cut]);
                at = cut;
            }
            prop_assert_eq!(track(&pieces).unwrap(), want);
            let mut decoded = Vec::new();
            let mut rest = &stream[..];
            while let Some((m, used)) = decode_message(rest).unwrap() {
                decoded.push(m);
                rest = &rest[used..];
            }
            prop_assert_eq!(decoded, messages);
        }

        #[test]
        fn tracker_agrees_with_prost(bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            mutated_message(),
        ]) {
            let stream = body(&bytes);
            let tracked = track(&[&stream]);
            match (Message::decode(&bytes[..]), tracked) {
                (Ok(m), Ok(found)) => {
                    // `len` is the bytes on the wire, which re-encoding need not reproduce.
                    let want = MessageHeader { len: bytes.len(), ..MessageHeader::of(&m) };
                    prop_assert_eq!(found, vec![(stream.len(), want)]);
                }
                // Groups are refused: proto3 has none, though prost skips unknown ones.
                (Ok(_), Err(e)) => prop_assert!(
                    matches!(e, StreamError::WireType { wire_type: 3 | 4, .. }),
                    "tracker refused what prost took: {}", e
                ),
                // Field 6 is skipped unread, so the tracker does not check it is UTF-8.
                (Err(e), Ok(_)) => prop_assert!(e.to_string().contains("string"), "{}", e),
                (Err(_), Err(_)) => {}
            }
        }
    }
}
