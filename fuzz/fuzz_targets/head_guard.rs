//! Feeds arbitrary bytes, cut at arbitrary points, to the request-head scanner the way the
//! head gate does (bytes of an incomplete head are held, the rest released) and checks that
//! nothing panics, that the outcome does not depend on how the input was cut, that the
//! released bytes are always a prefix of the input, and that no head over the limits is
//! ever released.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use wsgate::error::HeadRefusal;
use wsgate::listener::head_guard::{HeadLimits, Scanner, Tail};

#[derive(Debug, Arbitrary)]
struct Input {
    /// Small limits make refusals reachable; each is at least 1.
    max_head: u16,
    max_headers: u8,
    /// Chunk sizes (each + 1), cycled; empty = the whole input in one chunk.
    splits: Vec<u8>,
    data: Vec<u8>,
}

#[derive(Debug, PartialEq)]
struct Outcome {
    released: Vec<u8>,
    refusal: Option<HeadRefusal>,
    heads_done: u32,
    in_head: bool,
    /// Bytes of the incomplete head at the end, when there is one.
    head_len: usize,
}

fn run(limits: HeadLimits, data: &[u8], splits: &[u8]) -> Outcome {
    let mut scanner = Scanner::new(limits);
    let mut held: Vec<u8> = Vec::new();
    let mut released = Vec::new();
    let mut sizes = splits.iter().map(|s| usize::from(*s) + 1).cycle();
    let mut rest = data;
    while !rest.is_empty() {
        let n = if splits.is_empty() {
            rest.len()
        } else {
            sizes.next().unwrap_or(rest.len()).min(rest.len())
        };
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let base = held.len();
        held.extend_from_slice(chunk);
        let cut = match scanner.feed(chunk) {
            Tail::Released => held.len(),
            Tail::HeadFrom(at) => {
                assert!(at <= chunk.len(), "head start {at} past the chunk");
                base + at
            }
            Tail::HeadContinues => 0,
        };
        released.extend(held.drain(..cut));
        if scanner.refusal().is_some() {
            break;
        }
        // A head still being received never exceeds the limit.
        assert!(scanner.head_len() <= limits.max_head);
        assert!(held.len() >= scanner.head_len().min(held.len()));
    }
    Outcome {
        released,
        refusal: scanner.refusal(),
        heads_done: scanner.heads_done(),
        in_head: scanner.in_head(),
        head_len: scanner.head_len(),
    }
}

fuzz_target!(|input: Input| {
    let limits = HeadLimits {
        max_head: usize::from(input.max_head.max(1)),
        max_headers: usize::from(input.max_headers.max(1)),
    };
    let whole = run(limits, &input.data, &[]);
    assert!(
        input.data.starts_with(&whole.released),
        "released bytes are not a prefix of the input"
    );
    if let Some(refusal) = whole.refusal {
        match refusal {
            HeadRefusal::TooLarge { limit } => assert_eq!(limit, limits.max_head),
            HeadRefusal::TooManyHeaders { limit } => assert_eq!(limit, limits.max_headers),
            HeadRefusal::AmbiguousLength | HeadRefusal::DuplicateLength => {}
        }
    }
    let cut = run(limits, &input.data, &input.splits);
    assert_eq!(whole, cut, "the outcome depends on how the input was cut");
    // Byte by byte, the slowest client possible.
    if input.data.len() <= 4096 {
        let one = run(limits, &input.data, &[0]);
        assert_eq!(whole, one, "byte-by-byte feeding differs");
    }
});
