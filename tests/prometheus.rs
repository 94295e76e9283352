//! Issue 5: a real Prometheus scrapes a live server during a scripted session, and every PromQL
//! expression of every dashboard in `grafana/dashboards/` is evaluated through Prometheus's HTTP
//! API. An expression fails when Prometheus answers an error, no series, or only NaN (what
//! Grafana draws as "No data").
//!
//! The test starts its own Prometheus (the Debian package `prometheus`, which .ci/run installs;
//! `PROMETHEUS=/path/to/prometheus` overrides the binary) on a free loopback port with its
//! storage in a temp dir, and kills it when done. Its config is the shipped
//! `grafana/prometheus.yml` (job name, metrics path, everything) with only the target and the
//! intervals changed: 1 s instead of 15 s, so the test takes seconds, not minutes.
//!
//! Grafana's variables are replaced as Grafana would replace them:
//! - `$__rate_interval` by `1m`: Grafana makes it max($__interval + scrape interval,
//!   4 x scrape interval), and the provisioned datasource declares `timeInterval: 15s`, so 1m is
//!   what a recent time range gets. With a 1 s scrape that window holds every sample the test
//!   took, so `rate()` and `increase()` see many points.
//! - `$__interval` by `15s`, `$__range` by `5m` (and their `_ms`/`_s` forms).
//! - The query variables (`$job`, `$instance`), once each: first with "All" (the variable's
//!   `allValue`, `.*`), then with the values the variable's own `label_values(...)` query
//!   returns from this Prometheus, regex-escaped as Grafana's Prometheus datasource escapes a
//!   multi-value variable. So the variable queries are evaluated too, and must find the target.
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::dashboard::{dashboards, exprs, grafana_file, query_variables};
use common::peers::{
    data, open_tunnel, stream_start, Aws, AwsPeer, EchoTunnel, Mode, Relay, WsEnd,
};
use common::*;
use iotunnel::proto::aws::MessageType;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The scrape (and rule evaluation) interval the test gives Prometheus.
const SCRAPE_INTERVAL: &str = "1s";
/// Relay peers are pinged this often (ms), so the peer-RTT histogram fills within the session
/// (the default, 20 s, would not ping once). Three missed pings drop a peer, and the test's
/// peers answer pings only while they read: 250 ms leaves 750 ms of slack on a busy machine.
const PEER_PING_MS: u64 = 250;
/// Scrapes Prometheus must take after the scripted session before the queries run: with a
/// 1 s interval, enough for `rate()` over the steady traffic to have several points.
const SCRAPES_AFTER_SESSION: f64 = 3.0;
/// How long a wait on Prometheus (ready, a scrape, a non-empty answer) may take.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(30);
/// Grafana's built-in interval variables and what they become here (see the module docs).
const GRAFANA_BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__interval_ms", "15000"),
    ("__range", "5m"),
    ("__range_s", "300"),
    ("__range_ms", "300000"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let t = TestServer::start_with(|s| {
        s.relay_plaintext = true;
        s.peer_ping_interval_ms = PEER_PING_MS;
    })
    .await;
    let target = t.server().metrics_addr.to_string();
    let (config, job) = scrape_config(&target);
    let prom = Prometheus::start(&config).await;

    // The idle server is scraped before anything happens, so every counter the session moves
    // has an earlier sample and `increase()` sees the session, not a series' first point.
    prom.wait_for(
        "the first scrape of the server",
        &format!("up{{job=\"{job}\"}} == 1"),
    )
    .await;

    let session = Session::run(&t).await;
    let session_done = unix_now();
    prom.wait_for(
        "scrapes after the scripted session",
        &format!(
            "timestamp(up{{job=\"{job}\"}}) > {}",
            session_done + SCRAPES_AFTER_SESSION
        ),
    )
    .await;

    let mut failures = Vec::new();
    let mut evaluated = 0;
    for (file, dash) in dashboards() {
        // The variables, resolved by their own queries against this Prometheus.
        let mut selected: BTreeMap<String, String> = BTreeMap::new();
        let mut all: BTreeMap<String, String> = BTreeMap::new();
        let mut resolved: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for var in query_variables(&dash) {
            let query = substitute(&var.query, &selected)
                .unwrap_or_else(|e| panic!("{file}: variable {}: {e}", var.name));
            let values = prom.label_values(&query).await;
            if values.is_empty() {
                failures.push(format!(
                    "{file}: variable ${}: {query} found no values",
                    var.name
                ));
            }
            let formatted = grafana_multi_value(&values);
            all.insert(
                var.name.clone(),
                var.all_value.clone().unwrap_or(formatted.clone()),
            );
            selected.insert(var.name.clone(), formatted);
            resolved.insert(var.name, values);
        }
        // The target Prometheus scrapes is the one node the variables offer.
        assert_eq!(
            resolved.get("job"),
            Some(&vec![job.clone()]),
            "{file}: $job"
        );
        assert_eq!(
            resolved.get("instance"),
            Some(&vec![target.clone()]),
            "{file}: $instance"
        );

        for (binding, vars) in [("All", &all), ("selected", &selected)] {
            let mut pending = Vec::new();
            for (title, expr) in exprs(&dash) {
                let what = format!("{file} [{binding}] {title:?}");
                match substitute(&expr, vars) {
                    Ok(q) => pending.push((what, q)),
                    Err(e) => failures.push(format!("{what}: {e} in {expr}")),
                }
            }
            evaluated += pending.len();
            let answers = prom.evaluate_all(pending).await;
            for (what, query, answer) in &answers {
                if let Err(e) = answer {
                    failures.push(format!("{what}: {e}\n    {query}"));
                }
            }
            if binding == "selected" && file == "iotunnel.json" {
                failures.extend(session.check(&answers));
            }
        }
    }
    session.stop().await;
    assert!(evaluated > 0, "no dashboard expressions found");
    if !failures.is_empty() {
        panic!(
            "{} problem(s) with the {evaluated} dashboard queries evaluated by Prometheus:\n  {}\n\ntargets: {}\n\nprometheus log (tail):\n{}",
            failures.len(),
            failures.join("\n  "),
            prom.targets().await,
            prom.log_tail()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The scripted session
// ---------------------------------------------------------------------------------------------

/// What the session did, for checking the dashboard's numbers, and the steady traffic that
/// keeps flowing while the queries run.
struct Session {
    open_tunnels: f64,
    closed_tunnels: f64,
    stop: Arc<AtomicBool>,
    steady: tokio::task::JoinHandle<u64>,
    _fixture: Fixture,
}

impl Session {
    /// Device online, tunnels created, peers paired over the relay with bytes both ways, a
    /// bad-token handshake, a close, API calls with errors; then one tunnel keeps echoing and
    /// the API keeps being called in the background until [`Session::stop`].
    async fn run(t: &TestServer) -> Self {
        let relay = Relay::of(t);
        let mut f = t.online_device().await;
        // An offline device: creating a tunnel for it is a 409.
        t.device(&f.key, &f.product_key, "dev-offline").await;
        let (s, v) = t
            .post(
                "/v1/tunnels",
                &f.key,
                json!({ "product_key": f.product_key, "device_name": "dev-offline" }),
            )
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");

        // Tunnel A: paired, echoing, kept for the steady traffic.
        let mut echo = EchoTunnel::open(t, &mut f, &relay).await;
        echo.assert_echoes().await;

        // Tunnel B: paired, bytes both ways, then closed through the API.
        let b = open_tunnel(t, &mut f, &["SSH"]).await;
        let mut device =
            AwsPeer::connect(&relay, Mode::Destination, Aws::V3, &b.device_token).await;
        let mut client = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &b.client_token).await;
        client.send(&stream_start(1, "SSH", 1)).await;
        assert_eq!(
            device.next_message().await.r#type,
            MessageType::StreamStart as i32
        );
        client.send(&data(1, "", 1, &[7u8; 40_000])).await;
        let got = device.next_message().await;
        assert_eq!(got.payload.len(), 40_000);
        device.send(&data(1, "", 1, &[9u8; 30_000])).await;
        assert_eq!(client.next_message().await.payload.len(), 30_000);
        let (s, v) = t
            .post(&format!("/v1/tunnels/{}/close", b.id), &f.key, json!({}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        for peer in [&mut device, &mut client] {
            assert!(
                matches!(peer.end().await, WsEnd::Close(_)),
                "closed tunnel ends its peers"
            );
        }
        let (s, v) = t
            .post(&format!("/v1/tunnels/{}/close", b.id), &f.key, json!({}))
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "closing twice: {v}");

        // Tunnel C: open, nobody connected.
        let c = open_tunnel(t, &mut f, &["SSH"]).await;

        // A handshake with a token the relay does not know.
        let refused = AwsPeer::try_connect(&relay, Mode::Source, Aws::V3, "not-a-token").await;
        match refused {
            Err(r) => {
                r.assert_refusal(&[401]);
            }
            Ok(_) => panic!("a bad token was accepted"),
        }

        // API errors: unknown tunnel, no key, no route, deleting an open tunnel.
        let (s, _) = t.get("/v1/tunnels/tun-does-not-exist", &f.key).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _) = t.get("/v1/tunnels", "").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _) = t.get("/v1/no-such-route", &f.key).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _) = t.delete(&format!("/v1/tunnels/{}", c.id), &f.key).await;
        assert_eq!(s, StatusCode::CONFLICT);
        let (s, _) = t.get("/v1/tunnels", &f.key).await;
        assert_eq!(s, StatusCode::OK);

        // Steady traffic while Prometheus scrapes and the queries run: echo round trips (the
        // forwarding-latency histogram and byte counters move), pings answered (the RTT
        // histogram), and API calls (the API latency histogram).
        let stop = Arc::new(AtomicBool::new(false));
        let steady = tokio::spawn(steady_traffic(
            echo,
            t.http.clone(),
            t.base.clone(),
            f.key.clone(),
            stop.clone(),
        ));
        Self {
            open_tunnels: 2.0,
            closed_tunnels: 1.0,
            stop,
            steady,
            _fixture: f,
        }
    }

    /// Stops the steady traffic; fails the test when it failed.
    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let rounds = self
            .steady
            .await
            .expect("steady traffic ran without failing");
        assert!(rounds > 0, "no steady traffic");
    }

    /// The dashboard's numbers agree with the session (the "selected" answers of
    /// iotunnel.json); returns what disagrees.
    fn check(&self, answers: &[(String, String, Answer)]) -> Vec<String> {
        let mut out = Vec::new();
        let mut expect = |title: &str,
                          fragment: &str,
                          labels: &[(&str, &str)],
                          ok: &dyn Fn(f64) -> bool,
                          want: &str| {
            let found = answers.iter().find(|(what, query, _)| {
                what.contains(&format!("{title:?}")) && query.contains(fragment)
            });
            let Some((what, query, answer)) = found else {
                out.push(format!("no panel {title:?} with {fragment:?}"));
                return;
            };
            let Ok(samples) = answer else { return };
            let value = samples
                .iter()
                .find(|s| {
                    labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                })
                .map(|s| s.value);
            match value {
                Some(v) if ok(v) => {}
                other => out.push(format!(
                    "{what}: series {labels:?} is {other:?}, the session makes it {want}\n    {query}"
                )),
            }
        };
        let (open, closed) = (self.open_tunnels, self.closed_tunnels);
        expect("Open tunnels", "", &[], &|v| v == open, &open.to_string());
        expect(
            "Tunnels by state",
            "",
            &[("state", "closed")],
            &|v| v == closed,
            &closed.to_string(),
        );
        expect("Connected devices", "", &[], &|v| v == 1.0, "1");
        expect("Connected clients", "", &[], &|v| v == 1.0, "1");
        expect(
            "Connected devices and clients",
            "device_channels",
            &[],
            &|v| v == 1.0,
            "1",
        );
        expect("Relay throughput", "", &[], &|v| v > 0.0, "> 0");
        for d in ["client_to_device", "device_to_client"] {
            expect(
                "Throughput by direction (bytes/s)",
                "",
                &[("direction", d)],
                &|v| v > 0.0,
                "> 0",
            );
        }
        // The balance is a ratio in (0, 1] (the throughput per shard: see below).
        for fragment in ["iotunnel_shard_tunnels", "iotunnel_shard_bytes_total"] {
            expect(
                "Shard balance (min/max across shards)",
                fragment,
                &[],
                &|v| v > 0.0 && v <= 1.0,
                "a ratio in (0, 1]",
            );
        }
        expect(
            "Handshake failures by reason (rate)",
            "",
            &[("reason", "unknown_token")],
            &|v| v > 0.0,
            "> 0",
        );
        for role in ["device", "client"] {
            expect(
                "Peer disconnects by reason (rate)",
                "",
                &[("role", role), ("reason", "closed")],
                &|v| v > 0.0,
                "> 0",
            );
            expect(
                "Peer RTT p50/p99 by role",
                "0.99",
                &[("role", role)],
                &|v| v > 0.0 && v.is_finite(),
                "a finite RTT",
            );
        }
        expect(
            "Forwarding latency p50/p99/p99.9",
            "0.99,",
            &[],
            &|v| v > 0.0 && v.is_finite(),
            "a finite latency",
        );
        // Each of these errors happened once. `rate()` sees it only when the series existed
        // (at 0) before the error: a series whose first sample already counts the error has
        // no increase. Hence "every label value present from start-up" (STYLE.md 5).
        for (route, status) in [
            ("/v1/tunnels", "409"),
            ("/v1/tunnels/{id}", "404"),
            ("unmatched", "404"),
            ("/v1/tunnels", "401"),
        ] {
            expect(
                "API error rate by route (4xx/5xx)",
                "",
                &[("route", route), ("status", status)],
                &|v| v > 0.0,
                "> 0",
            );
        }
        // The steady echo moves bytes through one shard, whichever it is.
        let per_shard = answers
            .iter()
            .find(|(what, _, _)| what.contains("\"Throughput per shard (bytes/s)\""));
        match per_shard {
            Some((_, _, Ok(samples))) if samples.iter().any(|s| s.value > 0.0) => {}
            Some((what, query, Ok(samples))) => out.push(format!(
                "{what}: no shard moves bytes ({} series), the steady echo does\n    {query}",
                samples.len()
            )),
            Some(_) => {}
            None => out.push("no panel \"Throughput per shard (bytes/s)\"".into()),
        }
        out
    }
}

