//! Fleet mode in process: two or three servers (nodes) on one fresh PostgreSQL database, each
//! with its own data dir and manual clock. What one node does must reach the others through the
//! store's bus: device presence and notifications, close, rotate and delete, the owner's relay in
//! URLs, one leader, and re-placement of a dead node's tunnels. The real processes, HAProxy and
//! traffic are in `tests/fleet.rs`.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::pg::TestDatabase;
use common::*;
use iotunnel::clock::{Clock, ManualClock};
use iotunnel::config::Secret;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// `n` nodes of one fleet on one manual clock, heartbeating every 20 ms; a node is dead after
/// 200 ms of the clock without a heartbeat, so a test kills one by stopping it and advancing
/// the clock.
async fn fleet(db: &TestDatabase, n: usize) -> Vec<TestServer> {
    let clock = ManualClock::new(iotunnel::clock::SystemClock.now_ms());
    let mut nodes = Vec::new();
    for i in 0..n {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let url = db.url.clone();
        nodes.push(
            TestServer::start_dialable_at(dir, None, clock.clone(), move |s| {
                s.database_url = Some(Secret(url));
                s.node_id = Some(format!("node-{i}"));
                s.mesh_addr = Some("127.0.0.1:0".parse().unwrap());
                s.public_mesh_addr = Some("127.0.0.1:0".into());
                s.heartbeat_interval_ms = 20;
                s.node_dead_after_ms = 200;
            })
            .await,
        );
    }
    // Every node has seen every other (heartbeats are 20 ms apart).
    for node in &nodes {
        wait_for(|| async { live_nodes(node).await == n }).await;
    }
    nodes
}

async fn live_nodes(t: &TestServer) -> usize {
    let (s, v) = t.get("/v1/nodes", ADMIN_KEY).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "live")
        .count()
}

fn node_of(t: &TestServer) -> String {
    t.server().control.fleet.node_id.clone()
}

fn relay_port(t: &TestServer) -> u16 {
    t.server().relay_addr.port()
}

/// The next notification that is not a replayed `connect` of an earlier tunnel.
async fn next_about(ch: &mut DeviceChannel, tunnel_id: &str) -> Value {
    loop {
        let v = ch.next_json().await;
        if v["tunnel_id"] == tunnel_id {
            return v;
        }
    }
}

/// An account, product and device `dev-1` made through `api`, with its channel on `channel`
/// (online on `api` too): (API key, product key, channel).
async fn device_on(api: &TestServer, channel: &TestServer) -> (String, String, DeviceChannel) {
    let key = api.account("acme").await;
    let product_key = api.product(&key).await;
    let secret = api.device(&key, &product_key, "dev-1").await;
    let ch = DeviceChannel::connect(channel, &product_key, "dev-1", &secret)
        .await
        .unwrap();
    api.wait_online(&key, &product_key, "dev-1", true).await;
    (key, product_key, ch)
}

/// The port of a create's `client_endpoint` (its owner's relay).
fn endpoint_port(created: &Value) -> u16 {
    let endpoint = created["client_endpoint"].as_str().unwrap();
    endpoint.rsplit_once(':').unwrap().1.parse().unwrap()
}

