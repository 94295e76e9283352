//! A fleet as it runs in production: three `iotunnel server` processes (nodes) on one fresh
//! PostgreSQL database, HAProxy (`tests/fleet/haproxy.cfg`) in front of their relays and APIs,
//! the real `iotunnel device` agent and `iotunnel client`, and hashed traffic through them.
//! One API across the nodes, pairing across two relays, a node killed with `kill -9`, the device
//! limit under concurrent creates on three nodes, and a node drained by SIGTERM.
//!
//! Every port is 127.0.0.1:0 or picked free; waiting is bounded polling or awaiting a line a
//! process prints, never a sleep. PostgreSQL (127.0.0.1:5432) and `haproxy` are required: a test
//! fails, saying so, when either is missing. The tests take turns ([`SERIAL`]): each runs up to
//! three debug servers, and heartbeats must not starve on a 2-core machine.
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::agent::{echo_server, hash_service, hash_through, pattern};
use common::peers::{within, within_for};
use common::pg::TestDatabase;
use common::process::{
    bin, call, cli_json, device_account, wait_online, DeviceAccount, Proc, ServerCmd, DEADLINE,
};
use iotunnel::agent::client::{self, ClientArgs, RunningClient};
use iotunnel::config::Secret;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The admin key every node gets through `IOTUNNEL_ADMIN_KEY`.
const ADMIN_KEY: &str = "itk_fleet-test-admin-key-0123456789";
/// Heartbeats four times as often as the default (1000 ms), and death after 2 s instead of 5 s,
/// so that a node's loss is acted on well within `node_loss`'s 10 s; still 8 missed beats, so
/// a busy machine does not bury a live node.
const HEARTBEAT_MS: &str = "250";
const DEAD_AFTER_MS: &str = "2000";
/// How long a lost node's tunnels may take to carry new connections again (the figure).
const RECOVERY: Duration = Duration::from_secs(10);
const HAPROXY_CFG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fleet/haproxy.cfg");

/// One fleet test at a time (each holds it for its whole run).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A loopback address that was free a moment ago.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The port of `wss://HOST:PORT/...` or `HOST:PORT`.
fn port_of(url: &str) -> u16 {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap();
    host_port.rsplit(':').next().unwrap().parse().unwrap()
}

/// `url` with its host and port replaced by `host_port`, the path kept.
fn via(url: &str, host_port: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    format!("{scheme}://{host_port}{path}")
}

/// Nodes on one database, and HAProxy in front of them once started.
struct Fleet {
    /// HAProxy, once started.
    lb: Option<Proc>,
    nodes: Vec<Option<Proc>>,
    cmds: Vec<ServerCmd>,
    _db: TestDatabase,
    _tmp: tempfile::TempDir,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Fleet {
    /// `n` nodes' commands (none started), each with `extra` flags.
    async fn new(n: usize, extra: &[(&str, &str)]) -> Self {
        let turn = SERIAL.lock().await;
        let db = TestDatabase::create().await;
        let tmp = tempfile::tempdir().unwrap();
        let cmds = (1..=n)
            .map(|i| {
                let mut cmd = ServerCmd::new(&tmp.path().join(format!("node{i}")))
                    .without("--public-relay-url")
                    .env("IOTUNNEL_ADMIN_KEY", ADMIN_KEY)
                    .arg("--database-url", &db.url)
                    .arg("--mesh-addr", "127.0.0.1:0")
                    .arg("--heartbeat-interval-ms", HEARTBEAT_MS)
                    .arg("--node-dead-after-ms", DEAD_AFTER_MS)
                    .arg("--shards", "1");
                for (flag, value) in extra {
                    cmd = cmd.arg(flag, value);
                }
                cmd
            })
            .collect();
        Self {
            lb: None,
            nodes: (0..n).map(|_| None).collect(),
            cmds,
            _db: db,
            _tmp: tmp,
            _turn: turn,
        }
    }

    /// `n` nodes, all started.
    async fn started(n: usize, extra: &[(&str, &str)]) -> Self {
        let mut f = Self::new(n, extra).await;
        for i in 0..n {
            f.start(i).await;
        }
        f
    }

    async fn start(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} already runs");
        let started = self.cmds[i]
            .start()
            .await
            .labelled(format!("node{}", i + 1));
        self.nodes[i] = Some(started);
    }

