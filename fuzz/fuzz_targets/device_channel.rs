//! The device channel's inputs from outside: the agent's parsing of the server's notifications
//! (JSON, then the relay endpoint a `connect` names), and the server's checks of the
//! authentication headers (timestamp window, signature). Nothing panics; a signature matches
//! only when it is the HMAC of the headers.
#![no_main]

use iotunnel::agent::device::relay_endpoint;
use iotunnel::agent::dial::Endpoint;
use iotunnel::control::device_channel::{
    signature_matches, timestamp_fresh, TIMESTAMP_WINDOW_SECS,
};
use iotunnel::proto::device::ServerMessage;
use iotunnel::token;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "device-secret";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        notification(rest);
    } else {
        auth_headers(rest);
    }
});

fn notification(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(ServerMessage::Connect(note)) = serde_json::from_str::<ServerMessage>(text) else {
        return;
    };
    if let Ok(endpoint) = relay_endpoint(&note) {
        assert!(!endpoint.host.is_empty());
        // What the agent dials is what it would print and parse again.
        let again = Endpoint::parse(&endpoint.host_port()).expect("host_port parses back");
        assert_eq!((again.host, again.port), (endpoint.host, endpoint.port));
    }
}

/// Lines: now (server clock, unix seconds), product key, device name, timestamp, signature.
fn auth_headers(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split('\n');
    let (Some(now), Some(pk), Some(dn), Some(ts_text), Some(signature)) = (
        lines.next(),
        lines.next(),
        lines.next(),
        lines.next(),
        lines.next(),
    ) else {
        return;
    };
    if let (Ok(now_s), Ok(ts)) = (now.parse::<i64>(), ts_text.parse::<i64>()) {
        let fresh = timestamp_fresh(now_s, ts);
        assert_eq!(
            fresh,
            i128::from(now_s).abs_diff(i128::from(ts)) <= TIMESTAMP_WINDOW_SECS as u128
        );
    }
    let expected = hex::encode(token::hmac_sha256(
        SECRET.as_bytes(),
        format!("{pk}\n{dn}\n{ts_text}").as_bytes(),
    ));
    assert!(signature_matches(SECRET, pk, dn, ts_text, &expected));
    let matches = signature_matches(SECRET, pk, dn, ts_text, signature);
    assert_eq!(
        matches,
        signature.eq_ignore_ascii_case(&expected),
        "{signature:?}"
    );
}
