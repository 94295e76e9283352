//! The Alibaba Cloud IoT secure tunnel protocol (`aliyun.iot.securetunnel-v1.1`): one tunnel
//! frame per WebSocket message, `[u16 header length][JSON header][payload]`.
//! Layouts and flows are documented in [the module docs](super).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proto::ws::{self, close_code, OpCode};

/// The WebSocket subprotocol (PROTOCOLS.md, "Handshake").
pub const SUBPROTOCOL: &str = "aliyun.iot.securetunnel-v1.1";

/// A plain header one official client sends instead of `Sec-WebSocket-Protocol`; accept either.
pub const SUBPROTOCOL_FALLBACK_HEADER: &str = "subprotocol";

/// The header carrying the access token.
pub const TOKEN_HEADER: &str = "tunnel-access-token";

/// Bytes of the big-endian header length before the JSON header.
pub const LENGTH_PREFIX: usize = 2;

/// Longest JSON header (PROTOCOLS.md, "header length, at most 2048").
pub const MAX_HEADER_LEN: usize = 2048;

/// Longest payload (PROTOCOLS.md, "payload, at most 4 KiB").
pub const MAX_PAYLOAD_LEN: usize = 4096;

/// Longest frame, and so the most the relay buffers to reassemble a fragmented WebSocket message.
pub const MAX_FRAME_LEN: usize = LENGTH_PREFIX + MAX_HEADER_LEN + MAX_PAYLOAD_LEN;

/// Longest `service_type` (PROTOCOLS.md: "up to 16 chars of `[A-Za-z_.-]`").
pub const MAX_SERVICE_TYPE_LEN: usize = 16;

/// Sessions per tunnel unless configured otherwise: the vendor service's limit (PROTOCOLS.md).
pub const DEFAULT_MAX_SESSIONS: usize = 10;

/// How long the relay waits for the device's answer to session_create (PROTOCOLS.md step 3).
pub const SESSION_CREATE_TIMEOUT: Duration = Duration::from_secs(10);

/// `code` values of a common_response payload (PROTOCOLS.md, session flow table).
pub mod response_code {
    /// The device opened the session.
    pub const SUCCESS: i64 = 0;
    /// The relay refused: the tunnel has as many sessions as it may.
    pub const SESSION_LIMIT: i64 = 1;
    /// The device refused the session.
    pub const DEVICE_REFUSED: i64 = 2;
    /// The relay gave up waiting for the device's answer. PROTOCOLS.md names the timeout answer
    /// but leaves its code unassigned; 3 is the first code its table does not use.
    pub const TIMEOUT: i64 = 3;
}

/// `code` values of a session_release payload (PROTOCOLS.md, session flow table).
pub mod release_code {
    /// The client closed the session.
    pub const CLIENT_CLOSED: i64 = 0;
    /// The device closed the session.
    pub const DEVICE_CLOSED: i64 = 1;
    /// The relay saw the client disconnect.
    pub const CLIENT_DISCONNECTED: i64 = 2;
    /// The relay saw the device disconnect.
    pub const DEVICE_DISCONNECTED: i64 = 3;
    /// The relay is restarting; reconnect after 1 s.
    pub const RELAY_RESTARTING: i64 = 4;
}

/// The `frame_type` header field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "i64")]
pub enum FrameType {
    /// An answer to session_create, payload `{"code", "msg"}`.
    CommonResponse = 1,
    /// The client asks for a session to a service.
    SessionCreate = 2,
    /// Either side ends a session, payload `{"code", "msg"}`.
    SessionRelease = 3,
    /// Tunnel bytes of a session.
    DataTransport = 4,
}

impl From<FrameType> for i64 {
    fn from(frame_type: FrameType) -> Self {
        frame_type as i64
    }
}

impl TryFrom<i64> for FrameType {
    type Error = AliyunError;

    fn try_from(value: i64) -> Result<Self, AliyunError> {
        Ok(match value {
            1 => Self::CommonResponse,
            2 => Self::SessionCreate,
            3 => Self::SessionRelease,
            4 => Self::DataTransport,
            _ => return Err(AliyunError::UnknownFrameType(value)),
        })
    }
}