    /// Fixes node `i`'s API and relay on free ports, so HAProxy can name them before it starts.
    fn reserve(&mut self, i: usize) {
        let cmd = self.cmds[i].clone();
        self.cmds[i] = cmd
            .arg("--api-addr", free_addr())
            .arg("--relay-addr", free_addr());
    }

    fn node(&self, i: usize) -> &Proc {
        self.nodes[i].as_ref().expect("the node runs")
    }

    fn api(&self, i: usize) -> &str {
        &self.node(i).api_base
    }

    /// The fleet's CA, which every node's `tls/ca.pem` holds.
    fn ca(&self) -> PathBuf {
        self.cmds[0].data_dir.join("tls/ca.pem")
    }

    /// The running node whose relay `client_url` names: the tunnel's owner.
    fn owner(&self, client_url: &str) -> usize {
        let port = port_of(client_url);
        (0..self.nodes.len())
            .find(|&i| {
                self.nodes[i]
                    .as_ref()
                    .is_some_and(|p| port_of(&p.relay_addr) == port)
            })
            .unwrap_or_else(|| panic!("{client_url} names no running node's relay"))
    }

    /// Node `i`'s (API, relay) HOST:PORT: running, or reserved for a later start.
    fn addrs(&self, i: usize) -> (String, String) {
        match &self.nodes[i] {
            Some(p) => (p.api_base.replace("http://", ""), p.relay_addr.clone()),
            None => {
                let get = |flag| self.cmds[i].value_of(flag).expect("reserved").to_string();
                (get("--api-addr"), get("--relay-addr"))
            }
        }
    }

    /// Starts HAProxy in front of the three nodes; waits until its API address answers.
    /// Returns its relay `HOST:PORT` and its API's `http://HOST:PORT`.
    async fn start_lb(&mut self) -> (String, String) {
        let version = std::process::Command::new("haproxy").arg("-v").output();
        assert!(
            version.is_ok_and(|o| o.status.success()),
            "haproxy is missing: these tests need it (apt-get install -y haproxy)"
        );
        let (relay, api) = (free_addr(), free_addr());
        let mut cmd = tokio::process::Command::new("haproxy");
        cmd.args(["-f", HAPROXY_CFG, "-db"])
            .env("IOTUNNEL_LB_RELAY", &relay)
            .env("IOTUNNEL_LB_API", &api)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for i in 0..3 {
            let (node_api, node_relay) = self.addrs(i);
            cmd.env(format!("IOTUNNEL_NODE{}_API", i + 1), node_api)
                .env(format!("IOTUNNEL_NODE{}_RELAY", i + 1), node_relay);
        }
        let mut proc = Proc::spawn(cmd).labelled("haproxy");
        let url = format!("http://{api}/healthz");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = proc.child.try_wait() {
                proc.drain().await;
                panic!("haproxy exited ({status}):\n{}", proc.output());
            }
            let ok = reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "haproxy never served {url}:\n{}",
                proc.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.lb = Some(proc);
        (relay, format!("http://{api}"))
    }

    /// Waits until HAProxy has taken node `i` (not started yet) out of both backends, so that
    /// it sends nothing there.
    async fn lb_marks_down(&self, i: usize) {
        let lb = self.lb.as_ref().expect("HAProxy runs");
        for backend in ["relays", "apis"] {
            let server = format!("Server {backend}/node{} is DOWN", i + 1);
            lb.wait_line(DEADLINE, &server, |l| l.contains(&server))
                .await;
        }
    }

