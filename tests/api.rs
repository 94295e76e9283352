//! The control API against a real server on 127.0.0.1:0: every route and every error.
mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn health_and_readiness() {
    let t = TestServer::start().await;
    assert_eq!(t.get("/healthz", "").await.0, StatusCode::OK);
    assert_eq!(t.get("/readyz", "").await.0, StatusCode::OK);
}

#[tokio::test]
async fn authentication_is_required_and_checked() {
    let t = TestServer::start().await;
    let (s, v) = t.get("/v1/products", "").await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let (s, v) = t.get("/v1/products", "itk_wrong").await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    assert!(v["error"]["request_id"]
        .as_str()
        .unwrap()
        .starts_with("req_"));
}

#[tokio::test]
async fn only_admin_creates_accounts() {
    let t = TestServer::start().await;
    let key = t.account("a").await;
    let (s, v) = t.post("/v1/accounts", &key, json!({"name": "b"})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"));
    let (s, v) = t.post("/v1/accounts", ADMIN_KEY, json!({"name": ""})).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (s, v) = t
        .post("/v1/accounts", ADMIN_KEY, json!({"name": "c"}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(v["account_id"].as_str().unwrap().starts_with("acc_"));
    assert_eq!(v["name"], "c");
}

#[tokio::test]
async fn products_and_devices() {
    let t = TestServer::start().await;
    let key = t.account("a").await;
    let (s, v) = t
        .post("/v1/products", &key, json!({"name": "Cameras"}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let pk = v["product_key"].as_str().unwrap().to_string();
    assert!(v["created_at"].as_str().unwrap().ends_with('Z'));
    let (_, v) = t.get("/v1/products", &key).await;
    assert_eq!(v["products"][0]["product_key"], pk.as_str());

    let devices = format!("/v1/products/{pk}/devices");
    let (s, v) = t.post(&devices, &key, json!({"name": "cam-1"})).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v["device_secret"].as_str().unwrap().len(), 43);
    let (s, v) = t.post(&devices, &key, json!({"name": "cam-1"})).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "already_exists"));
    let (s, v) = t.post(&devices, &key, json!({"name": "bad name!"})).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (s, v) = t
        .post("/v1/products/nope/devices", &key, json!({"name": "x"}))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));

    let (_, v) = t.get(&devices, &key).await;
    assert_eq!(v["devices"][0]["device_name"], "cam-1");
    assert_eq!(v["devices"][0]["online"], false);
    assert!(
        v["devices"][0].get("device_secret").is_none(),
        "secret is shown once"
    );

    let (s, _) = t.delete(&format!("{devices}/cam-1"), &key).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = t.delete(&format!("{devices}/cam-1"), &key).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test]
async fn tunnel_create_describe_close_delete() {
    let t = TestServer::start().await;
    let mut f = t.online_device().await;
    let v = t
        .tunnel(&f, json!({"custom_info": "{\"port\":22}", "description": "debug", "services": ["SSH", "HTTP"], "lifetime_seconds": 600}))
        .await;
    let id = v["tunnel_id"].as_str().unwrap().to_string();
    assert_eq!(v["state"], "OPEN");
    assert_eq!(v["client_token"].as_str().unwrap().len(), 43);
    assert_eq!(
        v["client_url"],
        format!("wss://localhost:8443/tunnel/{id}/source")
    );
    assert_eq!(v["client_endpoint"], "localhost:8443");
    let created = chrono::DateTime::parse_from_rfc3339(v["created_at"].as_str().unwrap()).unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!((expires - created).num_seconds(), 600);

    let n = f.channel.next_json().await;
    assert_eq!(n["operation"], "connect");
    assert_eq!(n["tunnel_id"], id.as_str());
    assert_eq!(n["custom_info"], "{\"port\":22}");
    assert_eq!(n["services"], json!(["SSH", "HTTP"]));
    assert_eq!(n["url"], format!("wss://localhost:8443/tunnel/{id}/device"));
    assert_eq!(n["endpoint"], "localhost:8443");
    assert_ne!(n["token"], v["client_token"]);

    let (s, d) = t.get(&format!("/v1/tunnels/{id}"), &f.key).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(d["description"], "debug");
    assert_eq!(d["custom_info"], "{\"port\":22}");
    assert_eq!(d["device"]["state"], "DISCONNECTED");
    assert_eq!(d["client"]["state"], "DISCONNECTED");
    assert!(d.get("client_token").is_none());

    let (s, v) = t.delete(&format!("/v1/tunnels/{id}"), &f.key).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "tunnel_not_closed"));
    let (s, v) = t
        .post(&format!("/v1/tunnels/{id}/close"), &f.key, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "CLOSED");
    assert_eq!(v["close_reason"], "closed");
    assert!(v["closed_at"].is_string());
    let n = f.channel.next_json().await;
    assert_eq!(
        n,
        json!({"operation": "close", "tunnel_id": id, "reason": "closed"})
    );
    let (s, v) = t
        .post(&format!("/v1/tunnels/{id}/close"), &f.key, json!({}))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "tunnel_not_open"));
    let (s, _) = t.delete(&format!("/v1/tunnels/{id}"), &f.key).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = t.get(&format!("/v1/tunnels/{id}"), &f.key).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test]
