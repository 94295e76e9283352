//! WebSocket (RFC 6455) frame codec for the server end of a connection.
//!
//! The relay reads frames from clients (which must mask them) and writes unmasked frames. It
//! never reassembles a message to forward it: each frame is unmasked in place and re-sent with a
//! server header written into the bytes just before its payload (see [`write_header_before`]).
//! Layouts and flows are documented in [the module docs](super).

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Largest header the server writes: 2 fixed bytes + 8 bytes of 64-bit length, and no mask key
/// because server frames are never masked (RFC 6455 5.1, 5.2).
pub const MAX_SERVER_HEADER: usize = 10;

/// Largest header a client sends: [`MAX_SERVER_HEADER`] plus the 4-byte mask key (RFC 6455 5.2).
pub const MAX_CLIENT_HEADER: usize = 14;

/// Largest control frame payload (RFC 6455 5.5: control frames carry at most 125 bytes).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Default limit on one frame's payload: the AWS tunnel protocol's WebSocket frame limit
/// (PROTOCOLS.md, "WebSocket frame payload at most 131076 bytes"). Larger frames close with 1009.
pub const DEFAULT_MAX_PAYLOAD: usize = 131_076;

/// Longest close reason: a close payload is a control payload (125 bytes) less the 2-byte code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// The GUID appended to `Sec-WebSocket-Key` to compute `Sec-WebSocket-Accept` (RFC 6455 1.3).
pub const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Close status codes the relay sends or checks (RFC 6455 7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The endpoint is going away (server shutdown, peer replaced).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A data type the endpoint cannot accept (a text frame where only binary is spoken).
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Data inconsistent with the message type (a close reason that is not UTF-8).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message that violates the endpoint's policy (a tunnel rule was broken).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message too big to process.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// An unexpected condition on the server.
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// A frame opcode (RFC 6455 5.2); the other values are reserved and rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// A continuation of a fragmented message.
    Continuation = 0x0,
    /// A text data frame (both tunnel protocols reject it).
    Text = 0x1,
    /// A binary data frame.
    Binary = 0x2,
    /// A close control frame.
    Close = 0x8,
    /// A ping control frame.
    Ping = 0x9,
    /// A pong control frame.
    Pong = 0xA,
}

impl OpCode {
    /// The opcode for a 4-bit value, or `None` for a reserved value.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    /// True for close, ping and pong.
    pub fn is_control(self) -> bool {
        self as u8 & 0x8 != 0
    }
}

/// Who sent the frames being parsed: clients must mask, servers must not (RFC 6455 5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// Frames from a client; the relay parses these.
    Client,
    /// Frames from a server; clients and tests parse these.
    Server,
}

/// A parsed frame header; the payload is the `payload_len` bytes after `header_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of a message.
    pub fin: bool,
    /// The RSV1-3 bits (bit 2 = RSV1); always 0 after parsing, as no extension is negotiated.
    pub rsv: u8,
    /// The frame's opcode.
    pub opcode: OpCode,
    /// Whether the payload is masked.
    pub masked: bool,
    /// The mask key (zero when not masked).
    pub mask: [u8; 4],
    /// Bytes of header, mask key included.
    pub header_len: usize,
    /// Bytes of payload.
    pub payload_len: usize,
}

impl FrameHeader {
    /// An unmasked header as the server sends it.
    pub fn server(fin: bool, opcode: OpCode, payload_len: usize) -> Self {
        Self {
            fin,
            rsv: 0,
            opcode,
            masked: false,
            mask: [0; 4],
            header_len: encoded_header_len(payload_len, false),
            payload_len,
        }
    }

    /// A masked header as a client sends it.
    pub fn client(fin: bool, opcode: OpCode, mask: [u8; 4], payload_len: usize) -> Self {
        Self {
            masked: true,
            mask,
            header_len: encoded_header_len(payload_len, true),
            ..Self::server(fin, opcode, payload_len)
        }
    }

