//! Criterion benchmarks of the relay's hot-path codecs (`cargo bench --bench codec`).
//!
//! Every bench reports `Throughput::Bytes` of the data the relay moves for that operation, so
//! criterion prints GB/s: for header work that is the whole frame, as parsing or rewriting the
//! header is what lets the relay pass the payload through without touching it.
//!
//! - `ws_parse_client_header`: [`ws::parse_client_header`] of a masked client frame.
//! - `ws_unmask`: [`ws::unmask`] in place, against a byte-at-a-time loop (`unmask_naive`).
//! - `ws_write_header_before`: the server header written over the client's own header.
//! - `aws_boundary_tracker`: [`aws::BoundaryTracker::feed`] over a stream of DATA messages, in
//!   16 KiB pieces and one whole `[u16 length][message]` frame payload at a time, against
//!   decoding every message with prost ([`aws::decode_message`]).
//! - `aliyun_parse_frame`: [`aliyun::parse_frame`] of a data_transport and a session_create.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use iotunnel::proto::{aliyun, aws, ws};

/// A mask key with four distinct bytes, so a wrong mask phase would show in the checks.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Payload sizes of the header benches: small, one Aliyun payload, 16-bit limit, AWS frame limit.
const HEADER_SIZES: [usize; 4] = [64, 4096, 65_536, ws::DEFAULT_MAX_PAYLOAD];

/// Payload sizes of the unmask bench.
const UNMASK_SIZES: [usize; 5] = [64, 1024, 16_384, 65_536, ws::DEFAULT_MAX_PAYLOAD];

/// Total bytes of each AWS message stream (about 1 MiB, so per-call overhead stays small).
const AWS_STREAM_BYTES: usize = 1 << 20;

/// The piece size of the chunked tracker bench.
const AWS_CHUNK: usize = 16 * 1024;

/// Deterministic, non-constant payload bytes.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

/// A masked binary client frame with a `len`-byte payload.
fn client_frame(len: usize) -> Vec<u8> {
    ws::client_frame(true, ws::OpCode::Binary, MASK, &payload(len))
}

/// The baseline: XOR one byte at a time with the mask byte of its phase.
fn unmask_naive(buf: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

fn ws_parse_client_header(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_parse_client_header");
    for size in HEADER_SIZES {
        let frame = client_frame(size);
        let header = ws::parse_client_header(&frame, ws::DEFAULT_MAX_PAYLOAD)
            .expect("valid frame")
            .expect("complete header");
        assert_eq!(header.frame_len(), frame.len());
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &frame, |b, frame| {
            b.iter(|| ws::parse_client_header(black_box(frame), ws::DEFAULT_MAX_PAYLOAD))
        });
    }
    group.finish();
}

fn ws_unmask(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_unmask");
    for size in UNMASK_SIZES {
        let original = payload(size);
        let mut fast = original.clone();
        let mut naive = original.clone();
        ws::unmask(&mut fast, MASK);
        unmask_naive(&mut naive, MASK);
        assert_eq!(fast, naive, "unmask and the baseline disagree at {size}");

        // Unmasking is an involution, so the buffer is reused as is; its contents do not
        // change the work done.
        group.throughput(Throughput::Bytes(size as u64));
        let mut buf = original.clone();
        group.bench_function(BenchmarkId::new("unmask", size), |b| {
            b.iter(|| ws::unmask(black_box(&mut buf[..]), black_box(MASK)))
        });
        let mut buf = original;
        group.bench_function(BenchmarkId::new("unmask_naive", size), |b| {
            b.iter(|| unmask_naive(black_box(&mut buf[..]), black_box(MASK)))
        });
    }
    group.finish();
}

fn ws_write_header_before(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_write_header_before");
    for size in HEADER_SIZES {
        let mut frame = client_frame(size);
        let h = ws::parse_client_header(&frame, ws::DEFAULT_MAX_PAYLOAD)
            .expect("valid frame")
            .expect("complete header");
        let start = ws::write_header_before(&mut frame, h.header_len, h.fin, h.opcode, size)
            .expect("a client header leaves room for the server header");
        assert_eq!(start, 4);
        let server = ws::parse_header(&frame[start..], ws::Sender::Server, size)
            .expect("valid server header")
            .expect("complete server header");
        assert_eq!(server.frame_len(), frame.len() - start);

        // Rewriting again writes the same bytes, so the buffer is reused across iterations.
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| {
                ws::write_header_before(
                    black_box(&mut frame[..]),
                    black_box(h.header_len),
                    h.fin,
                    h.opcode,
                    black_box(h.payload_len),
                )
            })
        });
    }
    group.finish();
}

