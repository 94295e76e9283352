//! Two relays meshed in one process (nodes "a" and "b", each with its own index, routes and
//! mesh listener, one fleet key, one fleet CA): a peer that reaches the node that does not own
//! its tunnel is forwarded to the owner and pairs there; hostile mesh input (no TLS, a
//! certificate from another CA or none, bad preambles inside the right TLS) is refused and
//! counted; an unreachable owner, or one whose certificate is not the fleet's, answers 503;
//! the owner's refusals and closes reach forwarded peers.
//! Real sockets on 127.0.0.1:0; every scenario on both io drivers.
#[macro_use]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::peers::*;
use futures_util::StreamExt;
use iotunnel::clock::{Clock, SystemClock};
use iotunnel::config::IoDriver;
use iotunnel::proto::aws::MessageType;
use iotunnel::relay::mesh::{encode_preamble, MAX_SKEW_MS, SERVER_NAME};
use iotunnel::relay::stats::{MeshDirection, StatsSnapshot};
use iotunnel::relay::{
    bind_listeners, MeshConfig, MeshIdentity, MeshTls, RelayConfig, RelayHandle,
};
use iotunnel::seam::{CloseReason, DataPlaneSeam, MeshRoutes, RelayCommand, TunnelIndex};
use iotunnel::token;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

on_both_drivers! {
    aws_v3_pairs_across_nodes;
    the_mesh_carries_nothing_in_clear;
    plaintext_nodes_forward_too;
    aliyun_pairs_across_nodes;
    both_sides_forwarded_pair_on_the_owner;
    hostile_mesh_input_is_refused_and_counted;
    the_mesh_requires_the_fleet_tls;
    an_owner_outside_the_fleet_ca_is_unreachable;
    unreachable_owner_answers_503;
    owner_refusals_reach_the_peer_unchanged;
    closing_on_the_owner_ends_the_forwarded_peer;
    a_forwarded_peer_leaving_is_seen_on_the_owner;
    a_tunnel_indexed_a_moment_after_its_peer_dials_is_accepted;
}

/// The fleet's mesh secret in these tests.
const KEY: [u8; 32] = [0x5a; 32];

/// One node: a relay with its seam ends and mesh listener.
struct Node {
    relay: Option<RelayHandle>,
    index: Arc<TunnelIndex>,
    routes: Arc<MeshRoutes>,
    commands: mpsc::UnboundedSender<RelayCommand>,
    mesh_addr: SocketAddr,
    /// How peers reach its relay port (TLS trusting the shared CA).
    peers: Relay,
}

impl Node {
    async fn start(driver: IoDriver, node_id: &str, dir: &std::path::Path, plain: bool) -> Self {
        let tls = iotunnel::tls::ensure_material(dir, "localhost").unwrap();
        let server_tls = iotunnel::relay::tls::server_config(&tls.server_cert, &tls.server_key);
        let cfg = RelayConfig {
            tls: (!plain).then(|| server_tls.unwrap()),
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            max_frame_payload: 131_072,
            max_sessions: 16,
            max_handshakes_per_ip: 256,
            session_create_timeout: Duration::from_secs(10),
            per_tunnel_stats: 0,
            frame_stats: true,
            // Long enough that the late-index test below cannot lose its race on a busy machine.
            unknown_token_grace: Duration::from_secs(5),
            mesh: Some(MeshConfig {
                identity: MeshIdentity {
                    node_id: node_id.into(),
                    key: KEY,
                },
                tls: mesh_tls(dir, dir),
            }),
        };
        let index = Arc::new(TunnelIndex::new(2));
        let routes: Arc<MeshRoutes> = Arc::default();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (events, mut events_rx) = mpsc::channel(1024);
        tokio::spawn(async move { while events_rx.recv().await.is_some() {} });
        let seam = DataPlaneSeam {
            index: index.clone(),
            routes: routes.clone(),
            commands: commands_rx,
            events,
        };
        let listeners = bind_listeners("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let mesh = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = RelayHandle::start(
            cfg,
            driver,
            seam,
            Arc::new(SystemClock),
            listeners,
            Some(mesh),
        )
        .unwrap();
        let peers = Relay {
            addr: relay.addr,
            tls: (!plain).then(|| tls_config(&tls.ca_cert, rustls::ALL_VERSIONS)),
            server_name: "localhost",
            bind: None,
        };
        Self {
            mesh_addr: relay.mesh_addr.unwrap(),
            relay: Some(relay),
            index,
            routes,
            commands,
            peers,
        }
    }