    /// Header plus payload bytes.
    pub fn frame_len(&self) -> usize {
        self.header_len.saturating_add(self.payload_len)
    }

    /// Writes this header with the shortest length encoding; returns the bytes written.
    pub fn encode(&self, out: &mut [u8; MAX_CLIENT_HEADER]) -> usize {
        out[0] = u8::from(self.fin) << 7 | (self.rsv & 0x7) << 4 | self.opcode as u8;
        let mask_bit = u8::from(self.masked) << 7;
        let mut len = match self.payload_len {
            n @ 0..=125 => {
                out[1] = mask_bit | n as u8;
                2
            }
            n @ 126..=0xFFFF => {
                out[1] = mask_bit | 126;
                out[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                4
            }
            n => {
                out[1] = mask_bit | 127;
                out[2..10].copy_from_slice(&(n as u64).to_be_bytes());
                10
            }
        };
        if self.masked {
            out[len..len + 4].copy_from_slice(&self.mask);
            len += 4;
        }
        len
    }
}

/// Header bytes for a payload length with the shortest encoding.
pub fn encoded_header_len(payload_len: usize, masked: bool) -> usize {
    let base = match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    };
    base + if masked { 4 } else { 0 }
}

/// Why a frame or a sequence of frames is refused; [`FrameError::close_code`] gives the close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A client frame without a mask (RFC 6455 5.1).
    #[error("client frame is not masked")]
    UnmaskedClientFrame,
    /// A server frame with a mask (RFC 6455 5.1).
    #[error("server frame is masked")]
    MaskedServerFrame,
    /// RSV bits set although no extension was negotiated.
    #[error("reserved bits {0:#05b} set without a negotiated extension")]
    ReservedBits(u8),
    /// An opcode RFC 6455 reserves.
    #[error("reserved opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A control frame announcing more than 125 bytes.
    #[error("control frame payload longer than 125 bytes")]
    ControlFrameTooLong,
    /// A control frame without FIN.
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// A 64-bit payload length with its most significant bit set (RFC 6455 5.2).
    #[error("64-bit payload length has its most significant bit set")]
    LengthMsbSet,
    /// A payload longer than the configured limit.
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Announced payload length.
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// A continuation frame with no fragmented message in progress.
    #[error("continuation frame without a message in progress")]
    ContinuationWithoutStart,
    /// A new text or binary frame while a fragmented message is in progress.
    #[error("new data frame while a fragmented message is in progress")]
    DataFrameInsideMessage,
    /// A text message where the tunnel protocols allow only binary.
    #[error("text frame where only binary frames are allowed")]
    TextFrame,
    /// A close payload of exactly one byte (a code needs two).
    #[error("close payload of 1 byte")]
    CloseTooShort,
    /// A close code that may not be sent on the wire (RFC 6455 7.4).
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// A close reason that is not UTF-8.
    #[error("close reason is not UTF-8")]
    CloseReasonNotUtf8,
}

