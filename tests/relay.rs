//! The relay's data plane against a real in-process server on 127.0.0.1:0: both protocol
//! families end to end, frame-for-frame forwarding, bulk transfer, close, replacement, rotate,
//! connection state and pings. Every scenario runs on both io drivers (io_uring and epoll).
//! The peers (tests/common/peers.rs) are written from PROTOCOLS.md, not from the relay's code.
#[macro_use]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::peers::*;
use common::*;
use futures_util::StreamExt;
use iotunnel::config::IoDriver;
use iotunnel::proto::aws::{Message, MessageType};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

on_both_drivers! {
    aws_v3_end_to_end;
    aws_v3_end_to_end_plaintext;
    aws_v2_end_to_end;
    aws_v1_end_to_end;
    aws_token_in_cookie;
    frames_of_every_size_pass_frame_for_frame;
    messages_cross_frame_boundaries_intact;
    bulk_256_mib_both_directions_at_once;
    aliyun_end_to_end;
    aliyun_session_limit;
    aliyun_silent_device_times_out;
    close_through_api_ends_both_sides;
    aws_replacement_resets_open_streams;
    aws_peer_gone_mid_message_ends_the_other_side;
    aliyun_replacement_releases_open_sessions;
    rotate_disconnects_the_client;
    pings_keep_readers_and_drop_stalled_peers;
}

fn is(m: &Message, kind: MessageType) -> bool {
    m.r#type == kind as i32
}

/// The Alibaba device side of `tun`, connected and seen CONNECTED by describe.
async fn aliyun_device(
    t: &TestServer,
    f: &Fixture,
    tun: &OpenTunnel,
    style: AliyunStyle,
) -> AliyunPeer {
    let device = AliyunPeer::connect(
        &Relay::of(t),
        &tun.id,
        AliyunSide::Device,
        &tun.device_token,
        style,
    )
    .await;
    wait_state(t, f, &tun.id, "device", "CONNECTED").await;
    device
}

/// The Alibaba client side of `tun`.
async fn aliyun_client(relay: &Relay, tun: &OpenTunnel, style: AliyunStyle) -> AliyunPeer {
    AliyunPeer::connect(relay, &tun.id, AliyunSide::Source, &tun.client_token, style).await
}

/// Describe shows both sides CONNECTED with a loopback address.
async fn assert_both_connected(t: &TestServer, f: &Fixture, id: &str) {
    let d = wait_describe(t, f, id, "both sides CONNECTED", |v| {
        v["device"]["state"] == "CONNECTED" && v["client"]["state"] == "CONNECTED"
    })
    .await;
    for side in ["device", "client"] {
        let addr = d[side]["address"].as_str().unwrap_or_default();
        assert!(addr.contains("127.0.0.1"), "{side} address {addr:?} in {d}");
        assert!(d[side]["updated_at"].is_string(), "{d}");
    }
}

// ---------------------------------------------------------------------------------------------
// AWS family
// ---------------------------------------------------------------------------------------------

async fn aws_v3_end_to_end(driver: IoDriver) {
    aws_v3_scenario(driver, false).await;
}

async fn aws_v3_end_to_end_plaintext(driver: IoDriver) {
    aws_v3_scenario(driver, true).await;
}

