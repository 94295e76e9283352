//! What the server writes, read from the real binary run as a child process (its stderr is read
//! after it exited, so every line it wrote is there).
//!
//! Start-up lines (issue 15, item 9): they name both `/metrics` addresses and the CA file that
//! agents and clients pass as `--ca-file`.
//!
//! Log hygiene (issue 15, item 6): `RUST_LOG` works beside `IOTUNNEL_LOG` (which wins); a TLS
//! client that puts an IP address into SNI (RFC 6066 forbids it; some clients do it anyway)
//! leaves no per-connection rustls warning in the server's log; and iotunnel's own client,
//! dialling the relay by IP address, sends no SNI at all (rustls sends none for an address).
mod common;

use std::sync::Arc;

use common::process::{bin, Proc, ServerCmd, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What rustls logs for a ClientHello whose SNI is an IP address.
const SNI_WARNING: &str = "Illegal SNI extension";

/// A TLS 1.3 ClientHello from rustls for `localhost`, with the name overwritten by `127.0.0.1`:
/// the same length, so every length field stays right and the server parses it as a client
/// that sends an IP address as SNI.
fn client_hello_with_ip_sni() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let at = hello
        .windows(9)
        .position(|w| w == b"localhost")
        .expect("the hello carries the SNI");
    hello[at..at + 9].copy_from_slice(b"127.0.0.1");
    assert!(!hello.windows(9).any(|w| w == b"localhost"), "one SNI only");
    hello
}

/// Sends the IP-SNI hello to the relay and waits for the server's first answer bytes: the
/// ClientHello has been parsed (and anything about it logged) by then.
async fn send_ip_sni_hello(relay: &str) {
    let mut tcp = TcpStream::connect(relay).await.unwrap();
    tcp.write_all(&client_hello_with_ip_sni()).await.unwrap();
    let mut answer = [0u8; 5];
    let n = tokio::time::timeout(DEADLINE, tcp.read(&mut answer))
        .await
        .expect("the relay answers the hello")
        .unwrap();
    // 0x16: a handshake record (the ServerHello): the SNI was ignored, not refused.
    assert!(n > 0 && answer[0] == 0x16, "{:?}", &answer[..n]);
}

/// Starts a TLS server with `env` (`bin()` leaves out the test's own `RUST_LOG`).
async fn server(data: &std::path::Path, env: &[(&str, &str)]) -> Proc {
    let mut cmd = ServerCmd::new(data).command();
    cmd.envs(env.iter().copied());
    Proc::start(cmd).await.labelled("server")
}

/// Stops `p` and returns everything it wrote to stderr.
async fn stderr_after_exit(mut p: Proc) -> String {
    assert!(p.term().await.success(), "{}", p.output());
    p.stderr()
}

/// Runs `iotunnel client` against the relay by IP address, with a token the relay refuses.
async fn client_dials_by_ip(relay: &str, ca: &std::path::Path) {
    let mut client = bin();
    client
        .args(["client", "--stdio", "SSH", "--token", "not-a-token"])
        .arg("--url")
        .arg(format!("wss://{relay}/tunnel/tun_nope/source"))
        .arg("--ca-file")
        .arg(ca);
    let out = tokio::time::timeout(DEADLINE, client.output())
        .await
        .expect("the client gives up on a refused token")
        .unwrap();
    assert!(!out.status.success(), "a refused token is an error");
    // Refused by the relay, so the TLS handshake (and its ClientHello) happened.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown_token"), "{err}");
}

#[tokio::test]
async fn an_ip_as_sni_is_not_logged_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let p = server(&tmp.path().join("data"), &[]).await;
    send_ip_sni_hello(&p.relay_addr).await;
    let log = stderr_after_exit(p).await;
    assert!(!log.contains(SNI_WARNING), "{log}");
    assert!(!log.contains("WARN"), "no warning at all: {log}");
}

#[tokio::test]
async fn iotunnel_client_dialling_an_ip_sends_no_sni() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // rustls's warnings on (RUST_LOG is read when IOTUNNEL_LOG is unset): the client's
    // ClientHello would be reported if it carried the address as SNI.
    let p = server(&data, &[("RUST_LOG", "info,rustls=warn")]).await;
    client_dials_by_ip(&p.relay_addr, &data.join("tls/ca.pem")).await;
    // The one hello that does carry it, so the warning is known to show when due.
    send_ip_sni_hello(&p.relay_addr).await;
    let log = stderr_after_exit(p).await;
    assert_eq!(log.matches(SNI_WARNING).count(), 1, "{log}");
    assert!(log.contains("INFO"), "{log}");
}

#[tokio::test]
async fn iotunnel_log_wins_over_rust_log() {
    let tmp = tempfile::tempdir().unwrap();
    // Both set: IOTUNNEL_LOG decides, and it does not name rustls.
    let p = server(
        &tmp.path().join("a"),
        &[("RUST_LOG", "info,rustls=warn"), ("IOTUNNEL_LOG", "info")],
    )
    .await;
    send_ip_sni_hello(&p.relay_addr).await;
    let log = stderr_after_exit(p).await;
    assert!(!log.contains(SNI_WARNING), "{log}");
    assert!(log.contains("INFO"), "{log}");
    // ... whichever is the more verbose: at warn, the server's own info lines are gone.
    let p = server(
        &tmp.path().join("b"),
        &[("RUST_LOG", "info"), ("IOTUNNEL_LOG", "warn")],
    )
    .await;
    let log = stderr_after_exit(p).await;
    assert!(!log.contains("INFO"), "{log}");
}

#[tokio::test]
async fn start_up_lines_name_both_metrics_addresses_and_the_ca_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let p = server(&data, &[]).await;
    let line = p
        .wait_line(DEADLINE, "naming the metrics addresses", |l| {
            l.starts_with("iotunnel metrics on ")
        })
        .await;
    let urls: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.starts_with("http://"))
        .collect();
    assert_eq!(urls.len(), 2, "{line}");
    assert!(
        urls.contains(&format!("{}/metrics", p.api_base).as_str()),
        "{line}"
    );
    for url in urls {
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        assert!(text.contains("iotunnel_build_info{"), "{url}");
    }
    let line = p
        .wait_line(DEADLINE, "naming the CA file", |l| {
            l.starts_with("iotunnel CA certificate")
        })
        .await;
    let ca = line
        .split("--ca-file ")
        .nth(1)
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{line}"));
    assert_eq!(
        std::path::Path::new(ca),
        std::path::absolute(data.join("tls/ca.pem")).unwrap()
    );
    assert!(std::path::Path::new(ca).is_file());
    drop(p);

    // A plaintext relay has no CA to trust.
    let mut p = server(
        &tmp.path().join("plain"),
        &[("IOTUNNEL_RELAY_PLAINTEXT", "true")],
    )
    .await;
    assert!(p.term().await.success(), "{}", p.output());
    assert!(
        p.stdout().contains("iotunnel metrics on "),
        "{}",
        p.stdout()
    );
    assert!(!p.stdout().contains("CA certificate"), "{}", p.stdout());
}