impl FrameError {
    /// Every value [`FrameError::label`] returns, for creating metric series up front.
    pub const LABELS: &'static [&'static str] = &[
        "unmasked_client_frame",
        "masked_server_frame",
        "reserved_bits",
        "unknown_opcode",
        "control_frame_too_long",
        "fragmented_control_frame",
        "length_msb_set",
        "frame_too_large",
        "continuation_without_start",
        "data_frame_inside_message",
        "text_frame",
        "close_too_short",
        "invalid_close_code",
        "close_reason_not_utf8",
    ];

    /// The close code to send before closing the connection (RFC 6455 7.4.1).
    pub fn close_code(&self) -> u16 {
        match self {
            Self::PayloadTooLarge { .. } => close_code::MESSAGE_TOO_BIG,
            // The issue makes a text frame a protocol error in both families: 1002, like every
            // other violation (1003 would also fit RFC 6455 7.4.1, but clients key on 1002).
            Self::TextFrame => close_code::PROTOCOL_ERROR,
            Self::CloseReasonNotUtf8 => close_code::INVALID_PAYLOAD,
            _ => close_code::PROTOCOL_ERROR,
        }
    }

    /// A stable snake_case name, usable as a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnmaskedClientFrame => "unmasked_client_frame",
            Self::MaskedServerFrame => "masked_server_frame",
            Self::ReservedBits(_) => "reserved_bits",
            Self::UnknownOpcode(_) => "unknown_opcode",
            Self::ControlFrameTooLong => "control_frame_too_long",
            Self::FragmentedControlFrame => "fragmented_control_frame",
            Self::LengthMsbSet => "length_msb_set",
            Self::PayloadTooLarge { .. } => "frame_too_large",
            Self::ContinuationWithoutStart => "continuation_without_start",
            Self::DataFrameInsideMessage => "data_frame_inside_message",
            Self::TextFrame => "text_frame",
            Self::CloseTooShort => "close_too_short",
            Self::InvalidCloseCode(_) => "invalid_close_code",
            Self::CloseReasonNotUtf8 => "close_reason_not_utf8",
        }
    }
}

/// Reads `N` bytes at `at`, or `None` when the buffer is shorter.
fn bytes_at<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    buf.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Parses a client frame header at the start of `buf`: `Ok(None)` means more bytes are needed.
pub fn parse_client_header(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<FrameHeader>, FrameError> {
    parse_header(buf, Sender::Client, max_payload)
}

/// Parses a frame header from `sender` at the start of `buf`; `Ok(None)` means more bytes.
///
/// Errors are reported as soon as the bytes that prove them have arrived, so a hostile length
/// is refused before its mask key or payload is read.
pub fn parse_header(
    buf: &[u8],
    sender: Sender,
    max_payload: usize,
) -> Result<Option<FrameHeader>, FrameError> {
    let Some([b0, b1]) = bytes_at::<2>(buf, 0) else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    let rsv = (b0 >> 4) & 0x7;
    if rsv != 0 {
        return Err(FrameError::ReservedBits(rsv));
    }
    let opcode = OpCode::from_u8(b0 & 0xF).ok_or(FrameError::UnknownOpcode(b0 & 0xF))?;
    let masked = b1 & 0x80 != 0;
    match (sender, masked) {
        (Sender::Client, false) => return Err(FrameError::UnmaskedClientFrame),
        (Sender::Server, true) => return Err(FrameError::MaskedServerFrame),
        _ => {}
    }
    let len7 = b1 & 0x7F;
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::FragmentedControlFrame);
        }
        if usize::from(len7) > MAX_CONTROL_PAYLOAD {
            return Err(FrameError::ControlFrameTooLong);
        }
    }
    let (len, mut header_len) = match len7 {
        126 => match bytes_at::<2>(buf, 2) {
            Some(b) => (u64::from(u16::from_be_bytes(b)), 4),
            None => return Ok(None),
        },
        127 => match bytes_at::<8>(buf, 2) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if len >> 63 != 0 {
        return Err(FrameError::LengthMsbSet);
    }
    let payload_len = match usize::try_from(len) {
        Ok(n) if n <= max_payload => n,
        _ => {
            return Err(FrameError::PayloadTooLarge {
                len,
                max: max_payload,
            })
        }
    };
    let mut mask = [0; 4];
    if masked {
        match bytes_at::<4>(buf, header_len) {
            Some(m) => mask = m,
            None => return Ok(None),
        }
        header_len += 4;
    }
    Ok(Some(FrameHeader {
        fin,
        rsv,
        opcode,
        masked,
        mask,
        header_len,
        payload_len,
    }))
}

/// Refuses text messages, which neither tunnel protocol allows; pass the message's opcode
/// (what [`FragmentTracker::on_frame`] returns), so continuations of a text message are caught.
pub fn reject_text(message_opcode: OpCode) -> Result<(), FrameError> {
    match message_opcode {
        OpCode::Text => Err(FrameError::TextFrame),
        _ => Ok(()),
    }
}

