//! `latency`, `churn` and `idle` end to end, briefly, against an in-process iotunnel server
//! (plaintext relay) and the direct pairing, in both protocol families and with `--procs`:
//! the JSON has the documented fields with sane values, and a bad endpoint fails fast.
use iotunnel::server::Server;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{server, ADMIN_KEY};

fn loadtest(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iotunnel-loadtest"))
        .args(args)
        .output()
        .expect("the loadtest binary runs")
}

/// Runs `scenario` for about a second, expects success and returns its JSON.
fn run_ok(scenario: &str, args: &[String]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let mut all = vec![scenario.to_string()];
    all.extend(args.iter().cloned());
    all.extend(["--duration", "1s", "--json", json.to_str().unwrap()].map(String::from));
    let out = loadtest(&all);
    assert!(
        out.status.success(),
        "{all:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The fields every scenario's JSON has.
fn check_common(v: &Value, scenario: &str) {
    assert_eq!(v["scenario"], scenario, "{v}");
    assert!(v["seconds"].as_f64().unwrap() >= 0.9, "{v}");
    assert!(v["bytes"].is_u64(), "{v}");
    assert!(v["bytes_per_sec"].is_number(), "{v}");
}

/// p50 <= p90 <= p99 <= p99.9 <= max, all positive.
fn check_latency(l: &Value) {
    let p: Vec<u64> = ["p50", "p90", "p99", "p999", "max"]
        .iter()
        .map(|f| l[f].as_u64().unwrap_or_else(|| panic!("{f} in {l}")))
        .collect();
    assert!(p[0] > 0 && p.windows(2).all(|w| w[0] <= w[1]), "{l}");
}

/// Flags that point the loadtest at `srv`.
fn relay_flags(srv: &Server) -> Vec<String> {
    strings(&[
        "--api",
        &format!("http://{}", srv.api_addr),
        "--api-key",
        ADMIN_KEY,
        "--relay",
        &srv.relay_addr.to_string(),
        "--plaintext",
    ])
}

/// Runs the blocking `f` (which starts the loadtest) while the server keeps running.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_through_the_relay_in_both_families() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path(), true).await;
    let base = relay_flags(&srv);
    for (family, procs) in [("aws", "1"), ("aliyun", "2")] {
        let mut args = base.clone();
        args.extend(strings(&[
            "--family",
            family,
            "--tunnels",
            "4",
            "--rate",
            "200",
            "--size",
            "64",
            "--warmup",
            "0",
            "--procs",
            procs,
        ]));
        let v = blocking(move || run_ok("latency", &args)).await;
        check_common(&v, "latency");
        assert_eq!(v["mode"], "relay");
        assert_eq!(v["family"], family);
        assert_eq!(v["tunnels"], 4);
        assert_eq!(v["procs"].as_u64().unwrap().to_string(), procs);
        let messages = v["messages"].as_u64().unwrap();
        // 200/s for 1 s; a slow debug build on a busy machine may fall behind, never ahead.
        assert!((20..=210).contains(&messages), "{v}");
        assert_eq!(v["bytes"].as_u64().unwrap(), 2 * 64 * messages, "{v}");
        check_latency(&v["latency_us"]);
        assert_eq!(v["errors"].as_array().unwrap().len(), 0, "{v}");
        assert!(
            v.get("hist").is_none(),
            "the merge drops the children's histograms"
        );
    }
    srv.shutdown().await;
}

#[test]
fn latency_direct() {
    let v = run_ok(
        "latency",
        &strings(&[
            "--direct",
            "--tunnels",
            "3",
            "--rate",
            "300",
            "--warmup",
            "0",
        ]),
    );
    check_common(&v, "latency");
    assert_eq!(v["mode"], "direct");
    assert!(v["messages"].as_u64().unwrap() > 30, "{v}");
    check_latency(&v["latency_us"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_cycles_in_both_families() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path(), true).await;
    for family in ["aws", "aliyun"] {
        let mut args = relay_flags(&srv);
        args.extend(strings(&[
            "--family",
            family,
            "--devices",
            "2",
            "--concurrency",
            "4",
        ]));
        let v = blocking(move || run_ok("churn", &args)).await;
        check_common(&v, "churn");
        let cycles = v["cycles"].as_u64().unwrap();
        assert!(cycles > 0, "{v}");
        assert_eq!(v["errors"], 0, "{v}");
        assert!(v["cycles_per_sec"].as_f64().unwrap() > 0.0, "{v}");
        assert_eq!(v["bytes"].as_u64().unwrap(), 2 * 64 * cycles, "{v}");
        check_latency(&v["latency_us"]);
        for step in ["create", "pair", "exchange", "close"] {
            check_latency(&v["steps_us"][step]);
            assert!(
                v["steps_us"][step]["p50"].as_u64() <= v["latency_us"]["max"].as_u64(),
                "{v}"
            );
        }
    }
    // Every cycle closed its tunnel.
    let api = format!("http://{}/v1/tunnels?state=OPEN", srv.api_addr);
    let open: Value = reqwest::Client::new()
        .get(api)
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(open["tunnels"].as_array().map(Vec::len), Some(0), "{open}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pairs_cost_the_relay_files_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path(), true).await;
    let mut args = relay_flags(&srv);
    // The relay runs in this process.
    let pid = std::process::id().to_string();
    args.extend(strings(&[
        "--tunnels",
        "30",
        "--relay-pid",
        &pid,
        "--procs",
        "2",
    ]));
    let v = blocking(move || run_ok("idle", &args)).await;
    check_common(&v, "idle");
    assert_eq!(v["pairs_held"], 30, "{v}");
    assert_eq!(v["procs"], 2, "{v}");
    for f in ["rss_before", "rss_after", "fds_before", "fds_after"] {
        assert!(v[f].as_u64().unwrap() > 0, "{f}: {v}");
    }
    // Two relay sockets per pair (other tests in this process may add or close a few).
    let per_pair = v["fds_per_pair"].as_f64().unwrap();
    assert!((1.5..4.0).contains(&per_pair), "{v}");
    assert!(v["rss_per_pair_bytes"].is_number(), "{v}");
    srv.shutdown().await;
}

#[test]
fn idle_direct_in_aliyun() {
    let v = run_ok(
        "idle",
        &strings(&["--direct", "--family", "aliyun", "--tunnels", "20"]),
    );
    check_common(&v, "idle");
    assert_eq!(v["pairs_held"], 20);
    // Both ends of each pair are the loadtest's own.
    assert!(v["fds_per_pair"].as_f64().unwrap() >= 2.0, "{v}");
    assert!(v["rss_per_pair_bytes"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn bad_endpoints_fail_fast_and_say_why() {
    let start = Instant::now();
    let dead_api = strings(&[
        "--api",
        "http://127.0.0.1:1",
        "--api-key",
        "k",
        "--plaintext",
    ]);
    for scenario in ["latency", "churn", "idle"] {
        let mut args = vec![scenario.to_string()];
        args.extend(dead_api.clone());
        args.extend(strings(&["--relay-pid", "1", "--duration", "1s"]));
        let out = loadtest(&args);
        assert!(!out.status.success(), "{scenario}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cannot reach the iotunnel API"),
            "{scenario}: {err}"
        );
    }
    let out = loadtest(&strings(&["churn", "--direct", "--api-key", "k"]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no meaning"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = loadtest(&strings(&["idle", "--api-key", "k", "--tunnels", "1"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--relay-pid"));
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_relay_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path(), true).await;
    let mut args = relay_flags(&srv);
    let i = args.iter().position(|a| a == "--relay").unwrap();
    args[i + 1] = "127.0.0.1:1".into();
    args.splice(0..0, ["latency".to_string()]);
    args.extend(strings(&["--tunnels", "1", "--duration", "1s"]));
    let start = Instant::now();
    let out = blocking(move || loadtest(&args)).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ws://127.0.0.1:1/tunnel"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    srv.shutdown().await;
}
