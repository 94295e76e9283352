//! The Alibaba IoT Platform facade driven by the `alibabacloud_iot20180120` SDK itself
//! (tests/vendor/aliyun_call.py, from the virtualenv of scripts/python-venv.sh) against a real
//! server, with both signatures the SDK offers: every tunnel action, the device tunnel switch
//! in every API, signature errors, isolation, and the journey with Alibaba-protocol peers on
//! the relay.
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::peers::{AliyunPeer, AliyunSide, AliyunStyle, Relay};
use common::vendor::{access_key, Aliyun, AliyunSignature, Aws};
use common::{DeviceChannel, TestServer};
use iotunnel::clock::Clock;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn server() -> TestServer {
    TestServer::start_dialable(Arc::new(tempfile::tempdir().unwrap()), None, |_| {}).await
}

/// An account with a product and an online device: (api key, product key, channel).
async fn online(t: &TestServer, name: &str) -> (String, String, DeviceChannel) {
    let key = t.account(name).await;
    let pk = t.product(&key).await;
    let secret = t.device(&key, &pk, "dev-1").await;
    let channel = DeviceChannel::connect(t, &pk, "dev-1", &secret)
        .await
        .unwrap();
    (key, pk, channel)
}

fn device(pk: &str) -> Value {
    json!({"product_key": pk, "device_name": "dev-1"})
}

fn tunnel(id: &str) -> Value {
    json!({ "tunnel_id": id })
}

