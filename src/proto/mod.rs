//! The wire protocols the relay speaks: pure codecs, no sockets, no runtime, no I/O, so each can
//! be unit-tested, fuzzed and benchmarked alone (STYLE.md 3). Facts come from PROTOCOLS.md;
//! where a rule here is a choice of ours it says so.
//!
//! - [`ws`]: WebSocket (RFC 6455) frames as the server sees them, the `Sec-WebSocket-Accept` key.
//! - [`aws`]: the AWS IoT Secure Tunneling protocol V1-V3 (localproxy, aws-c-iot, our agents).
//! - [`aliyun`]: the Alibaba Cloud `aliyun.iot.securetunnel-v1.1` protocol (Link SDK, `aiot`).
//! - [`device`]: the device channel's messages and their MQTT topics, between the server and
//!   the device agent (not spoken by the relay; here because both sides share it).
//!
//! Both tunnel protocols run inside binary WebSocket messages; a text frame is refused with
//! close code 1003 ([`ws::reject_text`]).
//!
//! # WebSocket frames ([`ws`])
//!
//! ```text
//!  byte 0: FIN(1) RSV1-3(3) opcode(4)     byte 1: MASK(1) len7(7)
//!  len7 0..=125  the payload length
//!  len7 126      then u16 big-endian length          (header 4 bytes)
//!  len7 127      then u64 big-endian length, MSB 0   (header 10 bytes)
//!  MASK=1        then the 4-byte mask key            (+4: client frames, always)
//!  payload       payload[i] ^= mask[i % 4]           (clients only)
//! ```
//!
//! Opcodes: 0 continuation, 1 text, 2 binary, 8 close, 9 ping, 10 pong; the rest are reserved.
//! The relay refuses (close code 1002) an unmasked client frame, RSV bits (no extension is ever
//! negotiated), a reserved opcode, a control frame that is fragmented or longer than 125 bytes,
//! a 64-bit length with its top bit set, and a continuation out of order ([`ws::FragmentTracker`]);
//! it refuses with 1009 a payload over [`ws::DEFAULT_MAX_PAYLOAD`] (131076, the AWS frame limit).
//! "Need more bytes" is `Ok(None)`, never an error. Non-minimal length encodings are accepted.
//!
//! Forwarding a client frame costs no payload copy: after the payload is unmasked in place
//! ([`ws::unmask`], or [`ws::Unmasker`] when it arrives in pieces), the server header (at most
//! [`ws::MAX_SERVER_HEADER`] = 10 bytes) is written right before the payload by
//! [`ws::write_header_before`], over the client's own header, which is always 4 bytes longer:
//!
//! ```text
//!  as read:       [ client header (h bytes, mask key included) ][ payload, unmasked in place ]
//!  as forwarded:  [ 4 unused ][ server header (h - 4 bytes)    ][ payload                    ]
//! ```
//!
//! Frames the relay builds itself reserve [`ws::MAX_SERVER_HEADER`] bytes of headroom instead.
//! Pings are answered with a pong carrying the same payload ([`ws::pong_frame`]); a close frame
//! carries a u16 code and up to 123 bytes of UTF-8 reason ([`ws::close_frame`],
//! [`ws::parse_close_payload`]). The handshake answer is `Sec-WebSocket-Accept =
//! base64(sha1(key + GUID))` ([`ws::accept_key`]).
//!
//! # AWS IoT Secure Tunneling ([`aws`])
//!
//! Subprotocol `aws.iot.securetunneling-{3.0,2.0,1.0}`, echoed back by the server
//! ([`aws::ProtocolVersion::select`]). The binary stream of each direction is
//!
//! ```text
//!  [u16 BE length n][n bytes: protobuf Message][u16 BE length][Message]...
//! ```
//!
//! and messages are not aligned to WebSocket frames: a frame (at most 131076 bytes) may hold
//! several messages or a piece of one, and a length prefix may be split between two frames.
//! `Message` (proto3, [`aws::Message`]):
//!
//! | field | no. | type | notes |
//! |---|---|---|---|
//! | type | 1 | enum | UNKNOWN 0, DATA 1, STREAM_START 2, STREAM_RESET 3, SESSION_RESET 4, SERVICE_IDS 5 (V2), CONNECTION_START 6 (V3), CONNECTION_RESET 7 (V3) |
//! | streamId | 2 | int32 | |
//! | ignorable | 3 | bool | |
//! | payload | 4 | bytes | at most [`aws::MAX_PAYLOAD`] = 64512 (63 KiB) |
//! | serviceId | 5 | string | V2+ |
//! | availableServiceIds | 6 | repeated string | V2+, SERVICE_IDS only |
//! | connectionId | 7 | uint32 | V3; 0 or absent means 1 |
//!
//! A DATA message on the wire, with protobuf keys `(field << 3) | wire type`:
//!
//! ```text
//!  00 0B | 08 01 | 10 05 | 22 05 'h' 'e' 'l' 'l' 'o'
//!  len 11  type=1  id=5    payload (len 5)
//! ```
//!
//! The relay forwards frame for frame and never decodes a DATA payload: an
//! [`aws::BoundaryTracker`] per direction is fed each frame's payload (in any pieces), reads only
//! the header fields (type, stream id, service id, connection id) while skipping field 4, and
//! reports where each message ends with an [`aws::MessageHeader`]. The header is complete only
//! at the message's end (prost writes fields in number order, and serviceId follows the
//! payload), so a message that breaks a rule may already be partly forwarded when it is refused.
//!
//! Flow and rules (PROTOCOLS.md, "What the service does"):
//!
//! ```text
//!  source (client)              relay                         destination (device)
//!                   <-- SERVICE_IDS [SSH, ...]    SERVICE_IDS --> (V2+; localproxy waits for it)
//!  STREAM_START(id, svc) -->   check, forward  --> STREAM_START
//!  DATA(id) <----------------> forward frame for frame <------> DATA(id)
//!  CONNECTION_START/RESET (V3) --> forward -->
//!                              a peer replaced: STREAM_RESET(open streams) --> other side
//!  either side: STREAM_RESET(id) --> forward
//! ```
//!
//! [`aws::check_message`] refuses (close code 1008): type 0 or undefined, a type newer than the
//! negotiated version, STREAM_START from the destination, stream id 0 on a stream message
//! (DATA, STREAM_START, STREAM_RESET, CONNECTION_START, CONNECTION_RESET), SESSION_RESET or
//! SERVICE_IDS from either peer (only the service sends them), and a non-empty serviceId that is
//! not one of the tunnel's services. Messages the relay sends itself ([`aws::service_ids_message`],
//! [`aws::stream_reset_message`], [`aws::session_reset_message`]) each go in a WebSocket frame of
//! their own ([`aws::server_frame`]), injected only where the outgoing stream is at a message
//! boundary ([`aws::BoundaryTracker::at_boundary`]) and not inside a fragmented WebSocket
//! message ([`ws::FragmentTracker::in_message`]): localproxy drops what follows a control message
//! in the same frame.
//!
//! iotunnel's own agent, when it cannot serve a connection (no local address for the service,
//! or the local service refused), puts the reason, UTF-8, in the payload of the
//! CONNECTION_RESET it sends; the relay forwards it like any message and iotunnel's client
//! prints it. The protocol leaves a reset's payload unused, so other peers ignore it.
//!
//! # Alibaba Cloud secure tunnel ([`aliyun`])
//!
//! Subprotocol `aliyun.iot.securetunnel-v1.1`, in `Sec-WebSocket-Protocol` or in a plain
//! `subprotocol` header. One tunnel frame is exactly one binary WebSocket message (the relay
//! reassembles fragments, at most [`aliyun::MAX_FRAME_LEN`] bytes):
//!
//! ```text
//!  [u16 BE header length h, 1..=2048][h bytes: UTF-8 JSON header][payload, 0..=4096 bytes]
//!  {"frame_type": 4, "session_id": "...", "frame_id": 17, "service_type": "_SSH"}
//! ```
//!
//! frame_type: 1 common_response, 2 session_create, 3 session_release, 4 data_transport.
//! session_id is absent only in the client's session_create; frame_id is an int64 the sender
//! increases; service_type is 1-16 characters of `[A-Za-z_.-]`. Unknown JSON keys are ignored.
//!
//! ```text
//!  client                           relay                                  device
//!  session_create{service_type, frame_id} --> assign session_id --> session_create{session_id}
//!                 <-- common_response{frame_id, session_id} {"code","msg"} <--
//!                     (no answer in 10 s: relay answers code TIMEOUT; too many sessions: code 1)
//!  data_transport{session_id} <-----------> forward <----------> data_transport{session_id}
//!  session_release{session_id} {"code","msg"} --> forward -->   (and the other way)
//!                     relay saw a side disconnect: session_release code 2 or 3 to the other side
//! ```
//!
//! Response codes are in [`aliyun::response_code`], release codes in [`aliyun::release_code`].
//!
//! # Errors
//!
//! Each error enum ([`ws::FrameError`], [`aws::StreamError`], [`aws::Violation`],
//! [`aliyun::AliyunError`]) gives the close code to send (`close_code()`) and a stable metric
//! label (`label()`, all listed in `LABELS`), so every reason a connection is dropped is counted
//! under a series created at start-up (STYLE.md 5). After an error a codec's state is undefined:
//! close the connection.

pub mod aliyun;
pub mod aws;
pub mod device;
pub mod ws;

pub use aws::{BoundaryTracker, MessageHeader, ProtocolVersion, Side};
pub use ws::{FragmentTracker, FrameError, FrameHeader, OpCode};
