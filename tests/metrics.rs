//! The Prometheus exporter: contract names, label values present from start-up, and counters
//! that move with real traffic.
mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

async fn scrape(t: &TestServer) -> String {
    let url = format!("http://{}/metrics", t.server().metrics_addr);
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("series {series} missing"))
        .parse()
        .unwrap()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Pairs the tunnel's two sides over AWS V2 and forwards one 1000-byte DATA frame from the
/// client to the device. Returns both sockets (still open) and the frame's payload.
async fn forward_one_frame(
    t: &TestServer,
    f: &mut Fixture,
    created: &serde_json::Value,
) -> (Ws, Ws, Vec<u8>) {
    let device_token = f.channel.next_json().await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let dial = |mode: &'static str, token: String| {
        let url = format!(
            "ws://{}/tunnel?local-proxy-mode={mode}",
            t.server().relay_addr
        );
        async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut()
                .insert("access-token", token.parse().unwrap());
            req.headers_mut().insert(
                "sec-websocket-protocol",
                "aws.iot.securetunneling-2.0".parse().unwrap(),
            );
            tokio_tungstenite::connect_async(req).await.unwrap().0
        }
    };
    let mut device = dial("destination", device_token).await;
    let mut client = dial(
        "source",
        created["client_token"].as_str().unwrap().to_string(),
    )
    .await;
    let msg = iotunnel::proto::aws::Message {
        r#type: iotunnel::proto::aws::MessageType::Data as i32,
        stream_id: 1,
        payload: vec![1u8; 1000].into(),
        ..Default::default()
    };
    let bytes = iotunnel::proto::aws::encode_frame_payload(&msg).unwrap();
    client
        .send(Message::Binary(bytes.clone().into()))
        .await
        .unwrap();
    loop {
        // SERVICE_IDS first, then the client's message.
        if let Message::Binary(b) = device.next().await.unwrap().unwrap() {
            if b.as_ref() == bytes.as_slice() {
                break;
            }
        }
    }
    (client, device, bytes)
}

#[tokio::test]
async fn every_series_exists_from_start_up() {
    let t = TestServer::start_with(|s| s.relay_plaintext = true).await;
    let text = scrape(&t).await;
    for series in [
        "iotunnel_build_info{version=\"0.1.0\"}",
        "iotunnel_tunnels{state=\"open\"}",
        "iotunnel_tunnels{state=\"closed\"}",
        "iotunnel_peers_connected{role=\"device\"}",
        "iotunnel_peers_connected{role=\"client\"}",
        "iotunnel_peer_connects_total{role=\"client\",family=\"aliyun\"}",
        "iotunnel_peer_disconnects_total{role=\"device\",reason=\"ping_timeout\"}",
        "iotunnel_peer_disconnects_total{role=\"client\",reason=\"replaced\"}",
        "iotunnel_relay_bytes_total{direction=\"client_to_device\"}",
        "iotunnel_relay_frames_total{direction=\"device_to_client\"}",
        "iotunnel_forward_latency_seconds_bucket{le=\"0.000025\"}",
        "iotunnel_forward_latency_seconds_bucket{le=\"10\"}",
        "iotunnel_forward_latency_seconds_count",
        "iotunnel_peer_rtt_seconds_count{role=\"device\"}",
        "iotunnel_handshake_failures_total{reason=\"unknown_token\"}",
        "iotunnel_handshake_failures_total{reason=\"timeout\"}",
        "iotunnel_shard_tunnels{shard=\"0\"}",
        "iotunnel_shard_bytes_total{shard=\"0\"}",
        "iotunnel_handshake_failures_total{reason=\"mesh_auth\"}",
        "iotunnel_handshake_failures_total{reason=\"mesh_tls\"}",
        "iotunnel_handshake_failures_total{reason=\"owner_unreachable\"}",
        "iotunnel_mesh_forwards_total{result=\"ok\"}",
        "iotunnel_mesh_forwards_total{result=\"unreachable\"}",
        "iotunnel_mesh_connections{direction=\"outbound\"}",
        "iotunnel_mesh_connections{direction=\"inbound\"}",
        "iotunnel_mesh_bytes_total{direction=\"outbound\"}",
        "iotunnel_mesh_bytes_total{direction=\"inbound\"}",
        "iotunnel_device_channels_connected",
        "iotunnel_api_requests_total{route=\"/v1/tunnels/{id}\",status=\"200\"}",
        "iotunnel_api_request_duration_seconds_count{route=\"/v1/tunnels\"}",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        value(&text, series);
    }
}