/// The JSON header of a tunnel frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrameHeader {
    /// What the frame is.
    pub frame_type: FrameType,
    /// Assigned by the relay; absent only in the client's session_create.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Chosen by the sender, increasing; answers echo it.
    pub frame_id: i64,
    /// The service a session is for (clients send e.g. `_SSH`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_type: Option<String>,
}

/// The header as it arrives, before its frame type is checked.
#[derive(Deserialize)]
struct RawHeader {
    /// See [`FrameHeader::frame_type`].
    frame_type: i64,
    /// See [`FrameHeader::session_id`].
    session_id: Option<String>,
    /// See [`FrameHeader::frame_id`].
    frame_id: i64,
    /// See [`FrameHeader::service_type`].
    service_type: Option<String>,
}

impl FrameHeader {
    /// Checks that the fields this frame type needs are there: session_create needs a
    /// service_type, every other frame a session_id.
    pub fn check_fields(&self) -> Result<(), AliyunError> {
        match self.frame_type {
            FrameType::SessionCreate if self.service_type.is_none() => {
                Err(AliyunError::MissingServiceType)
            }
            FrameType::SessionCreate => Ok(()),
            other if self.session_id.is_none() => Err(AliyunError::MissingSessionId(other)),
            _ => Ok(()),
        }
    }
}

/// A parsed tunnel frame borrowing its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The JSON header.
    pub header: FrameHeader,
    /// The bytes after the header.
    pub payload: &'a [u8],
}

/// The `{"code", "msg"}` payload of common_response and session_release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponsePayload {
    /// A [`response_code`] or [`release_code`] value.
    pub code: i64,
    /// A human-readable explanation.
    pub msg: String,
}

/// Why a tunnel frame is refused.
#[derive(Debug, thiserror::Error)]
pub enum AliyunError {
    /// Fewer than 2 bytes: no header length.
    #[error("frame of {0} bytes has no header length")]
    TooShort(usize),
    /// A header length of 0.
    #[error("empty header")]
    EmptyHeader,
    /// A header longer than [`MAX_HEADER_LEN`].
    #[error("header of {0} bytes exceeds {MAX_HEADER_LEN}")]
    HeaderTooLong(usize),
    /// The frame ends inside its header.
    #[error("frame of {len} bytes ends inside its {header_len}-byte header")]
    TruncatedHeader {
        /// Frame length.
        len: usize,
        /// Announced header length.
        header_len: usize,
    },
    /// A payload longer than [`MAX_PAYLOAD_LEN`].
    #[error("payload of {0} bytes exceeds {MAX_PAYLOAD_LEN}")]
    PayloadTooLarge(usize),
    /// A header that is not UTF-8.
    #[error("header is not UTF-8")]
    HeaderNotUtf8,
    /// A header (or response payload) that is not the expected JSON object.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A frame_type other than 1-4.
    #[error("unknown frame_type {0}")]
    UnknownFrameType(i64),
    /// A service_type that is empty, too long or has characters outside `[A-Za-z_.-]`.
    #[error("invalid service_type")]
    InvalidServiceType,
    /// A frame other than session_create without a session_id.
    #[error("{0:?} without session_id")]
    MissingSessionId(FrameType),
    /// A session_create without a service_type.
    #[error("session_create without service_type")]
    MissingServiceType,
}

impl AliyunError {
    /// Every value [`AliyunError::label`] returns, for creating metric series up front.
    pub const LABELS: &'static [&'static str] = &[
        "too_short",
        "empty_header",
        "header_too_long",
        "truncated_header",
        "payload_too_large",
        "header_not_utf8",
        "json",
        "unknown_frame_type",
        "invalid_service_type",
        "missing_session_id",
        "missing_service_type",
    ];

    /// The WebSocket close code for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::HeaderTooLong(_) | Self::PayloadTooLarge(_) => close_code::MESSAGE_TOO_BIG,
            _ => close_code::PROTOCOL_ERROR,
        }
    }

    /// A stable snake_case name, usable as a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TooShort(_) => "too_short",
            Self::EmptyHeader => "empty_header",
            Self::HeaderTooLong(_) => "header_too_long",
            Self::TruncatedHeader { .. } => "truncated_header",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::HeaderNotUtf8 => "header_not_utf8",
            Self::Json(_) => "json",
            Self::UnknownFrameType(_) => "unknown_frame_type",
            Self::InvalidServiceType => "invalid_service_type",
            Self::MissingSessionId(_) => "missing_session_id",
            Self::MissingServiceType => "missing_service_type",
        }
    }
}

