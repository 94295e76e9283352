//! The Autobahn TestSuite's fuzzingclient cases that apply to the relay, written as tests: the
//! suite (PyPI `autobahntestsuite`) is Python 2 only and does not install on this machine's
//! Python 3. Each case drives a raw client (tests/common/peers.rs, no WebSocket library) against
//! a real relay on 127.0.0.1 with a paired raw device, and checks what the suite checks: the
//! relay's answer (pong, close code) and what reaches the other side. Section numbers are the
//! suite's; text-message cases become "text is refused" (the tunnel protocols are binary only),
//! and "echoed" means "forwarded to the device unchanged" (the relay is not an echo server).
//! Every section runs on both io drivers.
#[macro_use]
mod common;

use common::peers::*;
use common::*;
use iotunnel::config::IoDriver;

on_both_drivers! {
    s1_binary_payload_lengths_and_length_encodings;
    s2_pings_and_pongs;
    s3_reserved_bits;
    s4_reserved_opcodes;
    s5_fragmentation;
    s6_text_is_refused_whatever_its_utf8;
    s7_close_handling;
    s9_limits;
}

/// A server with its relay and an online device; each case opens its own tunnel on it.
struct Scene {
    f: Fixture,
    relay: Relay,
    t: TestServer,
}

async fn scene(driver: IoDriver) -> Scene {
    // Each case opens its own tunnel to the one device (section 7 opens 40).
    let t = relay_server(driver, |s| s.max_open_tunnels_per_device = 100).await;
    let relay = Relay::of(&t);
    let f = t.online_device().await;
    Scene { f, relay, t }
}

/// Both sides of a fresh tunnel, upgraded raw, with stream 1 started by the client (so the
/// client may send DATA, and the device learns of the client's end by a STREAM_RESET).
struct Pair {
    client: RawConn,
    device: RawConn,
}

