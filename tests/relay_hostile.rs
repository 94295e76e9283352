//! Hostile input against the relay: garbage instead of TLS or HTTP, old TLS, refused upgrades,
//! bad frames, slow handshakes, a frozen peer, and connection churn. Each test ends in a clear
//! refusal while another, already-paired tunnel (an [`EchoTunnel`]) keeps working. Every
//! scenario runs on both io drivers.
#[macro_use]
mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use common::peers::*;
use common::*;
use iotunnel::config::{IoDriver, Settings};
use iotunnel::proto::aws::MessageType;
use serde_json::json;
use tokio::sync::{RwLock, RwLockReadGuard};

on_both_drivers! {
    garbage_instead_of_tls;
    garbage_after_tls;
    tls_below_1_2_is_refused_and_1_2_and_1_3_work;
    tls_key_updates_mid_stream_keep_both_directions;
    upgrade_refusals_carry_status_and_envelope;
    closed_tunnels_token_is_refused_with_409;
    family_mismatch_is_refused_with_409;
    absolute_form_request_target_works;
    text_frame_is_closed_with_1002_or_1003;
    unmasked_client_frame_is_closed_with_1002;
    oversized_frame_is_closed_with_1009;
    long_control_frame_is_closed_with_1002;
    slow_handshakes_do_not_lock_out_other_addresses;
    frozen_peer_does_not_stall_another_tunnel;
    connect_close_cycles_leak_no_fds;
}

/// The fd-leak test counts this process's open files, which every test in this binary shares:
/// it runs alone (write), all others together (read).
static FD_GATE: LazyLock<RwLock<()>> = LazyLock::new(|| RwLock::new(()));

/// A server, its relay, an online device and a paired tunnel that echoes.
struct Scene {
    echo: EchoTunnel,
    f: Fixture,
    relay: Relay,
    t: TestServer,
    _gate: Option<RwLockReadGuard<'static, ()>>,
}

/// How long a connection may take to finish its TLS handshake and upgrade request in these
/// tests: short, so a relay that waits out a garbage handshake still answers within a step.
const HANDSHAKE_TIMEOUT_MS: u64 = 3_000;

async fn scene(driver: IoDriver, tweak: impl FnOnce(&mut Settings)) -> Scene {
    let gate = FD_GATE.read().await;
    let mut s = scene_ungated(driver, tweak).await;
    s._gate = Some(gate);
    s
}

async fn scene_ungated(driver: IoDriver, tweak: impl FnOnce(&mut Settings)) -> Scene {
    let t = relay_server(driver, |s| {
        s.handshake_timeout_ms = HANDSHAKE_TIMEOUT_MS;
        tweak(s);
    })
    .await;
    let relay = Relay::of(&t);
    let mut f = t.online_device().await;
    let mut echo = EchoTunnel::open(&t, &mut f, &relay).await;
    echo.assert_echoes().await;
    Scene {
        echo,
        f,
        relay,
        t,
        _gate: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Below HTTP: TCP and TLS
// ---------------------------------------------------------------------------------------------

/// Bytes that are not a TLS ClientHello: the relay hangs up (at most after a TLS alert).
async fn garbage_instead_of_tls(driver: IoDriver) {
    let mut s = scene(driver, |_| {}).await;
    let mut conn = RawConn {
        stream: RelayStream::Plain(s.relay.tcp().await),
        buf: Vec::new(),
    };
    let _ = conn
        .try_send(b"\x00\xffTHIS IS NOT TLS\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        .await;
    let (answer, _) = conn.read_to_end().await;
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "garbage gets at most a TLS alert, got {answer:?}"
    );
    s.echo.assert_echoes().await;
}

/// A good TLS handshake followed by bytes that are not HTTP: 400 or a hang-up.
async fn garbage_after_tls(driver: IoDriver) {
    let mut s = scene(driver, |_| {}).await;
    let mut conn = RawConn::open(&s.relay).await;
    let _ = conn
        .try_send(b"\x16\x03\x01 this is not an HTTP request \x00\x01\x02\r\n\r\n")
        .await;
    let (answer, _) = conn.read_to_end().await;
    if !answer.is_empty() {
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 400 "), "answer {text:?}");
        assert!(
            text.contains("\"error\""),
            "400 with the JSON envelope: {text:?}"
        );
    }
    s.echo.assert_echoes().await;
}

/// A TLS 1.0/1.1 ClientHello offering only `version` (no supported_versions extension), with
/// ECDSA and RSA CBC suites, SNI localhost, P-256.
fn legacy_client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut body = version.to_vec();
    body.extend_from_slice(&[0x5a; 32]);
    body.push(0);
    let suites: [u16; 4] = [0xc009, 0xc013, 0x002f, 0x0035];
    body.extend_from_slice(&8u16.to_be_bytes());
    suites
        .iter()
        .for_each(|s| body.extend_from_slice(&s.to_be_bytes()));
    body.extend_from_slice(&[1, 0]);
    let name = b"localhost";
    let mut ext = vec![0x00, 0x00];
    ext.extend_from_slice(&((name.len() + 5) as u16).to_be_bytes());
    ext.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name);
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17]);
    ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// TLS 1.0 and 1.1 get no ServerHello (an alert or a hang-up); a TLS 1.2-only and a TLS