/// Device (destination) and client (source) over wss (or ws): SERVICE_IDS, a stream, DATA both
/// ways in order, a second connection on the stream (V3).
async fn aws_v3_scenario(driver: IoDriver, plaintext: bool) {
    let t = relay_server(driver, |s| s.relay_plaintext = plaintext).await;
    let relay = Relay::of(&t);
    assert_eq!(relay.tls.is_none(), plaintext);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["SSH", "HTTP"]).await;
    assert_eq!(
        tun.device_url,
        format!("wss://localhost:8443/tunnel/{}/device", tun.id)
    );

    let mut device = AwsPeer::connect(&relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let mut client = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &tun.client_token).await;
    for peer in [&device, &client] {
        let mut services = peer.service_ids.clone();
        services.sort();
        assert_eq!(
            services,
            ["HTTP", "SSH"],
            "SERVICE_IDS lists exactly the services"
        );
    }
    if !plaintext {
        assert_eq!(
            device.ws.get_ref().tls_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
    }
    assert_both_connected(&t, &f, &tun.id).await;

    // STREAM_START, exactly as localproxy writes it: type 2, stream 1, service "SSH", conn 1.
    let start = [
        0x00, 0x0B, 0x08, 0x02, 0x10, 0x01, 0x2A, 0x03, b'S', b'S', b'H', 0x38, 0x01,
    ];
    client.send_frame(start.to_vec()).await;
    assert_eq!(device.next_frame().await, start, "forwarded byte for byte");

    // DATA both ways, several in a row, each side's order kept.
    for i in 0..20u8 {
        client.send(&data(1, "", 1, &[i; 100])).await;
    }
    for i in 0..20u8 {
        device.send(&data(1, "SSH", 1, &[100 + i; 50])).await;
    }
    for i in 0..20u8 {
        let m = device.next_message().await;
        assert!(is(&m, MessageType::Data) && m.stream_id == 1, "{m:?}");
        assert_eq!(m.payload.as_ref(), [i; 100]);
    }
    for i in 0..20u8 {
        let m = client.next_message().await;
        assert!(is(&m, MessageType::Data) && m.stream_id == 1, "{m:?}");
        assert_eq!(
            (m.payload.as_ref(), m.service_id.as_str()),
            (&[100 + i; 50][..], "SSH")
        );
    }

    // A second connection on stream 1: CONNECTION_START, DATA both ways, CONNECTION_RESET.
    client
        .send(&message(MessageType::ConnectionStart, 1, "SSH", 2, b""))
        .await;
    let m = device.next_message().await;
    assert!(is(&m, MessageType::ConnectionStart), "{m:?}");
    assert_eq!(
        (m.stream_id, m.connection_id, m.service_id.as_str()),
        (1, 2, "SSH")
    );
    client.send(&data(1, "SSH", 2, b"on connection 2")).await;
    let m = device.next_message().await;
    assert_eq!(
        (m.connection_id, m.payload.as_ref()),
        (2, &b"on connection 2"[..])
    );
    device.send(&data(1, "SSH", 2, b"back on 2")).await;
    let m = client.next_message().await;
    assert_eq!(
        (m.connection_id, m.payload.as_ref()),
        (2, &b"back on 2"[..])
    );
    client
        .send(&message(MessageType::ConnectionReset, 1, "SSH", 2, b""))
        .await;
    let m = device.next_message().await;
    assert!(is(&m, MessageType::ConnectionReset), "{m:?}");
    assert_eq!((m.stream_id, m.connection_id), (1, 2));
    // Connection 1 still carries data after connection 2 ended.
    device.send(&data(1, "SSH", 1, b"still here")).await;
    assert_eq!(client.next_message().await.payload.as_ref(), b"still here");
}

/// V2: service ids in SERVICE_IDS and on STREAM_START; STREAM_RESET from the device.
async fn aws_v2_end_to_end(driver: IoDriver) {
    let t = relay_server(driver, |_| {}).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["SSH", "HTTP"]).await;
    let mut device = AwsPeer::connect(&relay, Mode::Destination, Aws::V2, &tun.device_token).await;
    let mut client = AwsPeer::connect(&relay, Mode::Source, Aws::V2, &tun.client_token).await;
    for peer in [&device, &client] {
        let mut services = peer.service_ids.clone();
        services.sort();
        assert_eq!(services, ["HTTP", "SSH"]);
    }
    client.send(&stream_start(7, "HTTP", 0)).await;
    let m = device.next_message().await;
    assert!(is(&m, MessageType::StreamStart), "{m:?}");
    assert_eq!((m.stream_id, m.service_id.as_str()), (7, "HTTP"));
    client
        .send(&data(7, "HTTP", 0, b"GET / HTTP/1.1\r\n\r\n"))
        .await;
    assert_eq!(
        device.next_message().await.payload.as_ref(),
        b"GET / HTTP/1.1\r\n\r\n"
    );
    device
        .send(&data(7, "HTTP", 0, b"HTTP/1.1 200 OK\r\n\r\n"))
        .await;
    let m = client.next_message().await;
    assert_eq!(
        (m.stream_id, m.service_id.as_str(), m.payload.as_ref()),
        (7, "HTTP", &b"HTTP/1.1 200 OK\r\n\r\n"[..])
    );
    device
        .send(&message(MessageType::StreamReset, 7, "HTTP", 0, b""))
        .await;
    let m = client.next_message().await;
    assert!(
        is(&m, MessageType::StreamReset) && m.stream_id == 7,
        "{m:?}"
    );
}

