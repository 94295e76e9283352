//! The real `iotunnel` binary as a process: first start and restart, the admin key, TLS material,
//! startup failures, SIGTERM, crash safety under `kill -9`, secrets kept out of the logs, and the
//! CLI commands against a live server.
//!
//! Every server listens on 127.0.0.1:0 in its own temp dir; its stdout is read to learn the API
//! address (tests/common/process.rs). Waiting is bounded polling or awaiting an event, never a
//! sleep used as synchronisation. A `Proc` kills its child when dropped, so a failing test
//! leaves no server.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::process::{
    bin, call, cli, cli_json, create_tunnel, device_account, wait_online, DeviceAccount, ServerCmd,
    DEADLINE,
};
use common::sign;
use futures_util::StreamExt;
use iotunnel::clock::{Clock, SystemClock};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// An admin key chosen through `IOTUNNEL_ADMIN_KEY` (at least 16 characters).
const ADMIN_KEY: &str = "itk_process-test-admin-key-0123456789";

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn now_secs() -> i64 {
    SystemClock.now_ms() / 1000
}

/// Opens a device channel with the given timestamp and signature; Err is the HTTP status.
async fn connect_raw(base: &str, pk: &str, dn: &str, ts: &str, sig: &str) -> Result<Ws, u16> {
    let url = format!("{}/v1/device/connect", base.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    let h = req.headers_mut();
    h.insert("x-iotunnel-product-key", pk.parse().unwrap());
    h.insert("x-iotunnel-device-name", dn.parse().unwrap());
    h.insert("x-iotunnel-timestamp", ts.parse().unwrap());
    h.insert("x-iotunnel-signature", sig.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected device channel error: {e}"),
    }
}

/// Opens a correctly signed device channel; also returns the signature it used.
async fn connect_device(base: &str, f: &DeviceAccount) -> (Ws, String) {
    let ts = now_secs();
    let sig = sign(&f.secret, &f.product_key, &f.device, ts);
    let ws = connect_raw(base, &f.product_key, &f.device, &ts.to_string(), &sig)
        .await
        .expect("a signed device channel opens");
    (ws, sig)
}

/// The next JSON notification on a device channel (bounded wait).
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a notification within the deadline")
            .expect("channel open")
            .expect("no channel error");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Close(c) => panic!("channel closed: {c:?}"),
            _ => continue,
        }
    }
}

/// Waits (bounded) until the channel ends; returns the close code, if a close frame came.
async fn closed_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("channel ends within the deadline")
        {
            Some(Ok(Message::Close(c))) => return c.map(|c| c.code.into()),
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
}

fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    (tmp, data)
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn first_start_creates_the_data_dir_and_prints_the_admin_key_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("not").join("yet");
    assert!(!data.exists());
    let cmd = ServerCmd::new(&data);
    let mut p = cmd.start().await;

    let key = p
        .admin_key
        .clone()
        .expect("the first start prints an admin key");
    assert!(key.starts_with("itk_") && key.len() >= 32, "{key}");
    for f in [
        "iotunnel.db",
        "tls/ca.pem",
        "tls/server.pem",
        "tls/server.key",
    ] {
        assert!(data.join(f).is_file(), "{f} missing");
    }
    // The database (and its WAL) holds device secrets: owner-only.
    for f in [
        "iotunnel.db",
        "iotunnel.db-wal",
        "iotunnel.db-shm",
        "token.key",
    ] {
        let path = data.join(f);
        if path.exists() || f == "iotunnel.db" {
            assert_eq!(mode(&path), 0o600, "{f} is owner-only");
        }
    }
    assert_eq!(
        p.stdout().matches(&key).count(),
        1,
        "the key is printed exactly once"
    );
    assert!(!p.stderr().contains(&key), "the key is not logged");
    let (s, v) = p.call(Method::GET, "/v1/products", &key, None).await;
    assert_eq!((s, &v), (StatusCode::OK, &json!({"products": []})));
    p.stop().await;

    let mut again = cmd.start().await;
    assert_eq!(again.admin_key, None);
    assert!(
        !again.output().contains("Admin API key"),
        "{}",
        again.output()
    );
    assert!(!again.output().contains(&key));
    let (s, v) = again.call(Method::GET, "/v1/products", &key, None).await;
    assert_eq!(s, StatusCode::OK, "the first key survives a restart: {v}");
    let (s, _) = again
        .call(Method::GET, "/v1/products", "itk_not-the-key", None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    again.stop().await;
}

