//! The real `iotunnel` binary (and other programs) as child processes, for tests/process.rs and
//! tests/fleet.rs: [`ServerCmd`] starts `iotunnel server` and reads its stdout for the listening
//! lines, [`Proc`] collects every line a child writes, waits (bounded) for one, and kills the
//! child when dropped, so a failing test leaves no process behind.
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub const BIN: &str = env!("CARGO_BIN_EXE_iotunnel");
/// How long a server may take to start, a CLI command to finish, or a reader to drain: generous,
/// because a debug build shares 2 cores with the other tests.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM ("promptly").
pub const TERM_DEADLINE: Duration = Duration::from_secs(10);
/// The line the server prints once it serves the API.
const LISTENING: &str = "iotunnel API listening on http://";
/// The line the server prints next, with the relay's bound address.
const RELAY_LISTENING: &str = "iotunnel relay listening on ";
/// The line (prefix) that carries a generated admin key.
const ADMIN_LINE: &str = "Admin API key (shown only once;";

/// A command for the binary with no `IOTUNNEL_*` variable (nor `RUST_LOG`, which the binary
/// reads too) inherited from the test's environment.
pub fn bin() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("RUST_LOG");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("IOTUNNEL_") {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// How to start `iotunnel server` on a data dir; reusable for restarts.
#[derive(Clone)]
pub struct ServerCmd {
    pub data_dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Default flags this command leaves out.
    without: Vec<String>,
}

impl ServerCmd {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            without: Vec::new(),
        }
    }

    pub fn arg(mut self, flag: &str, value: impl AsRef<str>) -> Self {
        self.args.push(flag.into());
        self.args.push(value.as_ref().into());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Leaves out one of the flags [`Self::command`] adds by default.
    pub fn without(mut self, flag: &str) -> Self {
        self.without.push(flag.into());
        self
    }

    /// The value of `flag`, if this command sets it.
    pub fn value_of(&self, flag: &str) -> Option<&str> {
        let i = self.args.iter().position(|a| a == flag)?;
        self.args.get(i + 1).map(String::as_str)
    }

    pub fn command(&self) -> Command {
        let mut c = bin();
        c.arg("server")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args);
        // Loopback port 0 everywhere unless the test chose otherwise.
        for (flag, default) in [
            ("--api-addr", "127.0.0.1:0"),
            ("--metrics-addr", "127.0.0.1:0"),
            ("--relay-addr", "127.0.0.1:0"),
            ("--public-relay-url", "localhost:8443"),
        ] {
            if !self.args.iter().chain(&self.without).any(|a| a == flag) {
                c.arg(flag).arg(default);
            }
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        // Nothing may land in the repository if a path is wrong.
        let cwd = self
            .data_dir
            .ancestors()
            .find(|a| a.is_dir())
            .unwrap_or(Path::new("/"));
        c.current_dir(cwd);
        c
    }

    /// Starts the server and waits (bounded) until it prints its API and relay addresses.
    pub async fn start(&self) -> Proc {
        Proc::start(self.command()).await
    }

    /// Runs a server that is expected to fail at start; returns its exit status and output.
    pub async fn run_to_exit(&self) -> Output {
        tokio::time::timeout(DEADLINE, self.command().output())
            .await
            .expect("a failing server exits within the deadline")
            .expect("the binary runs")
    }
}

/// A running child process. Dropping it kills the process.
pub struct Proc {
    pub child: Child,
    pub pid: u32,
    /// A server's `http://ADDR` (empty for other programs).
    pub api_base: String,
    /// A server's relay `ADDR` (empty for other programs).
    pub relay_addr: String,
    /// The admin key this start printed, if any.
    pub admin_key: Option<String>,
    /// When set, a test that panics prints this process's output under this name.
    pub label: Option<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    /// Bumped on every line, on either pipe.
    lines_seen: watch::Receiver<u64>,
    readers: Vec<JoinHandle<()>>,
}

/// Appends every line of `pipe` to `buf`, bumps `seen`, and sends it on `lines` when given.
fn collect(
    pipe: impl AsyncRead + Unpin + Send + 'static,
    buf: Arc<Mutex<String>>,
    seen: Arc<watch::Sender<u64>>,
    lines: Option<mpsc::UnboundedSender<String>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            {
                let mut b = buf.lock().unwrap();
                b.push_str(&line);
                b.push('\n');
            }
            seen.send_modify(|n| *n += 1);
            if let Some(tx) = &lines {
                let _ = tx.send(line);
            }
        }
    })
}