/// V1 has no SERVICE_IDS: the first thing each side receives is the other side's message.
async fn aws_v1_end_to_end(driver: IoDriver) {
    let t = relay_server(driver, |_| {}).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["SSH"]).await;
    let mut device = AwsPeer::connect(&relay, Mode::Destination, Aws::V1, &tun.device_token).await;
    assert!(device.service_ids.is_empty());
    wait_state(&t, &f, &tun.id, "device", "CONNECTED").await;
    let mut client = AwsPeer::connect(&relay, Mode::Source, Aws::V1, &tun.client_token).await;
    wait_state(&t, &f, &tun.id, "client", "CONNECTED").await;

    // V1 STREAM_START carries no service id: `08 02 10 01`.
    client
        .send_frame(vec![0x00, 0x04, 0x08, 0x02, 0x10, 0x01])
        .await;
    assert_eq!(
        device.next_frame().await,
        [0x00, 0x04, 0x08, 0x02, 0x10, 0x01],
        "the first frame the V1 device sees is the client's STREAM_START (no SERVICE_IDS)"
    );
    client.send(&data(1, "", 0, b"v1 up")).await;
    assert_eq!(device.next_message().await.payload.as_ref(), b"v1 up");
    device.send(&data(1, "", 0, b"v1 down")).await;
    let m = client.next_message().await;
    assert!(
        is(&m, MessageType::Data),
        "the first message the V1 client sees is the device's DATA, got {m:?}"
    );
    assert_eq!(m.payload.as_ref(), b"v1 down");
    client
        .send(&message(MessageType::StreamReset, 1, "", 0, b""))
        .await;
    assert!(is(&device.next_message().await, MessageType::StreamReset));
}

/// The token may come in the `awsiot-tunnel-token` cookie instead of the header.
async fn aws_token_in_cookie(driver: IoDriver) {
    let t = relay_server(driver, |_| {}).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["SSH"]).await;
    let mut device = AwsPeer::connect(&relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let (response, mut client) = RawConn::upgrade(
        &relay,
        Mode::Source.path(),
        &[
            (
                "Cookie".into(),
                format!("theme=dark; awsiot-tunnel-token={}", tun.client_token),
            ),
            (
                "Sec-WebSocket-Protocol".into(),
                Aws::V3.subprotocol().into(),
            ),
        ],
    )
    .await;
    response.assert_switched(Some(Aws::V3.subprotocol()));
    assert_eq!(
        service_ids_of_frame(&client.read_data_frame().await.payload),
        ["SSH"]
    );
    let frame = encode_stream(&[stream_start(1, "SSH", 1), data(1, "", 1, b"cookie")]);
    client.send_frame(op::BINARY, &frame).await;
    assert_eq!(device.next_frame().await, frame);
}

/// WebSocket frames of 0 to 131076 bytes arrive as frames of the same size and bytes, in both
/// directions. The payload is one AWS DATA stream cut at those sizes, so some frames hold
/// several messages and others a piece of one (a length prefix included).
async fn frames_of_every_size_pass_frame_for_frame(driver: IoDriver) {
    const SIZES: [usize; 9] = [0, 1, 125, 126, 65535, 65536, 131076, 2, 5];
    let t = relay_server(driver, |_| {}).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["SSH"]).await;
    let (mut device, _) = RawConn::aws(&relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let (mut client, _) = RawConn::aws(&relay, Mode::Source, Aws::V3, &tun.client_token).await;
    client
        .send_frame(op::BINARY, &encode_stream(&[stream_start(1, "SSH", 1)]))
        .await;
    device.read_data_frame().await;

    let total: usize = SIZES.iter().sum();
    send_sizes(
        &mut client,
        &mut device,
        &data_stream_of_len(total, 1),
        &SIZES,
    )
    .await;
    send_sizes(
        &mut device,
        &mut client,
        &data_stream_of_len(total, 2),
        &SIZES,
    )
    .await;
}

