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

use common::agent::{
    connect, device, echo_server, echo_through, hash_service, hash_through, Device,
};
use common::peers::{within, within_for};
use common::TestServer;
use iotunnel::agent::client::{self, ClientArgs, RunningClient};
use iotunnel::config::Secret;
use reqwest::StatusCode;
use serde_json::json;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_goes_through_the_chain_intact() {
    let t = server().await;
    let d = device(&t, &[("HASH", hash_service().await.to_string())]).await;
    let c = tunnel_and_client(&t, &d, &["HASH"]).await;
    let mut conn = connect(listening(&c, "HASH")).await;

    let started = Instant::now();
    within_for(
        Duration::from_secs(180),
        "1 GiB each way through the tunnel",
        hash_through(&mut conn, TOTAL),
    )
    .await;
    let elapsed = started.elapsed();
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
