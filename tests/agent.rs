//! The device agent and the client end to end, against a real in-process server and relay on
//! 127.0.0.1:0 with TLS from the generated CA: real TCP services behind the agent, many
//! connections over one tunnel, refused local services, tunnel close, refused tokens, stdio
//! mode, and stock OpenSSH through a tunnel.
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::agent::{connect, device, echo_server, echo_through, pattern, Device};
use common::peers::{within, within_for};
use common::TestServer;
use iotunnel::agent::client::{self, ClientArgs, RunningClient};
use iotunnel::agent::device::{self};
use iotunnel::config::{Secret, Settings};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const BIN: &str = env!("CARGO_BIN_EXE_iotunnel");

/// A server whose notifications and client URLs name the relay's real port.
async fn server() -> TestServer {
    server_at(None, |_| {}).await
}

/// A server whose notifications and client URLs name `public_port` (default: the relay's),
/// after `tweak` adjusts its settings.
async fn server_at(public_port: Option<u16>, tweak: impl FnOnce(&mut Settings)) -> TestServer {
    TestServer::start_dialable(Arc::new(tempfile::tempdir().unwrap()), public_port, tweak).await
}

fn ca(t: &TestServer) -> PathBuf {
    t.dir.path().join("tls/ca.pem")
}

/// A tunnel created through the API: (id, client_url, client_token).
async fn tunnel(t: &TestServer, d: &Device, services: &[&str]) -> (String, String, String) {
    let body =
        json!({ "product_key": d.product_key, "device_name": "dev-1", "services": services });
    let (s, v) = t.post("/v1/tunnels", &d.key, body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let field = |k: &str| v[k].as_str().unwrap().to_string();
    (
        field("tunnel_id"),
        field("client_url"),
        field("client_token"),
    )
}

async fn describe(t: &TestServer, d: &Device, id: &str) -> Value {
    let (s, v) = t.get(&format!("/v1/tunnels/{id}"), &d.key).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

/// Waits until describe shows `side` in `state`.
async fn wait_side(t: &TestServer, d: &Device, id: &str, side: &str, state: &str) {
    let mut last = Value::Null;
    for _ in 0..1000 {
        last = describe(t, d, id).await;
        if last[side]["state"] == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{side} never became {state}: {last}");
}

/// An address where nothing listens.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

async fn start_client(t: &TestServer, url: &str, token: &str, listen: &[&str]) -> RunningClient {
    let args = ClientArgs {
        url: url.to_string(),
        token: Secret(token.to_string()),
        listen: listen.iter().map(|s| s.to_string()).collect(),
        stdio: None,
        ca_file: Some(ca(t)),
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

/// The binary's `client` subcommand with the tunnel's URL and the CA.
fn client_command(t: &TestServer, url: &str, token: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("client")
        .arg("--url")
        .arg(url)
        .arg("--ca-file")
        .arg(ca(t))
        .env("IOTUNNEL_TOKEN", token)
        .env_remove("IOTUNNEL_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn finished(what: &str, child: tokio::process::Child) -> Output {
    within_for(Duration::from_secs(20), what, child.wait_with_output())
        .await
        .expect("wait for the client")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_share_one_tunnel_and_tunnels_run_side_by_side() {
    let t = server().await;
    let echo = echo_server().await;
    let d = device(&t, &[("SSH", echo.to_string())]).await;
    let (id, url, token) = tunnel(&t, &d, &["SSH"]).await;
    let c = start_client(&t, &url, &token, &["SSH=127.0.0.1:0"]).await;
    let addr = listening(&c, "SSH");

    // 16 connections at once, each with its own bytes, all open together.
    let mut conns = Vec::new();
    for _ in 0..16 {
        conns.push(connect(addr).await);
    }
    let transfers = conns.iter_mut().enumerate().map(|(i, conn)| {
        let len = if i == 0 { 1 } else { 100_000 + i * 7_919 };
        echo_through(conn, len, i as u8)
    });
    futures_util::future::join_all(transfers).await;
    // Still open, still independent.
    for (i, conn) in conns.iter_mut().enumerate().rev() {
        echo_through(conn, 10, 100 + i as u8).await;
    }
    wait_side(&t, &d, &id, "device", "CONNECTED").await;
    wait_side(&t, &d, &id, "client", "CONNECTED").await;
    drop(conns);

    // After every connection ended, the next one starts a new stream.
    for round in 0..3 {
        let mut conn = connect(addr).await;
        echo_through(&mut conn, 70_000, 200 + round).await;
    }

    // A second tunnel to the same device, used at the same time as the first.
    let (_, url2, token2) = tunnel(&t, &d, &["SSH"]).await;
    let c2 = start_client(&t, &url2, &token2, &["127.0.0.1:0"]).await;
    let mut a = connect(addr).await;
    let mut b = connect(listening(&c2, "SSH")).await;
    tokio::join!(
        echo_through(&mut a, 300_000, 1),
        echo_through(&mut b, 300_000, 2)
    );
    assert!(!d.agent.is_finished(), "the agent keeps running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_local_connection_resets_only_that_connection() {
    let t = server().await;
    let echo = echo_server().await;
    let dead = closed_port().await;
    let d = device(&t, &[("SSH", echo.to_string()), ("DEAD", dead.to_string())]).await;
    let (_, url, token) = tunnel(&t, &d, &["SSH", "DEAD"]).await;
    let c = start_client(&t, &url, &token, &["SSH=127.0.0.1:0", "DEAD=127.0.0.1:0"]).await;
    let ssh = listening(&c, "SSH");

    let mut long_lived = connect(ssh).await;
    echo_through(&mut long_lived, 1000, 1).await;
    for _ in 0..2 {
        // The device cannot reach DEAD's address: the client closes this connection...
        let mut refused = connect(listening(&c, "DEAD")).await;
        let _ = refused.write_all(b"anyone there?").await;
        let mut buf = [0u8; 16];
        let n = within("the refused connection is reset", refused.read(&mut buf)).await;
        assert!(
            matches!(n, Ok(0) | Err(_)),
            "got data from a dead service: {n:?}"
        );
        // ...and the tunnel carries the other connections as before.
        echo_through(&mut long_lived, 50_000, 2).await;
        let mut fresh = connect(ssh).await;
        echo_through(&mut fresh, 50_000, 3).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_tunnel_ends_the_client_and_the_agent_stays_up() {
    let t = server().await;
    let echo = echo_server().await;
    let d = device(&t, &[("SSH", echo.to_string())]).await;
    let (id, url, token) = tunnel(&t, &d, &["SSH"]).await;
    let mut cmd = client_command(&t, &url, &token);
    cmd.args(["--listen", "127.0.0.1:0"]);
    let child = cmd.spawn().unwrap();
    wait_side(&t, &d, &id, "client", "CONNECTED").await;
    wait_side(&t, &d, &id, "device", "CONNECTED").await;

    let (s, v) = t
        .post(&format!("/v1/tunnels/{id}/close"), &d.key, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let out = finished("the client exits when its tunnel closes", child).await;
    assert!(!out.status.success(), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("tunnel is closed"), "stderr: {err}");
    assert!(
        !err.contains(&token),
        "the token must never be printed: {err}"
    );
    wait_side(&t, &d, &id, "device", "DISCONNECTED").await;

    // The agent stays up for the device's other tunnels.
    assert!(!d.agent.is_finished());
    let (_, url2, token2) = tunnel(&t, &d, &["SSH"]).await;
    let c2 = start_client(&t, &url2, &token2, &["127.0.0.1:0"]).await;
    let mut conn = connect(listening(&c2, "SSH")).await;
    echo_through(&mut conn, 10_000, 9).await;

    // A client started for the closed tunnel fails at once, saying so.
    let out = finished(
        "a client of a closed tunnel exits",
        client_command(&t, &url, &token)
            .args(["--listen", "127.0.0.1:0"])
            .spawn()
            .unwrap(),
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("tunnel is closed"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_fails_at_start_with_one_line() {
    let t = server().await;
    let d = device(&t, &[("SSH", echo_server().await.to_string())]).await;
    let (_, url, _) = tunnel(&t, &d, &["SSH"]).await;
    let out = finished(
        "a client with a wrong token exits",
        client_command(&t, &url, "not-the-token")
            .args(["--listen", "127.0.0.1:0"])
            .spawn()
            .unwrap(),
    )
    .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("refused the client token"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_mode_carries_one_connection() {
    let t = server().await;
    let d = device(&t, &[("SSH", echo_server().await.to_string())]).await;
    let (_, url, token) = tunnel(&t, &d, &["SSH"]).await;
    let mut child = client_command(&t, &url, &token)
        .args(["--stdio", "SSH"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let data = pattern(200_000, 7);
    let send = async {
        stdin.write_all(&data).await.unwrap();
        stdin
    };
    let recv = async {
        let mut got = vec![0u8; data.len()];
        stdout.read_exact(&mut got).await.unwrap();
        got
    };
    let (stdin, got) = within("bytes through stdio", async { tokio::join!(send, recv) }).await;
    assert!(got == data, "stdio echo differs");
    // ssh closes its end: the client resets the connection and exits cleanly.
    drop(stdin);
    let out = finished("the stdio client exits at EOF", child).await;
    assert!(out.status.success(), "stderr: {}", stderr(&out));
}

/// Creates a tunnel for `services`, retrying while the agent's report of its services may
/// still be on its way; returns the first answer that is not a 201 (closing the 201s).
async fn create_until_refused(t: &TestServer, d: &Device, services: &[&str]) -> Value {
    for _ in 0..500 {
        let body =
            json!({ "product_key": d.product_key, "device_name": "dev-1", "services": services });
        let (s, v) = t.post("/v1/tunnels", &d.key, body).await;
        if s != StatusCode::CREATED {
            assert_eq!(s, StatusCode::CONFLICT, "{v}");
            return v;
        }
        let id = v["tunnel_id"].as_str().unwrap();
        t.post(&format!("/v1/tunnels/{id}/close"), &d.key, json!({}))
            .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server never refused services {services:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reports_its_services_and_a_refused_stream_says_why() {
    let t = server().await;
    let echo = echo_server().await;
    let dead = closed_port().await;
    let d = device(
        &t,
        &[("HTTP", echo.to_string()), ("DEAD", dead.to_string())],
    )
    .await;
    let v = create_until_refused(&t, &d, &["SSH"]).await;
    assert_eq!(v["error"]["code"], "unknown_service", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("DEAD, HTTP"), "{msg}");

    // A service the agent maps to an address where nothing listens: the device refuses the
    // connection and says why; the stdio client prints it and fails.
    let (_, url, token) = tunnel(&t, &d, &["DEAD"]).await;
    // stdin stays open, as ssh keeps it: the refusal, not an EOF, ends the client.
    let mut child = client_command(&t, &url, &token)
        .args(["--stdio", "DEAD"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let _stdin = child.stdin.take();
    let out = finished("a refused stdio client exits", child).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("the device refused the connection to DEAD")
            && err.contains(&format!("cannot connect to DEAD at {dead}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_for_a_service_the_agent_does_not_map_fails_its_client_with_why() {
    let t = server().await;
    // The tunnel is created while the device's services are unknown (its channel did not
    // report them, as an older agent would not), then an agent that maps only HTTP serves it.
    let key = t.account("acme").await;
    let pk = t.product(&key).await;
    let secret = t.device(&key, &pk, "dev-1").await;
    let old = common::DeviceChannel::connect(&t, &pk, "dev-1", &secret)
        .await
        .unwrap();
    let body = json!({ "product_key": pk, "device_name": "dev-1", "services": ["SSH"] });
    let (s, v) = t.post("/v1/tunnels", &key, body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (url, token) = (
        v["client_url"].as_str().unwrap().to_string(),
        v["client_token"].as_str().unwrap().to_string(),
    );
    old.close().await;
    let mut options = device::AgentOptions::from(device::AgentArgs {
        api_url: t.base.clone(),
        product_key: Some(pk.clone()),
        device_name: Some("dev-1".into()),
        device_secret: Some(Secret(secret)),
    });
    options.relay.services = vec![("HTTP".into(), echo_server().await.to_string())];
    options.relay.ca_file = Some(ca(&t));
    let agent = tokio::spawn(device::run(options));

    // stdin stays open, as ssh keeps it: the refusal, not an EOF, ends the client.
    let mut child = client_command(&t, &url, &token)
        .args(["--stdio", "SSH"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let _stdin = child.stdin.take();
    let out = finished("the client of an unmapped service exits", child).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("the device refused the connection to SSH")
            && err.contains("no service \"SSH\" (it maps HTTP")
            && err.contains("--service SSH=HOST:PORT"),
        "{err}"
    );
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_file_the_client_says_which_one_to_pass() {
    let t = server().await;
    let d = device(&t, &[("SSH", echo_server().await.to_string())]).await;
    let (_, url, token) = tunnel(&t, &d, &["SSH"]).await;
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["client", "--url", &url, "--listen", "127.0.0.1:0"])
        .env("IOTUNNEL_TOKEN", &token)
        .env_remove("IOTUNNEL_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = finished(
        "a client that does not trust the relay exits",
        cmd.spawn().unwrap(),
    )
    .await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("UnknownIssuer")
            && err.contains("--ca-file")
            && err.contains("./iotunnel-data/tls/ca.pem"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_both_sides_disconnected_after_a_close() {
    let t = server().await;
    let echo = echo_server().await;
    let d = device(&t, &[("SSH", echo.to_string())]).await;
    let (id, url, token) = tunnel(&t, &d, &["SSH"]).await;
    let c = start_client(&t, &url, &token, &["127.0.0.1:0"]).await;
    let mut conn = connect(listening(&c, "SSH")).await;
    echo_through(&mut conn, 1000, 4).await;
    wait_side(&t, &d, &id, "client", "CONNECTED").await;
    wait_side(&t, &d, &id, "device", "CONNECTED").await;
    // `--api` without a scheme: http:// is meant.
    let api = t.base.trim_start_matches("http://");
    let out = tokio::process::Command::new(BIN)
        .args([
            "tunnel",
            "close",
            &id,
            "--api",
            api,
            "--api-key",
            &d.key,
            "--json",
        ])
        .env_remove("IOTUNNEL_API")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            v["state"].as_str(),
            v["device"]["state"].as_str(),
            v["client"]["state"].as_str()
        ),
        (Some("CLOSED"), Some("DISCONNECTED"), Some("DISCONNECTED")),
        "{v}"
    );
}

/// A TCP proxy in front of the relay whose connections the test can cut at once.
struct CutProxy {
    pipes: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl CutProxy {
    fn spawn(listener: TcpListener, target: SocketAddr) -> Self {
        let pipes: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let shared = pipes.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let pipe = tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                shared.lock().unwrap().push(pipe);
            }
        });
        Self { pipes, accept }
    }

    /// Drops every connection through the proxy, as a network failure would.
    fn cut(&self) {
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_reconnect_after_the_network_drops() {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let t = server_at(Some(front.local_addr().unwrap().port()), |_| {}).await;
    let proxy = CutProxy::spawn(front, t.server().relay_addr);
    let echo = echo_server().await;
    let d = device(&t, &[("SSH", echo.to_string())]).await;
    let (id, url, token) = tunnel(&t, &d, &["SSH"]).await;
    let c = start_client(&t, &url, &token, &["127.0.0.1:0"]).await;
    let addr = listening(&c, "SSH");
    let mut before = connect(addr).await;
    echo_through(&mut before, 20_000, 1).await;
    wait_side(&t, &d, &id, "device", "CONNECTED").await;

    for round in 0..2u8 {
        let old = describe(&t, &d, &id).await;
        proxy.cut();
        // The connection open at the drop is reset...
        let mut buf = [0u8; 16];
        let n = within("the open connection is reset", before.read(&mut buf)).await;
        assert!(matches!(n, Ok(0) | Err(_)), "round {round}: {n:?}");
        // ...and both sides come back with the same tokens (new connections, so new proxy
        // addresses): new connections work. One opened before the relay has seen the device
        // come back may be reset, as a stream the old device connection took with it.
        for side in ["device", "client"] {
            let mut last = Value::Null;
            for _ in 0..1000 {
                last = describe(&t, &d, &id).await;
                if last[side]["state"] == "CONNECTED"
                    && last[side]["address"] != old[side]["address"]
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_ne!(
                last[side]["address"], old[side]["address"],
                "round {round}: {side} never reconnected: {last}"
            );
        }
        before = connect(addr).await;
        echo_through(&mut before, 20_000, 2 + round).await;
    }
    assert!(!d.agent.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_transfer_resets_connections_and_serves_again_when_back() {
    let t = server().await;
    let mut d = device(&t, &[("SSH", echo_server().await.to_string())]).await;
    let (id, url, token) = tunnel(&t, &d, &["SSH"]).await;
    let c = start_client(&t, &url, &token, &["127.0.0.1:0"]).await;
    let addr = listening(&c, "SSH");
    let mut conn = connect(addr).await;
    echo_through(&mut conn, 10_000, 1).await;

    // Kill the agent while bytes are flowing.
    let (mut r, mut w) = conn.into_split();
    let writer = tokio::spawn(async move {
        let chunk = pattern(64 * 1024, 3);
        while w.write_all(&chunk).await.is_ok() {}
    });
    let mut buf = vec![0u8; 64 * 1024];
    within("echo flows", r.read_exact(&mut buf)).await.unwrap();
    d.agent.abort();
    let ended = within("the client's connection is reset", async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    ended.await;
    writer.abort();
    wait_side(&t, &d, &id, "device", "DISCONNECTED").await;

    // The agent comes back: the channel replays the OPEN tunnel and it dials the relay again.
    d.agent = tokio::spawn(device::run(d.options.clone()));
    wait_side(&t, &d, &id, "device", "CONNECTED").await;
    let mut conn = connect(addr).await;
    echo_through(&mut conn, 100_000, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_answer_the_relay_pings_and_stay_up() {
    let t = server_at(None, |s| s.peer_ping_interval_ms = 20).await;
    let d = device(&t, &[("SSH", echo_server().await.to_string())]).await;
    let (_, url, token) = tunnel(&t, &d, &["SSH"]).await;
    let c = start_client(&t, &url, &token, &["127.0.0.1:0"]).await;
    let mut conn = connect(listening(&c, "SSH")).await;
    echo_through(&mut conn, 1000, 1).await;
    // Far more than the missed pings the relay tolerates (3 x 20 ms): the idle time is what
    // is under test here, not a synchronisation.
    tokio::time::sleep(Duration::from_millis(500)).await;
    echo_through(&mut conn, 1000, 2).await;
}

// ---------------------------------------------------------------------------------------------
// An HTTP server behind the agent, alone and next to a second service
// ---------------------------------------------------------------------------------------------

/// A small HTTP server (axum) on 127.0.0.1:0: `GET /hello`, `POST /sha256` (answers
/// "LEN HEX" of the body) and `GET /bytes/{n}` (`pattern(n, 5)`).
async fn http_server() -> SocketAddr {
    use axum::extract::Path as UrlPath;
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route("/hello", get(|| async { "hello from the device" }))
        .route(
            "/sha256",
            post(|body: axum::body::Bytes| async move {
                format!("{} {}", body.len(), hex::encode(Sha256::digest(&body)))
            }),
        )
        .route(
            "/bytes/{n}",
            get(|UrlPath(n): UrlPath<usize>| async move { pattern(n, 5) }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A reqwest client for the client's local listener (never through a proxy from the environment).
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// GET /hello, a POST of `len` bytes and a GET of `len` bytes through `addr`, all checked.
async fn http_round(http: &reqwest::Client, addr: SocketAddr, len: usize, seed: u8) {
    let base = format!("http://{addr}");
    let hello = http.get(format!("{base}/hello")).send().await.unwrap();
    assert_eq!(hello.status(), StatusCode::OK);
    assert_eq!(hello.text().await.unwrap(), "hello from the device");

    let body = pattern(len, seed);
    let want = format!("{len} {}", hex::encode(Sha256::digest(&body)));
    let posted = http
        .post(format!("{base}/sha256"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), StatusCode::OK);
    assert_eq!(
        posted.text().await.unwrap(),
        want,
        "the server got other bytes"
    );

    let got = http
        .get(format!("{base}/bytes/{len}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert!(
        got.bytes().await.unwrap() == pattern(len, 5),
        "GET /bytes/{len} differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_server_behind_the_agent_answers_get_and_post() {
    let t = server().await;
    let d = device(&t, &[("HTTP", http_server().await.to_string())]).await;
    let (_, url, token) = tunnel(&t, &d, &["HTTP"]).await;
    let c = start_client(&t, &url, &token, &["HTTP=127.0.0.1:0"]).await;
    let addr = listening(&c, "HTTP");

    // One keep-alive connection, several requests on it.
    let http = http_client();
    within_for(Duration::from_secs(60), "HTTP through the tunnel", async {
        http_round(&http, addr, 1, 1).await;
        http_round(&http, addr, 1_500_000, 2).await;
    })
    .await;

    // Requests in parallel: the pool opens more connections on the same tunnel.
    let rounds = (0..8u8).map(|i| http_round(&http, addr, 100_000 + usize::from(i) * 4099, i));
    within_for(
        Duration::from_secs(60),
        "parallel HTTP requests",
        futures_util::future::join_all(rounds),
    )
    .await;

    // A fresh client (fresh connections) still gets through.
    within("one more request", http_round(&http_client(), addr, 10, 9)).await;
    assert!(!d.agent.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_on_one_tunnel_work_at_the_same_time() {
    let t = server().await;
    let echo = echo_server().await;
    let web = http_server().await;
    let d = device(&t, &[("SSH", echo.to_string()), ("HTTP", web.to_string())]).await;
    let (id, url, token) = tunnel(&t, &d, &["SSH", "HTTP"]).await;
    let c = start_client(&t, &url, &token, &["SSH=127.0.0.1:0", "HTTP=127.0.0.1:0"]).await;
    let (ssh, web) = (listening(&c, "SSH"), listening(&c, "HTTP"));

    // A long-lived SSH connection is open throughout.
    let mut long_lived = connect(ssh).await;
    echo_through(&mut long_lived, 1000, 1).await;

    // Both services' bytes interleave on the one relay connection.
    let http = http_client();
    let mut echoes = Vec::new();
    for _ in 0..4 {
        echoes.push(connect(ssh).await);
    }
    let echo_side = futures_util::future::join_all(
        echoes
            .iter_mut()
            .enumerate()
            .map(|(i, conn)| echo_through(conn, 400_000 + i * 1_009, 10 + i as u8)),
    );
    let http_side = futures_util::future::join_all(
        (0..6u8).map(|i| http_round(&http, web, 200_000 + usize::from(i) * 3_001, 20 + i)),
    );
    within_for(Duration::from_secs(60), "SSH and HTTP together", async {
        tokio::join!(
            echo_side,
            http_side,
            echo_through(&mut long_lived, 300_000, 2)
        )
    })
    .await;

    // Ending all of one service's connections leaves the other service's stream alone.
    drop(echoes);
    drop(long_lived);
    within("HTTP after SSH ended", http_round(&http, web, 50_000, 30)).await;
    let mut again = connect(ssh).await;
    echo_through(&mut again, 50_000, 31).await;
    wait_side(&t, &d, &id, "device", "CONNECTED").await;
    assert!(!d.agent.is_finished());
}

/// A connection whose local reader stops reading does not stall the tunnel's other connections:
/// 7 MiB for it wait in the client (more than its socket buffers and the relay connection's
/// together) while another connection echoes, and then all of it arrives intact.
#[tokio::test]
async fn a_connection_that_does_not_read_does_not_stall_the_others() {
    const FLOOD: usize = 7 << 20;
    let t = server().await;
    let echo = echo_server().await;
    // Writes FLOOD bytes of pattern(FLOOD, 9) to every connection, then closes it.
    let flood = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flood_addr = flood.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = flood.accept().await {
            tokio::spawn(async move {
                let _ = conn.write_all(&pattern(FLOOD, 9)).await;
            });
        }
    });
    let d = device(
        &t,
        &[
            ("ECHO", echo.to_string()),
            ("FLOOD", flood_addr.to_string()),
        ],
    )
    .await;
    let (_, url, token) = tunnel(&t, &d, &["ECHO", "FLOOD"]).await;
    let c = start_client(&t, &url, &token, &["ECHO=127.0.0.1:0", "FLOOD=127.0.0.1:0"]).await;

    let mut stalled = connect(listening(&c, "FLOOD")).await;
    // Let the flood fill every buffer on the way to the connection that does not read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = connect(listening(&c, "ECHO")).await;
    echo_through(&mut conn, 100_000, 3).await;

    let mut got = Vec::with_capacity(FLOOD);
    within("the flood after the echo", stalled.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(
        got == pattern(FLOOD, 9),
        "the flood arrived changed or cut ({} bytes)",
        got.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Stock OpenSSH through a tunnel
// ---------------------------------------------------------------------------------------------

const SSHD: &str = "/usr/sbin/sshd";

fn run_tool(cmd: &mut std::process::Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An sshd on a loopback port with a throwaway host key, accepting `user_key.pub`.
struct Sshd {
    child: tokio::process::Child,
    port: u16,
}

impl Sshd {
    async fn start(dir: &Path, user: &str) -> Self {
        assert!(
            Path::new(SSHD).exists() && which("ssh").is_some() && which("ssh-keygen").is_some(),
            "OpenSSH is missing: this test needs {SSHD}, ssh and ssh-keygen \
             (apt-get install -y openssh-server openssh-client)"
        );
        for (key, comment) in [("host_key", "host"), ("user_key", "user")] {
            run_tool(
                std::process::Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
                    .arg(dir.join(key)),
            );
        }
        std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
        let sftp = ["/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("internal-sftp");
        let config = format!(
            "ListenAddress 127.0.0.1\n\
             HostKey {dir}/host_key\n\
             PidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             AllowUsers {user}\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             Subsystem sftp {sftp}\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        // Privilege separation needs this directory when sshd runs as root.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = closed_port().await.port();
        let child = tokio::process::Command::new(SSHD)
            .args(["-D", "-e", "-p", &port.to_string(), "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("sshd starts");
        let mut sshd = Self { child, port };
        for _ in 0..500 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return sshd;
            }
            if let Ok(Some(status)) = sshd.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = sshd.child.stderr.take() {
                    let _ = e.read_to_string(&mut err).await;
                }
                panic!("sshd exited with {status}: {err}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("sshd never listened on port {port}");
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.exists())
    })
}

fn current_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_openssh_runs_a_command_and_copies_a_file_through_a_tunnel() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let user = current_user();
    let mut sshd = Sshd::start(dir, &user).await;
    let t = server().await;
    let d = device(&t, &[("SSH", format!("127.0.0.1:{}", sshd.port))]).await;
    let (_, url, token) = tunnel(&t, &d, &["SSH"]).await;

    let proxy = format!(
        "{BIN} client --stdio SSH --url {url} --token {token} --ca-file {}",
        ca(&t).display()
    );
    let ssh_options = |cmd: &mut tokio::process::Command| {
        cmd.args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "LogLevel=ERROR", "-i"])
        .arg(dir.join("user_key"))
        .arg("-o")
        .arg(format!("ProxyCommand={proxy}"))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    };

    let mut ssh = tokio::process::Command::new("ssh");
    ssh_options(&mut ssh);
    ssh.arg(format!("{user}@device"))
        .args(["echo", "tunnel-ok"]);
    let out = within_for(
        Duration::from_secs(60),
        "ssh through the tunnel",
        ssh.output(),
    )
    .await
    .unwrap();
    if String::from_utf8_lossy(&out.stdout) != "tunnel-ok\n" {
        let _ = sshd.child.start_kill();
        let mut log = String::new();
        if let Some(mut e) = sshd.child.stderr.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), e.read_to_string(&mut log)).await;
        }
        panic!(
            "ssh said {:?}, stderr {:?}; sshd log:\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // scp copies 64 MiB intact.
    let mut file = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in file.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let src = dir.join("payload.bin");
    let dst = dir.join("copied.bin");
    std::fs::write(&src, &file).unwrap();
    let mut scp = tokio::process::Command::new("scp");
    ssh_options(&mut scp);
    scp.arg(&src)
        .arg(format!("{user}@device:{}", dst.display()));
    let out = within_for(
        Duration::from_secs(120),
        "scp 64 MiB through the tunnel",
        scp.output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "scp failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied = std::fs::read(&dst).unwrap();
    assert_eq!(copied.len(), file.len());
    assert_eq!(
        Sha256::digest(&copied),
        Sha256::digest(&file),
        "scp copy differs"
    );
}