async fn pair(s: &mut Scene) -> Pair {
    let tun = open_tunnel(&s.t, &mut s.f, &["SSH"]).await;
    let (mut device, _) =
        RawConn::aws(&s.relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let (mut client, _) = RawConn::aws(&s.relay, Mode::Source, Aws::V3, &tun.client_token).await;
    client
        .send_frame(op::BINARY, &encode_stream(&[stream_start(1, "SSH", 1)]))
        .await;
    device.read_data_frame().await;
    Pair { client, device }
}

/// A masked client frame with RSV bits `rsv` and FIN `fin`.
fn frame_with(fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = frame_bytes(fin, opcode, Some(MASK), payload);
    f[0] |= rsv << 4;
    f
}

/// A masked client frame whose length uses the 16-bit (`126`) or 64-bit (`127`) form even
/// where a shorter one fits.
fn frame_with_length_form(opcode: u8, payload: &[u8], form: u8) -> Vec<u8> {
    let mut out = vec![0x80 | opcode, 0x80 | form];
    match form {
        126 => out.extend_from_slice(&(payload.len() as u16).to_be_bytes()),
        _ => out.extend_from_slice(&(payload.len() as u64).to_be_bytes()),
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// One DATA message on stream 1 of exactly `len` bytes (at least 6), as a frame payload.
fn stream_bytes(len: usize, seed: u8) -> Vec<u8> {
    data_stream_of_len(len, seed)
}

/// The next pong, skipping the relay's own pings.
async fn next_pong(conn: &mut RawConn) -> Vec<u8> {
    loop {
        let f = conn.read_frame().await.expect("connection open for a pong");
        match f.opcode {
            op::PING => continue,
            op::PONG => return f.payload,
            _ => panic!("expected a pong, got {f:?}"),
        }
    }
}

/// Sends `bytes` on a fresh pair and expects the relay to close the client with `code`, then
/// end the connection; `before` is sent first and must reach the device intact.
async fn expect_close_after(s: &mut Scene, before: Option<&[u8]>, bytes: &[u8], code: u16) {
    let mut p = pair(s).await;
    if let Some(payload) = before {
        p.client.send_frame(op::BINARY, payload).await;
        assert_eq!(p.device.read_data_frame().await.payload, payload);
    }
    // The relay may hang up before it reads all of a long frame.
    let _ = p.client.try_send(bytes).await;
    let (got, reason) = p.client.expect_close().await;
    assert_eq!(
        got,
        code,
        "close code for {:02x?}... ({reason})",
        &bytes[..2]
    );
    p.client.read_to_end().await;
}

/// Autobahn 1.2.x: binary messages of 0, 125, 126, 127, 128, 65535 and 65536 bytes, one also
/// written in 997-byte pieces (1.2.8), reach the other side unchanged; lengths written in a
/// longer form than needed (16-bit for 6 bytes, 64-bit for 200 and 65535 bytes) are accepted.
async fn s1_binary_payload_lengths_and_length_encodings(driver: IoDriver) {
    let mut s = scene(driver).await;
    let mut p = pair(&mut s).await;
    for (i, len) in [0, 125, 126, 127, 128, 65535, 65536]
        .into_iter()
        .enumerate()
    {
        let payload = stream_bytes(len, i as u8);
        p.client.send_frame(op::BINARY, &payload).await;
        let got = p.device.read_data_frame().await;
        assert!(got.fin && got.opcode == op::BINARY);
        assert_same_bytes(&got.payload, &payload, &format!("{len}-byte frame"));
    }
    let payload = stream_bytes(65536, 9);
    for piece in client_frame(op::BINARY, &payload).chunks(997) {
        p.client.send(piece).await;
    }
    assert_same_bytes(
        &p.device.read_data_frame().await.payload,
        &payload,
        "a frame written in 997-byte pieces",
    );
    for (len, form) in [(6, 126), (6, 127), (200, 127), (65535, 127)] {
        let payload = stream_bytes(len, 3);
        p.client
            .send(&frame_with_length_form(op::BINARY, &payload, form))
            .await;
        assert_same_bytes(
            &p.device.read_data_frame().await.payload,
            &payload,
            &format!("{len} bytes with length form {form}"),
        );
    }
}

/// Autobahn 2.x: a ping (empty, text, binary, 125 bytes, written byte by byte) is answered by a
/// pong with its payload; ten pings by ten pongs in order; a ping of 126 bytes closes with 1002;
/// unsolicited pongs (empty or not) are ignored.
async fn s2_pings_and_pongs(driver: IoDriver) {
    let mut s = scene(driver).await;
    let mut p = pair(&mut s).await;
    let binary: Vec<u8> = (0..=255u8).step_by(3).collect();
    for payload in [&b""[..], b"Hello, world!", &binary[..8], &[0xfe; 125]] {
        p.client.send_frame(op::PING, payload).await;
        assert_eq!(next_pong(&mut p.client).await, payload, "2.1-2.4");
    }
    // 2.6: a 125-byte ping written one byte at a time.
    for b in client_frame(op::PING, &[0x41; 125]) {
        p.client.send(&[b]).await;
    }
    assert_eq!(next_pong(&mut p.client).await, [0x41; 125]);
    // 2.7, 2.8, 2.9: unsolicited pongs, then a ping: only the ping's pong comes back, and data
    // still flows.
    p.client.send_frame(op::PONG, b"").await;
    p.client.send_frame(op::PONG, b"unsolicited pong").await;
    p.client.send_frame(op::PING, b"after pongs").await;
    assert_eq!(next_pong(&mut p.client).await, b"after pongs");
    let payload = stream_bytes(64, 1);
    p.client.send_frame(op::BINARY, &payload).await;
    assert_eq!(p.device.read_data_frame().await.payload, payload);
    // 2.10, 2.11: ten pings in one write, then ten written in pieces.
    let pings: Vec<u8> = (0..10u8)
        .flat_map(|i| client_frame(op::PING, &[b'p', i]))
        .collect();
    p.client.send(&pings).await;
    for i in 0..10u8 {
        assert_eq!(next_pong(&mut p.client).await, [b'p', i]);
    }
    for piece in pings.chunks(5) {
        p.client.send(piece).await;
    }
    for i in 0..10u8 {
        assert_eq!(next_pong(&mut p.client).await, [b'p', i]);
    }
    // 2.5: a ping longer than 125 bytes.
    expect_close_after(&mut s, None, &client_frame(op::PING, &[0xfe; 126]), 1002).await;
}

/// Autobahn 3.1-3.7: RSV bits 1 to 7 (no extension is ever negotiated) on binary, ping and
/// close frames close with 1002; a valid frame before the bad one is still forwarded.
async fn s3_reserved_bits(driver: IoDriver) {
    let mut s = scene(driver).await;
    let good = stream_bytes(16, 5);
    let cases: [(u8, u8, Option<&[u8]>); 7] = [
        (1, op::BINARY, None),
        (2, op::BINARY, Some(&good)),
        (3, op::BINARY, Some(&good)),
        (4, op::BINARY, None),
        (5, op::BINARY, None),
        (6, op::PING, None),
        (7, op::CLOSE, None),
    ];
    for (rsv, opcode, before) in cases {
        let payload = match opcode {
            op::CLOSE => 1000u16.to_be_bytes().to_vec(),
            op::PING => b"ping".to_vec(),
            _ => stream_bytes(16, rsv),
        };
        let bad = frame_with(true, rsv, opcode, &payload);
        expect_close_after(&mut s, before, &bad, 1002).await;
    }
}

/// Autobahn 4.1.x and 4.2.x: reserved non-control opcodes 3-7 and control opcodes 11-15, with
/// and without payload, close with 1002.
async fn s4_reserved_opcodes(driver: IoDriver) {
    let mut s = scene(driver).await;
    let good = stream_bytes(16, 7);
    for opcode in [3, 4, 5, 6, 7, 11, 12, 13, 14, 15] {
        let payload: &[u8] = if opcode % 2 == 0 { b"" } else { b"reserved" };
        let before = (opcode == 4 || opcode == 12).then_some(&good[..]);
        expect_close_after(&mut s, before, &client_frame(opcode, payload), 1002).await;
    }
}

/// Reads data frames at the device until one has FIN; checks their opcodes (binary, then
/// continuations) and returns their payloads joined.
async fn read_message(device: &mut RawConn) -> (Vec<u8>, usize) {
    let (mut joined, mut frames) = (Vec::new(), 0);
    loop {
        let f = device.read_data_frame().await;
        let want = if frames == 0 {
            op::BINARY
        } else {
            op::CONTINUATION
        };
        assert_eq!(f.opcode, want, "frame {frames} of a fragmented message");
        joined.extend_from_slice(&f.payload);
        frames += 1;
        if f.fin {
            return (joined, frames);
        }
    }
}

/// Autobahn 5.x: fragmented pings and pongs close with 1002 (5.1, 5.2); a fragmented binary
/// message arrives fragment for fragment (5.3-5.5), also with pings between its fragments
/// (5.6-5.8, 5.19, 5.20) and as 300 fragments of 1 to 3 bytes; a continuation with no message
/// started, final or not (5.9-5.16), and a new data frame inside a fragmented message (5.17,
/// 5.18) close with 1002.
async fn s5_fragmentation(driver: IoDriver) {
    let mut s = scene(driver).await;
    let mut p = pair(&mut s).await;
    let message = stream_bytes(600, 11);
    // 5.3-5.5: two fragments, in one write and in two.
    let first = frame_bytes(false, op::BINARY, Some(MASK), &message[..250]);
    let last = frame_bytes(true, op::CONTINUATION, Some(MASK), &message[250..]);
    p.client.send(&[first.clone(), last.clone()].concat()).await;
    assert_eq!(read_message(&mut p.device).await, (message.clone(), 2));
    p.client.send(&first).await;
    p.client.send(&last).await;
    assert_eq!(read_message(&mut p.device).await, (message.clone(), 2));
    // 5.6-5.8: a ping between the fragments is answered at once.
    p.client.send(&first).await;
    p.client.send_frame(op::PING, b"between fragments").await;
    assert_eq!(next_pong(&mut p.client).await, b"between fragments");
    p.client.send(&last).await;
    assert_eq!(read_message(&mut p.device).await, (message.clone(), 2));
    // Many small fragments with pings among them (5.19, 5.20 at a larger scale).
    let mut frames = Vec::new();
    let (mut at, mut n) = (0, 0);
    while at < message.len() {
        let len = (1 + n % 3).min(message.len() - at);
        let opcode = if at == 0 {
            op::BINARY
        } else {
            op::CONTINUATION
        };
        let fin = at + len == message.len();
        frames.extend(frame_bytes(fin, opcode, Some(MASK), &message[at..at + len]));
        if n % 50 == 0 {
            frames.extend(client_frame(op::PING, &[n as u8]));
        }
        at += len;
        n += 1;
    }
    p.client.send(&frames).await;
    let (joined, count) = read_message(&mut p.device).await;
    assert_same_bytes(&joined, &message, "a message in 300 fragments");
    assert_eq!(count, n);
    for i in (0..n).step_by(50) {
        assert_eq!(next_pong(&mut p.client).await, [i as u8]);
    }

    let ping_first = frame_bytes(false, op::PING, Some(MASK), b"frag");
    let pong_first = frame_bytes(false, op::PONG, Some(MASK), b"frag");
    let cont_final = frame_bytes(true, op::CONTINUATION, Some(MASK), &message[..40]);
    let cont_more = frame_bytes(false, op::CONTINUATION, Some(MASK), &message[..40]);
    let open_message = frame_bytes(false, op::BINARY, Some(MASK), &message[..40]);
    let binary = client_frame(op::BINARY, &stream_bytes(12, 1));
    for (what, bytes) in [
        (
            "5.1 fragmented ping",
            [ping_first.clone(), cont_final.clone()].concat(),
        ),
        (
            "5.2 fragmented pong",
            [pong_first, cont_final.clone()].concat(),
        ),
        (
            "5.9 final continuation, nothing started",
            cont_final.clone(),
        ),
        ("5.10 continuation, nothing started", cont_more.clone()),
        (
            "5.13 continuations, nothing started",
            [cont_more.clone(), cont_final.clone()].concat(),
        ),
        (
            "5.17 binary inside a fragmented message",
            [open_message.clone(), binary].concat(),
        ),
        (
            "5.18 two unfinished data frames",
            [open_message.clone(), open_message].concat(),
        ),
    ] {
        eprintln!("{what}");
        expect_close_after(&mut s, None, &bytes, 1002).await;
    }
}

/// Autobahn 6.x (UTF-8 of text messages) does not apply as written: neither tunnel protocol
/// has text messages, so the relay refuses any text frame with 1002 before looking at its
/// bytes, valid UTF-8 or not, whole or as the first fragment; and a text continuation cannot
/// exist without a text start.
async fn s6_text_is_refused_whatever_its_utf8(driver: IoDriver) {
    let mut s = scene(driver).await;
    let valid = "κόσμε Hello-µ@ßöäüàá-UTF-8!!".as_bytes();
    let invalid: &[u8] = &[
        0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xf4,
    ];
    for bytes in [
        client_frame(op::TEXT, b""),
        client_frame(op::TEXT, valid),
        client_frame(op::TEXT, invalid),
        frame_bytes(false, op::TEXT, Some(MASK), &valid[..4]),
    ] {
        expect_close_after(&mut s, None, &bytes, 1002).await;
    }
}

/// Closes the client with `payload` as its close frame; returns the relay's close code and the
/// frames the device saw afterwards (the STREAM_RESET for the client's stream).
async fn close_with(s: &mut Scene, payload: &[u8], after: &[u8]) -> u16 {
    let mut p = pair(s).await;
    let mut bytes = client_frame(op::CLOSE, payload);
    bytes.extend_from_slice(after);
    let _ = p.client.try_send(&bytes).await;
    let (code, _) = p.client.expect_close().await;
    // Nothing but the end follows the relay's close frame.
    let (rest, _) = p.client.read_to_end().await;
    assert!(rest.is_empty(), "bytes after the close frame: {rest:02x?}");
    // The device hears that the client's stream ended, and nothing sent after the close.
    let f = p.device.read_data_frame().await;
    let mut reader = MessageReader::default();
    reader.feed(&f.payload);
    let m = reader.next().expect("a whole message");
    assert_eq!(
        m.r#type,
        iotunnel::proto::aws::MessageType::StreamReset as i32,
        "after the client's close the device got {m:?}"
    );
    code
}

/// Autobahn 7.x: a close without payload is answered with 1000 (7.1.1, 7.3.1); data, pings and
/// a second close after a close are ignored (7.1.2-7.1.6); a valid code is echoed, with or
/// without a reason of up to 123 bytes (7.3.3-7.3.5, 7.7.x); a 1-byte payload (7.3.2), a reason
/// making the payload 126 bytes (7.3.6) and invalid codes (7.9.x) close with 1002; a reason
/// that is not UTF-8 with 1007 (7.5.1).
async fn s7_close_handling(driver: IoDriver) {
    let mut s = scene(driver).await;
    let code = |c: u16, reason: &[u8]| [&c.to_be_bytes()[..], reason].concat();
    assert_eq!(close_with(&mut s, b"", b"").await, 1000, "7.1.1");
    let after: Vec<u8> = [
        client_frame(op::BINARY, &stream_bytes(32, 2)),
        client_frame(op::PING, b"after close"),
        client_frame(op::CLOSE, &code(1001, b"")),
    ]
    .concat();
    assert_eq!(
        close_with(&mut s, &code(1000, b""), &after).await,
        1000,
        "7.1.2-7.1.6"
    );
    assert_eq!(
        close_with(&mut s, &code(1000, b"Hello World!"), b"").await,
        1000
    );
    assert_eq!(
        close_with(&mut s, &code(1000, &[b'*'; 123]), b"").await,
        1000
    );
    for valid in [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000,
        4999,
    ] {
        assert_eq!(
            close_with(&mut s, &code(valid, b"reason"), b"").await,
            valid,
            "7.7: {valid} echoed"
        );
    }
    expect_close_after(&mut s, None, &client_frame(op::CLOSE, &[0x03]), 1002).await;
    let long = code(1000, &[b'*'; 124]);
    expect_close_after(&mut s, None, &client_frame(op::CLOSE, &long), 1002).await;
    for invalid in [
        0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        eprintln!("7.9: close code {invalid}");
        let bytes = client_frame(op::CLOSE, &code(invalid, b""));
        expect_close_after(&mut s, None, &bytes, 1002).await;
    }
    let bad_utf8 = code(
        1000,
        &[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xed, 0xa0, 0x80, 0x65],
    );
    expect_close_after(&mut s, None, &client_frame(op::CLOSE, &bad_utf8), 1007).await;
}

/// Autobahn 9.x and the relay's limit: a frame of exactly `max_frame_payload` (131076 bytes)
/// passes; one byte more closes with 1009 at its header, as does a 64-bit length of 2^62; a
/// 64-bit length with its top bit set is a protocol error (1002).
async fn s9_limits(driver: IoDriver) {
    let mut s = scene(driver).await;
    let limit = s.t.server().control.settings.max_frame_payload;
    let mut p = pair(&mut s).await;
    let payload = stream_bytes(limit, 4);
    p.client.send_frame(op::BINARY, &payload).await;
    assert_same_bytes(
        &p.device.read_data_frame().await.payload,
        &payload,
        "a frame at the limit",
    );
    for (len, code) in [(limit as u64 + 1, 1009), (1 << 62, 1009), (1 << 63, 1002)] {
        let mut bytes = frame_header(true, op::BINARY, Some(MASK), len);
        bytes.extend_from_slice(&[0; 64]);
        expect_close_after(&mut s, None, &bytes, code).await;
    }
}
