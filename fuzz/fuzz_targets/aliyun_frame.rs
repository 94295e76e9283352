//! Feeds arbitrary bytes to the Alibaba tunnel frame parser and checks that every frame it
//! accepts re-encodes to a frame that parses back the same.
#![no_main]

use iotunnel::proto::aliyun::{self, AliyunError, FrameType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = match aliyun::parse_frame(data) {
        Ok(frame) => frame,
        Err(e) => {
            assert!(AliyunError::LABELS.contains(&e.label()));
            return;
        }
    };
    assert!(frame.payload.len() <= aliyun::MAX_PAYLOAD_LEN);
    let _ = frame.header.check_fields();
    if matches!(
        frame.header.frame_type,
        FrameType::CommonResponse | FrameType::SessionRelease
    ) {
        let _ = aliyun::parse_response_payload(frame.payload);
    }
    // Re-encoding drops unknown keys and escapes, so it may differ in bytes but not in meaning.
    if let Ok(bytes) = aliyun::encode_frame(&frame.header, frame.payload) {
        let again = aliyun::parse_frame(&bytes).expect("an encoded frame parses");
        assert_eq!(again, frame);
    }
});
