//! The device agent and the client at scale, end to end against a real in-process server and
//! relay (TLS from the generated CA) on 127.0.0.1:0: 1 GiB each way through the chain at once,
//! hashed on both ends, and 200 concurrent connections over one tunnel.
//!
//! A test binary of its own, so that these heavier tests do not share the CPU (and the time
//! limits) with the tests of `tests/agent.rs`, which run in parallel with each other. The
//! harness below is a trimmed copy of the one there.
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent::{connect, device, echo_server, echo_through, Device};
use common::peers::{within, within_for};
use common::TestServer;
use iotunnel::agent::client::{self, ClientArgs, RunningClient};
use iotunnel::config::Secret;
use reqwest::StatusCode;
use ring::digest::{Context, Digest, SHA256};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// A server whose notifications and client URLs name the relay's real port.
async fn server() -> TestServer {
    TestServer::start_dialable(Arc::new(tempfile::tempdir().unwrap()), None, |_| {}).await
}

/// A tunnel to the device for `services`, and a client listening for each of them.
async fn tunnel_and_client(t: &TestServer, d: &Device, services: &[&str]) -> RunningClient {
    let body =
        json!({ "product_key": d.product_key, "device_name": "dev-1", "services": services });
    let (s, v) = t.post("/v1/tunnels", &d.key, body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let args = ClientArgs {
        url: v["client_url"].as_str().unwrap().to_string(),
        token: Secret(v["client_token"].as_str().unwrap().to_string()),
        listen: services
            .iter()
            .map(|s| format!("{s}=127.0.0.1:0"))
            .collect(),
        stdio: None,
        ca_file: Some(t.dir.path().join("tls/ca.pem")),
    };
    within("the client starts", client::start(args))
        .await
        .expect("the client connects")
}

fn listening(c: &RunningClient, service: &str) -> SocketAddr {
    c.listening
        .iter()
        .find(|(s, _)| s == service)
        .map(|(_, a)| *a)
        .unwrap_or_else(|| panic!("no listener for {service}"))
}

// ---------------------------------------------------------------------------------------------
// 1 GiB through the chain, both ways at once
// ---------------------------------------------------------------------------------------------

/// What the 1 GiB test sends each way.
const TOTAL: u64 = 1 << 30;
/// The write size.
const CHUNK: usize = 1 << 20;
/// Every STAMP bytes the stream carries its own offset, so that a dropped, repeated or
/// reordered piece changes the hash even though the chunks otherwise repeat.
const STAMP: usize = 4096;

/// Writes `total` bytes of a stream seeded by `seed` to `w` and returns their SHA-256: 1 MiB
/// of xorshift noise, repeated, with the offset stamped every [`STAMP`] bytes.
async fn send_stream(w: &mut (impl AsyncWrite + Unpin), total: u64, seed: u64) -> Digest {
    let mut chunk = vec![0u8; CHUNK];
    let mut x = seed | 1;
    for word in chunk.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
    let mut hash = Context::new(&SHA256);
    let mut offset: u64 = 0;
    while offset < total {
        let len = CHUNK.min(usize::try_from(total - offset).unwrap_or(CHUNK));
        for (i, piece) in chunk[..len].chunks_mut(STAMP).enumerate() {
            let at = (offset + (i * STAMP) as u64).to_be_bytes();
            let n = piece.len().min(8);
            piece[..n].copy_from_slice(&at[..n]);
        }
        hash.update(&chunk[..len]);
        w.write_all(&chunk[..len]).await.expect("write the stream");
        offset += len as u64;
    }
    hash.finish()
}

/// Reads exactly `total` bytes from `r` and returns their SHA-256.
async fn recv_stream(r: &mut (impl AsyncRead + Unpin), total: u64) -> Option<Digest> {
    let mut hash = Context::new(&SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = total;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match r.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => {
                hash.update(&buf[..n]);
                left -= n as u64;
            }
        }
    }
    Some(hash.finish())
}