/// Echo round trips on tunnel A, paced so they do not starve Prometheus of the machine's two
/// cores, with API calls in between; returns the number of round trips.
async fn steady_traffic(
    mut echo: EchoTunnel,
    http: reqwest::Client,
    base: String,
    key: String,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut rounds = 0u64;
    while !stop.load(Ordering::Relaxed) {
        echo.round_trip().await;
        rounds += 1;
        if rounds.is_multiple_of(25) {
            let url = format!("{base}/v1/tunnels/{}", echo.tunnel.id);
            let resp = http
                .get(url)
                .bearer_auth(&key)
                .send()
                .await
                .expect("API call");
            assert_eq!(resp.status(), StatusCode::OK);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    echo.assert_echoes().await;
    rounds
}

// ---------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------

/// `grafana/prometheus.yml` scraping `target` every [`SCRAPE_INTERVAL`]; and its job name.
fn scrape_config(target: &str) -> (String, String) {
    let shipped = grafana_file("prometheus.yml");
    let jobs: Vec<String> = shipped
        .lines()
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix("job_name:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .collect();
    assert_eq!(
        jobs.len(),
        1,
        "grafana/prometheus.yml has one scrape job: {jobs:?}"
    );
    let mut config = shipped.clone();
    for (from, to) in [
        (
            &*format!("\"{}\"", iotunnel::config::DEFAULT_METRICS_ADDR),
            format!("\"{target}\""),
        ),
        (
            "scrape_interval: 15s",
            format!("scrape_interval: {SCRAPE_INTERVAL}"),
        ),
        (
            "evaluation_interval: 15s",
            format!("evaluation_interval: {SCRAPE_INTERVAL}"),
        ),
    ] {
        assert!(
            config.contains(from),
            "grafana/prometheus.yml no longer has {from}"
        );
        config = config.replace(from, &to);
    }
    (config, jobs[0].clone())
}

/// The `prometheus` binary: `$PROMETHEUS`, else on PATH, else Debian's /usr/bin/prometheus.
fn prometheus_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMETHEUS") {
        return p.into();
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("prometheus"))
            .find(|p| p.is_file())
    });
    on_path
        .or_else(|| Some(PathBuf::from("/usr/bin/prometheus")).filter(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!(
                "the `prometheus` binary is not installed (not on PATH, no /usr/bin/prometheus): \
                 this test needs a real Prometheus. Install the Debian package \
                 (`apt-get install prometheus`; .ci/run does) or set PROMETHEUS=/path/to/prometheus"
            )
        })
}