    /// Indexes `tun` as owned by `owner` (None: this node).
    fn index(&self, tun: &Tun, owner: Option<&str>) {
        let expires = SystemClock.now_ms() + 3_600_000;
        self.index.insert(
            &tun.id,
            &["SSH".to_string()],
            expires,
            token::hash_secret(&tun.client),
            token::hash_secret(&tun.device),
            owner,
        );
    }

    /// The shards' statistics summed by `f`.
    async fn stat(&self, f: impl Fn(&StatsSnapshot) -> u64) -> u64 {
        let shards = self.relay.as_ref().unwrap().scraper().scrape().await;
        shards.iter().map(f).sum()
    }

    /// Polls the statistics (bounded) until `f` sums to `want`.
    async fn wait_stat(&self, what: &str, want: u64, f: impl Fn(&StatsSnapshot) -> u64) {
        let mut last = 0;
        for _ in 0..1000 {
            last = self.stat(&f).await;
            if last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: wanted {want}, last saw {last}");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(relay) = self.relay.take() {
            relay.shutdown();
        }
    }
}

/// Mesh TLS trusting the CA of `trust` (a data dir) with the mesh certificate of `own`.
fn mesh_tls(trust: &std::path::Path, own: &std::path::Path) -> MeshTls {
    let (trust, own) = (
        iotunnel::tls::ensure_material(trust, "localhost").unwrap(),
        iotunnel::tls::ensure_material(own, "localhost").unwrap(),
    );
    MeshTls::load(&trust.ca_cert, &own.mesh_cert, &own.mesh_key).unwrap()
}

/// A tunnel id and its two tokens.
struct Tun {
    id: String,
    client: String,
    device: String,
}

impl Tun {
    fn new() -> Self {
        Self {
            id: token::new_tunnel_id(),
            client: token::random_secret(),
            device: token::random_secret(),
        }
    }
}

/// Nodes "a" and "b" serving TLS, each routing to the other; tunnel `tun` owned by "b".
async fn fleet(driver: IoDriver) -> (tempfile::TempDir, Node, Node, Tun) {
    fleet_of(driver, false).await
}

/// Nodes "a" and "b" (plaintext relays when `plain`), each routing to the other; tunnel `tun`
/// owned by "b".
async fn fleet_of(driver: IoDriver, plain: bool) -> (tempfile::TempDir, Node, Node, Tun) {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(driver, "a", dir.path(), plain).await;
    let b = Node::start(driver, "b", dir.path(), plain).await;
    a.routes.set("b", b.mesh_addr);
    b.routes.set("a", a.mesh_addr);
    let tun = Tun::new();
    a.index(&tun, Some("b"));
    b.index(&tun, None);
    (dir, a, b, tun)
}