/// Sends `stream` from `from` cut into frames of `sizes`; `to` must receive the same frames.
async fn send_sizes(from: &mut RawConn, to: &mut RawConn, stream: &[u8], sizes: &[usize]) {
    let mut at = 0;
    for &size in sizes {
        from.send_frame(op::BINARY, &stream[at..at + size]).await;
        at += size;
    }
    let mut at = 0;
    let mut reader = MessageReader::default();
    for &size in sizes {
        let frame = to.read_data_frame().await;
        assert!(
            frame.fin && frame.opcode == op::BINARY,
            "a {size}-byte frame arrived as opcode {} fin={}",
            frame.opcode,
            frame.fin
        );
        assert_same_bytes(
            &frame.payload,
            &stream[at..at + size],
            &format!("the {size}-byte frame, frame for frame"),
        );
        reader.feed(&frame.payload);
        at += size;
    }
    let mut count = 0;
    while let Some(m) = reader.next() {
        assert!(is(&m, MessageType::Data));
        count += 1;
    }
    assert!(reader.is_empty() && count >= 4, "{count} messages");
}

/// Several messages in one frame, and one message cut into 3 frames (the first cut inside the
/// length prefix), arrive intact and framed as sent.
async fn messages_cross_frame_boundaries_intact(driver: IoDriver) {
    let t = relay_server(driver, |_| {}).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["SSH"]).await;
    let mut device = AwsPeer::connect(&relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let mut client = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &tun.client_token).await;

    let together = encode_stream(&[
        stream_start(1, "SSH", 1),
        data(1, "", 1, b"first"),
        data(1, "", 1, b"second"),
        data(1, "", 1, &[7; 3000]),
    ]);
    client.send_frame(together.clone()).await;
    assert_same_bytes(
        &device.next_frame().await,
        &together,
        "one frame of four messages",
    );

    let big = encode_stream(&[data(1, "SSH", 1, &[0xA5; 60_000])]);
    async fn three_frames(from: &mut AwsPeer, to: &mut AwsPeer, big: &[u8]) {
        from.send_split(big, &[1, 30_000]).await;
        assert_same_bytes(&to.next_frame().await, &big[..1], "first piece");
        assert_same_bytes(&to.next_frame().await, &big[1..30_000], "second piece");
        assert_same_bytes(&to.next_frame().await, &big[30_000..], "third piece");
    }
    three_frames(&mut client, &mut device, &big).await;
    three_frames(&mut device, &mut client, &big).await;
    // And decoded across the boundaries by a reader of messages.
    client.send_split(&big, &[2, 40_000]).await;
    let m = device.next_message().await;
    assert_eq!(m.payload.len(), 60_000);
    assert!(m.payload.iter().all(|&b| b == 0xA5));
    assert_eq!(m.service_id, "SSH");
}

