//! Hot-path benchmarks of the frame codec: header parsing over a stream of small frames (what a
//! chatty connection looks like to the relay) and unmasking of large payloads.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wsgate::ws::codec::{apply_mask, encode_header, Decoder, OpCode, Role, NO_PAYLOAD_LIMIT};

/// Frames in the header-parsing stream.
const SMALL_FRAMES: usize = 4096;

/// A client-to-upstream stream of masked frames with 0..=63-byte payloads, mixed opcodes, plus a
/// fragmented message every so often.
fn small_frame_stream() -> Vec<u8> {
    let mut out = Vec::new();
    let mut header = [0u8; 14];
    for i in 0..SMALL_FRAMES {
        let len = (i * 7 % 64) as u64;
        let (fin, opcode) = match i % 8 {
            0 => (false, OpCode::Text),
            1 => (true, OpCode::Continuation),
            2 => (true, OpCode::Ping),
            3 => (true, OpCode::Pong),
            4 | 5 => (true, OpCode::Binary),
            _ => (true, OpCode::Text),
        };
        let n = encode_header(fin, 0, opcode, len, Some([1, 2, 3, 4]), &mut header);
        out.extend_from_slice(&header[..n]);
        out.resize(out.len() + len as usize, 0x5A);
    }
    out
}

/// Walk the stream like the relay does: parse a header, skip its payload.
fn walk(stream: &[u8]) -> usize {
    let mut dec = Decoder::new(Role::Client, NO_PAYLOAD_LIMIT);
    let mut pos = 0;
    let mut frames = 0;
    while let Ok(Some(h)) = dec.parse_header(&stream[pos..]) {
        pos += h.frame_len() as usize;
        frames += 1;
    }
    frames
}

fn parse_headers(c: &mut Criterion) {
    let stream = small_frame_stream();
    assert_eq!(walk(&stream), SMALL_FRAMES);
    let mut group = c.benchmark_group("parse_header");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("small_frames", |b| b.iter(|| walk(black_box(&stream))));
    group.finish();
}

/// The obvious byte-at-a-time loop, as a baseline for `apply_mask`.
fn mask_bytewise(buf: &mut [u8], key: [u8; 4], offset: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= key[(offset as usize + i) % 4];
    }
}

fn unmask(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_mask");
    for size in [16 * 1024, 1024 * 1024] {
        let mut buf = vec![0xA5u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("words", size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), [1, 2, 3, 4], 0))
        });
        // A piece that starts mid-payload at an odd offset and an unaligned address.
        group.bench_with_input(BenchmarkId::new("words_unaligned", size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf[3..]), [1, 2, 3, 4], 3))
        });
        group.bench_with_input(BenchmarkId::new("bytewise", size), &size, |b, _| {
            b.iter(|| mask_bytewise(black_box(&mut buf), [1, 2, 3, 4], 0))
        });
    }
    group.finish();
}

criterion_group!(benches, parse_headers, unmask);
criterion_main!(benches);