impl Proc {
    /// Spawns `cmd` (stdout and stderr piped) and starts collecting its output.
    pub fn spawn(cmd: Command) -> Self {
        Self::spawn_with_lines(cmd).0
    }

    /// Names the process: a test that panics prints its output under that name.
    pub fn labelled(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    fn spawn_with_lines(mut cmd: Command) -> (Self, mpsc::UnboundedReceiver<String>) {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let pid = child.id().expect("a fresh child has a pid");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (seen, lines_seen) = watch::channel(0);
        let seen = Arc::new(seen);
        let (tx, rx) = mpsc::unbounded_channel();
        let readers = vec![
            collect(
                child.stdout.take().unwrap(),
                stdout.clone(),
                seen.clone(),
                Some(tx),
            ),
            collect(child.stderr.take().unwrap(), stderr.clone(), seen, None),
        ];
        let p = Self {
            child,
            pid,
            api_base: String::new(),
            relay_addr: String::new(),
            admin_key: None,
            label: None,
            stdout,
            stderr,
            lines_seen,
            readers,
        };
        (p, rx)
    }

    /// Spawns a server and waits (bounded) until it prints its API and relay addresses.
    pub async fn start(cmd: Command) -> Self {
        let (mut p, mut rx) = Self::spawn_with_lines(cmd);
        let started = tokio::time::timeout(DEADLINE, async {
            let mut api = None;
            while let Some(line) = rx.recv().await {
                if line.starts_with(ADMIN_LINE) {
                    let key = line.rsplit(' ').next().unwrap().to_string();
                    assert!(p.admin_key.is_none(), "two admin keys printed");
                    p.admin_key = Some(key);
                } else if let Some(addr) = line.strip_prefix(LISTENING) {
                    api = Some(format!("http://{}", addr.trim()));
                } else if let Some(addr) = line.strip_prefix(RELAY_LISTENING) {
                    return api.map(|api| (api, addr.trim().to_string()));
                }
            }
            None
        })
        .await;
        match started {
            Ok(Some((api, relay))) => (p.api_base, p.relay_addr) = (api, relay),
            Ok(None) => {
                let status = p.child.wait().await;
                panic!(
                    "server exited before listening ({status:?}):\n{}",
                    p.output()
                );
            }
            Err(_) => panic!("server not listening within {DEADLINE:?}:\n{}", p.output()),
        }
        p
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Everything the process wrote so far, stdout then stderr.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout(), self.stderr())
    }

    /// Waits (bounded by `limit`) until the process writes a line for which `want` holds, on
    /// either pipe; returns that line.
    pub async fn wait_line(
        &self,
        limit: Duration,
        what: &str,
        want: impl Fn(&str) -> bool,
    ) -> String {
        let mut seen = self.lines_seen.clone();
        let found = tokio::time::timeout(limit, async {
            loop {
                seen.borrow_and_update();
                if let Some(line) = self.output().lines().find(|l| want(l)) {
                    return Some(line.to_string());
                }
                if seen.changed().await.is_err() {
                    // Both pipes closed: one last look.
                    return self.output().lines().find(|l| want(l)).map(str::to_string);
                }
            }
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!("no line {what} within {limit:?}:\n{}", self.output()),
        }
    }

    /// Waits until the output pipes are drained (after the process exited).
    pub async fn drain(&mut self) {
        for r in self.readers.drain(..) {
            tokio::time::timeout(DEADLINE, r)
                .await
                .expect("output drains after exit")
                .unwrap();
        }
    }

    /// SIGKILL, then reap.
    pub async fn kill9(&mut self) {
        self.child.kill().await.expect("SIGKILL the process");
        self.drain().await;
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub async fn term(&mut self) -> ExitStatus {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(sent.success(), "kill -TERM {} failed", self.pid);
        self.exit_within(TERM_DEADLINE, "of SIGTERM").await
    }

    /// Waits (bounded) for the process to exit on its own; drains its output.
    pub async fn exit_within(&mut self, limit: Duration, why: &str) -> ExitStatus {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("no exit within {limit:?} {why}:\n{}", self.output()))
            .expect("wait for the process");
        self.drain().await;
        status
    }

    /// Waits (bounded polling) until the process has a SIGTERM handler installed.
    pub async fn wait_sigterm_handler(&self) {
        for _ in 0..1000 {
            if handles_sigterm(self.pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no SIGTERM handler installed:\n{}", self.output());
    }

    /// A graceful stop: once the server handles SIGTERM, SIGTERM; it must exit 0 in time.
    pub async fn stop(&mut self) {
        self.wait_sigterm_handler().await;
        let status = self.term().await;
        assert_eq!(
            status.code(),
            Some(0),
            "SIGTERM should end the server with 0, got {status:?}:\n{}",
            self.output()
        );
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        call(&self.api_base, method, path, key, body).await
    }
}

/// Whether process `pid` catches SIGTERM (Linux: bit 15 of `SigCgt` in /proc/PID/status).
fn handles_sigterm(pid: u32) -> bool {
    const SIGTERM: u32 = 15;
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (SIGTERM - 1)) != 0)
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(label) = self.label.as_ref().filter(|_| std::thread::panicking()) {
            eprintln!("----- output of {label} -----\n{}", self.output());
        }
        // kill_on_drop would do it as well; this also covers a child whose handle was moved.
        let _ = self.child.start_kill();
    }
}