    /// Polls `GET /v1/nodes` on node `on` until `ok` holds for its list (bounded).
    async fn nodes_until(
        &self,
        on: usize,
        what: &str,
        ok: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let mut last = Value::Null;
        let started = Instant::now();
        while started.elapsed() < DEADLINE {
            let (s, v) = call(self.api(on), Method::GET, "/v1/nodes", ADMIN_KEY, None).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
            if ok(&nodes) {
                return nodes;
            }
            last = v;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("node {on}: /v1/nodes never showed {what}: {last}");
    }
}

fn live(nodes: &[Value]) -> Vec<&Value> {
    nodes.iter().filter(|n| n["state"] == "live").collect()
}

/// The node in `nodes` with this node id.
fn by_id<'a>(nodes: &'a [Value], id: &str) -> Option<&'a Value> {
    nodes.iter().find(|n| n["node_id"] == id)
}

/// The real `iotunnel device` agent with its channel on `api`, serving `services`.
fn agent(api: &str, d: &DeviceAccount, services: &[(&str, SocketAddr)], ca: &Path) -> Proc {
    let mut c = bin();
    c.arg("device")
        .args(["--api", api, "--product-key", &d.product_key])
        .args(["--device-name", &d.device, "--ca-file"])
        .arg(ca)
        .env("IOTUNNEL_DEVICE_SECRET", &d.secret);
    for (name, addr) in services {
        c.arg("--service").arg(format!("{name}={addr}"));
    }
    Proc::spawn(c).labelled("the device agent")
}

/// Waits (bounded) until the agent says `tunnel_id` is connected to the relay at `relay`.
async fn agent_connected(agent: &Proc, tunnel_id: &str, relays: &[&str]) -> String {
    agent
        .wait_line(
            DEADLINE,
            &format!("connecting {tunnel_id} to {relays:?}"),
            |l| {
                l.contains("tunnel connected to the relay")
                    && l.contains(tunnel_id)
                    && relays.iter().any(|r| l.contains(&format!("relay={r}")))
            },
        )
        .await
}

/// The real `iotunnel client` for `url`, listening for each of `services` on 127.0.0.1:0;
/// returns it and each service's address.
async fn client_proc(
    url: &str,
    token: &str,
    ca: &Path,
    services: &[&str],
) -> (Proc, Vec<SocketAddr>) {
    let mut c = bin();
    c.args(["client", "--url", url, "--ca-file"])
        .arg(ca)
        .env("IOTUNNEL_TOKEN", token);
    for s in services {
        c.arg("--listen").arg(format!("{s}=127.0.0.1:0"));
    }
    let p = Proc::spawn(c).labelled("the client");
    let mut addrs = Vec::new();
    for s in services {
        let line = p
            .wait_line(DEADLINE, &format!("listening for {s}"), |l| {
                l.contains("listening") && l.contains(&format!("service={s} "))
            })
            .await;
        let addr = line.split("address=").nth(1).expect("an address=");
        addrs.push(addr.split_whitespace().next().unwrap().parse().unwrap());
    }
    (p, addrs)
}

/// `iotunnel client` in this process, for `url`, listening on 127.0.0.1:0.
async fn client_in_process(url: &str, token: &str, ca: &Path) -> RunningClient {
    let args = ClientArgs {
        url: url.to_string(),
        token: Secret(token.to_string()),
        listen: vec!["127.0.0.1:0".into()],
        stdio: None,
        ca_file: Some(ca.to_path_buf()),
    };
    within("the client starts", client::start(args))
        .await
        .expect("the client connects")
}