/// Checks fragment order across the frames of one direction of a connection (RFC 6455 5.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentTracker {
    /// Opcode of the fragmented message in progress, if any.
    message: Option<OpCode>,
}

impl FragmentTracker {
    /// A tracker at a message boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accounts for one frame; returns the opcode of the message it belongs to (a control
    /// frame's own opcode, a continuation's starting opcode).
    pub fn on_frame(&mut self, header: &FrameHeader) -> Result<OpCode, FrameError> {
        match header.opcode {
            // Control frames may be injected between fragments (RFC 6455 5.4).
            op if op.is_control() => Ok(op),
            OpCode::Continuation => {
                let op = self.message.ok_or(FrameError::ContinuationWithoutStart)?;
                if header.fin {
                    self.message = None;
                }
                Ok(op)
            }
            op => {
                if self.message.is_some() {
                    return Err(FrameError::DataFrameInsideMessage);
                }
                if !header.fin {
                    self.message = Some(op);
                }
                Ok(op)
            }
        }
    }

    /// True while a fragmented message is in progress (only control frames may be sent now).
    pub fn in_message(&self) -> bool {
        self.message.is_some()
    }
}

/// XORs `buf` with the mask in place; applying it twice restores the input.
pub fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    // Word at a time without `unsafe`: `chunks_exact_mut` lets the compiler drop the bounds
    // checks and vectorize the loop.
    let [a, b, c, d] = mask;
    let word = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so the mask phase is 0 again.
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Unmasks `buf` when it starts `offset` bytes into a payload (for payloads read in pieces).
pub fn unmask_at(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    unmask(buf, rotate_mask(mask, offset));
}

/// The mask as seen from `offset` bytes into the payload.
fn rotate_mask(mask: [u8; 4], offset: usize) -> [u8; 4] {
    let mut rotated = mask;
    rotated.rotate_left(offset & 3);
    rotated
}

/// Unmasks one payload that arrives in pieces, keeping the mask phase between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unmasker {
    /// The frame's mask key.
    mask: [u8; 4],
    /// Payload bytes unmasked so far.
    offset: usize,
}

impl Unmasker {
    /// An unmasker at the start of a payload masked with `mask`.
    pub fn new(mask: [u8; 4]) -> Self {
        Self { mask, offset: 0 }
    }

    /// Unmasks the next piece of the payload in place.
    pub fn apply(&mut self, piece: &mut [u8]) {
        unmask_at(piece, self.mask, self.offset);
        self.offset = self.offset.wrapping_add(piece.len());
    }

    /// Payload bytes unmasked so far.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

/// Writes an unmasked server header for a payload; returns the bytes written.
pub fn encode_server_header(
    fin: bool,
    opcode: OpCode,
    payload_len: usize,
    out: &mut [u8; MAX_SERVER_HEADER],
) -> usize {
    let mut full = [0; MAX_CLIENT_HEADER];
    let len = FrameHeader::server(fin, opcode, payload_len).encode(&mut full);
    out[..len].copy_from_slice(&full[..len]);
    len
}

/// Not enough room before a payload for its server header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{need} header bytes needed before the payload at {have}")]
pub struct HeadroomError {
    /// Header bytes needed.
    pub need: usize,
    /// Bytes available before the payload (the payload's start offset).
    pub have: usize,
}

/// Writes a server header ending exactly at `payload_start`; returns where the frame starts.
///
/// With `payload_start == MAX_SERVER_HEADER` any payload fits. A forwarded client frame can also
/// reuse its own header's bytes: the client header is always 4 bytes longer than the server
/// header for the same payload, so the frame becomes `buf[start..payload_start + payload_len]`
/// with no copy of the payload.
pub fn write_header_before(
    buf: &mut [u8],
    payload_start: usize,
    fin: bool,
    opcode: OpCode,
    payload_len: usize,
) -> Result<usize, HeadroomError> {
    let mut header = [0; MAX_SERVER_HEADER];
    let len = encode_server_header(fin, opcode, payload_len, &mut header);
    let have = payload_start.min(buf.len());
    let start = have
        .checked_sub(len)
        .ok_or(HeadroomError { need: len, have })?;
    buf[start..have].copy_from_slice(&header[..len]);
    Ok(start)
}

/// A complete unmasked server frame holding `payload`.
pub fn server_frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut header = [0; MAX_SERVER_HEADER];
    let len = encode_server_header(fin, opcode, payload.len(), &mut header);
    let mut frame = Vec::with_capacity(len + payload.len());
    frame.extend_from_slice(&header[..len]);
    frame.extend_from_slice(payload);
    frame
}