/// True for 1-16 characters of `[A-Za-z_.-]`.
pub fn is_valid_service_type(service_type: &str) -> bool {
    (1..=MAX_SERVICE_TYPE_LEN).contains(&service_type.len())
        && service_type
            .bytes()
            .all(|b| b.is_ascii_alphabetic() || matches!(b, b'_' | b'.' | b'-'))
}

/// Parses one tunnel frame: the whole payload of one binary WebSocket message.
pub fn parse_frame(buf: &[u8]) -> Result<Frame<'_>, AliyunError> {
    let Some(&[high, low]) = buf.get(..LENGTH_PREFIX) else {
        return Err(AliyunError::TooShort(buf.len()));
    };
    let header_len = usize::from(u16::from_be_bytes([high, low]));
    if header_len == 0 {
        return Err(AliyunError::EmptyHeader);
    }
    if header_len > MAX_HEADER_LEN {
        return Err(AliyunError::HeaderTooLong(header_len));
    }
    let header_end = LENGTH_PREFIX + header_len;
    let (Some(header), Some(payload)) = (buf.get(LENGTH_PREFIX..header_end), buf.get(header_end..))
    else {
        return Err(AliyunError::TruncatedHeader {
            len: buf.len(),
            header_len,
        });
    };
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(AliyunError::PayloadTooLarge(payload.len()));
    }
    let header = std::str::from_utf8(header).map_err(|_| AliyunError::HeaderNotUtf8)?;
    let raw: RawHeader = serde_json::from_str(header)?;
    let header = FrameHeader {
        frame_type: FrameType::try_from(raw.frame_type)?,
        session_id: raw.session_id,
        frame_id: raw.frame_id,
        service_type: raw.service_type,
    };
    if header
        .service_type
        .as_deref()
        .is_some_and(|s| !is_valid_service_type(s))
    {
        return Err(AliyunError::InvalidServiceType);
    }
    Ok(Frame { header, payload })
}

/// Appends a tunnel frame to `out` after checking the limits.
pub fn encode_frame_into(
    header: &FrameHeader,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), AliyunError> {
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(AliyunError::PayloadTooLarge(payload.len()));
    }
    let json = serde_json::to_vec(header)?;
    let len = u16::try_from(json.len())
        .ok()
        .filter(|&n| usize::from(n) <= MAX_HEADER_LEN)
        .ok_or(AliyunError::HeaderTooLong(json.len()))?;
    out.reserve(LENGTH_PREFIX + json.len() + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(payload);
    Ok(())
}

/// A tunnel frame, ready to be one WebSocket message's payload.
pub fn encode_frame(header: &FrameHeader, payload: &[u8]) -> Result<Vec<u8>, AliyunError> {
    let mut out = Vec::new();
    encode_frame_into(header, payload, &mut out)?;
    Ok(out)
}

/// A complete server WebSocket frame carrying one tunnel frame.
pub fn server_frame(header: &FrameHeader, payload: &[u8]) -> Result<Vec<u8>, AliyunError> {
    Ok(ws::server_frame(
        true,
        OpCode::Binary,
        &encode_frame(header, payload)?,
    ))
}

/// Reads the `{"code", "msg"}` payload of a common_response or session_release.
pub fn parse_response_payload(payload: &[u8]) -> Result<ResponsePayload, AliyunError> {
    Ok(serde_json::from_slice(payload)?)
}

/// A frame with a `{"code", "msg"}` payload.
fn response_frame(header: FrameHeader, code: i64, msg: &str) -> Result<Vec<u8>, AliyunError> {
    let payload = serde_json::to_vec(&ResponsePayload {
        code,
        msg: msg.to_owned(),
    })?;
    encode_frame(&header, &payload)
}

