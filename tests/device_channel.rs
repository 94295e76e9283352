//! The device channel: authentication, online status, replacement, replay and liveness.
mod common;

use common::*;
use futures_util::SinkExt;
use iotunnel::clock::Clock;
use reqwest::StatusCode;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

async fn setup(t: &TestServer) -> (String, String, String) {
    let key = t.account("a").await;
    let pk = t.product(&key).await;
    let secret = t.device(&key, &pk, "dev-1").await;
    (key, pk, secret)
}

#[tokio::test]
async fn refuses_bad_signature_stale_timestamp_and_unknown_device() {
    let t = TestServer::start().await;
    let (key, pk, secret) = setup(&t).await;
    let now = t.clock.now_ms() / 1000;

    let wrong = sign("not-the-secret", &pk, "dev-1", now);
    let (s, v) = DeviceChannel::connect_raw(&t, &pk, "dev-1", &now.to_string(), &wrong)
        .await
        .err()
        .unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("invalid_signature"))
    );

    let (s, _) = DeviceChannel::connect_raw(&t, &pk, "dev-1", &now.to_string(), "zz-not-hex")
        .await
        .err()
        .unwrap();
    assert_eq!(s, 401);

    for skew in [301, -301] {
        let ts = now - skew;
        let (s, v) = DeviceChannel::connect_raw(
            &t,
            &pk,
            "dev-1",
            &ts.to_string(),
            &sign(&secret, &pk, "dev-1", ts),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (401, Some("stale_timestamp")),
            "skew {skew}"
        );
    }
    let ts = now - 299;
    assert!(DeviceChannel::connect_raw(
        &t,
        &pk,
        "dev-1",
        &ts.to_string(),
        &sign(&secret, &pk, "dev-1", ts)
    )
    .await
    .is_ok());

    let (s, v) = DeviceChannel::connect_raw(
        &t,
        &pk,
        "ghost",
        &now.to_string(),
        &sign(&secret, &pk, "ghost", now),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("invalid_signature"))
    );

    let (s, v) = DeviceChannel::connect_raw(&t, &pk, "dev-1", "yesterday", "00")
        .await
        .err()
        .unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("invalid_timestamp"))
    );

    // A plain GET with valid headers is not an upgrade.
    let r = t
        .http
        .get(format!("{}/v1/device/connect", t.base))
        .header("x-iotunnel-product-key", &pk)
        .header("x-iotunnel-device-name", "dev-1")
        .header("x-iotunnel-timestamp", now.to_string())
        .header("x-iotunnel-signature", sign(&secret, &pk, "dev-1", now))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UPGRADE_REQUIRED);
    let _ = key;
}

#[tokio::test]
async fn online_while_connected_and_newer_channel_replaces_older() {
    let t = TestServer::start().await;
    let (key, pk, secret) = setup(&t).await;
    let mut first = DeviceChannel::connect(&t, &pk, "dev-1", &secret)
        .await
        .unwrap();
    t.wait_online(&key, &pk, "dev-1", true).await;

    let mut second = DeviceChannel::connect(&t, &pk, "dev-1", &secret)
        .await
        .unwrap();
    assert_eq!(
        first.closed_code().await,
        Some(4000),
        "the older channel is told it was replaced"
    );
    t.wait_online(&key, &pk, "dev-1", true).await;

    // Notifications go to the newer channel.
    let v = t
        .post(
            "/v1/tunnels",
            &key,
            json!({"product_key": pk, "device_name": "dev-1"}),
        )
        .await
        .1;
    let n = second.next_json().await;
    assert_eq!(n["tunnel_id"], v["tunnel_id"]);

    second.close().await;
    t.wait_online(&key, &pk, "dev-1", false).await;
    let (s, v) = t
        .post(
            "/v1/tunnels",
            &key,
            json!({"product_key": pk, "device_name": "dev-1"}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("device_offline"))
    );
}