/// 256 MiB each way, both directions at once, in DATA messages of 63 KiB: what arrives hashes
/// to what was sent.
async fn bulk_256_mib_both_directions_at_once(driver: IoDriver) {
    /// Bytes each way.
    const TOTAL: usize = 256 << 20;
    let t = relay_server(driver, |_| {}).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["SSH"]).await;
    let mut device = AwsPeer::connect(&relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let mut client = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &tun.client_token).await;
    client.send(&stream_start(1, "SSH", 1)).await;
    assert!(is(&device.next_message().await, MessageType::StreamStart));

    let (client_tx, client_rx) = client.ws.split();
    let (device_tx, device_rx) = device.ws.split();
    let up_sent = tokio::spawn(send_bulk(client_tx, TOTAL, 0x9E37_79B9_7F4A_7C15));
    let down_sent = tokio::spawn(send_bulk(device_tx, TOTAL, 0xD1B5_4A32_D192_ED03));
    let up_received = tokio::spawn(receive_bulk(device_rx, TOTAL));
    let down_received = tokio::spawn(receive_bulk(client_rx, TOTAL));
    let limit = Duration::from_secs(600);
    let (a, b, c, d) = within_for(limit, "512 MiB through the relay", async {
        tokio::join!(up_sent, down_sent, up_received, down_received)
    })
    .await;
    assert_eq!(a.unwrap(), c.unwrap(), "client -> device SHA-256");
    assert_eq!(b.unwrap(), d.unwrap(), "device -> client SHA-256");
}

// ---------------------------------------------------------------------------------------------
// Alibaba family
// ---------------------------------------------------------------------------------------------

/// session_create gets a relay-assigned session id on its way to the device; the device's
/// common_response reaches the client; data_transport both ways byte for byte; the client's
/// session_release reaches the device. Client with `Sec-WebSocket-Protocol`, device with
/// the plain `subprotocol` header.
async fn aliyun_end_to_end(driver: IoDriver) {
    let t = relay_server(driver, |_| {}).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    // The tunnel's service is named as Alibaba clients name it.
    let tun = open_tunnel(&t, &mut f, &["_SSH"]).await;
    let device_path = tun
        .device_url
        .strip_prefix("wss://localhost:8443")
        .expect("device URL on the public endpoint");
    assert_eq!(device_path, format!("/tunnel/{}/device", tun.id));
    let mut device = aliyun_device(&t, &f, &tun, AliyunStyle::PlainHeader).await;
    let mut client = aliyun_client(&relay, &tun, AliyunStyle::WebSocketProtocol).await;
    assert_both_connected(&t, &f, &tun.id).await;

    // session_create without a session id; the device sees one the relay chose.
    let frame_id = client.session_create("_SSH").await;
    let create = device.recv().await;
    assert_eq!(create.frame_type(), frame_type::SESSION_CREATE);
    assert_eq!(create.frame_id(), frame_id);
    assert_eq!(create.header["service_type"], "_SSH");
    let session = create.session_id().to_string();
    assert!(!session.is_empty());
    device.respond(&create, 0, "ok").await;
    let answer = client.recv().await;
    assert_eq!(answer.frame_type(), frame_type::COMMON_RESPONSE);
    assert_eq!(
        (answer.frame_id(), answer.session_id(), answer.code()),
        (frame_id, session.as_str(), 0)
    );
    assert_eq!(answer.header["service_type"], "_SSH");

    // data_transport passes unchanged, both ways, up to the 4 KiB payload limit.
    for payload in [&b"SSH-2.0-OpenSSH_9.6\r\n"[..], &[0x42; 4096][..], b""] {
        let sent = client.data(&session, payload).await;
        let got = device.recv().await;
        assert_same_bytes(
            &got.raw,
            &sent,
            "client -> device data_transport byte for byte",
        );
        let sent = device.data(&session, payload).await;
        let got = client.recv().await;
        assert_same_bytes(
            &got.raw,
            &sent,
            "device -> client data_transport byte for byte",
        );
    }

    // A second session gets another id.
    let second = client.open_session(&mut device, "_SSH").await;
    assert_ne!(second, session);

    client.release(&session, 0, "client closed").await;
    let release = device.recv().await;
    assert_eq!(release.frame_type(), frame_type::SESSION_RELEASE);
    assert_eq!(
        (release.session_id(), release.code()),
        (session.as_str(), 0)
    );

    // The device ends the second session; the client hears it.
    device.release(&second, 1, "device closed").await;
    let release = client.recv().await;
    assert_eq!(release.frame_type(), frame_type::SESSION_RELEASE);
    assert_eq!((release.session_id(), release.code()), (second.as_str(), 1));
}

