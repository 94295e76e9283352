//! Feeds arbitrary bytes to the relay's upgrade-request parsing (head framing, httparse, path,
//! headers, tokens, subprotocols): it never panics, and accepts only what a tunnel path names.
#![no_main]

use iotunnel::relay::upgrade::{self, MAX_REQUEST};
use iotunnel::seam::Family;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Whatever the bytes, parsing them as a head answers without panicking.
    let _ = upgrade::parse_head(data);
    let Some(end) = upgrade::find_head_end(data) else {
        return;
    };
    assert!(end <= data.len() && data[..end].ends_with(b"\r\n\r\n"));
    if end > MAX_REQUEST {
        return;
    }
    let head = &data[..end];
    if let Ok(parsed) = upgrade::parse_head(head) {
        // httparse skips empty lines before the request line (RFC 9112 2.2).
        let start = head
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(0);
        assert!(head[start..].starts_with(b"GET "), "only GET is accepted");
        let text = String::from_utf8_lossy(head);
        match parsed.family {
            Family::Aws => assert!(text.contains("local-proxy-mode=")),
            Family::Aliyun => assert!(text.contains("/tunnel/")),
        }
        assert!(parsed.tokens.iter().all(|t| head
            .windows(t.len().max(1))
            .any(|w| t.is_empty() || w == t.as_bytes())));
    }
});