/// Calls the API; returns the status and the JSON body (Null when empty).
pub async fn call(
    base: &str,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    call_with(&reqwest::Client::new(), base, method, path, key, body).await
}

/// [`call`] on a given HTTP client (kept-alive connections).
pub async fn call_with(
    http: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = http.request(method, format!("{base}{path}"));
    if !key.is_empty() {
        req = req.bearer_auth(key);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("the API answers");
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, v)
}

/// An account with a product and a device.
pub struct DeviceAccount {
    pub key: String,
    pub product_key: String,
    pub device: String,
    pub secret: String,
}

pub async fn device_account(base: &str, admin_key: &str) -> DeviceAccount {
    let (s, v) = call(
        base,
        Method::POST,
        "/v1/accounts",
        admin_key,
        Some(json!({"name": "acme"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let key = v["api_key"].as_str().unwrap().to_string();
    let (s, v) = call(
        base,
        Method::POST,
        "/v1/products",
        &key,
        Some(json!({"name": "gateway"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let product_key = v["product_key"].as_str().unwrap().to_string();
    let (s, v) = call(
        base,
        Method::POST,
        &format!("/v1/products/{product_key}/devices"),
        &key,
        Some(json!({"name": "dev-1"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    DeviceAccount {
        key,
        product_key,
        device: "dev-1".into(),
        secret: v["device_secret"].as_str().unwrap().to_string(),
    }
}

/// Waits (bounded polling) until the API lists the device as online: the channel's 101 reaches
/// the device a moment before the server registers the channel.
pub async fn wait_online(base: &str, f: &DeviceAccount) {
    for _ in 0..400 {
        let (_, v) = call(
            base,
            Method::GET,
            &format!("/v1/products/{}/devices", f.product_key),
            &f.key,
            None,
        )
        .await;
        if v["devices"].as_array().is_some_and(|ds| {
            ds.iter()
                .any(|d| d["device_name"] == f.device.as_str() && d["online"] == true)
        }) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("device {} never came online", f.device);
}

pub async fn create_tunnel(base: &str, f: &DeviceAccount) -> Value {
    let body = json!({"product_key": f.product_key, "device_name": f.device});
    let (s, v) = call(base, Method::POST, "/v1/tunnels", &f.key, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v
}

/// Runs the binary as an API client with `IOTUNNEL_API` and `--api-key`.
pub async fn cli(base: &str, key: &str, args: &[&str]) -> Output {
    let mut c = bin();
    c.args(args)
        .arg("--api-key")
        .arg(key)
        .env("IOTUNNEL_API", base);
    tokio::time::timeout(DEADLINE, c.output())
        .await
        .expect("the CLI finishes within the deadline")
        .expect("the CLI runs")
}

/// Runs a `--json` CLI command that must succeed; returns its JSON (Null when it prints nothing).
pub async fn cli_json(base: &str, key: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = cli(base, key, &all).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    assert!(stderr.is_empty(), "{args:?} wrote to stderr: {stderr}");
    if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {stdout}"))
    }
}