/// With `max_sessions_per_tunnel = 2`, the relay itself answers the third session_create with
/// common_response code 1; the device never sees it; a released slot can be used again.
async fn aliyun_session_limit(driver: IoDriver) {
    let t = relay_server(driver, |s| s.max_sessions_per_tunnel = 2).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["_SSH"]).await;
    let mut device = aliyun_device(&t, &f, &tun, AliyunStyle::WebSocketProtocol).await;
    let mut client = aliyun_client(&relay, &tun, AliyunStyle::PlainHeader).await;
    let first = client.open_session(&mut device, "_SSH").await;
    let _second = client.open_session(&mut device, "_SSH").await;

    let third = client.session_create("_SSH").await;
    let answer = client.recv().await;
    assert_eq!(answer.frame_type(), frame_type::COMMON_RESPONSE);
    assert_eq!(
        (answer.frame_id(), answer.code()),
        (third, 1),
        "{:?}",
        answer.header
    );

    // The device's next frame is this data, not the refused session_create.
    let sent = client.data(&first, b"after the refusal").await;
    assert_eq!(device.recv().await.raw, sent);

    client.release(&first, 0, "done").await;
    assert_eq!(
        device.recv().await.frame_type(),
        frame_type::SESSION_RELEASE
    );
    client.open_session(&mut device, "_SSH").await;
}

/// A device that never answers session_create: the relay answers the client (PROTOCOLS.md
/// names no code for the timeout; any non-zero code echoing the frame id is accepted).
async fn aliyun_silent_device_times_out(driver: IoDriver) {
    let t = relay_server(driver, |s| s.session_create_timeout_ms = 200).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["_SSH"]).await;
    let mut device = aliyun_device(&t, &f, &tun, AliyunStyle::WebSocketProtocol).await;
    let mut client = aliyun_client(&relay, &tun, AliyunStyle::WebSocketProtocol).await;
    let frame_id = client.session_create("_SSH").await;
    assert_eq!(device.recv().await.frame_type(), frame_type::SESSION_CREATE);
    let answer = within_for(
        Duration::from_secs(15),
        "the relay's timeout answer",
        client.recv(),
    )
    .await;
    assert_eq!(answer.frame_type(), frame_type::COMMON_RESPONSE);
    assert_eq!(answer.frame_id(), frame_id);
    assert_ne!(answer.code(), 0);
}

// ---------------------------------------------------------------------------------------------
// Lifecycle seen from the data plane
// ---------------------------------------------------------------------------------------------

/// Close through the API: both sides get close 1000 with a reason naming the close, describe
/// shows both DISCONNECTED, and the tokens no longer open the tunnel.
async fn close_through_api_ends_both_sides(driver: IoDriver) {
    let t = relay_server(driver, |_| {}).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["SSH"]).await;
    let mut device = AwsPeer::connect(&relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let mut client = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &tun.client_token).await;
    assert_both_connected(&t, &f, &tun.id).await;

    let (s, v) = t
        .post(&format!("/v1/tunnels/{}/close", tun.id), &f.key, json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
    for (side, peer) in [("device", &mut device), ("client", &mut client)] {
        let (code, reason) = peer.expect_close().await;
        assert_eq!(code, 1000, "{side} close code");
        assert!(reason.contains("closed"), "{side} close reason {reason:?}");
    }
    wait_describe(&t, &f, &tun.id, "both DISCONNECTED", |v| {
        v["device"]["state"] == "DISCONNECTED" && v["client"]["state"] == "DISCONNECTED"
    })
    .await;
    for (mode, token) in [
        (Mode::Source, &tun.client_token),
        (Mode::Destination, &tun.device_token),
    ] {
        let refused = AwsPeer::try_connect(&relay, mode, Aws::V3, token)
            .await
            .err()
            .expect("a closed tunnel's token is refused");
        assert!(
            [401, 409].contains(&refused.status),
            "{mode:?}: {}",
            refused.status
        );
    }
}