#[tokio::test]
async fn counters_follow_traffic_and_routes_are_templates() {
    let t = TestServer::start_with(|s| s.relay_plaintext = true).await;
    let mut f = t.online_device().await;
    let created = t.tunnel(&f, json!({})).await;
    let id = created["tunnel_id"].as_str().unwrap();
    t.get(&format!("/v1/tunnels/{id}"), &f.key).await;
    t.get("/v1/no-such-route", &f.key).await;
    let (client, device, bytes) = forward_one_frame(&t, &mut f, &created).await;
    let _ = tokio_tungstenite::connect_async(format!(
        "ws://{}/tunnel?local-proxy-mode=source",
        t.server().relay_addr
    ))
    .await;
    let text = scrape(&t).await;
    assert_eq!(
        value(&text, "iotunnel_peers_connected{role=\"client\"}"),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "iotunnel_peer_connects_total{role=\"device\",family=\"aws\"}"
        ),
        1.0
    );
    // Forwarded frame: 2 header bytes + the payload.
    assert_eq!(
        value(
            &text,
            "iotunnel_relay_bytes_total{direction=\"client_to_device\"}"
        ),
        (bytes.len() + 4) as f64
    );
    assert_eq!(
        value(
            &text,
            "iotunnel_relay_frames_total{direction=\"client_to_device\"}"
        ),
        1.0
    );
    // Per shard: every forwarded byte counted once, on the shard that forwarded it.
    let shard_bytes: f64 = text
        .lines()
        .filter(|l| l.starts_with("iotunnel_shard_bytes_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(shard_bytes, (bytes.len() + 4) as f64);
    assert!(value(&text, "iotunnel_forward_latency_seconds_count") >= 1.0);
    assert_eq!(
        value(
            &text,
            "iotunnel_handshake_failures_total{reason=\"unknown_token\"}"
        ),
        1.0
    );
    assert_eq!(value(&text, "iotunnel_tunnels{state=\"open\"}"), 1.0);
    assert_eq!(
        value(
            &text,
            "iotunnel_api_requests_total{route=\"/v1/tunnels/{id}\",status=\"200\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "iotunnel_api_requests_total{route=\"unmatched\",status=\"404\"}"
        ),
        1.0
    );
    assert!(!text.contains(id), "no raw paths or tunnel ids in labels");
    drop(client);
    drop(device);
}

#[tokio::test]
async fn the_exposition_parses_as_prometheus_text() {
    let t = TestServer::start_with(|s| s.relay_plaintext = true).await;
    let text = scrape(&t).await;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let names: std::collections::HashSet<_> =
        scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for name in [
        "iotunnel_tunnels",
        "iotunnel_peers_connected",
        "iotunnel_peer_disconnects_total",
        "iotunnel_forward_latency_seconds",
        "iotunnel_api_request_duration_seconds",
        "process_open_fds",
    ] {
        assert!(
            names.contains(name),
            "{name} missing from the parsed samples"
        );
    }
    // Histograms come out as histograms, with cumulative buckets ending at +Inf.
    let latency = scrape
        .samples
        .iter()
        .find(|s| s.metric == "iotunnel_forward_latency_seconds")
        .unwrap();
    match &latency.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert_eq!(buckets.len(), iotunnel::metrics::BUCKETS.len() + 1);
            assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
        }
        other => panic!("forward latency is not a histogram: {other:?}"),
    }
    // Every sample is a counter, gauge or histogram with a HELP and TYPE line.
    for s in &scrape.samples {
        // The parser reports a histogram's _sum and _count as samples of their own.
        let family = s.metric.trim_end_matches("_sum").trim_end_matches("_count");
        assert!(
            scrape.docs.contains_key(&s.metric) || scrape.docs.contains_key(family),
            "no HELP for {}",
            s.metric
        );
    }
}

