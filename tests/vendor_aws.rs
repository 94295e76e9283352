//! The AWS IoT Secure Tunneling facade driven by boto3 itself (tests/vendor/aws_call.py, from
//! the virtualenv of scripts/python-venv.sh) against a real server: every operation, the full
//! journey with the real device agent and client, SigV4 failures, limits and isolation.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::agent::{connect, device, echo_server, echo_through};
use common::peers::{within, Aws as AwsVersion, AwsPeer, Mode, Relay};
use common::vendor::{access_key, Aws};
use common::{DeviceChannel, TestServer};
use iotunnel::agent::client::{self, ClientArgs};
use iotunnel::config::{Secret, Settings};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn server(tweak: impl FnOnce(&mut Settings)) -> TestServer {
    TestServer::start_dialable(Arc::new(tempfile::tempdir().unwrap()), None, tweak).await
}

/// An account with a product and a device: (api key, product key, device secret).
async fn account_with_device(t: &TestServer, name: &str) -> (String, String, String) {
    let key = t.account(name).await;
    let pk = t.product(&key).await;
    let secret = t.device(&key, &pk, "dev-1").await;
    (key, pk, secret)
}

/// Native describe, for waiting on connection states without a Python start per poll.
async fn native(t: &TestServer, key: &str, id: &str) -> Value {
    let (s, v) = t.get(&format!("/v1/tunnels/{id}"), key).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

async fn wait_side(t: &TestServer, key: &str, id: &str, side: &str, state: &str) {
    let mut last = Value::Null;
    for _ in 0..1000 {
        last = native(t, key, id).await;
        if last[side]["state"] == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{side} never became {state}: {last}");
}

fn open_params(thing: &str) -> Value {
    json!({"destinationConfig": {"thingName": thing, "services": ["SSH"]}})
}

fn epoch(v: &Value) -> f64 {
    v["epoch"]
        .as_f64()
        .unwrap_or_else(|| panic!("not a timestamp: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_journey_open_connect_carry_rotate_close() {
    let t = server(|_| {}).await;
    let echo = echo_server().await;
    let d = device(&t, &[("SSH", echo.to_string())]).await;
    let aws = Aws::new(&t, access_key(&t, &d.key).await);
    let thing = format!("{}_dev-1", d.product_key);

    // OpenTunnel for the thing: the running agent is notified and dials the relay.
    let opened = aws
        .ok(
            "open_tunnel",
            json!({
                "description": "journey",
                "destinationConfig": {"thingName": thing, "services": ["SSH"]},
                "timeoutConfig": {"maxLifetimeTimeoutMinutes": 30},
            }),
        )
        .await;
    let id = opened["tunnelId"].as_str().unwrap().to_string();
    assert!(opened["destinationAccessToken"].as_str().unwrap().len() >= 32);
    wait_side(&t, &d.key, &id, "device", "CONNECTED").await;

    // The source connects with the returned token; bytes flow end to end.
    let relay = t.server().relay_addr.port();
    let url = format!("wss://localhost:{relay}/tunnel/{id}/source");
    let start = |token: &str| {
        client::start(ClientArgs {
            url: url.clone(),
            token: Secret(token.to_string()),
            listen: vec!["127.0.0.1:0".into()],
            stdio: None,
            ca_file: Some(t.dir.path().join("tls/ca.pem")),
        })
    };
    let source = within(
        "the client starts",
        start(opened["sourceAccessToken"].as_str().unwrap()),
    )
    .await
    .expect("the source token is accepted");
    let mut conn = connect(source.listening[0].1).await;
    echo_through(&mut conn, 256 * 1024, 7).await;

    // DescribeTunnel shows both sides CONNECTED, as boto3 parses it.
    let tunnel = aws.ok("describe_tunnel", json!({"tunnelId": id})).await["tunnel"].clone();
    assert_eq!(tunnel["status"], "OPEN");
    assert_eq!(tunnel["sourceConnectionState"]["status"], "CONNECTED");
    assert_eq!(tunnel["destinationConnectionState"]["status"], "CONNECTED");
    assert_eq!(tunnel["destinationConfig"]["thingName"], thing.as_str());
    assert_eq!(tunnel["timeoutConfig"]["maxLifetimeTimeoutMinutes"], 30);
    assert_eq!(tunnel["description"], "journey");
    let created = epoch(&tunnel["createdAt"]);
    assert!(epoch(&tunnel["sourceConnectionState"]["lastUpdatedAt"]) >= created);
    assert!(epoch(&tunnel["lastUpdatedAt"]) >= created);

    // Rotating the source's token drops the connected source; its old token is refused.
    let rotated = aws
        .ok(
            "rotate_tunnel_access_token",
            json!({"tunnelId": id, "clientMode": "SOURCE"}),
        )
        .await;
    assert!(rotated.get("destinationAccessToken").is_none(), "{rotated}");
    let new_token = rotated["sourceAccessToken"].as_str().unwrap().to_string();
    within("the old source is dropped and refused", source.wait())
        .await
        .expect_err("the old source ends with an error");
    assert!(start(opened["sourceAccessToken"].as_str().unwrap())
        .await
        .is_err());
    let source = within("the new client starts", start(&new_token))
        .await
        .expect("the rotated token is accepted");
    let mut conn = connect(source.listening[0].1).await;
    echo_through(&mut conn, 64 * 1024, 9).await;

    // CloseTunnel(delete=True): both sides are dropped and the tunnel is gone.
    aws.ok("close_tunnel", json!({"tunnelId": id, "delete": true}))
        .await;
    within("the source ends with the tunnel", source.wait())
        .await
        .expect_err("closed");
    let gone = aws.err("describe_tunnel", json!({"tunnelId": id})).await;
    assert_eq!(gone["class"], "ResourceNotFoundException", "{gone}");
    assert_eq!(gone["modeled"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_every_operation() {
    let t = server(|_| {}).await;
    let (key, pk, secret) = account_with_device(&t, "ops").await;
    let mut channel = DeviceChannel::connect(&t, &pk, "dev-1", &secret)
        .await
        .unwrap();
    let aws = Aws::new(&t, access_key(&t, &key).await);
    let thing = format!("{pk}_dev-1");

    // OpenTunnel with tags notifies the device as a native create does, with the token.
    let mut params = open_params(&thing);
    params["tags"] = json!([{"key": "team", "value": "ops"}, {"key": "env", "value": "dev"}]);
    let opened = aws.ok("open_tunnel", params).await;
    let id = opened["tunnelId"].as_str().unwrap().to_string();
    let arn = opened["tunnelArn"].as_str().unwrap().to_string();
    assert_eq!(
        arn,
        format!(
            "arn:aws:iot:eu-west-1:{}:tunnel/{id}",
            account_of(&t, &aws.key_id).await
        )
    );
    let note = channel.next_json().await;
    assert_eq!(note["operation"], "connect");
    assert_eq!(note["tunnel_id"], id.as_str());
    assert_eq!(note["token"], opened["destinationAccessToken"]);

    // Tags.
    let tags = |v: &Value| {
        let mut t: Vec<(String, String)> = v["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| {
                        (
                            t["key"].as_str().unwrap().into(),
                            t["value"].as_str().unwrap().into(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        t.sort();
        t
    };
    let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
    let listed = aws
        .ok("list_tags_for_resource", json!({"resourceArn": arn}))
        .await;
    assert_eq!(tags(&listed), [pair("env", "dev"), pair("team", "ops")]);
    let results = aws
        .calls(&[
            ("tag_resource", json!({"resourceArn": arn, "tags": [{"key": "team", "value": "sre"}, {"key": "x", "value": ""}]})),
            ("untag_resource", json!({"resourceArn": arn, "tagKeys": ["env"]})),
            ("list_tags_for_resource", json!({"resourceArn": arn})),
            ("describe_tunnel", json!({"tunnelId": id})),
        ])
        .await;
    assert_eq!(
        tags(&results[2]["ok"]),
        [pair("team", "sre"), pair("x", "")]
    );
    let tunnel = &results[3]["ok"]["tunnel"];
    assert_eq!(tags(tunnel), [pair("team", "sre"), pair("x", "")]);
    assert_eq!(tunnel["tunnelArn"], arn.as_str());
    assert_eq!(tunnel["destinationConfig"]["services"], json!(["SSH"]));
    assert_eq!(
        tunnel["destinationConnectionState"]["status"],
        "DISCONNECTED"
    );
    assert_eq!(tunnel["timeoutConfig"]["maxLifetimeTimeoutMinutes"], 720);
    let bad_tag = aws
        .err(
            "tag_resource",
            json!({"resourceArn": arn, "tags": [{"key": "aws:x", "value": "1"}]}),
        )
        .await;
    assert_eq!(bad_tag["code"], "ValidationException", "{bad_tag}");

    // RotateTunnelAccessToken DESTINATION and ALL: new tokens, the device is told.
    let rotated = aws
        .ok(
            "rotate_tunnel_access_token",
            json!({"tunnelId": id, "clientMode": "DESTINATION"}),
        )
        .await;
    assert!(rotated.get("sourceAccessToken").is_none(), "{rotated}");
    assert_eq!(rotated["tunnelArn"], arn.as_str());
    let note = channel.next_json().await;
    assert_eq!(note["token"], rotated["destinationAccessToken"]);
    assert_ne!(note["token"], opened["destinationAccessToken"]);
    let all = aws
        .ok(
            "rotate_tunnel_access_token",
            json!({"tunnelId": id, "clientMode": "ALL"}),
        )
        .await;
    assert!(all["sourceAccessToken"].is_string() && all["destinationAccessToken"].is_string());
    assert_eq!(
        channel.next_json().await["token"],
        all["destinationAccessToken"]
    );
    // The tokens work as AWS's localproxy uses them: `/tunnel?local-proxy-mode=...` with the
    // access-token header, on the relay.
    let relay = Relay::of(&t);
    let token = |v: &Value| v.as_str().unwrap().to_string();
    let _destination = AwsPeer::connect(
        &relay,
        Mode::Destination,
        AwsVersion::V2,
        &token(&all["destinationAccessToken"]),
    )
    .await;
    let _source = AwsPeer::connect(
        &relay,
        Mode::Source,
        AwsVersion::V2,
        &token(&all["sourceAccessToken"]),
    )
    .await;
    wait_side(&t, &key, &id, "client", "CONNECTED").await;
    wait_side(&t, &key, &id, "device", "CONNECTED").await;
    let tunnel = aws.ok("describe_tunnel", json!({"tunnelId": id})).await["tunnel"].clone();
    assert_eq!(tunnel["sourceConnectionState"]["status"], "CONNECTED");
    assert_eq!(tunnel["destinationConnectionState"]["status"], "CONNECTED");

    // ListTunnels: newest first, by thing, paginated with maxResults and nextToken.
    let second = aws.ok("open_tunnel", open_params(&thing)).await;
    let second_id = second["tunnelId"].as_str().unwrap();
    let third = aws.ok("open_tunnel", open_params(&thing)).await;
    let third_id = third["tunnelId"].as_str().unwrap();
    for opened in [second_id, third_id] {
        let note = channel.next_json().await;
        assert_eq!(
            (note["operation"].as_str(), note["tunnel_id"].as_str()),
            (Some("connect"), Some(opened))
        );
    }
    let page1 = aws
        .ok("list_tunnels", json!({"thingName": thing, "maxResults": 2}))
        .await;
    let ids = |v: &Value| -> Vec<String> {
        v["tunnelSummaries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["tunnelId"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&page1), [third_id, second_id]);
    let next = page1["nextToken"]
        .as_str()
        .expect("a next page")
        .to_string();
    let page2 = aws
        .ok(
            "list_tunnels",
            json!({"thingName": thing, "maxResults": 2, "nextToken": next}),
        )
        .await;
    assert_eq!(ids(&page2), [id.as_str()]);
    assert!(page2.get("nextToken").is_none(), "{page2}");
    let summary = &page2["tunnelSummaries"][0];
    assert_eq!(summary["status"], "OPEN");
    assert_eq!(summary["tunnelArn"], arn.as_str());
    assert!(epoch(&summary["createdAt"]) > 1.0e9);
    assert_eq!(ids(&aws.ok("list_tunnels", json!({})).await).len(), 3);
    let none = aws
        .ok("list_tunnels", json!({"thingName": "nosuchthing"}))
        .await;
    assert!(ids(&none).is_empty());

    // CloseTunnel without delete: CLOSED (again is fine), then delete.
    aws.ok("close_tunnel", json!({"tunnelId": second_id})).await;
    let note = channel.next_json().await;
    assert_eq!(
        (note["operation"].as_str(), note["tunnel_id"].as_str()),
        (Some("close"), Some(second_id))
    );
    aws.ok("close_tunnel", json!({"tunnelId": second_id})).await;
    let closed = aws
        .ok("describe_tunnel", json!({"tunnelId": second_id}))
        .await;
    assert_eq!(closed["tunnel"]["status"], "CLOSED");
    let r = aws
        .err(
            "rotate_tunnel_access_token",
            json!({"tunnelId": second_id, "clientMode": "ALL"}),
        )
        .await;
    assert_eq!(r["code"], "ValidationException", "{r}");
    aws.ok(
        "close_tunnel",
        json!({"tunnelId": second_id, "delete": true}),
    )
    .await;
    assert_eq!(ids(&aws.ok("list_tunnels", json!({})).await).len(), 2);

    // The API metrics count each operation under its own bounded label.
    let metrics = reqwest::get(format!("http://{}/metrics", t.server().metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "iotunnel_api_requests_total{route=\"aws:OpenTunnel\",status=\"200\"} 3",
        "iotunnel_api_requests_total{route=\"aws:CloseTunnel\",status=\"200\"} 3",
        "iotunnel_api_requests_total{route=\"aws:TagResource\",status=\"400\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line}");
    }
}

/// The account an access key belongs to, as the store has it.
async fn account_of(t: &TestServer, key_id: &str) -> String {
    let found = t
        .server()
        .control
        .store
        .access_key(key_id.into())
        .await
        .unwrap();
    found.expect("the access key exists").1.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_errors_are_the_exceptions_aws_raises() {
    let t = server(|s| s.max_open_tunnels_per_device = 1).await;
    let (key, pk, _) = account_with_device(&t, "errs").await;
    let pair = access_key(&t, &key).await;
    let aws = Aws::new(&t, pair.clone());
    let thing = format!("{pk}_dev-1");

    // AWS opens tunnels to offline things; the second one is over the per-device limit.
    let opened = aws.ok("open_tunnel", open_params(&thing)).await;
    let e = aws.err("open_tunnel", open_params(&thing)).await;
    assert_eq!(
        (e["class"].as_str(), e["modeled"].as_bool()),
        (Some("LimitExceededException"), Some(true)),
        "{e}"
    );

    // Unknown tunnel, unknown thing.
    for (op, params) in [
        ("describe_tunnel", json!({"tunnelId": "nosuchtunnel"})),
        (
            "close_tunnel",
            json!({"tunnelId": "nosuchtunnel", "delete": true}),
        ),
        (
            "rotate_tunnel_access_token",
            json!({"tunnelId": "nosuchtunnel", "clientMode": "ALL"}),
        ),
        (
            "list_tags_for_resource",
            json!({"resourceArn": "arn:aws:iot:eu-west-1:1:tunnel/nosuchtunnel"}),
        ),
        ("open_tunnel", open_params(&format!("{pk}_nosuchdevice"))),
    ] {
        let e = aws.err(op, params).await;
        assert_eq!(e["class"], "ResourceNotFoundException", "{op}: {e}");
        assert_eq!(e["status"], 404);
    }
    let e = aws
        .err("open_tunnel", json!({"description": "no thing"}))
        .await;
    assert_eq!(e["code"], "ValidationException", "{e}");

    // Wrong secret: botocore's ClientError with AWS's code and words.
    let wrong = Aws {
        secret: "wrong-secret".into(),
        ..aws.clone()
    };
    let e = wrong.err("list_tunnels", json!({})).await;
    assert_eq!(
        (e["class"].as_str(), e["code"].as_str()),
        (Some("ClientError"), Some("InvalidSignatureException")),
        "{e}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("The request signature we calculated does not match"),
        "{e}"
    );
    assert_eq!(e["status"], 403);

    // Unknown key, temporary credentials.
    let unknown = Aws {
        key_id: "IOTKNOSUCHKEY0000000".into(),
        ..aws.clone()
    };
    let e = unknown.err("list_tunnels", json!({})).await;
    assert_eq!(e["code"], "UnrecognizedClientException", "{e}");
    let temporary = Aws {
        session_token: Some("FwoGZXIvYXdzEXAMPLE".into()),
        ..aws.clone()
    };
    let e = temporary.err("list_tunnels", json!({})).await;
    assert_eq!(e["code"], "UnrecognizedClientException", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("X-Amz-Security-Token"),
        "{e}"
    );

    // A clock 6 minutes apart: the signature has expired (and, the other way, is not yet
    // current). The server's clock moves; boto3 signs with the real time.
    t.clock.advance_ms(6 * 60 * 1000);
    let e = aws.err("list_tunnels", json!({})).await;
    assert_eq!(e["code"], "InvalidSignatureException", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("Signature expired: "),
        "{e}"
    );
    t.clock.advance_ms(-12 * 60 * 1000);
    let e = aws.err("list_tunnels", json!({})).await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("Signature not yet current: "),
        "{e}"
    );
    t.clock.advance_ms(6 * 60 * 1000);
    aws.ok("list_tunnels", json!({})).await;

    // Unsigned requests and unknown operations get AWS's shapes too.
    let unsigned = t
        .http
        .post(&t.base)
        .header("x-amz-target", "IoTSecuredTunneling.ListTunnels")
        .header("content-type", "application/x-amz-json-1.1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        unsigned.headers()["content-type"],
        "application/x-amz-json-1.1"
    );
    let body: Value = unsigned.json().await.unwrap();
    assert_eq!(
        body,
        json!({"__type": "MissingAuthenticationTokenException", "message": "Missing Authentication Token"})
    );

    // Revocation applies to the next request.
    let (s, _) = t.delete(&format!("/v1/access-keys/{}", pair.0), &key).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let e = aws
        .err("describe_tunnel", json!({"tunnelId": opened["tunnelId"]}))
        .await;
    assert_eq!(e["code"], "UnrecognizedClientException", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_accounts_keys_never_reach_anothers_tunnels() {
    let t = server(|_| {}).await;
    let (key_a, pk_a, _) = account_with_device(&t, "a").await;
    let (key_b, _, _) = account_with_device(&t, "b").await;
    let a = Aws::new(&t, access_key(&t, &key_a).await);
    let b = Aws::new(&t, access_key(&t, &key_b).await);
    let thing_a = format!("{pk_a}_dev-1");
    let opened = a.ok("open_tunnel", open_params(&thing_a)).await;
    let id = opened["tunnelId"].as_str().unwrap();
    let arn = opened["tunnelArn"].as_str().unwrap();

    let results = b
        .calls(&[
            ("describe_tunnel", json!({"tunnelId": id})),
            ("close_tunnel", json!({"tunnelId": id, "delete": true})),
            (
                "rotate_tunnel_access_token",
                json!({"tunnelId": id, "clientMode": "ALL"}),
            ),
            (
                "tag_resource",
                json!({"resourceArn": arn, "tags": [{"key": "k", "value": "v"}]}),
            ),
            (
                "untag_resource",
                json!({"resourceArn": arn, "tagKeys": ["k"]}),
            ),
            ("list_tags_for_resource", json!({"resourceArn": arn})),
            ("open_tunnel", open_params(&thing_a)),
        ])
        .await;
    for r in &results {
        assert_eq!(r["error"]["class"], "ResourceNotFoundException", "{r}");
    }
    let listed = b.ok("list_tunnels", json!({})).await;
    assert_eq!(listed["tunnelSummaries"], json!([]));
    let listed = b.ok("list_tunnels", json!({"thingName": thing_a})).await;
    assert_eq!(listed["tunnelSummaries"], json!([]));
    // Account A still sees its OPEN tunnel, untouched.
    let mine = a.ok("describe_tunnel", json!({"tunnelId": id})).await;
    assert_eq!(mine["tunnel"]["status"], "OPEN");
    assert!(mine["tunnel"].get("tags").is_none());
    // Nor can B revoke A's access key.
    let (_, v) = t.get("/v1/access-keys", &key_a).await;
    let a_key = v["access_keys"][0]["access_key_id"].as_str().unwrap();
    let (s, _) = t.delete(&format!("/v1/access-keys/{a_key}"), &key_b).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// A node of a fleet on `db` with the given access-key encryption key.
async fn fleet_node(db: &common::pg::TestDatabase, i: usize, key: Option<&str>) -> TestServer {
    let url = db.url.clone();
    let key = key.map(|k| Secret(k.into()));
    server(move |s| {
        s.database_url = Some(Secret(url));
        s.node_id = Some(format!("node-{i}"));
        s.access_key_encryption_key = key;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_on_a_fleet_any_node_serves_any_key() {
    let db = common::pg::TestDatabase::create().await;
    let shared_key = "11".repeat(32);
    let a = fleet_node(&db, 0, Some(&shared_key)).await;
    let b = fleet_node(&db, 1, Some(&shared_key)).await;
    let (key, pk, secret) = account_with_device(&a, "fleet").await;
    let mut channel = DeviceChannel::connect(&a, &pk, "dev-1", &secret)
        .await
        .unwrap();
    // A key made on node A signs requests node B verifies; B's notification reaches the
    // device's channel on A.
    let pair = access_key(&a, &key).await;
    let on_a = Aws::new(&a, pair.clone());
    let on_b = Aws::new(&b, pair);
    let opened = on_b
        .ok("open_tunnel", open_params(&format!("{pk}_dev-1")))
        .await;
    let id = opened["tunnelId"].as_str().unwrap();
    let note = channel.next_json().await;
    assert_eq!(note["tunnel_id"], id);
    assert_eq!(note["token"], opened["destinationAccessToken"]);
    let described = on_a.ok("describe_tunnel", json!({"tunnelId": id})).await;
    assert_eq!(described["tunnel"]["status"], "OPEN");
    on_a.ok("close_tunnel", json!({"tunnelId": id, "delete": true}))
        .await;
    let e = on_b.err("describe_tunnel", json!({"tunnelId": id})).await;
    assert_eq!(e["class"], "ResourceNotFoundException", "{e}");

    // A node without the key refuses access keys clearly rather than make its own.
    let c = fleet_node(&db, 2, None).await;
    let (s, v) = c.post("/v1/access-keys", &key, json!({})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "access_keys_unavailable");
    let on_c = Aws {
        endpoint: c.base.clone(),
        ..on_a.clone()
    };
    let e = on_c.err("list_tunnels", json!({})).await;
    assert_eq!(e["code"], "ServiceUnavailableException", "{e}");
    // And a node with another key cannot open the secrets: it says so, it does not accept.
    let d = fleet_node(&db, 3, Some(&"22".repeat(32))).await;
    let on_d = Aws {
        endpoint: d.base.clone(),
        ..on_a.clone()
    };
    let e = on_d.err("list_tunnels", json!({})).await;
    assert_eq!(e["code"], "ServiceUnavailableException", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("another server key"),
        "{e}"
    );
}

/// `iotunnel access-key create|list|delete`: the secret is printed once, then only the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_key_commands() {
    let t = server(|_| {}).await;
    let key = t.account("cli").await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_iotunnel"))
            .args(args)
            .args(["--api", &t.base, "--json"])
            .env("IOTUNNEL_API_KEY", &key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let created: Value = serde_json::from_str(&cli(&["access-key", "create"])).unwrap();
    let id = created["access_key_id"].as_str().unwrap();
    let secret = created["secret_access_key"].as_str().unwrap();
    assert!(id.starts_with("IOTK") && id.len() == 20, "{created}");
    assert_eq!(secret.len(), 40);
    let listed = cli(&["access-key", "list"]);
    assert!(listed.contains(id) && !listed.contains(secret), "{listed}");
    // The secret is not in the database in clear.
    for file in ["iotunnel.db", "iotunnel.db-wal"] {
        let bytes = std::fs::read(t.dir.path().join(file)).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{file}"
        );
    }
    cli(&["access-key", "delete", id]);
    let listed: Value = serde_json::from_str(&cli(&["access-key", "list"])).unwrap();
    assert_eq!(listed["access_keys"], json!([]));
}
