//! MQTT notifications and presence against the real Mosquitto on 127.0.0.1:1883 (start it with
//! `mosquitto -d -c /etc/mosquitto/mosquitto.conf`; these tests fail, never skip, without it).
//! Every server has its own random product keys, so tests running side by side on one broker
//! never see each other's topics.
mod common;
use common::agent::{echo_server, echo_through};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::peers::{within, within_for};
use common::{DeviceChannel, TestServer};
use iotunnel::agent::client::{self, ClientArgs};
use iotunnel::agent::device::{
    self, AgentArgs, AgentConfig, AgentOptions, MqttAgentArgs, RelayArgs,
};
use iotunnel::config::{MqttSettings, MqttUrl, Secret, DEFAULT_MQTT_THING_TEMPLATE};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const BROKER: &str = "127.0.0.1:1883";

/// Fails the test with a clear message when Mosquitto is not running.
async fn require_broker() {
    match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(BROKER)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!(
            "Mosquitto is not reachable on {BROKER} ({e}); these tests need it: start it with \
             `mosquitto -d -c /etc/mosquitto/mosquitto.conf`"
        ),
        Err(_) => panic!("Mosquitto on {BROKER} does not answer; these tests need it"),
    }
}

/// A server on 127.0.0.1:0 publishing to the local broker, with tunnel URLs naming its relay.
async fn server() -> TestServer {
    server_in(Arc::new(tempfile::tempdir().unwrap())).await
}

/// [`server`] on a given data dir (a restart).
async fn server_in(dir: Arc<tempfile::TempDir>) -> TestServer {
    require_broker().await;
    server_with_broker(dir, 1883).await
}

/// A server whose broker is 127.0.0.1:`port`.
async fn server_with_broker(dir: Arc<tempfile::TempDir>, port: u16) -> TestServer {
    TestServer::start_dialable(dir, None, |settings| {
        settings.mqtt = Some(MqttSettings {
            url: MqttUrl {
                host: "127.0.0.1".into(),
                port,
                tls: false,
            },
            username: None,
            password: None,
            ca_file: None,
            thing_template: DEFAULT_MQTT_THING_TEMPLATE.into(),
        });
    })
    .await
}

/// A test's own MQTT client: what it receives on its subscriptions, and publishes that wait
/// for the broker's PUBACK.
struct Peer {
    client: AsyncClient,
    publishes: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    acks: mpsc::UnboundedReceiver<()>,
    task: JoinHandle<()>,
}