#[tokio::test]
async fn admin_key_from_the_environment_is_used_and_survives_restart() {
    let (_tmp, data) = data_dir();
    let cmd = ServerCmd::new(&data).env("IOTUNNEL_ADMIN_KEY", ADMIN_KEY);
    let mut p = cmd.start().await;
    assert_eq!(p.admin_key, None);
    assert!(!p.output().contains("Admin API key"), "{}", p.output());
    let (s, v) = p.call(Method::GET, "/v1/products", ADMIN_KEY, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The admin key may create accounts.
    let (s, v) = p
        .call(
            Method::POST,
            "/v1/accounts",
            ADMIN_KEY,
            Some(json!({"name": "a"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    p.stop().await;

    let mut p = cmd.start().await;
    assert_eq!(p.admin_key, None);
    let (s, _) = p.call(Method::GET, "/v1/products", ADMIN_KEY, None).await;
    assert_eq!(s, StatusCode::OK);
    p.stop().await;

    // Without the variable, the stored key still works and no new key is printed.
    let mut p = ServerCmd::new(&data).start().await;
    assert_eq!(p.admin_key, None);
    let (s, _) = p
        .call(
            Method::POST,
            "/v1/accounts",
            ADMIN_KEY,
            Some(json!({"name": "b"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    p.stop().await;
}

/// The certificates of a PEM file, as DER.
fn pem_certs(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    x509_parser::pem::Pem::iter_from_buffer(&bytes)
        .map(|p| p.expect("valid PEM").contents)
        .collect()
}

struct CertInfo {
    cn: String,
    issuer_cn: String,
    dns: Vec<String>,
    ips: Vec<Vec<u8>>,
    is_ca: bool,
}

fn cert_info(der: &[u8]) -> CertInfo {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).expect("valid certificate");
    let cn = |n: &X509Name| {
        n.iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    if let Some(san) = cert.subject_alternative_name().unwrap() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(ip) => ips.push(ip.to_vec()),
                _ => {}
            }
        }
    }
    CertInfo {
        cn: cn(cert.subject()),
        issuer_cn: cn(cert.issuer()),
        dns,
        ips,
        is_ca: cert.is_ca(),
    }
}

#[tokio::test]
async fn tls_material_names_the_public_host_and_keeps_the_ca() {
    let (_tmp, data) = data_dir();
    let mut p = ServerCmd::new(&data)
        .arg("--public-relay-url", "relay.example.test:9443")
        .start()
        .await;
    p.stop().await;

    let chain = pem_certs(&data.join("tls/server.pem"));
    let ca = pem_certs(&data.join("tls/ca.pem"));
    assert_eq!(ca.len(), 1);
    assert_eq!(
        chain.len(),
        2,
        "server.pem is the server certificate, then the CA"
    );
    assert_eq!(chain[1], ca[0]);
    let leaf = cert_info(&chain[0]);
    let ca_info = cert_info(&ca[0]);
    assert!(ca_info.is_ca && !leaf.is_ca);
    for host in ["localhost", "relay.example.test"] {
        assert!(
            leaf.dns.iter().any(|d| d == host),
            "{host} not in {:?}",
            leaf.dns
        );
    }
    assert!(leaf.ips.contains(&vec![127, 0, 0, 1]), "{:?}", leaf.ips);
    assert!(
        !leaf.cn.is_empty() && leaf.cn != "localhost",
        "CN {:?}",
        leaf.cn
    );
    assert_eq!(leaf.issuer_cn, ca_info.cn);
    assert_ne!(
        leaf.cn, ca_info.cn,
        "the leaf's CN differs from its issuer's"
    );
    for key in ["tls/server.key", "tls/ca.key"] {
        assert_eq!(mode(&data.join(key)), 0o600, "{key} is owner-only");
    }

    // A new public host gets a new server certificate from the same CA.
    let ca_pem = std::fs::read(data.join("tls/ca.pem")).unwrap();
    let mut p = ServerCmd::new(&data)
        .arg("--public-relay-url", "wss://other.example.test:443")
        .start()
        .await;
    p.stop().await;
    assert_eq!(
        std::fs::read(data.join("tls/ca.pem")).unwrap(),
        ca_pem,
        "the CA is kept"
    );
    let chain = pem_certs(&data.join("tls/server.pem"));
    let leaf = cert_info(&chain[0]);
    assert!(
        leaf.dns.iter().any(|d| d == "other.example.test"),
        "{:?}",
        leaf.dns
    );
    assert_eq!(leaf.issuer_cn, ca_info.cn);

    // A public IP address is an IP SAN (a DNS SAN would not match it).
    let mut p = ServerCmd::new(&data)
        .arg("--public-relay-url", "203.0.113.7:9443")
        .start()
        .await;
    p.stop().await;
    let leaf = cert_info(&pem_certs(&data.join("tls/server.pem"))[0]);
    assert!(leaf.ips.contains(&vec![203, 0, 113, 7]), "{:?}", leaf.ips);
    assert!(leaf.ips.contains(&vec![127, 0, 0, 1]), "{:?}", leaf.ips);
}

/// Asserts the server failed with exactly one `error:` line on stderr; returns that line.
fn one_error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected a failure; stderr:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("Admin API key"),
        "no key from a failed start:\n{stdout}"
    );
    lines[0].to_string()
}

#[tokio::test]
async fn startup_fails_with_one_error_line_when_the_api_port_is_taken() {
    let (_tmp, data) = data_dir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = ServerCmd::new(&data)
        .arg("--api-addr", &addr)
        .run_to_exit()
        .await;
    let line = one_error_line(&out);
    assert!(line.contains(&addr), "{line}");

    let out = ServerCmd::new(&data)
        .arg("--metrics-addr", &addr)
        .run_to_exit()
        .await;
    let line = one_error_line(&out);
    assert!(line.contains(&addr) && line.contains("metrics"), "{line}");
}

#[tokio::test]
async fn startup_fails_with_one_error_line_when_the_data_dir_is_unusable() {
    let tmp = tempfile::tempdir().unwrap();
    // Tests may run as root, which chmod does not stop: a path under a regular file stops anyone.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"not a directory").unwrap();
    let out = ServerCmd::new(&file.join("sub")).run_to_exit().await;
    let line = one_error_line(&out);
    assert!(line.contains("data dir"), "{line}");
}

#[tokio::test]
async fn startup_fails_with_one_error_line_on_a_bad_config() {
    let (tmp, data) = data_dir();
    let unknown = tmp.path().join("unknown.toml");
    std::fs::write(&unknown, "api_adr = \"127.0.0.1:0\"\n").unwrap();
    let line = one_error_line(
        &ServerCmd::new(&data)
            .arg("--config", unknown.to_str().unwrap())
            .run_to_exit()
            .await,
    );
    assert!(
        line.contains("unknown field") && line.contains("api_adr"),
        "{line}"
    );

    let broken = tmp.path().join("broken.toml");
    std::fs::write(&broken, "data_dir = \"unterminated\nretention_days = [\n").unwrap();
    let line = one_error_line(
        &ServerCmd::new(&data)
            .arg("--config", broken.to_str().unwrap())
            .run_to_exit()
            .await,
    );
    assert!(line.contains("invalid config file"), "{line}");

    let invalid = tmp.path().join("invalid.toml");
    std::fs::write(&invalid, "retention_days = 0\n").unwrap();
    let line = one_error_line(
        &ServerCmd::new(&data)
            .arg("--config", invalid.to_str().unwrap())
            .run_to_exit()
            .await,
    );
    assert!(line.contains("retention_days"), "{line}");

    let missing = tmp.path().join("missing.toml");
    let line = one_error_line(
        &ServerCmd::new(&data)
            .arg("--config", missing.to_str().unwrap())
            .run_to_exit()
            .await,
    );
    assert!(line.contains("cannot read config file"), "{line}");

    let line = one_error_line(
        &ServerCmd::new(&data)
            .env("IOTUNNEL_ADMIN_KEY", "short")
            .run_to_exit()
            .await,
    );
    assert!(line.contains("IOTUNNEL_ADMIN_KEY"), "{line}");
    assert!(!data.exists(), "a refused config creates nothing");
}

#[tokio::test]
async fn startup_fails_with_one_error_line_on_corrupt_state_files() {
    let (_tmp, data) = data_dir();
    let cmd = ServerCmd::new(&data).env("IOTUNNEL_ADMIN_KEY", ADMIN_KEY);
    let mut p = cmd.start().await;
    p.stop().await;

    let token_key = data.join("token.key");
    let good = std::fs::read(&token_key).unwrap();
    std::fs::write(&token_key, "not hex").unwrap();
    let line = one_error_line(&cmd.run_to_exit().await);
    assert!(line.contains("token.key"), "{line}");
    std::fs::write(&token_key, good).unwrap();

    for f in ["iotunnel.db", "iotunnel.db-wal", "iotunnel.db-shm"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    std::fs::write(data.join("iotunnel.db"), vec![0x5a; 8192]).unwrap();
    let line = one_error_line(&cmd.run_to_exit().await);
    assert!(line.contains("iotunnel.db"), "{line}");
}

/// A supervisor may send SIGTERM as soon as the server says it is listening: that must already
/// be a graceful stop (exit 0), not death by the signal's default action.
#[tokio::test]
async fn sigterm_right_after_the_listening_line_exits_zero() {
    const STARTS: usize = 10;
    let (_tmp, data) = data_dir();
    let cmd = ServerCmd::new(&data).env("IOTUNNEL_ADMIN_KEY", ADMIN_KEY);
    let mut killed_by_signal = 0;
    for _ in 0..STARTS {
        let mut p = cmd.start().await;
        let status = p.term().await;
        if status.code() != Some(0) {
            killed_by_signal += 1;
        }
    }
    assert_eq!(
        killed_by_signal, 0,
        "{killed_by_signal} of {STARTS} servers did not exit 0 on a SIGTERM sent right after \
         the listening line (SIGTERM handler installed after the line is printed?)"
    );
}

#[tokio::test]
async fn sigterm_exits_zero_promptly() {
    let (_tmp, data) = data_dir();
    let mut p = ServerCmd::new(&data)
        .env("IOTUNNEL_ADMIN_KEY", ADMIN_KEY)
        .start()
        .await;
    let (s, _) = p.call(Method::GET, "/healthz", "", None).await;
    assert_eq!(s, StatusCode::OK);
    p.stop().await;
}

#[tokio::test]
async fn sigterm_with_an_open_device_channel_and_idle_connection_exits_zero_promptly() {
    let (_tmp, data) = data_dir();
    let mut p = ServerCmd::new(&data)
        .env("IOTUNNEL_ADMIN_KEY", ADMIN_KEY)
        .start()
        .await;
    let f = device_account(&p.api_base, ADMIN_KEY).await;
    let (mut ws, _) = connect_device(&p.api_base, &f).await;
    wait_online(&p.api_base, &f).await;
    create_tunnel(&p.api_base, &f).await;
    assert_eq!(next_json(&mut ws).await["operation"], "connect");
    // A kept-alive idle HTTP connection must not hold the shutdown either.
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/healthz", p.api_base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    p.stop().await;
    // The device is told the server is going away (1001), or at least sees the channel end.
    let code = closed_code(&mut ws).await;
    assert!(matches!(code, Some(1001) | None), "{code:?}");
    drop(http);
}

#[tokio::test]
async fn tunnels_acknowledged_with_201_survive_kill_9() {
    const TUNNELS: usize = 20;
    let (_tmp, data) = data_dir();
    let cmd = ServerCmd::new(&data)
        .env("IOTUNNEL_ADMIN_KEY", ADMIN_KEY)
        .arg("--max-open-tunnels-per-device", "50");
    let mut p = cmd.start().await;
    let f = device_account(&p.api_base, ADMIN_KEY).await;
    let (ws, _) = connect_device(&p.api_base, &f).await;
    wait_online(&p.api_base, &f).await;

    let creates = (0..TUNNELS).map(|_| create_tunnel(&p.api_base, &f));
    let created = futures_util::future::join_all(creates).await;
    p.kill9().await;
    drop(ws);
    let mut ids: Vec<String> = created
        .iter()
        .map(|v| v["tunnel_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), TUNNELS);

    // Two restarts: the tunnels, the account key and the device tokens all come back the same.
    let mut replayed_tokens = Vec::new();
    for round in 0..2 {
        let mut p = cmd.start().await;
        for id in &ids {
            let (s, v) = p
                .call(Method::GET, &format!("/v1/tunnels/{id}"), &f.key, None)
                .await;
            assert_eq!(s, StatusCode::OK, "round {round}: tunnel {id}: {v}");
            assert_eq!(v["state"], "OPEN", "{v}");
        }
        let (s, v) = p
            .call(
                Method::GET,
                "/v1/tunnels?state=OPEN&page_size=100",
                &f.key,
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["tunnels"].as_array().unwrap().len(), TUNNELS, "{v}");
        assert!(
            p.stderr().contains(&format!("open_tunnels={TUNNELS}")),
            "index rebuilt:\n{}",
            p.stderr()
        );

        // On reconnect the device is sent a connect for every OPEN tunnel.
        let (mut ws, _) = connect_device(&p.api_base, &f).await;
        let mut replay = Vec::new();
        for _ in 0..TUNNELS {
            let n = next_json(&mut ws).await;
            assert_eq!(n["operation"], "connect", "{n}");
            replay.push((
                n["tunnel_id"].as_str().unwrap().to_string(),
                n["token"].as_str().unwrap().to_string(),
            ));
        }
        replay.sort();
        let replay_ids: Vec<&String> = replay.iter().map(|(id, _)| id).collect();
        assert_eq!(replay_ids, ids.iter().collect::<Vec<_>>());
        replayed_tokens.push(replay);
        p.kill9().await;
    }
    assert_eq!(
        replayed_tokens[0], replayed_tokens[1],
        "device tokens are stable across restarts"
    );
}

#[tokio::test]
async fn no_secret_reaches_the_logs() {
    let (_tmp, data) = data_dir();
    let mut p = ServerCmd::new(&data)
        .env("IOTUNNEL_ADMIN_KEY", ADMIN_KEY)
        .env("IOTUNNEL_LOG", "debug")
        .start()
        .await;
    let base = p.api_base.clone();
    let f = device_account(&base, ADMIN_KEY).await;
    let mut secrets = vec![ADMIN_KEY.to_string(), f.key.clone(), f.secret.clone()];

    // Refused: a wrong API key and a bad device signature.
    let (s, _) = call(
        &base,
        Method::GET,
        "/v1/products",
        "itk_wrong-key-0123456789",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let ts = now_secs();
    let bad = sign("not-the-secret", &f.product_key, &f.device, ts);
    let refused = connect_raw(&base, &f.product_key, &f.device, &ts.to_string(), &bad).await;
    assert_eq!(refused.err(), Some(401));

    let (mut ws, signature) = connect_device(&base, &f).await;
    // A valid signature is a credential for as long as its timestamp is accepted.
    secrets.push(signature);
    wait_online(&base, &f).await;

    let t = create_tunnel(&base, &f).await;
    let id = t["tunnel_id"].as_str().unwrap().to_string();
    secrets.push(t["client_token"].as_str().unwrap().into());
    let n = next_json(&mut ws).await;
    assert_eq!(
        (n["operation"].as_str(), n["tunnel_id"].as_str()),
        (Some("connect"), Some(id.as_str()))
    );
    secrets.push(n["token"].as_str().unwrap().into());

    let (s, v) = call(
        &base,
        Method::POST,
        &format!("/v1/tunnels/{id}/rotate"),
        &f.key,
        Some(json!({"side": "all"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    secrets.push(v["client_token"].as_str().unwrap().into());
    let new_device_token = v["device_token"].as_str().unwrap().to_string();
    let n = next_json(&mut ws).await;
    assert_eq!(n["token"].as_str(), Some(new_device_token.as_str()), "{n}");
    secrets.push(new_device_token);

    let (s, v) = call(
        &base,
        Method::POST,
        &format!("/v1/tunnels/{id}/close"),
        &f.key,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(next_json(&mut ws).await["operation"], "close");
    let (s, v) = call(
        &base,
        Method::DELETE,
        &format!("/v1/tunnels/{id}"),
        &f.key,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");

    p.stop().await;
    let out = p.output();
    assert!(
        out.contains("bad signature") && out.contains("tunnel tokens rotated"),
        "the flow was logged:\n{out}"
    );
    let secrets: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
    assert_eq!(secrets.len(), 8);
    for (i, s) in secrets.iter().enumerate() {
        assert!(
            !out.contains(s.as_str()),
            "secret #{i} ({}...) is in the output:\n{out}",
            &s[..6]
        );
    }
}

#[tokio::test]
async fn cli_drives_the_api_end_to_end() {
    let (_tmp, data) = data_dir();
    let mut p = ServerCmd::new(&data)
        .env("IOTUNNEL_ADMIN_KEY", ADMIN_KEY)
        .start()
        .await;
    let base = p.api_base.clone();

    let acc = cli_json(&base, ADMIN_KEY, &["account", "create", "--name", "acme"]).await;
    let key = acc["api_key"]
        .as_str()
        .expect("account create prints the key")
        .to_string();
    assert_eq!(acc["name"], "acme");

    let prod = cli_json(&base, &key, &["product", "create", "--name", "p"]).await;
    let pk = prod["product_key"].as_str().unwrap().to_string();
    assert_eq!(prod["name"], "p");
    let list = cli_json(&base, &key, &["product", "list"]).await;
    assert_eq!(list["products"].as_array().unwrap().len(), 1);
    assert_eq!(list["products"][0]["product_key"], pk.as_str());

    // The table: a header line, then the product.
    let out = cli(&base, &key, &["product", "list"]).await;
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("PRODUCT KEY") && header.contains("NAME"),
        "{table}"
    );
    assert!(lines.any(|l| l.starts_with(&pk)), "{table}");

    let dev = cli_json(
        &base,
        &key,
        &[
            "device",
            "create",
            "--product-key",
            &pk,
            "--device-name",
            "dev-1",
        ],
    )
    .await;
    assert_eq!(dev["device_name"], "dev-1");
    let f = DeviceAccount {
        key: key.clone(),
        product_key: pk.clone(),
        device: "dev-1".into(),
        secret: dev["device_secret"].as_str().unwrap().to_string(),
    };
    let devs = cli_json(&base, &key, &["device", "list", "--product-key", &pk]).await;
    assert_eq!(devs["devices"][0]["online"], false, "{devs}");

    // Offline: the API's refusal comes through.
    let out = cli(
        &base,
        &key,
        &[
            "tunnel",
            "create",
            "--product-key",
            &pk,
            "--device-name",
            "dev-1",
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("device_offline"));

    let (mut ws, _) = connect_device(&base, &f).await;
    wait_online(&base, &f).await;
    let devs = cli_json(&base, &key, &["device", "list", "--product-key", &pk]).await;
    assert_eq!(devs["devices"][0]["online"], true, "{devs}");

    let args = [
        "tunnel",
        "create",
        "--product-key",
        &pk,
        "--device-name",
        "dev-1",
        "--description",
        "maint",
        "--service",
        "SSH",
        "--service",
        "HTTP",
    ];
    let t = cli_json(&base, &key, &args).await;
    let id = t["tunnel_id"].as_str().unwrap().to_string();
    assert_eq!(t["state"], "OPEN");
    assert!(
        t["client_token"].as_str().is_some_and(|s| !s.is_empty()),
        "{t}"
    );
    assert_eq!(
        t["client_url"],
        format!("wss://localhost:8443/tunnel/{id}/source").as_str()
    );
    let n = next_json(&mut ws).await;
    assert_eq!(
        (n["operation"].as_str(), n["tunnel_id"].as_str()),
        (Some("connect"), Some(id.as_str()))
    );
    assert_eq!(n["services"], json!(["SSH", "HTTP"]));

    let list = cli_json(&base, &key, &["tunnel", "list", "--product-key", &pk]).await;
    let tunnels = list["tunnels"].as_array().unwrap();
    assert_eq!(tunnels.len(), 1, "{list}");
    assert_eq!(tunnels[0]["tunnel_id"], id.as_str());

    let d = cli_json(&base, &key, &["tunnel", "describe", &id]).await;
    assert_eq!(
        (d["state"].as_str(), d["description"].as_str()),
        (Some("OPEN"), Some("maint")),
        "{d}"
    );
    assert_eq!(d["device"]["state"], "DISCONNECTED");

    let c = cli_json(&base, &key, &["tunnel", "close", &id]).await;
    assert_eq!(
        (c["state"].as_str(), c["close_reason"].as_str()),
        (Some("CLOSED"), Some("closed")),
        "{c}"
    );
    assert_eq!(next_json(&mut ws).await["operation"], "close");
    assert_eq!(
        cli_json(&base, &key, &["tunnel", "delete", &id]).await,
        Value::Null
    );
    let out = cli(&base, &key, &["tunnel", "describe", &id]).await;
    assert!(!out.status.success(), "a deleted tunnel is gone");

    // Rotate on another tunnel: new tokens for both sides; the device hears its new one.
    let t2 = cli_json(
        &base,
        &key,
        &[
            "tunnel",
            "create",
            "--product-key",
            &pk,
            "--device-name",
            "dev-1",
        ],
    )
    .await;
    let id2 = t2["tunnel_id"].as_str().unwrap().to_string();
    next_json(&mut ws).await;
    let r = cli_json(&base, &key, &["tunnel", "rotate", &id2, "--side", "all"]).await;
    assert_eq!(r["tunnel_id"], id2.as_str());
    let client_token = r["client_token"].as_str().unwrap();
    assert_ne!(client_token, t2["client_token"].as_str().unwrap());
    let n = next_json(&mut ws).await;
    assert_eq!(n["token"], r["device_token"], "{n} vs {r}");
    let r = cli_json(&base, &key, &["tunnel", "rotate", &id2]).await;
    assert!(
        r["client_token"].is_string() && r.get("device_token").is_none(),
        "default side is client: {r}"
    );

    // An API error: non-zero exit, the API's message (and code) on stderr, nothing on stdout.
    let out = cli(&base, &key, &["tunnel", "describe", "nonexistent"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.starts_with("error: ")
            && stderr.contains("tunnel not found")
            && stderr.contains("not_found"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // A wrong key and no key at all.
    let out = cli(&base, "itk_wrong", &["product", "list"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid API key"));
    let mut c = bin();
    c.args(["product", "list", "--api", &base]);
    let out = tokio::time::timeout(DEADLINE, c.output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("API key is required"));

    p.stop().await;
}

#[tokio::test]
async fn json_log_lines_carry_request_ids() {
    let (_tmp, data) = data_dir();
    let mut p = ServerCmd::new(&data)
        .env("IOTUNNEL_ADMIN_KEY", ADMIN_KEY)
        .arg("--log-format", "json")
        .start()
        .await;
    let (s, v) = p
        .call(Method::GET, "/v1/tunnels/nope", ADMIN_KEY, None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let request_id = v["error"]["request_id"].as_str().unwrap().to_string();
    p.stop().await;
    let stderr = p.stderr();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty());
    let tagged = lines
        .iter()
        .filter(|l| l["span"]["request_id"] == request_id.as_str())
        .count();
    assert!(
        tagged >= 1,
        "no JSON log line carries {request_id}:\n{stderr}"
    );
}