/// 1.3-only client both work.
async fn tls_below_1_2_is_refused_and_1_2_and_1_3_work(driver: IoDriver) {
    let mut s = scene(driver, |_| {}).await;
    for (name, version) in [("TLS 1.0", [3, 1]), ("TLS 1.1", [3, 2])] {
        let mut conn = RawConn {
            stream: RelayStream::Plain(s.relay.tcp().await),
            buf: Vec::new(),
        };
        conn.send(&legacy_client_hello(version)).await;
        let (answer, _) = conn.read_to_end().await;
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "{name} must get an alert or a hang-up, got {answer:02x?}"
        );
    }

    let tun = open_tunnel(&s.t, &mut s.f, &["SSH"]).await;
    let tls12 = s
        .relay
        .clone()
        .with_tls_versions(&s.t, &[&rustls::version::TLS12]);
    let tls13 = s
        .relay
        .clone()
        .with_tls_versions(&s.t, &[&rustls::version::TLS13]);
    let mut device = AwsPeer::connect(&tls12, Mode::Destination, Aws::V3, &tun.device_token).await;
    let mut client = AwsPeer::connect(&tls13, Mode::Source, Aws::V3, &tun.client_token).await;
    assert_eq!(
        device.ws.get_ref().tls_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(
        client.ws.get_ref().tls_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    client.send(&stream_start(1, "SSH", 1)).await;
    client.send(&data(1, "", 1, b"over 1.3")).await;
    assert!(device.next_message().await.r#type == MessageType::StreamStart as i32);
    assert_eq!(device.next_message().await.payload.as_ref(), b"over 1.3");
    device.send(&data(1, "", 1, b"over 1.2")).await;
    assert_eq!(client.next_message().await.payload.as_ref(), b"over 1.2");
    s.echo.assert_echoes().await;
}

/// TLS 1.3 key updates from both peers, each asking the relay to update its own keys too
/// (the relay opens and seals the records itself): traffic keeps flowing both ways.
async fn tls_key_updates_mid_stream_keep_both_directions(driver: IoDriver) {
    let mut s = scene(driver, |_| {}).await;
    let tun = open_tunnel(&s.t, &mut s.f, &["SSH"]).await;
    let tls13 = s
        .relay
        .clone()
        .with_tls_versions(&s.t, &[&rustls::version::TLS13]);
    let mut device = AwsPeer::connect(&tls13, Mode::Destination, Aws::V3, &tun.device_token).await;
    let mut client = AwsPeer::connect(&tls13, Mode::Source, Aws::V3, &tun.client_token).await;
    client.send(&stream_start(1, "SSH", 1)).await;
    assert!(device.next_message().await.r#type == MessageType::StreamStart as i32);
    for round in 0..3u8 {
        for peer in [&mut client, &mut device] {
            match peer.ws.get_mut() {
                RelayStream::Tls(tls) => tls.get_mut().1.refresh_traffic_keys().unwrap(),
                RelayStream::Plain(_) => panic!("a wss relay"),
            }
        }
        let up = vec![round; 40_000];
        client.send(&data(1, "", 1, &up)).await;
        assert_eq!(device.next_message().await.payload.as_ref(), &up[..]);
        let down = vec![round + 100; 40_000];
        device.send(&data(1, "", 1, &down)).await;
        assert_eq!(client.next_message().await.payload.as_ref(), &down[..]);
    }
    s.echo.assert_echoes().await;
}

// ---------------------------------------------------------------------------------------------
// The upgrade request
// ---------------------------------------------------------------------------------------------

/// Each malformed or unauthorised upgrade gets its status and the JSON error envelope.
async fn upgrade_refusals_carry_status_and_envelope(driver: IoDriver) {
    let mut s = scene(driver, |_| {}).await;
    let tun = open_tunnel(&s.t, &mut s.f, &["SSH"]).await;
    let v3 = Aws::V3.subprotocol().to_string();
    let client = aws_headers(Aws::V3, &tun.client_token);
    let unknown = "u".repeat(43);
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        ("unknown path", upgrade_request("/nope", &client), &[400]),
        (
            "unknown mode",
            upgrade_request("/tunnel?local-proxy-mode=sideways", &client),
            &[400],
        ),
        (
            "no token",
            upgrade_request(
                Mode::Source.path(),
                &[("Sec-WebSocket-Protocol".into(), v3.clone())],
            ),
            &[401],
        ),
        (
            "unknown token",
            upgrade_request(Mode::Source.path(), &aws_headers(Aws::V3, &unknown)),
            &[401],
        ),
        (
            "unknown token, Alibaba path",
            upgrade_request(
                &aliyun_path(&tun.id, AliyunSide::Source),
                &aliyun_headers(AliyunStyle::WebSocketProtocol, &unknown),
            ),
            &[401],
        ),
        (
            "client token as destination",
            upgrade_request(Mode::Destination.path(), &client),
            &[403],
        ),
        (
            "device token as source",
            upgrade_request(
                Mode::Source.path(),
                &aws_headers(Aws::V3, &tun.device_token),
            ),
            &[403],
        ),
        (
            "token of another tunnel on the Alibaba path",
            upgrade_request(
                &aliyun_path(&s.echo.tunnel.id, AliyunSide::Source),
                &aliyun_headers(AliyunStyle::WebSocketProtocol, &tun.client_token),
            ),
            &[403],
        ),
        (
            "two tokens (header and cookie)",
            upgrade_request(
                Mode::Source.path(),
                &[
                    client.clone(),
                    vec![(
                        "Cookie".into(),
                        format!("awsiot-tunnel-token={}", tun.client_token),
                    )],
                ]
                .concat(),
            ),
            &[400, 401],
        ),
        (
            "not a WebSocket upgrade",
            plain_get(Mode::Source.path(), &client),
            &[426],
        ),
        (
            "request over 4 KiB",
            upgrade_request(
                Mode::Source.path(),
                &[client.clone(), vec![("x-padding".into(), "p".repeat(5000))]].concat(),
            ),
            &[400, 431],
        ),
    ];
    for (what, request, statuses) in cases {
        let (response, _) = RawConn::request(&s.relay, &request).await;
        let body = response.assert_refusal(statuses);
        eprintln!("{what}: {} {body}", response.status);
    }
    // Nothing refused above connected anyone.
    let d = describe(&s.t, &s.f, &tun.id).await;
    assert_eq!(
        (&d["device"]["state"], &d["client"]["state"]),
        (&json!("DISCONNECTED"), &json!("DISCONNECTED"))
    );
    s.echo.assert_echoes().await;
}

/// A closed tunnel's tokens are refused with 409 and the envelope.
async fn closed_tunnels_token_is_refused_with_409(driver: IoDriver) {
    let mut s = scene(driver, |_| {}).await;
    let tun = open_tunnel(&s.t, &mut s.f, &["SSH"]).await;
    let (status, v) =
        s.t.post(
            &format!("/v1/tunnels/{}/close", tun.id),
            &s.f.key,
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    for (mode, token) in [
        (Mode::Source, &tun.client_token),
        (Mode::Destination, &tun.device_token),
    ] {
        let (response, _) =
            RawConn::upgrade(&s.relay, mode.path(), &aws_headers(Aws::V3, token)).await;
        response.assert_refusal(&[409]);
    }
    let (response, _) = RawConn::upgrade(
        &s.relay,
        &aliyun_path(&tun.id, AliyunSide::Source),
        &aliyun_headers(AliyunStyle::WebSocketProtocol, &tun.client_token),
    )
    .await;
    response.assert_refusal(&[409]);
    s.echo.assert_echoes().await;
}

/// Both sides of a tunnel speak one family: the other family is refused with 409.
async fn family_mismatch_is_refused_with_409(driver: IoDriver) {
    let mut s = scene(driver, |_| {}).await;
    // AWS device first, then an Alibaba client.
    let tun = open_tunnel(&s.t, &mut s.f, &["SSH"]).await;
    let _device = AwsPeer::connect(&s.relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let (response, _) = RawConn::upgrade(
        &s.relay,
        &aliyun_path(&tun.id, AliyunSide::Source),
        &aliyun_headers(AliyunStyle::WebSocketProtocol, &tun.client_token),
    )
    .await;
    response.assert_refusal(&[409]);
    // Alibaba device first, then an AWS client.
    let tun = open_tunnel(&s.t, &mut s.f, &["_SSH"]).await;
    let _device = AliyunPeer::connect(
        &s.relay,
        &tun.id,
        AliyunSide::Device,
        &tun.device_token,
        AliyunStyle::WebSocketProtocol,
    )
    .await;
    let (response, _) = RawConn::upgrade(
        &s.relay,
        Mode::Source.path(),
        &aws_headers(Aws::V3, &tun.client_token),
    )
    .await;
    response.assert_refusal(&[409]);
    s.echo.assert_echoes().await;
}

/// `GET wss://localhost/tunnel?... HTTP/1.1` (absolute form) upgrades like the origin form.
async fn absolute_form_request_target_works(driver: IoDriver) {
    let mut s = scene(driver, |_| {}).await;
    let tun = open_tunnel(&s.t, &mut s.f, &["SSH"]).await;
    let mut device =
        AwsPeer::connect(&s.relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let (response, mut client) = RawConn::upgrade(
        &s.relay,
        "wss://localhost/tunnel?local-proxy-mode=source",
        &aws_headers(Aws::V3, &tun.client_token),
    )
    .await;
    response.assert_switched(Some(Aws::V3.subprotocol()));
    let services = service_ids_of_frame(&client.read_data_frame().await.payload);
    assert_eq!(services, ["SSH"]);
    let frame = encode_stream(&[stream_start(1, "SSH", 1), data(1, "", 1, b"absolute")]);
    client.send_frame(op::BINARY, &frame).await;
    assert_eq!(device.next_frame().await, frame);
    s.echo.assert_echoes().await;
}

// ---------------------------------------------------------------------------------------------
// Bad frames after the upgrade
// ---------------------------------------------------------------------------------------------

/// Upgrades a raw client on a fresh tunnel (device connected), sends `bytes`, and returns the
/// relay's close code; the connection must end after the close frame.
async fn close_code_after(s: &mut Scene, bytes: &[u8]) -> (u16, String) {
    let tun = open_tunnel(&s.t, &mut s.f, &["SSH"]).await;
    let _device = AwsPeer::connect(&s.relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let (mut client, _) = RawConn::aws(&s.relay, Mode::Source, Aws::V3, &tun.client_token).await;
    let _ = client.try_send(bytes).await;
    let close = client.expect_close().await;
    client.read_to_end().await;
    close
}

/// A text frame: the tunnel streams are binary only. The issue names 1002 (protocol error);
/// RFC 6455 7.4.1 and `iotunnel::proto` (`ws::reject_text`) use 1003 (unacceptable data type).
/// Either passes.
async fn text_frame_is_closed_with_1002_or_1003(driver: IoDriver) {
    let mut s = scene(driver, |_| {}).await;
    let (code, _) = close_code_after(&mut s, &client_frame(op::TEXT, b"{\"hello\":1}")).await;
    eprintln!("text frame closed with {code}");
    assert!(
        [1002, 1003].contains(&code),
        "text frame closed with {code}"
    );
    s.echo.assert_echoes().await;
}

/// A client frame without a mask.
async fn unmasked_client_frame_is_closed_with_1002(driver: IoDriver) {
    let mut s = scene(driver, |_| {}).await;
    let unmasked = frame_bytes(
        true,
        op::BINARY,
        None,
        &encode_stream(&[stream_start(1, "SSH", 1)]),
    );
    let (code, _) = close_code_after(&mut s, &unmasked).await;
    assert_eq!(code, 1002);
    s.echo.assert_echoes().await;
}

/// A frame one byte over `max_frame_payload` (the AWS limit, 131076): refused at its header.
async fn oversized_frame_is_closed_with_1009(driver: IoDriver) {
    let mut s = scene(driver, |_| {}).await;
    let limit = s.t.server().control.settings.max_frame_payload as u64;
    assert_eq!(limit, 131_076);
    let mut bytes = frame_header(true, op::BINARY, Some(MASK), limit + 1);
    bytes.extend_from_slice(&[0; 64]);
    let (code, _) = close_code_after(&mut s, &bytes).await;
    assert_eq!(code, 1009);
    s.echo.assert_echoes().await;
}

/// A ping with 126 bytes of payload (control frames carry at most 125).
async fn long_control_frame_is_closed_with_1002(driver: IoDriver) {
    let mut s = scene(driver, |_| {}).await;
    let (code, _) = close_code_after(&mut s, &client_frame(op::PING, &[0x11; 126])).await;
    assert_eq!(code, 1002);
    s.echo.assert_echoes().await;
}

// ---------------------------------------------------------------------------------------------
// Resource exhaustion
// ---------------------------------------------------------------------------------------------

/// 200 handshakes from 127.0.0.1 that never finish (100 silent, 100 dribbling a byte every
/// 50 ms) with `max_handshakes_per_ip = 20`: a peer from 127.0.0.2 still connects at once, the
/// slow ones are cut off by the 500 ms handshake timeout, and 127.0.0.1 can connect afterwards.
async fn slow_handshakes_do_not_lock_out_other_addresses(driver: IoDriver) {
    let mut s = scene(driver, |s| {
        s.max_handshakes_per_ip = 20;
        s.handshake_timeout_ms = 500;
    })
    .await;
    let tun = open_tunnel(&s.t, &mut s.f, &["SSH"]).await;
    let mut device =
        AwsPeer::connect(&s.relay, Mode::Destination, Aws::V3, &tun.device_token).await;

    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(s.relay.tcp().await);
    }
    let mut dribblers = Vec::new();
    for _ in 0..100 {
        let mut tcp = s.relay.tcp().await;
        dribblers.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            for &b in legacy_client_hello([3, 3]).iter().cycle() {
                tick.tick().await;
                if tcp.write_all(&[b]).await.is_err() {
                    return;
                }
            }
        }));
    }

    let other = s
        .relay
        .clone()
        .bound_to(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    let mut client = AwsPeer::connect(&other, Mode::Source, Aws::V3, &tun.client_token).await;
    client.send(&stream_start(1, "SSH", 1)).await;
    client.send(&data(1, "", 1, b"from 127.0.0.2")).await;
    device.next_message().await;
    assert_eq!(
        device.next_message().await.payload.as_ref(),
        b"from 127.0.0.2"
    );
    s.echo.assert_echoes().await;

    // The relay hangs up on every slow handshake.
    within("the relay drops the silent handshakes", async {
        for tcp in silent {
            let mut conn = RawConn {
                stream: RelayStream::Plain(tcp),
                buf: Vec::new(),
            };
            conn.read_to_end().await;
        }
    })
    .await;
    within("the relay drops the dribbling handshakes", async {
        for d in dribblers {
            d.await.unwrap();
        }
    })
    .await;
    // 127.0.0.1's handshake slots are free again.
    let mut again = AwsPeer::connect(&s.relay, Mode::Source, Aws::V3, &tun.client_token).await;
    again.send(&stream_start(2, "SSH", 1)).await;
    let mut m = device.next_message().await;
    while m.r#type == MessageType::StreamReset as i32 {
        m = device.next_message().await;
    }
    assert_eq!(
        (m.r#type, m.stream_id),
        (MessageType::StreamStart as i32, 2)
    );
    s.echo.assert_echoes().await;
}

/// On one shard, tunnel A's client stops reading while its device floods it. Tunnel B keeps
/// echoing (1000 round trips within 30 s), A's device is held back rather than buffered without
/// bound, and once A's client reads again every byte arrives, in order.
async fn frozen_peer_does_not_stall_another_tunnel(driver: IoDriver) {
    /// DATA payload per flood message (63 KiB).
    const CHUNK: usize = 64_512;
    let mut s = scene(driver, |s| s.shards = 1).await;
    let tun = open_tunnel(&s.t, &mut s.f, &["SSH"]).await;
    let mut device =
        AwsPeer::connect(&s.relay, Mode::Destination, Aws::V3, &tun.device_token).await;
    let mut frozen = AwsPeer::connect(&s.relay, Mode::Source, Aws::V3, &tun.client_token).await;
    frozen.send(&stream_start(1, "SSH", 1)).await;
    device.next_message().await;

    let flooded = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn({
        let (flooded, stop) = (flooded.clone(), stop.clone());
        async move {
            let mut seq: u64 = 0;
            while !stop.load(Ordering::SeqCst) {
                let mut payload = vec![0u8; CHUNK];
                payload[..8].copy_from_slice(&seq.to_be_bytes());
                // No time limit: this send blocks for as long as A's client is frozen.
                let frame = encode_stream(&[data(1, "", 1, &payload)]);
                use futures_util::SinkExt;
                device
                    .ws
                    .send(tokio_tungstenite::tungstenite::Message::Binary(
                        frame.into(),
                    ))
                    .await
                    .expect("flood frame sent");
                flooded.fetch_add(CHUNK, Ordering::SeqCst);
                seq += 1;
            }
            (flooded.load(Ordering::SeqCst), device)
        }
    });
    within("the flood gets going", async {
        while flooded.load(Ordering::SeqCst) < (1 << 20) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    within_for(
        Duration::from_secs(30),
        "1000 round trips on tunnel B",
        async {
            for _ in 0..1000 {
                s.echo.round_trip().await;
            }
        },
    )
    .await;
    let held = flooded.load(Ordering::SeqCst);
    eprintln!("tunnel A's device got {held} bytes out while its client was frozen");
    assert!(
        held < 64 << 20,
        "the frozen client's device got {held} bytes out: the relay must stop reading it"
    );

    // Thaw: every flooded byte arrives in order.
    stop.store(true, Ordering::SeqCst);
    /// What the thawed client has read: bytes, and the next sequence number expected.
    struct Drain {
        received: usize,
        seq: u64,
    }
    impl Drain {
        fn take(&mut self, m: iotunnel::proto::aws::Message) {
            assert_eq!(m.payload.len(), CHUNK);
            assert_eq!(
                m.payload[..8],
                self.seq.to_be_bytes(),
                "in order, nothing lost"
            );
            self.seq += 1;
            self.received += CHUNK;
        }
    }
    let mut flood = flood;
    let mut drain = Drain {
        received: 0,
        seq: 0,
    };
    let total = within_for(
        Duration::from_secs(120),
        "the thawed client drains A",
        async {
            let total = loop {
                tokio::select! {
                    done = &mut flood => break done.unwrap().0,
                    m = frozen.next_message() => drain.take(m),
                }
            };
            while drain.received < total {
                drain.take(frozen.next_message().await);
            }
            total
        },
    )
    .await;
    let received = drain.received;
    assert_eq!(received, total);
    s.echo.assert_echoes().await;
}

/// 10,000 connect/close cycles (clean closes, abrupt drops and refused tokens; plaintext, four
/// at a time) leave the server's open files where they were. The server is in-process, so
/// /proc/self/fd counts its sockets.
async fn connect_close_cycles_leak_no_fds(driver: IoDriver) {
    /// Cycles in all: about 5 s per driver on 2 cores (debug build, plaintext). A leak of one fd
    /// in every tenth cycle would still show far above the slack.
    const CYCLES: usize = 10_000;
    /// Parallel connectors, each on its own tunnel (so none replaces another's connection).
    const PARALLEL: usize = 4;
    /// Open files the process may gain for reasons other than a leak (lazy pools, the store).
    const SLACK: usize = 32;
    let _alone = FD_GATE.write().await;
    // Long enough that the idle echo client (which reads only at the end) is never dropped for
    // missed pongs.
    let mut s = scene_ungated(driver, |s| {
        s.relay_plaintext = true;
        s.peer_ping_interval_ms = 3_600_000;
    })
    .await;
    let mut tokens = Vec::new();
    for _ in 0..PARALLEL {
        tokens.push(open_tunnel(&s.t, &mut s.f, &["SSH"]).await.client_token);
    }
    let open_fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();

    async fn cycles(relay: Relay, token: String, from: usize, count: usize) {
        let unknown = "z".repeat(43);
        for i in from..from + count {
            match i % 10 {
                9 => {
                    let (response, _) = RawConn::upgrade(
                        &relay,
                        Mode::Source.path(),
                        &aws_headers(Aws::V3, &unknown),
                    )
                    .await;
                    assert_eq!(response.status, 401);
                }
                k if k % 2 == 0 => {
                    let (mut conn, _) = RawConn::aws(&relay, Mode::Source, Aws::V3, &token).await;
                    conn.send(&client_close(1000, "bye")).await;
                    assert_eq!(conn.expect_close().await.0, 1000);
                    conn.read_to_end().await;
                }
                _ => {
                    // Dropped without a close frame.
                    RawConn::aws(&relay, Mode::Source, Aws::V3, &token).await;
                }
            }
        }
    }
    async fn run(relay: &Relay, tokens: &[String], per_task: usize, from: usize) {
        let tasks: Vec<_> = tokens
            .iter()
            .map(|tok| tokio::spawn(cycles(relay.clone(), tok.clone(), from, per_task)))
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }

    // Warm up (lazy allocations), then measure.
    run(&s.relay, &tokens, 20, 0).await;
    let before = open_fds();
    let started = std::time::Instant::now();
    within_for(
        Duration::from_secs(300),
        "connect/close cycles",
        run(&s.relay, &tokens, CYCLES / PARALLEL, 20),
    )
    .await;
    eprintln!("{CYCLES} cycles in {:?}", started.elapsed());
    let mut after = open_fds();
    for _ in 0..1000 {
        if after <= before + SLACK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        after = open_fds();
    }
    eprintln!("open files: {before} before, {after} after");
    assert!(
        after <= before + SLACK,
        "open files grew from {before} to {after} over {CYCLES} cycles"
    );
    s.echo.assert_echoes().await;
}