/// A common_response answering the session_create `frame_id` (the relay's own answers: session
/// limit, timeout).
pub fn common_response(
    session_id: Option<&str>,
    frame_id: i64,
    service_type: Option<&str>,
    code: i64,
    msg: &str,
) -> Result<Vec<u8>, AliyunError> {
    let header = FrameHeader {
        frame_type: FrameType::CommonResponse,
        session_id: session_id.map(str::to_owned),
        frame_id,
        service_type: service_type.map(str::to_owned),
    };
    response_frame(header, code, msg)
}

/// A session_release for `session_id` with a [`release_code`] value.
pub fn session_release(
    session_id: &str,
    frame_id: i64,
    code: i64,
    msg: &str,
) -> Result<Vec<u8>, AliyunError> {
    let header = FrameHeader {
        frame_type: FrameType::SessionRelease,
        session_id: Some(session_id.to_owned()),
        frame_id,
        service_type: None,
    };
    response_frame(header, code, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw(header: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn parses_client_session_create() {
        let frame = raw(
            r#"{"frame_type":2,"frame_id":1,"service_type":"_SSH","extra":true}"#,
            b"",
        );
        let parsed = parse_frame(&frame).unwrap();
        assert_eq!(
            parsed.header,
            FrameHeader {
                frame_type: FrameType::SessionCreate,
                session_id: None,
                frame_id: 1,
                service_type: Some("_SSH".into()),
            }
        );
        assert!(parsed.payload.is_empty());
        parsed.header.check_fields().unwrap();
    }

    #[test]
    fn round_trip_with_limits() {
        let header = FrameHeader {
            frame_type: FrameType::DataTransport,
            session_id: Some("s-1".into()),
            frame_id: i64::MAX,
            service_type: None,
        };
        let payload = [0xAB; MAX_PAYLOAD_LEN];
        let bytes = encode_frame(&header, &payload).unwrap();
        let parsed = parse_frame(&bytes).unwrap();
        assert_eq!((&parsed.header, parsed.payload), (&header, &payload[..]));
        // Absent options stay out of the JSON.
        let json = br#"{"frame_type":4,"session_id":"s-1","frame_id":9223372036854775807}"#;
        assert_eq!(bytes[..2], (json.len() as u16).to_be_bytes());
        assert_eq!(&bytes[2..2 + json.len()], json);
        assert_eq!(bytes.len(), 2 + json.len() + MAX_PAYLOAD_LEN);

        let err = encode_frame(&header, &[0; MAX_PAYLOAD_LEN + 1]).unwrap_err();
        assert!(matches!(err, AliyunError::PayloadTooLarge(4097)));
        let long = FrameHeader {
            session_id: Some("x".repeat(MAX_HEADER_LEN)),
            ..header
        };
        assert!(matches!(
            encode_frame(&long, b""),
            Err(AliyunError::HeaderTooLong(_))
        ));
    }

    #[test]
    fn every_parse_error() {
        let ok = r#"{"frame_type":4,"session_id":"s","frame_id":1}"#;
        let too_long = raw(&" ".repeat(MAX_HEADER_LEN + 1), b"");
        let mut truncated = raw(ok, b"");
        truncated.pop();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "too_short"),
            (vec![0], "too_short"),
            (vec![0, 0, b'{'], "empty_header"),
            (too_long, "header_too_long"),
            (truncated, "truncated_header"),
            (raw(ok, &[0; MAX_PAYLOAD_LEN + 1]), "payload_too_large"),
            (raw("\u{FFFD}", b""), "json"),
            (vec![0, 2, 0xC3, 0x28], "header_not_utf8"),
            (raw("[]", b""), "json"),
            (raw(r#"{"frame_type":4}"#, b""), "json"),
            (raw(r#"{"frame_type":"4","frame_id":1}"#, b""), "json"),
            (
                raw(r#"{"frame_type":4,"frame_id":1,"frame_id":2}"#, b""),
                "json",
            ),
            (raw(r#"{"frame_type":4,"frame_id":1} x"#, b""), "json"),
            (
                raw(r#"{"frame_type":9,"frame_id":1}"#, b""),
                "unknown_frame_type",
            ),
        ];
        for service_type in ["", "SSH1", "a b", "abcdefghijklmnopq", "ßsh"] {
            let header =
                format!(r#"{{"frame_type":2,"frame_id":1,"service_type":"{service_type}"}}"#);
            assert!(
                matches!(
                    parse_frame(&raw(&header, b"")),
                    Err(AliyunError::InvalidServiceType)
                ),
                "{service_type}"
            );
        }
        for (bytes, label) in cases {
            let err = parse_frame(&bytes).unwrap_err();
            assert_eq!(err.label(), label, "{err}");
            assert!(AliyunError::LABELS.contains(&label));
            let code = if label.ends_with("too_long") || label.ends_with("too_large") {
                1009
            } else {
                1002
            };
            assert_eq!(err.close_code(), code, "{err}");
        }
        assert!(is_valid_service_type("_SSH.v-x"));
        assert!(is_valid_service_type("abcdefghijklmnop"));
    }

    #[test]
    fn required_fields() {
        let header = |frame_type, session: Option<&str>, service: Option<&str>| FrameHeader {
            frame_type,
            session_id: session.map(Into::into),
            frame_id: 1,
            service_type: service.map(Into::into),
        };
        assert!(matches!(
            header(FrameType::SessionCreate, None, None).check_fields(),
            Err(AliyunError::MissingServiceType)
        ));
        assert!(matches!(
            header(FrameType::DataTransport, None, None).check_fields(),
            Err(AliyunError::MissingSessionId(FrameType::DataTransport))
        ));
        assert!(header(FrameType::SessionRelease, Some("s"), None)
            .check_fields()
            .is_ok());
    }

    #[test]
    fn responses() {
        let bytes = common_response(
            Some("s-9"),
            7,
            Some("_SSH"),
            response_code::SESSION_LIMIT,
            "full",
        )
        .unwrap();
        let frame = parse_frame(&bytes).unwrap();
        assert_eq!(frame.header.frame_type, FrameType::CommonResponse);
        assert_eq!(frame.header.frame_id, 7);
        assert_eq!(frame.header.service_type.as_deref(), Some("_SSH"));
        assert_eq!(
            parse_response_payload(frame.payload).unwrap(),
            ResponsePayload {
                code: 1,
                msg: "full".into()
            }
        );
        let bytes = session_release("s-9", 8, release_code::DEVICE_DISCONNECTED, "gone").unwrap();
        let frame = parse_frame(&bytes).unwrap();
        assert_eq!(frame.header.frame_type, FrameType::SessionRelease);
        assert_eq!(frame.payload, br#"{"code":3,"msg":"gone"}"#);
        assert!(parse_response_payload(b"{}").is_err());

        let ws_frame = server_frame(&frame.header, frame.payload).unwrap();
        let h = ws::parse_header(&ws_frame, ws::Sender::Server, MAX_FRAME_LEN)
            .unwrap()
            .unwrap();
        assert_eq!(&ws_frame[h.header_len..], &bytes[..]);
    }

    proptest! {
        #[test]
        fn round_trip(frame_type in 1i64..=4,
                      session_id in proptest::option::of(".{0,40}"),
                      frame_id in any::<i64>(),
                      service_type in proptest::option::of("[A-Za-z_.-]{1,16}"),
                      payload in proptest::collection::vec(any::<u8>(), 0..=MAX_PAYLOAD_LEN)) {
            let header = FrameHeader {
                frame_type: FrameType::try_from(frame_type).unwrap(),
                session_id,
                frame_id,
                service_type,
            };
            let bytes = encode_frame(&header, &payload).unwrap();
            let frame = parse_frame(&bytes).unwrap();
            prop_assert_eq!(frame.header, header);
            prop_assert_eq!(frame.payload, &payload[..]);
        }

        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(frame) = parse_frame(&bytes) {
                prop_assert!(frame.payload.len() <= MAX_PAYLOAD_LEN);
            }
        }
    }
}
