//! The device channel: authentication, online status, replacement, replay and liveness.
mod common;

use common::*;
use iotunnel::clock::Clock;
use reqwest::StatusCode;
use serde_json::json;

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
async fn the_agent_retries_until_the_server_answers() {
    use iotunnel::agent::device::{run, AgentArgs};
    use iotunnel::config::Secret;
    let t = TestServer::start().await;
    let (key, pk, _secret) = setup(&t).await;
    // A wrong secret is refused (401) again and again; the agent keeps trying and never exits.
    let args = AgentArgs {
        api_url: t.base.clone(),
        product_key: Some(pk.clone()),
        device_name: Some("dev-1".into()),
        device_secret: Some(Secret("wrong".into())),
    };
    let agent = tokio::spawn(run(args));
    let r = tokio::time::timeout(std::time::Duration::from_millis(1500), async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            if agent.is_finished() {
                break;
            }
        }
    })
    .await;
    assert!(r.is_err(), "the agent must not exit on a refused channel");
    t.wait_online(&key, &pk, "dev-1", false).await;
}