async fn create(t: &TestServer, key: &str, product_key: &str) -> Value {
    let body = json!({ "product_key": product_key, "device_name": "dev-1" });
    let (s, v) = t.post("/v1/tunnels", key, body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v
}

/// The next notification, or the close code when the server ends the channel.
async fn next_or_close(ch: &mut DeviceChannel) -> Result<Value, Option<u16>> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ch.ws.next())
            .await
            .expect("a message within 10 s");
        match msg {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(c))) => return Err(c.map(|c| c.code.into())),
            Some(Ok(_)) => continue,
            _ => return Err(None),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_the_whole_api_and_reaches_the_device() {
    let db = TestDatabase::create().await;
    let nodes = fleet(&db, 3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    // One admin key and one account for the whole fleet.
    let key = a.account("acme").await;
    let product_key = b.product(&key).await;
    let secret = c.device(&key, &product_key, "dev-1").await;

    // A newer channel replaces the older one, on the same node and across nodes (the bus).
    let mut old = DeviceChannel::connect(b, &product_key, "dev-1", &secret)
        .await
        .unwrap();
    let ch = DeviceChannel::connect(c, &product_key, "dev-1", &secret)
        .await
        .unwrap();
    assert_eq!(old.closed_code().await, Some(4000));
    let mut old = ch;
    let mut ch = DeviceChannel::connect(b, &product_key, "dev-1", &secret)
        .await
        .unwrap();
    assert_eq!(old.closed_code().await, Some(4000));
    // The channel is on B; the device is online on every node.
    for n in [a, b, c] {
        n.wait_online(&key, &product_key, "dev-1", true).await;
    }

    // Creates on A spread over the idle nodes, one each; every URL and notification names the
    // owner's relay.
    let ports: Vec<u16> = nodes.iter().map(relay_port).collect();
    let mut owners = std::collections::BTreeSet::new();
    let mut created = Vec::new();
    for _ in 0..3 {
        let v = create(a, &key, &product_key).await;
        let id = v["tunnel_id"].as_str().unwrap().to_string();
        let port = endpoint_port(&v);
        assert!(ports.contains(&port), "{v}");
        let endpoint = v["client_endpoint"].as_str().unwrap();
        assert!(v["client_url"].as_str().unwrap().contains(endpoint), "{v}");
        owners.insert(port);
        let note = next_about(&mut ch, &id).await;
        assert_eq!(note["operation"], "connect");
        assert_eq!(note["endpoint"], v["client_endpoint"], "{note}");
        created.push(id);
    }
    assert_eq!(owners.len(), 3, "{owners:?}");

    // A connect too large for a NOTIFY (4 KiB of custom info, escaped twice on the bus) still
    // reaches the channel on another node.
    let custom_info = "\"".repeat(4096);
    let body = json!({ "product_key": product_key, "device_name": "dev-1",
        "custom_info": custom_info });
    let (s, v) = a.post("/v1/tunnels", &key, body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let note = next_about(&mut ch, v["tunnel_id"].as_str().unwrap()).await;
    assert_eq!(note["operation"], "connect");
    assert_eq!(note["custom_info"], custom_info.as_str());

    // Describe and close from C; the device hears the close on B; every node's index forgets
    // the tunnel's tokens.
    let id = &created[0];
    let (s, v) = c.get(&format!("/v1/tunnels/{id}"), &key).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "OPEN");
    let (s, v) = c
        .post(&format!("/v1/tunnels/{id}/close"), &key, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let note = next_about(&mut ch, id).await;
    assert_eq!(note["operation"], "close");
    for n in &nodes {
        let indexed = || async {
            n.server()
                .control
                .index
                .open_ids()
                .iter()
                .any(|i| **i == **id)
        };
        wait_for(|| async { !indexed().await }).await;
    }
    let (s, _) = a.delete(&format!("/v1/tunnels/{id}"), &key).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = b.get(&format!("/v1/tunnels/{id}"), &key).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Rotate on C: the device hears its new token on B.
    let id = &created[1];
    let (s, v) = c
        .post(
            &format!("/v1/tunnels/{id}/rotate"),
            &key,
            json!({"side": "device"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let note = next_about(&mut ch, id).await;
    assert_eq!(note["operation"], "connect");
    assert_eq!(note["token"], v["device_token"], "{note} {v}");

    // Deleting the device on A closes its tunnels and ends its channel on B (4001).
    let (s, _) = a
        .delete(&format!("/v1/products/{product_key}/devices/dev-1"), &key)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    loop {
        match next_or_close(&mut ch).await {
            Ok(v) => assert_eq!(v["operation"], "close", "{v}"),
            Err(code) => {
                assert_eq!(code, Some(4001));
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_a_dead_nodes_tunnels_move_to_live_nodes() {
    let db = TestDatabase::create().await;
    let mut nodes = fleet(&db, 2).await;
    let leaders = || {
        nodes
            .iter()
            .filter(|n| n.server().control.fleet.is_leader())
            .count()
    };
    wait_for(|| async { leaders() == 1 }).await;

    let (key, product_key, mut ch) = device_on(&nodes[0], &nodes[1]).await;
    // Four tunnels: two on each node.
    let mut on = std::collections::BTreeMap::<u16, Vec<String>>::new();
    for _ in 0..4 {
        let v = create(&nodes[0], &key, &product_key).await;
        let port = endpoint_port(&v);
        on.entry(port)
            .or_default()
            .push(v["tunnel_id"].as_str().unwrap().into());
    }
    assert_eq!(on.values().map(Vec::len).collect::<Vec<_>>(), [2, 2]);

    // Node 0 dies (stops without draining: its relay and heartbeats just end).
    let dead = nodes.remove(0);
    let dead_port = relay_port(&dead);
    let dead_id = node_of(&dead);
    let survivor = &nodes[0];
    drop_without_drain(dead).await;
    // The survivor's next heartbeats carry the new time; the dead node's last one is stale.
    survivor.clock.advance_ms(1_000);
    wait_for(|| async { live_nodes(survivor).await == 1 }).await;
    wait_for(|| async { survivor.server().control.fleet.is_leader() }).await;

    // Its tunnels are re-placed on the survivor, the device is told the new relay, and all
    // four stay OPEN.
    let new_endpoint = format!("localhost:{}", relay_port(survivor));
    // Each of the dead node's tunnels gets a `connect` naming the survivor's relay (after the
    // `connect`s of the creates, still queued).
    let moved: std::collections::BTreeSet<String> = on[&dead_port].iter().cloned().collect();
    let mut told: std::collections::BTreeSet<String> = Default::default();
    while !told.is_superset(&moved) {
        let note = ch.next_json().await;
        assert_eq!(note["operation"], "connect", "{note}");
        if note["endpoint"] == new_endpoint.as_str() {
            told.insert(note["tunnel_id"].as_str().unwrap().into());
        }
    }
    let (s, v) = survivor.get("/v1/tunnels?state=OPEN", &key).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["tunnels"].as_array().unwrap().len(), 4, "{v}");
    let (_, v) = survivor.get("/v1/nodes", ADMIN_KEY).await;
    let dead_row = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == dead_id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(dead_row["state"], "dead", "{v}");
    // Its row no longer claims the tunnels that moved.
    wait_for(|| async {
        let (_, v) = survivor.get("/v1/nodes", ADMIN_KEY).await;
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node_id"] == dead_id.as_str() && n["open_tunnels"] == 0)
    })
    .await;
    assert_eq!(survivor.server().control.index.owned_here(), 4);
    // Its metrics count what it owns now, and the fleet as it sees it.
    let metrics = reqwest::get(format!("http://{}/metrics", survivor.server().metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "iotunnel_tunnels{state=\"open\"} 4",
        "iotunnel_fleet_nodes{state=\"live\"} 1",
        "iotunnel_fleet_nodes{state=\"dead\"} 1",
        "iotunnel_fleet_leader 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
}

/// Ends a node as a crash would for the fleet: no drain, no goodbye.
async fn drop_without_drain(mut t: TestServer) {
    let server = t.server.take().unwrap();
    server.abandon().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_hands_its_tunnels_over_before_it_exits() {
    let db = TestDatabase::create().await;
    let mut nodes = fleet(&db, 2).await;
    let (key, product_key, mut ch) = device_on(&nodes[0], &nodes[1]).await;
    let leaving_endpoint = format!("localhost:{}", relay_port(&nodes[0]));
    let mut moved = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let v = create(&nodes[0], &key, &product_key).await;
        if v["client_endpoint"] == leaving_endpoint.as_str() {
            moved.insert(v["tunnel_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(moved.len(), 2);
    let mut leaving = nodes.remove(0);
    let survivor = &nodes[0];
    // SIGTERM's path: drain, then stop. No clock moves: nothing waits for a death.
    leaving.stop().await;
    assert_eq!(survivor.server().control.index.owned_here(), 4);
    let (_, v) = survivor.get("/v1/tunnels?state=OPEN", &key).await;
    assert_eq!(v["tunnels"].as_array().unwrap().len(), 4, "{v}");
    // The device hears the survivor's relay for each moved tunnel.
    let new_endpoint = format!("localhost:{}", relay_port(survivor));
    let mut told = std::collections::BTreeSet::new();
    while !told.is_superset(&moved) {
        let note = ch.next_json().await;
        let id = note["tunnel_id"].as_str().unwrap().to_string();
        if note["endpoint"] == new_endpoint.as_str() && moved.contains(&id) {
            told.insert(id);
        }
    }
}

/// A tunnel's peers may reach any node: both are forwarded to the owner over the mesh (TLS with
/// the fleet CA from the database and each node's own mesh certificate, then the preamble) and
/// pair there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_on_another_node_pair_on_the_owner_over_the_mesh() {
    use common::peers::{data, open_tunnel, stream_start, Aws, AwsPeer, Mode, Relay};
    use iotunnel::proto::aws::MessageType;
    let db = TestDatabase::create().await;
    let nodes = fleet(&db, 2).await;
    let mut f = nodes[0].online_device().await;
    let tunnel = open_tunnel(&nodes[0], &mut f, &["SSH"]).await;
    let authority = tunnel.device_url.split('/').nth(2).unwrap();
    let owner_port: u16 = authority.rsplit_once(':').unwrap().1.parse().unwrap();
    let other = nodes.iter().find(|n| relay_port(n) != owner_port).unwrap();
    let relay = Relay::of(other);
    let mut device =
        AwsPeer::connect(&relay, Mode::Destination, Aws::V3, &tunnel.device_token).await;
    let mut client = AwsPeer::connect(&relay, Mode::Source, Aws::V3, &tunnel.client_token).await;
    client.send(&stream_start(1, "SSH", 1)).await;
    assert_eq!(
        device.next_message().await.r#type,
        MessageType::StreamStart as i32
    );
    client.send(&data(1, "", 1, b"across the mesh")).await;
    assert_eq!(
        device.next_message().await.payload.as_ref(),
        b"across the mesh"
    );
    device.send(&data(1, "", 1, b"and back")).await;
    assert_eq!(client.next_message().await.payload.as_ref(), b"and back");
    // Both were forwarded (the other node does not pair them itself).
    let url = format!("http://{}/metrics", other.server().metrics_addr);
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    assert!(
        text.lines()
            .any(|l| l == "iotunnel_mesh_forwards_total{result=\"ok\"} 2"),
        "{text}"
    );
}