/// A complete masked client frame holding `payload` (for agents, tests and fuzzing).
pub fn client_frame(fin: bool, opcode: OpCode, mask: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut header = [0; MAX_CLIENT_HEADER];
    let len = FrameHeader::client(fin, opcode, mask, payload.len()).encode(&mut header);
    let mut frame = Vec::with_capacity(len + payload.len());
    frame.extend_from_slice(&header[..len]);
    frame.extend_from_slice(payload);
    unmask(&mut frame[len..], mask);
    frame
}

/// A server ping frame, or an error when `payload` exceeds 125 bytes.
pub fn ping_frame(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    control_frame(OpCode::Ping, payload)
}

/// A server pong frame answering a ping with `payload` (RFC 6455 5.5.3: same payload).
pub fn pong_frame(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    control_frame(OpCode::Pong, payload)
}

/// A control frame after checking the 125-byte limit.
fn control_frame(opcode: OpCode, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    if payload.len() > MAX_CONTROL_PAYLOAD {
        return Err(FrameError::ControlFrameTooLong);
    }
    Ok(server_frame(true, opcode, payload))
}

/// A close payload: the code, then `reason` cut at a character boundary to 123 bytes.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    payload
}

/// A complete server close frame with `code` and `reason` (truncated to fit).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    server_frame(true, OpCode::Close, &close_payload(code, reason))
}

/// The contents of a received close frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseFrame<'a> {
    /// The status code.
    pub code: u16,
    /// The UTF-8 reason, possibly empty.
    pub reason: &'a str,
}

/// True for codes a peer may put in a close frame (RFC 6455 7.4.1-7.4.2, IANA registry).
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Parses a received close payload; `Ok(None)` for an empty one (no status code).
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<CloseFrame<'_>>, FrameError> {
    let Some(code) = bytes_at::<2>(payload, 0).map(u16::from_be_bytes) else {
        return if payload.is_empty() {
            Ok(None)
        } else {
            Err(FrameError::CloseTooShort)
        };
    };
    if !is_valid_close_code(code) {
        return Err(FrameError::InvalidCloseCode(code));
    }
    let reason = std::str::from_utf8(payload.get(2..).unwrap_or_default())
        .map_err(|_| FrameError::CloseReasonNotUtf8)?;
    Ok(Some(CloseFrame { code, reason }))
}