impl Peer {
    /// Connects (with a last will, if given) and subscribes to `topics`, waiting for the SUBACKs.
    async fn connect(topics: &[String], will: Option<LastWill>) -> Self {
        require_broker().await;
        let id = format!("iotunnel-test-{}", hex::encode(rand::random::<[u8; 6]>()));
        let mut o = MqttOptions::new(id, "127.0.0.1", 1883);
        o.set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(64 * 1024, 64 * 1024);
        if let Some(w) = will {
            o.set_last_will(w);
        }
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let (pub_tx, publishes) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let (conn_tx, mut connected) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = conn_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = pub_tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(Event::Incoming(Packet::SubAck(_) | Packet::PubAck(_))) => {
                        let _ = ack_tx.send(());
                    }
                    Ok(_) => {}
                    Err(e) => panic!("test MQTT client failed: {e}"),
                }
            }
        });
        within("the test MQTT client connects", connected.recv()).await;
        let mut peer = Self {
            client,
            publishes,
            acks,
            task,
        };
        for t in topics {
            peer.client.subscribe(t, QoS::AtLeastOnce).await.unwrap();
            peer.acked().await;
        }
        peer
    }

    async fn acked(&mut self) {
        within("the broker acknowledges", self.acks.recv())
            .await
            .expect("client running");
    }

    /// Publishes a retained QoS 1 message and waits for the broker to take it.
    async fn retain(&mut self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.as_bytes().to_vec())
            .await
            .unwrap();
        self.acked().await;
    }

    /// The next message: topic and JSON payload.
    async fn next(&mut self) -> (String, Value) {
        let (topic, payload) = within("an MQTT notification", self.publishes.recv())
            .await
            .expect("client running");
        let v = serde_json::from_slice(&payload)
            .unwrap_or_else(|e| panic!("payload on {topic} is not JSON ({e})"));
        (topic, v)
    }

    /// The next `n` messages by topic (each topic at most once).
    async fn next_by_topic(&mut self, n: usize) -> std::collections::HashMap<String, Value> {
        let mut got = std::collections::HashMap::new();
        for _ in 0..n {
            let (topic, v) = self.next().await;
            assert!(
                got.insert(topic.clone(), v).is_none(),
                "two messages on {topic}"
            );
        }
        got
    }

    /// Drops the connection without DISCONNECT, so the broker publishes the last will.
    fn vanish(self) {
        self.task.abort();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn presence(pk: &str, dn: &str) -> String {
    format!("iotunnel/{pk}/{dn}/presence")
}

fn native(pk: &str, dn: &str) -> String {
    format!("iotunnel/{pk}/{dn}/notify")
}

fn aws(pk: &str, dn: &str) -> String {
    format!("$aws/things/{pk}_{dn}/tunnels/notify")
}

fn alibaba(pk: &str, dn: &str) -> String {
    format!("/sys/{pk}/{dn}/secure_tunnel/notify")
}

/// Clears a retained presence message (the broker keeps them across runs).
async fn clear_presence(pk: &str, dn: &str) {
    let mut p = Peer::connect(&[], None).await;
    p.retain(&presence(pk, dn), "").await;
}

async fn setup(t: &TestServer) -> (String, String) {
    let key = t.account("acme").await;
    let pk = t.product(&key).await;
    t.device(&key, &pk, "dev-1").await;
    (key, pk)
}

async fn create(t: &TestServer, key: &str, pk: &str, extra: Value) -> (StatusCode, Value) {
    let mut body = json!({ "product_key": pk, "device_name": "dev-1" });
    if let Value::Object(m) = extra {
        for (k, v) in m {
            body[k] = v;
        }
    }
    t.post("/v1/tunnels", key, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_close_publish_both_vendor_formats_and_the_native_one() {
    let t = server().await;
    let key = t.account("acme").await;
    let pk = t.product(&key).await;
    let secret = t.device(&key, &pk, "dev-1").await;
    let mut channel = DeviceChannel::connect(&t, &pk, "dev-1", &secret)
        .await
        .unwrap();
    t.wait_online(&key, &pk, "dev-1", true).await;
    let mut watch = Peer::connect(
        &[
            aws(&pk, "dev-1"),
            alibaba(&pk, "dev-1"),
            native(&pk, "dev-1"),
        ],
        None,
    )
    .await;

    let (s, created) = create(
        &t,
        &key,
        &pk,
        json!({ "services": ["SSH", "HTTP"], "custom_info": "rack 7" }),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let id = created["tunnel_id"].as_str().unwrap();
    // The device channel still gets its notification; MQTT carries the same events.
    let on_channel = channel.next_json().await;
    let device_token = on_channel["token"].as_str().unwrap();
    let expires_at = chrono::DateTime::parse_from_rfc3339(created["expires_at"].as_str().unwrap())
        .unwrap()
        .timestamp();

    let got = watch.next_by_topic(3).await;
    let a = &got[&aws(&pk, "dev-1")];
    assert_eq!(a["clientAccessToken"], device_token, "the DEVICE token");
    assert_ne!(a["clientAccessToken"], created["client_token"]);
    assert_eq!(a["clientMode"], "destination");
    assert_eq!(a["services"], json!(["SSH", "HTTP"]));
    assert!(a["region"].is_string(), "{a}");

    let relay_port = t.server().relay_addr.port();
    let ali = &got[&alibaba(&pk, "dev-1")];
    assert_eq!(ali["operation"], "connect");
    assert_eq!(ali["tunnel_id"], id);
    assert_eq!(ali["host"], "localhost");
    assert_eq!(ali["port"], relay_port.to_string(), "the port is a string");
    assert_eq!(ali["path"], format!("/tunnel/{id}/device"));
    assert_eq!(ali["token"], device_token);
    assert_eq!(ali["token_expire"], expires_at);
    assert_eq!(ali["udi"], "rack 7");

    assert_eq!(
        got[&native(&pk, "dev-1")],
        on_channel,
        "native = device channel JSON"
    );

    // Rotating the device token notifies again, with the new token.
    let (s, rotated) = t
        .post(
            &format!("/v1/tunnels/{id}/rotate"),
            &key,
            json!({ "side": "device" }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{rotated}");
    let got = watch.next_by_topic(3).await;
    assert_eq!(
        got[&aws(&pk, "dev-1")]["clientAccessToken"],
        rotated["device_token"]
    );
    assert_eq!(
        got[&alibaba(&pk, "dev-1")]["token"],
        rotated["device_token"]
    );
    assert_eq!(got[&native(&pk, "dev-1")]["token"], rotated["device_token"]);
    channel.next_json().await;

    // Close: Alibaba and native; AWS has no close notification.
    let (s, v) = t
        .post(&format!("/v1/tunnels/{id}/close"), &key, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let got = watch.next_by_topic(2).await;
    let ali = &got[&alibaba(&pk, "dev-1")];
    assert_eq!(
        (&ali["operation"], &ali["tunnel_id"], &ali["close_reason"]),
        (&json!("close"), &json!(id), &json!("closed"))
    );
    let n = &got[&native(&pk, "dev-1")];
    assert_eq!(
        (&n["operation"], &n["reason"]),
        (&json!("close"), &json!("closed"))
    );
    assert_eq!(*n, channel.next_json().await);

    // Deleting the device closes its other tunnels with reason device_deleted, over MQTT too.
    let (_, second) = create(&t, &key, &pk, json!({})).await;
    watch.next_by_topic(3).await;
    let (s, _) = t
        .delete(&format!("/v1/products/{pk}/devices/dev-1"), &key)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let got = watch.next_by_topic(2).await;
    let ali = &got[&alibaba(&pk, "dev-1")];
    assert_eq!(ali["tunnel_id"], second["tunnel_id"]);
    assert_eq!(ali["close_reason"], "device_deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_mqtt_makes_a_device_online_and_its_will_makes_it_offline() {
    let t = server().await;
    let (key, pk) = setup(&t).await;
    let (s, v) = create(&t, &key, &pk, json!({})).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("device_offline"))
    );

    let mut watch = Peer::connect(&[native(&pk, "dev-1")], None).await;
    // A device announces itself with a retained `online`, leaving `offline` as its will.
    let will = LastWill::new(presence(&pk, "dev-1"), "offline", QoS::AtLeastOnce, true);
    let mut device = Peer::connect(&[], Some(will)).await;
    device.retain(&presence(&pk, "dev-1"), "online").await;
    t.wait_online(&key, &pk, "dev-1", true).await;
    let (s, created) = create(&t, &key, &pk, json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let (topic, n) = watch.next().await;
    assert_eq!(topic, native(&pk, "dev-1"));
    assert_eq!(
        (&n["operation"], &n["tunnel_id"]),
        (&json!("connect"), &created["tunnel_id"])
    );

    // `offline` makes it offline; creates are refused again.
    device.retain(&presence(&pk, "dev-1"), "offline").await;
    t.wait_online(&key, &pk, "dev-1", false).await;
    let (s, _) = create(&t, &key, &pk, json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT);

    // Back online: the server replays a `connect` for the OPEN tunnel.
    device.retain(&presence(&pk, "dev-1"), "online").await;
    t.wait_online(&key, &pk, "dev-1", true).await;
    let (_, replayed) = watch.next().await;
    assert_eq!(replayed, n, "replay of the OPEN tunnel");

    // The device vanishes without DISCONNECT: the broker publishes its will.
    device.vanish();
    t.wait_online(&key, &pk, "dev-1", false).await;

    // A restarted server learns presence from the retained message, and replays.
    let mut device = Peer::connect(&[], None).await;
    device.retain(&presence(&pk, "dev-1"), "online").await;
    t.wait_online(&key, &pk, "dev-1", true).await;
    let (_, replayed) = watch.next().await;
    assert_eq!(replayed, n);
    let mut t = t;
    let dir = t.dir.clone();
    t.stop().await;
    let t = server_in(dir).await;
    t.wait_online(&key, &pk, "dev-1", true).await;
    let (_, replayed) = watch.next().await;
    // The restarted relay listens on a new port; the tunnel and its token are the same.
    assert_eq!(
        (&replayed["tunnel_id"], &replayed["token"]),
        (&n["tunnel_id"], &n["token"]),
        "replay after a server restart"
    );

    // An empty retained message clears the presence: offline.
    clear_presence(&pk, "dev-1").await;
    t.wait_online(&key, &pk, "dev-1", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_in_the_presence_gate_tunnel_create() {
    let t = server().await;
    let (key, pk) = setup(&t).await;
    let mut device = Peer::connect(&[], None).await;
    let online = r#"{"state": "online", "services": ["HTTP"]}"#;
    device.retain(&presence(&pk, "dev-1"), online).await;
    // Online and its services are learnt from the same message.
    t.wait_online(&key, &pk, "dev-1", true).await;
    let (s, v) = create(&t, &key, &pk, json!({})).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("unknown_service")),
        "the default SSH is not served: {v}"
    );
    let (s, v) = create(&t, &key, &pk, json!({ "services": ["HTTP"] })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    // A plain `online` (an older agent) leaves the services unknown: any is allowed.
    device.retain(&presence(&pk, "dev-1"), "online").await;
    let mut allowed = false;
    for _ in 0..500 {
        let (s, v) = create(&t, &key, &pk, json!({ "services": ["SSH"] })).await;
        if s == StatusCode::CREATED {
            allowed = true;
            break;
        }
        assert_eq!(v["error"]["code"], "unknown_service", "{v}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(allowed, "a plain online presence must allow any service");
    clear_presence(&pk, "dev-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_never_blocks_the_api() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let t = server_with_broker(Arc::new(tempfile::tempdir().unwrap()), port).await;
    let key = t.account("acme").await;
    let pk = t.product(&key).await;
    let secret = t.device(&key, &pk, "dev-1").await;
    let (s, _) = create(&t, &key, &pk, json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "unknown presence: offline");
    // Devices on the channel are served as before; the notifications for MQTT wait in a queue.
    let mut channel = DeviceChannel::connect(&t, &pk, "dev-1", &secret)
        .await
        .unwrap();
    let (s, v) = within("create", create(&t, &key, &pk, json!({}))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(channel.next_json().await["tunnel_id"], v["tunnel_id"]);
    let id = v["tunnel_id"].as_str().unwrap();
    let (s, _) = within(
        "close",
        t.post(&format!("/v1/tunnels/{id}/close"), &key, json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(!t.server().control.mqtt.as_ref().unwrap().is_connected());
}

async fn wait_device_side(t: &TestServer, key: &str, id: &str, state: &str) {
    let mut last = Value::Null;
    for _ in 0..1000 {
        let (_, v) = t.get(&format!("/v1/tunnels/{id}"), key).await;
        if v["device"]["state"] == state {
            return;
        }
        last = v;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("device side never became {state}: {last}");
}

fn agent_config(t: &TestServer, pk: &str, echo: SocketAddr) -> AgentConfig {
    AgentConfig {
        options: AgentOptions {
            channel: AgentArgs {
                // Unused in MQTT mode: nothing listens there.
                api_url: "http://127.0.0.1:9".into(),
                product_key: Some(pk.to_string()),
                device_name: Some("dev-1".into()),
                device_secret: None,
            },
            relay: RelayArgs {
                services: vec![("ECHO".into(), echo.to_string())],
                ca_file: Some(t.dir.path().join("tls/ca.pem")),
                config: None,
            },
        },
        mqtt: MqttAgentArgs {
            mqtt_url: Some(format!("mqtt://{BROKER}")),
            ..MqttAgentArgs::default()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_in_mqtt_mode_serves_tunnels_end_to_end() {
    let t = server().await;
    let (key, pk) = setup(&t).await;
    let echo = echo_server().await;
    let agent = tokio::spawn(device::run(agent_config(&t, &pk, echo)));
    // Online through its retained presence alone: no device channel, no secret.
    t.wait_online(&key, &pk, "dev-1", true).await;
    assert!(!t.server().control.channels.is_online(&pk, "dev-1"));

    let (s, v) = create(&t, &key, &pk, json!({ "services": ["ECHO"] })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["tunnel_id"].as_str().unwrap().to_string();
    let c = within(
        "the client starts",
        client::start(ClientArgs {
            url: v["client_url"].as_str().unwrap().into(),
            token: Secret(v["client_token"].as_str().unwrap().into()),
            listen: vec!["ECHO=127.0.0.1:0".into()],
            stdio: None,
            ca_file: Some(t.dir.path().join("tls/ca.pem")),
        }),
    )
    .await
    .expect("the client connects");
    let addr = c.listening[0].1;
    let mut conn = within("connect", TcpStream::connect(addr)).await.unwrap();
    echo_through(&mut conn, 300_000, 1).await;
    drop(conn);

    // The agent dies without a goodbye: its will takes the device offline. A new agent comes
    // back online, is sent the OPEN tunnel again, and carries new connections.
    agent.abort();
    let _ = agent.await;
    t.wait_online(&key, &pk, "dev-1", false).await;
    let agent = tokio::spawn(device::run(agent_config(&t, &pk, echo)));
    t.wait_online(&key, &pk, "dev-1", true).await;
    wait_device_side(&t, &key, &id, "CONNECTED").await;
    let mut conn = within("connect", TcpStream::connect(addr)).await.unwrap();
    echo_through(&mut conn, 100_000, 2).await;

    // Close over MQTT: the client ends, the agent stays up.
    let (s, v) = t
        .post(&format!("/v1/tunnels/{id}/close"), &key, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ended = within_for(Duration::from_secs(20), "the client exits", c.wait()).await;
    assert!(
        ended.is_err(),
        "a closed tunnel ends the client with an error"
    );
    wait_device_side(&t, &key, &id, "DISCONNECTED").await;
    assert!(!agent.is_finished(), "the agent keeps running");

    // Deleting the device ends its agent, as the device channel's close 4001 does, and clears
    // its retained presence: a new device of the same name starts offline.
    let (s, v) = t
        .delete(&format!("/v1/products/{pk}/devices/dev-1"), &key)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let ended = within_for(Duration::from_secs(20), "the agent exits", agent)
        .await
        .unwrap();
    let err = ended.expect_err("a deleted device ends the agent with an error");
    assert!(err.to_string().contains("device deleted"), "{err:#}");
    t.device(&key, &pk, "dev-1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, v) = t.get(&format!("/v1/products/{pk}/devices"), &key).await;
    assert_eq!(v["devices"][0]["online"], false, "{v}");
    clear_presence(&pk, "dev-1").await;
}