#[tokio::test]
async fn reconnect_replays_every_open_tunnel_with_a_working_token() {
    let t = TestServer::start().await;
    let (key, pk, secret) = setup(&t).await;
    let mut ch = DeviceChannel::connect(&t, &pk, "dev-1", &secret)
        .await
        .unwrap();
    let mut ids = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..3 {
        let body =
            json!({"product_key": pk, "device_name": "dev-1", "custom_info": format!("info-{i}")});
        ids.push(
            t.post("/v1/tunnels", &key, body).await.1["tunnel_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        tokens.push(ch.next_json().await["token"].as_str().unwrap().to_string());
    }
    t.post(&format!("/v1/tunnels/{}/close", ids[1]), &key, json!({}))
        .await;
    assert_eq!(ch.next_json().await["operation"], "close");
    ch.close().await;
    t.wait_online(&key, &pk, "dev-1", false).await;

    let mut ch = DeviceChannel::connect(&t, &pk, "dev-1", &secret)
        .await
        .unwrap();
    let a = ch.next_json().await;
    let b = ch.next_json().await;
    assert_eq!(
        (a["operation"].as_str(), a["tunnel_id"].as_str()),
        (Some("connect"), Some(ids[0].as_str()))
    );
    assert_eq!(a["custom_info"], "info-0");
    assert_eq!(b["tunnel_id"], ids[2].as_str());
    // The replayed token is the same one, and still opens the tunnel in the index.
    assert_eq!(a["token"], tokens[0].as_str());
    let m = t
        .server()
        .control
        .index
        .lookup(&iotunnel::token::hash_secret(&tokens[2]))
        .unwrap();
    assert_eq!(&*m.tunnel.tunnel_id, ids[2].as_str());
}

#[tokio::test]
async fn dead_channels_are_dropped_after_missed_pings() {
    let t = TestServer::start_with(|s| s.device_ping_interval_ms = 50).await;
    let (key, pk, secret) = setup(&t).await;
    // Connected but never read: tungstenite answers pings only while reading, so it looks dead.
    let _silent = DeviceChannel::connect(&t, &pk, "dev-1", &secret)
        .await
        .unwrap();
    t.wait_online(&key, &pk, "dev-1", true).await;
    t.wait_online(&key, &pk, "dev-1", false).await;
}

#[tokio::test]
async fn a_reading_channel_survives_pings() {
    let t = TestServer::start_with(|s| s.device_ping_interval_ms = 20).await;
    let (key, pk, secret) = setup(&t).await;
    let mut ch = DeviceChannel::connect(&t, &pk, "dev-1", &secret)
        .await
        .unwrap();
    // Read through many ping intervals; the channel answers and stays up.
    let reader = tokio::spawn(async move {
        let n = ch.next_json().await;
        (ch, n)
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (s, v) = t
        .post(
            "/v1/tunnels",
            &key,
            json!({"product_key": pk, "device_name": "dev-1"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, n) = reader.await.unwrap();
    assert_eq!(n["tunnel_id"], v["tunnel_id"]);
}

#[tokio::test]
async fn deleting_the_device_closes_its_tunnels_and_channel() {
    let t = TestServer::start().await;
    let (key, pk, secret) = setup(&t).await;
    let mut ch = DeviceChannel::connect(&t, &pk, "dev-1", &secret)
        .await
        .unwrap();
    let id = t
        .post(
            "/v1/tunnels",
            &key,
            json!({"product_key": pk, "device_name": "dev-1"}),
        )
        .await
        .1["tunnel_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(ch.next_json().await["operation"], "connect");
    let (s, _) = t
        .delete(&format!("/v1/products/{pk}/devices/dev-1"), &key)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let n = ch.next_json().await;
    assert_eq!(
        n,
        json!({"operation": "close", "tunnel_id": id, "reason": "device_deleted"})
    );
    assert_eq!(ch.closed_code().await, Some(4001));
    let (_, d) = t.get(&format!("/v1/tunnels/{id}"), &key).await;
    assert_eq!(
        (d["state"].as_str(), d["close_reason"].as_str()),
        (Some("CLOSED"), Some("device_deleted"))
    );
    assert!(t.server().control.index.is_empty());
    let ts = t.clock.now_ms() / 1000;
    let r = DeviceChannel::connect_raw(
        &t,
        &pk,
        "dev-1",
        &ts.to_string(),
        &sign(&secret, &pk, "dev-1", ts),
    )
    .await;
    assert_eq!(r.err().unwrap().0, 401, "a deleted device cannot reconnect");
}

#[tokio::test]
async fn the_agent_keeps_the_channel_up_and_stops_when_its_device_is_deleted() {
    use iotunnel::agent::device::{run, AgentArgs};
    use iotunnel::config::Secret;
    let t = TestServer::start().await;
    let (key, pk, secret) = setup(&t).await;
    let args = AgentArgs {
        api_url: t.base.clone(),
        product_key: Some(pk.clone()),
        device_name: Some("dev-1".into()),
        device_secret: Some(Secret(secret)),
    };
    let agent = tokio::spawn(run(args));
    t.wait_online(&key, &pk, "dev-1", true).await;
    // Deleting the device closes its channel with 4001; the agent stops instead of retrying.
    t.delete(&format!("/v1/products/{pk}/devices/dev-1"), &key)
        .await;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), agent)
        .await
        .unwrap()
        .unwrap();
    assert!(ended.unwrap_err().to_string().contains("device deleted"));
}

#[tokio::test]
async fn the_agent_exits_on_a_wrong_secret_with_one_clear_line() {
    use iotunnel::agent::device::{run, AgentArgs};
    use iotunnel::config::Secret;
    let t = TestServer::start().await;
    let (key, pk, _secret) = setup(&t).await;
    // Authentication does not heal by retrying: the first 401 ends the agent.
    let args = AgentArgs {
        api_url: t.base.clone(),
        product_key: Some(pk.clone()),
        device_name: Some("dev-1".into()),
        device_secret: Some(Secret("wrong".into())),
    };
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), run(args))
        .await
        .expect("the agent gives up on a refused secret");
    let e = format!("{:#}", ended.unwrap_err());
    assert!(
        e.contains("HTTP 401") && e.contains("invalid_signature") && e.contains("device secret"),
        "{e}"
    );
    assert!(!e.contains('\n'), "one line: {e}");
    t.wait_online(&key, &pk, "dev-1", false).await;
}

/// A front for `target` whose first connections fail as an unreachable or restarting server
/// would: the first is answered 503, the second is cut; later ones are carried through.
async fn flaky_front(target: std::net::SocketAddr) -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut down, _)) = listener.accept().await {
            n += 1;
            match n {
                1 => {
                    let _ = down
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                        .await;
                }
                2 => drop(down),
                _ => {
                    tokio::spawn(async move {
                        if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    });
                }
            }
        }
    });
    addr
}