#[tokio::test]
async fn per_tunnel_series_are_off_by_default_and_capped_when_on() {
    let off = TestServer::start_with(|s| s.relay_plaintext = true).await;
    assert!(
        !scrape(&off).await.contains("iotunnel_tunnel_"),
        "per-tunnel series are opt-in"
    );

    let t = TestServer::start_with(|s| {
        s.relay_plaintext = true;
        s.metrics_per_tunnel = 1;
        s.max_open_tunnels_per_device = 10;
    })
    .await;
    let mut f = t.online_device().await;
    let mut ids = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..2 {
        let created = t.tunnel(&f, json!({})).await;
        let id = created["tunnel_id"].as_str().unwrap().to_string();
        let token = loop {
            let n = f.channel.next_json().await;
            if n["tunnel_id"] == id.as_str() {
                break n["token"].as_str().unwrap().to_string();
            }
        };
        let url = format!(
            "ws://{}/tunnel?local-proxy-mode=destination",
            t.server().relay_addr
        );
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("access-token", token.parse().unwrap());
        req.headers_mut().insert(
            "sec-websocket-protocol",
            "aws.iot.securetunneling-3.0".parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let _service_ids = ws.next().await;
        peers.push(ws);
        ids.push(id);
    }
    ids.sort();
    let mut text = String::new();
    for _ in 0..200 {
        text = scrape(&t).await;
        if text.contains(&format!(
            "iotunnel_tunnel_peer_connected{{tunnel_id=\"{}\",role=\"device\"}} 1",
            ids[0]
        )) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        value(
            &text,
            &format!(
                "iotunnel_tunnel_peer_connected{{tunnel_id=\"{}\",role=\"device\"}}",
                ids[0]
            )
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            &format!(
                "iotunnel_tunnel_peer_connected{{tunnel_id=\"{}\",role=\"client\"}}",
                ids[0]
            )
        ),
        0.0
    );
    assert_eq!(value(&text, &format!("iotunnel_tunnel_relay_bytes_total{{tunnel_id=\"{}\",direction=\"client_to_device\"}}", ids[0])), 0.0);
    assert!(!text.contains(&ids[1]), "capped at one tunnel");
    drop(peers);
}

#[tokio::test]
async fn relay_metrics_off_skips_per_frame_series_only() {
    let t = TestServer::start_with(|s| {
        s.relay_plaintext = true;
        s.relay_metrics = false;
    })
    .await;
    let mut f = t.online_device().await;
    let created = t.tunnel(&f, json!({})).await;
    let (client, device, _) = forward_one_frame(&t, &mut f, &created).await;
    let text = scrape(&t).await;
    // Connection-level series still count; per-frame ones stay at zero.
    assert_eq!(
        value(&text, "iotunnel_peers_connected{role=\"client\"}"),
        1.0
    );
    for series in [
        "iotunnel_relay_bytes_total{direction=\"client_to_device\"}",
        "iotunnel_relay_frames_total{direction=\"client_to_device\"}",
        "iotunnel_forward_latency_seconds_count",
    ] {
        assert_eq!(value(&text, series), 0.0, "{series}");
    }
    drop(client);
    drop(device);
}

/// A sample's series, `name{labels}` without the value, its labels in a fixed order (a series
/// is a set of labels: OpenMetrics writes `le` first, the text format last).
fn series_key(sample: &str) -> String {
    let key = sample.rsplit_once(' ').unwrap().0;
    let Some((name, labels)) = key.split_once('{') else {
        return key.to_string();
    };
    let labels = labels.strip_suffix('}').unwrap();
    // Split at the commas between labels, not inside a quoted value.
    let (mut parts, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&labels[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&labels[start..]);
    parts.sort_unstable();
    format!("{name}{{{}}}", parts.join(","))
}

/// Every series of an exposition in either text format.
fn series(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(series_key)
        .collect()
}

async fn scrape_as(addr: std::net::SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut req = reqwest::Client::new().get(format!("http://{addr}/metrics"));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await.unwrap();
    assert!(resp.status().is_success());
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    (ct, resp.text().await.unwrap())
}

/// The series this exporter had when it still wrote the text format by hand (an idle server
/// with one shard, `tests/metrics-series.txt`): contracts for dashboards and alerts, so each
/// one must still be exported, name, labels, label values and bucket bounds spelled alike.
/// New series may join; none may go.
#[tokio::test]
async fn every_series_of_the_hand_written_exporter_is_still_exported() {
    let t = TestServer::start_with(|s| {
        s.relay_plaintext = true;
        s.shards = 1;
    })
    .await;
    let now = series(&scrape(&t).await);
    let before = include_str!("metrics-series.txt");
    assert!(
        before.lines().count() > 600,
        "the whole exposition is listed"
    );
    let missing: Vec<_> = before
        .lines()
        .map(|s| series_key(&format!("{s} 0")))
        .filter(|s| !now.contains(s))
        .collect();
    assert!(missing.is_empty(), "no longer exported: {missing:#?}");
}

#[tokio::test]
async fn openmetrics_is_served_when_asked_for_with_the_same_series() {
    let t = TestServer::start_with(|s| s.relay_plaintext = true).await;
    let addr = t.server().metrics_addr;
    let (ct, text) = scrape_as(addr, None).await;
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"));
    // What Prometheus sends.
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
        version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (ct, om) = scrape_as(addr, Some(prometheus)).await;
    assert!(
        ct.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ct}"
    );
    assert!(
        om.ends_with("# EOF\n"),
        "an OpenMetrics exposition ends with # EOF"
    );
    // OpenMetrics names a counter's family without `_total`, its samples keep it.
    assert!(om.contains("# TYPE iotunnel_peer_connects counter\n"));
    assert!(om.contains("# TYPE iotunnel_build info\n"));
    let (om, text) = (series(&om), series(&text));
    let differ: Vec<_> = om.symmetric_difference(&text).collect();
    assert!(differ.is_empty(), "only in one format: {differ:#?}");
    let (_, plain) = scrape_as(addr, Some("text/plain;version=0.0.4")).await;
    assert!(!plain.contains("# EOF"));
}

#[tokio::test]
async fn the_api_address_serves_the_same_metrics_without_counting_them_as_api_requests() {
    let t = TestServer::start_with(|s| s.relay_plaintext = true).await;
    let (_, on_api) = scrape_as(t.server().api_addr, None).await;
    let (_, on_metrics) = scrape_as(t.server().metrics_addr, None).await;
    assert_eq!(series(&on_api), series(&on_metrics));
    assert!(on_api.contains("iotunnel_peers_connected{role=\"device\"} 0"));
    // Scrapes of the API address are not API requests (nor unmatched ones).
    let (_, after) = scrape_as(t.server().api_addr, None).await;
    assert!(!after.contains("route=\"/metrics\""));
    for status in ["200", "404"] {
        assert_eq!(
            value(
                &after,
                &format!("iotunnel_api_requests_total{{route=\"unmatched\",status=\"{status}\"}}")
            ),
            0.0
        );
    }
}
