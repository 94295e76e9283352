//! `throughput` end to end, briefly: against the in-process iotunnel relay (ws and wss), the
//! baseline relay binary (ws and wss) and the direct pairing; the JSON has the documented fields, and a
//! dead endpoint fails fast.
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{server, ADMIN_KEY};

fn loadtest(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iotunnel-loadtest"))
        .arg("throughput")
        .args(args)
        .output()
        .expect("the loadtest binary runs")
}

/// Runs the scenario for a short while, expects success and returns its JSON.
fn run_ok(dir: &Path, args: &[&str]) -> Value {
    let json = dir.join("out.json");
    let mut all = args.to_vec();
    all.extend([
        "--duration",
        "1s",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    let out = loadtest(&all);
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn check_fields(v: &Value, mode: &str, tunnels: u64) {
    assert_eq!(v["scenario"], "throughput");
    assert_eq!(v["mode"], mode);
    assert_eq!(v["tunnels"], tunnels);
    assert!(v["seconds"].as_f64().unwrap() > 0.5, "{v}");
    assert!(v["bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["bytes_to_device"].as_u64().unwrap() > 0, "{v}");
    assert!(v["bytes_to_client"].as_u64().unwrap() > 0, "{v}");
    assert!(v["bytes_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["frames_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    let s = &v["per_tunnel_bytes_per_sec"];
    let (min, med, max) = (
        s["min"].as_f64().unwrap(),
        s["median"].as_f64().unwrap(),
        s["max"].as_f64().unwrap(),
    );
    assert!(0.0 < min && min <= med && med <= max, "{v}");
    assert_eq!(v["errors"].as_array().unwrap().len(), 0, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_relay_over_ws_and_wss() {
    for plaintext in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path(), plaintext).await;
        let api = format!("http://{}", srv.api_addr);
        let relay = srv.relay_addr.to_string();
        let pid = std::process::id().to_string();
        let ca = dir.path().join("tls").join("ca.pem");
        let out_dir = tempfile::tempdir().unwrap();
        let out_path = out_dir.path().to_path_buf();
        let v = tokio::task::spawn_blocking(move || {
            let ca = ca.to_str().unwrap().to_string();
            let mut args = vec![
                "--api",
                &api,
                "--api-key",
                ADMIN_KEY,
                "--relay",
                &relay,
                "--tunnels",
                "2",
                "--streams",
                "3",
                "--size",
                "65536",
                "--relay-pid",
                &pid,
            ];
            if plaintext {
                args.push("--plaintext");
            } else {
                args.extend(["--ca-file", ca.as_str()]);
            }
            run_ok(&out_path, &args)
        })
        .await
        .unwrap();
        check_fields(&v, "relay", 2);
        assert_eq!(v["tls"], !plaintext);
        assert!(v["relay_cpu"]["cpu_seconds"].as_f64().unwrap() > 0.0, "{v}");
        assert!(
            v["relay_cpu"]["cpu_seconds_per_gib"].as_f64().unwrap() > 0.0,
            "{v}"
        );
        srv.shutdown().await;
    }
}

#[test]
fn direct_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let v = run_ok(
        dir.path(),
        &["--direct", "--tunnels", "3", "--size", "16384"],
    );
    check_fields(&v, "direct", 3);
    assert!(v.get("relay_cpu").is_none());
}

#[test]
fn through_the_baseline_relay_over_ws_and_wss() {
    for tls in [false, true] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let tls_dir = tempfile::tempdir().unwrap();
        let mut relay = Command::new(env!("CARGO_BIN_EXE_iotunnel-baseline-relay"));
        relay.args(["--listen", &addr]);
        if tls {
            relay.arg("--tls-dir").arg(tls_dir.path());
        }
        let mut relay = relay.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the baseline relay did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let dir = tempfile::tempdir().unwrap();
        let pid = relay.id().to_string();
        let ca = tls_dir.path().join("tls").join("ca.pem");
        let mut args = vec!["--baseline", &addr, "--tunnels", "2", "--relay-pid", &pid];
        if tls {
            args.extend(["--baseline-tls", "--ca-file", ca.to_str().unwrap()]);
        }
        let v = run_ok(dir.path(), &args);
        let _ = relay.kill();
        let _ = relay.wait();
        check_fields(&v, "baseline", 2);
        assert_eq!(v["tls"], tls);
        assert!(
            v["relay_cpu"]["cpu_seconds_per_gib"].as_f64().unwrap() > 0.0,
            "{v}"
        );
    }
}

#[test]
fn a_dead_endpoint_fails_fast() {
    let start = Instant::now();
    let out = loadtest(&["--baseline", "127.0.0.1:1", "--duration", "1s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    let out2 = loadtest(&[
        "--api",
        "http://127.0.0.1:1",
        "--api-key",
        "k",
        "--plaintext",
    ]);
    assert!(!out2.status.success());
    assert!(
        String::from_utf8_lossy(&out2.stderr).contains("cannot reach the iotunnel API"),
        "{}",
        String::from_utf8_lossy(&out2.stderr)
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}