/// The device's service for the 1 GiB test: reads an 8-byte big-endian length L, then at the
/// same time reads L bytes (hashing them) and writes L bytes of its own stream (seed 2,
/// hashing them too), and answers with the SHA-256 of what it read followed by the SHA-256 of
/// what it wrote. It echoes nothing.
async fn hash_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(len) = socket.read_u64().await else {
                    return;
                };
                let (mut r, mut w) = socket.split();
                let (got, sent) =
                    tokio::join!(recv_stream(&mut r, len), send_stream(&mut w, len, 2));
                let Some(got) = got else { return };
                let _ = w.write_all(got.as_ref()).await;
                let _ = w.write_all(sent.as_ref()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_goes_through_the_chain_intact() {
    let t = server().await;
    let d = device(&t, &[("HASH", hash_service().await.to_string())]).await;
    let c = tunnel_and_client(&t, &d, &["HASH"]).await;
    let mut conn = connect(listening(&c, "HASH")).await;

    let started = Instant::now();
    let transfer = async {
        conn.write_u64(TOTAL).await.unwrap();
        let (mut r, mut w) = conn.split();
        let (sent, got) = tokio::join!(send_stream(&mut w, TOTAL, 1), recv_stream(&mut r, TOTAL));
        let got = got.expect("the device's 1 GiB arrives");
        let mut theirs = [0u8; 64];
        r.read_exact(&mut theirs)
            .await
            .expect("the device answers with its hashes");
        (sent, got, theirs)
    };
    let (sent, got, theirs) = within_for(
        Duration::from_secs(180),
        "1 GiB each way through the tunnel",
        transfer,
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(
        hex::encode(&theirs[..32]),
        hex::encode(sent.as_ref()),
        "the device received other bytes than the client's app sent"
    );
    assert_eq!(
        hex::encode(&theirs[32..]),
        hex::encode(got.as_ref()),
        "the client's app received other bytes than the device sent"
    );
    eprintln!(
        "1 GiB each way at once through client -> relay (TLS) -> agent in {:.1} s \
         ({:.0} MiB/s each way)",
        elapsed.as_secs_f64(),
        1024.0 / elapsed.as_secs_f64()
    );
    assert!(!d.agent.is_finished(), "the agent keeps running");
}

// ---------------------------------------------------------------------------------------------
// 200 concurrent connections over one tunnel
// ---------------------------------------------------------------------------------------------

/// Raises the soft open-file limit (each connection costs about 4 descriptors in this one
/// process: test side, client, agent, echo server).
fn enough_files(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_share_one_tunnel() {
    const CONNS: usize = 200;
    enough_files(4096);
    let t = server().await;
    let d = device(&t, &[("SSH", echo_server().await.to_string())]).await;
    let c = tunnel_and_client(&t, &d, &["SSH"]).await;
    let addr = listening(&c, "SSH");

    // All 200 open at once, before any bytes move.
    let mut conns = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        conns.push(connect(addr).await);
    }
    // Each sends and gets back its own bytes (8-40 KiB), all at the same time.
    let transfers = conns
        .iter_mut()
        .enumerate()
        .map(|(i, conn)| echo_through(conn, 8 * 1024 + i * 167, i as u8));
    within_for(
        Duration::from_secs(120),
        "200 concurrent echoes",
        futures_util::future::join_all(transfers),
    )
    .await;
    // All still open and still independent: a second round, in the other order.
    let transfers = conns
        .iter_mut()
        .enumerate()
        .rev()
        .map(|(i, conn)| echo_through(conn, 1000 + i, 100u8.wrapping_add(i as u8)));
    within_for(
        Duration::from_secs(120),
        "a second round on the same 200 connections",
        futures_util::future::join_all(transfers),
    )
    .await;

    // Half of them end; the others and new ones keep working.
    conns.truncate(CONNS / 2);
    let mut fresh = Vec::new();
    for _ in 0..CONNS / 2 {
        fresh.push(connect(addr).await);
    }
    let transfers = conns
        .iter_mut()
        .chain(fresh.iter_mut())
        .enumerate()
        .map(|(i, conn)| echo_through(conn, 4096 + i, i as u8));
    within_for(
        Duration::from_secs(120),
        "old and new connections together",
        futures_util::future::join_all(transfers),
    )
    .await;
    assert!(!d.agent.is_finished(), "the agent keeps running");
}