/// The same tunnel's peers through the nodes given: `device_on` and `client_on`, AWS V3, with
/// stream 1 open.
async fn aws_pair(device_on: &Node, client_on: &Node, tun: &Tun) -> (AwsPeer, AwsPeer) {
    let mut device =
        AwsPeer::connect(&device_on.peers, Mode::Destination, Aws::V3, &tun.device).await;
    let mut client = AwsPeer::connect(&client_on.peers, Mode::Source, Aws::V3, &tun.client).await;
    assert_eq!(
        client.service_ids,
        ["SSH"],
        "SERVICE_IDS come from the owner"
    );
    client.send(&stream_start(1, "SSH", 1)).await;
    let start = device.next_message().await;
    assert_eq!(start.r#type, MessageType::StreamStart as i32);
    (device, client)
}

/// One DATA message each way.
async fn exchange(device: &mut AwsPeer, client: &mut AwsPeer) {
    client.send(&data(1, "", 1, b"to the device")).await;
    assert_eq!(
        device.next_message().await.payload.as_ref(),
        b"to the device"
    );
    device.send(&data(1, "", 1, b"to the client")).await;
    assert_eq!(
        client.next_message().await.payload.as_ref(),
        b"to the client"
    );
}

/// Device on the owner (b), client forwarded from a: 8 MiB each way at once hash the same;
/// the mesh counters of both nodes move.
async fn aws_v3_pairs_across_nodes(driver: IoDriver) {
    const TOTAL: usize = 8 << 20;
    let (_dir, a, b, tun) = fleet(driver).await;
    let (mut device, mut client) = aws_pair(&b, &a, &tun).await;
    exchange(&mut device, &mut client).await;
    a.wait_stat("a's outbound forwards", 1, |s| s.mesh_connections[0])
        .await;
    b.wait_stat("b's inbound mesh connections", 1, |s| s.mesh_connections[1])
        .await;

    // The owner did the pairing: only b has peers; a forwards bytes, not frames.
    assert_eq!(a.stat(|s| s.peers[0] + s.peers[1]).await, 0);
    assert_eq!(b.stat(|s| s.peers[0] + s.peers[1]).await, 2);

    let (client_tx, client_rx) = client.ws.split();
    let (device_tx, device_rx) = device.ws.split();
    let up = tokio::spawn(send_bulk(client_tx, TOTAL, 0x9E37_79B9_7F4A_7C15));
    let down = tokio::spawn(send_bulk(device_tx, TOTAL, 0xD1B5_4A32_D192_ED03));
    let up_rx = tokio::spawn(receive_bulk(device_rx, TOTAL));
    let down_rx = tokio::spawn(receive_bulk(client_rx, TOTAL));
    let (s1, s2, r1, r2) = within_for(Duration::from_secs(120), "16 MiB over the mesh", async {
        tokio::join!(up, down, up_rx, down_rx)
    })
    .await;
    assert_eq!(s1.unwrap(), r1.unwrap(), "client -> device SHA-256");
    assert_eq!(s2.unwrap(), r2.unwrap(), "device -> client SHA-256");

    let forwards_ok = a.stat(|s| s.mesh_forwards[0]).await;
    assert_eq!(forwards_ok, 1);
    assert_eq!(a.stat(|s| s.mesh_forwards[1]).await, 0);
    let out = a
        .stat(|s| s.mesh_bytes[MeshDirection::Outbound as usize])
        .await;
    let inb = b
        .stat(|s| s.mesh_bytes[MeshDirection::Inbound as usize])
        .await;
    assert!(out >= 2 * TOTAL as u64, "a carried {out} bytes out");
    assert!(inb >= 2 * TOTAL as u64, "b carried {inb} bytes in");
}

/// A tap between two mesh ports: forwards one connection from `listen` to `to`, recording
/// what goes each way.
async fn tap(listen: tokio::net::TcpListener, to: SocketAddr) -> (Vec<u8>, Vec<u8>) {
    let (inbound, _) = listen.accept().await.unwrap();
    let outbound = tokio::net::TcpStream::connect(to).await.unwrap();
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    async fn copy(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) -> Vec<u8> {
        let (mut seen, mut buf) = (Vec::new(), vec![0u8; 16 * 1024]);
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            seen.extend_from_slice(&buf[..n]);
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
        seen
    }
    tokio::join!(
        copy(&mut in_read, &mut out_write),
        copy(&mut out_read, &mut in_write),
    )
}

/// The upgrade request, the preamble and the frames cross the mesh encrypted: a tap between
/// the nodes sees TLS records and none of the token, the preamble or the payloads.
async fn the_mesh_carries_nothing_in_clear(driver: IoDriver) {
    let (_dir, a, b, tun) = fleet(driver).await;
    let listen = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    a.routes.set("b", listen.local_addr().unwrap());
    let tapped = tokio::spawn(tap(listen, b.mesh_addr));
    let (mut device, mut client) = aws_pair(&b, &a, &tun).await;
    exchange(&mut device, &mut client).await;
    drop((device, client));
    let (to_owner, from_owner) = within("the tapped link ends", tapped).await.unwrap();
    // TLS handshake records (type 22, version 3.x) open both directions.
    assert!(to_owner.starts_with(&[22, 3]) && from_owner.starts_with(&[22, 3]));
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    for secret in [
        tun.client.as_bytes(),
        b"IOTUNNEL-MESH",
        b"Upgrade",
        b"to the device",
        b"to the client",
        b"SSH",
    ] {
        assert!(
            !contains(&to_owner, secret),
            "{:?} seen on the mesh",
            String::from_utf8_lossy(secret)
        );
        assert!(
            !contains(&from_owner, secret),
            "{:?} seen on the mesh",
            String::from_utf8_lossy(secret)
        );
    }
}

/// The same over plaintext relays (ws://): 1 MiB each way at once.
async fn plaintext_nodes_forward_too(driver: IoDriver) {
    const TOTAL: usize = 1 << 20;
    let (_dir, a, b, tun) = fleet_of(driver, true).await;
    assert!(a.peers.tls.is_none());
    let (device, client) = aws_pair(&b, &a, &tun).await;
    let (client_tx, client_rx) = client.ws.split();
    let (device_tx, device_rx) = device.ws.split();
    let (s1, s2, r1, r2) = within("2 MiB over a plaintext mesh", async {
        tokio::join!(
            send_bulk(client_tx, TOTAL, 1),
            send_bulk(device_tx, TOTAL, 2),
            receive_bulk(device_rx, TOTAL),
            receive_bulk(client_rx, TOTAL)
        )
    })
    .await;
    assert_eq!((s1, s2), (r1, r2), "SHA-256 of both directions");
}

/// The Alibaba family across nodes: a session and data both ways.
async fn aliyun_pairs_across_nodes(driver: IoDriver) {
    let (_dir, a, b, tun) = fleet(driver).await;
    let style = AliyunStyle::WebSocketProtocol;
    let mut device =
        AliyunPeer::connect(&b.peers, &tun.id, AliyunSide::Device, &tun.device, style).await;
    b.wait_stat("device on b", 1, |s| s.peers[0]).await;
    let mut client =
        AliyunPeer::connect(&a.peers, &tun.id, AliyunSide::Source, &tun.client, style).await;
    let sid = client.open_session(&mut device, "SSH").await;
    for round in 0..64u8 {
        let payload = vec![round; 4000];
        let (sent, got) = tokio::join!(client.data(&sid, &payload), device.recv());
        assert_eq!(got.raw, sent);
        let (sent, got) = tokio::join!(device.data(&sid, &payload), client.recv());
        assert_eq!(got.raw, sent);
    }
    assert_eq!(a.stat(|s| s.mesh_forwards[0]).await, 1);
}

/// Both sides reach the node that does not own the tunnel: both are forwarded and pair.
async fn both_sides_forwarded_pair_on_the_owner(driver: IoDriver) {
    let (_dir, a, b, tun) = fleet(driver).await;
    let (mut device, mut client) = aws_pair(&a, &a, &tun).await;
    exchange(&mut device, &mut client).await;
    assert_eq!(a.stat(|s| s.mesh_forwards[0]).await, 2);
    b.wait_stat("both inbound", 2, |s| s.mesh_connections[1])
        .await;
}

/// Reads what `s` answers until it ends; it must be no application data.
async fn hangs_up_unanswered(mut s: impl AsyncRead + AsyncWrite + Unpin, bytes: &[u8]) {
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut got = Vec::new();
    let _ = within("the mesh port hangs up", s.read_to_end(&mut got)).await;
    assert!(
        got.is_empty(),
        "the mesh answered {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// Sends `bytes` straight to b's mesh port, no TLS: the connection must end with nothing
/// answered but, at most, a TLS alert.
async fn refused_without_tls(b: &Node, bytes: &[u8]) {
    let mut s = tokio::net::TcpStream::connect(b.mesh_addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut got = Vec::new();
    let _ = within("the mesh port hangs up", s.read_to_end(&mut got)).await;
    // A TLS record: content type 21 (alert), version 3.x.
    assert!(
        got.is_empty() || got.starts_with(&[21, 3]),
        "the mesh answered {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// A TLS 1.3 link to b's mesh port with `config` (verifying b as the mesh's server name).
async fn mesh_link(
    b: &Node,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(b.mesh_addr).await.unwrap();
    let name = ServerName::try_from(SERVER_NAME).unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    within("the mesh TLS handshake", connector.connect(name, tcp)).await
}

/// Sends `bytes` over a mesh link made with `config`: refused during the handshake, or the
/// link ends with nothing answered.
async fn refused_over_tls(b: &Node, config: &Arc<rustls::ClientConfig>, bytes: &[u8]) {
    if let Ok(s) = mesh_link(b, config.clone()).await {
        hangs_up_unanswered(s, bytes).await;
    }
}

/// b's mesh-TLS handshake failures.
fn mesh_tls_failures(s: &StatsSnapshot) -> u64 {
    s.handshake_failures.get("mesh_tls").copied().unwrap_or(0)
}

/// Inside the fleet's TLS: wrong key, wrong node, stale clock, bad preambles, garbage, a replay:
/// each closed and counted as `mesh_auth`; b keeps serving.
async fn hostile_mesh_input_is_refused_and_counted(driver: IoDriver) {
    let (dir, a, b, tun) = fleet(driver).await;
    let fleet_tls = mesh_tls(dir.path(), dir.path()).client;
    let peer: SocketAddr = "127.0.0.9:4000".parse().unwrap();
    let request = upgrade_request(Mode::Source.path(), &aws_headers(Aws::V3, &tun.client));
    let now = SystemClock.now_ms();
    let cfg = |node: &str, key| MeshIdentity {
        node_id: node.into(),
        key,
    };
    let with = |preamble: String| [preamble.as_bytes(), &request].concat();
    let nonce = token::random_bytes;
    let mut long_line = vec![b'x'; 600];
    long_line.extend_from_slice(b"\r\n");
    let hostile: Vec<Vec<u8>> = vec![
        with(encode_preamble(&cfg("a", [1; 32]), "b", now, nonce(), peer)),
        with(encode_preamble(&cfg("a", KEY), "c", now, nonce(), peer)),
        with(encode_preamble(
            &cfg("a", KEY),
            "b",
            now - 2 * MAX_SKEW_MS,
            nonce(),
            peer,
        )),
        with(encode_preamble(
            &cfg("a", KEY),
            "b",
            now + 2 * MAX_SKEW_MS,
            nonce(),
            peer,
        )),
        with("IOTUNNEL-MESH/1 a b\r\n".into()),
        request.clone(),
        long_line,
        (0..=255u8).cycle().take(4096).collect(),
    ];
    for bytes in &hostile {
        let s = mesh_link(&b, fleet_tls.clone())
            .await
            .expect("the fleet's certificate is accepted");
        hangs_up_unanswered(s, bytes).await;
    }
    // A valid preamble is answered (here: a 101 for the client), its replay is not.
    let valid = with(encode_preamble(&cfg("a", KEY), "b", now, nonce(), peer));
    let mut s = mesh_link(&b, fleet_tls.clone()).await.unwrap();
    s.write_all(&valid).await.unwrap();
    let mut head = [0u8; 12];
    within("the owner answers", s.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    let replay = mesh_link(&b, fleet_tls.clone()).await.unwrap();
    hangs_up_unanswered(replay, &valid).await;
    b.wait_stat("mesh_auth failures", hostile.len() as u64 + 1, |s| {
        s.handshake_failures.get("mesh_auth").copied().unwrap_or(0)
    })
    .await;
    assert_eq!(b.stat(mesh_tls_failures).await, 0);
    drop(s);
    let (mut device, mut client) = aws_pair(&b, &a, &tun).await;
    exchange(&mut device, &mut client).await;
}

/// Without the fleet's TLS nothing reaches the preamble check: plaintext (the right preamble
/// in clear, garbage), a certificate from another CA with the right key, no certificate at
/// all. Each is closed and counted as `mesh_tls`; b keeps serving.
async fn the_mesh_requires_the_fleet_tls(driver: IoDriver) {
    let (dir, a, b, tun) = fleet(driver).await;
    let peer: SocketAddr = "127.0.0.9:4000".parse().unwrap();
    let request = upgrade_request(Mode::Source.path(), &aws_headers(Aws::V3, &tun.client));
    let identity = MeshIdentity {
        node_id: "a".into(),
        key: KEY,
    };
    let preamble = |now| encode_preamble(&identity, "b", now, token::random_bytes(), peer);
    let signed = |now| [preamble(now).as_bytes(), &request].concat();

    refused_without_tls(&b, &signed(SystemClock.now_ms())).await;
    refused_without_tls(&b, &(0..=255u8).cycle().take(4096).collect::<Vec<_>>()).await;
    refused_without_tls(&b, b"\x16\x03\x01\x00\x05hello").await;

    // Another fleet's CA: its mesh certificate trusts b's CA (so the client side completes)
    // but b does not trust it.
    let other = tempfile::tempdir().unwrap();
    let outsider = mesh_tls(dir.path(), other.path()).client;
    refused_over_tls(&b, &outsider, &signed(SystemClock.now_ms())).await;

    let ca = iotunnel::tls::ensure_material(dir.path(), "localhost").unwrap();
    let anonymous = tls_config(&ca.ca_cert, &[&rustls::version::TLS13]);
    refused_over_tls(&b, &anonymous, &signed(SystemClock.now_ms())).await;

    b.wait_stat("mesh_tls failures", 5, mesh_tls_failures).await;
    assert_eq!(
        b.stat(|s| s.handshake_failures.get("mesh_auth").copied().unwrap_or(0))
            .await,
        0,
        "no preamble was read outside the fleet's TLS"
    );
    assert_eq!(b.stat(|s| s.peers[0] + s.peers[1]).await, 0);
    let (mut device, mut client) = aws_pair(&b, &a, &tun).await;
    exchange(&mut device, &mut client).await;
}

/// A forwarding node verifies the owner: an owner whose mesh certificate is from another CA
/// is never sent the request (503 on the peer), and counts the refused link as `mesh_tls`.
async fn an_owner_outside_the_fleet_ca_is_unreachable(driver: IoDriver) {
    let (_dir, a, _b, _) = fleet(driver).await;
    let other = tempfile::tempdir().unwrap();
    let stranger = Node::start(driver, "c", other.path(), false).await;
    a.routes.set("c", stranger.mesh_addr);
    let tun = Tun::new();
    a.index(&tun, Some("c"));
    stranger.index(&tun, None);
    assert_eq!(refusal_code(&a.peers, &tun, 503).await, "owner_unreachable");
    assert_eq!(a.stat(|s| s.mesh_forwards[1]).await, 1);
    stranger
        .wait_stat("c refused a's certificate", 1, mesh_tls_failures)
        .await;
    assert_eq!(stranger.stat(|s| s.peers[0] + s.peers[1]).await, 0);
}

/// The peer's request, refused: the body's error code.
async fn refusal_code(relay: &Relay, tun: &Tun, status: u16) -> String {
    let headers = aws_headers(Aws::V3, &tun.client);
    let (response, _) = RawConn::upgrade(relay, Mode::Source.path(), &headers).await;
    let body = response.assert_refusal(&[status]);
    body["error"]["code"].as_str().unwrap().to_string()
}

/// An owner with no route, or whose route leads to a closed port: 503 owner_unreachable.
async fn unreachable_owner_answers_503(driver: IoDriver) {
    let (_dir, a, _b, _) = fleet(driver).await;
    let no_route = Tun::new();
    a.index(&no_route, Some("c"));
    assert_eq!(
        refusal_code(&a.peers, &no_route, 503).await,
        "owner_unreachable"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    a.routes.set("d", closed.local_addr().unwrap());
    drop(closed);
    let dead_route = Tun::new();
    a.index(&dead_route, Some("d"));
    assert_eq!(
        refusal_code(&a.peers, &dead_route, 503).await,
        "owner_unreachable"
    );
    assert_eq!(a.stat(|s| s.mesh_forwards[1]).await, 2);
    assert_eq!(a.stat(|s| s.mesh_forwards[0]).await, 0);
    let failures = a
        .stat(|s| {
            s.handshake_failures
                .get("owner_unreachable")
                .copied()
                .unwrap_or(0)
        })
        .await;
    assert_eq!(failures, 2);
}

/// The owner decides: its family lock, its view of a closed tunnel and its refusal of a
/// second hop reach the forwarded peer unchanged.
async fn owner_refusals_reach_the_peer_unchanged(driver: IoDriver) {
    let (_dir, a, b, tun) = fleet(driver).await;
    // The device speaks the Alibaba family on b; an AWS client through a is refused by b (a
    // must not have locked the family itself).
    let _device = AliyunPeer::connect(
        &b.peers,
        &tun.id,
        AliyunSide::Device,
        &tun.device,
        AliyunStyle::WebSocketProtocol,
    )
    .await;
    assert_eq!(refusal_code(&a.peers, &tun, 409).await, "family_mismatch");
    // Closed on b, still open in a's index for a moment.
    let lagging = Tun::new();
    a.index(&lagging, Some("b"));
    b.index(&lagging, None);
    b.index.close(&lagging.id);
    assert_eq!(refusal_code(&a.peers, &lagging, 409).await, "tunnel_closed");
    // a and b each think the other owns it: b refuses the forwarded connection, no loop.
    let confused = Tun::new();
    a.index(&confused, Some("b"));
    b.index(&confused, Some("a"));
    assert_eq!(
        refusal_code(&a.peers, &confused, 503).await,
        "owner_unreachable"
    );
    assert_eq!(a.stat(|s| s.mesh_forwards[0]).await, 3);
}

/// CloseTunnel on the owner ends both sides, the forwarded one included; the gauges drop.
async fn closing_on_the_owner_ends_the_forwarded_peer(driver: IoDriver) {
    let (_dir, a, b, tun) = fleet(driver).await;
    let (mut device, mut client) = aws_pair(&b, &a, &tun).await;
    exchange(&mut device, &mut client).await;
    b.commands
        .send(RelayCommand::CloseTunnel {
            tunnel_id: tun.id.clone(),
            reason: CloseReason::Closed,
        })
        .unwrap();
    let (code, reason) = client.expect_close().await;
    assert_eq!((code, reason.as_str()), (1000, "tunnel closed"));
    assert_eq!(device.expect_close().await.0, 1000);
    a.wait_stat("a's forward ended", 0, |s| s.mesh_connections[0])
        .await;
    b.wait_stat("b's mesh peer gone", 0, |s| s.mesh_connections[1])
        .await;
}

/// A forwarded client that hangs up: the owner sees it leave (the device is told nothing but
/// stays), and both nodes' mesh gauges drop.
async fn a_forwarded_peer_leaving_is_seen_on_the_owner(driver: IoDriver) {
    let (_dir, a, b, tun) = fleet(driver).await;
    let (mut device, mut client) = aws_pair(&b, &a, &tun).await;
    exchange(&mut device, &mut client).await;
    drop(client);
    b.wait_stat("the client left b", 0, |s| s.peers[1]).await;
    a.wait_stat("a's forward ended", 0, |s| s.mesh_connections[0])
        .await;
    b.wait_stat("b's mesh peer gone", 0, |s| s.mesh_connections[1])
        .await;
    // The device stays, and a new forwarded client pairs with it.
    let mut client = AwsPeer::connect(&a.peers, Mode::Source, Aws::V3, &tun.client).await;
    client.send(&stream_start(2, "SSH", 1)).await;
    let mut start = device.next_message().await;
    while start.r#type != MessageType::StreamStart as i32 {
        start = device.next_message().await;
    }
    assert_eq!(start.stream_id, 2);
    assert_eq!(a.stat(|s| s.mesh_forwards[0]).await, 2);
}

/// A tunnel created through another node's API reaches this node's index over the bus a few
/// milliseconds after its 201; a peer that dials faster waits for it instead of getting a 401.
async fn a_tunnel_indexed_a_moment_after_its_peer_dials_is_accepted(driver: IoDriver) {
    let (_dir, a, b, _) = fleet(driver).await;
    let late = Tun::new();
    b.index(&late, None);
    let a_index = a.index.clone();
    let (client_hash, device_hash) = (
        token::hash_secret(&late.client),
        token::hash_secret(&late.device),
    );
    let id = late.id.clone();
    // Node a learns of the tunnel only after its client has dialled.
    let learn = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let expires = SystemClock.now_ms() + 3_600_000;
        a_index.insert(
            &id,
            &["SSH".to_string()],
            expires,
            client_hash,
            device_hash,
            Some("b"),
        );
    });
    let (mut device, mut client) = aws_pair(&b, &a, &late).await;
    exchange(&mut device, &mut client).await;
    learn.await.unwrap();
}