/// A DATA message on stream 1 with a `len`-byte payload, as `[u16 length][message]`.
fn aws_data_frame(len: usize) -> Vec<u8> {
    let message = aws::Message {
        r#type: aws::MessageType::Data as i32,
        stream_id: 1,
        payload: Bytes::from(payload(len)),
        ..aws::Message::default()
    };
    aws::encode_frame_payload(&message).expect("message fits a u16 length")
}

/// Feeds `pieces` to a fresh tracker; returns how many messages ended.
fn track(pieces: &[&[u8]]) -> usize {
    let mut tracker = aws::BoundaryTracker::new();
    let mut messages = 0;
    for piece in pieces {
        tracker
            .feed(piece, |_, header| {
                black_box(header);
                messages += 1;
                Ok::<_, aws::StreamError>(())
            })
            .expect("valid stream");
    }
    messages
}

/// Decodes every message of `stream` with prost; returns how many there were.
fn decode_all(mut stream: &[u8]) -> usize {
    let mut messages = 0;
    while let Some((message, used)) = aws::decode_message(stream).expect("valid stream") {
        black_box(&message);
        messages += 1;
        stream = &stream[used..];
    }
    messages
}

fn aws_boundary_tracker(c: &mut Criterion) {
    let mut group = c.benchmark_group("aws_boundary_tracker");
    for (label, payload_len) in [("63KiB", aws::MAX_PAYLOAD), ("1KiB", 1024)] {
        let frame = aws_data_frame(payload_len);
        let count = AWS_STREAM_BYTES / frame.len();
        let stream = frame.repeat(count);
        let whole_frames: Vec<&[u8]> = stream.chunks(frame.len()).collect();
        let chunks: Vec<&[u8]> = stream.chunks(AWS_CHUNK).collect();
        assert_eq!(track(&whole_frames), count);
        assert_eq!(track(&chunks), count);
        assert_eq!(decode_all(&stream), count);

        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("tracker_16KiB_chunks", label),
            &chunks,
            |b, chunks| b.iter(|| track(black_box(chunks))),
        );
        group.bench_with_input(
            BenchmarkId::new("tracker_whole_frames", label),
            &whole_frames,
            |b, frames| b.iter(|| track(black_box(frames))),
        );
        group.bench_with_input(
            BenchmarkId::new("prost_decode_message", label),
            &stream,
            |b, stream| b.iter(|| decode_all(black_box(stream))),
        );
    }
    group.finish();
}

fn aliyun_parse_frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("aliyun_parse_frame");
    // The header a client sends with tunnel bytes once the relay has assigned the session
    // (session ids are `<tunnel id prefix>-<n>`, relay/pump.rs).
    let data = aliyun::encode_frame(
        &aliyun::FrameHeader {
            frame_type: aliyun::FrameType::DataTransport,
            session_id: Some("3f2a9c1b-17".into()),
            frame_id: 1_234_567,
            service_type: Some("_SSH".into()),
        },
        &payload(aliyun::MAX_PAYLOAD_LEN),
    )
    .expect("valid frame");
    // The client's first frame: no session id, no payload.
    let create = aliyun::encode_frame(
        &aliyun::FrameHeader {
            frame_type: aliyun::FrameType::SessionCreate,
            session_id: None,
            frame_id: 1,
            service_type: Some("_SSH".into()),
        },
        b"",
    )
    .expect("valid frame");
    for (name, frame) in [("data_transport_4KiB", &data), ("session_create", &create)] {
        let parsed = aliyun::parse_frame(frame).expect("valid frame");
        parsed.header.check_fields().expect("complete header");
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), frame, |b, frame| {
            b.iter(|| aliyun::parse_frame(black_box(frame)).map(|f| f.payload.len()))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    ws_parse_client_header,
    ws_unmask,
    ws_write_header_before,
    aws_boundary_tracker,
    aliyun_parse_frame
);
criterion_main!(benches);
