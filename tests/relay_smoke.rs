//! A quick end-to-end check of the relay over plaintext ws://, both drivers.
mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use iotunnel::config::IoDriver;
use iotunnel::proto::aws;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

async fn dial(
    t: &TestServer,
    mode: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!(
        "ws://{}/tunnel?local-proxy-mode={mode}",
        t.server().relay_addr
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("access-token", token.parse().unwrap());
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "aws.iot.securetunneling-3.0".parse().unwrap(),
    );
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        "aws.iot.securetunneling-3.0"
    );
    ws
}

async fn next_binary(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Vec<u8> {
    loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Binary(b) = m {
            return b.to_vec();
        }
    }
}

async fn smoke(driver: IoDriver) {
    let t = TestServer::start_with(|s| {
        s.relay_plaintext = true;
        s.io_driver = driver;
    })
    .await;
    let mut f = t.online_device().await;
    let created = t.tunnel(&f, json!({"services": ["SSH", "HTTP"]})).await;
    let device_token = f.channel.next_json().await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut device = dial(&t, "destination", &device_token).await;
    let mut client = dial(&t, "source", created["client_token"].as_str().unwrap()).await;
    for ws in [&mut device, &mut client] {
        let ids = next_binary(ws).await;
        let (m, _) = aws::decode_message(&ids).unwrap().unwrap();
        assert_eq!(
            m.available_service_ids,
            vec!["SSH".to_string(), "HTTP".to_string()]
        );
    }
    let start = aws::Message {
        r#type: aws::MessageType::StreamStart as i32,
        stream_id: 1,
        service_id: "SSH".into(),
        connection_id: 1,
        ..Default::default()
    };
    let data = aws::Message {
        r#type: aws::MessageType::Data as i32,
        stream_id: 1,
        service_id: "SSH".into(),
        connection_id: 1,
        payload: b"hello".to_vec().into(),
        ..Default::default()
    };
    let mut bytes = aws::encode_frame_payload(&start).unwrap();
    bytes.extend(aws::encode_frame_payload(&data).unwrap());
    client
        .send(Message::Binary(bytes.clone().into()))
        .await
        .unwrap();
    assert_eq!(next_binary(&mut device).await, bytes);
    let back = aws::encode_frame_payload(&aws::Message {
        r#type: aws::MessageType::Data as i32,
        stream_id: 1,
        service_id: "SSH".into(),
        payload: vec![7; 60_000].into(),
        ..Default::default()
    })
    .unwrap();
    device
        .send(Message::Binary(back.clone().into()))
        .await
        .unwrap();
    assert_eq!(next_binary(&mut client).await, back);

    let id = created["tunnel_id"].as_str().unwrap();
    let (s, _) = t
        .post(&format!("/v1/tunnels/{id}/close"), &f.key, json!({}))
        .await;
    assert_eq!(s, 200);
    for ws in [&mut device, &mut client] {
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
                .await
                .unwrap()
            {
                Some(Ok(Message::Close(Some(c)))) => {
                    assert_eq!(u16::from(c.code), 1000);
                    assert!(c.reason.contains("closed"), "{}", c.reason);
                    break;
                }
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
    // Describe shows what each side sent and received on its connection.
    let mut d = serde_json::Value::Null;
    for _ in 0..500 {
        d = t.get(&format!("/v1/tunnels/{id}"), &f.key).await.1;
        if d["client"]["state"] == "DISCONNECTED"
            && d["device"]["state"] == "DISCONNECTED"
            && d["device"]["bytes_sent"].as_u64() > Some(0)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (client_sent, device_received) = (
        d["client"]["bytes_sent"].as_u64().unwrap(),
        d["device"]["bytes_received"].as_u64().unwrap(),
    );
    assert!(client_sent >= bytes.len() as u64, "{d}");
    assert!(device_received >= bytes.len() as u64, "{d}");
    assert!(
        d["device"]["bytes_sent"].as_u64().unwrap() >= back.len() as u64,
        "{d}"
    );
    assert!(
        d["client"]["bytes_received"].as_u64().unwrap() >= back.len() as u64,
        "{d}"
    );
}

#[tokio::test]
async fn smoke_uring() {
    smoke(IoDriver::Uring).await;
}

#[tokio::test]
async fn smoke_epoll() {
    smoke(IoDriver::Epoll).await;
}

/// Bytes that arrive with the upgrade request (here a whole frame in the same write) travel
/// with the socket when the accepting shard hands it to the tunnel's owner shard.
async fn handoff_keeps_bytes_read_with_the_request(driver: IoDriver) {
    use tokio::io::AsyncWriteExt;
    let t = TestServer::start_with(|s| {
        s.relay_plaintext = true;
        s.io_driver = driver;
        s.shards = 4;
        s.max_open_tunnels_per_device = 100;
    })
    .await;
    let mut f = t.online_device().await;
    for i in 0..12u8 {
        let created = t.tunnel(&f, json!({})).await;
        let device_token = loop {
            let n = f.channel.next_json().await;
            if n["tunnel_id"] == created["tunnel_id"] {
                break n["token"].as_str().unwrap().to_string();
            }
        };
        let data = aws::Message {
            r#type: aws::MessageType::Data as i32,
            stream_id: 1,
            service_id: "SSH".into(),
            payload: vec![i; 1000].into(),
            ..Default::default()
        };
        let payload = aws::encode_frame_payload(&data).unwrap();
        let mask = [1, 2, 3, 4];
        let mut wire = format!(
            "GET /tunnel?local-proxy-mode=destination HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: aws.iot.securetunneling-3.0\r\naccess-token: {device_token}\r\n\r\n"
        )
        .into_bytes();
        wire.extend(iotunnel::proto::ws::client_frame(
            true,
            iotunnel::proto::ws::OpCode::Binary,
            mask,
            &payload,
        ));
        let mut raw = tokio::net::TcpStream::connect(t.server().relay_addr)
            .await
            .unwrap();
        raw.write_all(&wire).await.unwrap();
        let mut client = dial(&t, "source", created["client_token"].as_str().unwrap()).await;
        let _service_ids = next_binary(&mut client).await;
        assert_eq!(
            next_binary(&mut client).await,
            payload,
            "tunnel {i}: the early frame arrives intact"
        );
        drop(raw);
    }
}

#[tokio::test]
async fn handoff_keeps_bytes_uring() {
    handoff_keeps_bytes_read_with_the_request(IoDriver::Uring).await;
}

#[tokio::test]
async fn handoff_keeps_bytes_epoll() {
    handoff_keeps_bytes_read_with_the_request(IoDriver::Epoll).await;
}