#[tokio::test]
async fn the_agent_retries_network_errors_and_5xx_until_the_server_answers() {
    use iotunnel::agent::device::{run, AgentArgs};
    use iotunnel::config::Secret;
    let t = TestServer::start().await;
    let (key, pk, secret) = setup(&t).await;
    let target = t.base.trim_start_matches("http://").parse().unwrap();
    let front = flaky_front(target).await;
    let args = AgentArgs {
        // No scheme: http:// is meant.
        api_url: front.to_string(),
        product_key: Some(pk.clone()),
        device_name: Some("dev-1".into()),
        device_secret: Some(Secret(secret)),
    };
    let agent = tokio::spawn(run(args));
    t.wait_online(&key, &pk, "dev-1", true).await;
    assert!(!agent.is_finished());
    agent.abort();
}

#[tokio::test]
async fn reported_services_gate_tunnel_create_and_unreported_ones_allow_any() {
    let t = TestServer::start().await;
    let mut f = t.online_device().await;
    let body = |services: &[&str]| json!({ "product_key": f.product_key, "device_name": "dev-1", "services": services });
    // No report yet (an agent of an older version): any service may be tunnelled.
    let (s, v) = t.post("/v1/tunnels", &f.key, body(&["RDP"])).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(f.channel.next_json().await["operation"], "connect");

    // Messages the server does not know are ignored, and the channel stays up.
    for text in [r#"{"operation":"telemetry","x":1}"#, "not json", "{}"] {
        f.channel
            .ws
            .send(Message::Text(text.to_string().into()))
            .await
            .unwrap();
    }
    let report = r#"{"operation":"services","services":["SSH","HTTP"]}"#;
    f.channel
        .ws
        .send(Message::Text(report.to_string().into()))
        .await
        .unwrap();
    // The report is read after the send returns: until then a create may still pass.
    let mut refused = None;
    for _ in 0..500 {
        let (s, v) = t.post("/v1/tunnels", &f.key, body(&["SSH", "RDP"])).await;
        if s == StatusCode::CONFLICT {
            refused = Some(v);
            break;
        }
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let id = v["tunnel_id"].as_str().unwrap();
        t.post(&format!("/v1/tunnels/{id}/close"), &f.key, json!({}))
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let v = refused.expect("a service the agent did not report is refused");
    assert_eq!(v["error"]["code"], "unknown_service", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"RDP\"") && msg.contains("SSH, HTTP") && msg.contains("--service RDP="),
        "{msg}"
    );
    let (s, v) = t.post("/v1/tunnels", &f.key, body(&["HTTP", "SSH"])).await;
    assert_eq!(s, StatusCode::CREATED, "reported services pass: {v}");

    // A newer channel that has not reported replaces the old one: unknown again.
    let _newer = DeviceChannel::connect(&t, &f.product_key, "dev-1", &f.secret)
        .await
        .unwrap();
    let (s, v) = t.post("/v1/tunnels", &f.key, body(&["RDP"])).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}
