//! Lifecycle with controlled time, and what survives a restart.
mod common;

use common::*;
use iotunnel::control::lifecycle::sweep_once;
use reqwest::StatusCode;
use serde_json::json;

const DAY_MS: i64 = 86_400_000;

#[tokio::test]
async fn tunnels_close_at_expiry_and_are_deleted_after_retention() {
    let t = TestServer::start_with(|s| s.max_open_tunnels_per_device = 100).await;
    let mut f = t.online_device().await;
    let short = t.tunnel(&f, json!({"lifetime_seconds": 60})).await["tunnel_id"]
        .as_str()
        .unwrap()
        .to_string();
    let long = t.tunnel(&f, json!({})).await["tunnel_id"]
        .as_str()
        .unwrap()
        .to_string();
    f.channel.next_json().await;
    f.channel.next_json().await;
    let cp = &t.server().control;

    t.clock.advance_ms(59_999);
    assert!(sweep_once(cp).await.unwrap().expired.is_empty());
    t.clock.advance_ms(1);
    assert_eq!(sweep_once(cp).await.unwrap().expired, vec![short.clone()]);
    let (_, d) = t.get(&format!("/v1/tunnels/{short}"), &f.key).await;
    assert_eq!(
        (d["state"].as_str(), d["close_reason"].as_str()),
        (Some("CLOSED"), Some("expired"))
    );
    assert_eq!(
        f.channel.next_json().await,
        json!({"operation": "close", "tunnel_id": short, "reason": "expired"})
    );

    // The default lifetime is 24 h.
    t.clock.advance_ms(DAY_MS - 60_000);
    assert_eq!(sweep_once(cp).await.unwrap().expired, vec![long.clone()]);
    assert!(cp.index.is_empty());

    // Deleted 30 days after creation, not before.
    t.clock.advance_ms(29 * DAY_MS - 1);
    assert!(sweep_once(cp).await.unwrap().purged.is_empty());
    t.clock.advance_ms(1);
    let mut purged = sweep_once(cp).await.unwrap().purged;
    purged.sort();
    let mut both = vec![short.clone(), long.clone()];
    both.sort();
    assert_eq!(purged, both);
    let (s, _) = t.get(&format!("/v1/tunnels/{short}"), &f.key).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn retention_is_configurable() {
    let t = TestServer::start_with(|s| s.retention_days = 2).await;
    let f = t.online_device().await;
    let id = t.tunnel(&f, json!({})).await["tunnel_id"]
        .as_str()
        .unwrap()
        .to_string();
    t.clock.advance_ms(2 * DAY_MS);
    let report = sweep_once(&t.server().control).await.unwrap();
    assert_eq!(report.expired, vec![id.clone()]);
    assert_eq!(report.purged, vec![id]);
}

#[tokio::test]
async fn max_lifetime_is_configurable() {
    let t = TestServer::start_with(|s| s.max_lifetime_seconds = 7 * 86_400).await;
    let f = t.online_device().await;
    let v = t.tunnel(&f, json!({"lifetime_seconds": 7 * 86_400})).await;
    assert_eq!(v["state"], "OPEN");
    let (s, _) = t
        .post("/v1/tunnels", &f.key, json!({"product_key": f.product_key, "device_name": f.device_name, "lifetime_seconds": 7 * 86_400 + 1}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn restart_keeps_tunnels_and_rebuilds_the_index() {
    let mut t = TestServer::start_with(|s| s.max_open_tunnels_per_device = 100).await;
    let mut f = t.online_device().await;
    let open = t.tunnel(&f, json!({"description": "keep me"})).await;
    let open_id = open["tunnel_id"].as_str().unwrap().to_string();
    let client_token = open["client_token"].as_str().unwrap().to_string();
    let device_token = f.channel.next_json().await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let closed = t.tunnel(&f, json!({})).await["tunnel_id"]
        .as_str()
        .unwrap()
        .to_string();
    t.post(&format!("/v1/tunnels/{closed}/close"), &f.key, json!({}))
        .await;
    let (key, pk, secret) = (f.key.clone(), f.product_key.clone(), f.secret.clone());
    f.channel.close().await;
    t.stop().await;

    let t2 = TestServer::start_in(t.dir.clone(), t.clock.clone(), |_| {}).await;
    let (_, d) = t2.get(&format!("/v1/tunnels/{open_id}"), &key).await;
    assert_eq!(
        (d["state"].as_str(), d["description"].as_str()),
        (Some("OPEN"), Some("keep me"))
    );
    let (_, d) = t2.get(&format!("/v1/tunnels/{closed}"), &key).await;
    assert_eq!(d["state"], "CLOSED");
    let index = &t2.server().control.index;
    assert_eq!(index.len(), 1);
    let hash = iotunnel::token::hash_secret;
    assert_eq!(
        &*index.lookup(&hash(&client_token)).unwrap().tunnel.tunnel_id,
        open_id.as_str()
    );
    assert_eq!(
        &*index.lookup(&hash(&device_token)).unwrap().tunnel.tunnel_id,
        open_id.as_str()
    );

    // The device reconnects and is given the same token again.
    let mut ch = DeviceChannel::connect(&t2, &pk, "dev-1", &secret)
        .await
        .unwrap();
    assert_eq!(ch.next_json().await["token"], device_token.as_str());
}

#[tokio::test]
async fn a_second_server_cannot_share_the_data_dir() {
    let t = TestServer::start().await;
    let mut settings = iotunnel::config::Settings::for_tests(t.dir.path().to_path_buf());
    settings.admin_key = Some(iotunnel::config::Secret(ADMIN_KEY.into()));
    let listeners = iotunnel::server::Listeners::bind(&settings).await.unwrap();
    let clock = std::sync::Arc::new(t.clock.clone());
    let err = iotunnel::server::Server::start(settings, clock, listeners)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("in use by another iotunnel server"),
        "{err}"
    );
}
