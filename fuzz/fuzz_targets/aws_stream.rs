//! Feeds arbitrary bytes to the AWS boundary tracker, whole and in pieces, and checks that the
//! pieces change nothing and that every message it accepts decodes with prost to the same header.
#![no_main]

use iotunnel::proto::aws::{self, BoundaryTracker, MessageHeader, StreamError};
use libfuzzer_sys::fuzz_target;

/// Messages found (end offset, header) and the error that stopped the stream, if any.
fn track(stream: &[u8], piece: usize) -> (Vec<(usize, MessageHeader)>, Option<StreamError>) {
    let mut tracker = BoundaryTracker::new();
    let mut found = Vec::new();
    let mut base = 0;
    for chunk in stream.chunks(piece) {
        let result = tracker.feed(chunk, |end, h| {
            found.push((base + end, *h));
            Ok::<_, StreamError>(())
        });
        if let Err(e) = result {
            return (found, Some(e));
        }
        base += chunk.len();
    }
    assert_eq!(
        tracker.at_boundary(),
        found.last().map_or(0, |f| f.0) == stream.len()
    );
    (found, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, stream)) = data.split_first() else {
        return;
    };
    let whole = track(stream, stream.len().max(1));
    let pieces = track(stream, usize::from(knob % 16) + 1);
    assert_eq!(whole, pieces);

    let mut start = 0;
    for (end, header) in &whole.0 {
        match aws::decode_message(&stream[start..*end]) {
            Ok(Some((message, used))) => {
                assert_eq!(start + used, *end);
                // `len` is the bytes on the wire, which re-encoding need not reproduce.
                let mut want = MessageHeader::of(&message);
                want.len = header.len;
                assert_eq!(*header, want);
            }
            Ok(None) => panic!("tracker ended a message prost finds incomplete"),
            // The tracker skips field 6 unread, so it does not check that it is UTF-8.
            Err(e) => assert!(e.to_string().contains("string"), "{e}"),
        }
        start = *end;
    }
    if let Some(e) = whole.1 {
        assert!(StreamError::LABELS.contains(&e.label()));
    }
});