/// One sample of an instant query's answer.
#[derive(Debug, Clone)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

/// An instant query's samples, or why it failed (an error, no series, only NaN).
type Answer = Result<Vec<Sample>, String>;

/// A Prometheus process on a free loopback port, storage in a temp dir; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Prometheus {
    /// Starts Prometheus with `config` and waits until it is ready.
    async fn start(config: &str) -> Self {
        let binary = prometheus_binary();
        // The port is picked by binding :0 and releasing it; another process may take it
        // before Prometheus binds, so an early exit is retried on a new port.
        for attempt in 1..=3 {
            let dir = tempfile::tempdir().unwrap();
            let config_path = dir.path().join("prometheus.yml");
            std::fs::write(&config_path, config).unwrap();
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
            let child = Command::new(&binary)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let mut prom = Self {
                child,
                addr,
                dir,
                http: reqwest::Client::new(),
            };
            let deadline = Instant::now() + PROMETHEUS_WAIT;
            loop {
                if let Some(status) = prom.child.try_wait().unwrap() {
                    if attempt == 3 {
                        panic!("prometheus exited ({status}):\n{}", prom.log_tail());
                    }
                    break;
                }
                let ready = prom.http.get(prom.url("/-/ready")).send().await;
                if ready.is_ok_and(|r| r.status().is_success()) {
                    return prom;
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus not ready within {PROMETHEUS_WAIT:?}:\n{}",
                    prom.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        unreachable!("the last attempt panics")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET path?params`: the `data` of a successful answer, or Prometheus's error.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let resp = self
            .http
            .get(self.url(path))
            .query(params)
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("HTTP {status}, not JSON: {e}"))?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!(
                "HTTP {status}: {} {}",
                body["errorType"].as_str().unwrap_or("?"),
                body["error"].as_str().unwrap_or("?")
            ))
        }
    }

    /// An instant query at now: its samples, or why it is of no use to a panel.
    async fn query(&self, expr: &str) -> Answer {
        let data = self.api("/api/v1/query", &[("query", expr)]).await?;
        let sample = |labels: &Value, pair: &Value| -> Result<Sample, String> {
            let text = pair[1].as_str().ok_or("a sample without a value")?;
            let value = text
                .parse::<f64>()
                .map_err(|e| format!("value {text:?}: {e}"))?;
            let labels = labels
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                        .collect()
                })
                .unwrap_or_default();
            Ok(Sample { labels, value })
        };
        let samples = match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| sample(&s["metric"], &s["value"]))
                .collect::<Result<Vec<_>, _>>()?,
            Some("scalar") => vec![sample(&Value::Null, &data["result"])?],
            other => return Err(format!("result type {other:?}, not a vector")),
        };
        if samples.is_empty() {
            return Err("no series".into());
        }
        if samples.iter().all(|s| s.value.is_nan()) {
            return Err(format!(
                "only NaN ({} series): Grafana shows no data",
                samples.len()
            ));
        }
        Ok(samples)
    }

    /// Evaluates every (what, query). An empty answer is asked again (a slow scrape on a busy
    /// machine) until [`PROMETHEUS_WAIT`] has passed; an error is final at once.
    async fn evaluate_all(&self, queries: Vec<(String, String)>) -> Vec<(String, String, Answer)> {
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        let mut answers: Vec<(String, String, Answer)> = queries
            .into_iter()
            .map(|(what, q)| (what, q, Err("not asked yet".into())))
            .collect();
        let mut first = true;
        loop {
            let mut retry = false;
            for (_, query, answer) in answers.iter_mut() {
                let empty = matches!(answer, Err(e) if e == "not asked yet" || e == "no series" || e.starts_with("only NaN"));
                if first || empty {
                    *answer = self.query(query).await;
                    retry |=
                        matches!(answer, Err(e) if e == "no series" || e.starts_with("only NaN"));
                }
            }
            first = false;
            if !retry || Instant::now() >= deadline {
                return answers;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Resolves a Grafana `label_values(selector, label)` (or `label_values(label)`) variable
    /// query through `/api/v1/label/{label}/values`.
    async fn label_values(&self, query: &str) -> Vec<String> {
        let inner = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("not a label_values(...) query: {query}"));
        let (selector, label) = match inner.rsplit_once(',') {
            Some((s, l)) => (Some(s.trim()), l.trim()),
            None => (None, inner.trim()),
        };
        let params: Vec<(&str, &str)> = selector.map(|s| ("match[]", s)).into_iter().collect();
        let data = self
            .api(&format!("/api/v1/label/{label}/values"), &params)
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        data.as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    }

    /// Waits until `expr` returns a series.
    async fn wait_for(&self, what: &str, expr: &str) {
        let deadline = Instant::now() + PROMETHEUS_WAIT;
        loop {
            let answer = self.query(expr).await;
            if answer.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waiting for {what}: `{expr}` still {answer:?} after {PROMETHEUS_WAIT:?}\ntargets: {}\n{}",
                self.targets().await,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The scrape targets' health, for failure messages.
    async fn targets(&self) -> String {
        match self.api("/api/v1/targets", &[]).await {
            Ok(data) => data["activeTargets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    format!(
                        "{} {} health={} lastError={:?}",
                        t["labels"]["job"], t["scrapeUrl"], t["health"], t["lastError"]
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => e,
        }
    }

    /// The last lines Prometheus logged.
    fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Grafana's variables
// ---------------------------------------------------------------------------------------------

/// Replaces `$name`, `${name}` and `[[name]]` by `vars[name]` or a Grafana built-in; an
/// unknown variable is an error (Grafana would send it to Prometheus as it is).
fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let lookup = |name: &str| -> Result<String, String> {
        vars.get(name)
            .cloned()
            .or_else(|| {
                GRAFANA_BUILTINS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            })
            .ok_or_else(|| format!("unknown variable ${name}"))
    };
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(body) = tail.strip_prefix("${") {
            let end = body.find('}').ok_or("unclosed ${")?;
            out.push_str(&lookup(&body[..end])?);
            rest = &body[end + 1..];
        } else if let Some(body) = tail.strip_prefix("[[") {
            let end = body.find("]]").ok_or("unclosed [[")?;
            out.push_str(&lookup(&body[..end])?);
            rest = &body[end + 2..];
        } else if let Some(body) = tail.strip_prefix('$') {
            let end = body.find(|c: char| !ident(c)).unwrap_or(body.len());
            if end == 0 {
                out.push('$'); // a regex anchor, not a variable
            } else {
                out.push_str(&lookup(&body[..end])?);
            }
            rest = &body[end..];
        } else {
            out.push('[');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// How Grafana's Prometheus datasource writes a multi-value variable into a regex matcher:
/// each value regex-escaped (a backslash doubled for the PromQL string), several as `(a|b)`.
fn grafana_multi_value(values: &[String]) -> String {
    let escape = |v: &String| {
        let mut out = String::new();
        for c in v.chars() {
            if c == '\\' || "$^*{}[]'+?.()|".contains(c) {
                out.push_str("\\\\");
            }
            out.push(c);
        }
        out
    };
    match values {
        [one] => escape(one),
        many => format!(
            "({})",
            many.iter().map(escape).collect::<Vec<_>>().join("|")
        ),
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn grafana_variables_are_replaced_as_grafana_does() {
    let vars: BTreeMap<String, String> = [
        ("job".to_string(), "iotunnel".to_string()),
        (
            "instance".to_string(),
            grafana_multi_value(&["127.0.0.1:9100".into()]),
        ),
    ]
    .into();
    assert_eq!(
        substitute(
            r#"rate(x{job=~"$job", instance=~"${instance}", a=~"b$"}[$__rate_interval]) [[job]]"#,
            &vars
        )
        .unwrap(),
        r#"rate(x{job=~"iotunnel", instance=~"127\\.0\\.0\\.1:9100", a=~"b$"}[1m]) iotunnel"#
    );
    assert!(substitute("x[$nope]", &vars).unwrap_err().contains("$nope"));
    assert_eq!(
        grafana_multi_value(&["a.b".into(), "c".into()]),
        r#"(a\\.b|c)"#
    );
}