async fn every_action(signature: AliyunSignature) {
    let t = server().await;
    let (key, pk, mut channel) = online(&t, "ali").await;
    let pair = access_key(&t, &key).await;
    let ali = Aliyun::new(&t, pair.clone(), signature);

    // CreateDeviceTunnel: TunnelId, SourceURI, SourceAccessToken; the device is notified
    // with the Udi as custom info.
    let mut params = device(&pk);
    params["udi"] = json!("{\"service\":\"ssh\"}");
    params["description"] = json!("debug 1");
    let created = ali.ok("CreateDeviceTunnel", params).await;
    let id = created["TunnelId"].as_str().unwrap().to_string();
    let relay = t.server().relay_addr.port();
    assert_eq!(
        created["SourceURI"],
        format!("wss://localhost:{relay}/tunnel/{id}/source")
    );
    assert!(created["SourceAccessToken"].as_str().unwrap().len() >= 32);
    let note = channel.next_json().await;
    assert_eq!(
        (note["operation"].as_str(), note["tunnel_id"].as_str()),
        (Some("connect"), Some(id.as_str()))
    );
    assert_eq!(note["custom_info"], "{\"service\":\"ssh\"}");

    // QueryDeviceTunnel.
    let q = ali.ok("QueryDeviceTunnel", tunnel(&id)).await;
    assert_eq!(q["TunnelId"], id.as_str());
    assert_eq!(q["TunnelState"], "OPEN");
    assert_eq!(
        (q["ProductKey"].as_str(), q["DeviceName"].as_str()),
        (Some(pk.as_str()), Some("dev-1"))
    );
    assert_eq!(q["ProductName"], "test product");
    assert_eq!(
        (q["DeviceConnState"].as_str(), q["SourceConnState"].as_str()),
        (Some("DISCONNECTED"), Some("DISCONNECTED"))
    );
    assert_eq!(q["Description"], "debug 1");
    assert_eq!(q["Udi"], "{\"service\":\"ssh\"}");
    assert!(q["UtcCreated"].as_str().unwrap().ends_with('Z'), "{q}");
    assert!(q.get("UtcClosed").is_none(), "{q}");

    // Close, then Query shows CLOSED with UtcClosed; a second close and an early delete fail.
    let second = ali.ok("CreateDeviceTunnel", device(&pk)).await;
    let second = second["TunnelId"].as_str().unwrap().to_string();
    assert_eq!(
        ali.biz_err("DeleteDeviceTunnel", tunnel(&id)).await,
        "iot.tunnel.InvalidTunnelState"
    );
    ali.ok("CloseDeviceTunnel", tunnel(&id)).await;
    let q = ali.ok("QueryDeviceTunnel", tunnel(&id)).await;
    assert_eq!(q["TunnelState"], "CLOSED");
    assert!(q["UtcClosed"].as_str().unwrap().ends_with('Z'), "{q}");
    assert_eq!(
        ali.biz_err("CloseDeviceTunnel", tunnel(&id)).await,
        "iot.tunnel.InvalidTunnelState"
    );
    ali.ok("DeleteDeviceTunnel", tunnel(&id)).await;
    assert_eq!(
        ali.biz_err("QueryDeviceTunnel", tunnel(&id)).await,
        "iot.tunnel.NotExistedTunnel"
    );

    // The device switch: disabled, no API opens a tunnel to it; enabled again, they do.
    assert_eq!(ali.ok("GetDeviceTunnelStatus", device(&pk)).await, "ENABLE");
    ali.ok("DisableDeviceTunnel", device(&pk)).await;
    assert_eq!(
        ali.ok("GetDeviceTunnelStatus", device(&pk)).await,
        "DISABLE"
    );
    assert_eq!(
        ali.biz_err("CreateDeviceTunnel", device(&pk)).await,
        "iot.tunnel.DeviceTunnelDisabled"
    );
    let (s, v) = t
        .post(
            "/v1/tunnels",
            &key,
            json!({"product_key": pk, "device_name": "dev-1"}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("device_tunnels_disabled")),
        "{v}"
    );
    let aws = Aws::new(&t, pair.clone());
    let thing = format!("{pk}_dev-1");
    let e = aws
        .err(
            "open_tunnel",
            json!({"destinationConfig": {"thingName": thing, "services": ["SSH"]}}),
        )
        .await;
    assert_eq!(e["code"], "ValidationException", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("switch is off"),
        "{e}"
    );
    // Tunnels already open stay open.
    assert_eq!(
        ali.ok("QueryDeviceTunnel", tunnel(&second)).await["TunnelState"],
        "OPEN"
    );
    ali.ok("EnableDeviceTunnel", device(&pk)).await;
    assert_eq!(ali.ok("GetDeviceTunnelStatus", device(&pk)).await, "ENABLE");
    ali.ok("CreateDeviceTunnel", device(&pk)).await;

    // Business errors: HTTP 200, Success false, a Code.
    let unknown = json!({"product_key": pk, "device_name": "nosuchdevice"});
    assert_eq!(
        ali.biz_err("CreateDeviceTunnel", unknown.clone()).await,
        "iot.device.NotExistedDevice"
    );
    assert_eq!(
        ali.biz_err("DisableDeviceTunnel", unknown).await,
        "iot.device.NotExistedDevice"
    );
    assert_eq!(
        ali.biz_err("CreateDeviceTunnel", json!({"iot_id": "x"}))
            .await,
        "iot.common.InvalidParameter"
    );
    assert_eq!(
        ali.biz_err("QueryDeviceTunnel", json!({})).await,
        "iot.common.InvalidParameter"
    );

    // Offline devices get no tunnel from this API (as natively).
    channel.close().await;
    t.wait_online(&key, &pk, "dev-1", false).await;
    assert_eq!(
        ali.biz_err("CreateDeviceTunnel", device(&pk)).await,
        "iot.tunnel.DeviceOffline"
    );

    // Signature failures are raised by the SDK with Alibaba's codes.
    let wrong = Aliyun {
        secret: "wrong".into(),
        ..ali.clone()
    };
    let e = wrong.raised("QueryDeviceTunnel", tunnel(&second)).await;
    assert_eq!(
        (
            e["class"].as_str(),
            e["code"].as_str(),
            e["status"].as_i64()
        ),
        (
            Some("ClientException"),
            Some("SignatureDoesNotMatch"),
            Some(400)
        ),
        "{e}"
    );
    let nobody = Aliyun {
        key_id: "IOTKNOSUCHKEY0000000".into(),
        ..ali.clone()
    };
    let e = nobody.raised("QueryDeviceTunnel", tunnel(&second)).await;
    assert_eq!(
        (e["code"].as_str(), e["status"].as_i64()),
        (Some("InvalidAccessKeyId.NotFound"), Some(404)),
        "{e}"
    );
    t.clock.advance_ms(6 * 60 * 1000);
    let e = ali.raised("QueryDeviceTunnel", tunnel(&second)).await;
    assert_eq!(e["code"], "InvalidTimeStamp.Expired", "{e}");
    t.clock.advance_ms(-6 * 60 * 1000);

    // Revoked keys stop working at once.
    t.delete(&format!("/v1/access-keys/{}", pair.0), &key).await;
    let e = ali.raised("QueryDeviceTunnel", tunnel(&second)).await;
    assert_eq!(e["code"], "InvalidAccessKeyId.NotFound", "{e}");

    // The API metrics count each action under its own label.
    let metrics = reqwest::get(format!("http://{}/metrics", t.server().metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "iotunnel_api_requests_total{route=\"aliyun:CreateDeviceTunnel\",status=\"200\"} 7",
        "iotunnel_api_requests_total{route=\"aliyun:QueryDeviceTunnel\",status=\"400\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_every_action_with_acs3() {
    every_action(AliyunSignature::Acs3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_every_action_with_hmac_sha1() {
    every_action(AliyunSignature::Sha1).await;
}

/// A raw request replayed with the same nonce is refused; other requests are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_unsigned_requests_are_refused() {
    let t = server().await;
    let key = t.account("raw").await;
    let (key_id, secret) = access_key(&t, &key).await;
    let now = chrono::DateTime::from_timestamp_millis(t.clock.now_ms()).unwrap();
    let mut params: Vec<(String, String)> = [
        ("Action", "GetDeviceTunnelStatus"),
        ("Version", "2018-01-20"),
        ("Format", "json"),
        ("AccessKeyId", key_id.as_str()),
        ("SignatureMethod", "HMAC-SHA1"),
        ("SignatureVersion", "1.0"),
        ("SignatureNonce", "nonce-1"),
        ("ProductKey", "pk"),
        ("DeviceName", "d"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    params.push((
        "Timestamp".into(),
        now.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    ));
    let sts = iotunnel::control::acs::sha1_string_to_sign("POST", &params);
    use base64::Engine;
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha1::Sha1>::new_from_slice(format!("{secret}&").as_bytes()).unwrap();
    mac.update(sts.as_bytes());
    params.push((
        "Signature".into(),
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()),
    ));
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&params)
        .finish();
    let send = |q: String| t.http.post(format!("{}/?{q}", t.base)).send();
    let first: Value = send(query.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(
        (first["Success"].as_bool(), first["Code"].as_str()),
        (Some(false), Some("iot.device.NotExistedDevice")),
        "{first}"
    );
    let again = send(query).await.unwrap();
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["Code"], "SignatureNonceUsed", "{again}");
    let unsigned = send("Action=QueryDeviceTunnel&Version=2018-01-20&TunnelId=x".into())
        .await
        .unwrap();
    assert_eq!(unsigned.status(), StatusCode::BAD_REQUEST);
    let unsigned: Value = unsigned.json().await.unwrap();
    assert_eq!(unsigned["Code"], "MissingSignature", "{unsigned}");
    assert!(unsigned["RequestId"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_accounts_keys_never_reach_anothers_tunnels() {
    let t = server().await;
    let (key_a, pk_a, _channel) = online(&t, "a").await;
    let key_b = t.account("b").await;
    let a = Aliyun::new(&t, access_key(&t, &key_a).await, AliyunSignature::Acs3);
    let b = Aliyun::new(&t, access_key(&t, &key_b).await, AliyunSignature::Acs3);
    let created = a.ok("CreateDeviceTunnel", device(&pk_a)).await;
    let id = created["TunnelId"].as_str().unwrap();
    for action in [
        "QueryDeviceTunnel",
        "CloseDeviceTunnel",
        "DeleteDeviceTunnel",
    ] {
        assert_eq!(
            b.biz_err(action, tunnel(id)).await,
            "iot.tunnel.NotExistedTunnel",
            "{action}"
        );
    }
    for action in [
        "CreateDeviceTunnel",
        "DisableDeviceTunnel",
        "EnableDeviceTunnel",
        "GetDeviceTunnelStatus",
    ] {
        assert_eq!(
            b.biz_err(action, device(&pk_a)).await,
            "iot.device.NotExistedDevice",
            "{action}"
        );
    }
    // Through the AWS facade either: B's key sees nothing of A's.
    let aws_b = Aws::new(&t, access_key(&t, &key_b).await);
    let e = aws_b.err("describe_tunnel", json!({"tunnelId": id})).await;
    assert_eq!(e["class"], "ResourceNotFoundException", "{e}");
    assert_eq!(
        a.ok("QueryDeviceTunnel", tunnel(id)).await["TunnelState"],
        "OPEN"
    );
    assert_eq!(a.ok("GetDeviceTunnelStatus", device(&pk_a)).await, "ENABLE");
}

/// The journey with Alibaba-protocol peers: CreateDeviceTunnel, the device dials with the
/// token from its notification, the source dials the SourceURI with SourceAccessToken, a
/// session carries bytes both ways, QueryDeviceTunnel shows both CONNECTED, and
/// CloseDeviceTunnel ends both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_journey_with_alibaba_protocol_peers() {
    let t = server().await;
    let (key, pk, mut channel) = online(&t, "journey").await;
    let ali = Aliyun::new(&t, access_key(&t, &key).await, AliyunSignature::Acs3);
    let created = ali.ok("CreateDeviceTunnel", device(&pk)).await;
    let id = created["TunnelId"].as_str().unwrap().to_string();
    let note = channel.next_json().await;
    assert_eq!(note["tunnel_id"], id.as_str());
    let relay = Relay::of(&t);
    let device_path = format!("/tunnel/{id}/device");
    assert!(
        note["url"].as_str().unwrap().ends_with(&device_path),
        "{note}"
    );
    let mut dev = AliyunPeer::connect(
        &relay,
        &id,
        AliyunSide::Device,
        note["token"].as_str().unwrap(),
        AliyunStyle::PlainHeader,
    )
    .await;
    let source_uri = created["SourceURI"].as_str().unwrap();
    assert!(
        source_uri.ends_with(&format!("/tunnel/{id}/source")),
        "{source_uri}"
    );
    let mut source = AliyunPeer::connect(
        &relay,
        &id,
        AliyunSide::Source,
        created["SourceAccessToken"].as_str().unwrap(),
        AliyunStyle::WebSocketProtocol,
    )
    .await;

    let session = source.open_session(&mut dev, "_SSH").await;
    let sent = source.data(&session, b"SSH-2.0-OpenSSH_9.6\r\n").await;
    assert_eq!(dev.recv().await.raw, sent);
    let sent = dev.data(&session, &[7u8; 4096]).await;
    assert_eq!(source.recv().await.raw, sent);

    for _ in 0..1000 {
        let (_, v) = t.get(&format!("/v1/tunnels/{id}"), &key).await;
        if v["device"]["state"] == "CONNECTED" && v["client"]["state"] == "CONNECTED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let q = ali.ok("QueryDeviceTunnel", tunnel(&id)).await;
    assert_eq!(
        (q["DeviceConnState"].as_str(), q["SourceConnState"].as_str()),
        (Some("CONNECTED"), Some("CONNECTED")),
        "{q}"
    );

    ali.ok("CloseDeviceTunnel", tunnel(&id)).await;
    source.end().await;
    dev.end().await;
    let q = ali.ok("QueryDeviceTunnel", tunnel(&id)).await;
    assert_eq!(q["TunnelState"], "CLOSED");
}