/// A second client with the same token replaces the first: the first gets a close frame, the
/// device gets STREAM_RESET for the open stream, and the new client works.
async fn aws_replacement_resets_open_streams(driver: IoDriver) {
    let t = relay_server(driver, |_| {}).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["SSH"]).await;
    let mut device = AwsPeer::connect(&relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let mut first = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &tun.client_token).await;
    first.send(&stream_start(1, "SSH", 1)).await;
    assert!(is(&device.next_message().await, MessageType::StreamStart));
    first.send(&data(1, "", 1, b"before")).await;
    assert_eq!(device.next_message().await.payload.as_ref(), b"before");

    let mut second = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &tun.client_token).await;
    match first.end().await {
        WsEnd::Close(_) => {}
        WsEnd::Dropped => panic!("the replaced client gets a close frame"),
    }
    let reset = device.next_message().await;
    assert!(is(&reset, MessageType::StreamReset), "{reset:?}");
    assert_eq!(reset.stream_id, 1);

    second.send(&stream_start(2, "SSH", 1)).await;
    let m = device.next_message().await;
    assert!(
        is(&m, MessageType::StreamStart) && m.stream_id == 2,
        "{m:?}"
    );
    device.send(&data(2, "", 1, b"to the new client")).await;
    assert_eq!(
        second.next_message().await.payload.as_ref(),
        b"to the new client"
    );
    wait_state(&t, &f, &tun.id, "client", "CONNECTED").await;
}

/// A client that vanishes with half a message forwarded: a STREAM_RESET now would be read as
/// the rest of that message, so the device's connection is closed instead; it reconnects.
async fn aws_peer_gone_mid_message_ends_the_other_side(driver: IoDriver) {
    let t = relay_server(driver, |_| {}).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["SSH"]).await;
    let mut device = AwsPeer::connect(&relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let mut client = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &tun.client_token).await;
    client.send(&stream_start(1, "SSH", 1)).await;
    assert!(is(&device.next_message().await, MessageType::StreamStart));
    let message = encode_stream(&[data(1, "", 1, &[7; 1000])]);
    client.send_frame(message[..500].to_vec()).await;
    assert_eq!(device.next_frame().await, &message[..500]);
    drop(client);
    let (code, reason) = device.expect_close().await;
    assert_eq!((code, reason.as_str()), (1001, "peer left mid-message"));
    // The tunnel is still OPEN: the device comes back with its token, and a new client works.
    let mut device = AwsPeer::connect(&relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let mut client = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &tun.client_token).await;
    client.send(&stream_start(2, "SSH", 1)).await;
    let m = device.next_message().await;
    assert!(
        is(&m, MessageType::StreamStart) && m.stream_id == 2,
        "{m:?}"
    );
}

/// Alibaba: a replaced client's open sessions are released to the device with code 2.
async fn aliyun_replacement_releases_open_sessions(driver: IoDriver) {
    let t = relay_server(driver, |_| {}).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["_SSH"]).await;
    let mut device = aliyun_device(&t, &f, &tun, AliyunStyle::WebSocketProtocol).await;
    let connect_client = || aliyun_client(&relay, &tun, AliyunStyle::WebSocketProtocol);
    let mut first = connect_client().await;
    let a = first.open_session(&mut device, "_SSH").await;
    let b = first.open_session(&mut device, "_SSH").await;

    let mut second = connect_client().await;
    match first.end().await {
        WsEnd::Close(_) => {}
        WsEnd::Dropped => panic!("the replaced client gets a close frame"),
    }
    let mut released = Vec::new();
    for _ in 0..2 {
        let r = device.recv().await;
        assert_eq!(
            r.frame_type(),
            frame_type::SESSION_RELEASE,
            "{:?}",
            r.header
        );
        assert_eq!(r.code(), 2, "relay saw the client disconnect");
        released.push(r.session_id().to_string());
    }
    released.sort();
    let mut open = vec![a, b];
    open.sort();
    assert_eq!(released, open);
    second.open_session(&mut device, "_SSH").await;
    wait_state(&t, &f, &tun.id, "client", "CONNECTED").await;
}