/// The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key` (RFC 6455 4.2.2).
pub fn accept_key(sec_websocket_key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(sec_websocket_key.as_bytes());
    sha1.update(WEBSOCKET_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

/// True when a `Sec-WebSocket-Key` is base64 of 16 bytes, as RFC 6455 4.1 requires.
pub fn is_valid_client_key(sec_websocket_key: &str) -> bool {
    let mut decoded = [0; 18];
    matches!(
        base64::engine::general_purpose::STANDARD
            .decode_slice(sec_websocket_key.as_bytes(), &mut decoded),
        Ok(16)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn parse(buf: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
        parse_client_header(buf, DEFAULT_MAX_PAYLOAD)
    }

    #[test]
    fn rfc_examples_parse() {
        // RFC 6455 5.7: a masked "Hello".
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let h = parse(&frame).unwrap().unwrap();
        assert_eq!(
            h,
            FrameHeader::client(true, OpCode::Text, [0x37, 0xfa, 0x21, 0x3d], 5)
        );
        let mut payload = frame[h.header_len..].to_vec();
        unmask(&mut payload, h.mask);
        assert_eq!(payload, b"Hello");
        assert_eq!(reject_text(OpCode::Text), Err(FrameError::TextFrame));
        assert_eq!(FrameError::TextFrame.close_code(), 1002);
        // RFC 6455 5.7: an unmasked "Hello" from the server.
        assert_eq!(
            server_frame(true, OpCode::Text, b"Hello"),
            [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
        );
        // RFC 6455 5.7: 256 bytes and 64 KiB in one unmasked frame.
        assert_eq!(
            server_frame(true, OpCode::Binary, &[0; 256])[..4],
            [0x82, 0x7E, 0x01, 0x00]
        );
        assert_eq!(
            server_frame(true, OpCode::Binary, &[0; 65536])[..10],
            [0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]
        );
    }

    #[test]
    fn round_trip_boundary_lengths() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 131_076] {
            for fin in [true, false] {
                let h = FrameHeader::client(fin, OpCode::Binary, MASK, len);
                let mut out = [0; MAX_CLIENT_HEADER];
                let n = h.encode(&mut out);
                assert_eq!(n, h.header_len);
                assert_eq!(parse(&out[..n]), Ok(Some(h)), "len {len}");
                for short in 0..n {
                    assert_eq!(parse(&out[..short]), Ok(None), "len {len} cut {short}");
                }

                let mut server = [0; MAX_SERVER_HEADER];
                let n = encode_server_header(fin, OpCode::Binary, len, &mut server);
                let parsed = parse_header(&server[..n], Sender::Server, DEFAULT_MAX_PAYLOAD);
                assert_eq!(
                    parsed,
                    Ok(Some(FrameHeader::server(fin, OpCode::Binary, len)))
                );
                assert_eq!(n + 4, encoded_header_len(len, true));
            }
        }
    }

    #[test]
    fn payload_limit() {
        let over = FrameHeader::client(true, OpCode::Binary, MASK, DEFAULT_MAX_PAYLOAD + 1);
        let mut out = [0; MAX_CLIENT_HEADER];
        let n = over.encode(&mut out);
        let err = parse(&out[..n]).unwrap_err();
        assert_eq!(
            err,
            FrameError::PayloadTooLarge {
                len: DEFAULT_MAX_PAYLOAD as u64 + 1,
                max: DEFAULT_MAX_PAYLOAD
            }
        );
        assert_eq!(err.close_code(), 1009);
        // Refused before the mask key arrives.
        assert_eq!(parse(&out[..10]), Err(err));
        // A smaller configured limit applies to 7- and 16-bit lengths too.
        let small = client_frame(true, OpCode::Binary, MASK, &[1; 100]);
        assert!(matches!(
            parse_client_header(&small, 99),
            Err(FrameError::PayloadTooLarge { len: 100, max: 99 })
        ));
        assert!(parse_client_header(&small, 100).unwrap().is_some());
    }

    #[test]
    fn every_header_error() {
        let cases: &[(&[u8], FrameError)] = &[
            (&[0x82, 0x05], FrameError::UnmaskedClientFrame),
            (&[0xC2, 0x85], FrameError::ReservedBits(0b100)),
            (&[0x92, 0x85], FrameError::ReservedBits(0b001)),
            (&[0x83, 0x85], FrameError::UnknownOpcode(3)),
            (&[0x8B, 0x85], FrameError::UnknownOpcode(0xB)),
            (&[0x89, 0xFE], FrameError::ControlFrameTooLong),
            (&[0x88, 0xFF], FrameError::ControlFrameTooLong),
            (&[0x09, 0x80], FrameError::FragmentedControlFrame),
            (
                &[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0],
                FrameError::LengthMsbSet,
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse(bytes), Err(*want), "{bytes:x?}");
            assert_eq!(want.close_code(), 1002);
            assert!(FrameError::LABELS.contains(&want.label()));
        }
        assert_eq!(
            parse_header(&[0x82, 0x85], Sender::Server, 10),
            Err(FrameError::MaskedServerFrame)
        );
        // Non-minimal length encodings are accepted.
        let h = parse(&[0x82, 0xFE, 0, 5, 1, 2, 3, 4]).unwrap().unwrap();
        assert_eq!((h.payload_len, h.header_len), (5, 8));
        let h = parse(&[0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0, 5, 1, 2, 3, 4])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, h.header_len), (5, 14));
    }

    #[test]
    fn fragments() {
        let frame = |fin, opcode| FrameHeader::client(fin, opcode, MASK, 1);
        let mut t = FragmentTracker::new();
        assert_eq!(t.on_frame(&frame(true, OpCode::Binary)), Ok(OpCode::Binary));
        assert!(!t.in_message());
        assert_eq!(
            t.on_frame(&frame(false, OpCode::Binary)),
            Ok(OpCode::Binary)
        );
        assert!(t.in_message());
        assert_eq!(t.on_frame(&frame(true, OpCode::Ping)), Ok(OpCode::Ping));
        assert_eq!(
            t.on_frame(&frame(false, OpCode::Continuation)),
            Ok(OpCode::Binary)
        );
        assert_eq!(
            t.on_frame(&frame(true, OpCode::Binary)),
            Err(FrameError::DataFrameInsideMessage)
        );
        assert_eq!(
            t.on_frame(&frame(true, OpCode::Continuation)),
            Ok(OpCode::Binary)
        );
        assert!(!t.in_message());
        assert_eq!(
            t.on_frame(&frame(true, OpCode::Continuation)),
            Err(FrameError::ContinuationWithoutStart)
        );
        // Continuations of a text message report Text, so reject_text catches them.
        assert_eq!(t.on_frame(&frame(false, OpCode::Text)), Ok(OpCode::Text));
        assert_eq!(
            t.on_frame(&frame(true, OpCode::Continuation))
                .map(reject_text),
            Ok(Err(FrameError::TextFrame))
        );
    }

    #[test]
    fn headroom() {
        // Reserved headroom.
        let payload = [7u8; 300];
        let mut buf = vec![0; MAX_SERVER_HEADER];
        buf.extend_from_slice(&payload);
        let start =
            write_header_before(&mut buf, MAX_SERVER_HEADER, true, OpCode::Binary, 300).unwrap();
        assert_eq!(start, MAX_SERVER_HEADER - 4);
        assert_eq!(
            buf[start..],
            server_frame(true, OpCode::Binary, &payload)[..]
        );
        // Too little room.
        assert_eq!(
            write_header_before(&mut buf, 3, true, OpCode::Binary, 300),
            Err(HeadroomError { need: 4, have: 3 })
        );
        assert_eq!(
            write_header_before(&mut [0; 2], 10, true, OpCode::Binary, 0),
            Ok(0)
        );
        // In place over a client frame's own header.
        for len in [0, 125, 126, 65535, 65536] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = client_frame(false, OpCode::Binary, MASK, &data);
            let h = parse(&buf).unwrap().unwrap();
            unmask(&mut buf[h.header_len..], h.mask);
            let start = write_header_before(&mut buf, h.header_len, h.fin, h.opcode, h.payload_len)
                .unwrap();
            assert_eq!(start, 4);
            assert_eq!(buf[start..], server_frame(false, OpCode::Binary, &data)[..]);
        }
    }

    #[test]
    fn control_frames() {
        assert_eq!(ping_frame(b"hi").unwrap(), [0x89, 2, b'h', b'i']);
        assert_eq!(pong_frame(&[1; 125]).unwrap().len(), 127);
        assert_eq!(pong_frame(&[1; 126]), Err(FrameError::ControlFrameTooLong));
        assert_eq!(close_frame(1000, ""), [0x88, 2, 0x03, 0xE8]);
        // The reason is cut to 123 bytes on a character boundary.
        let long = "é".repeat(100);
        let payload = close_payload(1001, &long);
        assert_eq!(payload.len(), 2 + 122);
        let parsed = parse_close_payload(&payload).unwrap().unwrap();
        assert_eq!(parsed.code, 1001);
        assert_eq!(parsed.reason, "é".repeat(61));
        assert_eq!(close_frame(1000, &long).len(), 2 + 124);
        // Received close payloads.
        assert_eq!(parse_close_payload(&[]), Ok(None));
        assert_eq!(parse_close_payload(&[3]), Err(FrameError::CloseTooShort));
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 2999, 5000] {
            let err = parse_close_payload(&bad.to_be_bytes()).unwrap_err();
            assert_eq!(err, FrameError::InvalidCloseCode(bad));
            assert_eq!(err.close_code(), 1002);
        }
        let err = parse_close_payload(&[0x03, 0xE8, 0xFF]).unwrap_err();
        assert_eq!(err, FrameError::CloseReasonNotUtf8);
        assert_eq!(err.close_code(), 1007);
    }

    #[test]
    fn handshake_key() {
        // RFC 6455 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(is_valid_client_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_valid_client_key("dGhlIHNhbXBsZSBub25jZQ"));
        assert!(!is_valid_client_key("aGVsbG8="));
        assert!(!is_valid_client_key("dGhlIHNhbXBsZSBub25jZXh4eA=="));
    }

    proptest! {
        #[test]
        fn unmask_is_an_involution(data in proptest::collection::vec(any::<u8>(), 0..300),
                                   mask in any::<[u8; 4]>()) {
            let mut buf = data.clone();
            unmask(&mut buf, mask);
            let naive: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
            prop_assert_eq!(&buf, &naive);
            unmask(&mut buf, mask);
            prop_assert_eq!(buf, data);
        }

        #[test]
        fn piecewise_unmask_equals_whole(data in proptest::collection::vec(any::<u8>(), 0..300),
                                         mask in any::<[u8; 4]>(),
                                         cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6)) {
            let mut whole = data.clone();
            unmask(&mut whole, mask);
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
            cuts.sort_unstable();
            let mut pieces = data.clone();
            let mut unmasker = Unmasker::new(mask);
            let mut at = 0;
            for cut in cuts.into_iter().chain([data.len()]) {
                unmasker.apply(&mut pieces[at..cut]);
                at = cut;
            }
            prop_assert_eq!(unmasker.offset(), data.len());
            prop_assert_eq!(pieces, whole);
        }

        #[test]
        fn header_round_trip(fin in any::<bool>(),
                             opcode in prop::sample::select(vec![OpCode::Continuation, OpCode::Text, OpCode::Binary]),
                             mask in any::<[u8; 4]>(),
                             len in prop_oneof![0usize..300, 65_000usize..66_000, 131_000usize..=131_076]) {
            let h = FrameHeader::client(fin, opcode, mask, len);
            let mut out = [0; MAX_CLIENT_HEADER];
            let n = h.encode(&mut out);
            prop_assert_eq!(parse(&out[..n]), Ok(Some(h)));
        }

        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..20),
                               max in 0usize..200_000) {
            for sender in [Sender::Client, Sender::Server] {
                if let Ok(Some(h)) = parse_header(&bytes, sender, max) {
                    prop_assert!(h.header_len <= bytes.len());
                    prop_assert!(h.payload_len <= max);
                }
            }
            let _ = parse_close_payload(&bytes);
        }
    }
}