async fn create_refuses_offline_and_unknown_devices() {
    let t = TestServer::start().await;
    let key = t.account("a").await;
    let pk = t.product(&key).await;
    t.device(&key, &pk, "sleepy").await;
    let (s, v) = t
        .post(
            "/v1/tunnels",
            &key,
            json!({"product_key": pk, "device_name": "sleepy"}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "device_offline"));
    let (s, v) = t
        .post(
            "/v1/tunnels",
            &key,
            json!({"product_key": pk, "device_name": "ghost"}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    let (_, v) = t.get("/v1/tunnels", &key).await;
    assert_eq!(v["tunnels"], json!([]), "a refused create stores nothing");
}

#[tokio::test]
async fn create_validates_every_limit() {
    let t = TestServer::start().await;
    let f = t.online_device().await;
    let base = json!({"product_key": f.product_key, "device_name": f.device_name});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let bad = [
        with("custom_info", json!("x".repeat(4097))),
        with("description", json!("x".repeat(1025))),
        with("services", json!([])),
        with(
            "services",
            json!((0..11).map(|i| format!("S{i}")).collect::<Vec<_>>()),
        ),
        with("services", json!(["has space"])),
        with("services", json!(["x".repeat(129)])),
        with("services", json!(["SSH", "SSH"])),
        with("lifetime_seconds", json!(59)),
        with("lifetime_seconds", json!(86401)),
    ];
    for body in bad {
        let (s, v) = t.post("/v1/tunnels", &f.key, body.clone()).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{body}"
        );
    }
    for body in [
        with("custom_info", json!("x".repeat(4096))),
        with("description", json!("x".repeat(1024))),
        with(
            "services",
            json!((0..10)
                .map(|i| format!("svc:{i}_a.b-c"))
                .collect::<Vec<_>>()),
        ),
        with("lifetime_seconds", json!(60)),
    ] {
        let (s, v) = t.post("/v1/tunnels", &f.key, body).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let (_, v) = t.get("/v1/tunnels?page_size=1", &f.key).await;
    let id = v["tunnels"][0]["tunnel_id"].as_str().unwrap();
    let (_, d) = t.get(&format!("/v1/tunnels/{id}"), &f.key).await;
    assert_eq!(d["services"], json!(["SSH"]), "services default to SSH");
}

#[tokio::test]
async fn malformed_and_oversized_bodies() {
    let t = TestServer::start().await;
    let key = t.account("a").await;
    let raw = |body: String, ct: &'static str| {
        let req = t
            .http
            .post(format!("{}/v1/products", t.base))
            .bearer_auth(&key)
            .header("content-type", ct);
        async move {
            let r = req.body(body).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, v) = raw("{not json".into(), "application/json").await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_json"));
    let (s, v) = raw(r#"{"name":"p","colour":"red"}"#.into(), "application/json").await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_json"));
    assert!(
        v["error"]["message"].as_str().unwrap().contains("colour"),
        "{v}"
    );
    let (s, v) = raw(
        format!(r#"{{"name":"{}"}}"#, "x".repeat(70_000)),
        "application/json",
    )
    .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    let (s, v) = raw(r#"{"name":"p"}"#.into(), "text/plain").await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let (s, v) = t.get("/v1/tunnels?colour=red", &key).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (s, v) = t.get("/v1/nothing-here", &key).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));
    let (s, v) = t.call(Method::PUT, "/v1/products", &key, None).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
}

#[tokio::test]
async fn per_device_open_tunnel_limit() {
    let t = TestServer::start_with(|s| s.max_open_tunnels_per_device = 3).await;
    let f = t.online_device().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            t.tunnel(&f, json!({})).await["tunnel_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let body = json!({"product_key": f.product_key, "device_name": f.device_name});
    let (s, v) = t.post("/v1/tunnels", &f.key, body.clone()).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::TOO_MANY_REQUESTS, "tunnel_limit")
    );
    t.post(&format!("/v1/tunnels/{}/close", ids[0]), &f.key, json!({}))
        .await;
    let (s, _) = t.post("/v1/tunnels", &f.key, body).await;
    assert_eq!(s, StatusCode::CREATED, "closing one frees a slot");
}

#[tokio::test]
async fn search_filters_and_paginates_newest_first() {
    let t = TestServer::start_with(|s| s.max_open_tunnels_per_device = 100).await;
    let f = t.online_device().await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(
            t.tunnel(&f, json!({})).await["tunnel_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    t.post(&format!("/v1/tunnels/{}/close", ids[1]), &f.key, json!({}))
        .await;

    let mut seen = Vec::new();
    let mut path = "/v1/tunnels?page_size=3".to_string();
    loop {
        let (s, v) = t.get(&path, &f.key).await;
        assert_eq!(s, StatusCode::OK);
        for tn in v["tunnels"].as_array().unwrap() {
            seen.push(tn["tunnel_id"].as_str().unwrap().to_string());
        }
        match v["next_page_token"].as_str() {
            Some(tok) => path = format!("/v1/tunnels?page_size=3&page_token={tok}"),
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    let (_, v) = t.get("/v1/tunnels?state=CLOSED", &f.key).await;
    assert_eq!(v["tunnels"].as_array().unwrap().len(), 1);
    assert_eq!(v["tunnels"][0]["tunnel_id"], ids[1].as_str());
    let (_, v) = t.get("/v1/tunnels?state=open", &f.key).await;
    assert_eq!(v["tunnels"].as_array().unwrap().len(), 6);
    let (_, v) = t
        .get(&format!("/v1/tunnels?tunnel_id={}", ids[3]), &f.key)
        .await;
    assert_eq!(v["tunnels"][0]["tunnel_id"], ids[3].as_str());
    let (_, v) = t
        .get(
            &format!(
                "/v1/tunnels?product_key={}&device_name=dev-1",
                f.product_key
            ),
            &f.key,
        )
        .await;
    assert_eq!(v["tunnels"].as_array().unwrap().len(), 7);
    let (_, v) = t.get("/v1/tunnels?device_name=other", &f.key).await;
    assert_eq!(v["tunnels"], json!([]));

    for bad in [
        "page_size=0",
        "page_size=101",
        "state=HALF",
        "page_token=garbage!",
    ] {
        let (s, v) = t.get(&format!("/v1/tunnels?{bad}"), &f.key).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    let (s, _) = t.get("/v1/tunnels?page_size=100", &f.key).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn batch_close_and_delete_report_per_id_in_order() {
    let t = TestServer::start_with(|s| s.max_open_tunnels_per_device = 100).await;
    let f = t.online_device().await;
    let a = t.tunnel(&f, json!({})).await["tunnel_id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = t.tunnel(&f, json!({})).await["tunnel_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = t
        .post(
            "/v1/tunnels/batch-close",
            &f.key,
            json!({"tunnel_ids": [a, "missing", b, a]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 4);
    assert_eq!(
        (r[0]["tunnel_id"].as_str(), r[0]["ok"].as_bool()),
        (Some(a.as_str()), Some(true))
    );
    assert_eq!(
        (r[1]["ok"].as_bool(), r[1]["error"]["code"].as_str()),
        (Some(false), Some("not_found"))
    );
    assert_eq!(r[2]["ok"], true);
    assert_eq!(r[3]["error"]["code"], "tunnel_not_open");

    let c = t.tunnel(&f, json!({})).await["tunnel_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, v) = t
        .post(
            "/v1/tunnels/batch-delete",
            &f.key,
            json!({"tunnel_ids": [a, c, b]}),
        )
        .await;
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["ok"], true);
    assert_eq!(r[1]["error"]["code"], "tunnel_not_closed");
    assert_eq!(r[2]["ok"], true);

    let too_many: Vec<String> = (0..101).map(|i| format!("t{i}")).collect();
    for route in ["batch-close", "batch-delete"] {
        let (s, v) = t
            .post(
                &format!("/v1/tunnels/{route}"),
                &f.key,
                json!({"tunnel_ids": too_many}),
            )
            .await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_request"));
        let (s, _) = t
            .post(
                &format!("/v1/tunnels/{route}"),
                &f.key,
                json!({"tunnel_ids": []}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn rotate_issues_new_tokens_and_updates_the_index() {
    let t = TestServer::start().await;
    let mut f = t.online_device().await;
    let v = t.tunnel(&f, json!({})).await;
    let id = v["tunnel_id"].as_str().unwrap().to_string();
    let old_client = v["client_token"].as_str().unwrap().to_string();
    let old_device = f.channel.next_json().await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let index = t.server().control.index.clone();
    let hash = iotunnel::token::hash_secret;
    assert!(index.lookup(&hash(&old_client)).is_some());
    assert!(index.lookup(&hash(&old_device)).is_some());

    let (s, r) = t
        .post(
            &format!("/v1/tunnels/{id}/rotate"),
            &f.key,
            json!({"side": "client"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let new_client = r["client_token"].as_str().unwrap().to_string();
    assert!(r.get("device_token").is_none());
    assert!(index.lookup(&hash(&old_client)).is_none());
    assert_eq!(
        index.lookup(&hash(&new_client)).unwrap().side,
        iotunnel::seam::Side::Client
    );
    assert!(index.lookup(&hash(&old_device)).is_some());

    let (_, r) = t
        .post(
            &format!("/v1/tunnels/{id}/rotate"),
            &f.key,
            json!({"side": "all"}),
        )
        .await;
    let new_device = r["device_token"].as_str().unwrap().to_string();
    let n = f.channel.next_json().await;
    assert_eq!(
        (n["operation"].as_str(), n["token"].as_str()),
        (Some("connect"), Some(new_device.as_str()))
    );
    assert!(index.lookup(&hash(&old_device)).is_none());
    assert!(index.lookup(&hash(&new_client)).is_none());
    assert_eq!(
        index.lookup(&hash(&new_device)).unwrap().side,
        iotunnel::seam::Side::Device
    );

    let (s, v) = t
        .post(
            &format!("/v1/tunnels/{id}/rotate"),
            &f.key,
            json!({"side": "both"}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_json"));
    t.post(&format!("/v1/tunnels/{id}/close"), &f.key, json!({}))
        .await;
    let (s, v) = t
        .post(
            &format!("/v1/tunnels/{id}/rotate"),
            &f.key,
            json!({"side": "client"}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "tunnel_not_open"));
    assert!(index.is_empty(), "a closed tunnel's tokens leave the index");
}

#[tokio::test]
async fn relay_commands_follow_close_and_rotate() {
    without_relay();
    let mut t = TestServer::start().await;
    let mut seam = t.server.as_mut().unwrap().seam.take().unwrap();
    let f = t.online_device().await;
    let id = t.tunnel(&f, json!({})).await["tunnel_id"]
        .as_str()
        .unwrap()
        .to_string();
    t.post(
        &format!("/v1/tunnels/{id}/rotate"),
        &f.key,
        json!({"side": "device"}),
    )
    .await;
    use iotunnel::seam::{CloseReason, RelayCommand, Side};
    assert_eq!(
        seam.commands.recv().await.unwrap(),
        RelayCommand::DisconnectSide {
            tunnel_id: id.clone(),
            side: Side::Device
        }
    );
    t.post(&format!("/v1/tunnels/{id}/close"), &f.key, json!({}))
        .await;
    assert_eq!(
        seam.commands.recv().await.unwrap(),
        RelayCommand::CloseTunnel {
            tunnel_id: id.clone(),
            reason: CloseReason::Closed
        }
    );
}

#[tokio::test]
async fn connection_events_show_in_describe() {
    without_relay();
    let mut t = TestServer::start().await;
    let seam = t.server.as_mut().unwrap().seam.take().unwrap();
    let f = t.online_device().await;
    let id = t.tunnel(&f, json!({})).await["tunnel_id"]
        .as_str()
        .unwrap()
        .to_string();
    use iotunnel::seam::{ConnectionEvent, ConnectionEventKind, Side};
    let at = t.clock.now_ms();
    use iotunnel::clock::Clock;
    let ev = |side, kind| ConnectionEvent {
        tunnel_id: id.clone(),
        side,
        at,
        kind,
    };
    seam.events
        .send(ev(
            Side::Device,
            ConnectionEventKind::Connected {
                addr: "127.0.0.1:5000".into(),
            },
        ))
        .await
        .unwrap();
    seam.events
        .send(ev(
            Side::Device,
            ConnectionEventKind::Rtt {
                last_us: 1500,
                smoothed_us: 1200,
            },
        ))
        .await
        .unwrap();
    seam.events
        .send(ev(
            Side::Client,
            ConnectionEventKind::Connected {
                addr: "127.0.0.1:6000".into(),
            },
        ))
        .await
        .unwrap();
    seam.events
        .send(ev(
            Side::Client,
            ConnectionEventKind::Disconnected {
                reason: "peer_gone".into(),
            },
        ))
        .await
        .unwrap();
    let mut last = Value::Null;
    for _ in 0..500 {
        let (_, d) = t.get(&format!("/v1/tunnels/{id}"), &f.key).await;
        if d["client"]["updated_at"].is_string() && d["device"]["rtt_ms"].is_number() {
            last = d;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(last["device"]["state"], "CONNECTED");
    assert_eq!(last["device"]["rtt_ms"], 1.5);
    assert_eq!(last["device"]["smoothed_rtt_ms"], 1.2);
    assert_eq!(last["device"]["address"], "127.0.0.1:5000");
    assert_eq!(last["client"]["state"], "DISCONNECTED");
}

#[tokio::test]
async fn accounts_are_isolated_and_foreign_ids_are_404() {
    let t = TestServer::start().await;
    let f = t.online_device().await;
    let id = t.tunnel(&f, json!({})).await["tunnel_id"]
        .as_str()
        .unwrap()
        .to_string();
    let other = t.account("other").await;
    let pk = &f.product_key;

    let (_, v) = t.get("/v1/products", &other).await;
    assert_eq!(v["products"], json!([]));
    let (_, v) = t.get("/v1/tunnels", &other).await;
    assert_eq!(v["tunnels"], json!([]));
    let (_, v) = t.get(&format!("/v1/tunnels?tunnel_id={id}"), &other).await;
    assert_eq!(v["tunnels"], json!([]));
    let checks = [
        t.get(&format!("/v1/products/{pk}/devices"), &other).await,
        t.post(
            &format!("/v1/products/{pk}/devices"),
            &other,
            json!({"name": "intruder"}),
        )
        .await,
        t.delete(&format!("/v1/products/{pk}/devices/dev-1"), &other)
            .await,
        t.post(
            "/v1/tunnels",
            &other,
            json!({"product_key": pk, "device_name": "dev-1"}),
        )
        .await,
        t.get(&format!("/v1/tunnels/{id}"), &other).await,
        t.post(&format!("/v1/tunnels/{id}/close"), &other, json!({}))
            .await,
        t.post(
            &format!("/v1/tunnels/{id}/rotate"),
            &other,
            json!({"side": "all"}),
        )
        .await,
        t.delete(&format!("/v1/tunnels/{id}"), &other).await,
    ];
    for (s, v) in checks {
        assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"), "{v}");
    }
    let (_, v) = t
        .post(
            "/v1/tunnels/batch-close",
            &other,
            json!({"tunnel_ids": [id]}),
        )
        .await;
    assert_eq!(v["results"][0]["error"]["code"], "not_found");
    let (_, d) = t.get(&format!("/v1/tunnels/{id}"), &f.key).await;
    assert_eq!(d["state"], "OPEN", "the other account changed nothing");
}

#[tokio::test]
async fn openapi_document_matches_the_routes() {
    let t = TestServer::start().await;
    let (s, doc) = t.get("/openapi.json", "").await;
    assert_eq!(s, StatusCode::OK);
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/v1/accounts", "post"),
        ("/v1/keys", "get"),
        ("/v1/keys", "post"),
        ("/v1/keys/{key_id}", "delete"),
        ("/v1/products", "post"),
        ("/v1/products", "get"),
        ("/v1/products/{product_key}/devices", "post"),
        ("/v1/products/{product_key}/devices", "get"),
        ("/v1/products/{product_key}/devices/{device_name}", "delete"),
        ("/v1/tunnels", "post"),
        ("/v1/tunnels", "get"),
        ("/v1/tunnels/{id}", "get"),
        ("/v1/tunnels/{id}", "delete"),
        ("/v1/tunnels/{id}/close", "post"),
        ("/v1/tunnels/batch-close", "post"),
        ("/v1/tunnels/batch-delete", "post"),
        ("/v1/tunnels/{id}/rotate", "post"),
        ("/v1/device/connect", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ];
    for (path, method) in expected {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    // Every documented operation is served: none answers 404/405 from the router.
    let key = t.account("a").await;
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path
                .replace("{product_key}", "x")
                .replace("{device_name}", "y")
                .replace("{id}", "z")
                .replace("{key_id}", "k");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (s, v) = t.call(m, &concrete, &key, None).await;
            assert!(
                s != StatusCode::METHOD_NOT_ALLOWED
                    && !(s == StatusCode::NOT_FOUND
                        && code(&v) == "not_found"
                        && v["error"]["message"] == "no such route"),
                "{method} {path} is documented but not routed"
            );
        }
    }
}
