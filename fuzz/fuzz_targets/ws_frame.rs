//! Feeds arbitrary bytes to the WebSocket frame parser as a stream of client frames, and checks
//! re-encoding, piecewise unmasking, fragment tracking and in-place header rewriting on every
//! frame it accepts.
#![no_main]

use iotunnel::proto::ws::{self, FragmentTracker, FrameHeader, OpCode, Sender, Unmasker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the payload limit (so 1009 is reachable) and where payloads split.
    let Some((&knob, stream)) = data.split_first() else {
        return;
    };
    let max = if knob & 0x80 != 0 {
        ws::DEFAULT_MAX_PAYLOAD
    } else {
        usize::from(knob) * 4
    };
    let mut buf = stream.to_vec();
    let mut tracker = FragmentTracker::new();
    let mut at = 0;
    while let Ok(Some(h)) = ws::parse_client_header(&buf[at..], max) {
        assert!(h.payload_len <= max && h.header_len <= ws::MAX_CLIENT_HEADER);
        assert!(h.masked && h.rsv == 0);
        // Re-encoding (always minimal) parses back to the same frame.
        let mut out = [0; ws::MAX_CLIENT_HEADER];
        let n = h.encode(&mut out);
        let again = ws::parse_client_header(&out[..n], max)
            .expect("re-encoded header is valid")
            .expect("re-encoded header is complete");
        assert_eq!(FrameHeader { header_len: n, ..h }, again);

        let payload_start = at + h.header_len;
        let end = payload_start + h.payload_len;
        if end > buf.len() {
            break;
        }
        let mut whole = buf[payload_start..end].to_vec();
        ws::unmask(&mut whole, h.mask);
        let payload = &mut buf[payload_start..end];
        let split = usize::from(knob) % (payload.len() + 1);
        let mut unmasker = Unmasker::new(h.mask);
        unmasker.apply(&mut payload[..split]);
        unmasker.apply(&mut payload[split..]);
        assert_eq!(&payload[..], &whole[..]);

        if h.opcode == OpCode::Close {
            if let Err(e) = ws::parse_close_payload(payload) {
                assert!(ws::FrameError::LABELS.contains(&e.label()));
            }
        }
        match tracker.on_frame(&h) {
            Ok(message_opcode) => {
                let _ = ws::reject_text(message_opcode);
            }
            Err(e) => {
                assert!(ws::FrameError::LABELS.contains(&e.label()));
                break;
            }
        }

        // The server header always fits over the client's own header.
        let start = ws::write_header_before(
            &mut buf[..end],
            payload_start,
            h.fin,
            h.opcode,
            h.payload_len,
        )
        .expect("a client header leaves room for the server header");
        assert!(start >= at + 4);
        let server = ws::parse_header(&buf[start..end], Sender::Server, max)
            .expect("server header is valid")
            .expect("server header is complete");
        assert_eq!(start + server.header_len, payload_start);
        assert_eq!(
            (server.fin, server.opcode, server.payload_len),
            (h.fin, h.opcode, h.payload_len)
        );
        at = end;
    }
});