/// Rotating the client token disconnects the client; the old token is refused (401), the new
/// one works.
async fn rotate_disconnects_the_client(driver: IoDriver) {
    let t = relay_server(driver, |_| {}).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["SSH"]).await;
    let mut device = AwsPeer::connect(&relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let mut client = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &tun.client_token).await;
    assert_both_connected(&t, &f, &tun.id).await;

    let (s, v) = t
        .post(
            &format!("/v1/tunnels/{}/rotate", tun.id),
            &f.key,
            json!({"side": "client"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let new_token = v["client_token"].as_str().unwrap().to_string();
    assert_ne!(new_token, tun.client_token);
    client.end().await;
    wait_state(&t, &f, &tun.id, "client", "DISCONNECTED").await;

    let refused = AwsPeer::try_connect(&relay, Mode::Source, Aws::V3, &tun.client_token)
        .await
        .err()
        .expect("the old client token is refused");
    assert_eq!(refused.status, 401);

    let mut client = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &new_token).await;
    client.send(&stream_start(1, "SSH", 1)).await;
    client.send(&data(1, "", 1, b"with the new token")).await;
    let mut got = device.next_message().await;
    while is(&got, MessageType::StreamReset) {
        got = device.next_message().await;
    }
    assert!(is(&got, MessageType::StreamStart), "{got:?}");
    assert_eq!(
        device.next_message().await.payload.as_ref(),
        b"with the new token"
    );
    assert_eq!(
        describe(&t, &f, &tun.id).await["device"]["state"],
        "CONNECTED"
    );
}

/// With pings every 50 ms: peers that keep reading stay connected and get an RTT; a peer that
/// stops reading (and so never pongs) is dropped.
async fn pings_keep_readers_and_drop_stalled_peers(driver: IoDriver) {
    /// Pings each reader must see: well past 3 missed intervals.
    const PINGS: usize = 12;
    let t = relay_server(driver, |s| s.peer_ping_interval_ms = 50).await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let tun = open_tunnel(&t, &mut f, &["SSH"]).await;
    let device = AwsPeer::connect(&relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let client = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &tun.client_token).await;

    /// Reads (tungstenite answers each ping with a pong) until told to stop; counts pings.
    fn keep_reading(
        mut peer: AwsPeer,
        pings: Arc<AtomicUsize>,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<AwsPeer>,
    ) {
        let (stop_tx, mut stop) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stop => return peer,
                    msg = peer.ws.next() => match msg {
                        Some(Ok(WsMessage::Ping(_))) => { pings.fetch_add(1, Ordering::SeqCst); }
                        Some(Ok(_)) => {}
                        other => panic!("reader's WebSocket ended: {other:?}"),
                    },
                }
            }
        });
        (stop_tx, task)
    }
    let device_pings = Arc::new(AtomicUsize::new(0));
    let client_pings = Arc::new(AtomicUsize::new(0));
    let (_device_stop, device_task) = keep_reading(device, device_pings.clone());
    let (client_stop, client_task) = keep_reading(client, client_pings.clone());

    within("both readers see the relay's pings", async {
        while device_pings.load(Ordering::SeqCst) < PINGS
            || client_pings.load(Ordering::SeqCst) < PINGS
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let d = wait_describe(&t, &f, &tun.id, "RTTs of both sides", |v| {
        v["device"]["rtt_ms"].is_number() && v["client"]["rtt_ms"].is_number()
    })
    .await;
    assert_eq!(
        (&d["device"]["state"], &d["client"]["state"]),
        (&json!("CONNECTED"), &json!("CONNECTED")),
        "peers that read stay connected: {d}"
    );
    assert!(d["device"]["rtt_ms"].as_f64().unwrap() >= 0.0);

    // The client stops reading but keeps its socket open.
    client_stop.send(()).unwrap();
    let stalled = within("the reader stops", client_task).await.unwrap();
    wait_state(&t, &f, &tun.id, "client", "DISCONNECTED").await;
    let d = describe(&t, &f, &tun.id).await;
    assert_eq!(d["device"]["state"], "CONNECTED", "{d}");
    assert!(!device_task.is_finished(), "the reading device is still up");
    drop(stalled);
}