/// Creates a tunnel on `api`; returns the 201 body.
async fn create(api: &str, d: &DeviceAccount, services: &[&str]) -> Value {
    let body = json!({"product_key": d.product_key, "device_name": d.device, "services": services});
    let (s, v) = call(api, Method::POST, "/v1/tunnels", &d.key, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// Polls describe on `api` until both sides of `id` are CONNECTED (bounded).
async fn wait_both_connected(api: &str, d: &DeviceAccount, id: &str) -> Value {
    let mut last = Value::Null;
    let started = Instant::now();
    while started.elapsed() < DEADLINE {
        let (st, v) = call(api, Method::GET, &format!("/v1/tunnels/{id}"), &d.key, None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        if v["device"]["state"] == "CONNECTED" && v["client"]["state"] == "CONNECTED" {
            return v;
        }
        last = v;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("tunnel {id} never had both sides CONNECTED: {last}");
}

/// A new connection through `addr` echoes `len` bytes intact before `by`.
async fn fresh_echo(addr: SocketAddr, len: usize, seed: u8, by: tokio::time::Instant) -> bool {
    let attempt = async {
        let mut c = TcpStream::connect(addr).await.ok()?;
        let data = pattern(len, seed);
        let (mut r, mut w) = c.split();
        let mut got = vec![0u8; len];
        let (sent, read) = tokio::join!(w.write_all(&data), r.read_exact(&mut got));
        sent.ok()?;
        read.ok()?;
        Some(got == data)
    };
    let limit = by.min(tokio::time::Instant::now() + Duration::from_secs(2));
    matches!(
        tokio::time::timeout_at(limit, attempt).await,
        Ok(Some(true))
    )
}

/// Polls every address until a new connection through it echoes, all before `by`; panics
/// naming the ones that never did.
async fn all_echo_by(addrs: &[SocketAddr], by: tokio::time::Instant, what: &str) {
    let each = addrs.iter().enumerate().map(|(i, &addr)| async move {
        loop {
            if fresh_echo(addr, 4096, i as u8, by).await {
                return None;
            }
            if tokio::time::Instant::now() >= by {
                return Some(i);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let failed: Vec<usize> = futures_util::future::join_all(each)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: tunnels #{failed:?} carried no new connection in time"
    );
}

/// The OPEN tunnels' ids through `GET /v1/tunnels?state=OPEN` on `api`, sorted.
async fn open_ids(api: &str, d: &DeviceAccount) -> Vec<String> {
    let path = "/v1/tunnels?state=OPEN&page_size=100";
    let (st, v) = call(api, Method::GET, path, &d.key, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let mut ids: Vec<String> = v["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| s(t, "tunnel_id").to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_api() {
    let mut f = Fleet::started(3, &[]).await;
    let (lb_relay, _) = f.start_lb().await;
    for on in 0..3 {
        f.nodes_until(on, "3 live nodes", |n| live(n).len() == 3)
            .await;
    }
    let listed = cli_json(f.api(2), ADMIN_KEY, &["node", "list"]).await;
    let nodes = listed["nodes"]
        .as_array()
        .expect("node list --json prints the nodes");
    assert_eq!(live(nodes).len(), 3, "{listed}");
    let mut ids: Vec<&str> = nodes.iter().map(|n| s(n, "node_id")).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three node ids: {listed}");
    for i in 0..3 {
        let relay = &f.node(i).relay_addr;
        assert!(
            nodes
                .iter()
                .any(|n| s(n, "relay_url").contains(relay.as_str())),
            "no node lists relay {relay}: {listed}"
        );
    }

    // Account, product and device on node 1; the agent's channel on node 2.
    let d = device_account(f.api(0), ADMIN_KEY).await;
    let services = [("HASH", hash_service().await), ("SSH", echo_server().await)];
    let agent = agent(f.api(1), &d, &services, &f.ca());
    wait_online(f.api(0), &d).await;

    // The tunnel is created on node 1; the client dials HAProxy.
    let t = create(f.api(0), &d, &["HASH", "SSH"]).await;
    let id = s(&t, "tunnel_id");
    let url = via(s(&t, "client_url"), &lb_relay);
    let (mut client, addrs) =
        client_proc(&url, s(&t, "client_token"), &f.ca(), &["HASH", "SSH"]).await;
    let mut hashed = TcpStream::connect(addrs[0]).await.unwrap();
    within_for(
        Duration::from_secs(60),
        "8 MiB each way",
        hash_through(&mut hashed, 8 << 20),
    )
    .await;
    let mut held = TcpStream::connect(addrs[1]).await.unwrap();
    held.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    within("an echo on the held connection", held.read_exact(&mut pong))
        .await
        .unwrap();
    assert_eq!(&pong, b"ping");
    wait_both_connected(f.api(2), &d, id).await;

    // Closed on node 3: the client's connection and the agent's side both end.
    let started = Instant::now();
    let (st, v) = call(
        f.api(2),
        Method::POST,
        &format!("/v1/tunnels/{id}/close"),
        &d.key,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let mut buf = [0u8; 64];
    let end = within(
        "the held connection ends after the close",
        held.read(&mut buf),
    )
    .await;
    assert!(
        matches!(end, Ok(0) | Err(_)),
        "data after the close: {end:?}"
    );
    let dropped = started.elapsed();
    agent
        .wait_line(DEADLINE, "closing the tunnel", |l| {
            l.contains(id) && l.contains("tunnel closed")
        })
        .await;
    let status = client.exit_within(DEADLINE, "of the tunnel's close").await;
    assert!(!status.success(), "the client exits non-zero on a close");
    assert!(
        client.stderr().contains("tunnel is closed"),
        "{}",
        client.stderr()
    );
    eprintln!("close on node 3 ended the client's connection after {dropped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_pairing() {
    const TOTAL: u64 = 64 << 20;
    let f = Fleet::started(2, &[]).await;
    f.nodes_until(0, "2 live nodes", |n| live(n).len() == 2)
        .await;
    let d = device_account(f.api(0), ADMIN_KEY).await;
    let agent = agent(f.api(0), &d, &[("HASH", hash_service().await)], &f.ca());
    wait_online(f.api(0), &d).await;

    // The device dials its owner's relay; the client the other node's, so the mesh carries it.
    let t = create(f.api(0), &d, &["HASH"]).await;
    let (id, owner) = (s(&t, "tunnel_id"), f.owner(s(&t, "client_url")));
    let other = 1 - owner;
    agent_connected(&agent, id, &[&f.node(owner).relay_addr]).await;
    let url = via(s(&t, "client_url"), &f.node(other).relay_addr);
    let (_client, addrs) = client_proc(&url, s(&t, "client_token"), &f.ca(), &["HASH"]).await;
    let mut conn = TcpStream::connect(addrs[0]).await.unwrap();
    let started = Instant::now();
    within_for(
        Duration::from_secs(180),
        "64 MiB each way across two relays",
        hash_through(&mut conn, TOTAL),
    )
    .await;
    eprintln!(
        "64 MiB each way, device on node {} and client on node {}, in {:.1} s",
        owner + 1,
        other + 1,
        started.elapsed().as_secs_f64()
    );
    wait_both_connected(f.api(other), &d, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss() {
    const TUNNELS: usize = 20;
    // Node 1 alone owns every tunnel: the others join after the creates.
    let mut f = Fleet::new(3, &[("--max-open-tunnels-per-device", "50")]).await;
    f.start(0).await;
    f.reserve(1);
    f.reserve(2);
    let (lb_relay, lb_api) = f.start_lb().await;
    f.lb_marks_down(1).await;
    f.lb_marks_down(2).await;
    let d = device_account(f.api(0), ADMIN_KEY).await;
    let agent = agent(&lb_api, &d, &[("SSH", echo_server().await)], &f.ca());
    wait_online(f.api(0), &d).await;

    let mut ids = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..TUNNELS {
        let t = create(f.api(0), &d, &["SSH"]).await;
        assert_eq!(f.owner(s(&t, "client_url")), 0);
        ids.push(s(&t, "tunnel_id").to_string());
        let url = via(s(&t, "client_url"), &lb_relay);
        clients.push(client_in_process(&url, s(&t, "client_token"), &f.ca()).await);
    }
    let addrs: Vec<SocketAddr> = clients.iter().map(|c| c.listening[0].1).collect();
    let soon = tokio::time::Instant::now() + DEADLINE;
    all_echo_by(&addrs, soon, "before the loss").await;
    f.start(1).await;
    f.start(2).await;
    f.nodes_until(1, "3 live nodes, node 1 owning every tunnel", |n| {
        live(n).len() == 3 && n.iter().any(|n| n["open_tunnels"] == TUNNELS)
    })
    .await;
    // Traffic is flowing on every tunnel when the owner dies.
    let pumps: Vec<_> = addrs
        .iter()
        .enumerate()
        .map(|(i, &addr)| {
            tokio::spawn(async move {
                let far = tokio::time::Instant::now() + Duration::from_secs(3600);
                let mut rounds = 0u64;
                while fresh_echo(addr, 16 * 1024, i as u8, far).await {
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    all_echo_by(
        &addrs,
        tokio::time::Instant::now() + DEADLINE,
        "with the pumps running",
    )
    .await;

    let node_id = std::fs::read_to_string(f.cmds[0].data_dir.join("node.id")).expect("node.id");
    let node_id = node_id.trim().to_string();
    let lost_at = Instant::now();
    f.nodes[0].as_mut().unwrap().kill9().await;
    let _killed = f.nodes[0].take();

    // Within 10 s every tunnel carries a new connection end to end.
    all_echo_by(
        &addrs,
        tokio::time::Instant::now() + RECOVERY,
        "after kill -9 of their owner",
    )
    .await;
    eprintln!(
        "all {TUNNELS} tunnels carried new connections {:?} after the kill",
        lost_at.elapsed()
    );
    for p in pumps {
        p.abort();
    }
    ids.sort();
    assert_eq!(
        open_ids(f.api(1), &d).await,
        ids,
        "every tunnel is still OPEN"
    );
    let survivors = [f.node(1).relay_addr.as_str(), f.node(2).relay_addr.as_str()];
    for id in &ids {
        agent_connected(&agent, id, &survivors).await;
    }
    f.nodes_until(1, "node 1 dead and its tunnels on the survivors", |n| {
        let sum: u64 = live(n)
            .iter()
            .map(|n| n["open_tunnels"].as_u64().unwrap_or(0))
            .sum();
        by_id(n, &node_id).is_some_and(|n| n["state"] == "dead") && sum == TUNNELS as u64
    })
    .await;

    // Restarted on its data dir, the node rejoins under the same id.
    f.start(0).await;
    f.nodes_until(1, "node 1 live again under its id", |n| {
        by_id(n, &node_id).is_some_and(|n| n["state"] == "live") && live(n).len() == 3
    })
    .await;
    let again = std::fs::read_to_string(f.cmds[0].data_dir.join("node.id")).unwrap();
    assert_eq!(again.trim(), node_id);
    all_echo_by(
        &addrs,
        tokio::time::Instant::now() + DEADLINE,
        "after the restart",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_respect_the_device_limit() {
    const CREATES: usize = 30;
    let f = Fleet::started(3, &[("--max-open-tunnels-per-device", "3")]).await;
    f.nodes_until(0, "3 live nodes", |n| live(n).len() == 3)
        .await;
    let d = device_account(f.api(0), ADMIN_KEY).await;
    let _agent = agent(f.api(0), &d, &[("SSH", echo_server().await)], &f.ca());
    for i in 0..3 {
        wait_online(f.api(i), &d).await;
    }
    let body = json!({"product_key": d.product_key, "device_name": d.device});
    let creates = (0..CREATES).map(|i| {
        let (api, body, key) = (f.api(i % 3).to_string(), body.clone(), d.key.clone());
        async move { call(&api, Method::POST, "/v1/tunnels", &key, Some(body)).await }
    });
    let answers = futures_util::future::join_all(creates).await;
    let created = answers
        .iter()
        .filter(|(st, _)| *st == StatusCode::CREATED)
        .count();
    assert_eq!(created, 3, "exactly the limit is created: {answers:?}");
    for (st, v) in answers.iter().filter(|(st, _)| *st != StatusCode::CREATED) {
        assert_eq!(*st, StatusCode::TOO_MANY_REQUESTS, "{v}");
        assert_eq!(v["error"]["code"], "tunnel_limit", "{v}");
    }
    for i in 0..3 {
        assert_eq!(open_ids(f.api(i), &d).await.len(), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains() {
    const TUNNELS: usize = 6;
    let mut f = Fleet::started(3, &[]).await;
    let (lb_relay, lb_api) = f.start_lb().await;
    f.nodes_until(0, "3 live nodes", |n| live(n).len() == 3)
        .await;
    let d = device_account(f.api(0), ADMIN_KEY).await;
    let agent = agent(&lb_api, &d, &[("SSH", echo_server().await)], &f.ca());
    wait_online(f.api(0), &d).await;

    let (mut owned, mut clients) = (vec![Vec::new(); 3], Vec::new());
    for i in 0..TUNNELS {
        let t = create(f.api(i % 3), &d, &["SSH"]).await;
        owned[f.owner(s(&t, "client_url"))].push(s(&t, "tunnel_id").to_string());
        let url = via(s(&t, "client_url"), &lb_relay);
        clients.push(client_in_process(&url, s(&t, "client_token"), &f.ca()).await);
    }
    let addrs: Vec<SocketAddr> = clients.iter().map(|c| c.listening[0].1).collect();
    all_echo_by(
        &addrs,
        tokio::time::Instant::now() + DEADLINE,
        "before the drain",
    )
    .await;

    let victim = (0..3).max_by_key(|&i| owned[i].len()).unwrap();
    assert!(!owned[victim].is_empty(), "{owned:?}");
    let survivor = (victim + 1) % 3;
    let victim_id = std::fs::read_to_string(f.cmds[victim].data_dir.join("node.id")).unwrap();
    let victim_id = victim_id.trim().to_string();
    f.nodes[victim].as_mut().unwrap().stop().await;
    let _drained = f.nodes[victim].take();

    // Its tunnels now belong to the survivors: counted there, dialed there by the agent.
    f.nodes_until(
        survivor,
        "the drained node's tunnels on the survivors",
        |n| {
            let sum: u64 = n
                .iter()
                .filter(|n| n["node_id"] != victim_id.as_str() && n["state"] == "live")
                .map(|n| n["open_tunnels"].as_u64().unwrap_or(0))
                .sum();
            let gone = by_id(n, &victim_id).is_none_or(|v| {
                v["draining"] == true || v["state"] == "dead" || v["open_tunnels"] == 0
            });
            gone && sum == TUNNELS as u64
        },
    )
    .await;
    let survivors: Vec<&str> = (0..3)
        .filter(|&i| i != victim)
        .map(|i| f.node(i).relay_addr.as_str())
        .collect();
    for id in &owned[victim] {
        agent_connected(&agent, id, &survivors).await;
        let v = wait_both_connected(f.api(survivor), &d, id).await;
        assert_eq!(v["state"], "OPEN", "{v}");
    }
    assert_eq!(open_ids(f.api(survivor), &d).await.len(), TUNNELS);
    // Clients through HAProxy reconnect and carry data.
    all_echo_by(
        &addrs,
        tokio::time::Instant::now() + DEADLINE,
        "after the drain",
    )
    .await;
}
